"""Tensor-train algebra shared by ALS and Riemannian optimisation (plain torch).

Every function works on a list of cores ``[P, r_{k-1}, n_k, r_k]``: ``P`` independent TTs of the
same shape, processed as a batch (the per-coordinate FTT has one TT per output coordinate).
Left unfolding of a core: ``[P, r_{k-1} n_k, r_k]``; right unfolding: ``[P, r_{k-1}, n_k r_k]``.
A core is left-orthogonal when its left unfolding has orthonormal columns, right-orthogonal when
its right unfolding has orthonormal rows.
"""

from __future__ import annotations

import torch

from lightning_modules.errors import UserError
from lightning_modules.tt.interfaces import CoreInterfaces

Cores = list[torch.Tensor]

# a factor carried between cores whose norm leaves [e^-8, e^8] is moved into the core it came
# from (see round_tt): long trains stay in range, short ones keep the plain orthonormal gauge
CARRY_DRIFT = 8.0


def _carry_scale(factor: torch.Tensor) -> torch.Tensor:
    """``[P]`` scalars that bring each TT's carried ``factor`` back to norm 1 when it drifted."""
    norm = torch.linalg.matrix_norm(factor).clamp_min(torch.finfo(factor.dtype).tiny)
    return torch.where(norm.log().abs() > CARRY_DRIFT, norm, torch.ones_like(norm))


# ------------------------------------------------------------------------------ orthogonality
def shift_right(cores: Cores, k: int) -> None:
    """QR core ``k``'s left unfolding in place: core ``k`` left-orthogonal, R into core ``k+1``."""
    P, r0, n, r1 = cores[k].shape
    q, r = torch.linalg.qr(cores[k].reshape(P, r0 * n, r1))
    cores[k] = q.reshape(P, r0, n, q.shape[-1])
    cores[k + 1] = torch.einsum("pab,pbic->paic", r, cores[k + 1])


def shift_left(cores: Cores, k: int) -> None:
    """LQ core ``k``'s right unfolding in place: core ``k`` right-orthogonal, L into ``k-1``."""
    P, r0, n, r1 = cores[k].shape
    q, r = torch.linalg.qr(cores[k].reshape(P, r0, n * r1).transpose(1, 2))
    cores[k] = q.transpose(1, 2).reshape(P, q.shape[-1], n, r1)
    cores[k - 1] = torch.einsum("paib,pcb->paic", cores[k - 1], r)


def orthogonalize(cores: Cores, center: int) -> Cores:
    """A copy in mixed canonical form: left of ``center`` left-, right of it right-orthogonal."""
    cores = list(cores)
    for k in range(center):
        shift_right(cores, k)
    for k in range(len(cores) - 1, center, -1):
        shift_left(cores, k)
    return cores


def is_left_orthogonal(core: torch.Tensor, tol: float = 1e-8) -> bool:
    P, r0, n, r1 = core.shape
    m = core.reshape(P, r0 * n, r1)
    eye = torch.eye(r1, dtype=core.dtype, device=core.device)
    return bool((m.transpose(1, 2) @ m - eye).abs().max() < tol)


def is_right_orthogonal(core: torch.Tensor, tol: float = 1e-8) -> bool:
    P, r0, n, r1 = core.shape
    m = core.reshape(P, r0, n * r1)
    eye = torch.eye(r0, dtype=core.dtype, device=core.device)
    return bool((m @ m.transpose(1, 2) - eye).abs().max() < tol)


# ------------------------------------------------------------------------------------ rounding
def round_tt(cores: Cores, rank: int) -> tuple[Cores, list[torch.Tensor]]:
    """TT-SVD rounding to bond ranks ``min(rank, what the modes allow)``.

    Right-orthogonalise, then sweep left to right with truncated SVDs. Returns the cores (all but
    the last left-orthogonal up to a positive scalar) and the singular values kept at each bond
    (``[P, r_k]``, relative to the weight carried there). A carried factor that leaves
    ``[e^-8, e^8]`` in norm is divided out and its norm left in the core it came from, so trains
    of thousands of cores neither overflow nor underflow; short trains are never rescaled.
    """
    cores = list(cores)
    for k in range(len(cores) - 1, 0, -1):
        P, r0, n, r1 = cores[k].shape
        q, r = torch.linalg.qr(cores[k].reshape(P, r0, n * r1).transpose(1, 2))
        c = _carry_scale(r)
        cores[k] = (q.transpose(1, 2) * c[:, None, None]).reshape(P, q.shape[-1], n, r1)
        cores[k - 1] = torch.einsum("paib,pcb->paic", cores[k - 1], r / c[:, None, None])
    kept = []
    for k in range(len(cores) - 1):
        P, r0, n, r1 = cores[k].shape
        u, s, vh = torch.linalg.svd(cores[k].reshape(P, r0 * n, r1), full_matrices=False)
        r = min(rank, s.shape[-1])
        c = _carry_scale(torch.diag_embed(s[:, :r]))
        cores[k] = (u[..., :r] * c[:, None, None]).reshape(P, r0, n, r)
        s = s[:, :r] / c[:, None]
        cores[k + 1] = torch.einsum("pa,pab,pbic->paic", s, vh[:, :r], cores[k + 1])
        kept.append(s)
    return cores, kept


