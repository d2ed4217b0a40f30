"""benchmarks/tt_compare.py reruns only what a killed study had not finished."""

from __future__ import annotations

import json
import subprocess

import yaml

from benchmarks import tt_compare


def test_a_finished_run_with_the_same_overrides_is_reused(tmp_path, monkeypatch):
    calls = []

    def fake_run(argv, cwd, env, capture_output, text):  # what train.py leaves behind
        calls.append(argv)
        out = next(a for a in argv if a.startswith("paths.output_dir=")).split("=", 1)[1]
        run_dir = tmp_path / out.rsplit("/", 1)[1]
        (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
        (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(argv[2:]))
        (run_dir / "summary.json").write_text(json.dumps({"sw": 0.1, "wall_s": 3.0}))
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(tt_compare.subprocess, "run", fake_run)
    first = tt_compare.run_one("FTT + ALS", "moons", "bspline", 0, tmp_path, ["threads=1"])
    again = tt_compare.run_one("FTT + ALS", "moons", "bspline", 0, tmp_path, ["threads=1"])
    assert len(calls) == 1 and again["sw"] == first["sw"] == 0.1 and again["wall_s"] == 3.0
    # other overrides in the same folder are another run: trained again
    tt_compare.run_one("FTT + ALS", "moons", "bspline", 0, tmp_path, ["threads=2"])
    assert len(calls) == 2
