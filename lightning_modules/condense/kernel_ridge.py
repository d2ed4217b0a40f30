"""KIP (Nguyen et al., NeurIPS 2021): kernel inducing points, in plain torch.

Kernel ridge regression from the synthetic support ``(X_s, Y_s)`` to a real target batch
``(X_t, Y_t)``; the loss is the squared error of the prediction::

    pred = K_ts (K_ss + lambda * tr(K_ss) / n_s * I)^-1 Y_s,   L = 1/2 mean (pred - Y_t)^2

(``lambda`` relative to the mean diagonal, as in the KIP code). Adam on ``X_s`` (and ``Y_s`` when
labels are learned). Kernels:

- ``nngp_fc`` / ``ntk_fc``: the exact infinite-width NNGP / NTK of a fully-connected ReLU net with
  ``depth`` hidden layers (weight variance ``w_var``, bias variance ``b_var``, NTK
  parameterisation), by the closed-form arc-cosine recursion (Cho & Saul 2009; Jacot et al.
  2018) on flattened inputs;
- ``rf_convnet``: a random-feature estimate (Loo et al. 2022, RFAD): the mean over ``M`` random
  finite-width networks of the inner products of their embeddings (divided by the feature size),
  a Monte-Carlo estimate of the network's NNGP at that width;
- :func:`fc_random_features`: the same estimate for the fc net (``rf_fc``), to measure how far a
  random-feature kernel is from the exact one as the width grows.

Kernel blocks are computed ``chunk`` rows at a time (features of the target batch under no_grad),
so a large target batch never holds all activations at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

KERNELS = ("ntk_fc", "nngp_fc", "rf_convnet", "rf_fc")


# -- exact fc kernels ---------------------------------------------------------------------------
def _relu_expectations(k12, k11, k22):
    """(E[relu(u) relu(v)], E[relu'(u) relu'(v)]) for (u, v) ~ N(0, [[k11, k12], [k12, k22]])."""
    norm = torch.sqrt(k11 * k22).clamp_min(1e-30)
    # strictly inside [-1, 1]: arccos has an infinite slope at +-1 (the diagonal), and
    # autograd would multiply it by 0 into NaN; the kernel changes by O(sqrt(eps)) there
    edge = 1.0 - 16 * torch.finfo(k12.dtype).eps
    cos = (k12 / norm).clamp(-edge, edge)
    theta = torch.arccos(cos)
    k1 = norm * (torch.sin(theta) + (math.pi - theta) * cos) / (2 * math.pi)
    k0 = (math.pi - theta) / (2 * math.pi)
    return k1, k0


def fc_kernel(
    x1: torch.Tensor,
    x2: torch.Tensor,
    *,
    depth: int = 1,
    w_var: float = 2.0,
    b_var: float = 0.01,
    kind: str = "nngp",
) -> torch.Tensor:
    """``[n1, n2]``: the NNGP (``kind="nngp"``) or NTK (``"ntk"``) of an infinitely wide fc ReLU
    net with ``depth`` hidden layers, on flattened inputs.

    Recursion: ``K0 = w_var x.x'/d + b_var``; per hidden layer
    ``K <- w_var E[relu relu] + b_var``, ``Kdot = w_var E[relu' relu']``,
    ``Theta <- K + Theta * Kdot`` (``Theta0 = K0``).
    """
    a, b = x1.flatten(1), x2.flatten(1)
    d = a.shape[1]
    k12 = w_var * (a @ b.t()) / d + b_var
    k11 = w_var * (a * a).sum(1) / d + b_var
    k22 = w_var * (b * b).sum(1) / d + b_var
    theta = k12
    for _ in range(int(depth)):
        e1, e0 = _relu_expectations(k12, k11[:, None], k22[None, :])
        k12_next = w_var * e1 + b_var
        theta = k12_next + theta * (w_var * e0)
        k12 = k12_next
        k11 = w_var * k11 / 2 + b_var  # E[relu(u)^2] = k/2
        k22 = w_var * k22 / 2 + b_var
    return k12 if kind == "nngp" else theta


# -- random-feature kernels ---------------------------------------------------------------------
def fc_random_features(
    x: torch.Tensor,
    width: int,
    *,
    depth: int = 1,
    w_var: float = 2.0,
    b_var: float = 0.01,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``[n, width + 1]``: features of one random fc ReLU net of finite ``width`` whose inner
    products estimate :func:`fc_kernel` (``kind="nngp"``): ``sqrt(w_var / width) relu(h_L)`` and
    a constant ``sqrt(b_var)`` column (the readout bias)."""
    h = x.flatten(1)
    fan_in = h.shape[1]
    for _ in range(int(depth)):
        w = torch.randn(fan_in, width, generator=generator, dtype=h.dtype) * math.sqrt(
            w_var / fan_in
        )
        bias = torch.randn(width, generator=generator, dtype=h.dtype) * math.sqrt(b_var)
        h = torch.relu(h @ w.to(h.device) + bias.to(h.device))
        fan_in = width
    const = h.new_full((len(h), 1), math.sqrt(b_var))
    return torch.cat([h * math.sqrt(w_var / width), const], 1)


