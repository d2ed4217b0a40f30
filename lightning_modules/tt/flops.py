"""Analytic floating-point operation counts (a multiply-add is 2 FLOPs) for the FTT methods.

Autograd-based counters see matmuls but miss QR, SVD, Cholesky and triangular solves, which
dominate ALS and Riemannian steps, so every count here is written out from the algorithms in
:mod:`.ftt`, :mod:`.als` and :mod:`.riemannian`. Standard dense costs: QR of an ``a x b``
(``a >= b``) matrix ``4 a b² - 4/3 b³`` (Householder), thin SVD ``4 a b² + 8 b³`` (Golub-Van Loan),
Cholesky ``n³/3``, two triangular solves ``2 n²``.
"""

from __future__ import annotations


def basis_flops(degree: int) -> int:
    """One clamped input's active splines: the uniform Cox-de Boor recursion plus locating it."""
    s = degree + 1
    return 4 * s * s + 6


def ftt_forward_flops(net) -> int:
    """Forward FLOPs of one sample through :class:`~lightning_modules.tt.ftt.FunctionalTT`.

    Per TT and spline site: ``2 s r r'`` to mix the ``s`` active slices into an ``r x r'`` matrix
    and ``2 r r'`` to apply it to the running interface vector; the output core costs
    ``J (2 r r' + 2 r')`` (one bilinear form per output).
    """
    s = net.x_basis.active
    flops = 0
    spline_inputs = net.dim + (1 if net.time_mode == "core" else 0)
    flops += spline_inputs * basis_flops(net.degree)
    if net.time_mode == "additive":
        flops += 4 * net.dim  # sin/cos and the addition
    for k, (kind, _) in enumerate(net.sites):
        r0, r1 = net.ranks[k], net.ranks[k + 1]
        if kind == "out":
            flops += net.num_tts * net.num_outputs * (2 * r0 * r1 + 2 * r1)
        else:
            flops += net.num_tts * (2 * s * r0 * r1 + 2 * r0 * r1)
    return int(flops)


def qr_flops(rows: int, cols: int) -> int:
    """Householder QR of a ``rows x cols`` matrix (the thin factor of the smaller side)."""
    a, b = max(rows, cols), min(rows, cols)
    return int(4 * a * b * b - 4 * b**3 / 3)


def svd_flops(rows: int, cols: int) -> int:
    """Thin SVD of a ``rows x cols`` matrix (Golub-Van Loan: ``4 a b² + 8 b³``)."""
    a, b = max(rows, cols), min(rows, cols)
    return int(4 * a * b * b + 8 * b**3)


def _site_cost(net, k: int) -> int:
    """Per-sample, per-TT cost of passing an interface vector through site ``k``."""
    s = net.x_basis.active
    r0, r1 = net.ranks[k], net.ranks[k + 1]
    if net.sites[k][0] == "out":
        return net.num_outputs * 2 * r0 * r1
    return 2 * s * r0 * r1 + 2 * r0 * r1


def _shift_flops(net, k: int, ranks=None) -> int:
    """One orthogonality shift at core ``k``: QR of its unfolding and the R absorbed next door."""
    ranks = ranks or net.ranks
    r0, n, r1 = ranks[k], net.mode_sizes[k], ranks[k + 1]
    nxt = net.mode_sizes[k + 1] * ranks[k + 2] if k + 1 < net.num_cores else 1
    return net.num_tts * (qr_flops(r0 * n, r1) + 2 * r1 * r1 * nxt)


def interfaces_flops(net, samples: int) -> int:
    """Interfaces of one core for ``samples`` inputs: the chain through the other sites."""
    basis = (net.dim + (1 if net.time_mode == "core" else 0)) * basis_flops(net.degree)
    chain = sum(_site_cost(net, k) for k in range(net.num_cores)) * net.num_tts
    return samples * (basis + chain)


def als_sweep_flops(net, samples: int) -> int:
    """One ALS sweep (``2K - 1`` core solves) on ``samples`` triples.

    Per solve of core ``k`` (``F = r n r'`` unknowns per TT, ``J`` outputs per sample): the
    interfaces, the grouped normal equations ``2 (s r r')²`` per row, the right side
    ``2 s r r'`` per row, Cholesky ``F³/3`` and two triangular solves ``2 F²`` per TT, the
    residual ``2 F²``; plus one QR shift per solve and the initial orthogonalisation.
    """
    s = net.x_basis.active
    K = net.num_cores
    total = sum(_shift_flops(net, k) for k in range(K - 1))  # initial orthogonalisation
    for k in list(range(K)) + list(range(K - 2, -1, -1)):
        r0, n, r1 = net.ranks[k], net.mode_sizes[k], net.ranks[k + 1]
        width = 1 if net.sites[k][0] == "out" else s
        rows = samples * net.num_outputs
        feats = width * r0 * r1
        total += interfaces_flops(net, samples)
        total += net.num_tts * rows * (2 * feats * feats + 4 * feats)
        unknowns = r0 * n * r1
        total += net.num_tts * (unknowns**3 // 3 + 4 * unknowns * unknowns)
        total += _shift_flops(net, min(k, K - 2))
    return int(total)


def riemannian_step_flops(net, batch: int, trials: int = 1) -> int:
    """One Riemannian step on ``batch`` triples with ``trials`` retractions (1 + backtracks).

    Two orthogonalisations, the forward pass, the mixed-form gradient of every core (interfaces
    plus ``4 s r r'`` per row), the tangent projection ``4 r n r'²`` per core, and per trial the
    rounding of the rank-``2r`` TT (QR sweep plus truncated SVD sweep) and a forward pass.
    """
    s = net.x_basis.active
    K = net.num_cores
    total = 2 * sum(_shift_flops(net, k) for k in range(K - 1))
    total += batch * ftt_forward_flops(net)
    for k in range(K):
        r0, n, r1 = net.ranks[k], net.mode_sizes[k], net.ranks[k + 1]
        width = 1 if net.sites[k][0] == "out" else s
        total += interfaces_flops(net, batch)
        total += net.num_tts * batch * net.num_outputs * 4 * width * r0 * r1
        total += net.num_tts * 4 * r0 * n * r1 * r1
    doubled = [1] + [2 * r for r in net.ranks[1:-1]] + [1]
    rounding = 0
    for k in range(K):
        r0, n, r1 = doubled[k], net.mode_sizes[k], doubled[k + 1]
        rounding += net.num_tts * (qr_flops(r0, n * r1) + 2 * r0 * r0 * n * r1)
        rounding += net.num_tts * (svd_flops(r0 * n, r1) + 2 * net.ranks[k + 1] * r1 * n)
    total += trials * (rounding + batch * ftt_forward_flops(net))
    return int(total)


def adam_step_flops(num_params: int, batch: int, forward_flops_per_sample: int) -> int:
    """One Adam step: forward + backward (twice the forward) on the batch, ~12 FLOPs a parameter."""
    return int(3 * batch * forward_flops_per_sample + 12 * num_params)
