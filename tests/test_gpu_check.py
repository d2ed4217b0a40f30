"""benchmarks/gpu_check.py: the dry run end to end (no official code here, as in CI), the CIFAR
subset writer, the CUDA-test finder, the output checker and the official code's clock."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.mtt_reference import _Clock
from datamodules.cifar import read_cifar
from tests.helpers import write_cifar

ROOT = Path(__file__).resolve().parents[1]


def test_cuda_tests_are_found():
    ids = gpu_check.cuda_tests(ROOT)
    assert "tests/test_unroll.py::test_recompute_equals_full_on_cuda" in ids
    assert all("::test" in i for i in ids)
    assert not any("test_gpu_check" in i for i in ids)  # mentioning cuda is not using it


def test_write_subset_keeps_the_layout_and_the_first_images_of_each_class(tmp_path):
    src = tmp_path / "src"
    write_cifar(src, "cifar10", train_per_class=6, test_per_class=4)
    write_cifar(src, "cifar100", train_per_class=3, test_per_class=2)
    sizes = gpu_check.write_subset(src, tmp_path / "dst", 2, 1, 2, 1)
    assert sizes == {"cifar10": {"train": 20, "test": 10}, "cifar100": {"train": 200, "test": 100}}
    for name, per_class, k in (("cifar10", 2, 10), ("cifar100", 2, 100)):
        x, y = read_cifar(name, tmp_path / "dst", "train")
        full_x, full_y = read_cifar(name, src, "train")
        assert torch.equal(torch.bincount(y), torch.full((k,), per_class))
        for c in range(k):  # the first per_class images of class c, in file order
            assert torch.equal(x[y == c], full_x[full_y == c][:per_class])
    folder = tmp_path / "dst" / "cifar-10-batches-py"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    )


def _results(parts: dict) -> dict:
    return {"device": "x", "torch": "x", "dry_run": True, "total_s": 1, "wall_s": 1, "parts": parts}


def test_check_outputs_flags_a_silent_official_row(tmp_path):
    ab_row = dict(dataset="cifar10", system="official", time_s=1.0, peak_mb=1.0, status="ok")
    results = _results({"ab": {"status": "ok", "rows": [ab_row]}})
    (tmp_path / "results.json").write_text(json.dumps(results))
    (tmp_path / "results.md").write_text(gpu_check.markdown(results))
    # no reference was given, yet an official row says ok: that must not pass
    assert any("reference not given" in p for p in gpu_check.check_outputs(tmp_path, ["ab"], False))
    assert gpu_check.check_outputs(tmp_path, ["ab"], True) == []
    assert any("missing" in p for p in gpu_check.check_outputs(tmp_path, ["ab", "ipc1"], True))


def test_official_clock_times_the_iterations_after_the_first():
    clock = _Clock(torch)
    for it in range(3):
        clock.log({"Progress": it}, step=it)
        clock.log({"Synthetic_LR": 0.01}, step=it)
        clock.log({"Grand_Loss": 1.0, "Start_Epoch": 0})
    result = clock.result()
    assert len(result["times"]) == 2 and result["time_s"] >= 0


@pytest.mark.slow
def test_dry_run_without_the_official_code(tmp_path):
    """What CI runs: every part at toy size on the CPU; the official rows say they were not run."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(out),
         "--threads", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "reference not given" in proc.stdout
    assert "dry run: outputs ok" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    assert set(res["parts"]) == set(gpu_check.PARTS)
    ab = res["parts"]["ab"]["rows"]
    assert {r["status"] for r in ab if r["system"] == "official"} == {"reference not given"}
    ours = [r for r in ab if r["system"].startswith("ours")]
    assert {r["system"] for r in ours} == {"ours_full", "ours_recompute"}
    assert all(r["status"] == "ok" and r["time_s"] > 0 for r in ours)
    rows = res["parts"]["ipc1"]["rows"]
    assert [r["method"] for r in rows] == ["MTT", "pruning (eps 0.1)"]
    # the teachers were stopped at their share of the time, the distillations by trainer.max_time
    assert all(r["experts"] >= 1 and 1 <= r["iterations"] < 5000 for r in rows)
    assert all(0 <= r["final_acc"] <= 100 for r in rows)
    assert {r["method"] for r in res["parts"]["matching"]["rows"]} == {"dm", "dsa", "dc", "cafe"}
    assert (out / "results.md").read_text().startswith("# gpu_check")
    assert (out / "logs.tar.gz").exists()


def test_markdown_gives_the_ipc1_row_in_percent_beside_the_paper():
    row = dict(method="MTT", paper=46.3, experts=8, expert_epochs=50, status="ok",
               final_acc=41.25, final_std=0.5, iterations=150)  # fmt: skip
    text = gpu_check.markdown(_results({"ipc1": {"status": "ok", "rows": [row]}}))
    assert "| MTT | 41.2 ± 0.5 | 46.3 | 150 of 5000 | 8 x 50 epochs | ok |" in text


def test_ab_table_puts_ours_beside_the_official_code():
    summary = [
        dict(dataset="cifar10", system="official", time_s=0.4, peak_mb=1000.0, runs=2, status="ok"),
        dict(dataset="cifar10", system="ours_full", time_s=0.2, peak_mb=500.0, runs=2, status="ok",
             time_s_vs_official=0.5, peak_mb_vs_official=0.5),
    ]  # fmt: skip
    text = gpu_check.markdown(_results({"ab": {"status": "ok", "rows": [], "summary": summary}}))
    assert "| cifar10 | ours_full | 0.200 | 500 | 0.50 | 0.50 | 2 | ok |" in text
