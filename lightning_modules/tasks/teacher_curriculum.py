"""``task=teacher``'s PAD difficulty curriculum: the scores (cached in the store) and the subsets.

With ``teacher.curriculum=el2n|grand`` every expert of the run trains, epoch by epoch, on the
subset ``condense.curriculum.epoch_subset`` gives. The scores are the mean over
``teacher.score_repeats`` nets (init from ``derive_seed(seed, "curriculum", r)``) trained
``teacher.score_epochs`` epochs with the teacher's recipe on the whole training set. Each scoring
net's scores are written to ``<store>/curriculum_<score>.pt`` as soon as it is done, so a killed
run resumes with the next net; a file made with other settings is refused (one store, one
curriculum). Under ``trainer=ddp`` rank zero scores and the other ranks read the file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from lightning_modules.condense.curriculum import easy_to_hard, epoch_subset, score_examples
from lightning_modules.condense.experts import build_seeded, sgd_train
from lightning_modules.errors import UserError
from lightning_modules.tasks.common import build_net, rank_zero_first
from lightning_modules.utils.seeds import derive_seed

log = logging.getLogger(__name__)

SCHEDULE_KEYS = ("init_ratio", "add_end_epoch", "rm_epochs", "rm_easy_ratios")


class Curriculum:
    """The per-epoch training subsets of this run's experts and what the expert files record."""

    def __init__(self, settings: dict, scores: torch.Tensor, labels: torch.Tensor, classes: int):
        self.settings = settings
        self.order = easy_to_hard(scores, labels, classes)
        self.schedule = {k: settings[k] for k in SCHEDULE_KEYS}

    def subset(self, epoch: int) -> torch.Tensor:
        """Training indices of ``epoch`` (0-based)."""
        return epoch_subset(self.order, epoch, **self.schedule)

    def sizes(self, epochs: int) -> list[int]:
        return [len(self.subset(e)) for e in range(epochs)]


def settings_of(cfg: DictConfig) -> dict | None:
    """What the expert metadata records of the curriculum; None for ``teacher.curriculum=none``."""
    t = cfg.teacher
    if t.curriculum == "none":
        return None
    return {
        "score": str(t.curriculum),
        "score_epochs": int(t.score_epochs),
        "score_repeats": int(t.score_repeats),
        "init_ratio": float(t.init_ratio),
        "add_end_epoch": int(t.add_end_epoch),
        "rm_epochs": [int(e) for e in t.rm_epochs],
        "rm_easy_ratios": [float(r) for r in t.rm_easy_ratios],
        "run_seed": int(cfg.seed),
    }


def curriculum_mismatch(root: Path, index: int, stored: dict | None, wanted: dict | None) -> str:
    """The one line refusing to add this run's experts to a store of another curriculum."""
    head = f"store {root} holds expert {index} trained with"
    tail = "use another teacher.out or the same settings"
    if stored is None or wanted is None or stored.get("score") != wanted.get("score"):
        old, new = ((c or {}).get("score", "none") for c in (stored, wanted))
        return f"{head} teacher.curriculum={old}, this run has {new}; {tail}"
    key = next(k for k in wanted if stored.get(k) != wanted[k])
    name = "seed" if key == "run_seed" else f"teacher.{key}"
    return f"{head} {name}={stored.get(key)}, this run has {wanted[key]}; {tail}"


def _check_net(net: nn.Module, score: str, name: str) -> None:
    if score == "grand" and not (
        hasattr(net, "embed") and isinstance(getattr(net, "classifier", None), nn.Linear)
    ):
        raise UserError(
            f"teacher.curriculum=grand needs a net whose last layer is a linear classifier on "
            f"embed(x); net={name} has none: use teacher.curriculum=el2n"
        )


def _score_key(job, settings: dict) -> dict:
    """Everything the scores depend on (a cached file must match it)."""
    keys = ("score", "score_epochs", "score_repeats", "run_seed")
    return {
        **{k: settings[k] for k in keys},
        **{k: v for k, v in job.recipe.items() if k != "epochs"},
        "net": job.net_cfg,
        "dataset": job.dm.name,
        "zca": bool(job.dm.zca),
        "train_images": len(job.dm.train_x),
    }


def _load(path: Path, key: dict) -> torch.Tensor:
    """The per-net scores already in ``path`` (``[k, N]``, k may be 0)."""
    if not path.exists():
        return torch.zeros(0, key["train_images"], dtype=torch.float64)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        per_net, saved_key = saved["per_net"], saved["key"]
    except Exception as e:  # noqa: BLE001 (any unreadable file means the same to the user)
        raise UserError(f"{path} is not a readable curriculum score file ({e}); delete it") from e
    for k, v in key.items():
        if saved_key.get(k) != v:
            raise UserError(
                f"{path} holds difficulty scores made with {k}={saved_key.get(k)}, this run has "
                f"{v}; use another teacher.out or the same settings"
            )
    return per_net


def _save(path: Path, key: dict, per_net: torch.Tensor) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save({"key": key, "per_net": per_net}, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _score_net(job, settings: dict, r: int) -> nn.Module:
    """Scoring net ``r``: the teacher's recipe for ``score_epochs`` epochs on all images."""
    cfg, dm, recipe = job.cfg, job.dm, job.recipe
    seed = derive_seed(cfg.seed, "curriculum", r)
    net = build_seeded(lambda: build_net(cfg.net, dm), seed).to(job.device)
    log.info("curriculum: training scoring net %d of %d", r + 1, settings["score_repeats"])
    return sgd_train(
        net,
        dm.train_x,
        dm.train_y,
        epochs=settings["score_epochs"],
        lr=recipe["lr"],
        momentum=recipe["momentum"],
        weight_decay=recipe["weight_decay"],
        batch_size=recipe["batch_size"],
        augment=job.augment,
        shuffle_generator=torch.Generator().manual_seed(derive_seed(seed, "batches")),
        augment_generator=torch.Generator().manual_seed(derive_seed(seed, "dsa")),
    )


def _scores(job, settings: dict) -> torch.Tensor:
    """The mean scores, computing (and caching) the scoring nets not yet in the store."""
    path = job.store.root / f"curriculum_{settings['score']}.pt"
    key = _score_key(job, settings)
    per_net = _load(path, key)
    x, y = job.dm.train_x, job.dm.train_y
    for r in range(len(per_net), settings["score_repeats"]):
        net = _score_net(job, settings, r)
        per_net = torch.cat([per_net, score_examples(net, x, y, settings["score"])[None]])
        _save(path, key, per_net)
    return per_net.mean(0)


def build_curriculum(job, fabric) -> Curriculum | None:
    """The run's curriculum (None for ``teacher.curriculum=none``); rank zero scores first."""
    settings = settings_of(job.cfg)
    if settings is None:
        return None
    _check_net(build_net(job.cfg.net, job.dm), settings["score"], job.cfg.net.name)
    with rank_zero_first(fabric):
        scores = _scores(job, settings)
    curriculum = Curriculum(settings, scores, job.dm.train_y.cpu(), int(job.dm.num_classes))
    sizes = curriculum.sizes(int(job.cfg.teacher.epochs))
    log.info("curriculum %s: training images per epoch %s", settings["score"], sizes)
    return curriculum
