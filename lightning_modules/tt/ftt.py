"""The functional tensor train (FTT) noise model of the draft's eq. 9 (plain torch).

``y = Σ G_1[:, i_1, :] ... G_K[:, i_K, :] φ_{i_1}(u_1) ... φ_{i_K}(u_K)``: one TT core per input
coordinate, each contracted with a degree-``q`` B-spline basis (:mod:`.bspline`) of its input.

The cores are laid out along a chain of *sites*:

* ``("x", c)``: coordinate ``c`` of ``u = x_t + posenc(t)`` (``time="additive"``, the draft) or of
  ``x_t`` itself (``time="core"``), ``num_basis`` splines on the coordinate's support;
* ``("t", -1)`` (``time="core"``): the time step on its own core, ``time_basis`` splines over the
  normalised time ``t / (T - 1)`` in ``[0, 1]`` (what the authors' prototypes do: a 2-D
  sinusoidal encoding cannot tell t = 15 from t = 725);
* ``("out", -1)`` (``output="core"``): the output index ``j`` in ``0..D-1``, one slice per output
  coordinate, no basis.

Order: the first ``ceil(D / 2)`` coordinates, then the time core, then the output core, then the
remaining coordinates. Putting the time and output cores in the middle lets them meet a rank-r
interface on both sides, so the output is bilinear in r left and r right features
(``y_j = L^T G_out[:, j, :] R``) instead of linear in r features, which is what an output core
at either end would give. With ``output="per_coordinate"`` there are ``P = D`` independent TTs,
one per output coordinate (the authors' choice for 2-D/3-D), stored stacked: ``cores[k]`` has
shape ``[P, r_{k-1}, n_k, r_k]`` with ``P = D`` (per_coordinate) or ``P = 1`` (output core).

Interfaces. For core ``k`` and a batch, :meth:`FunctionalTT.interfaces` returns
``left [P, N, J, r_{k-1}]``, ``values [N, J, s]``, ``index [N, J, s]`` and
``right [P, N, J, r_k]`` (``J`` outputs per TT, 1 or ``D``; ``s`` active basis functions), and
the model output is linear in ``G_k``::

    y[p, n, j] = Σ_{a, s, b} left[p, n, j, a] * values[n, j, s]
                            * G_k[p, a, index[n, j, s], b] * right[p, n, j, b]

(:func:`.interfaces.contract_core`), with ``y[n]`` in data layout
``y.permute(1, 0, 2).reshape(N, P * J)``. Partial products are normalised per sample as they are
formed, the scale kept as a float64 log (:func:`.interfaces.renormalise`): a product of
thousands of cores would otherwise leave the float range.
``interfaces(..., normalised=True)`` hands that scale over in ``CoreInterfaces.log_scale``.
The optimisers use the cached form of the same products (:mod:`.environments`).
ALS solves for ``G_k`` from this; the Riemannian optimiser uses it for the projected gradient.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lightning_modules.diffusion.skip import fit_skip
from lightning_modules.errors import UserError
from lightning_modules.tt.algebra import check_ranks
from lightning_modules.tt.bases import make_basis
from lightning_modules.tt.bspline import BSplineBasis
from lightning_modules.tt.interfaces import CoreInterfaces, renormalise


def sinusoidal_encoding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer position encoding of integer steps ``t`` in ``dim`` dimensions (sin, cos pairs).

    In 2-D this is ``(sin t, cos t)``, the draft's ``posenc(t)``.
    """
    half = (dim + 1) // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, dtype=torch.float64, device=t.device) * 2 / dim
    )
    angles = t.to(torch.float64)[:, None] * freqs[None, :]
    enc = torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(t.shape[0], 2 * half)
    return enc[:, :dim]


# eps_net.output=auto: per-coordinate TTs up to this vector dimension (D TTs of D + 1 cores:
# 72 cores of r² m parameters at D = 8), one output core above it
AUTO_PER_COORDINATE_MAX_DIM = 8


