"""Sample-quality metrics: sliced Wasserstein and MMD for vectors, FID/KID on given features.

Every vector metric is reported beside its *floor*: the same metric between two independent
real samples of the same size. A model cannot be expected to beat it (finite-sample noise), so
"SW within 2x of the floor" is a meaningful target where a raw number is not.

Sinkhorn divergences need an optimal-transport library (POT, geomloss); none is installed and
none is added, so they are not offered.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

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


def vector_sample_metrics(
    samples: Tensor,
    reference: Tensor,
    real: Tensor,
    *,
    num_projections: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """SW and MMD of ``samples`` against ``reference``, with their floors.

    The three samples are cut to one common size n. The floor is the same metric between
    ``real`` (independent real data, e.g. a seeded subset of the training sample) and
    ``reference``. MMD uses one bandwidth for both: the median distance within ``reference``.

    Returns:
        ``{"sw", "sw_floor", "mmd", "mmd_floor", "metric_samples"}``.
    """
    n = min(len(samples), len(reference), len(real))
    g = torch.Generator().manual_seed(seed)
    real = real[torch.randperm(len(real), generator=g)[:n]]
    samples, reference = samples[:n], reference[:n]
    h = median_bandwidth(reference, seed=seed)
    return {
        "sw": sliced_wasserstein(samples, reference, num_projections=num_projections, seed=seed),
        "sw_floor": sliced_wasserstein(real, reference, num_projections=num_projections, seed=seed),
        "mmd": mmd_rbf(samples, reference, bandwidth=h),
        "mmd_floor": mmd_rbf(real, reference, bandwidth=h),
        "metric_samples": n,
    }


def metrics_lines(m: dict) -> list[str]:
    """Human-readable lines: each metric beside its floor and their ratio."""
    lines = []
    for key, name in (("sw", "sliced Wasserstein"), ("mmd", "MMD (RBF, median bandwidth)")):
        if key in m:
            floor = m[f"{key}_floor"]
            ratio = m[key] / floor if floor > 0 else float("inf")
            lines.append(
                f"{name}: {m[key]:.4f}   floor (real vs real): {floor:.4f}   ratio {ratio:.2f}"
            )
    return lines


# -- images: FID / KID on features of a user-supplied network ------------------------------------
def load_feature_extractor(path: str | Path) -> Callable[[Tensor], Tensor]:
    """A local feature network: a ``torch.export`` archive (``.pt2``) or a TorchScript file.

    It must map images ``[N, 3, H, W]`` in [0, 1] to features ``[N, F]``. Nothing is downloaded.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(
            f"ddpm.feature_extractor={p} does not exist (a .pt2 torch.export or TorchScript file)"
        )
    try:
        if p.suffix == ".pt2":
            return torch.export.load(str(p)).module()
        return torch.jit.load(str(p), map_location="cpu")
    except Exception as e:
        raise UserError(
            f"ddpm.feature_extractor={p} could not be loaded ({type(e).__name__}); "
            "give a torch.export (.pt2) or TorchScript file"
        ) from None


@torch.no_grad()
def extract_features(
    net: Callable[[Tensor], Tensor], images01: Tensor, batch_size: int = 200
) -> Tensor:
    feats = []
    for i in range(0, len(images01), batch_size):
        batch = images01[i : i + batch_size].float()
        feats.append(net(batch).reshape(len(batch), -1))
    return torch.cat(feats).double()


def frechet_distance(f1: Tensor, f2: Tensor) -> float:
    """FID formula ||μ1 - μ2||² + tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^½) on two feature samples."""
    from scipy import linalg

    a, b = f1.double().cpu().numpy(), f2.double().cpu().numpy()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean = linalg.sqrtm(s1 @ s2)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def kernel_inception_distance(
    f1: Tensor, f2: Tensor, *, subsets: int = 10, subset_size: int = 1000, seed: int = 0
) -> float:
    """KID: unbiased MMD² with the cubic kernel (x·y / d + 1)³, averaged over random subsets."""
    a, b = f1.double().cpu(), f2.double().cpu()
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError("KID needs at least 2 samples per side")
    d = a.shape[1]
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(subsets):
        x = a[torch.randperm(len(a), generator=g)[:m]]
        y = b[torch.randperm(len(b), generator=g)[:m]]
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        off = 1 - torch.eye(m, dtype=torch.float64)
        vals.append(
            float(
                (kxx * off).sum() / (m * (m - 1))
                + (kyy * off).sum() / (m * (m - 1))
                - 2 * kxy.mean()
            )
        )
    return float(np.mean(vals))
