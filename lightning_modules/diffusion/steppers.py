"""Optimiser steppers for the DDPM noise model: one call = one optimisation step.

A stepper owns its optimiser state and is handed two callables by the training loop:
``draw()`` gives a fresh ``(x_t, t, eps)`` triple from the forward process on a batch of
training data, and ``reduce_sum`` all-reduces a tensor over DDP ranks (identity on one
process). Gradient steppers (adam, sgd) average their gradients with ``reduce_sum`` themselves,
so they work the same with or without a DDP wrapper; the tensor-train steppers (als,
riemannian, in ``lightning_modules.tt.steppers``) reduce their normal equations / tangent
gradients the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import torch
from torch import Tensor, nn

from lightning_modules.errors import UserError

Draw = Callable[[], tuple[Tensor, Tensor, Tensor]]
ReduceSum = Callable[[Tensor], Tensor]

GRADIENT_STEPPERS = ("adam", "sgd")
TT_STEPPERS = ("als", "riemannian")


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


def _ddpm_cfg(cfg: Mapping) -> Mapping:
    block = cfg.get("ddpm") if hasattr(cfg, "get") else None
    return block if block is not None else cfg


def make_stepper(name: str, eps_net: nn.Module, cfg: Mapping) -> Stepper:
    """The stepper called ``name`` (``ddpm.optimizer``): adam | sgd | als | riemannian.

    ``cfg`` is the whole run config: gradient steppers read ``ddpm.lr``, ``ddpm.grad_clip``,
    ``ddpm.weight_decay`` and (sgd) ``ddpm.momentum``; als / riemannian are built by
    ``lightning_modules.tt.steppers.make_tt_stepper`` from the ``als:`` / ``riemannian:`` blocks.
    """
    if name in TT_STEPPERS:
        # imported lazily: the tensor-train package is only needed for eps_net=ftt
        from lightning_modules.tt.steppers import make_tt_stepper

        return make_tt_stepper(name, eps_net, cfg)
    if name not in GRADIENT_STEPPERS:
        raise UserError(
            f"ddpm.optimizer={name!r}: use one of {', '.join(GRADIENT_STEPPERS + TT_STEPPERS)}"
        )
    d = _ddpm_cfg(cfg)
    lr = float(d.get("lr", 1e-3))
    weight_decay = float(d.get("weight_decay", 0.0) or 0.0)
    params = [p for p in eps_net.parameters() if p.requires_grad]
    if not params:
        raise UserError(f"ddpm.optimizer={name}: the eps-net has no trainable parameters")
    if name == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(
            params, lr=lr, momentum=float(d.get("momentum", 0.9) or 0.0), weight_decay=weight_decay
        )
    return GradientStepper(eps_net, opt, grad_clip=d.get("grad_clip"))
