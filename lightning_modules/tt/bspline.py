"""Uniform B-spline bases for the functional tensor train (plain torch).

The construction is TTDE's: on a coordinate with support ``[l, r]``, ``m`` B-splines of degree
``q`` live on the uniform knots ``linspace(l - q h, r + q h, m + q + 1)`` with
``h = (r - l) / (m - q)``. They sum to one on ``[l, r]`` (partition of unity) and vanish outside
the extended band ``[l - q h, r + q h]``. Inputs are clamped into ``[l, r]`` before evaluation,
so every input sees a full partition of unity.

An input ``u`` in knot interval ``j`` (``q <= j <= m - 1``) touches only the ``q + 1`` splines
``j - q .. j``; :meth:`BSplineBasis.sparse` evaluates just those (the recursion below), and
:meth:`BSplineBasis.dense` evaluates all ``m`` by the textbook Cox-de Boor recursion, kept as an
independent reference for the tests.
"""

from __future__ import annotations

import torch

from lightning_modules.errors import UserError


class BSplineBasis:
    """``m`` degree-``q`` B-splines on each of ``C`` coordinates, each with its own support.

    Args:
        lower: ``[C]`` left ends ``l`` of the supports.
        upper: ``[C]`` right ends ``r`` of the supports (``r > l``).
        num_basis: ``m``, the number of splines per coordinate (``m > q``).
        degree: ``q``, the polynomial degree (2 in the draft).
    """

    def __init__(self, lower: torch.Tensor, upper: torch.Tensor, num_basis: int, degree: int = 2):
        lower = torch.as_tensor(lower, dtype=torch.float64).reshape(-1)
        upper = torch.as_tensor(upper, dtype=torch.float64).reshape(-1)
        if degree < 0:
            raise UserError(f"eps_net.degree={degree}: the B-spline degree must be >= 0")
        if num_basis <= degree:
            raise UserError(
                f"eps_net.num_basis={num_basis} must exceed eps_net.degree={degree} "
                f"(a degree-{degree} B-spline basis needs at least {degree + 1} functions)"
            )
        if lower.shape != upper.shape or not bool((upper > lower).all()):
            raise UserError("B-spline support: every upper bound must exceed its lower bound")
        self.num_basis = int(num_basis)
        self.degree = int(degree)
        self.lower = lower
        self.upper = upper
        self.step = (upper - lower) / (num_basis - degree)  # h
        # knots[c] = linspace(l - q h, r + q h, m + q + 1): uniform with spacing h
        grid = torch.arange(num_basis + degree + 1, dtype=torch.float64)
        self.knots = (lower - degree * self.step)[:, None] + grid[None, :] * self.step[:, None]

    @property
    def num_coords(self) -> int:
        return self.lower.numel()

    @property
    def active(self) -> int:
        """Splines that can be non-zero at one input: ``q + 1``."""
        return self.degree + 1

    def constant_coefficients(self) -> torch.Tensor:
        """``[C, m]`` ones: the splines sum to one on the support."""
        return torch.ones(self.num_coords, self.num_basis, dtype=torch.float64)

    def linear_coefficients(self) -> torch.Tensor:
        """``[C, m]`` with ``Σ_i c_i B_i(u) = u``: the Greville abscissae."""
        return self.greville()

    def greville(self) -> torch.Tensor:
        """``[C, m]`` Greville abscissae: ``Σ_i g_i B_i(u) = u`` on the support (degree >= 1)."""
        q = self.degree
        if q == 0:
            return (self.knots[:, :-1] + self.knots[:, 1:]) / 2
        windows = self.knots[:, 1:].unfold(1, q, 1)[:, : self.num_basis]  # knots i+1 .. i+q
        return windows.mean(-1)

    def clamp(self, u: torch.Tensor) -> torch.Tensor:
        """Clamp ``u`` (``[N, C]``) into the supports, where the splines sum to one."""
        lo = self.lower.to(device=u.device, dtype=u.dtype)
        hi = self.upper.to(device=u.device, dtype=u.dtype)
        return torch.maximum(torch.minimum(u, hi), lo)

    def sparse(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``q + 1`` active splines of each clamped input.

        Args:
            u: ``[N, C]`` inputs (clamped into the supports here).

        Returns:
            ``(values [N, C, q+1], first [N, C] int64)``: spline ``first + a`` takes
            ``values[..., a]``, every other spline is zero.
        """
        u = self.clamp(u)
        q, m = self.degree, self.num_basis
        lo = (self.lower - q * self.step).to(device=u.device, dtype=u.dtype)
        h = self.step.to(device=u.device, dtype=u.dtype)
        pos = (u - lo) / h  # position in knot units
        # interval j holds u in [t_j, t_{j+1}); the right end r = t_m belongs to interval m - 1
        interval = torch.clamp(torch.floor(pos), q, m - 1)
        s = (pos - interval).clamp(0.0, 1.0)
        values = torch.ones(*u.shape, 1, dtype=u.dtype, device=u.device)
        for k in range(1, q + 1):
            # uniform Cox-de Boor on the k+1 splines j-k..j touching interval j (index a = 0..k)
            a = torch.arange(k + 1, dtype=u.dtype, device=u.device)
            zero = torch.zeros_like(values[..., :1])
            prev_left = torch.cat([zero, values], dim=-1)  # N_{i, k-1} (old index a - 1)
            prev_right = torch.cat([values, zero], dim=-1)  # N_{i+1, k-1} (old index a)
            values = ((k - a + s[..., None]) * prev_left + (a + 1 - s[..., None]) * prev_right) / k
        return values, interval.to(torch.int64) - q

    def dense(self, u: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """All ``m`` splines by the Cox-de Boor recursion over the full knot vector.

        Args:
            u: ``[N, C]`` inputs.
            clamp: clamp into the supports first (what the model does); ``False`` shows the raw
                splines, which vanish outside the extended band.

        Returns:
            ``[N, C, m]`` spline values.
        """
        if clamp:
            u = self.clamp(u)
        q, m = self.degree, self.num_basis
        t = self.knots.to(device=u.device, dtype=u.dtype)  # [C, m+q+1]
        x = u[..., None]  # [N, C, 1]
        # degree 0: indicator of [t_i, t_{i+1})
        basis = ((x >= t[:, :-1]) & (x < t[:, 1:])).to(u.dtype)
        if q == 0:
            # piecewise constants are not continuous: close the last interval of [l, r] at r
            at_right_end = (u == self.upper.to(u))[..., None] & (
                torch.arange(m, device=u.device) == m - 1
            )
            basis = torch.where(at_right_end, torch.ones_like(basis), basis)
        for k in range(1, q + 1):
            left = (x - t[:, : m + q - k]) / (t[:, k : m + q] - t[:, : m + q - k])
            right = (t[:, k + 1 : m + q + 1] - x) / (
                t[:, k + 1 : m + q + 1] - t[:, 1 : m + q - k + 1]
            )
            basis = left * basis[..., :-1] + right * basis[..., 1:]
        return basis

    def densify(self, values: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """Scatter a :meth:`sparse` result into ``[N, C, m]``."""
        out = torch.zeros(*first.shape, self.num_basis, dtype=values.dtype, device=values.device)
        index = first[..., None] + torch.arange(self.degree + 1, device=first.device)
        return out.scatter_add_(-1, index, values)
