"""Global bases beside the B-splines (the draft's §4.1.1): Legendre polynomials and Fourier.

Both are orthonormal on each coordinate's support ``[l, r]`` with respect to the uniform
probability measure, ``(1 / (r - l)) ∫ φ_i φ_j = δ_ij``, so ``φ_0 = 1`` and a TT whose slices
select ``φ_0`` is the constant 1 (the identity initialisation). Inputs are clamped into the
support as for the splines. Every function is active everywhere, so :meth:`sparse` returns all
``m`` values with ``first = 0`` and the FTT contractions (which index ``first + 0..s-1``) work
unchanged; the B-spline interface is mirrored (``num_basis``, ``active``, ``clamp``, ``sparse``,
``dense``, ``constant_coefficients``, ``linear_coefficients``).

* Legendre: ``φ_k(u) = sqrt(2k + 1) P_k(s)``, ``s = 2 (u - l) / (r - l) - 1``, degrees
  ``0..m-1`` (Bonnet's recursion).
* Fourier: ``1, sqrt2 cos(2π s), sqrt2 sin(2π s), sqrt2 cos(4π s), ...`` with
  ``s = (u - l) / (r - l)``, the first ``m`` of them (periodic on the support: the clamped ends
  meet).
"""

from __future__ import annotations

import math

import torch

from lightning_modules.errors import UserError


class _GlobalBasis:
    name = "global"

    def __init__(self, lower: torch.Tensor, upper: torch.Tensor, num_basis: int, degree=None):
        lower = torch.as_tensor(lower, dtype=torch.float64).reshape(-1)
        upper = torch.as_tensor(upper, dtype=torch.float64).reshape(-1)
        if num_basis < 1:
            raise UserError(
                f"eps_net.num_basis={num_basis}: need at least one {self.name} function"
            )
        if lower.shape != upper.shape or not bool((upper > lower).all()):
            raise UserError(f"{self.name} support: every upper bound must exceed its lower bound")
        self.lower, self.upper, self.num_basis = lower, upper, int(num_basis)

    @property
    def num_coords(self) -> int:
        return self.lower.numel()

    @property
    def active(self) -> int:
        """Functions that can be non-zero at one input: all of them."""
        return self.num_basis

    def clamp(self, u: torch.Tensor) -> torch.Tensor:
        lo = self.lower.to(device=u.device, dtype=u.dtype)
        hi = self.upper.to(device=u.device, dtype=u.dtype)
        return torch.maximum(torch.minimum(u, hi), lo)

    def _unit(self, u: torch.Tensor) -> torch.Tensor:
        """Clamped input mapped to ``[0, 1]``."""
        lo = self.lower.to(device=u.device, dtype=u.dtype)
        hi = self.upper.to(device=u.device, dtype=u.dtype)
        return (self.clamp(u) - lo) / (hi - lo)

    def dense(self, u: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        raise NotImplementedError

    def sparse(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values [N, C, m], first [N, C] = 0)``: the B-spline layout with every function on."""
        values = self.dense(u)
        return values, torch.zeros(values.shape[:-1], dtype=torch.int64, device=u.device)

    def constant_coefficients(self) -> torch.Tensor:
        """``[C, m]`` with ``Σ_i c_i φ_i = 1``: ``φ_0`` alone."""
        c = torch.zeros(self.num_coords, self.num_basis, dtype=torch.float64)
        c[:, 0] = 1.0
        return c

    def linear_coefficients(self) -> torch.Tensor:
        """``[C, m]`` least-squares coefficients of ``u`` itself on the support (orthonormality:
        ``c_i = mean(u φ_i)`` by the trapezoid rule on a fine grid)."""
        grid = torch.linspace(0, 1, 4001, dtype=torch.float64)
        u = self.lower[:, None] + grid[None, :] * (self.upper - self.lower)[:, None]  # [C, G]
        values = self.dense(u.T)  # [G, C, m]
        weights = torch.full((len(grid),), 1.0, dtype=torch.float64)
        weights[0] = weights[-1] = 0.5  # trapezoid rule
        weights /= weights.sum()
        return torch.einsum("g,gc,gcm->cm", weights, u.T, values)


class LegendreBasis(_GlobalBasis):
    """Orthonormal Legendre polynomials of degree ``0..num_basis-1`` on each support."""

    name = "legendre"

    def linear_coefficients(self) -> torch.Tensor:
        """Exact: ``u = mid + half · s = mid φ_0 + (half / sqrt 3) φ_1``."""
        c = torch.zeros(self.num_coords, self.num_basis, dtype=torch.float64)
        c[:, 0] = (self.lower + self.upper) / 2
        if self.num_basis > 1:
            c[:, 1] = (self.upper - self.lower) / 2 / 3**0.5
        return c

    def dense(self, u: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        s = 2 * self._unit(u) - 1
        values = [torch.ones_like(s), s]
        for k in range(1, self.num_basis - 1):
            # Bonnet: (k + 1) P_{k+1} = (2k + 1) s P_k - k P_{k-1}
            values.append(((2 * k + 1) * s * values[k] - k * values[k - 1]) / (k + 1))
        norms = torch.sqrt(2 * torch.arange(self.num_basis, dtype=u.dtype, device=u.device) + 1)
        return torch.stack(values[: self.num_basis], -1) * norms


class FourierBasis(_GlobalBasis):
    """``1, sqrt2 cos(2πks), sqrt2 sin(2πks)`` for ``k = 1, 2, ...``: the first ``num_basis``."""

    name = "fourier"

    def dense(self, u: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        s = self._unit(u)
        values = [torch.ones_like(s)]
        k = 1
        while len(values) < self.num_basis:
            angle = 2 * math.pi * k * s
            values += [math.sqrt(2) * torch.cos(angle), math.sqrt(2) * torch.sin(angle)]
            k += 1
        return torch.stack(values[: self.num_basis], -1)


BASES = ("bspline", "legendre", "fourier")


def make_basis(name: str, lower, upper, num_basis: int, degree: int = 2):
    """The basis called ``name`` (``eps_net.basis``) on the supports ``[lower, upper]``."""
    from lightning_modules.tt.bspline import BSplineBasis

    if name == "bspline":
        return BSplineBasis(lower, upper, num_basis, degree)
    if name == "legendre":
        return LegendreBasis(lower, upper, num_basis)
    if name == "fourier":
        return FourierBasis(lower, upper, num_basis)
    raise UserError(f"eps_net.basis={name!r}: use one of {', '.join(BASES)}")