def embedding_features(
    embeds: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    x: torch.Tensor,
    chunk: int | None = None,
) -> torch.Tensor:
    """``[n, M * F]``: the embeddings of ``M`` random networks side by side, scaled by
    ``1 / sqrt(M F)``, so that ``phi(x) . phi(x')`` is the mean over the networks of
    ``e_m(x) . e_m(x') / F`` (the RFAD estimate). ``chunk`` images per forward pass."""
    step = len(x) if not chunk else int(chunk)
    blocks = []
    for start in range(0, len(x), step):
        xb = x[start : start + step]
        blocks.append(torch.cat([e(xb).flatten(1) for e in embeds], 1))
    phi = torch.cat(blocks)
    return phi / math.sqrt(phi.shape[1])


def chunked_kernel(
    kernel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x1: torch.Tensor,
    x2: torch.Tensor,
    chunk: int | None = None,
) -> torch.Tensor:
    """``kernel(x1, x2)`` assembled from blocks of ``chunk`` rows of ``x1``."""
    if not chunk or len(x1) <= chunk:
        return kernel(x1, x2)
    return torch.cat([kernel(x1[s : s + chunk], x2) for s in range(0, len(x1), int(chunk))])


# -- kernel ridge regression --------------------------------------------------------------------
def krr_predict(
    k_ss: torch.Tensor, k_ts: torch.Tensor, y_s: torch.Tensor, reg: float = 1e-6
) -> torch.Tensor:
    """``K_ts (K_ss + reg tr(K_ss)/n I)^-1 Y_s`` (one dense solve)."""
    n = k_ss.shape[0]
    ridge = float(reg) * torch.trace(k_ss) / n
    a = k_ss + ridge * torch.eye(n, dtype=k_ss.dtype, device=k_ss.device)
    return k_ts @ torch.linalg.solve(a, y_s)


def kip_loss(
    k_ss: torch.Tensor, k_ts: torch.Tensor, y_s: torch.Tensor, y_t: torch.Tensor, reg: float
) -> torch.Tensor:
    """``1/2 mean (pred - Y_t)^2`` with :func:`krr_predict`."""
    return 0.5 * ((krr_predict(k_ss, k_ts, y_s, reg) - y_t) ** 2).mean()


def kip_loss_from_features(
    phi_s: torch.Tensor, phi_t: torch.Tensor, y_s: torch.Tensor, y_t: torch.Tensor, reg: float
) -> torch.Tensor:
    """:func:`kip_loss` for an explicit feature kernel ``K = phi phi^T``."""
    return kip_loss(phi_s @ phi_s.t(), phi_t @ phi_s.t(), y_s, y_t, reg)


def one_hot_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """KRR targets: one-hot rows (float)."""
    return torch.nn.functional.one_hot(labels.long(), num_classes).float()
