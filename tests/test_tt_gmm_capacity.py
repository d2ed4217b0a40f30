"""benchmarks/tt_gmm_capacity.py on a tiny mixture: the excess is measured against the exact
predictor (zero model: mean ε*²; a single Gaussian: the PCA skip is exact) and ALS fitted to ε*
leaves little of it."""

import pytest

from benchmarks.tt_gmm_capacity import main


def test_tiny_capacity_table(tmp_path):
    rows = main(
        ["--dim", "2", "--components", "1", "--ftt", "per_coordinate:none:8:2",
         "--adam-ftt", "--targets", "star", "--samples", "2048", "--sweeps", "2",
         "--adam-steps", "5", "--test", "1024", "--out", str(tmp_path)]
    )  # fmt: skip
    by = {(r["model"], r["solver"], r["target"]): r for r in rows}
    zero = by[("ε̂ = 0", "-", "-")]["excess"]
    assert 0.3 < zero < 1.2  # ε* = s (x - a μ) / (a² σ² + s²): about unit size at high noise
    als = by[("FTT per_coordinate skip=none m=8 r=2", "ALS", "star")]["excess"]
    assert als < 0.1 * zero
    assert ("ResNet-MLP width 64 depth 3", "Adam", "star") in by
    assert (tmp_path / "table.md").read_text().count("\n| ") >= 3


def test_a_single_gaussian_is_the_pca_skip(tmp_path):
    rows = main(
        ["--dim", "3", "--components", "1", "--ftt", "core:pca:6:2", "--adam-ftt",
         "--targets", "star", "--samples", "1024", "--sweeps", "1", "--adam-steps", "0",
         "--test", "1024"]
    )  # fmt: skip
    skip = next(r for r in rows if r["model"] == "pca skip alone")
    assert skip["excess"] == pytest.approx(0, abs=2e-3)
