"""The density-parametrised tensor train (``eps_net=ftt eps_net.param=density``, plain torch).

The TT parametrises a non-negative function ``q_θ(x, t)`` and the noise model is its score,

    ε_θ(x_t, t) = -sqrt(1 - ᾱ_t) ∇_x log q_θ(x_t, t).

**The form.** ``q_0(x) = Σ_{α} Π_d G_d[α_{d-1}, i, α_d] φ_i(x_d)`` (summed over ``i`` and the
bonds) with non-negative cores ``G_d = exp(θ_d)`` and Gaussian bumps
``φ_i(y) = N(y; c_i, h²)`` on ``m = num_basis`` equally spaced centres ``c_i`` spanning the
training data's range of coordinate ``d`` (``h`` = the spacing). The forward process acts on each
coordinate separately, so ``q_t``, the diffusion of ``q_0`` to step ``t``, has the same cores and
the diffused bumps ``φ_i^t(y) = N(y; a c_i, a² h² + 1 - a²)`` (``a = sqrt(ᾱ_t)``): one set of
cores defines the density at every noise level, with no time parameters, and ``q_t`` is exactly
what the forward process makes of ``q_0``.

**Why rank K is exact for a mixture.** ``Σ_k w_k Π_d N(x_d; μ_kd, σ²)`` is a TT of rank ``K``
(diagonal cores, the weights in the first), and the diffusion keeps that form at every ``t``.
With bumps, each 1-D factor ``N(μ, σ²)`` is a non-negative combination of ``N(c_i, h²)`` up to
the discretisation of ``N(μ, σ² - h²)`` on the grid, which is accurate when the spacing is below
about ``σ / sqrt 2`` (``tests/test_ftt_density.py`` measures it). The ``ε`` form needs the
*ratio* of two such trains.

**Why q ≥ 0 this way.** ``exp`` of free parameters keeps every core entry positive and the bumps
are positive, so ``q_t > 0`` everywhere (``log q`` is finite, no clamping is needed and the
bumps' infinite support keeps ``∇ log q`` alive outside the data's range: there it is the pull
of the outermost bumps towards them). A squared TT (TTDE) is also non-negative but its square
of a rank-K train has rank K²; with non-negative cores a rank-K mixture stays rank K.

**The contraction.** Per sample, ``M_d = Σ_i w_i G_d[:, i, :]`` with ``w_i = φ_i^t(x_d)`` divided
by their largest (a per-site scale that cancels), and ``dM_d`` the same with
``w_i · ∂ log φ_i^t(x_d)``. With prefix products ``L_d`` and suffix products ``R_d``, each divided
by its sum (non-negative vectors, so no cancellation), ``∂_d log q = (L_{d-1} dM_d R_{d+1}) /
(L_{d-1} M_d R_{d+1})``: every per-sample scale cancels, and the score of each coordinate is a
convex combination of the bump scores ``-(x_d - a c_i) / s²``. ``tests/test_ftt_density.py``
checks it against autograd of :meth:`DensityTT.log_density`.

**Optimisers.** The loss is not quadratic in a core (ε is a ratio of multilinear forms of the
cores, and the cores are exponentials of the parameters): ``ddpm.optimizer=adam|sgd`` apply;
ALS and DMRG (exact per-core least squares) and the project's Riemannian optimiser (a projected
gradient of a loss linear in the full tensor, a closed-form line search for a quadratic, and a
TT-SVD retraction that does not keep the cores non-negative) do not, and are refused
(:func:`refuse_optimizer`).

**The skip.** ``eps_net.skip=auto`` means none here; ``gaussian`` / ``pca`` are refused: the
bumps already cover all of space, and a Gaussian base density times the TT would no longer be
the diffusion of any ``q_0`` of the family.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lightning_modules.errors import UserError
from lightning_modules.tt.ftt import FunctionalTT, _bounds

PARAMS = ("eps", "density")
#: init=auto: rank component k starts as a bump of this std (data units: the task standardises)
#: around a seeded training point; the other bond entries start e^-4 times smaller
SEED_WIDTH = 1.0
SEED_OFF_DIAGONAL = -4.0
SEED_POOL = 4096  # training points the k-means++ seeding draws from
#: core_lr_scale=auto: Adam steps the log-cores with 5 x ddpm.lr (a step is a relative change
#: of the entries). gmm D=10 K=4, rank 8, 32 bumps, 1000 steps: excess over ε* 0.0049 at lr
#: 2e-3, 0.0006 at 1e-2 (benchmarks/tt_gmm_density_probe.py; docs/results/tt_beyond_2d.md)
AUTO_LR_SCALE = 5.0
#: optimisers that need a loss quadratic in each core (or a linear model of the full tensor)
CORE_SOLVERS = ("als", "dmrg", "riemannian")


def refuse_optimizer(name: str) -> str:
    """The one line that refuses ``ddpm.optimizer=name`` for the density form."""
    return (
        f"ddpm.optimizer={name} does not apply to eps_net.param=density: its loss is not "
        "quadratic in a core (ε = -sqrt(1-ᾱ) ∇ log q is a ratio of trains) and its cores must "
        "stay non-negative; use ddpm.optimizer=adam or sgd, or eps_net.param=eps"
    )


def refuse_skip(skip: str) -> str:
    """The one line that refuses ``eps_net.skip=skip`` (gaussian, pca) for the density form."""
    return (
        f"eps_net.skip={skip} does not apply to eps_net.param=density (the Gaussian bumps cover "
        "all of space); use eps_net.skip=auto or none"
    )


def refuse_init(init: str) -> str:
    """The one line that refuses ``eps_net.init=init`` (linear, random) for the density form."""
    return (
        f"eps_net.init={init} does not apply to eps_net.param=density; use auto (rank "
        "components seeded at training points) or identity (all at the data's marginals)"
    )


def build_ftt(param: str = "eps", **options) -> nn.Module:
    """``eps_net=ftt``: the ε form (:class:`~.ftt.FunctionalTT`) or the density form."""
    if param == "eps":
        return FunctionalTT(**options)
    if param == "density":
        return DensityTT(**options)
    raise UserError(f"eps_net.param={param!r}: use {' or '.join(PARAMS)}")


class DensityTT(nn.Module):
    """``ε_θ = -sqrt(1-ᾱ_t) ∇ log q_θ(x_t, t)`` with ``q_θ`` a non-negative TT (module docstring).

    Args:
        data_shape: shape of one sample.
        timesteps: ``T``.
        data_bounds: ``(lo, hi)`` per-coordinate range of the training data: the bump centres
            span it (``None``: ``[-1, 1]``).
        num_basis: bumps per coordinate ``m`` (>= 2).
        rank: TT rank of every inner bond (a K-component mixture needs K).
        init: every coordinate's factor starts at the bump-smoothed marginal histogram of
            ``train_data`` (flat without data); ``auto`` then seeds rank component k at a training
            point drawn with ``seed`` by k-means++ seeding (a bump of std ``SEED_WIDTH`` around it,
            other bond entries ``e^SEED_OFF_DIAGONAL`` smaller); ``identity``: no seeding
            (every component at the marginals: Adam then splits them slowly; measured excess
            over ε* after 1000 steps 0.041, where ``auto`` reaches 0.0049 at the same lr).
        init_noise: std of the Gaussian noise on the log-cores at init (breaks the symmetry of
            the rank components).
        seed: seed of that noise.
        skip: ``auto`` / ``none`` only (module docstring).
        train_data: ``[N, *data_shape]``: the init sets every coordinate's factor to the
            bump-smoothed marginal histogram of the data (``None``: flat).
        alpha_bar: ``[timesteps]`` ᾱ_t (required: the bumps are diffused with it).
        core_lr_scale: adam/sgd step the log-cores with ``lr × this``; ``auto``:
            ``AUTO_LR_SCALE`` (5).
        **unused: the ε form's keys that mean nothing here (basis, degree, time, time_basis,
            output, skip_components, margin, name).
    """

    param = "density"

    def __init__(
        self,
        data_shape: tuple[int, ...] = (2,),
        timesteps: int = 1000,
        data_bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
        num_basis: int = 16,
        rank: int = 8,
        init: str = "auto",
        init_noise: float = 1e-2,
        seed: int = 0,
        skip: str = "auto",
        train_data: torch.Tensor | None = None,
        alpha_bar: torch.Tensor | None = None,
        core_lr_scale: float | str = "auto",
        **unused,
    ):
        super().__init__()
        if skip not in ("auto", "none"):
            raise UserError(refuse_skip(skip))
        if init not in ("auto", "identity"):
            raise UserError(refuse_init(init))
        if int(num_basis) < 2:
            raise UserError(f"eps_net.num_basis={num_basis}: the density form needs >= 2 bumps")
        if int(rank) < 1:
            raise UserError(f"eps_net.rank={rank}: the TT rank must be >= 1")
        if alpha_bar is None or len(alpha_bar) != int(timesteps):
            raise UserError("eps_net.param=density needs the schedule's alpha_bar (T entries)")
        self.data_shape = tuple(int(s) for s in data_shape)
        self.dim = math.prod(self.data_shape)
        self.timesteps, self.num_basis, self.rank = int(timesteps), int(num_basis), int(rank)
        self.skip = None
        lo, hi = _bounds(data_bounds, self.dim)
        hi = torch.maximum(hi, lo + 1e-6)
        grid = torch.linspace(0, 1, self.num_basis, dtype=torch.float64)
        self.register_buffer("centres", lo[:, None] + grid[None, :] * (hi - lo)[:, None])
        self.register_buffer("width", (hi - lo) / (self.num_basis - 1))  # h per coordinate
        self.register_buffer("alpha_bar", torch.as_tensor(alpha_bar, dtype=torch.float64).cpu())
        self.ranks = [1] + [self.rank] * (self.dim - 1) + [1]
        g = torch.Generator().manual_seed(int(seed))
        log_marginal = self._log_marginals(train_data)  # [D, m]
        seeds = self._log_seeds(train_data, g) if init == "auto" else None  # [r, D, m]
        cores = []
        for d in range(self.dim):
            r0, r1 = self.ranks[d], self.ranks[d + 1]
            core = log_marginal[d][None, :, None].expand(r0, -1, r1).clone()
            if seeds is not None:
                core = core + SEED_OFF_DIAGONAL
                for k in range(self.rank):
                    core[min(k, r0 - 1), :, min(k, r1 - 1)] = seeds[k, d]
            core += float(init_noise) * torch.randn(core.shape, generator=g, dtype=torch.float64)
            cores.append(nn.Parameter(core.float()))
        self.log_cores = nn.ParameterList(cores)
        scale = AUTO_LR_SCALE if core_lr_scale == "auto" else float(core_lr_scale)
        if not scale > 0:
            raise UserError(f"eps_net.core_lr_scale={core_lr_scale}: use auto or a number > 0")
        for core in self.log_cores:
            core.lr_scale = scale

    def _log_marginals(self, train_data: torch.Tensor | None) -> torch.Tensor:
        """``[D, m]`` log of each coordinate's bump-smoothed histogram at the centres (+1 % of
        its peak, so no bump starts dead); zeros (flat) without data."""
        if train_data is None or len(train_data) == 0:
            return torch.zeros(self.dim, self.num_basis, dtype=torch.float64)
        x = train_data.reshape(len(train_data), -1).double().cpu()
        if x.shape[1] != self.dim:
            raise UserError(f"train_data has {x.shape[1]} coordinates, not {self.dim}")
        z = (x.T[:, :, None] - self.centres[:, None, :]) / self.width[:, None, None]  # [D, N, m]
        hist = torch.exp(-0.5 * z * z).mean(1)  # [D, m]
        return torch.log(hist + 1e-2 * hist.amax(1, keepdim=True))

    def _log_seeds(self, train_data, g: torch.Generator) -> torch.Tensor | None:
        """``[r, D, m]``: rank component k starts as a broad bump (std SEED_WIDTH) around a
        training point drawn with the model's seed by k-means++ seeding (None: no data)."""
        if train_data is None or len(train_data) == 0:
            return None
        x = train_data.reshape(len(train_data), -1).double().cpu()
        x = x[torch.randperm(len(x), generator=g)[:SEED_POOL]]
        # k-means++: each next point drawn with probability ∝ its squared distance to the
        # nearest point drawn so far, so separated modes are all seeded (uniform draws of 12
        # points miss a mode of weight 0.08 with probability 0.92^12 = 0.37)
        chosen = [int(torch.randint(0, len(x), (1,), generator=g))]
        nearest = ((x - x[chosen[0]]) ** 2).sum(1)
        for _ in range(self.rank - 1):
            chosen.append(int(torch.multinomial(nearest.clamp(min=1e-12), 1, generator=g)))
            nearest = torch.minimum(nearest, ((x - x[chosen[-1]]) ** 2).sum(1))
        points = x[chosen]  # [r, D]
        z = (self.centres[None] - points[:, :, None]) / SEED_WIDTH  # [r, D, m]
        return -0.5 * z * z

    # ---------------------------------------------------------------------------------- pieces
    def num_parameters(self) -> int:
        return sum(c.numel() for c in self.log_cores)

    def cores(self) -> list[torch.Tensor]:
        """The non-negative cores ``exp(θ_d)``, ``[r_{d-1}, m, r_d]``."""
        return [c.exp() for c in self.log_cores]

    def _bumps(self, x: torch.Tensor, t: torch.Tensor):
        """``(log φ^t [N, D, m], ∂_x log φ^t [N, D, m])`` of the diffused bumps (no constants)."""
        ab = self.alpha_bar.to(device=x.device)[t.long()].to(x.dtype)[:, None, None]  # [N, 1, 1]
        a = ab.sqrt()
        centres = self.centres.to(x.dtype)[None]  # [1, D, m]
        s2 = ab * self.width.to(x.dtype)[None, :, None] ** 2 + (1 - ab)  # [N, D, 1]
        diff = x[:, :, None] - a * centres
        return -0.5 * diff * diff / s2, -diff / s2

    def _site_matrices(self, x: torch.Tensor, t: torch.Tensor, derivative: bool = True):
        """Per site ``(M_d [N, r, r'], dM_d or None, log scale [N])`` (module docstring)."""
        log_phi, dlog_phi = self._bumps(x, t)
        top = log_phi.amax(-1, keepdim=True)
        w = torch.exp(log_phi - top)  # [N, D, m], the largest 1
        out = []
        for d, core in enumerate(self.cores()):
            M = torch.einsum("nm,amb->nab", w[:, d], core)
            dM = torch.einsum("nm,amb->nab", w[:, d] * dlog_phi[:, d], core) if derivative else None
            out.append((M, dM, top[:, d, 0]))
        return out

    @staticmethod
    def _normalise(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``v [N, r] >= 0`` divided by its (detached) sum, and that sum."""
        total = v.detach().sum(-1, keepdim=True).clamp(min=torch.finfo(v.dtype).tiny)
        return v / total, total[:, 0]

    # ------------------------------------------------------------------------------- the model
    def score(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``∇_x log q_θ(x_t, t)``: ``[N, D]`` for flattened ``x_t [N, D]``."""
        N = x_t.shape[0]
        x = x_t.reshape(N, -1).to(self.log_cores[0].dtype)
        sites = self._site_matrices(x, t)
        one = torch.ones(N, 1, dtype=x.dtype, device=x.device)
        lefts, left = [one], one
        for M, _, _ in sites[:-1]:
            left, _ = self._normalise(torch.einsum("na,nab->nb", left, M))
            lefts.append(left)
        right, cols = one, []
        for d in range(self.dim - 1, -1, -1):
            M, dM, _ = sites[d]
            num = torch.einsum("na,nab,nb->n", lefts[d], dM, right)
            den = torch.einsum("na,nab,nb->n", lefts[d], M, right)
            cols.append(num / den.clamp(min=torch.finfo(x.dtype).tiny))
            right, _ = self._normalise(torch.einsum("nab,nb->na", M, right))
        return torch.stack(cols[::-1], dim=1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``ε_θ(x_t, t) = -sqrt(1 - ᾱ_t) ∇ log q_θ``: ``[N, *data_shape]``."""
        ab = self.alpha_bar.to(device=x_t.device)[t.long()][:, None]
        eps = -(1 - ab).sqrt().to(self.log_cores[0].dtype) * self.score(x_t, t)
        return eps.to(x_t.dtype).reshape(x_t.shape)

    def log_density(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``log q_θ(x_t, t)`` up to a constant per ``t`` (``[N]``; the tests' autograd check)."""
        N = x_t.shape[0]
        x = x_t.reshape(N, -1).to(self.log_cores[0].dtype)
        left = torch.ones(N, 1, dtype=x.dtype, device=x.device)
        log = torch.zeros(N, dtype=x.dtype, device=x.device)
        for M, _, top in self._site_matrices(x, t, derivative=False):
            total = torch.einsum("na,nab->nb", left, M)
            norm = total.sum(-1, keepdim=True)
            left, log = total / norm, log + norm[:, 0].log() + top
        return log

    def flops_per_sample(self) -> int:
        """Analytic FLOPs of one ε: the bumps (~8 per bump), ``M`` and ``dM`` (2 m r r' each),
        the two passes and the two bilinear forms per site (~6 r r')."""
        per_site = [
            8 * self.num_basis + 4 * self.num_basis * r0 * r1 + 6 * r0 * r1
            for r0, r1 in zip(self.ranks[:-1], self.ranks[1:])
        ]
        return int(sum(per_site))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, param=density, bumps={self.num_basis}, "
            f"ranks={self.ranks[1:-1]}, params={self.num_parameters():,}"
        )
