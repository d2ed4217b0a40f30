"""DMRG (two-site ALS) for the FTT noise model, with bond ranks that adapt (plain torch).

With all cores but ``G_k`` and ``G_{k+1}`` fixed, the model is linear in their merged supercore
``W[a, i, j, b] = Σ_c G_k[a, i, c] G_{k+1}[c, j, b]`` (``[r_{k-1}, n_k, n_{k+1}, r_{k+1}]``):
the two sites act as one *virtual site* whose basis is the product ``φ_i(u_k) φ_j(u_{k+1})``.
A step solves the same ridge least squares as ALS (:mod:`.als`) for ``W`` in float64, with the
normal equations summed over chunks and over DDP ranks (``reduce_sum``), then splits ``W`` back
by a truncated SVD of its ``[r_{k-1} n_k, n_{k+1} r_{k+1}]`` unfolding: the kept rank is the
smallest whose discarded singular values have a norm ``<= tol · ||W||`` (the largest over the
``P`` stacked TTs), capped at ``max_rank``. So a bond grows where the data asks for it and shrinks
where it does not. A sweep visits the pairs ``(0,1) .. (K-2,K-1)`` left to right, moving the
orthogonality centre with the SVD, then back ``(K-3,K-2) .. (0,1)``.

Because the current cores are one point of each merged problem, an exact solve cannot raise the
(ridge-regularised) loss on the sweep's samples; the truncation can. So after the split the core
holding the weight is refitted by the one-site (ALS) solve, and if the pair still fits the
sweep's samples worse than before, the old pair is kept: a sweep never raises the loss on its
samples (once every bond is within ``max_rank``; a wider starting bond is cut regardless).
(The SVD truncates in coefficient norm, not in the data's norm: poorly sampled coefficients
can dominate it, which is why ``dmrg.ridge`` defaults higher than ``als.ridge``.)

Cost per pair: a normal matrix of ``F = r_{k-1} n_k n_{k+1} r_{k+1}`` unknowns per TT (``F²``
memory, ``F³/3`` to factor): fine for the 2-D/3-D toy problems; refused above ``max_unknowns``.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules.errors import UserError
from lightning_modules.tt.algebra import orthogonalize, shift_left, shift_right, solve_ridge
from lightning_modules.tt.als import ALS, Triple, _identity
from lightning_modules.tt.ftt import FunctionalTT


def pair_features(net: FunctionalTT, k: int, x_t, t, cores):
    """``(left [P,N,J,r0], values [N,J,s], index [N,J,s], right [P,N,J,r1])`` of sites k, k+1
    merged: ``values``/``index`` are the products/flat indices ``i n_{k+1} + j`` of their bases."""
    N, J = x_t.shape[0], net.num_outputs
    bases = net.site_basis(x_t, t, cores[0].dtype)
    left = net._left_vectors(cores, bases, k, N)
    right = net._right_vectors(cores, bases, k + 2, N)
    sites = []
    for site in (k, k + 1):
        if bases[site] is None:  # output core: slice j for output j
            values = torch.ones(N, J, 1, dtype=left.dtype, device=left.device)
            index = torch.arange(J, device=left.device)[None, :, None].expand(N, J, 1)
        else:
            values, index = bases[site][0][:, None, :], bases[site][1][:, None, :]
        sites.append((values.expand(N, J, -1), index.expand(N, J, -1)))
    (v1, i1), (v2, i2) = sites
    values = (v1[..., :, None] * v2[..., None, :]).reshape(N, J, -1)
    index = (i1[..., :, None] * net.mode_sizes[k + 1] + i2[..., None, :]).reshape(N, J, -1)
    shape = (net.num_tts, N, J, -1)
    return left.expand(*shape), values, index, right.expand(*shape)


def accumulate_normal_equations(left, values, index, right, target, mode_size, lhs, rhs):
    """Add ``Σ z zᵀ`` to ``lhs [P, F, F]`` and ``Σ z y`` to ``rhs [P, F]`` in core order (a, i, b).

    Rows with the same active indices share one dense block over their ``s r0 r1`` features, so
    the cost is ``O(rows (s r0 r1)²)`` plus one scatter per distinct index pattern.
    """
    P, N, J, r0 = left.shape
    r1 = right.shape[-1]
    rows = N * J
    values, index = values.reshape(rows, -1), index.reshape(rows, -1)
    local = values[None, :, :, None, None] * (left[..., :, None] * right[..., None, :]).reshape(
        P, rows, 1, r0, r1
    )
    local = local.reshape(P, rows, -1)
    y = target.reshape(P, rows)
    patterns, group = torch.unique(index, dim=0, return_inverse=True)
    order = torch.argsort(group, stable=True)
    counts = torch.bincount(group, minlength=len(patterns)).tolist()
    a = torch.arange(r0, device=left.device)[None, :, None]
    b = torch.arange(r1, device=left.device)[None, None, :]
    for pattern, rows_of in zip(patterns, torch.split(order, counts)):
        block = local[:, rows_of]  # [P, n, s r0 r1]
        position = ((a * mode_size + pattern[:, None, None]) * r1 + b).reshape(-1)
        lhs[:, position[:, None], position[None, :]] += torch.einsum("pnx,pny->pxy", block, block)
        rhs[:, position] += torch.einsum("pnx,pn->px", block, y[:, rows_of])


class DMRG(ALS):
    """Two-site sweeps for a :class:`FunctionalTT`; the ranks of ``net`` change in place.

    Args (beside :class:`~.als.ALS`'s ``ridge, sweeps, samples, batch, fixed``):
        max_rank: the largest bond rank kept (``dmrg.max_rank``).
        tol: relative truncation tolerance of the split (``dmrg.tol``).
        max_unknowns: refuse a pair whose merged core has more unknowns per TT than this.
    """

    def __init__(
        self,
        net: FunctionalTT,
        *,
        ridge: float,
        sweeps: int,
        samples: int,
        batch: int,
        fixed: bool,
        max_rank: int,
        tol: float,
        max_unknowns: int,
    ):
        super().__init__(net, ridge=ridge, sweeps=sweeps, samples=samples, batch=batch, fixed=fixed)
        if max_rank < 1 or tol < 0:
            raise UserError(f"dmrg.max_rank={max_rank}, dmrg.tol={tol}: need >= 1 and >= 0")
        self.max_rank, self.tol, self.max_unknowns = int(max_rank), float(tol), int(max_unknowns)

    def solve_pair(self, cores, k: int, chunks: list[Triple], reduce_sum) -> torch.Tensor:
        """The ridge least-squares supercore ``[P, r0, n_k, n_{k+1}, r1]`` of sites k, k+1."""
        net = self.net
        P, r0, r1 = net.num_tts, cores[k].shape[1], cores[k + 1].shape[3]
        n1, n2 = net.mode_sizes[k], net.mode_sizes[k + 1]
        size = r0 * n1 * n2 * r1
        if size > self.max_unknowns:
            raise UserError(
                f"DMRG: the merged cores {k}, {k + 1} have {size:,} unknowns per TT (> "
                f"{self.max_unknowns:,}); lower dmrg.max_rank or eps_net.num_basis"
            )
        lhs = torch.zeros(P, size, size, dtype=torch.float64, device=cores[0].device)
        rhs = torch.zeros(P, size, dtype=torch.float64, device=cores[0].device)
        rows = 0
        for x_t, t, eps in chunks:
            left, values, index, right = pair_features(net, k, x_t, t, cores)
            target = net.from_data_layout(eps.to(torch.float64))
            accumulate_normal_equations(left, values, index, right, target, n1 * n2, lhs, rhs)
            rows += target.shape[1] * target.shape[2]
        lhs, rhs = reduce_sum(lhs), reduce_sum(rhs)
        rows = float(reduce_sum(torch.tensor(float(rows), dtype=torch.float64, device=lhs.device)))
        solution = solve_ridge(lhs / rows, rhs / rows, self.ridge, what=f"DMRG cores {k}, {k + 1}")
        return solution.reshape(P, r0, n1, n2, r1)

    def kept_rank(self, singular: torch.Tensor) -> int:
        """Smallest rank whose discarded tail is ``<= tol`` of the norm, for every TT; capped."""
        tail = torch.flip(torch.cumsum(torch.flip(singular**2, [-1]), -1), [-1])  # Σ_{i>=r} s_i²
        total = tail[:, :1]
        ok = tail <= (self.tol**2) * total  # ok[:, r]: dropping r.. is allowed
        need = [int(torch.nonzero(row).min()) if row.any() else row.numel() for row in ok]
        return max(1, min(self.max_rank, max(need), singular.shape[-1]))

    def split(self, cores, k: int, supercore: torch.Tensor, centre_right: bool) -> int:
        """Truncated SVD of the supercore back into cores k, k+1; the kept rank."""
        P, r0, n1, n2, r1 = supercore.shape
        u, s, vh = torch.linalg.svd(supercore.reshape(P, r0 * n1, n2 * r1), full_matrices=False)
        r = self.kept_rank(s)
        u, s, vh = u[..., :r], s[..., :r], vh[:, :r]
        if centre_right:  # k left-orthogonal, the weight moves right
            cores[k], cores[k + 1] = u, s[..., :, None] * vh
        else:  # k+1 right-orthogonal, the weight stays left
            cores[k], cores[k + 1] = u * s[:, None, :], vh
        cores[k] = cores[k].reshape(P, r0, n1, r)
        cores[k + 1] = cores[k + 1].reshape(P, r, n2, r1)
        return r

    def update_pair(self, cores, k, chunks, reduce_sum, loss: float, centre_right: bool) -> float:
        """Solve, split and refit the centre core of pair k, k+1; keep the old pair (re-gauged)
        when the truncated result fits the samples worse than it did. Returns the loss."""
        old = cores[k].clone(), cores[k + 1].clone()
        self.split(cores, k, self.solve_pair(cores, k, chunks, reduce_sum), centre_right)
        centre = k + 1 if centre_right else k
        new_loss = self.solve_core(cores, centre, chunks, reduce_sum)
        if new_loss <= loss or old[0].shape[3] > self.max_rank:  # the old bond is too wide
            return new_loss
        cores[k], cores[k + 1] = old
        if centre_right:
            shift_right(cores, k)
        else:
            shift_left(cores, k + 1)
        return loss

    def sweep(self, chunks: list[Triple], reduce_sum=_identity) -> float:
        """Pairs left to right, then back; writes the new cores (and ranks) into the net."""
        net = self.net
        K = net.num_cores
        if K < 2:
            raise UserError("DMRG needs at least two cores; use ddpm.optimizer=als")
        cores = orthogonalize([c.detach().to(torch.float64) for c in net.cores], center=0)
        loss = self.loss(chunks, reduce_sum, cores)
        for k in range(K - 1):
            loss = self.update_pair(cores, k, chunks, reduce_sum, loss, centre_right=True)
        if K > 2:
            shift_left(cores, K - 1)
        for k in range(K - 3, -1, -1):
            loss = self.update_pair(cores, k, chunks, reduce_sum, loss, centre_right=False)
        self.write_back(cores)
        self.sweeps_done += 1
        return loss

    def write_back(self, cores) -> None:
        net = self.net
        dtype, device = net.cores[0].dtype, net.cores[0].device
        with torch.no_grad():
            net.cores = nn.ParameterList(
                nn.Parameter(c.to(dtype=dtype, device=device)) for c in cores
            )
        net.ranks = [1] + [int(c.shape[3]) for c in cores[:-1]] + [1]
        net.rank = max(net.ranks)

    @torch.no_grad()
    def loss(self, chunks: list[Triple], reduce_sum=_identity, cores=None) -> float:
        """Mean squared error on the chunks (all ranks) of the net or of the given cores."""
        device = self.net.cores[0].device
        sse = torch.zeros((), dtype=torch.float64, device=device)
        count = torch.zeros((), dtype=torch.float64, device=device)
        for x_t, t, eps in chunks:
            y = self.net.to_data_layout(self.net.evaluate(x_t, t, cores=cores)).to(torch.float64)
            sse = sse + ((y - eps.reshape(len(eps), -1).to(torch.float64)) ** 2).sum()
            count = count + eps.numel()
        return float(reduce_sum(sse) / reduce_sum(count))
