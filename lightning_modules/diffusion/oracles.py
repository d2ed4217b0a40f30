"""Exact noise predictors ``ε*(x_t, t) = E[ε | x_t] = -sqrt(1 - ᾱ_t) ∇ log p_t(x_t)`` of
densities with a closed-form ``p_t`` (plain torch), and the scores of a model relative to the
perfect model they define.

``p_t`` is ``p_0`` pushed through ``x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε``. Two families:

* :class:`MixtureEps`: ``p_0 = Σ_k w_k N(m_k, σ² I)`` or, with unit vectors ``u_k``,
  ``Σ_k w_k N(m_k, σ² u_k u_kᵀ)`` (a Gaussian degenerate along the arm of a pinwheel). Then
  ``x_t | k ~ N(a m_k, s² I + a² Σ_k)`` (a = sqrt(ᾱ), s² = 1 - ᾱ) and the score is the
  posterior-weighted mean of the component scores (``dataset=gmm`` exactly; the curves of the
  2-D suite as dense mixtures along the noiseless curve).
* :class:`BoxesEps`: ``p_0`` uniform on a union of equally weighted boxes (the checkerboard),
  ``p_t`` a sum of products of normal-CDF differences, gradient by autograd.

Both take ``t`` per row (``[N]`` long, 0-based), so one call can mix noise levels.
:func:`oracle_comparison` puts a model's metrics beside those of the exact predictor's samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def _levels(alpha_bar: Tensor, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """``(a, s²)`` per row, ``[N, 1]`` float64: sqrt(ᾱ_t) and 1 - ᾱ_t."""
    ab = alpha_bar.to(like.device)[t.long()].double().reshape(-1, 1)
    return ab.sqrt(), 1 - ab


class MixtureEps:
    """ε* of ``Σ_k w_k N(m_k, σ² I)`` (``across=None``) or ``Σ_k w_k N(m_k, σ² u_k u_kᵀ)``.

    Args:
        means: ``[K, D]`` component means.
        noise: the component std σ (> 0).
        alpha_bar: ``[T]`` cumulative products ᾱ_t of the schedule.
        weights: ``[K]`` mixture weights (normalised here); None: equal weights.
        across: ``[K, D]`` unit vectors: component k spreads only along ``u_k``.
    """

    def __init__(
        self,
        means: Tensor,
        noise: float,
        alpha_bar: Tensor,
        *,
        weights: Tensor | None = None,
        across: Tensor | None = None,
    ):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.noise, self.alpha_bar = float(noise), torch.as_tensor(alpha_bar).double()
        K = len(self.means)
        w = torch.ones(K, dtype=torch.float64) if weights is None else torch.as_tensor(weights)
        self.log_weights = (w.double() / w.double().sum()).log()
        self.across = None if across is None else torch.as_tensor(across, dtype=torch.float64)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        a, s2 = _levels(self.alpha_bar, t, x)
        y, m = x.double(), self.means.to(x.device)
        logw = self.log_weights.to(x.device)
        dist2 = (y * y).sum(1, keepdim=True) - 2 * a * (y @ m.T) + a * a * (m * m).sum(1)  # [N, K]
        if self.across is None:  # C_k = v I, the same v for every k
            v = s2 + a * a * self.noise**2
            w = torch.softmax(logw - dist2 / (2 * v), dim=1)
            score = (a * (w @ m) - y) / v
        else:  # C_k = s² (I + c' u uᵀ): C⁻¹ r = (r - c (u·r) u) / s², c = a²σ² / (s² + a²σ²)
            u = self.across.to(x.device)
            c = a * a * self.noise**2 / (s2 + a * a * self.noise**2)
            proj = y @ u.T - a * (u * m).sum(1)  # u_k · (y - a m_k), [N, K]
            # log det C_k is the same for every k: only the quadratic form differs
            w = torch.softmax(logw - (dist2 - c * proj * proj) / (2 * s2), dim=1)
            score = -(y - a * (w @ m) - c * ((w * proj) @ u)) / s2
        return (-s2.sqrt() * score).to(x.dtype)


def log_normal_mass(hi: Tensor, lo: Tensor) -> Tensor:
    """``log(Φ(hi) - Φ(lo))`` for ``hi > lo`` elementwise, on the side of 0 where the tails are
    accurate (any float dtype; differentiable: each branch is fed only values it is accurate on).
    The log of a diffused box's mass: :class:`BoxesEps` and the density TT's box bumps."""
    flip = lo > 0
    hi, lo = torch.where(flip, -lo, hi), torch.where(flip, -hi, lo)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    d = (log_lo - log_hi).clamp(max=-torch.finfo(hi.dtype).tiny)
    # log(1 - e^d): log(-expm1(d)) near 0, log1p(-e^d) far from it
    near = d > -math.log(2)
    d_near, d_far = torch.where(near, d, -math.log(2)), torch.where(near, -math.log(2), d)
    log1mexp = torch.where(near, torch.log(-torch.expm1(d_near)), torch.log1p(-d_far.exp()))
    return log_hi + log1mexp


class BoxesEps:
    """ε* of the uniform density on equally weighted boxes ``bounds`` [K, D, 2] (lo, hi)."""

    def __init__(self, bounds: Tensor, alpha_bar: Tensor):
        self.bounds = torch.as_tensor(bounds, dtype=torch.float64)
        self.alpha_bar = torch.as_tensor(alpha_bar).double()

    def log_density(self, y: Tensor, a: Tensor, s: Tensor) -> Tensor:
        """log p_t(y) up to a constant; ``a``, ``s`` per row ``[N, 1]``."""
        bounds = self.bounds.to(y.device)
        lo, hi = bounds[None, :, :, 0], bounds[None, :, :, 1]  # [1, K, D]
        z, a, s = y[:, None, :], a[:, :, None], s[:, :, None]
        terms = log_normal_mass((z - a * lo) / s, (z - a * hi) / s).sum(2)  # [N, K]
        return torch.logsumexp(terms, dim=1)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        a, s2 = _levels(self.alpha_bar, t, x)
        with torch.enable_grad():
            y = x.detach().double().requires_grad_(True)
            (score,) = torch.autograd.grad(self.log_density(y, a, s2.sqrt()).sum(), y)
        return (-s2.sqrt() * score).to(x.dtype)


# -- a model's scores relative to the exact predictor's --------------------------------------------
RATIO_METRICS = ("sw", "sinkhorn", "mmd")
ORACLE_KEYS = ("mode_share", "component_share_gap", "component_shares")


def oracle_comparison(
    model: dict,
    draw: Callable[[int], Tensor],
    draw_ids: list[int],
    score: Callable[..., dict],
) -> dict:
    """The exact predictor's metrics beside a model's, and the model's ratios to them.

    Args:
        model: the model's metrics (``sw``, ``sinkhorn``, ``mmd``, ``mode_share``, ...).
        draw: ``draw(i)`` → a sample draw of the exact predictor through the same chain and
            steps as the model's draw of seed index ``i``, with that draw's generator seed.
        draw_ids: the seed indices of the model's scored draws.
        score: the task's scorer ``score(draws, floors=...)`` (same reference and settings); it
            is handed the model's floor bands, so both are scored against the same floors.

    Returns:
        ``m_oracle`` and ``m_oracle_draws`` per vector metric, ``m_ratio = m / m_oracle``,
        ``mode_share_oracle`` (and component shares) where the data has a structure metric,
        ``oracle_sample_s`` (seconds per draw).
    """
    import time

    start = time.perf_counter()
    draws = [draw(i) for i in draw_ids]
    seconds = (time.perf_counter() - start) / max(len(draw_ids), 1)
    floors = {k: v for k, v in model.items() if "_floor" in k or k == "floor_pairs"}
    exact = score(draws, floors=floors or None)
    out: dict = {"oracle_sample_s": seconds}
    for key in RATIO_METRICS:
        if key in exact:
            out[f"{key}_oracle"] = exact[key]
            out[f"{key}_oracle_draws"] = exact[f"{key}_draws"]
            if key in model:
                out[f"{key}_ratio"] = model[key] / exact[key] if exact[key] > 0 else float("inf")
    for key in ORACLE_KEYS:
        if key in exact:
            out[f"{key}_oracle"] = exact[key]
    return out


def oracle_lines(m: dict) -> list[str]:
    """Human-readable lines: each metric's ratio to the exact predictor's."""
    lines = []
    for key in RATIO_METRICS:
        if f"{key}_ratio" in m:
            lines.append(
                f"{key}: {m[key]:.4f} vs the exact predictor's {m[f'{key}_oracle']:.4f} "
                f"(ratio {m[f'{key}_ratio']:.3f})"
            )
    if "mode_share_oracle" in m:
        lines.append(
            f"structure: {100 * m['mode_share']:.1f} % vs the exact predictor's "
            f"{100 * m['mode_share_oracle']:.1f} %"
        )
    return lines
