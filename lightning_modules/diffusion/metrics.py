"""Sample-quality metrics of vectors: sliced Wasserstein, MMD and Sinkhorn beside floor bands
(images: :mod:`.image_metrics`).

Every vector metric is reported beside its *floor*, and the floor is a distribution: the same
metric between ``floor_pairs`` independent pairs of real samples of the model's sample size
(median ``*_floor`` and a 5-95 % band ``*_floor_lo`` .. ``*_floor_hi``). The model's metric is
the median over ``draws`` independent sample draws (``*_draws`` lists them all), and
``*_in_band`` says whether that median is at or below the band's upper end: a single floor draw
moves by tens of percent across seeds, so a ratio to it is not a verdict. The band is a test of
about 85 %, not 95 %: exact draws of the toy densities land inside it 86 % of the time on SW,
44-100 % depending on the reference sample (``benchmarks/floor_calibration.py``).

The Sinkhorn divergence ``S(x, y) = OT_ε(x, y) - (OT_ε(x, x) + OT_ε(y, y)) / 2`` (squared
Euclidean cost, entropic ``ε``) is computed with POT on seeded subsets of ``sinkhorn_samples``
points (its cost grows with n²). Where the data's squared distances dwarf ε (h² > 150 ε, h the
median distance within the reference sample) exp(-cost/ε) underflows, POT's Sinkhorn returns
garbage (measured: about 0 on 13-D wine and 64-D digits) and its log-domain variant takes minutes;
there the divergence is its ε → 0 limit, the exact W2² (``ot.emd2``; the self terms are 0), and
``sinkhorn_eps`` is 0. The 2-D/3-D toys (h² <= 5.3) keep ε = ``sinkhorn_reg``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lightning_modules.errors import UserError


def _check_pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"need two [N, D] samples of one dimension, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    return x.detach().double().cpu(), y.detach().double().cpu()


def sliced_wasserstein(
    x: Tensor, y: Tensor, *, num_projections: int = 1000, p: int = 2, seed: int = 0
) -> float:
    """Sliced p-Wasserstein distance between two equally sized samples [N, D].

    SW_p = (E_θ W_p^p(θ·x, θ·y))^(1/p) over ``num_projections`` directions θ uniform on the
    sphere, drawn from a generator seeded with ``seed`` (same seed → same directions, so a model
    and its floor are measured along the same projections). In 1-D, W_p between two empirical
    measures of equal size pairs the sorted values.
    """
    x, y = _check_pair(x, y)
    if len(x) != len(y):
        raise ValueError(
            f"sliced Wasserstein here needs samples of equal size ({len(x)} vs {len(y)})"
        )
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(x.shape[1], num_projections, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    xs = (x @ theta).sort(dim=0).values
    ys = (y @ theta).sort(dim=0).values
    return float(((xs - ys).abs() ** p).mean() ** (1 / p))


def pairwise_sq_dists(a: Tensor, b: Tensor) -> Tensor:
    return ((a * a).sum(1, keepdim=True) + (b * b).sum(1) - 2 * a @ b.T).clamp_min(0)


def median_bandwidth(x: Tensor, max_points: int = 2000, seed: int = 0) -> float:
    """Median pairwise Euclidean distance of ``x`` (a seeded subset of ``max_points`` rows)."""
    x = torch.as_tensor(x).detach().double().cpu()
    if len(x) > max_points:
        g = torch.Generator().manual_seed(seed)
        x = x[torch.randperm(len(x), generator=g)[:max_points]]
    d2 = pairwise_sq_dists(x, x)
    off = d2[~torch.eye(len(x), dtype=torch.bool)]
    h = float(off.median().sqrt()) if off.numel() else 1.0
    return h if h > 0 else 1.0


def _kernel_mean(a: Tensor, b: Tensor, gamma: float, chunk: int = 2048) -> float:
    """Mean of exp(-gamma ||a_i - b_j||²) over all pairs, in row chunks to bound memory."""
    total = 0.0
    for i in range(0, len(a), chunk):
        total += float(torch.exp(-gamma * pairwise_sq_dists(a[i : i + chunk], b)).sum())
    return total / (len(a) * len(b))


def mmd_rbf(x: Tensor, y: Tensor, *, bandwidth: float | None = None) -> float:
    """Maximum mean discrepancy with k(a, b) = exp(-||a - b||² / (2 h²)).

    The biased (V-statistic) estimate, so it is exactly 0 for identical samples and >= 0;
    returns MMD = sqrt(MMD²). ``bandwidth`` h defaults to the median heuristic on the pooled
    sample.
    """
    x, y = _check_pair(x, y)
    h = bandwidth if bandwidth is not None else median_bandwidth(torch.cat([x, y]))
    gamma = 1.0 / (2 * h * h)
    mmd2 = _kernel_mean(x, x, gamma) + _kernel_mean(y, y, gamma) - 2 * _kernel_mean(x, y, gamma)
    return float(max(mmd2, 0.0) ** 0.5)


def sinkhorn_divergence(
    x: Tensor, y: Tensor, *, reg: float = 0.05, max_points: int = 1000, seed: int = 0
) -> float:
    """Debiased entropic OT (module docstring) on seeded subsets of at most ``max_points``."""
    import ot

    x, y = _check_pair(x, y)
    g = torch.Generator().manual_seed(seed)
    x = x[torch.randperm(len(x), generator=g)[:max_points]].numpy()
    y = y[torch.randperm(len(y), generator=g)[:max_points]].numpy()

    def cost(a, b):
        wa, wb = np.full(len(a), 1 / len(a)), np.full(len(b), 1 / len(b))
        if reg == 0:  # the ε → 0 limit: exact optimal transport
            return float(ot.emd2(wa, wb, ot.dist(a, b), numItermax=1_000_000))
        return float(ot.sinkhorn2(wa, wb, ot.dist(a, b), reg, numItermax=2000, stopThr=1e-6))

    if reg == 0:
        return cost(x, y)  # OT_0(x, x) = 0
    return cost(x, y) - 0.5 * (cost(x, x) + cost(y, y))


VECTOR_METRICS = ("sw", "mmd", "sinkhorn")


def _band(values: list[float]) -> tuple[float, float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(np.median(v)), float(np.quantile(v, 0.05)), float(np.quantile(v, 0.95))


def sinkhorn_epsilon(h: float, reg: float) -> float:
    """The entropic ε used: ``reg``, or 0 (exact OT) where h² > 150 ε (module docstring)."""
    return 0.0 if h * h > 150 * reg else float(reg)


def _scorer(reference: Tensor, *, num_projections, sinkhorn_reg, sinkhorn_samples, seed):
    """``scores(x, y)``: SW, MMD (bandwidth: the median distance within ``reference``), Sinkhorn."""
    h = median_bandwidth(reference, seed=seed)
    eps = sinkhorn_epsilon(h, sinkhorn_reg)

    def scores(x: Tensor, y: Tensor) -> dict[str, float]:
        return {
            "sw": sliced_wasserstein(x, y, num_projections=num_projections, seed=seed),
            "mmd": mmd_rbf(x, y, bandwidth=h),
            "sinkhorn": sinkhorn_divergence(x, y, reg=eps, max_points=sinkhorn_samples, seed=seed),
        }

    return scores


def floor_bands(
    reference: Tensor,
    real: Tensor,
    n: int,
    *,
    num_projections: int = 1000,
    floor_pairs: int = 10,
    sinkhorn_reg: float = 0.05,
    sinkhorn_samples: int = 1000,
    seed: int = 0,
) -> dict:
    """``m_floor`` (median), ``m_floor_lo``/``m_floor_hi`` (5 %/95 %) per metric over
    ``floor_pairs`` pairs of disjoint size-``n`` samples of ``real`` and ``reference`` pooled."""
    pool = torch.cat([torch.as_tensor(real), torch.as_tensor(reference)]).double()
    if len(pool) < 2 * n:
        raise UserError(f"too little real data ({len(pool)}) for floor pairs of {n}")
    scores = _scorer(
        reference[:n],
        num_projections=num_projections,
        sinkhorn_reg=sinkhorn_reg,
        sinkhorn_samples=sinkhorn_samples,
        seed=seed,
    )
    g = torch.Generator().manual_seed(seed + 1)
    floors = []
    for _ in range(floor_pairs):
        order = torch.randperm(len(pool), generator=g)
        floors.append(scores(pool[order[:n]], pool[order[n : 2 * n]]))
    out: dict = {"floor_pairs": floor_pairs}
    for key in VECTOR_METRICS:
        out[f"{key}_floor"], out[f"{key}_floor_lo"], out[f"{key}_floor_hi"] = _band(
            [f[key] for f in floors]
        )
    return out


def vector_sample_metrics(
    draws: Tensor | list[Tensor],
    reference: Tensor,
    real: Tensor,
    *,
    num_projections: int = 1000,
    floor_pairs: int = 10,
    sinkhorn_reg: float = 0.05,
    sinkhorn_samples: int = 1000,
    seed: int = 0,
    floors: dict | None = None,
) -> dict:
    """SW, MMD and Sinkhorn of each sample draw against ``reference``, beside their floor bands.

    Args:
        draws: one sample ``[n, D]`` or several independent draws of it.
        reference: the held-out real sample.
        real: more real data (the training sample): the floor pairs are drawn, without
            replacement within a pair, from ``real`` and ``reference`` pooled (:func:`floor_bands`).
        floor_pairs: real-vs-real pairs behind each floor band.
        floors: a :func:`floor_bands` result to reuse (same ``n``) instead of recomputing it.

    Returns:
        per metric ``m``: ``m`` (median over draws), ``m_draws``, ``m_floor`` (median),
        ``m_floor_lo``/``m_floor_hi`` (5 %/95 %), ``m_in_band``; plus ``metric_samples``,
        ``floor_pairs``.
    """
    draws = [draws] if isinstance(draws, Tensor) else list(draws)
    n = min(min(len(d) for d in draws), len(reference), (len(real) + len(reference)) // 2)
    if n < 2:
        raise UserError(f"too few samples to score ({n}); need at least 2 model and 4 real")
    options = {
        "num_projections": num_projections,
        "sinkhorn_reg": sinkhorn_reg,
        "sinkhorn_samples": sinkhorn_samples,
        "seed": seed,
    }
    if floors is None:
        floors = floor_bands(reference, real, n, floor_pairs=floor_pairs, **options)
    scores = _scorer(reference[:n], **options)
    model = [scores(d[:n], reference[:n]) for d in draws]
    eps = sinkhorn_epsilon(median_bandwidth(reference[:n], seed=seed), sinkhorn_reg)
    out: dict = {"metric_samples": n, "sinkhorn_eps": eps, **floors}
    for key in VECTOR_METRICS:
        values = [m[key] for m in model]
        out[key] = float(np.median(values))
        out[f"{key}_draws"] = values
        out[f"{key}_in_band"] = bool(out[key] <= out[f"{key}_floor_hi"])
    return out


def structure_summary(structure, to_view, reference: Tensor, draws: list[Tensor]) -> dict:
    """The data's structure metric ``structure(x in data coordinates)`` over the draws beside
    the reference sample's own: ``mode_share`` (median over draws), ``mode_share_draws``,
    ``mode_share_data``, ``mode_share_ok`` (within 3 points of the data's own), ``mode_counts``
    (first draw); with ``component_shares`` (``dataset=gmm``): their per-component median over
    draws, ``component_weights``, ``component_share_gap`` (median of max_k |share_k - w_k|) and
    ``component_share_ok`` (gap <= 3 points). Empty where the data has no structure metric."""
    own = structure(to_view(reference)) if structure else None
    if own is None:  # no known structure (points, the 3-D roll)
        return {}
    per_draw = [structure(to_view(d)) for d in draws]
    share = float(np.median([m["mode_share"] for m in per_draw]))
    out = {
        "mode_share": share,
        "mode_share_draws": [m["mode_share"] for m in per_draw],
        "mode_share_data": own["mode_share"],
        "mode_share_ok": bool(share >= own["mode_share"] - 0.03),
    }
    if "mode_counts" in own:
        out["mode_counts"], out["mode_counts_data"] = per_draw[0]["mode_counts"], own["mode_counts"]
    if "component_shares" in own:
        gaps = [m["component_share_gap"] for m in per_draw]
        shares = np.median([m["component_shares"] for m in per_draw], axis=0)
        out.update(
            component_shares=shares.tolist(),
            component_shares_data=own["component_shares"],
            component_weights=own["component_weights"],
            component_share_gap=float(np.median(gaps)),
            component_share_gap_draws=gaps,
            component_share_gap_data=own["component_share_gap"],
            component_share_ok=bool(np.median(gaps) <= 0.03),
        )
    return out


def metrics_lines(m: dict) -> list[str]:
    """Human-readable lines: each metric beside its floor band and whether it is inside."""
    lines = []
    names = {"sw": "sliced Wasserstein", "mmd": "MMD (RBF)", "sinkhorn": "Sinkhorn divergence"}
    for key, name in names.items():
        if key in m and f"{key}_floor_lo" in m:
            verdict = "within the floor band" if m[f"{key}_in_band"] else "ABOVE the floor band"
            lines.append(
                f"{name}: {m[key]:.4f} (median of {len(m[f'{key}_draws'])} draws)   floor "
                f"{m[f'{key}_floor']:.4f} [{m[f'{key}_floor_lo']:.4f}, {m[f'{key}_floor_hi']:.4f}]"
                f"   {verdict}"
            )
    if "mode_share" in m:
        lines.append(
            f"structure: {100 * m['mode_share']:.1f} % of samples on the density's modes/curve "
            f"(the data's own: {100 * m['mode_share_data']:.1f} %)"
        )
    if "component_share_gap" in m:
        lines.append(
            f"components: largest |share - weight| {100 * m['component_share_gap']:.1f} points "
            f"(the data's own: {100 * m['component_share_gap_data']:.1f})"
        )
    return lines
