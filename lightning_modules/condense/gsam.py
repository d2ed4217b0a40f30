"""GSAM (Zhuang et al., ICLR 2022, "Surrogate Gap Guided Sharpness-Aware Minimization"): one
step, as the FTD / DATM / PAD expert scripts take it (plain torch).

With ``g`` the minibatch gradient at ``w``:

1. ``e = rho * g * w^2 / (||w * g|| + 1e-12)`` (adaptive, the references' setting; without
   ``adaptive``: ``rho * g / (||g|| + 1e-12)``), norms over all parameters together;
2. ``g_s`` = the gradient of the same batch at ``w + e`` (BatchNorm running statistics frozen);
3. ``g_perp = g - cos(g, g_s) * ||g|| * g_s / (||g_s|| + 1e-12)`` with
   ``cos = <g, g_s> / (||g|| ||g_s|| + 1e-12)``;
4. the base optimiser steps from ``w`` with the gradient ``g_s - alpha * g_perp``.

The references keep the learning rate constant, so their ``rho`` schedule
(``ProportionScheduler`` with ``rho_max == rho_min``) is the constant ``rho``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

EPS = 1e-12


def _norm(tensors) -> torch.Tensor:
    return torch.norm(torch.stack([t.norm(p=2) for t in tensors]), p=2)


def _freeze_bn(net: nn.Module) -> list[tuple[nn.Module, float | None]]:
    saved = []
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            saved.append((m, m.momentum))
            m.momentum = 0  # the running statistics stay as the first pass left them
    return saved


def gsam_step(
    net: nn.Module,
    loss_fn: Callable[[], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    rho: float,
    alpha: float,
    adaptive: bool = True,
) -> torch.Tensor:
    """One GSAM update of ``net`` by ``optimizer`` (e.g. SGD); ``loss_fn()`` computes the batch
    loss with the net's current weights. Returns the loss at ``w`` (before the step)."""
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    with torch.no_grad():
        live = [p for p in params if p.grad is not None]
        old_g = [p.grad.clone() for p in live]
        norm = _norm([(p.abs() if adaptive else 1.0) * g for p, g in zip(live, old_g, strict=True)])
        scale = rho / (norm + EPS)
        e_w = []
        for p, g in zip(live, old_g, strict=True):
            e = g * scale.to(p)
            if adaptive:
                e = e * p.pow(2)
            p.add_(e)
            e_w.append(e)
    saved = _freeze_bn(net)
    try:
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
    finally:
        for m, momentum in saved:
            m.momentum = momentum
    with torch.no_grad():
        new_g = [p.grad for p in live]
        inner = sum((a * b).sum() for a, b in zip(old_g, new_g, strict=True))
        new_norm, old_norm = _norm(new_g), _norm(old_g)
        cosine = inner / (new_norm * old_norm + EPS)
        for p, g, gs in zip(live, old_g, new_g, strict=True):
            vertical = g - cosine * old_norm * gs / (new_norm + EPS)
            p.grad.add_(vertical, alpha=-alpha)
        for p, e in zip(live, e_w, strict=True):
            p.sub_(e)
    optimizer.step()
    return loss.detach()
