"""task=reproduce running the real method=datm / method=pad distillation end to end (tiny)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datamodules.syn_set import SyntheticSet
from tests.test_reproduce import run_in, tiny


@pytest.mark.slow
@pytest.mark.parametrize("method", ["datm", "pad"])
def test_row_with_a_real_soft_label_method(compose, tiny_data, tmp_path, monkeypatch, method):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "row"
    # the tiny experts classify too few images for the row's init=correct
    args = tiny(tiny_data, f"reproduce.methods=[{method}]", "distill.init=real")
    summary = run_in(compose, out, *args)
    row = json.loads((out / "row.json").read_text())
    assert row["columns"][:2] == [f"{method}_soft", f"{method}_hard"]
    for kind in ("soft", "hard"):
        assert 0 <= summary[f"acc_{method}_{kind}"] <= 100
    syn = SyntheticSet.load(Path(summary["workdir"]) / method / "set.pt")
    assert syn.method == method and syn.soft_labels is not None
    assert syn.config["method"]["name"] == method
