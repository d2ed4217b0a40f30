"""PAD's difficulty curriculum for expert training: scores and the per-epoch subset (plain torch).

PAD (Li et al., "Prioritize Alignment in Dataset Distillation") trains its experts
(``buffer/buffer_CL.py``) on a subset of the training set that changes with the epoch: every
class's examples are sorted from easiest to hardest by a difficulty score, training starts on the
easiest ``init_ratio`` of each class, the hard ones are added linearly until ``add_end_epoch``,
then the whole set is used, and from ``rm_epochs[k]`` on the easiest ``rm_easy_ratios[k]`` of
each class are left out. The reference ships its orders precomputed (``data_indices/*.pt``, made
with DeepCore's GraNd); here they are computed from the data:

- ``el2n``: ``||softmax(f(x)) - onehot(y)||_2`` (Paul et al., NeurIPS 2021);
- ``grand``: the norm of the loss gradient with respect to the last linear layer's weight and
  bias, ``||p - y||_2 * sqrt(1 + ||e(x)||_2^2)`` with ``e(x)`` the features that layer reads
  (DeepCore's GraNd, per example);

each averaged over ``repeats`` networks trained for ``epochs`` epochs from independent inits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

SCORES = ("el2n", "grand")


def el2n(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example EL2N: the L2 norm of the softmax output minus the one-hot label."""
    onehot = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return (logits.softmax(1) - onehot).norm(dim=1)


def grand_last_layer(
    logits: torch.Tensor, labels: torch.Tensor, features: torch.Tensor
) -> torch.Tensor:
    """Per-example norm of the cross-entropy gradient w.r.t. the last linear layer.

    For ``logits = W e + b`` the gradient is ``(p - y)`` for ``b`` and ``(p - y) e^T`` for ``W``,
    so its norm is ``||p - y|| * sqrt(1 + ||e||^2)``.
    """
    return el2n(logits, labels) * (1 + features.flatten(1).pow(2).sum(1)).sqrt()


@torch.no_grad()
def score_examples(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, score: str, batch_size: int = 512
) -> torch.Tensor:
    """``score`` (``el2n`` or ``grand``) of every example under ``net`` in eval mode, float64."""
    if score not in SCORES:
        raise ValueError(f"unknown difficulty score {score!r}; one of {SCORES}")
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        if score == "grand":
            features = net.embed(xb)
            logits = net.classifier(features)
            out.append(grand_last_layer(logits.double(), yb, features.double()).cpu())
        else:
            out.append(el2n(net(xb).double(), yb).cpu())
    net.train(was_training)
    return torch.cat(out)


def easy_to_hard(
    scores: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> list[torch.Tensor]:
    """Per class, the indices of its examples from the lowest score to the highest.

    Equal scores keep the dataset order (a stable sort).
    """
    order = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        order.append(idx[torch.sort(scores[idx], stable=True).indices])
    return order


def easy_fraction_added(epoch: int, init_ratio: float, add_end_epoch: int) -> float:
    """The share of each class used while hard examples are being added (linear in the epoch)."""
    if add_end_epoch <= 0:
        return 1.0
    return min(1.0, init_ratio + (1.0 - init_ratio) * epoch / add_end_epoch)


def epoch_subset(
    order: Sequence[torch.Tensor],
    epoch: int,
    *,
    init_ratio: float,
    add_end_epoch: int,
    rm_epochs: Sequence[int],
    rm_easy_ratios: Sequence[float],
) -> torch.Tensor:
    """The training indices of ``epoch`` (0-based), class by class.

    - ``epoch <= add_end_epoch``: the easiest ``int(p * n_c)`` of each class, ``p`` rising
      linearly from ``init_ratio`` to 1 (``easy_fraction_added``);
    - then all examples, until ``epoch > rm_epochs[0]``;
    - ``epoch > rm_epochs[k]`` (the last such ``k``): all but the easiest
      ``int(rm_easy_ratios[k] * n_c)`` of each class.
    """
    if epoch <= add_end_epoch:
        p = easy_fraction_added(epoch, init_ratio, add_end_epoch)
        return torch.cat([idx[: int(p * len(idx))] for idx in order])
    dropped = 0.0
    for start, ratio in zip(rm_epochs, rm_easy_ratios, strict=True):
        if epoch > start:
            dropped = ratio
    return torch.cat([idx[int(dropped * len(idx)) :] for idx in order])
