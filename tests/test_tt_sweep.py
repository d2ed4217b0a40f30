"""The TT-rank sweep: the W&B grid expands to train.py commands, one runs tiny, and the Hydra
multirun equivalent works offline; train.py trains eps_net=ftt with ALS and Riemannian."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, run_train
from tests.helpers import sweep_agent_commands as agent_commands

SWEEP = ROOT / "conf/sweep/ddpm_tt_rank.yaml"

# a tiny problem: 600 points, 20 reverse steps, 200 samples, one ALS sweep on 512 samples
TINY = [
    "dataset.num_samples=600",
    "dataset.num_reference=200",
    "ddpm.steps=2",
    "ddpm.batch_size=128",
    "ddpm.num_samples=200",
    "ddpm.sample_steps=20",
    "ddpm.snapshots=0",
    "ddpm.sw_projections=50",
    "ddpm.ema=null",
    "eps_net.num_basis=8",
    "als.samples=512",
    "als.sweeps=1",
    "als.batch=256",
    "logger=csv",
    "trainer.enable_progress_bar=false",
]


def _summaries(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("summary.json"))]


def test_sweep_expands_to_the_rank_by_optimiser_grid():
    spec = yaml.safe_load(SWEEP.read_text())
    assert spec["metric"] == {"name": "final/sw", "goal": "minimize"}
    commands = agent_commands(SWEEP, "python")
    assert len(commands) == 12
    grid = {(c[-2], c[-1]) for c in commands}
    assert grid == {
        (f"eps_net.rank={r}", f"ddpm.optimizer={o}")
        for r in (2, 4, 8, 16)
        for o in ("adam", "als", "riemannian")
    }
    for c in commands:
        assert c[:3] == ["/usr/bin/env", "python", "train.py"]
        assert {"task=ddpm", "dataset=swiss_roll", "eps_net=ftt"} <= set(c)


@pytest.mark.slow
def test_one_sweep_command_runs_tiny(tmp_path):
    commands = agent_commands(SWEEP, sys.executable)
    argv = next(c for c in commands if c[-2:] == ["eps_net.rank=2", "ddpm.optimizer=als"])
    # the agent's command, then tiny-size overrides (later overrides win in Hydra)
    fixed = [a for a in argv[3:] if not a.startswith("logger")]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "2"}
    r = subprocess.run(
        [argv[1], str(ROOT / argv[2]), *fixed, *TINY, f"paths.runs_dir={tmp_path / 'outputs'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (summary,) = _summaries(tmp_path / "outputs")
    assert summary["optimizer"] == "als" and summary["eps_net"] == "ftt"
    assert (
        summary["sw"] > 0
        and summary["sw_floor"] > 0
        and summary["params"] == 2 * (8 * 2 * 2 + 2 * 8 * 2)
    )


@pytest.mark.slow
def test_hydra_multirun_over_rank_offline(tmp_path):
    r = run_train(
        "-m",
        "task=ddpm",
        "dataset=swiss_roll",
        "eps_net=ftt",
        "eps_net.rank=2,3",
        "ddpm.optimizer=riemannian",
        "eps_net.init=linear",
        *TINY,
        f"paths.runs_dir={tmp_path / 'outputs'}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summaries = _summaries(tmp_path / "outputs" / "multirun")
    assert sorted(s["params"] for s in summaries) == [
        2 * (8 * r + r * 8 * r + r * 8) for r in (2, 3)
    ]
    assert all(s["optimizer"] == "riemannian" and s["sw"] > 0 for s in summaries)


@pytest.mark.slow
def test_tt_optimiser_on_another_net_is_one_line(tmp_path):
    r = run_train(
        "task=ddpm",
        "dataset=swiss_roll",
        "eps_net=resnet",
        "ddpm.optimizer=als",
        *[a for a in TINY if not a.startswith(("eps_net.", "logger="))],
        "logger=none",
        f"paths.runs_dir={tmp_path / 'outputs'}",
        cwd=tmp_path,
    )
    assert r.returncode == 2
    assert "ddpm.optimizer=als needs eps_net=ftt" in r.stderr
    assert "Traceback" not in r.stderr
