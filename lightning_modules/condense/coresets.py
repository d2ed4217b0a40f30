"""Coreset selection baselines: random, herding and forgetting, per class (plain torch).

Every selector returns indices into the training set with exactly ``ipc`` examples of each
class, ordered class by class (and, within a class, in the selector's order).

- Random: a seeded uniform draw without replacement.
- Herding (Welling 2009; as in iCaRL / the DC benchmark): greedily add the example whose
  feature brings the mean of the selected features closest to the class mean.
- Forgetting (Toneva et al., ICLR 2019): count, per example, the transitions from correctly
  to incorrectly classified between two consecutive presentations during training; keep the
  most forgotten examples (never-learned examples count as most forgotten).
"""

from __future__ import annotations

import torch

from lightning_modules.errors import UserError

METHODS = ("random", "herding", "forgetting")


def check_ipc(labels: torch.Tensor, ipc: int, num_classes: int) -> None:
    """``UserError`` unless every class has at least ``ipc`` examples."""
    if int(ipc) < 1:
        raise UserError(f"ipc must be at least 1, got {ipc}")
    counts = torch.bincount(labels, minlength=num_classes)
    smallest = int(counts.argmin())
    if int(counts[smallest]) < ipc:
        raise UserError(
            f"ipc={ipc} but class {smallest} has only {int(counts[smallest])} training images; "
            "lower ipc or use more training data (dataset.train_per_class)"
        )


def _class_indices(labels: torch.Tensor, c: int) -> torch.Tensor:
    return (labels == c).nonzero().flatten()


def random_per_class(
    labels: torch.Tensor, ipc: int, num_classes: int, generator: torch.Generator
) -> torch.Tensor:
    """``ipc`` uniformly drawn distinct examples of every class."""
    check_ipc(labels, ipc, num_classes)
    chosen = []
    for c in range(num_classes):
        idx = _class_indices(labels, c)
        chosen.append(idx[torch.randperm(len(idx), generator=generator)[:ipc]])
    return torch.cat(chosen)


def herding_order(features: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy herding: positions of ``k`` distinct rows of ``features`` in the order picked.

    Step t (1-based) picks the unpicked row f minimising ``||mu - (S + f) / t||`` where ``mu``
    is the mean of all rows and ``S`` the sum of the rows picked so far; ties go to the lowest
    position.
    """
    features = features.double()
    n = len(features)
    if k > n:
        raise ValueError(f"cannot pick {k} distinct rows out of {n}")
    mu = features.mean(0)
    picked_sum = torch.zeros_like(mu)
    available = torch.ones(n, dtype=torch.bool)
    order = []
    for t in range(1, k + 1):
        dist = ((mu - (picked_sum + features) / t) ** 2).sum(1)
        dist[~available] = float("inf")
        best = int(dist.argmin())
        order.append(best)
        available[best] = False
        picked_sum += features[best]
    return torch.tensor(order, dtype=torch.long)


def herding_per_class(
    features: torch.Tensor, labels: torch.Tensor, ipc: int, num_classes: int
) -> torch.Tensor:
    """Herding within every class in the given feature space (e.g. ``net.embed(x)``)."""
    check_ipc(labels, ipc, num_classes)
    chosen = []
    for c in range(num_classes):
        idx = _class_indices(labels, c)
        chosen.append(idx[herding_order(features[idx], ipc)])
    return torch.cat(chosen)


class ForgettingTracker:
    """Per-example forgetting events over the presentations of a training run.

    ``update(indices, correct)`` after every step with the examples of the batch and whether
    the network classified each correctly (on the presented, possibly augmented, input).
    """

    def __init__(self, num_examples: int):
        self.last_correct = torch.zeros(num_examples, dtype=torch.bool)
        self.counts = torch.zeros(num_examples, dtype=torch.long)  # correct -> incorrect events
        self.learned = torch.zeros(num_examples, dtype=torch.bool)  # ever classified correctly
        self.presentations = torch.zeros(num_examples, dtype=torch.long)

    def update(self, indices: torch.Tensor, correct: torch.Tensor) -> None:
        indices, correct = indices.cpu().long(), correct.cpu().bool()
        if len(torch.unique(indices)) != len(indices):
            raise ValueError("an example appears twice in one batch; presentations must be ordered")
        forgotten = self.last_correct[indices] & ~correct
        self.counts[indices] += forgotten.long()
        self.learned[indices] |= correct
        self.last_correct[indices] = correct
        self.presentations[indices] += 1

    def scores(self) -> torch.Tensor:
        """Forgetting counts as floats, ``inf`` for examples never learned (most forgotten)."""
        score = self.counts.double()
        score[~self.learned] = float("inf")
        return score


def forgetting_scores(correct_history: torch.Tensor) -> torch.Tensor:
    """Scores of a scripted history ``[presentations, examples]`` of booleans (see tracker)."""
    tracker = ForgettingTracker(correct_history.shape[1])
    everyone = torch.arange(correct_history.shape[1])
    for row in correct_history:
        tracker.update(everyone, row)
    return tracker.scores()


def most_forgotten_per_class(
    scores: torch.Tensor,
    labels: torch.Tensor,
    ipc: int,
    num_classes: int,
    generator: torch.Generator,
    never_learned: str = "first",
) -> torch.Tensor:
    """Per class, the ``ipc`` examples of highest score; ties broken by a seeded random order.

    Args:
        never_learned: ``first`` keeps the ``inf`` scores of never-learned examples (Toneva et
            al.'s ranking: they count as most forgotten); ``last`` ranks them below every
            learned example (taken only when a class has too few learned ones).
    """
    check_ipc(labels, ipc, num_classes)
    if never_learned not in ("first", "last"):
        raise UserError(f"coreset.never_learned must be first or last, got {never_learned!r}")
    if never_learned == "last":
        scores = torch.where(torch.isinf(scores), torch.full_like(scores, -1.0), scores)
    chosen = []
    for c in range(num_classes):
        idx = _class_indices(labels, c)
        shuffled = idx[torch.randperm(len(idx), generator=generator)]
        # a stable sort keeps the random order among equal scores
        ranked = torch.sort(scores[shuffled], descending=True, stable=True).indices
        chosen.append(shuffled[ranked[:ipc]])
    return torch.cat(chosen)
