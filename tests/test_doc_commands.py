"""Every `python train.py ...` command written in README.md and docs/ composes with Hydra.

The commands are composed with Hydra's compose API against conf/ (never run), so a key or a
config option that is renamed or removed in conf/ fails here, naming the page and the command.

Where commands are found:
- fenced code blocks: every line holding `python train.py` (lines continued with a trailing
  backslash are joined first); the command runs from `python train.py` to the end of the line,
  cut at a shell comment (`#`) or at `&&`, `||`, `|`, `;`;
- inline code spans (`...`) in the prose that hold `python train.py`, line breaks inside the
  span joined.

How a command becomes a list of overrides (the rules):
- the text is split as a POSIX shell would (`shlex`), so quoted overrides such as
  `'evaluate.net_options={convnet: {width: 128}}'` stay one override;
- shell variables: a block's own assignments (`COMMON="..."`, `export X=...`) are expanded
  wherever `$NAME` / `${NAME}` appears in a later command of the same block (a whole token
  holding several overrides is split again); a variable the block does not define is replaced
  by the literal text `VAR` (a value such as `coreset.method=$m` composes with any string), and
  a token that is nothing but an undefined variable is dropped;
- a page is one shell session: variables assigned in an earlier block of the page stay defined;
- elisions and placeholders: optional parts in brackets holding `...` (`[key=value ...]`) and
  any token containing `...` are dropped; a `<placeholder>` that picks a config-group option
  (`dataset=<density>`) is dropped, since a group needs a real option; every other
  `<placeholder>` becomes the string `PLACEHOLDER` (`evaluate.set=outputs/distill/<run>/set.pt`
  composes as a path); tokens that are then not overrides (`<same overrides>`) are dropped;
- multirun: `-m` / `--multirun` are removed, and a sweep (`distill.eps=0,0.1,0.2`, `dataset=a,b`,
  `range(...)`) is composed once per value, the other swept keys at their first value; so every
  option of a swept group must exist and every swept key must be a key;
- `hydra/launcher=...` and `hydra.*` overrides are composed with the Hydra config included
  (`return_hydra_config=True`), so a launcher key must exist as well.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from tests.conftest import ROOT

CONF = ROOT / "conf"
FENCE = re.compile(r"^(\s*)(```|~~~)")
ASSIGN = re.compile(r"^\s*(?:export\s+)?([A-Za-z_]\w*)=(.*)$")
VAR = re.compile(r"\$\{([A-Za-z_]\w*)\}|\$([A-Za-z_]\w*)")
TRAIN = "python train.py"


def doc_files() -> list[Path]:
    files = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
    return [f for f in files if f.exists()]


def _cut(command: str) -> str:
    """The command up to a shell operator or comment (outside quotes)."""
    out, quote, i = [], "", 0
    while i < len(command):
        ch = command[i]
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or command[i - 1].isspace()):
            break
        elif ch in ";|" or command.startswith("&&", i):
            break
        out.append(ch)
        i += 1
    return "".join(out).strip()


def extract(path: Path) -> list[tuple[int, str, dict[str, str]]]:
    """(line number, command text from `python train.py` on, the block's variables)."""
    found: list[tuple[int, str, dict[str, str]]] = []
    lines = path.read_text().splitlines()
    prose: list[tuple[int, str]] = []
    env: dict[str, str] = {}  # a page is one shell session: variables carry over between blocks
    i = 0
    while i < len(lines):
        if FENCE.match(lines[i]):
            start, block = i, []
            i += 1
            while i < len(lines) and not FENCE.match(lines[i]):
                block.append(lines[i])
                i += 1
            i += 1
            j = 0
            while j < len(block):
                line, first = block[j], j
                while line.rstrip().endswith("\\") and j + 1 < len(block):
                    j += 1
                    line = line.rstrip()[:-1] + " " + block[j].strip()
                j += 1
                m = ASSIGN.match(line)
                if m and TRAIN not in line:
                    value = shlex.split(m[2], comments=True)
                    env[m[1]] = " ".join(value)
                    continue
                if TRAIN in line:
                    text = _cut(line[line.index(TRAIN) :])
                    found.append((start + 2 + first, text, dict(env)))
            continue
        prose.append((i + 1, lines[i]))
        i += 1
    # inline code spans in the prose (a span may run over a line break)
    text = "\n".join(line for _, line in prose)
    numbers = [n for n, _ in prose]
    for m in re.finditer(r"`([^`]+)`", text):
        span = m.group(1)
        if TRAIN in span:
            lineno = numbers[text.count("\n", 0, m.start())]
            found.append((lineno, _cut(" ".join(span[span.index(TRAIN) :].split())), {}))
    return found


def is_group(key: str) -> bool:
    return (CONF / key.lstrip("+~")).is_dir()


def to_overrides(command: str, env: dict[str, str]) -> list[str]:
    """The overrides of one command, following the module docstring's rules."""

    def expand(match: re.Match) -> str:
        return env.get(match[1] or match[2], "VAR")

    # optional parts written as [key=value ...] are elisions; a placeholder that picks a config
    # group (dataset=<density>) goes; other placeholders become the string PLACEHOLDER
    command = re.sub(r"(?<=\s)\[[^\[\]]*\.\.\.[^\[\]]*\]", " ", command)
    command = re.sub(
        r"(?<=\s)([+~]?[\w/.]+)=<[^<>]*>(?=\s|$)",
        lambda m: " " if is_group(m[1]) else m[0],
        command,
    )
    command = re.sub(r"<[^<>]*>", "PLACEHOLDER", command)
    tokens: list[str] = []
    for token in shlex.split(command)[2:]:  # after `python train.py`
        if VAR.fullmatch(token):
            name = token.strip("${}")
            if name in env:
                tokens += shlex.split(env[name])
            continue
        tokens.append(VAR.sub(expand, token))
    overrides = []
    for token in tokens:
        if token in ("-m", "--multirun") or "..." in token or "=" not in token:
            continue
        overrides.append(token)
    return overrides


def variants(overrides: list[str]) -> list[list[str]]:
    """One override list per value of each sweep (others at their first value)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    firsts, sweeps = [], []
    for i, o in enumerate(parsed):
        if o.is_sweep_override():
            values = list(o.sweep_string_iterator())
            firsts.append(f"{o.get_key_element()}={values[0]}")
            sweeps.append((i, o.get_key_element(), values))
        else:
            firsts.append(overrides[i])
    out = [firsts]
    for i, key, values in sweeps:
        for v in values[1:]:
            out.append(firsts[:i] + [f"{key}={v}"] + firsts[i + 1 :])
    return out


def all_commands() -> list[tuple[str, str, list[str]]]:
    cases = []
    for path in doc_files():
        for lineno, command, env in extract(path):
            try:
                overrides: list[str] | str = to_overrides(command, env)
            except ValueError as err:  # e.g. an unbalanced quote: reported by the test
                overrides = f"cannot be split like a shell line: {err}"
            cases.append((f"{path.relative_to(ROOT)}:{lineno}", command, overrides))
    return cases


CASES = all_commands()


@pytest.fixture(scope="module", autouse=True)
def hydra_conf():
    """One Hydra initialisation for the whole module (composing is then fast)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def compose_all(overrides: list[str]) -> None:
    hydra_keys = any(o.lstrip("+~").startswith("hydra") for o in overrides)
    for variant in variants(overrides):
        compose(config_name="config", overrides=variant, return_hydra_config=hydra_keys)


def test_the_docs_hold_commands():
    """The extraction finds the documented commands (a broken extractor would pass vacuously)."""
    assert len(CASES) > 100, len(CASES)
    pages = {where.split(":")[0] for where, _, _ in CASES}
    assert "README.md" in pages and any(p.startswith("docs/tasks/") for p in pages)


@pytest.mark.slow  # ~0.3 s a command on a 2-core CPU, 100+ commands: CI runs it (`make test`)
@pytest.mark.parametrize("where,command,overrides", CASES, ids=[c[0] for c in CASES])
def test_documented_command_composes(where, command, overrides):
    if isinstance(overrides, str):
        pytest.fail(f"{where}: `{command}` {overrides}")
    try:
        compose_all(overrides)
    except Exception as err:  # noqa: BLE001 - any composition error is the failure to report
        pytest.fail(f"{where}: `{command}` does not compose: {type(err).__name__}: {err}")


def test_a_renamed_key_fails(tmp_path):
    """The check has teeth: a key that conf/ does not have, in a command, fails to compose."""
    with pytest.raises(Exception, match="distill.epss"):
        compose_all(to_overrides("python train.py task=distill distill.epss=0.1", {}))
    with pytest.raises(Exception, match="nosuchnet"):
        compose_all(to_overrides("python train.py -m task=classify net=convnet,nosuchnet", {}))


def test_the_rules_on_small_cases():
    env = {"COMMON": "task=distill dataset.zca=false"}
    assert to_overrides("python train.py $COMMON ipc=1 ...", env) == [
        "task=distill", "dataset.zca=false", "ipc=1",
    ]  # fmt: skip
    assert to_overrides("python train.py coreset.method=$m $UNSET", {}) == ["coreset.method=VAR"]
    assert to_overrides("python train.py <same overrides> resume=true", {}) == ["resume=true"]
    assert to_overrides("python train.py task=<task> [key=value ...]", {}) == []
    assert to_overrides("python train.py dataset=<d> eps_net.basis=<b> a=<x y>/s.pt", {}) == [
        "eps_net.basis=PLACEHOLDER", "a=PLACEHOLDER/s.pt",
    ]  # fmt: skip
    assert variants(["a=1,2", "b=x", "c=3,4"]) == [
        ["a=1", "b=x", "c=3"], ["a=2", "b=x", "c=3"], ["a=1", "b=x", "c=4"],
    ]  # fmt: skip
