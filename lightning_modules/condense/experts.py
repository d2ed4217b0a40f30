"""Plain-torch SGD training of a classifier, and of an expert trajectory (snapshot per epoch).

A plain loop rather than a Lightning Trainer because every caller needs something a Trainer
hides: the teacher records the exact parameter vector after each epoch and owns the RNG of
the shuffle and of DSA, and the forgetting coreset needs each example's correctness every time
it is presented. Nothing here imports Lightning or Hydra.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.condense.gsam import gsam_step
from lightning_modules.nets.functional import FlatParams
from lightning_modules.utils.seeds import derive_seed

#: settings that make two experts different trajectories: a store must not mix them
RECIPE_KEYS = ("epochs", "lr", "momentum", "weight_decay", "batch_size", "dsa_strategy")

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
Subset = Callable[[int], torch.Tensor]  # epoch (0-based) -> training indices of that epoch
BatchHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]  # (indices, logits, labels)


def build_seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``build()`` with its random init drawn from ``seed``; the global RNG state is restored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy in % of ``net`` on ``(x, y)``, in batches on the net's device."""
    if len(x) == 0:
        return float("nan")
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        correct += (net(xb).argmax(1) == yb).sum().item()
    net.train(was_training)
    return 100.0 * correct / len(x)


@torch.no_grad()
def embed(net: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """``net.embed(x)`` (the features before the last linear layer) in batches, on the CPU."""
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    parts = [
        net.embed(x[i : i + batch_size].to(device)).float().cpu()
        for i in range(0, len(x), batch_size)
    ]
    net.train(was_training)
    return torch.cat(parts)


def sgd_train(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    augment: Augment | None = None,
    shuffle_generator: torch.Generator,
    augment_generator: torch.Generator | None = None,
    on_batch: BatchHook | None = None,
    on_epoch: Callable[[int], None] | None = None,
    on_step: Callable[[], None] | None = None,
    subset: Subset | None = None,
    gsam: dict | None = None,
) -> nn.Module:
    """Minibatch SGD with cross-entropy on ``(x, y)`` (kept on the net's device), in place.

    Args:
        augment: ``augment(batch, generator)``, e.g. a ``DSA``; drawn from ``augment_generator``.
        shuffle_generator: CPU generator of the per-epoch permutations.
        on_batch: called with ``(example indices, logits, labels)`` of every training step.
        on_epoch: called with the epoch number (1-based) after each epoch.
        on_step: called after every optimiser step (progress bars).
        subset: ``subset(epoch)`` (0-based) gives the indices that epoch trains on (a
            curriculum); shuffled by ``shuffle_generator`` like the full set. ``None``: all.
        gsam: ``{"rho": .., "alpha": ..}``: every step a GSAM step (``condense.gsam``) with this
            SGD as its base optimiser; ``None``: plain SGD.
    """
    device = next(net.parameters()).device
    x, y = x.to(device), y.to(device)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    net.train()
    for epoch in range(1, epochs + 1):
        if subset is None:
            order = torch.randperm(len(x), generator=shuffle_generator)
        else:
            ids = subset(epoch - 1)
            order = ids[torch.randperm(len(ids), generator=shuffle_generator)]
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            xb, yb = x[idx.to(device)], y[idx.to(device)]
            if augment is not None:
                xb = augment(xb, augment_generator)
            if gsam is None:
                logits = net(xb)
                loss = F.cross_entropy(logits, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            else:  # the same (augmented) batch at w and at the perturbed weights
                passes: list[torch.Tensor] = []
                gsam_step(net, partial(_batch_loss, net, xb, yb, passes), opt, **gsam)
                logits = passes[0]
            if on_batch is not None:
                on_batch(idx, logits.detach(), yb)
            if on_step is not None:
                on_step()
        if on_epoch is not None:
            on_epoch(epoch)
    return net


def _batch_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor, passes: list) -> torch.Tensor:
    """Cross-entropy of ``net`` on the batch; the logits of each call appended to ``passes``."""
    passes.append(net(x))
    return F.cross_entropy(passes[-1], y)


def train_expert(
    net: nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    epochs: int,
    seed: int,
    lr: float = 0.01,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    augment: Augment | None = None,
    on_step: Callable[[], None] | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    subset: Subset | None = None,
    gsam: dict | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Train one expert and return its trajectory and test accuracy per epoch.

    ``subset``: the training indices per epoch (``sgd_train``), e.g. PAD's curriculum;
    ``gsam``: GSAM's ``rho`` and ``alpha`` (FTD's flat experts), ``None`` for plain SGD.

    Returns:
        ``(snapshots, test_acc)``: float32 ``[epochs + 1, P]`` on the CPU (row 0 is ``net``'s
        parameters on entry, row e after epoch e) and ``epochs + 1`` accuracies in %.
    """
    layout = FlatParams(net)
    snapshots = torch.empty(epochs + 1, layout.numel, dtype=torch.float32)
    snapshots[0] = layout.flatten(net).float().cpu()
    test_acc = [accuracy(net, test_x, test_y)]
    if on_epoch is not None:
        on_epoch(0, test_acc[0])

    def record(epoch: int) -> None:
        snapshots[epoch] = layout.flatten(net).float().cpu()
        test_acc.append(accuracy(net, test_x, test_y))
        if on_epoch is not None:
            on_epoch(epoch, test_acc[-1])

    # two streams so that turning DSA on or off leaves the batch order unchanged
    sgd_train(
        net,
        train_x,
        train_y,
        epochs=epochs,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        batch_size=batch_size,
        augment=augment,
        shuffle_generator=torch.Generator().manual_seed(derive_seed(seed, "batches")),
        augment_generator=torch.Generator().manual_seed(derive_seed(seed, "dsa")),
        on_epoch=record,
        on_step=on_step,
        subset=subset,
        gsam=gsam,
    )
    return snapshots, test_acc
