"""Cached partial products ("environments") of an FTT sweep, normalised per sample (plain torch).

A sweep (ALS, DMRG) or a Riemannian gradient visits the cores in order. Recomputing every core's
interfaces from scratch costs ``O(K)`` per core, ``O(K²)`` per sweep; here the product of the
sites left of a bond (its *left environment*) and right of it (*right environment*) is kept per
chunk of samples and extended by one site as the sweep moves, so a sweep costs ``O(K)``.

An environment at bond ``b`` for a chunk of ``N`` samples is one of

* ``vec [P, N, r_b]``: the J-free product of the sites on its side (no output core there);
* ``gram [P, N, r_b, r_b]`` and ``cross [P, N, r_b]``: the output core is on its side, so the
  product ``u_j`` depends on the output ``j``; only ``Σ_j u_j u_jᵀ`` (the normal equations) and
  ``Σ_j w_j u_j`` (right-hand side or gradient, ``w`` = targets or ``dLoss/dy``) are kept: one
  ``r × r`` matrix per sample instead of ``J`` vectors, shared by all ``J = D`` outputs;

each normalised per sample with the scale in ``log [P, N]`` (float64): the true vector is
``exp(log) vec``, the true Gram ``exp(2 log) gram``, the true cross ``exp(log) cross``. Thousands of
cores then neither underflow nor overflow.

Memory of a full set of environments (one per bond and chunk; float64):
``8 · samples · (K + 1) · P · r · (1 + r)`` bytes at most (``r + r²`` per sample for a gram
environment, ``r`` for a vector one; ``P`` = 1 with an output core), plus one chunk's transient
normal-equation terms ``8 · batch · P · (s r)² `` bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Basis = tuple[torch.Tensor, torch.Tensor] | None


@dataclass
class Env:
    """A normalised partial product at one bond for one chunk (see the module docstring)."""

    log: torch.Tensor  # [P, N] float64
    vec: torch.Tensor | None = None  # [P, N, r]
    gram: torch.Tensor | None = None  # [P, N, r, r]
    cross: torch.Tensor | None = None  # [P, N, r]


@dataclass
class Chunk:
    """One chunk of samples: the sites' active basis values and the per-output weights."""

    bases: list[Basis]  # per site ([N, s], [N, s]) or None (output core)
    weights: torch.Tensor  # [P, N, J] float64: targets (ALS) or dLoss/dy (Riemannian)


def boundary(P: int, N: int, dtype: torch.dtype, device) -> Env:
    """The empty product at either end of the train: ones ``[P, N, 1]``."""
    return Env(
        log=torch.zeros(P, N, dtype=torch.float64, device=device),
        vec=torch.ones(P, N, 1, dtype=dtype, device=device),
    )


