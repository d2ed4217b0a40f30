"""Alternating Linear Scheme (ALS) for the FTT noise model (plain torch).

With all cores but ``G_k`` fixed, the DDPM loss ``mean ||ε - ε_θ(x_t, t)||²`` is a linear least
squares problem in ``G_k`` (:meth:`FunctionalTT.interfaces`). One ALS sweep visits every core
once, left to right or right to left (alternating), solving

    (A / R + ridge · mean(diag(A / R)) I) vec(G_k) = b / R,   A = Σ z zᵀ,  b = Σ z ε,
    z = vec(left ⊗ φ_k ⊗ right)

in float64 over ``R`` (sample, output) rows, and moves the orthogonality centre on by a QR
(the other cores stay orthonormal up to a scalar, which keeps the systems well conditioned and
the gauge fixed; :mod:`.sweep`). A sweep goes left to right through all ``K`` cores and back,
``2K - 1`` solves. ``A`` and ``b`` are accumulated over chunks of ``batch`` samples and summed
over DDP ranks with ``reduce_sum`` before every solve, so all ranks take the same step.

The left and right partial products of every chunk are cached and extended one core at a time
as the centre moves (:mod:`.environments`), so a sweep costs ``O(K)`` core updates, not the
``O(K²)`` of recomputing each core's interfaces (:meth:`ALS.reference_sweep`, kept as the
formula the tests compare with). With an output core the ``J = D`` outputs share one chain: the
cores beside it see ``Σ_j`` of the per-output terms (an ``r × r`` matrix per sample), and the
output core's normal matrix is block-diagonal with one ``r² × r²`` block shared by all outputs.
Memory: the cached partial products take ``8 · samples · (K + 1) · P · r · (1 + r)`` bytes at
most (``P = 1`` with an output core); ``batch`` bounds the transient per-chunk terms.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lightning_modules.errors import UserError
from lightning_modules.tt.algebra import (
    assemble_gram,
    core_gradient,
    gram_blocks,
    orthogonalize,
    shift_left,
    shift_right,
    solve_ridge,
)
from lightning_modules.tt.environments import output_gram, site_gram_blocks, site_rhs
from lightning_modules.tt.ftt import FunctionalTT
from lightning_modules.tt.sweep import Sweep

Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def auto_samples(net: FunctionalTT) -> int:
    """``als.samples=auto``: 64 equations per unknown of the largest input/time core (a triple gives
    one equation per output coordinate of a TT), and at least 1024 triples so that the time
    steps are covered: 65,536 for per-coordinate TTs at rank 8 with 16 splines, 2,048 for an
    output core over 32 coordinates."""
    # the output core's slices each see their own equations: it is never the binding one
    cores = [c for c, (kind, _) in zip(net.cores, net.sites, strict=True) if kind != "out"]
    unknowns = max(core[0].numel() for core in cores)
    return max(1024, math.ceil(64 * unknowns / net.num_outputs))


class ALS:
    """ALS sweeps for a :class:`FunctionalTT`, writing the solved cores back into it.

    Args:
        net: the FTT; its cores are overwritten in place (in their own dtype).
        ridge: Tikhonov weight (``als.ridge``), relative to the mean diagonal of the normal
            matrix. Small is right for DDPM data: the splines at the edge of the support see few
            samples, and a strong ridge pulls their coefficients (ε̂ in the tails) to zero, which
            lets samples drift out during sampling.
        sweeps: sweeps per :meth:`step` (``als.sweeps``).
        samples: (x_t, t, ε) triples per sweep and rank (``als.samples``); ``"auto"``:
            :func:`auto_samples`.
        batch: rows per accumulation chunk (``als.batch``): bounds the memory of one chunk.
        fixed: draw the samples once and reuse them in every sweep (``als.fixed``); otherwise draw
            fresh ones each sweep (stochastic ALS).
    """

    def __init__(
        self,
        net: FunctionalTT,
        *,
        ridge: float,
        sweeps: int,
        samples: int | str,
        batch: int,
        fixed: bool,
    ):
        if ridge < 0:
            raise UserError(f"als.ridge={ridge}: the ridge must be >= 0")
        if samples == "auto":
            samples = auto_samples(net)
        if not isinstance(samples, int) or isinstance(samples, bool):
            raise UserError(f"als.samples={samples!r}: a whole number or auto")
        if sweeps < 1 or samples < 1 or batch < 1:
            raise UserError(
                f"als.sweeps={sweeps}, als.samples={samples}, als.batch={batch}: all must be >= 1"
            )
        self.net = net
        self.ridge, self.sweeps, self.samples, self.batch = (
            float(ridge),
            int(sweeps),
            int(samples),
            int(batch),
        )
        self.fixed = bool(fixed)
        self.sweeps_done = 0
        self._fixed_chunks: list[Triple] | None = None

    # -------------------------------------------------------------------------------- samples
    def collect(self, draw: Callable[[], Triple]) -> list[Triple]:
        """Call ``draw()`` until ``samples`` rows are in hand, cut into chunks of ``batch`` rows."""
        draws, have = [], 0
        while have < self.samples:
            triple = draw()
            if triple[0].shape[0] == 0:
                raise UserError("als: draw() returned an empty batch; check the dataset")
            draws.append(triple)
            have += triple[0].shape[0]
        x_t, t, eps = (torch.cat(parts)[: self.samples] for parts in zip(*draws))
        return [
            (x_t[i : i + self.batch], t[i : i + self.batch], eps[i : i + self.batch])
            for i in range(0, self.samples, self.batch)
        ]

    # --------------------------------------------------------------------------------- solves
    def normal_equations(self, cores, k: int, chunks: list[Triple]):
        """``A [P, F, F]``, ``b [P, F]``, ``Σ ε² [P]`` and the row count for core ``k``."""
        net, n = self.net, self.net.mode_sizes[k]
        size = cores[k][0].numel()
        blocks = None
        rhs = torch.zeros(net.num_tts, size, dtype=torch.float64, device=cores[0].device)
        energy = torch.zeros(net.num_tts, dtype=torch.float64, device=cores[0].device)
        rows = 0
        for x_t, t, eps in chunks:
            iface = net.interfaces(k, x_t, t, cores=cores)
            target = net.from_data_layout(eps.to(torch.float64))  # [P, N, J]
            blocks = gram_blocks(iface, n, out=blocks)
            rhs += core_gradient(iface, target, n).reshape(net.num_tts, -1)
            energy += (target**2).sum((1, 2))
            rows += target.shape[1] * target.shape[2]
        lhs = assemble_gram(blocks, cores[k].shape[1], cores[k].shape[3])
        return lhs, rhs, energy, rows

    def solve_core(self, cores, k: int, chunks: list[Triple], reduce_sum) -> float:
        """Replace ``cores[k]`` by its ridge least-squares solution; return the loss after it."""
        lhs, rhs, energy, rows = self.normal_equations(cores, k, chunks)
        lhs, rhs, energy = reduce_sum(lhs), reduce_sum(rhs), reduce_sum(energy)
        rows = float(reduce_sum(torch.tensor(float(rows), dtype=torch.float64, device=lhs.device)))
        kind = self.net.sites[k][0]
        solution = solve_ridge(lhs / rows, rhs / rows, self.ridge, what=f"ALS core {k} ({kind})")
        cores[k] = solution.reshape(cores[k].shape)
        # residual from the normal equations: ||Zg - y||² = gᵀAg - 2gᵀb + yᵀy
        sse = (
            torch.einsum("pf,pfg,pg->p", solution, lhs, solution)
            - 2 * (solution * rhs).sum(-1)
            + energy
        )
        return float(sse.sum().clamp_min(0) / (rows * self.net.num_tts))

    def cached_normal_equations(self, sw: Sweep, k: int):
        """:meth:`normal_equations` from the sweep's cached environments. For the output core
        ``lhs`` is the one ``[P, r0 r1, r0 r1]`` block all outputs share and ``rhs`` is
        ``[P, r0 r1, J]``."""
        shape = sw.cores[k].shape
        P, r0, n, r1 = shape
        envs = list(zip(sw.left[k], sw.right[k + 1], sw.chunks))
        rhs = sum(site_rhs(left, right, chunk, k, shape) for left, right, chunk in envs)
        if self.net.sites[k][0] == "out":
            lhs = sum(output_gram(left, right) for left, right, _ in envs)
            rhs = rhs.permute(0, 1, 3, 2).reshape(P, r0 * r1, n)
        else:
            blocks = None
            for left, right, chunk in envs:
                blocks = site_gram_blocks(left, right, chunk, k, shape, out=blocks)
            lhs = assemble_gram(blocks, r0, r1)
            rhs = rhs.reshape(P, -1)
        energy = sum((chunk.weights**2).sum((1, 2)) for chunk in sw.chunks)
        rows = sum(chunk.weights.shape[1] * chunk.weights.shape[2] for chunk in sw.chunks)
        return lhs, rhs, energy, rows

    def cached_solve(self, sw: Sweep, k: int, reduce_sum) -> float:
        """Replace ``sw.cores[k]`` by its ridge least-squares solution; the loss after it."""
        lhs, rhs, energy, rows = self.cached_normal_equations(sw, k)
        lhs, rhs, energy = reduce_sum(lhs), reduce_sum(rhs), reduce_sum(energy)
        rows = float(reduce_sum(torch.tensor(float(rows), dtype=torch.float64, device=lhs.device)))
        kind = self.net.sites[k][0]
        P, r0, n, r1 = sw.cores[k].shape
        solution = solve_ridge(
            lhs / rows,
            rhs / rows,
            self.ridge,
            what=f"ALS core {k} ({kind})",
            rows=rows / (n if kind == "out" else 1),
        )
        if kind == "out":  # [P, r0 r1, J] -> [P, r0, J, r1]
            sw.cores[k] = solution.reshape(P, r0, r1, n).permute(0, 1, 3, 2).contiguous()
            quad = torch.einsum("pfj,pfg,pgj->p", solution, lhs, solution)
        else:
            sw.cores[k] = solution.reshape(P, r0, n, r1)
            quad = torch.einsum("pf,pfg,pg->p", solution, lhs, solution)
        # residual from the normal equations: ||Zg - y||² = gᵀAg - 2gᵀb + yᵀy
        sse = quad - 2 * (solution * rhs).flatten(1).sum(-1) + energy
        return float(sse.sum().clamp_min(0) / (rows * self.net.num_tts))

    def start_sweep(self, chunks: list[Triple], reduce_sum=_identity) -> Sweep:
        """The sweep state: float64 cores centred at core 0 with every right environment."""
        net = self.net
        cores = [c.detach().to(torch.float64) for c in net.cores]
        data = [(x_t, t, net.from_data_layout(eps.to(torch.float64))) for x_t, t, eps in chunks]
        sw = Sweep(net, cores, data, gram=True, reduce_sum=reduce_sum)
        sw.centre_at_start()
        return sw

    def sweep(self, chunks: list[Triple], reduce_sum=_identity) -> float:
        """One left-right sweep: cores ``0..K-1`` then back ``K-2..0``; the final loss."""
        K = self.net.num_cores
        sw = self.start_sweep(chunks, reduce_sum)
        loss = float("nan")
        for k in range(K):
            loss = self.cached_solve(sw, k, reduce_sum)
            if k < K - 1:
                sw.move_right(k)
                sw.drop_right(k + 1)
        for k in range(K - 1, 0, -1):
            sw.move_left(k)
            sw.drop_left(k)
            loss = self.cached_solve(sw, k - 1, reduce_sum)
        self.write_cores(sw.cores)
        self.sweeps_done += 1
        return loss

    def write_cores(self, cores) -> None:
        with torch.no_grad():
            for param, core in zip(self.net.cores, cores):
                param.copy_(core.to(param.dtype))

    def reference_sweep(self, chunks: list[Triple], reduce_sum=_identity) -> float:
        """The uncached sweep (every core's interfaces from scratch, ``O(K²)``, orthonormal
        gauge): the formula :meth:`sweep` must agree with, and the "before" of the benchmarks."""
        net = self.net
        K = net.num_cores
        cores = orthogonalize([c.detach().to(torch.float64) for c in net.cores], center=0)
        loss = float("nan")
        for k in range(K):
            loss = self.solve_core(cores, k, chunks, reduce_sum)
            if k < K - 1:
                shift_right(cores, k)
        for k in range(K - 1, 0, -1):
            shift_left(cores, k)
            loss = self.solve_core(cores, k - 1, chunks, reduce_sum)
        self.write_cores(cores)
        self.sweeps_done += 1
        return loss

    def step(self, draw: Callable[[], Triple], reduce_sum=_identity) -> dict[str, float]:
        """``sweeps`` sweeps, on fresh samples each (or the fixed ones)."""
        loss = float("nan")
        for _ in range(self.sweeps):
            if self.fixed:
                if self._fixed_chunks is None:
                    self._fixed_chunks = self.collect(draw)
                chunks = self._fixed_chunks
            else:
                chunks = self.collect(draw)
            loss = self.sweep(chunks, reduce_sum)
        return {"loss": loss, "sweeps": float(self.sweeps_done)}
