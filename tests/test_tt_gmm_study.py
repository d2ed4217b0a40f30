"""benchmarks/tt_gmm_study.py at toy size: every arm runs, the table and plots are written, and a
rerun with the same command reuses the finished runs."""

from __future__ import annotations

import json

import pytest

from benchmarks import tt_gmm_study

TOY = [
    "dataset.num_samples=300",
    "dataset.num_reference=150",
    "ddpm.timesteps=40",
    "ddpm.batch_size=64",
    "ddpm.sw_projections=50",
    "ddpm.sinkhorn_samples=100",
    "ddpm.floor_pairs=2",
    "als.samples=1024",
]


@pytest.mark.slow
def test_the_study_runs_every_arm_and_reuses_finished_runs(tmp_path):
    args = ["--dims", "2", "--components", "2", "--seeds", "0", "--steps", "3"]
    args += ["--sample-steps", "10", "--out", str(tmp_path), "--extra", *TOY]
    cells = tt_gmm_study.main(args)
    assert [c["arm"] for c in cells] == list(tt_gmm_study.ARMS)
    for c in cells:
        assert "error" not in c, c
        assert c["sw_ratio"] > 0 and c["params"] > 0 and not c["reused"]
        assert 0 <= c["component_share_gap"] <= 1
    assert (tmp_path / "tt_gmm_study.md").read_text().count("\n") == 2 + len(cells)
    assert (tmp_path / "loss_vs_dim.png").exists() and (tmp_path / "ratio_vs_dim.png").exists()
    again = tt_gmm_study.main(args)
    assert all(c["reused"] for c in again)
    assert [c["sw_ratio"] for c in again] == [c["sw_ratio"] for c in cells]
    assert json.loads((tmp_path / "cells.json").read_text())[0]["arm"] == "resnet"
    density = next(c for c in cells if c["arm"] == "ftt_density")
    assert "eps_net.param=density" in density["command"] and "eps_net.rank=2" in density["command"]
    assert "ddpm.steps=1 " in density["command"] + " "  # half of --steps 3, rounded down
    start = next(c for c in cells if c["arm"] == "ftt_density_start")
    assert "ddpm.lr=0" in start["command"] and "eps_net.rank=2" in start["command"]


@pytest.mark.slow
def test_the_train_time_comparison_interleaves_the_two_arms_and_tabulates_them(tmp_path):
    from benchmarks import tt_gmm_train_time

    args = ["--cells", "2:2", "--repeats", "1", "--steps", "3", "--sample-steps", "10"]
    rows = tt_gmm_train_time.main([*args, "--out", str(tmp_path), "--extra", *TOY])
    assert [r["arm"] for r in rows] == ["resnet", "ftt_density"]
    assert all(r["train_s"] > 0 and "ddpm.oracle=false" in r["command"] for r in rows)
    table = (tmp_path / "table.md").read_text().splitlines()
    assert len(table) == 3 and table[2].startswith("| 2 | 2 | ")
    share = f"{rows[1]['params']:,} ({100 * rows[1]['params'] / rows[0]['params']:.0f} %)"
    assert share in table[2]
