"""ALS, DMRG and Riemannian steppers for the DDPM training loop
(``ddpm.optimizer=als|dmrg|riemannian``).

``lightning_modules.diffusion.steppers.make_stepper`` delegates these names here. A stepper's
``step(draw, reduce_sum)`` pulls (x_t, t, ε) triples from the forward process with ``draw()``,
changes the FTT's cores in place and returns at least ``{"loss": float}``; ``reduce_sum``
all-reduces a tensor over DDP ranks (the identity on one process). Options arrive as keywords,
all of them: their defaults live once, in ``conf/task/ddpm.yaml`` (``als:``, ``dmrg:``,
``riemannian:``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from lightning_modules.errors import UserError
from lightning_modules.tt.als import ALS
from lightning_modules.tt.density import refuse_optimizer
from lightning_modules.tt.dmrg import DMRG
from lightning_modules.tt.ftt import FunctionalTT
from lightning_modules.tt.riemannian import RiemannianGD

Draw = Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def tt_targets(net: FunctionalTT, draw: Draw) -> Draw:
    """``draw`` with ``ε`` replaced by what the TT alone is fitted to
    (:meth:`FunctionalTT.tt_target`: ``ε`` itself, or the normalised residual of the skip)."""

    def draw_targets():
        x_t, t, eps = draw()
        return x_t, t, net.tt_target(x_t, t, eps)

    return draw_targets


class SweepStepper:
    """``sweeps`` ALS or DMRG sweeps per training step on ``samples`` triples each."""

    def __init__(self, net: FunctionalTT, solver: ALS):
        self.net = net
        self.als = solver

    def step(self, draw: Draw, reduce_sum=lambda x: x) -> dict[str, float]:
        out = self.als.step(tt_targets(self.net, draw), reduce_sum)
        if isinstance(self.als, DMRG):
            out.update({f"rank_{k + 1}": float(r) for k, r in enumerate(self.net.ranks[1:-1])})
        return out

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
        x_t, t, eps = tt_targets(self.net, draw)()
        return self.gd.step(x_t, t, eps, reduce_sum)


SOLVERS = {"als": ALS, "dmrg": DMRG, "riemannian": RiemannianGD}


def _check_options(name: str, options: dict) -> None:
    params = inspect.signature(SOLVERS[name]).parameters
    takes = {k for k, p in params.items() if p.kind is p.KEYWORD_ONLY}
    unknown = sorted(set(options) - takes)
    if unknown:
        raise UserError(f"unknown {name} keys {unknown}; the {name} block takes {sorted(takes)}")
    required = {k for k in takes if params[k].default is inspect.Parameter.empty}
    missing = sorted(required - set(options))
    if missing:
        raise UserError(f"the {name} block lacks {missing} (defaults: conf/task/ddpm.yaml)")


# Riemannian GD with a skip starts from the TT times this: near the skip alone, not at the identity
# init's constant output 1 (a normalised residual of 1 everywhere: loss 2 instead of 1)
RIEMANNIAN_START_SCALE = 1e-3


def fix_the_gain(net: FunctionalTT, riemannian: bool) -> None:
    """Set the gain of an FTT with a skip to 1: ALS, DMRG and Riemannian fit the TT alone to the
    skip's normalised residual (:meth:`FunctionalTT.tt_target`).

    A fresh model (gain 0 at init) starts from its TT as initialised; for Riemannian its last core
    is also scaled by :data:`RIEMANNIAN_START_SCALE` (ALS and DMRG solve for each core and leave
    any start in their first sweep; Riemannian steps move gradually from it). A set gain ``g``
    (a resumed run, a rebuilt stepper, an Adam-trained model) is folded into the last core
    (``TT ← g · TT``, gain ← 1): the function is unchanged and a second call does nothing.
    """
    with torch.no_grad():
        gain = float(net.out_gain)
        scale = (RIEMANNIAN_START_SCALE if riemannian else 1.0) if gain == 0.0 else gain
        net.cores[-1].mul_(scale)
        net.out_gain.fill_(1.0)


def make_tt_stepper(name: str, eps_net, **options) -> SweepStepper | RiemannianStepper:
    """The ALS, DMRG or Riemannian stepper for an FTT noise model with keyword ``options``.

    Raises:
        UserError: ``eps_net`` is not a :class:`FunctionalTT`, ``name`` is unknown, or an
            option is unknown or missing.
    """
    if name not in SOLVERS:
        raise UserError(f"unknown tensor-train optimiser {name!r}; use {', '.join(SOLVERS)}")
    if getattr(eps_net, "param", "eps") == "density":
        raise UserError(refuse_optimizer(name))
    if not isinstance(eps_net, FunctionalTT):
        raise UserError(
            f"ddpm.optimizer={name} needs eps_net=ftt (the noise model here is "
            f"{type(eps_net).__name__}); use eps_net=ftt, or ddpm.optimizer=adam for this model"
        )
    _check_options(name, options)
    if name == "riemannian":
        stepper = RiemannianStepper(eps_net, **options)
    else:
        stepper = SweepStepper(eps_net, SOLVERS[name](eps_net, **options))
    if eps_net.skip is not None:
        fix_the_gain(eps_net, riemannian=name == "riemannian")
    return stepper
