"""The state of one sweep over an FTT's cores: the cores, their gauge and the cached
environments (plain torch; used by ALS, DMRG and the Riemannian gradient).

Gauge. The sweep keeps the cores left of the centre left-orthogonal and those right of it
right-orthogonal, each up to a positive scalar ``c_k`` per TT (a *scaled-orthogonal* gauge):
with purely orthonormal cores the interfaces of a train of ``K`` cores shrink geometrically
(measured: 4e-30 at core 0 of 48 cores, NaN at 768) while the centre core grows to match, so
both leave the float range. When the mean log-size of a new environment over the batch's samples
drifts beyond ``±SCALE_DRIFT``, the core just orthogonalised is multiplied by
``c = exp(-mean)`` and its neighbour towards the centre by ``1/c``: the represented function is
unchanged, interfaces stay near 1 and the centre core stays at the size of the data. Short trains
never drift that far and keep the exact orthonormal gauge.

Cost: ``O(K)`` environment updates per sweep (each ``O(N r³)`` per chunk) instead of the
``O(K²)`` of recomputing every core's interfaces; memory: see :mod:`.environments`.
"""

from __future__ import annotations

import torch

from lightning_modules.tt.algebra import shift_left, shift_right
from lightning_modules.tt.environments import Chunk, Env, boundary, extend

# largest |mean log| of an environment over the samples before its core is rescaled: e^8 ≈ 3e3
SCALE_DRIFT = 8.0


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class Sweep:
    """Cores (float64 copies), chunk data and environments of one sweep.

    Args:
        net: the :class:`~.ftt.FunctionalTT` (its layout and bases).
        cores: the cores to sweep over (replaced in place in ``self.cores``).
        chunks: ``(x_t, t, weights [P, N, J])`` per chunk; ``weights`` are the ALS targets or
            the Riemannian ``dLoss/dy``.
        gram: keep ``Σ_j u uᵀ`` past the output core (needed for normal equations).
        reduce_sum: all-reduce over DDP ranks (the gauge scalars must agree on every rank).
    """

    def __init__(self, net, cores, chunks, *, gram: bool = True, reduce_sum=_identity):
        self.net, self.gram, self.reduce_sum = net, gram, reduce_sum
        self.cores = list(cores)
        dtype = self.cores[0].dtype
        self.chunks = [Chunk(net.site_basis(x_t, t, dtype), w) for x_t, t, w in chunks]
        K, P, device = net.num_cores, net.num_tts, self.cores[0].device
        self.left: list[list[Env] | None] = [None] * (K + 1)
        self.right: list[list[Env] | None] = [None] * (K + 1)
        sizes = [w.shape[1] for _, _, w in chunks]
        self.left[0] = [boundary(P, n, dtype, device) for n in sizes]
        # log of each core's scalar c_k relative to its orthonormal part (0: none applied)
        self.log_gauge = [torch.zeros(P, dtype=torch.float64, device=device) for _ in range(K)]
        self.right[K] = [boundary(P, n, dtype, device) for n in sizes]

    # ------------------------------------------------------------------------------ the gauge
    def _balance(self, envs: list[Env], k: int, neighbour: int) -> None:
        """Rescale core ``k`` (and ``1/c`` into ``neighbour``) when the envs' mean log drifts."""
        total = sum(env.log.sum(1) for env in envs)
        count = torch.tensor(float(sum(env.log.shape[1] for env in envs)), dtype=torch.float64)
        mean = self.reduce_sum(total) / self.reduce_sum(count.to(total.device))  # [P]
        # at most e^300 per step, so that zero cores (log of the smallest float) stay finite
        shift = torch.where(mean.abs() > SCALE_DRIFT, -mean, torch.zeros_like(mean)).clamp(
            -300, 300
        )
        if not bool((shift != 0).any()):
            return
        c = shift.exp().to(self.cores[k].dtype)[:, None, None, None]
        self.cores[k] = self.cores[k] * c
        self.cores[neighbour] = self.cores[neighbour] / c
        self.log_gauge[k] = self.log_gauge[k] + shift
        for env in envs:
            env.log = env.log + shift[:, None]

    def _extend_all(self, envs: list[Env], k: int, left: bool) -> list[Env]:
        core = self.cores[k]
        return [
            extend(env, core, chunk.bases[k], chunk.weights, left=left, gram=self.gram)
            for env, chunk in zip(envs, self.chunks)
        ]

    # ------------------------------------------------------------------------------- movement
    def move_right(self, k: int, orthogonalise: bool = True) -> None:
        """Centre k → k+1: QR core ``k`` (R into ``k+1``), then its left environment at ``k+1``."""
        if orthogonalise:
            shift_right(self.cores, k)
        self.left[k + 1] = self._extend_all(self.left[k], k, left=True)
        self._balance(self.left[k + 1], k, k + 1)

    def move_left(self, k: int, orthogonalise: bool = True) -> None:
        """Centre k → k-1: LQ core ``k`` (L into ``k-1``), then its right environment at ``k``."""
        if orthogonalise:
            shift_left(self.cores, k)
        self.right[k] = self._extend_all(self.right[k + 1], k, left=False)
        self._balance(self.right[k], k, k - 1)

    def centre_at_start(self) -> None:
        """Right-orthogonalise cores ``K-1..1`` (centre 0) building every right environment."""
        for k in range(self.net.num_cores - 1, 0, -1):
            self.move_left(k)

    def drop_right(self, bond: int) -> None:
        """Free the right environments at ``bond`` (the sweep has moved past them)."""
        self.right[bond] = None

    def drop_left(self, bond: int) -> None:
        self.left[bond] = None