class FunctionalTT(nn.Module):
    """Functional tensor train ``ε_θ(x_t, t)`` with B-spline bases (eq. 9 of the draft).

    Args:
        data_shape: shape of one sample (``(D,)`` for vectors, ``(C, H, W)`` for images).
        timesteps: ``T``, the number of diffusion steps (``t`` in ``0..T-1``).
        data_bounds: ``(lo, hi)``, per-coordinate min/max of the training data (shape
            ``data_shape``); ``None`` means ``[-1, 1]``. The support of each coordinate's splines is
            widened to cover the forward process: ``x_t = a x_0 + b ε`` with ``a² + b² = 1`` and
            ``|ε| <= margin`` stays within ``±sqrt(max(|lo|, |hi|)² + margin²)``.
        degree: B-spline degree ``q`` (2 in the draft).
        num_basis: splines per coordinate ``m``.
        rank: TT rank ``r`` of every inner bond.
        time: ``"additive"`` (``u = x_t + posenc(t)``, the draft) or ``"core"`` (t on its own core).
        output: ``"per_coordinate"`` (one TT per output coordinate), ``"core"`` (an
            output-index core) or ``"auto"``: per_coordinate for vectors of at most
            ``AUTO_PER_COORDINATE_MAX_DIM`` (8) coordinates, core otherwise.
        init: ``"identity"``: every core slice the identity, boundary cores ones-vectors, scaled so
            the output is exactly 1 everywhere (splines sum to one), for any ``D``;
            ``"linear"`` (per_coordinate only): the same, with each TT's own coordinate core
            weighted by the splines' Greville abscissae, so that ``ε_θ(x_t, t)_p = u_p`` (the
            clamped input), the optimal noise prediction at high noise for standardised data;
            ``"random"``; or ``"auto"``: linear with an output per coordinate, else identity.
        init_noise: standard deviation of Gaussian noise added to the identity slices. Pure
            identity slices make all rank components equal and gradient descent keeps them equal
            (the TT stays rank 1 in effect); a little noise breaks that symmetry.
        margin: half-width of the noise range in standard deviations of ε.
        time_basis: splines over the time core (``time="core"``); ``None`` means ``num_basis``.
        seed: seed of the initialisation noise.
        basis: ``bspline`` (degree ``q``, local), ``legendre`` or ``fourier`` (orthonormal on the
            support, all ``num_basis`` functions active; :mod:`.bases`) for the coordinate cores;
            the time core keeps B-splines (a Fourier basis would make t = 0 and t = T meet).
        skip: ``none``; ``gaussian`` / ``pca``: ``ε̂ = skip + c_out · gain · TT`` with the
            diagonal / principal-component Gaussian predictor of
            :mod:`lightning_modules.diffusion.skip` fitted to ``train_data`` and a scalar
            ``gain`` (``out_gain``) that starts at 0; ``auto``: pca with ``output="core"``.
        skip_components: principal directions of the ``pca`` skip (at most N - 1).
        train_data: ``[N, *data_shape]`` training data (model space) the skip is fitted to.
        alpha_bar: ``[timesteps]`` the schedule's ᾱ_t (needed by the skip).
        core_lr_scale: gradient optimisers step the cores with ``lr × core_lr_scale``; ``auto``:
            ``1 / sqrt(num_cores)`` with an output core, else 1 (:meth:`_set_core_lr_scale`).
        name: the config's name (ignored).
    """

    def __init__(
        self,
        data_shape: tuple[int, ...] = (2,),
        timesteps: int = 1000,
        data_bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
        degree: int = 2,
        num_basis: int = 16,
        rank: int = 8,
        time: str = "core",
        output: str = "per_coordinate",
        init: str = "identity",
        init_noise: float = 1e-2,
        margin: float = 3.0,
        time_basis: int | None = None,
        seed: int = 0,
        basis: str = "bspline",
        skip: str = "none",
        skip_components: int = 128,
        train_data: torch.Tensor | None = None,
        alpha_bar: torch.Tensor | None = None,
        core_lr_scale: float | str = 1.0,
        name: str = "ftt",
    ):
        super().__init__()
        if time not in ("additive", "core"):
            raise UserError(f"eps_net.time={time!r}: use additive (u = x_t + posenc(t)) or core")
        if output not in ("auto", "per_coordinate", "core"):
            raise UserError(f"eps_net.output={output!r}: use auto, per_coordinate or core")
        if output == "auto":  # D TTs of D + 1 cores each grow as D²: an output core beyond D = 8
            dim = math.prod(int(s) for s in data_shape)
            vector = len(tuple(data_shape)) == 1
            output = "per_coordinate" if vector and dim <= AUTO_PER_COORDINATE_MAX_DIM else "core"
        if init not in ("auto", "identity", "linear", "random"):
            raise UserError(f"eps_net.init={init!r}: use auto, identity, linear or random")
        if init == "auto":  # the toy suite: Adam and Riemannian need linear, ALS is neutral
            init = "linear" if output == "per_coordinate" else "identity"
        if init == "linear" and output != "per_coordinate":
            raise UserError(
                "eps_net.init=linear needs eps_net.output=per_coordinate (an output core of "
                "rank r cannot copy each of D inputs); use eps_net.init=identity"
            )
        if rank < 1:
            raise UserError(f"eps_net.rank={rank}: the TT rank must be >= 1")
        self.data_shape = tuple(int(s) for s in data_shape)
        self.dim = math.prod(self.data_shape)
        self.timesteps = int(timesteps)
        self.degree, self.num_basis, self.rank = int(degree), int(num_basis), int(rank)
        self.time_mode, self.output_mode, self.margin = time, output, float(margin)
        self.time_basis_size = int(time_basis or num_basis)
        if output == "per_coordinate" and len(self.data_shape) > 1:
            per_tt = self.dim * self.num_basis * self.rank**2
            raise UserError(
                f"eps_net.output=per_coordinate on {self.data_shape} data needs {self.dim} TTs "
                f"of ~{per_tt:,} parameters each ({self.dim * per_tt:,} in all); "
                "use eps_net.output=core"
            )
        self.num_tts = self.dim if output == "per_coordinate" else 1  # P
        self.num_outputs = 1 if output == "per_coordinate" else self.dim  # J

        lo, hi = _bounds(data_bounds, self.dim)
        reach_lo = torch.sqrt(torch.clamp(-lo, min=0) ** 2 + self.margin**2)
        reach_hi = torch.sqrt(torch.clamp(hi, min=0) ** 2 + self.margin**2)
        if time == "additive":
            # posenc(t) lies in [-1, 1]
            reach_lo, reach_hi = reach_lo + 1.0, reach_hi + 1.0
        self.basis_name = basis
        self.x_basis = make_basis(basis, -reach_lo, reach_hi, self.num_basis, self.degree)
        self.t_basis = BSplineBasis(
            torch.zeros(1), torch.ones(1), self.time_basis_size, self.degree
        )

        half = (self.dim + 1) // 2
        sites = [("x", c) for c in range(half)]
        sites += [("t", -1)] if time == "core" else []
        sites += [("out", -1)] if output == "core" else []
        sites += [("x", c) for c in range(half, self.dim)]
        self.sites = sites
        self.mode_sizes = [self._mode_size(kind) for kind, _ in sites]
        self.ranks = [1] + [self.rank] * (len(sites) - 1) + [1]
        check_ranks(self.mode_sizes, self.ranks, what="eps_net.rank")

        g = torch.Generator().manual_seed(int(seed))
        cores = [
            self._initial_core(k, init, init_noise, g, self._slice_weights(k, init))
            for k in range(len(sites))
        ]

        self.cores = nn.ParameterList(nn.Parameter(core) for core in cores)
        self._init_skip(skip, skip_components, train_data, alpha_bar)
        self._set_core_lr_scale(core_lr_scale)

    # ------------------------------------------------------------------ skip and lr scaling
    def _init_skip(self, skip: str, components: int, train_data, alpha_bar) -> None:
        """``skip=gaussian|pca``: ε̂ = skip + c_out · gain · TT (:mod:`..diffusion.skip`), gain 0
        at init so training starts from the fixed Gaussian predictor; ``auto``: pca with an
        output core (images), none otherwise."""
        if skip not in ("auto", "none", "gaussian", "pca"):
            raise UserError(f"eps_net.skip={skip!r}: use auto, none, gaussian or pca")
        if skip == "auto":
            skip = "pca" if self.output_mode == "core" else "none"
        self.skip_mode = skip
        self.skip: nn.Module | None = None
        if skip == "none":
            return
        if alpha_bar is None or train_data is None:
            raise UserError(f"eps_net.skip={skip} needs the schedule's alpha_bar and train_data")
        if train_data[0].numel() != self.dim:
            raise UserError(f"train_data has {train_data[0].numel()} coordinates, not {self.dim}")
        if len(alpha_bar) != self.timesteps:
            raise UserError(f"alpha_bar has {len(alpha_bar)} steps; timesteps={self.timesteps}")
        if components < 0:
            raise UserError(f"eps_net.skip_components={components}: must be >= 0")
        self.skip = fit_skip(skip, train_data.cpu(), alpha_bar.cpu(), components)
        self.out_gain = nn.Parameter(torch.zeros(()))

    def _set_core_lr_scale(self, scale: float | str) -> None:
        """Gradient optimisers step the cores with ``lr × scale`` (read from ``p.lr_scale``).

        ``auto``: ``1 / sqrt(num_cores)`` with an output core, else 1. Every core's gradient has
        the same component along the core itself, so Adam moves all K cores by about lr in the
        same direction and the output by about (1 ± lr)^K: at K = 3074 one step at lr 2e-3
        rescales it by e^±6 (measured: the TT collapses and adds nothing to its skip).
        """
        if scale == "auto":
            scale = 1 / math.sqrt(self.num_cores) if self.output_mode == "core" else 1.0
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            scale = float("nan")
        if not scale > 0:
            raise UserError(f"eps_net.core_lr_scale={scale}: use auto or a number > 0")
        self.core_lr_scale = scale
        for core in self.cores:
            core.lr_scale = scale

    # ----------------------------------------------------------------------------------- layout
    def _mode_size(self, kind: str) -> int:
        return {"x": self.num_basis, "t": self.time_basis_size, "out": self.num_outputs}[kind]

    def _slice_weights(self, k: int, init: str) -> torch.Tensor:
        """``[P, n_k]`` weights of the identity slices: Σ_i w_i φ_i(u) = 1 (splines: ones;
        global bases: φ_0 only), and for ``init=linear`` TT p's own coordinate core weighted so
        that Σ_i w_i φ_i(u) = u (splines: the Greville abscissae)."""
        kind, c = self.sites[k]
        weights = torch.ones(self.num_tts, self.mode_sizes[k], dtype=torch.float64)
        if kind == "x":
            weights[:] = self.x_basis.constant_coefficients()[c]
            if init == "linear":
                weights[c] = self.x_basis.linear_coefficients()[c]
        return weights

    def _initial_core(
        self, k: int, init: str, noise: float, g: torch.Generator, weights: torch.Tensor
    ) -> torch.Tensor:
        P, n, r0, r1 = self.num_tts, self.mode_sizes[k], self.ranks[k], self.ranks[k + 1]
        if init == "random":
            return torch.randn(P, r0, n, r1, generator=g) / math.sqrt(r0)
        # identity slices; a boundary core is a ones-vector, the first one scaled by 1/r so the
        # chain 1/r·1ᵀ I ... I 1 is exactly 1
        eye = torch.eye(r0, r1)
        if r0 == 1:
            eye = torch.ones(1, r1) / r1
        elif r1 == 1:
            eye = torch.ones(r0, 1)
        core = eye[None, :, None, :] * weights.to(eye.dtype)[:, None, :, None]
        if noise > 0:
            core += noise * torch.randn(core.shape, generator=g) * eye.abs().max()
        return core

    @property
    def num_cores(self) -> int:
        return len(self.sites)

    def tt(self, p: int) -> list[torch.Tensor]:
        """The cores ``[r_{k-1}, n_k, r_k]`` of TT ``p`` (output ``p`` for per_coordinate)."""
        return [core[p] for core in self.cores]

    def num_parameters(self) -> int:
        return sum(c.numel() for c in self.cores)

    # ------------------------------------------------------------------------------------ basis
    def site_basis(
        self, x_t: torch.Tensor, t: torch.Tensor, dtype: torch.dtype | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Active spline values and indices ``([N, s], [N, s])`` per site (``None``: out core)."""
        dtype = dtype or self.cores[0].dtype
        x = x_t.reshape(x_t.shape[0], -1).to(dtype)
        if self.time_mode == "additive":
            x = x + sinusoidal_encoding(t, self.dim).to(device=x.device, dtype=dtype)
        x_values, x_first = self.x_basis.sparse(x)  # [N, D, s], [N, D]
        tau = (t.to(dtype) / max(self.timesteps - 1, 1))[:, None]
        t_values, t_first = self.t_basis.sparse(tau)
        x_range = torch.arange(self.x_basis.active, device=x.device)
        t_range = torch.arange(self.t_basis.active, device=x.device)
        out = []
        for kind, c in self.sites:
            if kind == "x":
                out.append((x_values[:, c], x_first[:, c, None] + x_range))
            elif kind == "t":
                out.append((t_values[:, 0], t_first[:, 0, None] + t_range))
            else:
                out.append(None)
        return out

    # ------------------------------------------------------------------------------ contraction
    def _slice_matrix(
        self, core: torch.Tensor, basis: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """``Σ_s values[n, s] G[:, :, index[n, s], :]``: ``[P, N, r, r']``."""
        values, index = basis
        slices = core.permute(0, 2, 1, 3)[:, index]  # [P, N, s, r, r']
        return torch.einsum("ns,pnsab->pnab", values, slices)

    def _left_step(self, state, core, basis) -> torch.Tensor:
        """``state [P, N, J', r]`` times site ``core``: ``[P, N, J'', r']``."""
        if basis is None:
            return torch.einsum("pnxa,pajb->pnjb", state, core)
        return torch.einsum("pnja,pnab->pnjb", state, self._slice_matrix(core, basis))

    def _right_step(self, state, core, basis) -> torch.Tensor:
        """Site ``core`` times ``state [P, N, J', r']``: ``[P, N, J'', r]``."""
        if basis is None:
            return torch.einsum("pajb,pnxb->pnja", core, state)
        return torch.einsum("pnab,pnjb->pnja", self._slice_matrix(core, basis), state)

    def left_chain(self, cores, bases, stop: int, N: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Product of sites ``0..stop-1``, normalised per sample: ``([P, N, J', r], log [P, N])``.

        The product is ``state * exp(log)`` (``J' = J`` past the out core, else 1).
        """
        state = torch.ones(self.num_tts, N, 1, 1, dtype=cores[0].dtype, device=cores[0].device)
        log = torch.zeros(self.num_tts, N, dtype=torch.float64, device=cores[0].device)
        for k in range(stop):
            state, log = renormalise(self._left_step(state, cores[k], bases[k]), log)
        return state, log

    def right_chain(self, cores, bases, start: int, N: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Product of sites ``start..K-1`` as ``([P, N, J', r_start], log [P, N])``."""
        state = torch.ones(self.num_tts, N, 1, 1, dtype=cores[0].dtype, device=cores[0].device)
        log = torch.zeros(self.num_tts, N, dtype=torch.float64, device=cores[0].device)
        for k in range(self.num_cores - 1, start - 1, -1):
            state, log = renormalise(self._right_step(state, cores[k], bases[k]), log)
        return state, log

    def _left_vectors(self, cores, bases, stop: int, N: int) -> torch.Tensor:
        """Product of sites ``0..stop-1``: ``[P, N, J', r_stop]`` (scale folded in)."""
        state, log = self.left_chain(cores, bases, stop, N)
        return state * log.exp().to(state.dtype)[..., None, None]

    def _right_vectors(self, cores, bases, start: int, N: int) -> torch.Tensor:
        """Product of sites ``start..K-1`` as ``[P, N, J', r_start]`` (scale folded in)."""
        state, log = self.right_chain(cores, bases, start, N)
        return state * log.exp().to(state.dtype)[..., None, None]

    def interfaces(
        self,
        k: int,
        x_t: torch.Tensor,
        t: torch.Tensor,
        cores: list[torch.Tensor] | None = None,
        normalised: bool = False,
    ) -> CoreInterfaces:
        """Left and right interface matrices of core ``k`` for a batch (formula: module docstring).

        Args:
            k: core index in ``0..num_cores-1``.
            x_t: ``[N, *data_shape]`` noisy inputs.
            t: ``[N]`` int64 time steps.
            cores: cores to contract instead of the model's own (all but core ``k`` are used).
            normalised: keep the per-sample scale apart in ``log_scale`` (long trains: the folded
                interfaces of thousands of cores under- or overflow).
        """
        cores = list(self.cores) if cores is None else cores
        N, J = x_t.shape[0], self.num_outputs
        bases = self.site_basis(x_t, t, cores[0].dtype)
        left, left_log = self.left_chain(cores, bases, k, N)
        right, right_log = self.right_chain(cores, bases, k + 1, N)
        if bases[k] is None:
            values = torch.ones(N, J, 1, dtype=left.dtype, device=left.device)
            index = torch.arange(J, device=left.device)[None, :, None].expand(N, J, 1)
        else:
            values, index = bases[k][0][:, None, :], bases[k][1][:, None, :]
        shape = (self.num_tts, N, J)
        if normalised:
            log_scale = left_log + right_log
        else:
            left = left * left_log.exp().to(left.dtype)[..., None, None]
            right = right * right_log.exp().to(right.dtype)[..., None, None]
            log_scale = None
        return CoreInterfaces(
            left.expand(*shape, -1), values, index, right.expand(*shape, -1), log_scale
        )

    def evaluate(
        self, x_t: torch.Tensor, t: torch.Tensor, cores: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``y[p, n, j]`` for the given cores (the model's own by default).

        Partial products are normalised per sample with the scale carried as a log, so a train of
        thousands of cores stays finite in float32.
        """
        cores = list(self.cores) if cores is None else cores
        N = x_t.shape[0]
        bases = self.site_basis(x_t, t, cores[0].dtype)
        # meet at the output core (or at the end): both chains then stay J-free until the last step
        split = next((k for k, b in enumerate(bases) if b is None), self.num_cores)
        left, log = self.left_chain(cores, bases, split, N)  # [P, N, 1, r]
        if split == self.num_cores:
            y = left[..., 0]
        else:
            right, right_log = self.right_chain(cores, bases, split + 1, N)  # [P, N, 1, r']
            y = torch.einsum("pnxa,pajb,pnxb->pnj", left, cores[split], right)
            log = log + right_log
        return y * log.exp().to(y.dtype)[..., None]

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``ε_θ(x_t, t)``: ``[N, *data_shape]`` from ``x_t [N, *data_shape]`` and ``t [N]``."""
        y = self.evaluate(x_t, t).permute(1, 0, 2).reshape(x_t.shape[0], -1).to(x_t.dtype)
        if self.skip is not None:
            skip, c_out = self.skip(x_t.reshape(x_t.shape[0], -1), t)
            y = skip + c_out * self.out_gain * y
        return y.reshape(x_t.shape)

    def tt_target(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """What the TT alone is fitted to by ALS/DMRG/Riemannian (``[N, *data_shape]``): ``ε``
        without a skip; with one, the normalised residual ``(ε - skip) / (c_out · gain)``, which
        ``ε̂ = skip + c_out · gain · TT`` maps back to ``ε`` (the target of the Adam path up to
        its weighting: unit weight per normalised coordinate, EDM's choice)."""
        if self.skip is None:
            return eps
        skip, c_out = self.skip(x_t.reshape(x_t.shape[0], -1), t)
        scale = (c_out * self.out_gain.detach()).clamp(min=1e-4)
        return ((eps.reshape(skip.shape) - skip) / scale).reshape(eps.shape)

    def to_data_layout(self, y: torch.Tensor) -> torch.Tensor:
        """``y[p, n, j]`` → ``[N, P * J]``."""
        return y.permute(1, 0, 2).reshape(y.shape[1], -1)

    def from_data_layout(self, eps: torch.Tensor) -> torch.Tensor:
        """``eps [N, *data_shape]`` → ``[P, N, J]``, the layout of :meth:`evaluate`."""
        N = eps.shape[0]
        return eps.reshape(N, self.num_tts, self.num_outputs).permute(1, 0, 2)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # DMRG changes bond ranks: take the saved cores' shapes before loading them
        saved = [state_dict.get(f"{prefix}cores.{k}") for k in range(self.num_cores)]
        if all(c is not None for c in saved) and any(
            c.shape != p.shape for c, p in zip(saved, self.cores)
        ):
            device, dtype = self.cores[0].device, self.cores[0].dtype
            self.cores = nn.ParameterList(
                nn.Parameter(torch.empty(c.shape, device=device, dtype=dtype)) for c in saved
            )
            self.ranks = [1] + [int(c.shape[3]) for c in saved[:-1]] + [1]
            self.rank = max(self.ranks)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def flops_per_sample(self) -> int:
        """Analytic forward FLOPs for one sample (see :mod:`.flops`)."""
        from lightning_modules.tt.flops import ftt_forward_flops

        return ftt_forward_flops(self) + self._skip_flops()

    def _skip_flops(self) -> int:
        """The skip's FLOPs per sample: pca ~ 3 products of [D] with [D, k] (prediction, c_out),
        gaussian ~ 8 per coordinate; none 0."""
        if self.skip is None:
            return 0
        if self.skip_mode == "pca":
            return 6 * self.dim * int(self.skip.components.shape[1]) + 12 * self.dim
        return 8 * self.dim

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, cores={self.num_cores} ({', '.join(k for k, _ in self.sites)}), "
            f"basis={self.basis_name}, num_basis={self.num_basis}, ranks={self.ranks[1:-1]}, "
            f"degree={self.degree}, "
            f"time={self.time_mode}, "
            f"output={self.output_mode}, tts={self.num_tts}, params={self.num_parameters():,}"
        )


def _bounds(data_bounds, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    if data_bounds is None:
        return -torch.ones(dim, dtype=torch.float64), torch.ones(dim, dtype=torch.float64)
    lo, hi = data_bounds
    lo = torch.as_tensor(lo, dtype=torch.float64).reshape(-1).cpu()
    hi = torch.as_tensor(hi, dtype=torch.float64).reshape(-1).cpu()
    if lo.numel() == 1:
        lo, hi = lo.expand(dim), hi.expand(dim)
    if lo.numel() != dim or hi.numel() != dim:
        raise UserError(f"data_bounds have {lo.numel()} entries; the data has {dim} coordinates")
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise UserError("data_bounds are not finite: the training data has NaN or inf values")
    return lo, hi
