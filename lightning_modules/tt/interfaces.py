"""The partial products a functional TT's contraction is made of (plain torch): the
interfaces of one core (:class:`CoreInterfaces`), the output with that core put back
(:func:`contract_core`), and the per-sample renormalisation that keeps products of thousands of
cores in range (:func:`renormalise`). See :mod:`.ftt` for the formula."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CoreInterfaces:
    """Everything but core ``k`` of a batch's contraction (see the module docstring's formula).

    With ``log_scale`` set, ``left`` and ``right`` are normalised per sample and the true
    interfaces are ``left * right * exp(log_scale)``: long trains keep their numbers in range.
    """

    left: torch.Tensor  # [P, N, J, r_{k-1}]
    values: torch.Tensor  # [N, J, s]  (J may be 1: broadcast)
    index: torch.Tensor  # [N, J, s]  int64 slice of core k each value multiplies
    right: torch.Tensor  # [P, N, J, r_k]
    log_scale: torch.Tensor | None = None  # [P, N] float64, or None (scale already folded in)


def contract_core(core: torch.Tensor, iface: CoreInterfaces) -> torch.Tensor:
    """``y[p, n, j]`` of the model whose core ``k`` is ``core`` (``[P, r, n_k, r']``)."""
    slices = core.permute(0, 2, 1, 3)[:, iface.index]  # [P, N, J, s, r, r']
    matrix = (iface.values[None, ..., None, None] * slices).sum(3)  # [P, N, J, r, r']
    y = torch.einsum("pnja,pnjab,pnjb->pnj", iface.left, matrix, iface.right)
    if iface.log_scale is not None:
        y = y * iface.log_scale.exp().to(y.dtype)[..., None]
    return y


def renormalise(state: torch.Tensor, log: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Divide ``state [P, N, ...]`` by its per-(p, n) largest magnitude, adding its log to ``log``.

    The divisor is detached: the value ``state * exp(log)`` and its gradient are unchanged, and
    a product of thousands of cores neither underflows nor overflows.
    """
    norm = state.detach().abs().flatten(2).amax(-1)
    norm = torch.where(norm > 0, norm, torch.ones_like(norm))  # an exact zero stays zero
    shape = norm.shape + (1,) * (state.dim() - 2)
    return state / norm.reshape(shape), log + norm.to(torch.float64).log()
