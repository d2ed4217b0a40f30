"""Optimiser steppers for the DDPM noise model: one call = one optimisation step.

A stepper owns its optimiser state and is handed two callables by the training loop:
``draw()`` gives a fresh ``(x_t, t, eps)`` triple from the forward process on a batch of
training data, and ``reduce_sum`` all-reduces a tensor over DDP ranks (identity on one
process). Gradient steppers (adam, sgd) average their gradients with ``reduce_sum`` themselves,
so they work the same with or without a DDP wrapper; the tensor-train steppers (als,
dmrg, riemannian, in ``lightning_modules.tt.steppers``) reduce their normal equations / tangent
gradients the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor, nn

from lightning_modules.errors import UserError

Draw = Callable[[], tuple[Tensor, Tensor, Tensor]]
ReduceSum = Callable[[Tensor], Tensor]

GRADIENT_STEPPERS = ("adam", "sgd")
TT_STEPPERS = ("als", "dmrg", "riemannian")


class Stepper(Protocol):
    def step(self, draw: Draw, reduce_sum: ReduceSum) -> dict[str, float]: ...


class GradientStepper:
    """Loss, backward, gradient all-reduce (mean over ranks), optional clipping, optimiser step.

    Args:
        eps_net: the noise model.
        optimizer: a ``torch.optim`` optimiser over ``eps_net``'s parameters.
        grad_clip: clip the global gradient norm to this (None/0 = no clipping; Ho et al.: 1).
    """

    def __init__(
        self, eps_net: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float | None = None
    ):
        self.eps_net = eps_net
        self.optimizer = optimizer
        self.grad_clip = grad_clip or None
        self._world: float | None = None

    def step(self, draw: Draw, reduce_sum: ReduceSum) -> dict[str, float]:
        x_t, t, eps = draw()
        loss = torch.mean((self.eps_net(x_t, t) - eps) ** 2)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.eps_net.parameters() if p.grad is not None]
        world = self._world_size(reduce_sum, loss.device)
        if world > 1 and params:
            # one flat all-reduce instead of one per parameter tensor
            flat = reduce_sum(torch.cat([p.grad.reshape(-1) for p in params])) / world
            for p, g in zip(params, torch.split(flat, [p.numel() for p in params])):
                p.grad.copy_(g.view_as(p))
        out = {"loss": float(reduce_sum(loss.detach()) / world)}
        if self.grad_clip is not None:
            out["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip))
        if torch.isfinite(torch.tensor(out["loss"])):
            self.optimizer.step()
        return out

    def _world_size(self, reduce_sum: ReduceSum, device) -> float:
        if self._world is None:
            self._world = float(reduce_sum(torch.ones((), device=device)))
        return self._world

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


def _lr_groups(params: list[nn.Parameter], lr: float) -> list[dict]:
    """One optimiser group per distinct ``p.lr_scale`` (default 1): lr × scale for its members
    (the FTT's long core chains want smaller per-core steps, ``eps_net.core_lr_scale``)."""
    groups: dict[float, list[nn.Parameter]] = {}
    for p in params:
        groups.setdefault(float(getattr(p, "lr_scale", 1.0)), []).append(p)
    return [{"params": ps, "lr": lr * scale} for scale, ps in groups.items()]


def make_stepper(name: str, eps_net: nn.Module, **options) -> Stepper:
    """The stepper called ``name`` (``ddpm.optimizer``): adam | sgd | als | dmrg | riemannian.

    ``options`` are the stepper's keyword options, all given (their defaults live in
    ``conf/task/ddpm.yaml``): adam ``lr, weight_decay, grad_clip``; sgd those and ``momentum``;
    the tensor-train steppers the keys of their ``als:`` / ``dmrg:`` / ``riemannian:`` block
    (``lightning_modules.tt.steppers.make_tt_stepper``).
    """
    if name in TT_STEPPERS:
        # imported lazily: the tensor-train package is only needed for eps_net=ftt
        from lightning_modules.tt.steppers import make_tt_stepper

        return make_tt_stepper(name, eps_net, **options)
    if name not in GRADIENT_STEPPERS:
        raise UserError(
            f"ddpm.optimizer={name!r}: use one of {', '.join(GRADIENT_STEPPERS + TT_STEPPERS)}"
        )
    want = {"lr", "weight_decay", "grad_clip"} | ({"momentum"} if name == "sgd" else set())
    if set(options) != want:
        raise UserError(
            f"ddpm.optimizer={name} takes the options {sorted(want)}; got {sorted(options)}"
        )
    params = [p for p in eps_net.parameters() if p.requires_grad]
    if not params:
        raise UserError(f"ddpm.optimizer={name}: the eps-net has no trainable parameters")
    lr, weight_decay = float(options["lr"]), float(options["weight_decay"] or 0.0)
    params = _lr_groups(params, lr)
    if name == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        momentum = float(options["momentum"] or 0.0)
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return GradientStepper(eps_net, opt, grad_clip=options["grad_clip"])