def bond_singular_values(cores: Cores) -> list[torch.Tensor]:
    """Singular values ``[P, r_k]`` of every bond's unfolding (the TT's numerical ranks)."""
    _, kept = round_tt(cores, rank=max(c.shape[-1] for c in cores) + max(c.shape[1] for c in cores))
    return kept


def full_tensor(cores: Cores) -> torch.Tensor:
    """The dense tensor ``[P, n_1, ..., n_K]`` (tests only: exponential in ``K``)."""
    out = cores[0][:, 0]  # [P, n_1, r_1]
    for core in cores[1:]:
        out = torch.einsum("p...a,paib->p...ib", out, core)
    return out[..., 0]


def tt_inner(a: Cores, b: Cores) -> torch.Tensor:
    """``<A, B>`` per TT (``[P]``) without forming either tensor."""
    state = torch.ones(a[0].shape[0], 1, 1, dtype=a[0].dtype, device=a[0].device)
    for ca, cb in zip(a, b):
        state = torch.einsum("pxy,pxia,pyib->pab", state, ca, cb)
    return state[:, 0, 0]


# ----------------------------------------------------------------- gradients, normal equations
def core_gradient(iface: CoreInterfaces, weights: torch.Tensor, mode_size: int) -> torch.Tensor:
    """``Σ_{n,j} weights[p,n,j] · left ⊗ φ ⊗ right``: the gradient of ``Σ weights · y`` in core k.

    Args:
        iface: the interfaces of core ``k`` for a batch.
        weights: ``[P, N, J]`` (e.g. ``dLoss/dy``, or the targets for a least-squares right side).
        mode_size: ``n_k``.

    Returns:
        ``[P, r_{k-1}, n_k, r_k]``.
    """
    left, right = iface.left, iface.right
    P, N, J, r0 = left.shape
    r1 = right.shape[-1]
    outer = (weights[..., None, None] * left[..., :, None] * right[..., None, :]).reshape(
        P, -1, r0 * r1
    )
    values = iface.values.expand(N, J, -1).reshape(N * J, -1)
    index = iface.index.expand(N, J, -1).reshape(N * J, -1)
    grad = torch.zeros(P, mode_size, r0 * r1, dtype=left.dtype, device=left.device)
    for s in range(values.shape[1]):
        grad.index_add_(1, index[:, s], values[:, s, None] * outer)
    return grad.reshape(P, mode_size, r0, r1).permute(0, 2, 1, 3)


def gram_blocks(iface: CoreInterfaces, mode_size: int, out: torch.Tensor | None = None):
    """Per-group blocks of ``Σ_rows z zᵀ`` (``z = vec(left ⊗ φ ⊗ right)``): ``[P, n, F, F]``.

    A row touches only its ``s`` active basis functions, so rows are grouped by their first active
    index ``c`` and group ``c`` adds one dense block over features ``(s, a, b)`` (``F = s r r'``):
    ``O(N s² r² r'²)`` instead of the ``O(N n² r² r'²)`` of dense features. With ``out`` given,
    adds into it, so chunks of samples accumulate cheaply; :func:`assemble_gram` then places the
    blocks into the full matrix once.
    """
    left, right = iface.left, iface.right
    P, N, J, r0 = left.shape
    r1 = right.shape[-1]
    values = iface.values.expand(N, J, -1).reshape(N * J, -1)
    index = iface.index.expand(N, J, -1).reshape(N * J, -1)
    s = values.shape[1]
    local = values[None, :, :, None, None] * (left[..., :, None] * right[..., None, :]).reshape(
        P, N * J, 1, r0, r1
    )  # [P, rows, s, r0, r1]
    first = index[:, 0]
    order = torch.argsort(first, stable=True)
    counts = torch.bincount(first, minlength=mode_size).tolist()
    local = local[:, order].reshape(P, N * J, s * r0 * r1)
    if out is None:
        out = local.new_zeros(P, mode_size, s * r0 * r1, s * r0 * r1)
    for c, block in enumerate(torch.split(local, counts, dim=1)):
        if block.shape[1]:
            out[:, c] += torch.einsum("pnx,pny->pxy", block, block)
    return out


