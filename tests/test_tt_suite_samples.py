"""benchmarks/tt_suite_samples.py: one figure from finished tt_compare runs; a missing run is
named in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from omegaconf import OmegaConf

from benchmarks import tt_suite_samples


def _fake_run(folder, density, method, cfg, share):
    run = tt_suite_samples.run_dir(folder, density, method, seed=0)
    run.mkdir(parents=True)
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    OmegaConf.save(OmegaConf.create({"dataset": dataset}), run / "config_resolved.yaml")
    np.save(run / "samples.npy", np.random.default_rng(0).standard_normal((50, 2)))
    summary = {"mode_share": share, "mode_share_oracle": 0.99}
    (run / "summary.json").write_text(json.dumps(summary))


def test_the_figure_has_a_row_per_arm_and_a_missing_run_is_named(compose, tmp_path):
    cfg = compose("task=ddpm", "dataset=moons", "dataset.num_samples=200",
                  "dataset.num_reference=100")  # fmt: skip
    _fake_run(tmp_path / "a", "moons", "FTT density + Adam", cfg, 0.9)
    _fake_run(tmp_path / "b", "moons", "FTT density, boxes + Adam", cfg, 0.95)
    out = tmp_path / "fig.png"
    arms = ["--arm", "first", str(tmp_path / "a"), "FTT density + Adam"]
    arms += ["--arm", "second", str(tmp_path / "b"), "FTT density, boxes + Adam"]
    tt_suite_samples.main(["--datasets", "moons", "--out", str(out), *arms])
    assert out.stat().st_size > 10_000
    with pytest.raises(SystemExit, match="no finished run at .*checkerboard_FTT_density"):
        tt_suite_samples.main(["--datasets", "checkerboard", "--out", str(out), *arms])
