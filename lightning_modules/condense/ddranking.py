"""DD-Ranking's scores of a distilled set (plain torch/numpy).

Source: NUS-HPC-AI-Lab/DD-Ranking (2025), ``doc/metrics/`` and the README's definitions.

With accuracies as fractions of the test set:

- HLR (hard-label recovery) = Acc(full train set, hard labels) − Acc(set, hard labels); lower is
  better.
- IOR (improvement over random) = Acc(set, its own protocol) − Acc(random real subset of the same
  size, the same protocol); higher is better. The "own protocol" of a soft-label set is training
  on its soft labels (the random subset then gets soft labels from a teacher), of a hard-label
  set training on hard labels.
- LRS (label-robust score) = N(w·IOR − (1 − w)·HLR), w = 0.5 by default.
- ARS (augmentation-robust score) = N(γ·(set_aug − random_aug) + (1 − γ)·(set_noaug −
  random_noaug)), γ = 0.5, all under the set's own label protocol.
- N(a) = (e^a − e^−1) / (e − e^−1) maps a ∈ [−1, 1] onto [0, 1].

The documentation normalises "to [0, 1]", which needs the accuracies as fractions; the
package's code (``ddranking/metrics/*.py``, version 0.2.0) feeds percentages into the same
exponentials, which sends N far outside [0, 1] (e.g. HLR 20, IOR 5 points gives −0.156). This
module follows the documentation: HLR and IOR are reported in percentage points (like the
accuracies), LRS and ARS as N(·) × 100 with the accuracies divided by 100 inside, so both lie in
[0, 100]. Scores are computed per evaluation round (network ``k`` of each set, the rounds paired)
and averaged, as DD-Ranking averages its rounds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def normalise(a: float) -> float:
    """N(a) = (e^a − e^−1) / (e − e^−1)."""
    return (math.exp(a) - math.exp(-1.0)) / (math.exp(1.0) - math.exp(-1.0))


def hlr(full_acc: float, set_hard_acc: float) -> float:
    """Hard-label recovery in percentage points (accuracies in %)."""
    return float(full_acc) - float(set_hard_acc)


def ior(set_acc: float, random_acc: float) -> float:
    """Improvement over random in percentage points (accuracies in %, the same protocol)."""
    return float(set_acc) - float(random_acc)


def lrs(hlr_points: float, ior_points: float, weight: float = 0.5) -> float:
    """Label-robust score in % of its range: 100 · N(w · IOR/100 − (1 − w) · HLR/100)."""
    return 100.0 * normalise(weight * ior_points / 100.0 - (1.0 - weight) * hlr_points / 100.0)


def ars(
    set_aug: float, random_aug: float, set_noaug: float, random_noaug: float, weight: float = 0.5
) -> float:
    """Augmentation-robust score in % of its range (accuracies in %)."""
    beta = weight * (set_aug - random_aug) + (1.0 - weight) * (set_noaug - random_noaug)
    return 100.0 * normalise(beta / 100.0)


def _stats(values: Sequence[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "runs": list(values)}


def round_scores(
    *,
    full_acc: float | None,
    set_hard: Sequence[float] | None,
    set_own: Sequence[float] | None,
    random_own: Sequence[float] | None,
    set_noaug: Sequence[float] | None = None,
    random_noaug: Sequence[float] | None = None,
    lrs_weight: float = 0.5,
    ars_weight: float = 0.5,
) -> dict:
    """HLR, IOR, LRS (and ARS) per round and as mean/std over the rounds.

    The sequences hold one accuracy (%) per evaluation network; round ``k`` pairs network ``k``
    of each. A score whose inputs are missing is ``None``. Returns ``{"hlr": {"mean", "std",
    "runs"} | None, "ior": ..., "lrs": ..., "ars": ...}``.
    """
    out: dict = {"hlr": None, "ior": None, "lrs": None, "ars": None}
    h = [hlr(full_acc, a) for a in set_hard] if full_acc is not None and set_hard else None
    i = [ior(s, r) for s, r in zip(set_own, random_own)] if set_own and random_own else None
    if h is not None:
        out["hlr"] = _stats(h)
    if i is not None:
        out["ior"] = _stats(i)
    if h is not None and i is not None:
        out["lrs"] = _stats([lrs(hk, ik, lrs_weight) for hk, ik in zip(h, i)])
    if i is not None and set_noaug and random_noaug:
        rounds = zip(set_own, random_own, set_noaug, random_noaug)
        out["ars"] = _stats([ars(a, b, c, d, ars_weight) for a, b, c, d in rounds])
    return out


def random_subset_indices(
    train_labels: torch.Tensor, per_class: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Indices of a random real subset with ``per_class[c]`` images of class ``c``, drawn
    without replacement from ``generator``; class-sorted like a distilled set."""
    picks = []
    for c, k in enumerate(per_class.tolist()):
        if k == 0:
            continue
        pool = torch.nonzero(train_labels == c).flatten()
        if len(pool) < k:
            raise ValueError(f"class {c} has {len(pool)} training images, the set {k}")
        picks.append(pool[torch.randperm(len(pool), generator=generator)[:k]])
    return torch.cat(picks) if picks else torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def mean_logits(nets: Sequence[torch.nn.Module], images: torch.Tensor, batch_size: int = 256):
    """The logits of ``images`` averaged over ``nets`` (eval mode), ``[N, C]`` float32."""
    total = None
    for net in nets:
        net.eval()
        out = torch.cat([net(x) for x in images.split(batch_size)]).float()
        total = out if total is None else total + out
    return total / len(nets)
