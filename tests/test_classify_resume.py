"""task=classify killed after an epoch and resumed: the uninterrupted run's weights and its CSV."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from lightning_modules.classifier import ClassifierModule
from lightning_modules.tasks import classify


class Killed(RuntimeError):
    pass


def _cfg(compose, tiny_data, out: Path, *extra: str):
    cfg = compose(
        "task=classify",
        f"dataset.data_dir={tiny_data}",
        "dataset.download=false",
        "dataset.batch_size=32",  # 200 images: 7 steps per epoch
        "net.width=8",
        "net.depth=1",
        "task.epochs=3",
        "logger=csv",
        "logger.flush_logs_every_n_steps=1",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        *extra,
    )
    cfg.paths.output_dir = str(out)
    return cfg


def _run(cfg, out: Path) -> None:
    """As train.run does: seed once, then the runner."""
    import lightning as L

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    classify.run(cfg, out)


def _weights(out: Path) -> dict:
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return ckpt["state_dict"]


def _rows(out: Path) -> list[dict]:
    """The rows of metrics.csv without their empty cells (the header widens as keys appear)."""
    with (out / "csv" / "metrics.csv").open(newline="") as f:
        return [{k: v for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def test_killed_classify_resumes_to_the_uninterrupted_weights_and_csv(
    compose, tiny_data, tmp_path, monkeypatch
):
    whole = tmp_path / "whole"
    _run(_cfg(compose, tiny_data, whole), whole)

    killed = tmp_path / "killed"

    def die_in_epoch_two(self, batch, batch_idx):
        if self.current_epoch == 1 and batch_idx == 3:
            raise Killed

    monkeypatch.setattr(ClassifierModule, "on_train_batch_start", die_in_epoch_two, raising=False)
    with pytest.raises(Killed):
        _run(_cfg(compose, tiny_data, killed), killed)
    before = _rows(killed)
    # the killed run wrote rows of epoch 1, past its last checkpoint: logged again on resume
    assert max(int(r["epoch"]) for r in before) == 1
    before = [r for r in before if r["epoch"] == "0"]
    monkeypatch.undo()
    _run(_cfg(compose, tiny_data, killed, "resume=true"), killed)

    a, b = _weights(whole), _weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows, expected = _rows(killed), _rows(whole)
    assert all(r in rows for r in before)  # the rows of the killed run survive, once each...
    assert rows == expected  # ...and the resumed run appends exactly the uninterrupted run's rest
