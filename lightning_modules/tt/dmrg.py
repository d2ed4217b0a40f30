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
A pair holding the output core solves one shared ``r_{k-1} n r_{k+1}`` block for all outputs (the
normal matrix is block-diagonal over them), so long output-core trains stay affordable.
The partial products left and right of the pair are cached and extended as the sweep moves, in
the scaled-orthogonal gauge of :mod:`.sweep` (``O(K)`` per sweep; finite for thousands of cores).
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules.errors import UserError
from lightning_modules.tt.algebra import assemble_gram, solve_ridge
from lightning_modules.tt.als import ALS, Triple, _identity
from lightning_modules.tt.environments import basis_rhs, grouped_gram, site_gram_blocks
from lightning_modules.tt.ftt import FunctionalTT
from lightning_modules.tt.sweep import Sweep


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
        self._rounding = 0.0  # set per sweep from the data's energy

    def _pair_equations(self, sw: Sweep, k: int):
        """``(lhs [P, F, F], rhs [P, F], rows)`` of the merged sites k, k+1 (neither the output
        core), from the cached environments."""
        P, r0, r1 = self.net.num_tts, sw.cores[k].shape[1], sw.cores[k + 1].shape[3]
        n1, n2 = self.net.mode_sizes[k], self.net.mode_sizes[k + 1]
        size = r0 * n1 * n2 * r1
        lhs = sw.cores[k].new_zeros(P, size, size)
        rhs = sw.cores[k].new_zeros(P, r0, n1 * n2, r1)
        a = torch.arange(r0, device=lhs.device)[None, :, None]
        b = torch.arange(r1, device=lhs.device)[None, None, :]
        for left, right, chunk in zip(sw.left[k], sw.right[k + 2], sw.chunks):
            (v1, i1), (v2, i2) = chunk.bases[k], chunk.bases[k + 1]
            values = (v1[:, :, None] * v2[:, None, :]).flatten(1)
            index = (i1[:, :, None] * n2 + i2[:, None, :]).flatten(1)
            rhs += basis_rhs(left, right, values, index, chunk.weights, (P, r0, n1 * n2, r1))
            patterns, group = torch.unique(index, dim=0, return_inverse=True)
            blocks = grouped_gram(left, right, values, group, len(patterns))
            for pattern, block in zip(patterns, blocks.unbind(1)):
                position = ((a * n1 * n2 + pattern[:, None, None]) * r1 + b).reshape(-1)
                lhs[:, position[:, None], position[None, :]] += block
        return lhs, rhs.reshape(P, -1)

    def _output_pair_equations(self, sw: Sweep, k: int, x_site: int):
        """The shared block ``[P, r0 n r1, r0 n r1]`` and ``rhs [P, r0 n r1, J]`` of a pair that
        holds the output core and the basis site ``x_site``."""
        P, r0, r1 = self.net.num_tts, sw.cores[k].shape[1], sw.cores[k + 1].shape[3]
        n = self.net.mode_sizes[x_site]
        shape = (P, r0, n, r1)
        blocks, rhs = None, 0
        for left, right, chunk in zip(sw.left[k], sw.right[k + 2], sw.chunks):
            blocks = site_gram_blocks(left, right, chunk, x_site, shape, out=blocks)
            values, index = chunk.bases[x_site]
            phi = values.new_zeros(values.shape[0], n).scatter_add_(1, index, values)
            scale = (left.log + right.log).exp()
            rhs = rhs + torch.einsum(
                "pn,ni,pnj,pna,pnb->paibj", scale, phi, chunk.weights, left.vec, right.vec
            )
        return assemble_gram(blocks, r0, r1), rhs.reshape(P, r0 * n * r1, -1)

    def solve_pair(self, sw: Sweep, k: int, reduce_sum) -> torch.Tensor:
        """The ridge least-squares supercore ``[P, r0, n_k, n_{k+1}, r1]`` of sites k, k+1."""
        net = self.net
        P, r0, r1 = net.num_tts, sw.cores[k].shape[1], sw.cores[k + 1].shape[3]
        n1, n2 = net.mode_sizes[k], net.mode_sizes[k + 1]
        kinds = (net.sites[k][0], net.sites[k + 1][0])
        out_pair = "out" in kinds
        x_site = k + 1 if kinds[0] == "out" else k
        size = r0 * net.mode_sizes[x_site] * r1 if out_pair else r0 * n1 * n2 * r1
        if size > self.max_unknowns:
            raise UserError(
                f"DMRG: the merged cores {k}, {k + 1} have {size:,} unknowns per TT (> "
                f"{self.max_unknowns:,}); lower dmrg.max_rank or eps_net.num_basis"
            )
        if out_pair:
            lhs, rhs = self._output_pair_equations(sw, k, x_site)
        else:
            lhs, rhs = self._pair_equations(sw, k)
        rows = sum(c.weights.shape[1] * c.weights.shape[2] for c in sw.chunks)
        lhs, rhs = reduce_sum(lhs), reduce_sum(rhs)
        rows = float(reduce_sum(torch.tensor(float(rows), dtype=torch.float64, device=lhs.device)))
        solution = solve_ridge(
            lhs / rows,
            rhs / rows,
            self.ridge,
            what=f"DMRG cores {k}, {k + 1}",
            rows=rows / (net.num_outputs if out_pair else 1),
        )
        if not out_pair:
            return solution.reshape(P, r0, n1, n2, r1)
        n, J = net.mode_sizes[x_site], net.num_outputs
        solution = solution.reshape(P, r0, n, r1, J)
        order = (0, 1, 2, 4, 3) if kinds[1] == "out" else (0, 1, 4, 2, 3)
        return solution.permute(*order).contiguous()

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

    def update_pair(self, sw: Sweep, k, reduce_sum, loss: float, centre_right: bool) -> float:
        """Solve, split and refit the centre core of pair k, k+1; keep the old pair (re-gauged)
        when the truncated result fits the samples worse than it did. Returns the loss."""
        cores = sw.cores
        old = cores[k].clone(), cores[k + 1].clone()
        self.split(cores, k, self.solve_pair(sw, k, reduce_sum), centre_right)
        if centre_right:
            sw.move_right(k, orthogonalise=False)  # core k is orthonormal from the SVD
        else:
            sw.move_left(k + 1, orthogonalise=False)
        new_loss = self.cached_solve(sw, k + 1 if centre_right else k, reduce_sum)
        # a residual from the normal equations is exact only up to rounding of the data's energy
        if new_loss <= loss + self._rounding or old[0].shape[3] > self.max_rank:
            return new_loss
        cores[k], cores[k + 1] = old
        if centre_right:
            sw.move_right(k)
        else:
            sw.move_left(k + 1)
        return loss

    def sweep(self, chunks: list[Triple], reduce_sum=_identity) -> float:
        """Pairs left to right, then back; writes the new cores (and ranks) into the net."""
        K = self.net.num_cores
        if K < 2:
            raise UserError("DMRG needs at least two cores; use ddpm.optimizer=als")
        sw = self.start_sweep(chunks, reduce_sum)
        energy = reduce_sum(sum((c.weights**2).sum() for c in sw.chunks))
        count = reduce_sum(sum(c.weights.new_tensor(float(c.weights.numel())) for c in sw.chunks))
        self._rounding = float(1e-13 * energy / count.clamp_min(1))  # the same on every rank
        loss = self.loss(chunks, reduce_sum, sw.cores)
        for k in range(K - 1):
            loss = self.update_pair(sw, k, reduce_sum, loss, centre_right=True)
            sw.drop_right(k + 1)
        if K > 2:
            sw.move_left(K - 1)
        for k in range(K - 3, -1, -1):
            loss = self.update_pair(sw, k, reduce_sum, loss, centre_right=False)
            sw.drop_left(k + 1)
        self.write_back(sw.cores)
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
