"""Distribution matching (DM, Zhao & Bilen, WACV 2023) in plain torch.

Each iteration a freshly initialised network (never trained) embeds a real batch of every class
and the synthetic images of that class, both under one shared DSA draw per class; the loss is the
sum over classes of the squared distance between the two mean embeddings (the features before
the classifier)::

    L = sum_c || mean_i e(A_c(x_real_{c,i})) - mean_j e(A_c(s_{c,j})) ||^2

All classes' real batches go through the network in one forward pass, and all synthetic images in
another (exact for networks that treat samples independently: instance norm, no batch norm).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lightning_modules.condense.gradient_matching import siamese_views


def mean_embeddings(
    embed: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """``[K, F]``: the mean embedding of each class's batch ``images`` ``[K, B, C, H, W]``.

    ``chunk`` classes per forward pass (None: all in one).
    """
    k, b = images.shape[:2]
    step = k if not chunk else int(chunk)
    means = []
    for start in range(0, k, step):
        block = images[start : start + step]
        feats = embed(block.reshape(-1, *images.shape[2:]))
        means.append(feats.reshape(len(block), b, -1).mean(1))
    return torch.cat(means)


def distribution_matching_loss(
    embed: Callable[[torch.Tensor], torch.Tensor],
    real: torch.Tensor,
    syn: torch.Tensor,
    *,
    dsa=None,
    generator: torch.Generator | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """The DM loss summed over classes; differentiable in ``syn``.

    Args:
        embed: the network's feature map (e.g. ``ConvNet.embed``), parameters frozen.
        real: ``[K, B, C, H, W]``, class k's real batch in row k.
        syn: ``[K, S, C, H, W]``, class k's synthetic images in row k.
        dsa: a DSA object for the siamese draws (one per class), or None.
        chunk: classes per forward pass (memory bound), None = all classes in one pass.
    """
    real, syn = siamese_views(real, syn, dsa, generator)
    with torch.no_grad():
        mu_real = mean_embeddings(embed, real, chunk)
    mu_syn = mean_embeddings(embed, syn, chunk)
    return ((mu_real - mu_syn) ** 2).sum()
