"""The settings and the starting point of a trajectory-matching run (``task=distill method=mtt |
datm | pad``): one resolver for the family, the pair stream's start window, the module's policy
switches, and DATM's initial images and soft labels.

MTT's keys live in ``distill.*`` (:mod:`.settings`); DATM/PAD add ``method.*`` keys
(``conf/method/datm.yaml``, ``pad.yaml``). Null keys take the method's published row
``conf/preset/<method>/<dataset>_ipc<ipc>.yaml``; ``distill.eps`` composes with every method.
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig, open_dict

from lightning_modules.condense.datm import correctly_classified, expert_label_logits
from lightning_modules.errors import UserError
from lightning_modules.tasks.matching_settings import check_method_keys, method_name
from lightning_modules.tasks.settings import published_row, resolve_settings
from lightning_modules.utils.seeds import derive_seed

log = logging.getLogger(__name__)


def resolve_trajectory_settings(cfg: DictConfig) -> DictConfig:
    """A resolved copy of ``cfg``: the ``distill.*`` keys as for MTT from the method's row, then
    the row's ``method.*`` values into the null method keys, every value checked."""
    name = method_name(cfg)
    check_method_keys(cfg, name)
    cfg = resolve_settings(cfg, name)
    if name == "mtt":
        return cfg
    m = cfg.method
    preset = str(cfg.distill.get("preset", "auto")).lower()
    row = published_row(name, str(cfg.dataset.name), int(cfg.ipc)) if preset == "auto" else None
    with open_dict(cfg):
        for key in m:
            if m[key] is None and row is not None and key in row:
                m[key] = row[key]
        for key, value in (("min_start_epoch", 0), ("depth_ratio", 0.0), ("loss_ratio", 0.0)):
            if key in m and m[key] is None:
                m[key] = value
    validate_policy(cfg)
    return cfg


def validate_policy(cfg: DictConfig) -> None:
    """The filled DATM/PAD keys against the schema (a published row's values included), and the
    rules only a filled row can break (the pair stream checks the window)."""
    from lightning_modules.schema import validate as check_schema

    check_schema(cfg)
    m = cfg.method
    if m.lr_y is None:
        raise UserError(
            f"method.lr_y is not set and there is no published row for dataset="
            f"{cfg.dataset.name} ipc={cfg.ipc}; set method.lr_y (e.g. 2.0)"
        )
    if m.current_max_start_epoch is not None and m.expansion_end_epoch is None:
        raise UserError(
            "method.current_max_start_epoch needs method.expansion_end_epoch (the iterations over "
            "which the start window widens to distill.max_start_epoch)"
        )


def window_options(cfg: DictConfig) -> dict:
    """The pair stream's start-window arguments (MTT: 0 .. max_start_epoch - 1 throughout)."""
    m = cfg.method
    if method_name(cfg) == "mtt":
        return {}
    return dict(
        min_start_epoch=int(m.min_start_epoch),
        current_max_start_epoch=m.current_max_start_epoch,
        expansion_end_epoch=m.expansion_end_epoch,
    )


def policy_options(cfg: DictConfig) -> dict:
    """The module's DATM/PAD switches (learned labels are passed separately)."""
    m = cfg.method
    if method_name(cfg) == "mtt":
        return {}
    out = dict(
        lr_y=float(m.lr_y),
        momentum_y=float(m.momentum_y),
        threshold=None if m.threshold is None else float(m.threshold),
    )
    if "depth_ratio" in m:
        out.update(depth_ratio=float(m.depth_ratio), loss_ratio=float(m.loss_ratio))
    return out


def label_experts(cfg: DictConfig, pairs) -> list[torch.Tensor]:
    """The snapshot ``method.label_epoch`` (``distill.init=correct`` with MTT: the last) of every
    expert of the pair stream, in store order: who picks the initial images and labels."""
    epoch = int(cfg.method.get("label_epoch", -1))
    out = []
    for index in pairs.experts:
        expert = pairs._expert(index)
        e = epoch if epoch >= 0 else expert.epochs + 1 + epoch
        out.append(expert.params(e).float().clone())
    return out


def correct_images(cfg: DictConfig, dm, logits_fn, experts) -> tuple[torch.Tensor, torch.Tensor]:
    """``ipc`` real images per class that the first expert (then the next ones) classifies
    correctly, from a seeded random order of the class (``distill.init=correct``)."""
    ipc, k = int(cfg.ipc), dm.num_classes
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, "init"))
    have = dm.images_per_class()
    images = []
    for c in range(k):
        candidates = dm.real_images(c, int(have[c]), generator=g)  # the class, shuffled
        idx = correctly_classified(logits_fn, experts, candidates, c, ipc)
        if idx is None:
            raise UserError(
                f"distill.init=correct: the {len(experts)} experts classify fewer than ipc={ipc} "
                f"of the {int(have[c])} real images of class {c} correctly; use distill.init=real"
            )
        images.append(candidates[idx])
    return torch.cat(images), torch.arange(k).repeat_interleave(ipc)


def initial_label_logits(cfg, images, labels, logits_fn, experts) -> torch.Tensor:
    """DATM's initial soft labels: with ``init=correct`` the mean logits of the experts that get
    each image right, else (``real``/``noise``) the first expert's final logits, as the
    reference does for ``pix_init: real``."""
    if cfg.distill.init == "correct":
        try:
            return expert_label_logits(logits_fn, experts, images, labels, only_correct=True)
        except ValueError as err:
            raise UserError(f"soft labels: {err}") from None
    return expert_label_logits(logits_fn, experts, images, labels, only_correct=False)


def net_logits(net, layout):
    """``(theta, x) -> logits`` of ``net`` at flat parameters, in eval mode."""

    def logits_fn(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        net.eval()
        out = layout.call(net, theta.to(x.dtype), x)
        net.train()
        return out

    return logits_fn
