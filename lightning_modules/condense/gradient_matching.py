"""Gradient matching (DC, Zhao et al. ICLR 2021) and its siamese-augmented form (DSA, Zhao &
Bilen ICML 2021) in plain torch.

One image update: for each class c, the gradient of the cross-entropy of a fresh-ish network on a
real batch of class c and on the synthetic images of class c are compared layer by layer with the
reference distance (REFERENCE.md C)::

    d(G_r, G_s) = sum_i 1 - <G_r[i], G_s[i]> / (|G_r[i]| |G_s[i]| + 1e-6),  i = output units

where a weight gradient is reshaped to ``(output units, rest)`` and 1-D parameters (biases, norm
affines) contribute nothing. The class distances are summed. Under DSA one augmentation draw per
class is applied to that class's real and synthetic batch (siamese).

Per-class gradients of all classes come from one batched pass (``torch.func.vmap`` of
``torch.func.grad`` over the class axis) or from a loop over classes; both give the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

#: the reference's regulariser in the cosine denominator
COSINE_EPS = 1e-6

#: (outer_loop, inner_loop) by IPC, from the reference code (``utils.get_loops``)
PUBLISHED_LOOPS: dict[int, tuple[int, int]] = {
    1: (1, 1),
    10: (10, 50),
    20: (20, 25),
    30: (30, 20),
    40: (40, 15),
    50: (50, 10),
}


def layer_distance(g_real: torch.Tensor, g_syn: torch.Tensor, *, batch_dims: int = 0):
    """The reference distance between two gradients of one parameter.

    ``batch_dims`` leading axes (e.g. the class axis) are summed over too. 1-D parameters (after
    the batch axes) give 0, as in the reference.
    """
    shape = g_real.shape[batch_dims:]
    if len(shape) <= 1:
        return g_real.new_zeros(())
    lead = g_real.shape[:batch_dims]
    a = g_real.reshape(*lead, shape[0], -1)
    b = g_syn.reshape(*lead, shape[0], -1)
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + COSINE_EPS)
    return (1.0 - cos).sum()


def gradient_distance(
    grads_real: Sequence[torch.Tensor], grads_syn: Sequence[torch.Tensor], *, batch_dims: int = 0
) -> torch.Tensor:
    """Sum of :func:`layer_distance` over the parameters (the reference's ``match_loss``)."""
    if len(grads_real) != len(grads_syn):
        raise ValueError(f"{len(grads_real)} real gradients vs {len(grads_syn)} synthetic")
    total = grads_real[0].new_zeros(())
    for gr, gs in zip(grads_real, grads_syn):
        total = total + layer_distance(gr, gs, batch_dims=batch_dims)
    return total


def class_gradients(
    net: nn.Module,
    params: dict[str, torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batched: bool = True,
    chunk_size: int | None = None,
) -> list[torch.Tensor]:
    """Per-class gradients of the mean cross-entropy: ``[K, *shape]`` per parameter.

    Args:
        net: the architecture (called through ``functional_call`` with ``params``).
        params: name -> tensor; the gradients are taken with respect to these.
        images: ``[K, B, C, H, W]``, one batch per class (the same B for every class).
        labels: ``[K, B]``.
        batched: one ``vmap``-batched pass over the classes (``chunk_size`` classes at a time);
            False loops over the classes. The same numbers either way (per-sample networks:
            instance norm, no batch norm).

    Differentiable in ``images`` (create the graph by calling it with grad enabled).
    """
    names = list(params)

    def loss(p, x, y):
        return F.cross_entropy(functional_call(net, p, (x,)), y)

    if batched:
        g = vmap(grad(loss), in_dims=(None, 0, 0), chunk_size=chunk_size)(params, images, labels)
        return [g[n] for n in names]
    per_class = [grad(loss)(params, x, y) for x, y in zip(images, labels)]
    return [torch.stack([g[n] for g in per_class]) for n in names]


def siamese_views(
    real: torch.Tensor,
    syn: torch.Tensor,
    dsa,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment each class's real and synthetic batch with one shared DSA draw per class.

    ``real`` is ``[K, B, ...]``, ``syn`` ``[K, S, ...]``; ``dsa=None`` returns them as they are.
    The draws come from ``generator`` in class order (real and synthetic share each draw).
    """
    if dsa is None or dsa.is_identity:
        return real, syn
    out_r, out_s = [], []
    for r, s in zip(real, syn):
        p = dsa.draw(1, generator, per_sample=False, device=r.device)
        out_r.append(dsa.apply(r, p))
        out_s.append(dsa.apply(s, p))
    return torch.stack(out_r), torch.stack(out_s)


def gradient_matching_loss(
    net: nn.Module,
    params: dict[str, torch.Tensor],
    real: torch.Tensor,
    syn: torch.Tensor,
    *,
    dsa=None,
    generator: torch.Generator | None = None,
    batched: bool = True,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The DC/DSA loss of one outer step, summed over classes; differentiable in ``syn``.

    Args:
        real: ``[K, B, C, H, W]`` real batches, class k in row k.
        syn: ``[K, S, C, H, W]`` the synthetic images of each class.
        dsa: a :class:`~lightning_modules.condense.dsa.DSA` for DSA (siamese draws), None for DC.
    """
    k = real.shape[0]
    real, syn = siamese_views(real, syn, dsa, generator)
    y_real = torch.arange(k, device=real.device).view(k, 1).expand(k, real.shape[1])
    y_syn = torch.arange(k, device=syn.device).view(k, 1).expand(k, syn.shape[1])
    fixed = {n: p.detach() for n, p in params.items()}
    with torch.no_grad():
        g_real = class_gradients(net, fixed, real, y_real, batched=batched, chunk_size=chunk_size)
    g_syn = class_gradients(net, fixed, syn, y_syn, batched=batched, chunk_size=chunk_size)
    return gradient_distance(g_real, g_syn, batch_dims=1)


def train_network_on_set(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    batch_size: int = 256,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> None:
    """DC's inner loop: ``epochs`` passes of SGD over the (detached) synthetic set, shuffled,
    with per-sample augmentation (DSA) or none (DC)."""
    images, labels = images.detach(), labels.detach()
    for _ in range(int(epochs)):
        order = torch.randperm(len(images), generator=generator).to(images.device)
        for idx in order.split(int(batch_size)):
            x = images[idx]
            if augment is not None:
                x = augment(x, generator)
            loss = F.cross_entropy(net(x), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
