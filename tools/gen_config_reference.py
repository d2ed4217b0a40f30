"""Write docs/configuration/reference.md from conf/: every config group, option, key, default and
the key's comment in its YAML file, so the reference cannot drift from the configuration.

    python tools/gen_config_reference.py            # rewrite the page (`make docs-config`)
    python tools/gen_config_reference.py --check    # exit 1 if the committed page is stale

The meaning of a key is its YAML comment: the inline comment on the key's line, the comment
lines aligned under it (continuations), and any comment lines just above it. A file's header
comment (before its first key) describes the option. Defaults are the values in the files;
`${...}` interpolations are shown as written.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
OUT = ROOT / "docs" / "configuration" / "reference.md"

KEY_LINE = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_][\w\-]*)\s*:(?P<rest>.*)$")
#: groups whose files Hydra composes under their own name (the others are `@package _global_`
#: or special); keys of dataset/cifar10.yaml are typed dataset.<key>
GROUP_ORDER = ["task", "dataset", "net", "eps_net", "method", "trainer", "logger", "experiment"]


def split_comment(rest: str) -> tuple[str, str]:
    """Split the text after `key:` into (value text, inline comment), ignoring `#` inside
    quotes or brackets."""
    depth, quote = 0, ""
    for i, ch in enumerate(rest):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "#" and depth == 0 and (i == 0 or rest[i - 1].isspace()):
            return rest[:i].strip(), rest[i + 1 :].strip()
    return rest.strip(), ""


def render_header(lines: list[str]) -> str:
    """A header comment as Markdown: indented lines (commands) become a code block, the rest
    one paragraph per run of lines."""
    out: list[str] = []
    code = False
    for line in lines:
        is_code = line.startswith("  ")
        if is_code and not code:
            out += ["", "```bash"]
        elif not is_code and code:
            out += ["```", ""]
        code = is_code
        out.append(line[2:] if is_code else line)
    if code:
        out.append("```")
    text = "\n".join(out).strip()
    # join the prose lines of each paragraph into one line
    parts = [p.strip() for p in re.split(r"(```bash\n.*?\n```)", text, flags=re.S) if p.strip()]
    return "\n\n".join(
        p if p.startswith("```") else "\n\n".join(" ".join(q.split()) for q in p.split("\n\n"))
        for p in parts
    )


def scan(path: Path) -> tuple[str, bool, dict[str, str]]:
    """(header comment as Markdown, is a `@package _global_` file, {dotted key: comment})."""
    header: list[str] = []
    is_global = False
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []  # (indent, key) of the open mappings
    pending: list[str] = []  # comment lines above the next key
    last_key, last_col = None, -1  # the previous key and the column of its inline '#'
    seen_key = False
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not stripped:
            pending = []
            continue
        if stripped.startswith("#"):
            text = stripped.lstrip("#").strip()
            if text.startswith("@package"):
                is_global = "_global_" in text
                continue
            if not seen_key:
                body = stripped[1:]
                header.append(body[1:] if body.startswith(" ") else body)
            elif last_key is not None and raw.index("#") == last_col:
                comments[last_key] = (comments[last_key] + " " + text).strip()
            else:
                pending.append(text)
            continue
        m = KEY_LINE.match(raw)
        if not m:  # a list item or a continued value
            continue
        seen_key = True
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [m["key"]])
        value, inline = split_comment(m["rest"])
        comments[dotted] = " ".join(pending + ([inline] if inline else [])).strip()
        pending = []
        last_key = dotted
        last_col = raw.index("#", len(m["indent"]) + len(m["key"])) if inline else -1
        if value == "":
            stack.append((indent, m["key"]))
    return render_header(header), is_global, comments


def flatten(node, prefix: str = "") -> list[tuple[str, object]]:
    """Leaves of a loaded YAML mapping as (dotted key, value); empty mappings are leaves."""
    out: list[tuple[str, object]] = []
    if isinstance(node, dict) and node:
        for key, value in node.items():
            out.extend(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    else:
        out.append((prefix, node))
    return out


def show(value) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list | dict):
        text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
        return f"`{text}`"
    return f"`{value}`"


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def known_meanings() -> dict[str, str]:
    """Full key -> the first comment any file of conf/ gives it (option files in name order):
    a key an option leaves uncommented (cifar100's `zca`, an experiment's `reproduce.experts`)
    means what it means where it is commented."""
    paths = [CONF / "config.yaml", *sorted(CONF.glob("*/*.yaml")), *sorted(CONF.glob("*/*/*.yaml"))]
    out: dict[str, str] = {}
    for path in paths:
        group = path.parent.relative_to(CONF).as_posix()
        if path.parent == CONF or group.startswith(("preset", "sweep")):
            prefix = ""
        else:
            prefix = group.replace("/", ".")
        _, is_global, comments = scan(path)
        for key, text in comments.items():
            full = key if is_global or not prefix else f"{prefix}.{key}"
            if text and full not in out:
                out[full] = text
    return out


def fallback_meaning(full: str, key: str, value, meanings: dict[str, str]) -> str:
    """A meaning for a key its own file leaves uncommented."""
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "_target_":
        return "the class Hydra instantiates"
    if leaf == "name" and not isinstance(value, dict):
        return "the option's name as the code sees it"
    if full in meanings:
        return meanings[full]
    m = re.fullmatch(r"reproduce\.method_keys\.(\w+)\.(\w+)", full)
    if m and (CONF / "method" / f"{m[1]}.yaml").exists():  # a method.* key of that method
        return scan(CONF / "method" / f"{m[1]}.yaml")[2].get(m[2], "")
    if isinstance(value, str) and re.fullmatch(r"\$\{[\w.]+\}", value):
        return f"follows `{value[2:-1]}`"
    return ""


def option_table(path: Path, package: str) -> list[str]:
    """The description and key table of one option file, keys prefixed with `package`."""
    header, is_global, comments = scan(path)
    meanings = known_meanings()
    data = yaml.safe_load(path.read_text()) or {}
    prefix = "" if is_global else package
    lines: list[str] = []
    if header:
        lines += [header, ""]
    defaults = data.pop("defaults", None)
    if defaults:
        items = [d if isinstance(d, str) else ", ".join(f"{k}: {v}" for k, v in d.items())
                 for d in defaults]  # fmt: skip
        lines += ["Builds on: " + ", ".join(f"`{i}`" for i in items), ""]
    rows = flatten(data)
    if rows and rows != [("", {})]:
        lines += ["| key | default | meaning |", "|---|---|---|"]
        shown_blocks: set[str] = set()
        for key, value in rows:
            full = f"{prefix}.{key}" if prefix else key
            # a commented mapping gets its own row (its comment describes the block)
            parts = key.split(".")
            for i in range(1, len(parts)):
                block = ".".join(parts[:i])
                if comments.get(block) and block not in shown_blocks:
                    shown_blocks.add(block)
                    name = f"{prefix}.{block}" if prefix else block
                    lines.append(f"| `{name}` | (block) | {cell(comments[block])} |")
            meaning = comments.get(key, "") or fallback_meaning(full, key, value, meanings)
            lines.append(f"| `{full}` | {cell(show(value))} | {cell(meaning)} |")
        lines.append("")
    return lines


def generate() -> str:
    top = yaml.safe_load((CONF / "config.yaml").read_text())
    chosen: dict[str, str] = {}
    for item in top.get("defaults", []):
        if isinstance(item, dict):
            chosen.update(item)
    # groups chosen inside an option's own defaults list (task=distill picks /method: mtt)
    for path in sorted(CONF.glob("*/*.yaml")):
        for item in (yaml.safe_load(path.read_text()) or {}).get("defaults") or []:
            if isinstance(item, dict):
                for group, option in item.items():
                    group = group.lstrip("/")
                    if group not in chosen and (CONF / group).is_dir():
                        chosen[group] = f"{option} (set by {path.parent.name}={path.stem})"
    groups = [g for g in GROUP_ORDER if (CONF / g).is_dir()]
    groups += sorted(
        p.name
        for p in CONF.iterdir()
        if p.is_dir() and p.name not in groups and p.name not in ("preset", "sweep", "hydra")
    )
    out = [
        "# Configuration reference",
        "",
        "<!-- generated by tools/gen_config_reference.py from conf/: do not edit by hand;",
        "     regenerate with `make docs-config` -->",
        "",
        "Every key of `conf/`, with its default and the comment beside it in the YAML file. Pick",
        "an option of a group with `group=option` (`dataset=cifar100`), set a key with",
        "`key=value` (`dataset.zca=true`), add an experiment overlay with `+experiment=name`.",
        "This page is generated from the files by `make docs-config`.",
        "",
        "## Groups",
        "",
        "| group | default | options |",
        "|---|---|---|",
    ]
    for g in groups:
        options = sorted(p.stem for p in (CONF / g).glob("*.yaml"))
        default = chosen.get(g)
        shown = (
            f"`{default.split(' (')[0]}`{default[len(default.split(' (')[0]) :]}"
            if default
            else "none (`+" + g + "=<option>`)"
        )
        out.append(f"| [`{g}`](#{g}) | {shown} | " + ", ".join(f"`{o}`" for o in options) + " |")
    launchers = sorted(p.stem for p in (CONF / "hydra" / "launcher").glob("*.yaml"))
    out.append(
        "| [`hydra/launcher`](#hydralauncher) | Hydra's basic launcher | "
        + ", ".join(f"`{o}`" for o in launchers)
        + " |"
    )
    out += ["", "## Top-level keys (`conf/config.yaml`)", ""]
    out += option_table(CONF / "config.yaml", "")
    for g in groups:
        out += [f"## {g}", ""]
        for path in sorted((CONF / g).glob("*.yaml")):
            out += [f"### `{g}={path.stem}`", ""]
            out += option_table(path, g)
    out += ["## hydra/launcher", ""]
    for path in sorted((CONF / "hydra" / "launcher").glob("*.yaml")):
        out += [f"### `hydra/launcher={path.stem}`", ""]
        out += option_table(path, "hydra.launcher")
    out += preset_section()
    out += sweep_section()
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).rstrip() + "\n"


def preset_section() -> list[str]:
    """The published hyperparameter rows: one table per method, one row per (dataset, IPC)."""
    root = CONF / "preset"
    if not root.is_dir():
        return []
    out = [
        "## Published presets (`conf/preset/<method>/<dataset>_ipc<ipc>.yaml`)",
        "",
        "`task=distill` (and `task=reproduce`) fill every `null` key of the method from the row",
        "of the run's dataset and IPC; a value given on the command line wins;",
        "`distill.preset=none` turns the rows off.",
        "",
    ]
    for method_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(method_dir.glob("*.yaml"))
        rows = [(f.stem, yaml.safe_load(f.read_text()) or {}) for f in files]
        keys: list[str] = []
        for _, data in rows:
            for k, _ in flatten(data):
                if k not in keys:
                    keys.append(k)
        out += [f"### `{method_dir.name}`", ""]
        out += ["| row | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for name, data in rows:
            flat = dict(flatten(data))
            values = [cell(show(flat[k])) if k in flat else "" for k in keys]
            out.append(f"| `{name}` | " + " | ".join(values) + " |")
        out.append("")
    return out


def sweep_section() -> list[str]:
    root = CONF / "sweep"
    if not root.is_dir():
        return []
    out = [
        "## W&B sweep files (`conf/sweep/`)",
        "",
        "Not Hydra groups: `wandb sweep conf/sweep/<file>.yaml` reads them (see the sweeps page).",
        "",
    ]
    for path in sorted(root.glob("*.yaml")):
        header, _, _ = scan(path)
        out += [f"### `{path.name}`", "", header, ""]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is stale")
    args = parser.parse_args(argv)
    text = generate()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is stale: run `make docs-config`", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
