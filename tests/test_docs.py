"""The documentation's own checks that need no site build: the generated configuration
reference matches conf/, every page of the site's nav exists, README.md is a short front door
that links every page, and user-facing text names no tracker issues. (`make docs` builds the site
with `mkdocs build --strict`; tests/test_doc_commands.py composes the documented commands.)"""

from __future__ import annotations

import importlib.util
import re

import yaml

from tests.conftest import ROOT


def load_generator():
    spec = importlib.util.spec_from_file_location(
        "gen_config_reference", ROOT / "tools" / "gen_config_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nav_pages() -> list[str]:
    """Every Markdown file the site's nav names, relative to docs/."""
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    pages: list[str] = []

    def walk(node):
        if isinstance(node, str):
            pages.append(node)
        elif isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)

    walk(nav)
    return pages


def test_config_reference_is_current():
    """docs/configuration/reference.md is what the generator writes from conf/ today: after a
    change to conf/, `make docs-config` regenerates it."""
    gen = load_generator()
    committed = (ROOT / "docs" / "configuration" / "reference.md").read_text()
    assert committed == gen.generate(), "stale configuration reference: run `make docs-config`"


def test_config_reference_lists_every_option_and_key():
    gen = load_generator()
    text = gen.generate()
    for path in sorted((ROOT / "conf").glob("*/*.yaml")):
        if path.parent.name in ("preset", "sweep"):
            continue
        assert f"`{path.parent.name}={path.stem}`" in text, path
    # a few keys at every depth, with their defaults and comments
    assert "| `evaluate.protocol` | `mtt` | mtt: MTT's evaluate_synset" in text
    assert "| `dataset.zca_eps` | `0.1` |" in text
    assert "| `eps_net.rank` | `8` | TT rank r of every inner bond |" in text
    assert "| `hydra.launcher.signal_delay_s` | `300` |" in text


def test_the_generator_reads_comments(tmp_path):
    """Inline comments, aligned continuation lines and comment lines above a key."""
    gen = load_generator()
    f = tmp_path / "x.yaml"
    f.write_text(
        "# Header line.\n#   python train.py x=1\na:\n  b: 1   # first\n         # second\n"
        "  # above c\n  c: [1, 2]\n"
    )
    header, is_global, comments = gen.scan(f)
    assert header == "Header line.\n\n```bash\npython train.py x=1\n```" and not is_global
    assert comments["a.b"] == "first second" and comments["a.c"] == "above c"


def test_every_nav_page_exists():
    missing = [p for p in nav_pages() if not (ROOT / "docs" / p).is_file()]
    assert not missing, f"mkdocs.yml names missing pages: {missing}"


def test_readme_is_a_front_door_that_links_every_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    unlinked = [p for p in nav_pages() if f"(docs/{p})" not in text]
    assert not unlinked, f"README.md does not link {unlinked}"


def test_no_tracker_numbers_in_user_facing_text():
    pattern = re.compile(r"\b[Ii]ssues? #?\d+|\b[Ii]tems? \d+\b")
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    hits = [
        f"{f.relative_to(ROOT)}:{n}: {line.strip()}"
        for f in files
        for n, line in enumerate(f.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, "\n".join(hits)


def test_every_key_has_a_meaning():
    """Every key in the reference has a meaning: a YAML comment in its file, or in another file
    that defines the same key. A new key needs a comment beside it in conf/."""
    text = load_generator().generate()
    blank = [line.split("|")[1].strip() for line in text.splitlines() if line.endswith("|  |")]
    assert not blank, f"keys without a comment in conf/: {blank}"
