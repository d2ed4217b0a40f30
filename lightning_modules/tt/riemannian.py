"""Riemannian gradient descent on the manifold of fixed-rank TTs, for the FTT noise model.

At a TT ``X`` with left-orthogonal cores ``U_1..U_{K-1}`` (last core ``C``) and right-orthogonal
cores ``V_2..V_K``, the tangent space is ``{Σ_k U_<k δ_k V_>k}`` with the gauge conditions
``U_kᵀ δ_k = 0`` (left unfoldings) for ``k < K``. The orthogonal projection of a tensor ``Z`` onto
it has components

    δ_k = (I - U_k U_kᵀ) E_k  (k < K),   δ_K = E_K,   E_k = <Z, U_<k ⊗ · ⊗ V_>k>,

and for the Euclidean gradient ``Z = Σ_n w_n φ(u_n)`` of the loss (``w = dLoss/dy``), ``E_k`` is
the gradient in core ``k`` at the mixed canonical form: :func:`~.algebra.core_gradient` with
interfaces built from ``U`` on the left and ``V`` on the right. The components are mutually
orthogonal, so ``||grad||² = Σ_k ||δ_k||²``. A step ``X - α ξ`` is a TT of rank ``2r`` (block
cores) and TT-SVD rounding retracts it back to rank ``r``. The step size is relative: a fraction
``riemannian.lr`` of the exact minimiser of the batch loss along the line ``X - α ξ`` (the loss is
quadratic there; the output of ``ξ``, itself a rank-``2r`` TT, gives the minimiser in closed form).
Computations run in float64.

Long trains: ``U`` and ``V`` are kept in the scaled-orthogonal gauge of :mod:`.sweep`
(``U_k = c_k Û_k``, ``Û_k`` orthonormal), so their interfaces stay in range. With
``s_k = Π_{j<k} c^U_j Π_{j>k} c^V_j`` the gradient computed from them is ``E_k = s_k Ê_k``, and the
component stored for :func:`tangent_to_cores` (which multiplies it by ``s_k`` again) is
``P^⊥(E_k) / s_k²``; ``||grad||² = Σ_k ||P^⊥(E_k)||² / s_k²``. The interfaces are cached
(:mod:`.environments`): one gradient costs ``O(K)`` core updates, not ``O(K²)``. Short trains
never need a scalar (``s_k = 1``): the formulas above are then the plain ones.
"""

from __future__ import annotations

import math

import torch

from lightning_modules.errors import UserError
from lightning_modules.tt.algebra import Cores, full_tensor, round_tt
from lightning_modules.tt.environments import site_rhs
from lightning_modules.tt.ftt import FunctionalTT
from lightning_modules.tt.sweep import Sweep


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def project_gradients(left_cores: Cores, gradients: Cores) -> Cores:
    """Tangent components ``δ_k`` from the mixed-form gradients ``E_k`` (gauge ``U_kᵀ δ_k = 0``)."""
    deltas = []
    K = len(gradients)
    for k, (u, e) in enumerate(zip(left_cores, gradients)):
        if k == K - 1:
            deltas.append(e)
            continue
        P, r0, n, r1 = u.shape
        u2, e2 = u.reshape(P, r0 * n, r1), e.reshape(P, r0 * n, r1)
        deltas.append((e2 - u2 @ (u2.transpose(1, 2) @ e2)).reshape(P, r0, n, r1))
    return deltas


def _open_left(cores: Cores) -> torch.Tensor:
    """Product of ``cores`` with the left bond closed: ``[P, Π n, r]``."""
    out = cores[0][:, 0]
    for core in cores[1:]:
        out = torch.einsum("pxa,paib->pxib", out, core).flatten(1, 2)
    return out


def _open_right(cores: Cores) -> torch.Tensor:
    """Product of ``cores`` with the right bond closed: ``[P, r, Π n]``."""
    out = cores[-1][..., 0]
    for core in reversed(cores[:-1]):
        out = torch.einsum("paib,pbx->paix", core, out).flatten(2, 3)
    return out


def mixed_gradients(left_cores: Cores, right_cores: Cores, dense: torch.Tensor) -> Cores:
    """``E_k = <Z, U_<k ⊗ · ⊗ V_>k>`` for a dense ``Z [P, n_1, ..., n_K]`` (tests only)."""
    K, P = len(left_cores), dense.shape[0]
    out = []
    for k in range(K):
        n = dense.shape[1 + k]
        z = dense.reshape(P, math.prod(dense.shape[1 : 1 + k]), n, -1)
        one = torch.ones(P, 1, 1, dtype=dense.dtype, device=dense.device)
        lm = _open_left(left_cores[:k]) if k > 0 else one
        rm = _open_right(right_cores[k + 1 :]) if k < K - 1 else one
        out.append(torch.einsum("pxa,pxiy,pby->paib", lm, z, rm))
    return out


def tangent_dense(left_cores: Cores, right_cores: Cores, deltas: Cores) -> torch.Tensor:
    """``Σ_k U_<k δ_k V_>k`` as a dense tensor (tests only)."""
    K = len(deltas)
    return sum(full_tensor(left_cores[:k] + [deltas[k]] + right_cores[k + 1 :]) for k in range(K))


