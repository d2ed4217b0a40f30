"""benchmarks/masking_study.py: the paired statistics against a hand-computed case, the
DD-Ranking/soft-label reader, and the study end to end at toy size with its resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import masking_study as ms
from datamodules.syn_set import SyntheticSet
from tests.helpers import write_cifar

T_975_DF4 = 2.7764451051977987  # Student t, 97.5 % quantile, 4 degrees of freedom (tables: 2.776)


def t_cdf_df4(t: float) -> float:
    """The closed form of Student's t CDF with 4 degrees of freedom."""
    x = t / math.sqrt(4 + t * t)
    return 0.5 + 0.75 * x - 0.25 * x**3


def test_paired_difference_by_hand():
    base = [10.0, 10.0, 10.0, 10.0, 10.0]
    arm = [11.0, 12.0, 13.0, 14.0, 15.0]  # d = 1..5: mean 3, sd sqrt(2.5)
    r = ms.paired(arm, base)
    se = math.sqrt(2.5) / math.sqrt(5)
    assert r["diff"] == pytest.approx(3.0)
    assert r["lo"] == pytest.approx(3.0 - T_975_DF4 * se, abs=1e-9)  # 1.036757
    assert r["hi"] == pytest.approx(3.0 + T_975_DF4 * se, abs=1e-9)  # 4.963243
    t = 3.0 / se
    assert r["p_t"] == pytest.approx(2 * (1 - t_cdf_df4(t)), rel=1e-9)
    assert r["p_sign"] == pytest.approx(2 * 0.5**5)  # 5 of 5 positive
    assert (r["wins"], r["n"]) == (5, 5)


def test_sign_test_drops_ties_and_mean_ci():
    r = ms.paired([1.0, 2.0, 0.0, -1.0, 3.0], [0.0] * 5)
    # 3 positive, 1 negative, 1 tie: P(X >= 3 | n = 4) = 5/16, two-sided 10/16
    assert r["p_sign"] == pytest.approx(10 / 16)
    mean, lo, hi = ms.mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (mean, hi - mean) == pytest.approx((3.0, T_975_DF4 * math.sqrt(0.5)))
    assert ms.paired([1.0, 2.0], [1.0, 2.0])["p_t"] == 1.0  # identical arms: no difference


def test_evaluate_extras_reads_what_is_there():
    assert ms.evaluate_extras({"acc_convnet_mean": 30.0}) == {}
    got = ms.evaluate_extras({"hlr": 1.5, "ddranking": {"ior": 0.2}, "acc_convnet_soft_mean": 31})
    assert got == {"hlr": 1.5, "ior": 0.2, "soft_acc": 31.0}


def test_arm_rules():
    assert ms.arm_rule("MTT") == {"eps": 0.0, "depth_ratio": 0.0, "loss_ratio": 0.0}
    assert ms.arm_rule("DATM + eps 0.1")["eps"] == 0.1
    assert ms.arm_rule("PAD depth 0.5") == {"eps": 0.0, "depth_ratio": 0.5, "loss_ratio": 0.0}


def test_baseline_is_required():
    with pytest.raises(SystemExit):
        ms.parse(["--arms", "eps 0.1", "DATM"])


TOY = [
    "--scale", "smoke", "--ipcs", "1", "--seeds", "2", "--train-per-class", "20",
    "--test-per-class", "5", "--width", "8", "--depth", "2", "--experts", "1",
    "--teacher-epochs", "2", "--teacher-batch", "32", "--iterations", "4", "--syn-steps", "3",
    "--max-start-epoch", "1", "--eval-epochs", "2", "--probe-pairs", "2",
]  # fmt: skip


@pytest.mark.slow
def test_study_end_to_end_and_resume(tmp_path, monkeypatch):
    data = write_cifar(tmp_path / "data", "cifar10", train_per_class=20, test_per_class=5)
    out = tmp_path / "study"
    argv = [*TOY, "--data-dir", str(data), "--out", str(out), "--arms", "MTT", "eps 0.2"]
    assert ms.main(argv) == 0
    first = json.loads((out / "cells.json").read_text())
    cells = first["cells"]
    assert len(cells) == 4 and not any(c["reused"] for c in cells)
    rows = {r["arm"]: r for r in first["rows"]}
    assert rows["MTT"]["n"] == rows["eps 0.2"]["n"] == 2
    for c in cells:
        assert 0 <= c["hard_acc"] <= 100 and len(c["masked_trace"]) == 4
    eps_cells = [c for c in cells if c["arm"] == "eps 0.2"]
    assert all(c["last_masked"] > 0 for c in eps_cells)
    assert all(c["masked_trace"][0][1] > 0 for c in eps_cells)
    assert all(c["last_masked"] == 0 for c in cells if c["arm"] == "MTT")
    # the paired difference is the mean of the per-seed differences
    by = {(c["arm"], c["seed"]): c["hard_acc"] for c in cells}
    diffs = [by["eps 0.2", s] - by["MTT", s] for s in (0, 1)]
    assert rows["eps 0.2"]["vs_mtt"]["diff"] == pytest.approx(sum(diffs) / 2)
    # paired: seed s gives both arms the same initial images (and the same experts)
    first_sets = [
        SyntheticSet.load(out / "ipc1" / arm / "seed0" / "sets" / "iter_000000.pt")
        for arm in ("MTT", "eps_0_2")
    ]
    assert torch.equal(first_sets[0].images, first_sets[1].images)
    other = SyntheticSet.load(out / "ipc1" / "MTT" / "seed1" / "sets" / "iter_000000.pt")
    assert not torch.equal(first_sets[0].images, other.images)
    masks = eps_cells[0]["layer_masks"]
    assert sorted(masks) == ["0", "4"]  # json keys: the initial and the final set
    assert "classifier" in masks["4"] and all(0 <= v <= 1 for v in masks["4"].values())
    for png in ("accuracy.png", "masked_fraction.png", "masked_layers.png"):
        assert (out / png).stat().st_size > 0
    assert "eps 0.2" in (out / "masking_study.md").read_text()
    # a killed study: one cell lost its results; the same command redoes only that cell
    lost = out / "ipc1" / "eps_0_2" / "seed1" / "summary.json"
    lost.unlink()
    # --report-only starts nothing: the lost cell is listed as missing, the rest tabulated
    assert ms.main([*argv, "--report-only"]) == 0
    partial = json.loads((out / "cells.json").read_text())
    assert not lost.exists()
    assert {(c["arm"], c["seed"]) for c in partial["cells"]} == {
        ("MTT", 0), ("MTT", 1), ("eps 0.2", 0)
    }  # fmt: skip
    assert {r["arm"]: r["n"] for r in partial["rows"]} == {"MTT": 2, "eps 0.2": 1}
    assert "IPC 1 eps 0.2 seed 1" in (out / "masking_study.md").read_text()
    assert ms.main(argv) == 0
    second = json.loads((out / "cells.json").read_text())["cells"]
    reused = {(c["arm"], c["seed"]): c["reused"] for c in second}
    assert reused == {
        ("MTT", 0): True,
        ("MTT", 1): True,
        ("eps 0.2", 0): True,
        ("eps 0.2", 1): False,
    }
    assert lost.exists()
    # a third run of the same command reuses every cell
    assert ms.main(argv) == 0
    third = json.loads((out / "cells.json").read_text())["cells"]
    assert all(c["reused"] for c in third)
    assert [c["hard_acc"] for c in third] == [c["hard_acc"] for c in second]
