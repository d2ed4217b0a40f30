"""Fixed Gaussian "skip" predictors of ε that a learned noise model corrects (plain torch).

If x_0 were Gaussian, N(μ, Σ), then with ``x_t = s x_0 + σ ε`` (``s² = ᾱ_t``, ``σ² = 1 - ᾱ_t``)
the best prediction of ε would be linear,

    E[ε | x_t] = σ (s² Σ + σ² I)⁻¹ (x_t - s μ),   error covariance  I - σ² (s² Σ + σ² I)⁻¹.

A skip is that predictor for a Σ fitted to the training data (``c_skip``), together with the
square root of the diagonal of its error covariance (``c_out``, EDM-style): a network ``F`` then
learns the *normalised* residual, ``ε̂ = skip(x_t, t) + c_out · F(x_t, t)``, whose target has
unit variance per coordinate under the Gaussian model.

* :class:`GaussianSkip`: diagonal Σ (per-coordinate mean and variance); its samples are the
  mean image plus independent pixel noise.
* :class:`PCASkip`: Σ = V diag(λ) Vᵀ + δ I with the top ``k`` principal directions of the data
  (δ: the variance left outside them, per coordinate); its samples are Gaussian images in the
  span of those directions (blurry blends of training images, not pixel noise).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_modules.utils.pca import principal_components


def _alpha_terms(alpha_bar: Tensor, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    ab = alpha_bar[t].to(like.dtype)[:, None]  # [N, 1]
    return ab, 1 - ab


class GaussianSkip(nn.Module):
    """Diagonal-covariance skip (module docstring).

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

    def forward(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(skip, c_out)``, both ``[N, D]``, for flattened ``x_t [N, D]`` and ``t [N]``."""
        ab, sigma2 = _alpha_terms(self.alpha_bar, t, x_t)
        denom = ab * self.var.to(x_t.dtype) + sigma2  # [N, D]
        skip = sigma2.sqrt() * (x_t - ab.sqrt() * self.mean.to(x_t.dtype)) / denom
        c_out = (1 - sigma2 / denom).clamp(min=0).sqrt()
        return skip, c_out

    def expected_loss(self) -> float:
        """The skip's own loss E||ε - skip||² / D under its Gaussian model, t uniform."""
        ab = self.alpha_bar.double()[:, None]
        mmse = ab * self.var.double() / (ab * self.var.double() + 1 - ab)
        return float(mmse.mean())


class PCASkip(nn.Module):
    """Skip of the Gaussian with covariance ``V diag(λ) Vᵀ + δ I`` (module docstring).

    Args:
        mean: ``[D]`` mean of the training data.
        components: ``[D, k]`` orthonormal principal directions ``V``.
        variances: ``[k]`` the data's variance along each, beyond ``floor`` (``λ``).
        floor: ``δ``, the variance per coordinate left outside the ``k`` directions.
        alpha_bar: ``[T]`` the schedule's ᾱ_t.
    """

    def __init__(
        self, mean: Tensor, components: Tensor, variances: Tensor, floor: float, alpha_bar: Tensor
    ):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean).reshape(-1).float())
        self.register_buffer("components", torch.as_tensor(components).float())
        self.register_buffer("variances", torch.as_tensor(variances).clamp(min=0).float())
        self.register_buffer("floor", torch.as_tensor(float(floor)).clamp(min=0).float())
        self.register_buffer("alpha_bar", torch.as_tensor(alpha_bar, dtype=torch.float64).float())

    def forward(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(skip, c_out)``, both ``[N, D]``, for flattened ``x_t [N, D]`` and ``t [N]``."""
        ab, sigma2 = _alpha_terms(self.alpha_bar, t, x_t)
        V = self.components.to(x_t.dtype)
        rest = ab * self.floor.to(x_t.dtype) + sigma2  # [N, 1]: outside the k directions
        inside = ab * (self.variances.to(x_t.dtype) + self.floor) + sigma2  # [N, k]
        z = x_t - ab.sqrt() * self.mean.to(x_t.dtype)
        coef = z @ V  # [N, k]
        skip = sigma2.sqrt() * ((coef / inside) @ V.T + (z - coef @ V.T) / rest)
        # diagonal of (s²Σ + σ²I)⁻¹: Σ_i V_ji² / inside_i + (1 - Σ_i V_ji²) / rest
        v2 = V.square()  # [D, k]
        diag = (1 / inside) @ v2.T + (1 - v2.sum(1)) / rest
        c_out = (1 - sigma2 * diag).clamp(min=0).sqrt()
        return skip, c_out


def fit_skip(kind: str, data: Tensor, alpha_bar: Tensor, components: int) -> nn.Module:
    """The ``kind`` (``gaussian`` | ``pca``) skip fitted to ``data [N, ...]`` (float64 fit)."""
    x = data.reshape(len(data), -1).double()
    if kind == "gaussian":
        var = x.var(0) if len(x) > 1 else torch.zeros(x.shape[1], dtype=x.dtype)
        return GaussianSkip(x.mean(0), var, alpha_bar)
    pc = principal_components(x, components)
    floor = max(pc.total_variance - float(pc.variances.sum()), 0.0) / x.shape[1]
    return PCASkip(pc.mean, pc.vectors, pc.variances - floor, floor, alpha_bar)