def assemble_gram(blocks: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """The full ``[P, F, F]`` normal matrix in core order ``(a, i, b)`` from :func:`gram_blocks`."""
    P, n, width = blocks.shape[0], blocks.shape[1], blocks.shape[2] // (r0 * r1)
    size = r0 * n * r1
    out = blocks.new_zeros(P, size, size)
    a = torch.arange(r0, device=blocks.device)[None, :, None]
    b = torch.arange(r1, device=blocks.device)[None, None, :]
    offsets = torch.arange(width, device=blocks.device)[:, None, None]
    # group c uses basis functions c .. c+s-1 (the output core: s = 1, c = j); groups past
    # n - s are empty (a spline's first active index is at most n - s)
    for c in range(n - width + 1):
        position = ((a * n + (c + offsets)) * r1 + b).reshape(-1)
        out[:, position[:, None], position[None, :]] += blocks[:, c]
    return out


def gram(iface: CoreInterfaces, mode_size: int) -> torch.Tensor:
    """``Σ_rows z zᵀ`` in core order ``(a, i, b)``: ``[P, F, F]`` (one chunk)."""
    r0, r1 = iface.left.shape[-1], iface.right.shape[-1]
    return assemble_gram(gram_blocks(iface, mode_size), r0, r1)


def solve_ridge(
    lhs: torch.Tensor,
    rhs: torch.Tensor,
    ridge: float,
    *,
    what: str = "ALS",
    cond_limit: float = 1e12,
    rows: float | None = None,
) -> torch.Tensor:
    """Solve ``(lhs + ridge · mean(diag(lhs)) I) g = rhs`` per TT by Cholesky (float64).

    The ridge is relative to the mean eigenvalue of ``lhs`` (its mean diagonal), so one value
    suits any rank, basis size or data scale. ``rhs`` is ``[P, F]`` or, for several right-hand
    sides sharing ``lhs`` (the output core), ``[P, F, J]``.

    Raises:
        UserError: naming the cause: the normal equations are not finite (the partial products
            overflowed, or the data is not finite), all zero (they underflowed), fewer rows than
            unknowns (``rows``), or singular / ill-conditioned otherwise (a redundant basis or
            basis functions that too few samples reach; a ridge or more samples fix it).
    """
    lhs = lhs.to(torch.float64)
    unknowns = lhs.shape[-1]
    if not (torch.isfinite(lhs).all() and torch.isfinite(rhs).all()):
        raise UserError(
            f"{what}: the normal equations are not finite: the train's partial products "
            "overflowed or the data has NaN/inf values; check the data and the FTT's scale"
        )
    diag = torch.diagonal(lhs, dim1=-2, dim2=-1)
    if bool((diag.max(-1).values <= torch.finfo(lhs.dtype).tiny).any()):
        raise UserError(
            f"{what}: the interfaces of this core are zero for every sample (the partial "
            "products underflowed or the other cores are zero); this is not a sample-count problem"
        )
    eye = torch.eye(unknowns, dtype=lhs.dtype, device=lhs.device)
    scale = diag.mean(-1).clamp_min(torch.finfo(lhs.dtype).tiny)
    system = lhs + ridge * scale[:, None, None] * eye
    chol, info = torch.linalg.cholesky_ex(system)
    cdiag = torch.diagonal(chol, dim1=-2, dim2=-1)
    few = "" if rows is None or rows >= unknowns else f" ({rows:g} rows for {unknowns} unknowns)"
    if bool((info > 0).any()) or not torch.isfinite(cdiag).all():
        raise UserError(
            f"{what}: the least-squares system is singular{few} (als.ridge={ridge:g}): some basis "
            "functions see too few samples or the basis is redundant; set als.ridge to a positive "
            "value such as 1e-6, or draw more samples (als.samples)"
        )
    cond = float(((cdiag.max(-1).values / cdiag.min(-1).values) ** 2).max())
    if cond > cond_limit:
        raise UserError(
            f"{what}: the least-squares system is ill-conditioned (condition ~{cond:.1e} with "
            f"als.ridge={ridge:g}){few}; raise als.ridge (e.g. 1e-6) or draw more samples "
            "(als.samples)"
        )
    rhs = rhs.to(torch.float64)
    if rhs.dim() == lhs.dim():
        return torch.cholesky_solve(rhs, chol)
    return torch.cholesky_solve(rhs[..., None], chol)[..., 0]


def check_ranks(mode_sizes: list[int], ranks: list[int], what: str = "rank") -> None:
    """UserError if a bond rank exceeds what the modes on either side of it can carry."""
    left = 1
    right = [1] * (len(mode_sizes) + 1)
    for k in range(len(mode_sizes) - 1, -1, -1):
        right[k] = min(right[k + 1] * mode_sizes[k], 1 << 62)
    for k in range(1, len(mode_sizes)):
        left = min(left * mode_sizes[k - 1], 1 << 62)
        cap = min(left, right[k])
        if ranks[k] > cap:
            raise UserError(
                f"{what}={ranks[k]} is larger than the TT allows at bond {k} (at most {cap}: the "
                f"product of the mode sizes on its smaller side); lower {what} or raise "
                "eps_net.num_basis"
            )
