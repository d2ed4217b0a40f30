"""DATM's policy pieces (Guo et al., ICLR 2024, "Towards Lossless Dataset Distillation via
Difficulty-Aligned Trajectory Matching"), plain torch; the unroll and the masked loss are the
family's shared ones (:mod:`.unroll`, :mod:`.matching`).

- :func:`start_epoch_upper`: the difficulty-aligned start window. Start epochs are drawn from
  ``min_start_epoch .. upper - 1`` where ``upper`` rises linearly from
  ``current_max_start_epoch`` to ``max_start_epoch`` over ``expansion_end_epoch`` iterations
  (early: easy, early-epoch trajectories only).
- :func:`correctly_classified`: initial images drawn from the real images an expert classifies
  correctly (the reference's ``pix_init: samples_predicted_correctly``).
- :func:`expert_label_logits`: the initial soft labels, an expert's logits on the initial images
  (averaged over the experts that classify each image correctly).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

#: ``logits_fn(theta, x) -> [B, classes]``: a network evaluated at flat parameters
LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def start_epoch_upper(
    iteration: int,
    *,
    max_start_epoch: int,
    current_max_start_epoch: int | None = None,
    expansion_end_epoch: int | None = None,
) -> int:
    """Exclusive upper bound of the start epoch at ``iteration``.

    ``current_max_start_epoch`` None: no rising window, the bound is ``max_start_epoch``.
    Otherwise ``min(cur + floor((max - cur) * iteration / expansion_end), max)``: the
    reference's ``Sequential_Generation`` rule (``int()`` truncation, iteration counted from 0).
    """
    if current_max_start_epoch is None:
        return int(max_start_epoch)
    cur, top = int(current_max_start_epoch), int(max_start_epoch)
    grow = int((top - cur) * int(iteration) / int(expansion_end_epoch))
    return min(cur + grow, top)


@torch.no_grad()
def batched_logits(
    logits_fn: LogitsFn, theta: torch.Tensor, x: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """``logits_fn(theta, x)`` in batches of ``batch_size`` (on ``theta``'s device), on the CPU,
    in the network's dtype."""
    parts = []
    for i in range(0, len(x), batch_size):
        parts.append(logits_fn(theta, x[i : i + batch_size].to(theta.device)).cpu())
    return torch.cat(parts)


@torch.no_grad()
def correctly_classified(
    logits_fn: LogitsFn,
    experts: Sequence[torch.Tensor],
    candidates: torch.Tensor,
    label: int,
    count: int,
    batch_size: int = 256,
) -> torch.Tensor | None:
    """Indices into ``candidates`` (images of class ``label``, in a random order) of the first
    ``count`` images that ``experts[0]`` classifies as ``label``; when it finds fewer, the next
    experts add theirs (the reference moves on to another expert the same way). Returned in
    candidate order; None when all experts together find fewer than ``count``."""
    chosen: list[int] = []
    for theta in experts:
        for start in range(0, len(candidates), batch_size):
            pred = logits_fn(theta, candidates[start : start + batch_size].to(theta.device))
            for i in (pred.argmax(1).cpu() == label).nonzero().squeeze(1).tolist():
                if start + i not in chosen:
                    chosen.append(start + i)
                if len(chosen) == count:
                    return torch.tensor(sorted(chosen))
    return None


@torch.no_grad()
def expert_label_logits(
    logits_fn: LogitsFn,
    experts: Sequence[torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    only_correct: bool,
    batch_size: int = 256,
) -> torch.Tensor:
    """Initial soft labels ``[N, classes]``: expert logits on ``images``.

    ``only_correct=True`` (the reference with correctly-classified initial images): for each image
    the mean of the logits of the experts whose prediction is its class ``labels[n]`` (an image
    that no expert gets right has no such mean: ``ValueError``). ``False`` (the reference with
    random real images): the logits of ``experts[0]`` alone.
    """
    if not only_correct:
        return batched_logits(logits_fn, experts[0], images, batch_size)
    total, hits = None, torch.zeros(len(images))
    for theta in experts:
        logits = batched_logits(logits_fn, theta, images, batch_size).double()
        right = logits.argmax(1) == labels.cpu()
        part = logits * right.unsqueeze(1)
        total = part if total is None else total + part
        hits += right
    if bool((hits == 0).any()):
        n = int((hits == 0).nonzero()[0])
        raise ValueError(f"no expert classifies initial image {n} (class {int(labels[n])}) right")
    return (total / hits.unsqueeze(1).double()).to(images.dtype)
