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


def ftt_forward_flops(net, ranks: list[int] | None = None) -> int:
    """Forward FLOPs of one sample through :class:`~lightning_modules.tt.ftt.FunctionalTT`
    (at its own bond ranks, or at ``ranks``: e.g. the rank-``2r`` tangent of a Riemannian step).

    Per TT and spline site: ``2 s r r'`` to mix the ``s`` active slices into an ``r x r'`` matrix
    and ``2 r r'`` to apply it to the running interface vector; the output core costs
    ``J (2 r r' + 2 r')`` (one bilinear form per output).
    """
    s, ranks = net.x_basis.active, net.ranks if ranks is None else ranks
    flops = 0
    spline_inputs = net.dim + (1 if net.time_mode == "core" else 0)
    flops += spline_inputs * basis_flops(net.degree)
    if net.time_mode == "additive":
        flops += 4 * net.dim  # sin/cos and the addition
    for k, (kind, _) in enumerate(net.sites):
        r0, r1 = ranks[k], ranks[k + 1]
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


def _out_site(net) -> int | None:
    return next((k for k, (kind, _) in enumerate(net.sites) if kind == "out"), None)


def env_step_flops(net, k: int, left: bool, ranks=None) -> int:
    """Extending one sample's cached environment through site ``k`` (:mod:`.environments`):
    the slice matrix and a vector product, or ``M G Mᵀ`` on the output core's far side, or the
    ``J`` per-output vectors summed into a Gram at the output core."""
    ranks = ranks or net.ranks
    r0, r1, s, J = ranks[k], ranks[k + 1], net.x_basis.active, net.num_outputs
    out = _out_site(net)
    if net.sites[k][0] == "out":
        return J * (2 * r0 * r1 + 2 * r1 * r1 + 2 * r1)
    far = out is not None and (k > out if left else k < out)
    step = 2 * s * r0 * r1 + 2 * r0 * r1
    if far:
        step += 2 * r0 * r1 * (r0 + r1)
    return step


def _solve_flops(net, k: int, samples: int) -> int:
    """Normal equations from the environments and the Cholesky solve of core ``k``."""
    r0, n, r1 = net.ranks[k], net.mode_sizes[k], net.ranks[k + 1]
    s, J = net.x_basis.active, net.num_outputs
    if net.sites[k][0] == "out":  # one shared r0 r1 block, J right-hand sides
        block = r0 * r1
        per_sample = 2 * block * block + 2 * J * block
        solve = block**3 // 3 + 4 * J * block * block
    else:
        width = s * r0
        per_sample = width * width + 2 * width * width * r1 * r1 + 2 * s * r0 * r1
        unknowns = r0 * n * r1
        solve = unknowns**3 // 3 + 4 * unknowns * unknowns
    return net.num_tts * (samples * per_sample + solve)


def als_sweep_flops(net, samples: int) -> int:
    """One cached ALS sweep (``2K - 1`` core solves) on ``samples`` triples.

    Right environments of every core once (``K - 1`` LQ shifts and environment steps), then per
    solve the normal equations from the two environments (``(s r)² (1 + 2 r'²)`` per sample; at
    the output core one ``(r r')²`` block shared by the ``J`` outputs), Cholesky ``F³/3`` and the
    solves, and one shift plus one environment step as the centre moves: ``O(K)`` in all.
    """
    K, P = net.num_cores, net.num_tts
    total = 0
    for k in range(K - 1, 0, -1):  # centre to core 0, right environments
        total += _shift_flops(net, k - 1) + P * samples * env_step_flops(net, k, left=False)
    for k in range(K):
        total += _solve_flops(net, k, samples)
        if k < K - 1:
            total += _shift_flops(net, k) + P * samples * env_step_flops(net, k, left=True)
    for k in range(K - 1, 0, -1):
        total += _shift_flops(net, k - 1) + P * samples * env_step_flops(net, k, left=False)
        total += _solve_flops(net, k - 1, samples)
    return int(total)


def riemannian_step_flops(net, batch: int, trials: int = 1) -> int:
    """One Riemannian step on ``batch`` triples with ``trials`` retractions (1 + backtracks).

    Two orthogonalisations with their cached environments, the forward pass, the gradient of
    every core from its two environments (``2 s r r'`` per sample, ``2 J r r'`` at the output
    core), the tangent projection ``4 r n r'²`` per core, the line search (one forward pass of the
    rank-``2r`` tangent), and per trial the rounding of the rank-``2r`` TT (QR sweep plus truncated
    SVD sweep) and a forward pass.
    """
    s, K, P, J = net.x_basis.active, net.num_cores, net.num_tts, net.num_outputs
    total = 2 * sum(_shift_flops(net, k) for k in range(K - 1))
    total += P * batch * sum(env_step_flops(net, k, left=True) for k in range(K - 1))
    total += P * batch * sum(env_step_flops(net, k, left=False) for k in range(1, K))
    total += batch * ftt_forward_flops(net)
    for k in range(K):
        r0, n, r1 = net.ranks[k], net.mode_sizes[k], net.ranks[k + 1]
        width = J if net.sites[k][0] == "out" else s
        total += P * batch * 2 * width * r0 * r1
        total += P * 4 * r0 * n * r1 * r1
    doubled = [1] + [2 * r for r in net.ranks[1:-1]] + [1]
    total += batch * ftt_forward_flops(net, doubled)
    rounding = 0
    for k in range(K):
        r0, n, r1 = doubled[k], net.mode_sizes[k], doubled[k + 1]
        rounding += P * (qr_flops(r0, n * r1) + 2 * r0 * r0 * n * r1)
        rounding += P * (svd_flops(r0 * n, r1) + 2 * net.ranks[k + 1] * r1 * n)
    total += trials * (rounding + batch * ftt_forward_flops(net))
    return int(total)


def adam_step_flops(num_params: int, batch: int, forward_flops_per_sample: int) -> int:
    """One Adam step: forward + backward (twice the forward) on the batch, ~12 FLOPs a parameter."""
    return int(3 * batch * forward_flops_per_sample + 12 * num_params)
