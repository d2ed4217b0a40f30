"""Start epochs fitted to the experts a row trained: a short-expert row (CPU scale) cannot draw
the published rows' start epochs, so they are lowered to what the experts hold, and said so."""

from __future__ import annotations

import logging

from omegaconf import DictConfig, open_dict

from lightning_modules.errors import UserError

log = logging.getLogger(__name__)


def cap_start_epoch(cfg: DictConfig, expert_epochs_held: int) -> None:
    """Lower ``distill.max_start_epoch`` to what experts of ``expert_epochs_held`` epochs allow."""
    d = cfg.distill
    highest = expert_epochs_held - int(d.expert_epochs) + 1
    if highest < 1:
        raise UserError(
            f"the experts hold {expert_epochs_held} epochs but distill.expert_epochs="
            f"{d.expert_epochs}; raise reproduce.expert_epochs to at least {d.expert_epochs}"
        )
    if int(d.max_start_epoch) > highest:
        log.info(
            "distill.max_start_epoch capped from %d to %d: the experts hold %d epochs "
            "(reproduce.expert_epochs)",
            int(d.max_start_epoch), highest, expert_epochs_held,
        )  # fmt: skip
        with open_dict(cfg):
            d.max_start_epoch = highest


def fitted_to_experts(sub: DictConfig, epochs_held: int) -> DictConfig:
    """The method's published row filled in, its start window capped to what experts of
    ``epochs_held`` epochs allow (as ``cap_start_epoch`` does for MTT)."""
    from lightning_modules.tasks.trajectory_family import resolve_trajectory_settings

    sub = resolve_trajectory_settings(sub)
    cap_start_epoch(sub, epochs_held)
    m, top = sub.method, int(sub.distill.max_start_epoch)
    with open_dict(sub):
        m.min_start_epoch = min(int(m.min_start_epoch), top - 1)
        if m.current_max_start_epoch is not None:
            m.current_max_start_epoch = max(
                min(int(m.current_max_start_epoch), top), int(m.min_start_epoch) + 1
            )
    return sub