def tangent_to_cores(
    left_cores: Cores, right_cores: Cores, deltas: Cores, scale: float, *, point: bool = True
) -> Cores:
    """``X + scale · Σ_k U_<k δ_k V_>k`` as a TT of rank ``2r`` (block cores); with
    ``point=False`` the tangent vector ``scale · Σ_k U_<k δ_k V_>k`` alone (same blocks, the last
    one without ``X``).

    ``left_cores`` is the left-orthogonal form of ``X`` (its last core carries ``X``'s norm), and
    ``right_cores`` the right-orthogonal one (its first core is not used).
    """
    K = len(deltas)
    if K == 1:
        return [scale * deltas[0] + (left_cores[0] if point else 0)]
    cores = []
    for k in range(K):
        u, d = left_cores[k], scale * deltas[k]
        if k == 0:
            cores.append(torch.cat([d, u], dim=-1))
        elif k == K - 1:
            cores.append(torch.cat([right_cores[k], u + d if point else d], dim=1))
        else:
            v = right_cores[k]
            top = torch.cat([v, torch.zeros_like(u)], dim=-1)
            bottom = torch.cat([d, u], dim=-1)
            cores.append(torch.cat([top, bottom], dim=1))
    return cores


class RiemannianGD:
    """Riemannian gradient descent with Armijo backtracking for a :class:`FunctionalTT`.

    Args:
        net: the FTT; its cores are overwritten in place by each accepted step.
        lr: the relative step (``riemannian.lr``): each step's first trial is
            ``α = lr · α*``, where ``α*`` minimises the batch loss along the tangent line
            (:meth:`line_minimiser`); fixed at that without Armijo. A relative step does not
            depend on the gradient's scale, which shrinks like ``num_basis^(-K/2)`` with the number
            of cores ``K`` (an absolute step that suits 3 cores does not move 33: no descent at
            D = 30). ``α*`` fits the batch exactly along the line; fractions of it (0.01-0.1)
            average over batches as a learning rate does.
        armijo: backtrack from ``lr · α*`` until ``f(R(X - α ξ)) <= f(X) - c α ||ξ||²`` on the
            step's batch (``riemannian.armijo``); ``False`` takes the step ``lr · α*``.
        shrink: factor applied to ``α`` per backtrack (``riemannian.shrink``).
        max_backtracks: backtracks before giving up (``riemannian.max_backtracks``): a
            :class:`UserError` (one line: lower ``riemannian.lr``), since no descent from a nonzero
            gradient means the step size or the data are wrong, not that training converged.
        armijo_c: sufficient-decrease constant ``c``.
    """

    def __init__(
        self,
        net: FunctionalTT,
        *,
        lr: float,
        armijo: bool,
        shrink: float,
        max_backtracks: int,
        armijo_c: float = 1e-4,
    ):
        if not 0 < lr <= 1:
            raise UserError(
                f"riemannian.lr={lr}: a fraction of the line minimiser, in (0, 1] (e.g. 0.03)"
            )
        if not 0 < shrink < 1:
            raise UserError(f"riemannian.shrink={shrink}: use a factor in (0, 1), e.g. 0.5")
        if max_backtracks < 0:
            raise UserError(f"riemannian.max_backtracks={max_backtracks}: must be >= 0")
        self.net = net
        self.lr, self.armijo, self.shrink = float(lr), bool(armijo), float(shrink)
        self.max_backtracks, self.armijo_c = int(max_backtracks), float(armijo_c)
        self.rank = net.rank

    def _loss(self, cores, x_t, t, target, reduce_sum) -> float:
        y = self.net.evaluate(x_t, t, cores=cores)
        sse = reduce_sum(((y - target) ** 2).sum())
        count = reduce_sum(
            torch.tensor(float(target.numel()), dtype=torch.float64, device=y.device)
        )
        return float(sse / count)

    def riemannian_gradient(self, cores, x_t, t, target, reduce_sum=_identity):
        """``(U, V, δ, f)``: orthogonal forms, tangent components of the gradient, and the loss.

        ``U`` and ``V`` are in the scaled-orthogonal gauge (module docstring); ``Σ_k ||δ̂_k||²``
        in the orthonormal gauge is left in ``self._grad_sq`` (the stored ``δ_k`` may underflow
        on long trains while that sum does not). Interfaces come from cached environments over
        the whole batch: memory ``8 · N · (K + 1) · P · r`` bytes for ``N`` samples.
        """
        net = self.net
        K = len(cores)
        y = net.evaluate(x_t, t, cores=cores)
        count = reduce_sum(
            torch.tensor(float(target.numel()), dtype=torch.float64, device=y.device)
        )
        residual = y - target
        loss = float(reduce_sum((residual**2).sum()) / count)
        weights = 2 * residual / count  # dLoss/dy
        data = [(x_t, t, weights)]
        right = Sweep(net, cores, data, gram=False, reduce_sum=reduce_sum)
        right.centre_at_start()  # V: right-orthogonal (scaled), every right environment
        left = Sweep(net, cores, data, gram=False, reduce_sum=reduce_sum)  # U, built below
        deltas, grad_sq = [], torch.zeros((), dtype=torch.float64, device=y.device)
        log_v = torch.stack(right.log_gauge)  # [K, P] log c_k of V's cores
        for k in range(K):
            if k < K - 1:
                left.move_right(k)  # U_k left-orthogonal (scaled); its left env at k+1
            log_u = torch.stack(left.log_gauge)
            shape = left.cores[k].shape
            grad = reduce_sum(
                site_rhs(left.left[k][0], right.right[k + 1][0], left.chunks[0], k, shape)
            )
            log_s = log_u[:k].sum(0) + log_v[k + 1 :].sum(0)  # [P]
            if k < K - 1:
                P, r0, n, r1 = shape
                u = (left.cores[k] * (-log_u[k]).exp()[:, None, None, None]).reshape(P, r0 * n, r1)
                e = grad.reshape(P, r0 * n, r1)
                grad = (e - u @ (u.transpose(1, 2) @ e)).reshape(shape)
            # ||δ̂_k||² = ||P^⊥ E_k||² / s_k²; the stored component is P^⊥ E_k / s_k²
            grad_sq = grad_sq + ((grad**2).flatten(1).sum(1) * (-2 * log_s).exp()).sum()
            deltas.append(grad * (-2 * log_s).exp()[:, None, None, None])
            left.drop_left(k)
            right.drop_right(k + 1)
        self._grad_sq = float(grad_sq)
        return left.cores, right.cores, deltas, loss

    def line_minimiser(self, left, right, deltas, grad_sq, x_t, t, target, reduce_sum) -> float:
        """``α* = <y - target, dy> / <dy, dy>``: the step that minimises the batch loss along
        ``X - α ξ`` before retraction (the loss is quadratic in ``α`` there), with ``dy`` the
        output of the tangent vector ``ξ`` (a rank-``2r`` TT). The numerator is
        ``count · ||ξ||² / 2`` (``ξ`` is the projected gradient of ``Σ (y - target)² / count``),
        so only ``dy`` is evaluated. ``α*`` carries the scale of the gradient, which shrinks like
        ``num_basis^(-K/2)`` with the number of cores ``K``; 0 where ``dy`` vanishes."""
        dy = self.net.evaluate(
            x_t, t, cores=tangent_to_cores(left, right, deltas, 1.0, point=False)
        )
        count = reduce_sum(torch.tensor(float(target.numel()), dtype=dy.dtype, device=dy.device))
        curvature = reduce_sum((dy * dy).sum())
        best = float(count * grad_sq / (2 * curvature)) if curvature > 0 else 0.0
        return best if math.isfinite(best) else 0.0

    def step(
        self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, reduce_sum=_identity
    ) -> dict:
        """One Riemannian step on the batch.

        Returns:
            ``loss`` (before the step), ``loss_after``, ``step_size`` (``α``),
            ``line_minimiser`` (``α*``), ``grad_norm`` and ``backtracks``.
        """
        net = self.net
        cores = [c.detach().to(torch.float64) for c in net.cores]
        x_t = x_t.to(torch.float64)
        target = net.from_data_layout(eps.to(torch.float64))
        left, right, deltas, loss = self.riemannian_gradient(cores, x_t, t, target, reduce_sum)
        grad_sq = self._grad_sq  # Σ_k ||δ_k||² in the orthonormal gauge
        stats = {"loss": loss, "grad_norm": grad_sq**0.5, "backtracks": 0.0, "step_size": 0.0}
        best = 0.0
        if grad_sq > 0.0:
            best = self.line_minimiser(left, right, deltas, grad_sq, x_t, t, target, reduce_sum)
        stats["line_minimiser"] = best
        if best <= 0.0:  # a stationary point, or a tangent without output on this batch
            stats["loss_after"] = loss
            return stats
        alpha = self.lr * best
        for attempt in range(self.max_backtracks + 1):
            step = tangent_to_cores(left, right, deltas, -alpha)
            if not all(torch.isfinite(c).all() for c in step):
                new_loss = math.inf  # overflow: as bad as no descent
            else:
                candidate, _ = round_tt(step, self.rank)
                new_loss = self._loss(candidate, x_t, t, target, reduce_sum)
            if not math.isfinite(new_loss) and not self.armijo:
                raise UserError(
                    f"riemannian: the fixed step riemannian.lr={self.lr:g} made the loss "
                    "non-finite; lower riemannian.lr or set riemannian.armijo=true"
                )
            if not self.armijo or new_loss <= loss - self.armijo_c * alpha * grad_sq:
                with torch.no_grad():
                    for param, core in zip(net.cores, candidate):
                        param.copy_(core.to(param.dtype))
                stats.update(loss_after=new_loss, step_size=alpha, backtracks=float(attempt))
                return stats
            alpha *= self.shrink
        raise UserError(
            f"riemannian: no descent after {self.max_backtracks} backtracks from riemannian.lr="
            f"{self.lr:g} (loss {loss:.4g}, gradient norm {grad_sq**0.5:.3g}); lower riemannian.lr "
            "or raise riemannian.max_backtracks"
        )