def slice_matrices(core: torch.Tensor, basis: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``Σ_s values[n, s] G[:, :, index[n, s], :]``: ``[P, N, r, r']``."""
    values, index = basis
    slices = core.permute(0, 2, 1, 3)[:, index]  # [P, N, s, r, r']
    return torch.einsum("ns,pnsab->pnab", values, slices)


def _normalise(env: Env) -> Env:
    if env.vec is not None:
        ref = env.vec
    elif env.gram is not None:
        ref = torch.diagonal(env.gram, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    else:
        ref = env.cross
    scale = ref.abs().amax(-1)  # [P, N]; an exact zero stays zero with its log unchanged
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    env.log = env.log + scale.to(torch.float64).log()
    if env.vec is not None:
        env.vec = env.vec / scale[..., None]
    if env.gram is not None:
        env.gram = env.gram / (scale**2)[..., None, None]
    if env.cross is not None:
        env.cross = env.cross / scale[..., None]
    return env


def extend(env: Env, core: torch.Tensor, basis: Basis, weights, *, left: bool, gram: bool) -> Env:
    """The environment one site further: through ``core`` from the left (``left=True``: bond k →
    k+1) or from the right (bond k+1 → k). ``gram`` keeps ``Σ_j u u^T`` past the output core
    (ALS); without it only the cross term (the Riemannian gradient) is carried."""
    if basis is None:  # the output core: J-free vector → per-output vectors, summed over j
        w = torch.einsum(
            "pna,pajb->pnjb" if left else "pnb,pajb->pnja", env.vec, core
        )  # [P, N, J, r']
        out = Env(log=env.log, cross=torch.einsum("pnj,pnjb->pnb", weights.to(w.dtype), w))
        if gram:
            out.gram = torch.einsum("pnja,pnjb->pnab", w, w)
        return _normalise(out)
    m = slice_matrices(core, basis)  # [P, N, r0, r1]
    if not left:
        m = m.transpose(-1, -2)  # act on the right bond's side
    out = Env(log=env.log)
    if env.vec is not None:
        out.vec = torch.einsum("pna,pnab->pnb", env.vec, m)
    if env.cross is not None:
        out.cross = torch.einsum("pna,pnab->pnb", env.cross, m)
    if env.gram is not None:
        out.gram = torch.einsum("pnab,pnac,pnbd->pncd", env.gram, m, m)
    return _normalise(out)


def _row_cross(left: Env, right: Env, weights: torch.Tensor) -> torch.Tensor:
    """``H [P, N, r0, r1]`` with ``Σ_j w_j z_j = exp(log) φ ⊗ H`` per sample (the side without a
    ``vec`` carries the output index; at most one side does)."""
    if left.vec is not None and right.vec is not None:  # J = 1
        return weights[..., 0, None, None] * left.vec[..., :, None] * right.vec[..., None, :]
    if right.vec is None:
        return left.vec[..., :, None] * right.cross[..., None, :]
    return left.cross[..., :, None] * right.vec[..., None, :]


def _row_grams(left: Env, right: Env) -> tuple[torch.Tensor, torch.Tensor]:
    """``(GL [P,N,r0,r0], GR [P,N,r1,r1])`` with ``Σ_j z zᵀ = exp(2 log) φφᵀ ⊗ GL ⊗ GR``."""
    gl = left.gram if left.vec is None else left.vec[..., :, None] * left.vec[..., None, :]
    gr = right.gram if right.vec is None else right.vec[..., :, None] * right.vec[..., None, :]
    return gl, gr


def basis_rhs(left: Env, right: Env, values, index, weights, shape) -> torch.Tensor:
    """``Σ_{n,j} w[p,n,j] · left ⊗ φ ⊗ right`` for a basis ``(values [N, s], index [N, s])`` of
    ``shape[2]`` functions: ``[P, r0, n, r1]``."""
    P, r0, n, r1 = shape
    scale = (left.log + right.log).exp()
    h = _row_cross(left, right, weights)
    h = (h * scale[..., None, None].to(h.dtype)).reshape(P, -1, r0 * r1)
    out = torch.zeros(P, n, r0 * r1, dtype=h.dtype, device=h.device)
    for s in range(values.shape[1]):
        out.index_add_(1, index[:, s], values[None, :, s, None] * h)
    return out.reshape(P, n, r0, r1).permute(0, 2, 1, 3)


def site_rhs(left: Env, right: Env, chunk: Chunk, k: int, shape) -> torch.Tensor:
    """``Σ_{n,j} w[p,n,j] · left ⊗ φ_k ⊗ right``: ``[P, r0, n_k, r1]`` (the ALS right-hand side with
    targets, the Euclidean gradient in core ``k`` with ``dLoss/dy``)."""
    basis = chunk.bases[k]
    if basis is None:  # output core: one slice per output
        z = (left.log + right.log).exp()[..., None, None] * (
            left.vec[..., :, None] * right.vec[..., None, :]
        )
        return torch.einsum("pnj,pnab->pajb", chunk.weights.to(z.dtype), z)
    return basis_rhs(left, right, *basis, chunk.weights, shape)


def grouped_gram(left: Env, right: Env, values, group, num_groups: int, out=None):
    """``Σ_{n in group g} z zᵀ`` over the features ``(s, a, b)`` of the active basis functions:
    ``[P, num_groups, s r0 r1, s r0 r1]`` added into ``out``; rows sharing their active indices
    share one block. Cost ``O(N (s r0)² r1²)`` (one GEMM per group)."""
    gl, gr = _row_grams(left, right)
    P, r0, r1, s = gl.shape[0], gl.shape[-1], gr.shape[-1], values.shape[1]
    gl = gl * (left.log + right.log).mul(2).exp()[..., None, None].to(gl.dtype)
    outer = torch.einsum("ns,nt,pnac->pnsatc", values, values, gl).reshape(P, -1, (s * r0) ** 2)
    gr = gr.reshape(P, -1, r1 * r1)
    order = torch.argsort(group, stable=True)
    counts = torch.bincount(group, minlength=num_groups).tolist()
    if out is None:
        out = gl.new_zeros(P, num_groups, s * r0 * r1, s * r0 * r1)
    start = 0
    for c, count in enumerate(counts):
        if count:
            rows = order[start : start + count]
            block = outer[:, rows].transpose(1, 2) @ gr[:, rows]  # [P, (s a t c), (b d)]
            block = block.reshape(P, s, r0, s, r0, r1, r1).permute(0, 1, 2, 5, 3, 4, 6)
            out[:, c] += block.reshape(P, s * r0 * r1, s * r0 * r1)
        start += count
    return out


def site_gram_blocks(left: Env, right: Env, chunk: Chunk, k: int, shape, out=None):
    """Blocks of ``Σ z zᵀ`` grouped by first active index (as :func:`~.algebra.gram_blocks`):
    ``[P, n_k, s r0 r1, s r0 r1]`` added into ``out``."""
    values, index = chunk.bases[k]
    return grouped_gram(left, right, values, index[:, 0], shape[2], out)


def output_gram(left: Env, right: Env) -> torch.Tensor:
    """``Σ_n (l lᵀ) ⊗ (r rᵀ)`` at the output core: ``[P, r0 r1, r0 r1]``, the one block that every
    output's slice shares (the normal matrix is block-diagonal over the outputs)."""
    z = (left.log + right.log).exp()[..., None, None] * (
        left.vec[..., :, None] * right.vec[..., None, :]
    )
    z = z.flatten(2)
    return z.transpose(1, 2) @ z
