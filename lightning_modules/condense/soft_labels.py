"""Training on learned soft labels (plain torch): the loss of the soft-label evaluation protocol.

DATM and PAD learn one logit vector per synthetic image and evaluate by training fresh networks
against those labels with their ``SoftCrossEntropy`` (``distill/DATM.py`` and
``distill/evaluation.py`` of NUS-HPC-AI-Lab/DATM):

    loss = Σ_i Σ_c −log softmax(z_i)_c · softmax(y_i)_c / B

with ``z`` the network's logits, ``y`` the stored label logits and ``B`` the batch size (the
batch mean of the cross-entropy against the softmax of the labels). DD-Ranking's ``sce``
criterion is the same with both softmaxes at a temperature ``T`` (its default 1.2;
``temperature=1`` is DATM's). Everything else of the protocol (SGD, the lr schedule, DSA) is
the hard-label one of :mod:`lightning_modules.condense.evaluation`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cross_entropy(
    logits: torch.Tensor, label_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Batch mean of ``−Σ_c softmax(y/T)_c · log softmax(z/T)_c``; ``[B, C]`` both."""
    if logits.shape != label_logits.shape:
        raise ValueError(
            f"soft labels {tuple(label_logits.shape)} do not match logits {tuple(logits.shape)}"
        )
    target = F.softmax(label_logits / temperature, dim=1)
    return -(target * F.log_softmax(logits / temperature, dim=1)).sum() / logits.shape[0]


def label_loss(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Cross-entropy against hard labels ``[B]`` (int) or soft label logits ``[B, C]`` (float)."""
    if labels.dim() == 2:
        return soft_cross_entropy(logits, labels, temperature)
    return F.cross_entropy(logits, labels)


def is_soft(labels: torch.Tensor) -> bool:
    """Whether ``labels`` are label logits ``[N, C]`` rather than class indices ``[N]``."""
    return labels.dim() == 2
