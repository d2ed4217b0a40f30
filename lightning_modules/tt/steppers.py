"""ALS and Riemannian steppers for the DDPM training loop (``ddpm.optimizer=als|riemannian``).

``lightning_modules.diffusion.steppers.make_stepper`` delegates these two names here. A stepper's
``step(draw, reduce_sum)`` pulls (x_t, t, ε) triples from the forward process with ``draw()``,
changes the FTT's cores in place and returns at least ``{"loss": float}``; ``reduce_sum``
all-reduces a tensor over DDP ranks (the identity on one process).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from lightning_modules.errors import UserError
from lightning_modules.tt.als import ALS
from lightning_modules.tt.ftt import FunctionalTT
from lightning_modules.tt.riemannian import RiemannianGD

ALS_DEFAULTS = {"ridge": 1.0e-6, "sweeps": 2, "samples": 65536, "batch": 2048, "fixed": False}
RIEMANNIAN_DEFAULTS = {"lr": 300.0, "armijo": True, "shrink": 0.5, "max_backtracks": 20}
# read by task=ddpm, not by the optimiser: training steps when ddpm.steps is unset
TASK_ONLY_KEYS = {"als": {"steps": 2}}

Draw = Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _block(cfg, key: str, defaults: dict) -> dict:
    """``cfg[key]`` (a DictConfig or dict) over the defaults; UserError on unknown keys."""
    block = cfg.get(key) if isinstance(cfg, Mapping) or hasattr(cfg, "get") else None
    block = {k: v for k, v in dict(block or {}).items() if k not in TASK_ONLY_KEYS.get(key, {})}
    unknown = sorted(set(block) - set(defaults))
    if unknown:
        raise UserError(f"unknown {key} keys {unknown}; the {key} block takes {sorted(defaults)}")
    return {**defaults, **block}


class ALSStepper:
    """``als.sweeps`` ALS sweeps per training step on ``als.samples`` triples each."""

    def __init__(self, net: FunctionalTT, **options):
        self.net = net
        self.als = ALS(net, **options)

    def step(self, draw: Draw, reduce_sum=lambda x: x) -> dict[str, float]:
        return self.als.step(draw, reduce_sum)

    def state_dict(self) -> dict:
        # the cores live in the model's state; fixed samples are redrawn after a resume
        return {"sweeps_done": self.als.sweeps_done}

    def load_state_dict(self, state: dict) -> None:
        self.als.sweeps_done = int(state.get("sweeps_done", 0))


class RiemannianStepper:
    """One Riemannian gradient step (with Armijo backtracking) per training step on one batch."""

    def __init__(self, net: FunctionalTT, **options):
        self.net = net
        self.gd = RiemannianGD(net, **options)

    def step(self, draw: Draw, reduce_sum=lambda x: x) -> dict[str, float]:
        x_t, t, eps = draw()
        return self.gd.step(x_t, t, eps, reduce_sum)


def make_tt_stepper(name: str, eps_net, cfg) -> ALSStepper | RiemannianStepper:
    """The ALS or Riemannian stepper for an FTT noise model, configured from ``cfg.als`` /
    ``cfg.riemannian`` (keys and defaults in :data:`ALS_DEFAULTS`, :data:`RIEMANNIAN_DEFAULTS`).

    Raises:
        UserError: ``eps_net`` is not a :class:`FunctionalTT`, or ``name`` is neither ``als`` nor
            ``riemannian``, or a block has unknown keys.
    """
    if name not in ("als", "riemannian"):
        raise UserError(f"unknown tensor-train optimiser {name!r}; use als or riemannian")
    if not isinstance(eps_net, FunctionalTT):
        raise UserError(
            f"ddpm.optimizer={name} needs eps_net=ftt (the noise model here is "
            f"{type(eps_net).__name__}); use eps_net=ftt, or ddpm.optimizer=adam for this model"
        )
    if name == "als":
        return ALSStepper(eps_net, **_block(cfg, "als", ALS_DEFAULTS))
    return RiemannianStepper(eps_net, **_block(cfg, "riemannian", RIEMANNIAN_DEFAULTS))
