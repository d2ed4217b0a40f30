"""Alternating Linear Scheme (ALS) for the FTT noise model (plain torch).

With all cores but ``G_k`` fixed, the DDPM loss ``mean ||ε - ε_θ(x_t, t)||²`` is a linear least
squares problem in ``G_k`` (:meth:`FunctionalTT.interfaces`). One ALS sweep visits every core
once, left to right or right to left (alternating), solving

    (A / R + ridge · mean(diag(A / R)) I) vec(G_k) = b / R,   A = Σ z zᵀ,  b = Σ z ε,
    z = vec(left ⊗ φ_k ⊗ right)

in float64 over ``R`` (sample, output) rows, and moves the orthogonality centre on by a QR
(the other cores stay orthonormal, which keeps the systems well conditioned and the gauge fixed).
A sweep goes left to right through all ``K`` cores and back, ``2K - 1`` solves.
``A`` and ``b`` are accumulated over chunks of ``batch`` samples, so the sample count is not
bounded by memory, and summed over DDP ranks with ``reduce_sum`` before every solve, so all
ranks take the same step.
"""

from __future__ import annotations

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
from lightning_modules.tt.ftt import FunctionalTT

Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class ALS:
    """ALS sweeps for a :class:`FunctionalTT`, writing the solved cores back into it.

    Args:
        net: the FTT; its cores are overwritten in place (in their own dtype).
        ridge: Tikhonov weight (``als.ridge``), relative to the mean diagonal of the normal
            matrix. Small is right for DDPM data: the splines at the edge of the support see few
            samples, and a strong ridge pulls their coefficients (ε̂ in the tails) to zero, which
            lets samples drift out during sampling.
        sweeps: sweeps per :meth:`step` (``als.sweeps``).
        samples: (x_t, t, ε) triples per sweep and rank (``als.samples``).
        batch: rows per accumulation chunk (``als.batch``): bounds the memory of one chunk.
        fixed: draw the samples once and reuse them in every sweep (``als.fixed``); otherwise draw
            fresh ones each sweep (stochastic ALS).
    """

    def __init__(
        self,
        net: FunctionalTT,
        *,
        ridge: float = 1e-6,
        sweeps: int = 2,
        samples: int = 8192,
        batch: int = 2048,
        fixed: bool = False,
    ):
        if ridge < 0:
            raise UserError(f"als.ridge={ridge}: the ridge must be >= 0")
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

    def sweep(self, chunks: list[Triple], reduce_sum=_identity) -> float:
        """One left-right sweep: cores ``0..K-1`` then back ``K-2..0``; the final loss."""
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
        with torch.no_grad():
            for param, core in zip(net.cores, cores):
                param.copy_(core.to(param.dtype))
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
