"""Principal components in float64, one function for every PCA of the project (plain torch):
the CIFAR latent (:mod:`datamodules.cifar_pca`) and the FTT's PCA skip
(:mod:`lightning_modules.diffusion.skip`)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Components(NamedTuple):
    mean: Tensor  # [D] float64
    variances: Tensor  # [k] float64, descending, >= 0
    vectors: Tensor  # [D, k] float64, orthonormal columns
    total_variance: float  # trace of the covariance (all D directions)


def principal_components(x: Tensor, k: int, chunk: int = 4096) -> Components:
    """The top ``k`` principal components of the rows of ``x [N, D]`` (any dtype).

    Fewer rows than columns: an SVD of the centred data (exact, deterministic). Otherwise the
    eigenvectors of the covariance accumulated over ``chunk`` rows at a time, so that a large
    uint8 array never needs a float64 copy. Each direction's sign is fixed: its
    largest-magnitude entry is positive. ``k`` is capped at ``min(N - 1, D)``.
    """
    n, dim = x.shape
    k = max(0, min(int(k), n - 1, dim))
    mean = torch.zeros(dim, dtype=torch.float64)
    for i in range(0, n, chunk):
        mean += x[i : i + chunk].double().sum(0)
    mean /= n
    if n <= dim:
        centred = x.double() - mean
        _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
        values, vectors = singular**2 / max(n - 1, 1), vh.T
        total = float(centred.square().sum()) / max(n - 1, 1)
    else:
        cov = torch.zeros(dim, dim, dtype=torch.float64)
        for i in range(0, n, chunk):
            c = x[i : i + chunk].double() - mean
            cov += c.T @ c
        cov /= n - 1
        values, vectors = torch.linalg.eigh(cov)  # ascending
        values, vectors = values.flip(0), vectors.flip(1)
        total = float(cov.diagonal().sum())
    values, vectors = values[:k].clamp(min=0), vectors[:, :k].contiguous()
    pivot = vectors.abs().argmax(0)
    vectors *= torch.sign(vectors[pivot, torch.arange(k)])
    return Components(mean, values, vectors, total)
