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
    s = net.degree + 1
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
