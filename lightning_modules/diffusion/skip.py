"""A fixed Gaussian "skip" predictor of ε that a learned noise model corrects (plain torch).

If every coordinate of x_0 were an independent Gaussian N(μ_j, v_j), then with
``x_t = s x_0 + σ ε`` (``s² = ᾱ_t``, ``σ² = 1 - ᾱ_t``) the best prediction of ε is linear:

    E[ε_j | x_t] = σ (x_t,j - s μ_j) / (s² v_j + σ²),   its error variance  s² v_j / (s² v_j + σ²).

:class:`GaussianSkip` is that predictor (``c_skip``) and the square root of its error variance
(``c_out``, EDM-style): a network ``F`` then learns the *normalised* residual,
``ε̂ = skip(x_t, t) + c_out(t) · F(x_t, t)``, whose target has unit variance at every t under the
Gaussian model. At high noise the skip alone is optimal (ε̂ ≈ x_t); at low noise it knows only
the per-pixel mean and variance, and everything else is left to ``F``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class GaussianSkip(nn.Module):
    """``skip(x_t, t)`` and ``c_out(t)`` of per-coordinate Gaussian data (module docstring).

    Args:
        mean: ``[D]`` per-coordinate mean of the training data (model space).
        var: ``[D]`` per-coordinate variance of the training data.
        alpha_bar: ``[T]`` the schedule's ᾱ_t for ``t`` in ``0..T-1``.
    """

    def __init__(self, mean: Tensor, var: Tensor, alpha_bar: Tensor):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
        var = torch.as_tensor(var, dtype=torch.float64).reshape(-1).clamp(min=0)
        if mean.shape != var.shape:
            raise ValueError(f"mean {tuple(mean.shape)} and var {tuple(var.shape)} differ")
        self.register_buffer("mean", mean.float())
        self.register_buffer("var", var.float())
        self.register_buffer("alpha_bar", torch.as_tensor(alpha_bar, dtype=torch.float64).float())

    def _terms(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        ab = self.alpha_bar[t].to(like.dtype)[:, None]  # [N, 1]
        s, sigma2 = ab.sqrt(), 1 - ab
        denom = ab * self.var.to(like.dtype) + sigma2  # [N, D]
        return s, sigma2, denom

    def forward(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(skip, c_out)``, both ``[N, D]``, for flattened ``x_t [N, D]`` and ``t [N]``."""
        s, sigma2, denom = self._terms(t, x_t)
        skip = sigma2.sqrt() * (x_t - s * self.mean.to(x_t.dtype)) / denom
        c_out = (1 - sigma2 / denom).clamp(min=0).sqrt()
        return skip, c_out

    def expected_loss(self) -> float:
        """The skip's own loss E||ε - skip||² / D under the Gaussian model, t uniform."""
        ab = self.alpha_bar.double()[:, None]
        mmse = ab * self.var.double() / (ab * self.var.double() + 1 - ab)
        return float(mmse.mean())
