"""Sinusoidal encodings of the diffusion time step, shared by the eps-networks."""

from __future__ import annotations

import math

import torch


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer / Ho et al. encoding ``[sin(t w_k), cos(t w_k)]`` of width ``dim``.

    Frequencies ``w_k = max_period^(-k / (half - 1))`` for ``k < half = dim // 2``; an odd ``dim``
    gets one zero column. With ``dim = 2`` this is ``(sin t, cos t)``: a single period of 2π, so
    e.g. t = 15 and t = 725 nearly coincide (why the networks also offer a wider embedding).

    Args:
        t: time indices ``[N]`` (any numeric dtype).
        dim: output width (>= 1).
    """
    half = dim // 2
    t = t.float().reshape(-1, 1)
    if half == 0:
        return torch.zeros(len(t), dim, device=t.device)
    k = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * k / max(half - 1, 1))
    args = t * freqs
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
