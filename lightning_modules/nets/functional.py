"""A module's parameters as one flat vector, for unrolled training with ``functional_call``.

Trajectory matching treats the network as a function of a single vector θ ∈ R^P: experts store
θ per epoch, the student takes θ ← θ - α∇L(θ) with ``create_graph``, and the matching loss and
pruning mask are computed on whole vectors.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call


class FlatParams:
    """Layout of a module's parameters (names and shapes) and the flat <-> dict maps.

    >>> layout = FlatParams(net)
    >>> theta = layout.flatten(net)                 # [P]
    >>> logits = layout.call(net, theta, images)    # same as net(images) when theta is net's
    """

    def __init__(self, module: nn.Module):
        self.names = [n for n, _ in module.named_parameters()]
        self.shapes = [tuple(p.shape) for _, p in module.named_parameters()]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.numel = sum(self.sizes)

    def flatten(self, module: nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).clone()

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        if theta.numel() != self.numel:
            raise ValueError(f"flat vector has {theta.numel()} entries, the network {self.numel}")
        chunks = torch.split(theta, self.sizes)
        return {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes)}

    def load_into(self, module: nn.Module, theta: torch.Tensor) -> None:
        with torch.no_grad():
            for p, value in zip(module.parameters(), self.unflatten(theta).values()):
                p.copy_(value)

    def call(self, module: nn.Module, theta: torch.Tensor, *args, **kwargs):
        """``module(*args)`` evaluated at the flat parameters ``theta`` (differentiable in both)."""
        return functional_call(module, self.unflatten(theta), args, kwargs)

    def metadata(self) -> dict:
        return {
            "names": list(self.names),
            "shapes": [list(s) for s in self.shapes],
            "numel": self.numel,
        }
