"""Trajectory matching with parameter pruning, on flat parameter vectors (plain torch).

The student ends at θ̃_J after J unrolled steps from the expert's θ_i; the expert reached θ_{i+K}.
Pruning (Li et al. 2024, REFERENCE.md A.3) drops the indices k whose signed ratio
r_k = θ̃_{J,k} / θ_{i+K,k} is below ε or whose inverse is below ε; the matching loss (A.4) is the
MTT loss over the kept indices only, numerator and denominator masked alike:

    L = ||m ⊙ (θ̃_J - θ_{i+K})||² / ||m ⊙ (θ_i - θ_{i+K})||²

ε = 0 turns pruning off (mask all ones), which is plain MTT exactly.

>>> mask = prune_mask(student_end, target, eps=0.1)          # no gradient, bool [P]
>>> loss = matching_loss(student_end, start, target, mask)   # differentiable in student_end
"""

from __future__ import annotations

import torch


def check_eps(eps: float) -> float:
    """ε as a float, or ``ValueError`` unless 0 <= ε < 1 (ε >= 1 would drop every index)."""
    eps = float(eps)
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"pruning threshold eps must be in [0, 1), got {eps}")
    return eps


@torch.no_grad()
def prune_mask(student_end: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    """Keep-mask of the signed-ratio pruning rule: ``True`` where index k is matched.

    With r = student_end / target, index k is dropped when ``r < eps`` or ``1/r < eps``. For
    0 < eps < 1 that is: the signs differ, or one magnitude is below eps times the other. The
    rule is evaluated without dividing, so there is no inf/nan:

    - both entries zero (0/0): kept; the two agree exactly and contribute nothing to the loss.
    - exactly one entry zero: dropped (r = 0 or 1/r = 0, both below any eps > 0).
    - eps = 0: every index is kept (pruning off: plain MTT), the signed rule is not applied.

    Args:
        student_end: θ̃_J, the student's last parameters ``[P]`` (gradient is ignored).
        target: θ_{i+K}, the expert's parameters ``[P]``.
        eps: threshold in [0, 1).

    Returns:
        bool tensor ``[P]``, ``True`` = kept.
    """
    eps = check_eps(eps)
    if student_end.shape != target.shape:
        raise ValueError(
            f"shapes differ: student {tuple(student_end.shape)}, target {tuple(target.shape)}"
        )
    if eps == 0.0:
        return torch.ones_like(target, dtype=torch.bool)
    s, t = student_end.detach(), target.detach()
    both_zero = (s == 0) & (t == 0)
    same_sign = torch.sign(s) * torch.sign(t) > 0  # sign products stay exact even for tiny values
    s_abs, t_abs = s.abs(), t.abs()
    close = (s_abs >= eps * t_abs) & (t_abs >= eps * s_abs)
    return both_zero | (same_sign & close)


def pruned_fraction(mask: torch.Tensor) -> float:
    """Fraction of indices dropped by ``mask`` (0 when nothing is pruned)."""
    return 1.0 - mask.float().mean().item()


def matching_loss(
    student_end: torch.Tensor,
    start: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Normalised trajectory-matching loss over the kept indices (MTT's loss when unmasked).

    Args:
        student_end: θ̃_J ``[P]`` (carries the graph back to the images and α).
        start: θ_i ``[P]``, where student and expert started.
        target: θ_{i+K} ``[P]``.
        mask: bool keep-mask ``[P]`` from :func:`prune_mask`, or ``None`` for no pruning.

    Returns:
        scalar ``||m⊙(θ̃_J - θ_{i+K})||² / ||m⊙(θ_i - θ_{i+K})||²``; non-finite when the masked
        denominator is zero (the caller skips such an update).
    """
    diff = student_end - target
    span = start - target
    if mask is not None:
        # where() rather than indexing keeps shapes fixed; masked entries get zero gradient
        diff = torch.where(mask, diff, torch.zeros((), dtype=diff.dtype, device=diff.device))
        span = torch.where(mask, span, torch.zeros((), dtype=span.dtype, device=span.device))
    return diff.pow(2).sum() / span.pow(2).sum()


# -- PAD's parameter selection (Li et al. 2024, "Prioritize Alignment in Dataset Distillation") --
def check_ratio(name: str, ratio: float) -> float:
    """``ratio`` as a float, or ``ValueError`` unless 0 <= ratio < 1 (1 would drop everything)."""
    ratio = float(ratio)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {ratio}")
    return ratio


def depth_mask(numel: int, depth_ratio: float, device=None) -> torch.Tensor:
    """Keep-mask dropping the first ``floor(depth_ratio * numel)`` entries of the flat vector.

    The flat order is the network's parameter order (input layer first), so this drops the
    shallow layers' parameters, as PAD's depth variant does (a fraction of the parameter count,
    not of the layers; the cut can fall inside a layer).
    """
    depth_ratio = check_ratio("depth_ratio", depth_ratio)
    keep = torch.ones(numel, dtype=torch.bool, device=device)
    keep[: int(depth_ratio * numel)] = False
    return keep


@torch.no_grad()
def loss_ratio_mask(
    student_end: torch.Tensor,
    target: torch.Tensor,
    loss_ratio: float,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keep-mask dropping the ``loss_ratio`` fraction of parameters with the SMALLEST squared
    error (θ̃_J - θ_{i+K})², PAD's loss variant (the easiest-to-match parameters go).

    Among the entries ``keep`` already keeps (all when None), the errors are sorted ascending
    (a stable sort: ties keep their index order) and the first ``floor(loss_ratio * n_kept)``
    are dropped. With ``keep=None`` this is the reference's rule exactly.
    """
    loss_ratio = check_ratio("loss_ratio", loss_ratio)
    out = torch.ones_like(target, dtype=torch.bool) if keep is None else keep.clone()
    if loss_ratio == 0.0:
        return out
    err = (student_end.detach() - target.detach()).pow(2)
    kept = out.nonzero().squeeze(1)
    order = torch.sort(err[kept], stable=True).indices
    out[kept[order[: int(loss_ratio * len(kept))]]] = False
    return out


def selection_mask(
    student_end: torch.Tensor,
    target: torch.Tensor,
    *,
    eps: float = 0.0,
    depth_ratio: float = 0.0,
    loss_ratio: float = 0.0,
) -> torch.Tensor:
    """The trajectory-matching family's one keep-mask: ε pruning (signed ratios), then PAD's
    depth cut, then PAD's smallest-error cut among what is left. All zeros-off = plain MTT."""
    keep = prune_mask(student_end, target, eps)
    if depth_ratio:
        keep &= depth_mask(target.numel(), depth_ratio, device=target.device)
    if loss_ratio:
        keep = loss_ratio_mask(student_end, target, loss_ratio, keep)
    return keep
