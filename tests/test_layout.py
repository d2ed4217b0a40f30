"""The layout's rules, checked on the source: plain-torch rooms, runners that never import
runners, files of readable length, and wandb imported only when a run logs to W&B."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "lightning_modules"
#: the plain-torch rooms: no Lightning, no Hydra, no OmegaConf
PLAIN = ("condense", "diffusion", "tt", "nets", "utils")
FRAMEWORKS = ("lightning", "pytorch_lightning", "hydra", "omegaconf")
RUNNERS = sorted(p.stem for p in (ROOT / "conf" / "task").glob("*.yaml"))


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function, as a dotted name
    (``from a import b`` gives both ``a`` and ``a.b``: ``b`` may be a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_every_task_has_a_runner():
    for name in RUNNERS:
        module = PACKAGE / "tasks" / f"{name}.py"
        package = PACKAGE / "tasks" / name / "__init__.py"
        assert module.exists() or package.exists(), f"conf/task/{name}.yaml has no runner"


@pytest.mark.parametrize("room", PLAIN)
def test_plain_rooms_import_neither_lightning_nor_hydra(room):
    offenders = []
    for path in sorted((PACKAGE / room).rglob("*.py")):
        for name in imported_modules(path):
            if name.split(".")[0] in FRAMEWORKS:
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, "\n".join(offenders)


def test_runners_never_import_runners():
    offenders = []
    for path in sorted((PACKAGE / "tasks").rglob("*.py")):
        rel = path.relative_to(PACKAGE / "tasks").parts
        own = rel[0].removesuffix(".py")  # the runner this file belongs to (or common, settings)
        for name in imported_modules(path):
            parts = name.split(".")
            if parts[:2] != ["lightning_modules", "tasks"] or len(parts) < 3:
                continue
            if parts[2] in RUNNERS and parts[2] != own:
                offenders.append(f"{'/'.join(rel)} imports {name}")
    assert not offenders, "\n".join(offenders)


def test_the_import_rules_would_catch_an_offender(tmp_path):
    """The checks above read real imports (also ones inside functions)."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def f():\n    from lightning_modules.tasks import teacher\n    import lightning as L\n"
    )
    names = imported_modules(bad)
    assert "lightning_modules.tasks.teacher" in names and "lightning" in names


def test_no_file_in_lightning_modules_is_long():
    long = {
        str(p.relative_to(ROOT)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 520
    }
    assert not long, long


def test_csv_run_works_without_wandb(tiny_data, tmp_path):
    """``logger=csv`` never imports wandb: a run succeeds with wandb made unimportable."""
    blocker = tmp_path / "no_wandb" / "wandb"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('wandb is not installed here')\n")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(blocker.parent), str(ROOT)]),
        "OMP_NUM_THREADS": "1",
    }
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "task=coreset",
            "coreset.method=random",
            "ipc=2",
            f"dataset.data_dir={tiny_data}",
            "dataset.download=false",
            "logger=csv",
            "trainer.enable_progress_bar=false",
            f"paths.runs_dir={tmp_path}/outputs",
            f"paths.cache_dir={tmp_path}/cache",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "coreset").iterdir()
    assert json.loads((run_dir / "summary.json").read_text())["num_images"] == 20
