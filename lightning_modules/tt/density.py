"""The density-parametrised tensor train (``eps_net=ftt eps_net.param=density``, plain torch).

The TT parametrises a non-negative function ``q_θ(x, t)`` and the noise model is its score,

    ε_θ(x_t, t) = -sqrt(1 - ᾱ_t) ∇_x log q_θ(x_t, t).

**The form.** ``q_0(x) = Σ_{α} Π_d G_d[α_{d-1}, i, α_d] φ_{d,i}(x_d)`` (summed over ``i`` and the
bonds) with non-negative cores ``G_d = exp(θ_d)`` and normalised Gaussian bumps
``φ_{d,i}(y) = N(y; c_{d,i}, h_{d,i}²)``, ``m = num_basis`` per coordinate, whose centres and
widths are learned with the cores (they start on ``m`` equally spaced centres spanning the
training data's range, ``h`` = the spacing). The forward process acts on each coordinate
separately, so ``q_t``, the diffusion of ``q_0`` to step ``t``, has the same cores and the
diffused bumps ``φ^t_{d,i}(y) = N(y; a c_{d,i}, a² h_{d,i}² + 1 - a²)`` (``a = sqrt(ᾱ_t)``):
one set of cores defines the density at every noise level, with no time parameters, and ``q_t``
is exactly what the forward process makes of ``q_0``.

**Box bumps** (``bump=box``): ``φ_{d,i}`` uniform on ``[c - h/2, c + h/2]``, the ``m`` boxes
tiling the data's range at the start. The diffused box is a difference of normal CDFs,
``φ^t(y) = (Φ((y - a(c - h/2)) / s) - Φ((y - a(c + h/2)) / s)) / (a h)`` (``s² = 1 - a²``),
evaluated in log space (:func:`~lightning_modules.diffusion.oracles.log_normal_mass`, the
checkerboard oracle's): a sum of them keeps a density's sharp edges sharp at small ``t``, where
Gaussian bumps blur them (the checkerboard's squares).

**Why rank K is exact for a mixture.** ``Σ_k w_k Π_d N(x_d; μ_kd, σ²)`` is a TT of rank ``K``
(diagonal cores, the weights in the first), and the diffusion keeps that form at every ``t``.
With learned bumps it is exact with ``m = K`` bumps per coordinate (bump k at ``μ_kd`` with
width σ); on a fixed grid each 1-D factor is a non-negative combination of the bumps up to the
discretisation of ``N(μ, σ² - h²)``, accurate when the spacing is below about ``σ / sqrt 2``
(``tests/test_ftt_density.py`` measures both). The ``ε`` form needs the *ratio* of two such
trains.

**Initialisation** (``init=auto``). The rank components start at a k-means clustering of the
training points (k = rank; the best of ``SEED_RESTARTS`` k-means++ draws, each refined by
``SEED_LLOYD_STEPS`` Lloyd steps, drawn with the model's seed): component k is bump ``k mod m``
of every coordinate, centred on cluster k's mean with its per-coordinate std, its share of the
points in the first core; every other core entry starts ``e^SEED_OFF_DIAGONAL`` smaller. For a
separated mixture with ``rank = K`` this start is already close to the exact predictor
(``benchmarks/tt_gmm_density_probe.py`` reports the excess at step 0); Adam then fits every
parameter to the DDPM loss. ``identity``: every component at the data's bump-smoothed marginal
histograms on the grid. ``histogram`` (2-D data, ``rank >= m``): ``q_0`` starts as the data's
2-D histogram on the bump grid, ``H_ij`` = the share of points in bump pair ``(i, j)`` (with
boxes, in the cell), written exactly as a rank-``m`` train (first core the identity, second
``H``); in 2-D a rank-``m`` train holds any non-negative ``m × m`` grid.

**Why q ≥ 0 this way.** ``exp`` of free parameters keeps every core entry positive and the bumps
are positive, so ``q_t > 0`` everywhere (``log q`` is finite, no clamping is needed and the
bumps' infinite support keeps ``∇ log q`` alive outside the data's range: there it is the pull
of the outermost bumps towards them). A squared TT (TTDE) is also non-negative but its square
of a rank-K train has rank K²; with non-negative cores a rank-K mixture stays rank K.

**The contraction.** Per sample, ``M_d = Σ_i w_i G_d[:, i, :]`` with ``w_i = φ^t_{d,i}(x_d)``
divided by their largest (a per-site scale that cancels), and ``dM_d`` the same with
``w_i · ∂ log φ^t_{d,i}(x_d)``; both for all sites in one batched product. With prefix products
``L_d`` and suffix products ``R_d`` (square cores with boundary vectors ``1/r``), each divided
by its sum (non-negative vectors, so no cancellation), ``∂_d log q = (L_{d-1} dM_d R_{d+1}) /
(L_{d-1} M_d R_{d+1})``: every per-sample scale cancels, and the score of each coordinate is a
convex combination of the bump scores ``-(x_d - a c_i) / s_i²``. The passes loop over the sites
with samples on the last axis (elementwise products along contiguous memory: 2-3x faster on a
CPU than a batched product of ``N`` tiny matrices). ``tests/test_ftt_density.py`` checks it
against autograd of :meth:`DensityTT.log_density`, a plain loop written separately.

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

from lightning_modules.diffusion.oracles import log_normal_mass
from lightning_modules.errors import UserError
from lightning_modules.tt.ftt import FunctionalTT, _bounds

PARAMS = ("eps", "density")
#: the bump shapes: gaussian N(c, h²); box: uniform on [c - h/2, c + h/2] (diffused: a normal-CDF
#: difference), whose edges stay sharp where the data's do (the checkerboard)
BUMPS = ("gaussian", "box")
#: the keys only the density form reads (the ε form is built without them)
DENSITY_KEYS = ("bump",)
#: init=auto: the width (data units: the task standardises) of a component whose k-means
#: cluster holds a single point
SEED_WIDTH = 1.0
#: init=auto: every core entry but a component's own bump and bond starts e^this smaller. At
#: e^-4 the leaks between components add up over the sites: gmm D=10 K=4 starts at an excess
#: over ε* of 0.012 (e^-4) against 0.0002 (e^-8); D=20 K=8: 0.024 against 0.0006
SEED_OFF_DIAGONAL = -8.0
#: init=histogram: empty cells, and every core entry off the histogram's, start e^this of the
#: largest (at e^-8 the 63 off-diagonal entries of each row of the first core, 64 bumps, would
#: spread 63 e^-8 = 2 % of the mass as a product of the marginals)
HISTOGRAM_FLOOR = -12.0
SEED_POOL = 4096  # training points the k-means++ seeding draws from
#: Lloyd (k-means) steps after the k-means++ draw: in 10-D two points of one component are on
#: average σ sqrt(2D) = 4.5 component stds apart against 6 between the closest means, so the draw
#: alone often seeds two points in one component; k-means then splits them
SEED_LLOYD_STEPS = 25
#: k-means++ draws, each followed by the Lloyd steps; the clustering with the smallest
#: within-cluster sum of squares seeds the model (gmm D=20 K=8: one draw left two components
#: unseeded)
SEED_RESTARTS = 10
#: core_lr_scale=auto: Adam steps every parameter with ddpm.lr (scale 1). From the k-means start
#: a larger step undoes it: gmm D=20 K=8, 8 bumps, rank 8, 1000 steps: excess over ε* 0.0006 at
#: step 0, then 0.0013 at lr 1e-2, 0.0005 at 2e-3, 0.0004 at 5e-4
#: (benchmarks/tt_gmm_density_probe.py; docs/results/tt_beyond_2d.md)
AUTO_LR_SCALE = 1.0
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
        "components at a k-means clustering of the data), histogram (2-D data: the data's "
        "histogram on the bump grid) or identity (all at its marginals)"
    )


def build_ftt(param: str = "eps", **options) -> nn.Module:
    """``eps_net=ftt``: the ε form (:class:`~.ftt.FunctionalTT`) or the density form."""
    if param == "eps":
        return FunctionalTT(**{k: v for k, v in options.items() if k not in DENSITY_KEYS})
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
        bump: ``gaussian`` (centres on ``m`` equally spaced points spanning the data's range,
            widths the spacing) or ``box`` (``m`` boxes tiling the range).
        rank: TT rank of every inner bond (a K-component mixture needs K).
        init: ``auto``: rank components at a k-means clustering of ``train_data`` (module
            docstring; without data as ``identity``); ``identity``: every coordinate's factor
            at the bump-smoothed marginal histogram of ``train_data`` (flat without data), all
            components alike (Adam then splits them slowly); ``histogram`` (2-D data, ``rank >=
            num_basis``): ``q_0`` starts as the data's histogram on the bump grid (with boxes
            the histogram density itself), a rank-``m`` matrix written as cores ``I`` and ``H``.
        init_noise: std of the Gaussian noise on the log-cores at init (breaks the symmetry of
            the rank components).
        seed: seed of that noise and of the k-means draws.
        skip: ``auto`` / ``none`` only (module docstring).
        train_data: ``[N, *data_shape]``: the init sets every coordinate's factor to the
            bump-smoothed marginal histogram of the data (``None``: flat).
        alpha_bar: ``[timesteps]`` ᾱ_t (required: the bumps are diffused with it).
        core_lr_scale: adam/sgd step every parameter with ``lr × this``; ``auto``:
            ``AUTO_LR_SCALE`` (1).
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
        bump: str = "gaussian",
        **unused,
    ):
        super().__init__()
        if skip not in ("auto", "none"):
            raise UserError(refuse_skip(skip))
        if init not in ("auto", "identity", "histogram"):
            raise UserError(refuse_init(init))
        if bump not in BUMPS:
            raise UserError(f"eps_net.bump={bump!r}: use {' or '.join(BUMPS)}")
        if int(num_basis) < 2:
            raise UserError(f"eps_net.num_basis={num_basis}: the density form needs >= 2 bumps")
        if int(rank) < 1:
            raise UserError(f"eps_net.rank={rank}: the TT rank must be >= 1")
        if alpha_bar is None or len(alpha_bar) != int(timesteps):
            raise UserError("eps_net.param=density needs the schedule's alpha_bar (T entries)")
        self.data_shape = tuple(int(s) for s in data_shape)
        self.dim = math.prod(self.data_shape)
        self.timesteps, self.num_basis, self.rank = int(timesteps), int(num_basis), int(rank)
        if init == "histogram" and (self.dim != 2 or self.rank < self.num_basis):
            raise UserError(
                f"eps_net.init=histogram needs 2-D data and eps_net.rank >= eps_net.num_basis "
                f"(here D = {self.dim}, rank {self.rank}, {self.num_basis} bumps); use init=auto"
            )
        self.skip, self.bump = None, bump
        lo, hi = _bounds(data_bounds, self.dim)
        hi = torch.maximum(hi, lo + 1e-6)
        m = self.num_basis
        if bump == "box":  # m boxes tiling [lo, hi]: centres at the cells' midpoints
            grid = (torch.arange(m, dtype=torch.float64) + 0.5) / m
            spacing = (hi - lo) / m
        else:  # m centres from lo to hi
            grid, spacing = torch.linspace(0, 1, m, dtype=torch.float64), (hi - lo) / (m - 1)
        centres = lo[:, None] + grid[None, :] * (hi - lo)[:, None]  # [D, m]
        width = spacing[:, None].expand(-1, m).clone()
        self.register_buffer("alpha_bar", torch.as_tensor(alpha_bar, dtype=torch.float64).cpu())
        self.ranks = [1] + [self.rank] * (self.dim - 1) + [1]
        g = torch.Generator().manual_seed(int(seed))
        # on the grid, before the k-means start moves its bumps (the histogram start needs none)
        histogram = init == "histogram"
        log_marginal = None if histogram else self._log_marginals(train_data, centres, width)
        seeds = self._seed_points(train_data, g) if init == "auto" else None
        if seeds is not None:
            # rank component k starts as one bump per coordinate (bump k mod m) at k-means
            # cluster k: its mean and per-coordinate std
            points, spread, share = seeds  # [r, D], [r, D], [r]
            # a uniform of std σ is σ sqrt(12) wide
            spread = spread * math.sqrt(12) if bump == "box" else spread
            for k in range(min(self.rank, self.num_basis)):
                centres[:, k], width[:, k] = points[k], spread[k]
        if histogram:
            starts = self._histogram_cores(train_data, centres, width)
        else:
            starts = []
            for d in range(self.dim):
                r0, r1 = self.ranks[d], self.ranks[d + 1]
                core = log_marginal[d][None, :, None].expand(r0, -1, r1).clone()
                if seeds is not None:
                    core = core + SEED_OFF_DIAGONAL
                    for k in range(self.rank):  # the first core carries the cluster's share
                        weight = math.log(share[k]) if d == 0 else 0.0
                        core[min(k, r0 - 1), k % m, min(k, r1 - 1)] = weight
                starts.append(core)
        cores = []
        for core in starts:
            core = core + float(init_noise) * torch.randn(
                core.shape, generator=g, dtype=torch.float64
            )
            cores.append(nn.Parameter(core.float()))
        self.log_cores = nn.ParameterList(cores)
        # the bumps are learned too: centre and log-width per coordinate and bump
        self.centres = nn.Parameter(centres.float().clone())
        self.log_width = nn.Parameter(width.log().float().clone())
        scale = AUTO_LR_SCALE if core_lr_scale == "auto" else float(core_lr_scale)
        if not scale > 0:
            raise UserError(f"eps_net.core_lr_scale={core_lr_scale}: use auto or a number > 0")
        for p in self.parameters():
            p.lr_scale = scale

    def _log_marginals(self, train_data, centres, width) -> torch.Tensor:
        """``[D, m]`` log of each coordinate's bump-smoothed histogram at the centres (+1 % of
        its peak, so no bump starts dead); zeros (flat) without data."""
        if train_data is None or len(train_data) == 0:
            return torch.zeros(self.dim, self.num_basis, dtype=torch.float64)
        x = train_data.reshape(len(train_data), -1).double().cpu()
        if x.shape[1] != self.dim:
            raise UserError(f"train_data has {x.shape[1]} coordinates, not {self.dim}")
        z = (x.T[:, :, None] - centres[:, None, :]) / width[:, None, :]  # [D, N, m]
        hist = torch.exp(-0.5 * z * z).mean(1)  # [D, m]
        return torch.log(hist + 1e-2 * hist.amax(1, keepdim=True))

    def _shape(self, x: torch.Tensor, centres, width) -> torch.Tensor:
        """``[N, D, m]``: each bump's shape at ``x [N, D]`` at t = 0, peak 1 (box: 1 for the
        nearest centre, the cell that holds ``x`` when the boxes tile the range, its ends
        included; gaussian: ``exp(-z²/2)``)."""
        z = (x[:, :, None] - centres[None]) / width[None]
        if self.bump == "box":
            return nn.functional.one_hot(z.abs().argmin(-1), self.num_basis).to(x.dtype)
        return torch.exp(-0.5 * z * z)

    def _histogram_cores(self, train_data, centres, width) -> list[torch.Tensor]:
        """init=histogram: the log-cores of ``q_0 = Σ_ij H_ij φ_1i(x_1) φ_2j(x_2)``, ``H`` the
        data's share per pair of bumps (with boxes: per cell, so ``q_0`` is the histogram
        density), floored at ``e^HISTOGRAM_FLOOR`` of its largest entry; cores ``[1, m, r]``
        (the identity on the first ``m`` bonds) and ``[r, m, 1]`` (``H`` in its first ``m``
        rows), every other entry at the floor."""
        if train_data is None or len(train_data) == 0:
            raise UserError("eps_net.init=histogram needs the training data")
        x = train_data.reshape(len(train_data), -1).double().cpu()
        shape = self._shape(x, centres, width)  # [N, 2, m]
        hist = shape[:, 0].T @ shape[:, 1] / len(x)  # [m, m]
        log_hist = hist.clamp(min=math.exp(HISTOGRAM_FLOOR) * float(hist.max())).log()
        m, r = self.num_basis, self.rank
        first = torch.full((1, m, r), HISTOGRAM_FLOOR, dtype=x.dtype)
        first[0, :, :m] = torch.where(torch.eye(m, dtype=torch.bool), 0.0, first[0, :, :m])
        last = torch.full((r, m, 1), float(log_hist.min()), dtype=x.dtype)
        last[:m, :, 0] = log_hist
        return [first, last]

    def _seed_points(self, train_data, g: torch.Generator):
        """``(points [r, D], spread [r, D], share [r])`` of a k-means clustering (k = r) of up to
        ``SEED_POOL`` training points: the best (smallest within-cluster sum of squares) of
        ``SEED_RESTARTS`` runs of ``SEED_LLOYD_STEPS`` Lloyd steps from k-means++ draws made
        with the model's seed; ``spread`` is each cluster's per-coordinate std, ``share`` its
        share of the points (None: no data)."""
        if train_data is None or len(train_data) == 0:
            return None
        x = train_data.reshape(len(train_data), -1).double().cpu()
        x = x[torch.randperm(len(x), generator=g)[:SEED_POOL]]
        best, best_inertia = None, math.inf
        for _ in range(SEED_RESTARTS):
            # k-means++: each next point drawn with probability ∝ its squared distance to the
            # nearest point drawn so far
            chosen = [int(torch.randint(0, len(x), (1,), generator=g))]
            nearest = ((x - x[chosen[0]]) ** 2).sum(1)
            for _ in range(self.rank - 1):
                chosen.append(int(torch.multinomial(nearest.clamp(min=1e-12), 1, generator=g)))
                nearest = torch.minimum(nearest, ((x - x[chosen[-1]]) ** 2).sum(1))
            points = x[chosen]  # [r, D]
            for _ in range(SEED_LLOYD_STEPS):
                owner = torch.cdist(x, points).argmin(1)
                count = torch.bincount(owner, minlength=self.rank)[:, None]
                total = torch.zeros_like(points).index_add_(0, owner, x)
                # a seed left alone keeps its point
                points = torch.where(count > 1, total / count.clamp(min=1), points)
            distance, owner = torch.cdist(x, points).min(1)
            inertia = float((distance**2).sum())
            if inertia < best_inertia:
                best, best_inertia = (points, owner), inertia
        points, owner = best
        spread = torch.full_like(points, SEED_WIDTH)
        share = torch.zeros(self.rank, dtype=x.dtype)
        for k in range(self.rank):
            mine = x[owner == k]
            share[k] = max(len(mine), 1) / len(x)
            if len(mine) > 1:
                spread[k] = mine.std(0).clamp(min=1e-2)
        return points, spread, share

    # ---------------------------------------------------------------------------------- pieces
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def cores(self) -> list[torch.Tensor]:
        """The non-negative cores ``exp(θ_d)``, ``[r_{d-1}, m, r_d]``."""
        return [c.exp() for c in self.log_cores]

    def _bumps(self, x: torch.Tensor, t: torch.Tensor):
        """``(log φ^t [N, D, m], ∂_x log φ^t [N, D, m])`` of the diffused, normalised bumps
        (without the 2π constant)."""
        ab = self.alpha_bar.to(device=x.device)[t.long()].to(x.dtype)[:, None, None]  # [N, 1, 1]
        if self.bump == "box":
            return self._box_bumps(x, ab)
        h2 = (2 * self.log_width).exp()[None]  # [1, D, m]
        s2 = ab * h2 + (1 - ab)
        diff = x[:, :, None] - ab.sqrt() * self.centres[None]
        return -0.5 * (diff * diff / s2 + s2.log()), -diff / s2

    def _box_bumps(self, x: torch.Tensor, ab: torch.Tensor):
        """:meth:`_bumps` for boxes: the diffused box ``[c - h/2, c + h/2]`` has density
        ``(Φ(u_hi) - Φ(u_lo)) / (a h)``, ``u_hi = (y - a (c - h/2)) / s`` and ``u_lo = (y - a (c +
        h/2)) / s`` (``s = sqrt(1 - ᾱ)``), and log-derivative ``(φ(u_hi) - φ(u_lo)) / (s (Φ(u_hi)
        - Φ(u_lo)))``, both in log space (``1 / a`` is a per-sample scale and dropped)."""
        a, s = ab.sqrt(), (1 - ab).sqrt()
        h = self.log_width.exp()[None]  # [1, D, m]
        u_hi = (x[:, :, None] - a * (self.centres[None] - h / 2)) / s
        u_lo = (x[:, :, None] - a * (self.centres[None] + h / 2)) / s
        log_mass = log_normal_mass(u_hi, u_lo)
        dlog = (-0.5 * u_hi * u_hi - log_mass).exp() - (-0.5 * u_lo * u_lo - log_mass).exp()
        return log_mass - self.log_width[None], dlog / (s * math.sqrt(2 * math.pi))

    def _site_weights(self, x: torch.Tensor, t: torch.Tensor):
        """``(w, dw)``, each ``[D, m, N]`` (samples last: the elementwise products below then run
        along contiguous memory, 2-3x faster on a CPU than a batched product of ``N`` tiny
        matrices): ``w_i = φ^t_{d,i}(x_d)`` divided by their largest (a per-site scale that
        cancels) and ``dw_i = w_i ∂ log φ^t_{d,i}(x_d)``."""
        log_phi, dlog_phi = self._bumps(x, t)
        w = torch.exp(log_phi - log_phi.detach().amax(-1, keepdim=True))  # [N, D, m]
        return w.permute(1, 2, 0), (w * dlog_phi).permute(1, 2, 0)

    @staticmethod
    def _normalise(v: torch.Tensor) -> torch.Tensor:
        """``v [r, N] >= 0`` divided by its (detached) sum per sample: a scale that every ratio
        below cancels."""
        return v / v.detach().sum(0, keepdim=True).clamp(min=torch.finfo(v.dtype).tiny)

    @staticmethod
    def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        return num / den.clamp(min=torch.finfo(den.dtype).tiny)

    # ------------------------------------------------------------------------------- the model
    def score(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``∇_x log q_θ(x_t, t)``: ``[N, D]`` for flattened ``x_t [N, D]``."""
        N = x_t.shape[0]
        x = x_t.reshape(N, -1).to(self.log_cores[0].dtype)
        w, dw = self._site_weights(x, t)
        D = self.dim
        if D == 1:
            core = self.log_cores[0].exp()[0, :, 0]  # [m]
            return self._ratio(core @ dw[0], core @ w[0])[:, None]
        first, last = self.log_cores[0].exp()[0].T, self.log_cores[-1].exp()[:, :, 0]  # [r, m]
        a, da = first @ w[0], first @ dw[0]  # the first site's row vectors [r, N]
        b, db = last @ w[-1], last @ dw[-1]  # the last site's column vectors [r, N]
        sites = dM = ()
        if D > 2:  # the middle sites' matrices [D-2, r, r, N], one batched product each
            mid = torch.stack(list(self.log_cores[1:-1])).exp()  # [D-2, r, m, r]
            r, m = mid.shape[1], mid.shape[2]
            flat = mid.transpose(1, 2).reshape(D - 2, m, r * r).transpose(1, 2)
            M = torch.bmm(flat, w[1:-1]).view(D - 2, r, r, N)
            dM = torch.bmm(flat, dw[1:-1]).view(D - 2, r, r, N)
            sites = M.unbind(0)  # one backward for all (indexing would zero-fill M per site)
        # lefts[k]: the product of the sites left of middle site k (k = D-2: of the last
        # site); rights[j]: of the last j + 1 sites, each up to a scale
        left, right = self._normalise(a), self._normalise(b)
        lefts, rights = [left], [right]
        for j in range(D - 2):
            left = self._normalise((left[:, None] * sites[j]).sum(0))
            right = self._normalise((sites[-1 - j] * right[None]).sum(1))
            lefts.append(left)
            rights.append(right)
        cols = [self._ratio((da * rights[-1]).sum(0), (a * rights[-1]).sum(0))]
        if D > 2:
            outer = torch.stack(lefts[:-1])[:, :, None] * torch.stack(rights[-2::-1])[:, None]
            cols += self._ratio((outer * dM).sum((1, 2)), (outer * M).sum((1, 2))).unbind(0)
        cols.append(self._ratio((lefts[-1] * db).sum(0), (lefts[-1] * b).sum(0)))
        return torch.stack(cols, dim=1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``ε_θ(x_t, t) = -sqrt(1 - ᾱ_t) ∇ log q_θ``: ``[N, *data_shape]``."""
        ab = self.alpha_bar.to(device=x_t.device)[t.long()][:, None]
        eps = -(1 - ab).sqrt().to(self.log_cores[0].dtype) * self.score(x_t, t)
        return eps.to(x_t.dtype).reshape(x_t.shape)

    def log_density(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``log q_θ(x_t, t)`` up to a constant per ``t`` (``[N]``; the tests' autograd check):
        a plain loop over the sites, kept independent of :meth:`score`'s scan."""
        N = x_t.shape[0]
        x = x_t.reshape(N, -1).to(self.log_cores[0].dtype)
        log_phi, _ = self._bumps(x, t)
        left = torch.ones(N, 1, dtype=x.dtype, device=x.device)
        log = torch.zeros(N, dtype=x.dtype, device=x.device)
        for d, core in enumerate(self.cores()):
            top = log_phi[:, d].amax(-1, keepdim=True)
            total = torch.einsum("na,nm,amb->nb", left, torch.exp(log_phi[:, d] - top), core)
            norm = total.sum(-1, keepdim=True)
            left, log = total / norm, log + norm[:, 0].log() + top[:, 0]
        return log

    def flops_per_sample(self) -> int:
        """Analytic FLOPs of one ε: the bumps (~8 per bump; a box's two log-CDFs count as the
        same, so boxes are undercounted), ``M`` and ``dM`` (2 m r r' each),
        the two passes and the two bilinear forms per site (~6 r r')."""
        per_site = [
            8 * self.num_basis + 4 * self.num_basis * r0 * r1 + 6 * r0 * r1
            for r0, r1 in zip(self.ranks[:-1], self.ranks[1:])
        ]
        return int(sum(per_site))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, param=density, {self.bump} bumps={self.num_basis}, "
            f"ranks={self.ranks[1:-1]}, params={self.num_parameters():,}"
        )
