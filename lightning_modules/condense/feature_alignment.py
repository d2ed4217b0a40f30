"""CAFE (Wang et al., CVPR 2022): condensing a dataset by aligning features, in plain torch.

Read from the reference code (kaiwang960112/CAFE, ``distill.py`` / ``networks.py``); written here
from the formulas, not copied. For one image step with a network ``f`` (ConvNet of ``depth``
blocks ``conv -> norm -> act -> pool``):

- **layer-wise alignment**: for every block b, the activation after ``act`` (before the pooling)
  and, last, the pooled output of the final block; per class the mean over the batch of each
  feature map, and the squared distance (summed over all elements) between the real and the
  synthetic class means, weighted per layer::

      L_align = sum_l w_l sum_c || mean_i f_l(x_real_ci) - mean_j f_l(s_cj) ||^2

  (reference weights for depth 3, first block to last: 0.1, 0.1, 1, 1);
- **embedding alignment**: the same on the embedding ``e`` (the flattened final features, before
  the classifier), weight 1 (in the reference ``e`` is the flattened last pooled map, so the
  last layer is counted twice: 1 + 1);
- **discrimination**: every real sample is classified by its inner products with the mean
  synthetic embedding of each class, cross-entropy summed over the real samples, weight
  ``beta`` (reference ``inner_weight`` 0.01)::

      L_disc = beta * sum_i CE(softmax_c <e(x_real_i), mean_j e(s_cj)>, y_i)

The total is ``L_align + L_embed + L_disc``; the reference adds the network's cross-entropy on
the real batch too, which does not depend on the synthetic images (it changes no image gradient)
and is left out. Real features carry no gradient. Under DSA one draw per class is shared by the
real and the synthetic batch (siamese). The bi-level loop (network trained on the synthetic set
between image steps, both loops stopped by watching the network's accuracy on real images) is
:class:`AccuracyWatcher` plus the caller.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.condense.gradient_matching import siamese_views

#: the reference's layer weights (first block .. final pooled map) for a depth-3 ConvNet
REFERENCE_LAYER_WEIGHTS = (0.1, 0.1, 1.0, 1.0)


def convnet_layer_features(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The CAFE feature maps of a ConvNet (``net.features`` = depth x [conv, norm, act, pool]):
    each block's output after ``act`` and the final pooled output; ``depth + 1`` tensors."""
    layers = list(net.features)
    depth = sum(isinstance(m, nn.Conv2d) for m in layers)
    if depth == 0 or len(layers) % depth:
        raise ValueError("CAFE needs a ConvNet: depth x [conv, norm, act, pool] blocks")
    group = len(layers) // depth
    out, h = [], x
    for i, layer in enumerate(layers):
        h = layer(h)
        if i % group == group - 2:  # after the activation, before the pooling
            out.append(h)
    out.append(h)
    return out


def layer_weights(depth: int, weights: Sequence[float] | None = None) -> list[float]:
    """``depth + 1`` weights; the reference's for depth 3, else 1 for every layer."""
    if weights is not None:
        weights = [float(w) for w in weights]
        if len(weights) != depth + 1:
            raise ValueError(f"{len(weights)} layer weights for {depth + 1} CAFE layers")
        return weights
    return list(REFERENCE_LAYER_WEIGHTS) if depth == 3 else [1.0] * (depth + 1)


def class_means(feats: torch.Tensor, k: int) -> torch.Tensor:
    """``[K, ...]``: per-class mean of class-major features ``[K * n, ...]``."""
    return feats.reshape(k, feats.shape[0] // k, *feats.shape[1:]).mean(1)


def cafe_terms(
    real_feats: Sequence[torch.Tensor],
    syn_feats: Sequence[torch.Tensor],
    real_embed: torch.Tensor,
    syn_embed: torch.Tensor,
    num_classes: int,
    weights: Sequence[float],
    beta: float,
) -> dict[str, torch.Tensor]:
    """The three CAFE terms from class-major features (real: ``K * B`` rows, synthetic:
    ``K * S`` rows): ``align``, ``embed``, ``disc`` and their sum ``loss``."""
    k = int(num_classes)
    align = syn_embed.new_zeros(())
    for w, fr, fs in zip(weights, real_feats, syn_feats, strict=True):
        align = align + w * ((class_means(fr, k) - class_means(fs, k)) ** 2).sum()
    centres = class_means(syn_embed, k)  # [K, F]
    embed = ((class_means(real_embed, k) - centres) ** 2).sum()
    labels = torch.arange(k, device=real_embed.device).repeat_interleave(len(real_embed) // k)
    logits = real_embed @ centres.t()
    disc = float(beta) * F.cross_entropy(logits, labels, reduction="sum")
    return {"align": align, "embed": embed, "disc": disc, "loss": align + embed + disc}


def cafe_loss(
    net: nn.Module,
    real: torch.Tensor,
    syn: torch.Tensor,
    *,
    weights: Sequence[float] | None = None,
    beta: float = 0.01,
    dsa=None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The CAFE loss of one image step (:func:`cafe_terms`); differentiable in ``syn``.

    Args:
        net: a ConvNet (``features`` + ``classifier``); its parameters get no gradient here.
        real: ``[K, B, C, H, W]``, class k's real batch in row k.
        syn: ``[K, S, C, H, W]``, class k's synthetic images in row k.
        weights: per-layer weights (``depth + 1``); None = the reference's.
        beta: weight of the discrimination loss.
        dsa: a DSA object for the siamese draws (one per class), or None.
    """
    k = real.shape[0]
    real, syn = siamese_views(real, syn, dsa, generator)
    real, syn = real.reshape(-1, *real.shape[2:]), syn.reshape(-1, *syn.shape[2:])
    with torch.no_grad():
        real_feats = convnet_layer_features(net, real)
    syn_feats = convnet_layer_features(net, syn)
    w = layer_weights(len(real_feats) - 1, weights)
    return cafe_terms(
        real_feats, syn_feats, real_feats[-1].flatten(1), syn_feats[-1].flatten(1), k, w, beta
    )


class AccuracyWatcher:
    """CAFE's loop control: a running accuracy kept as the reference does
    (``a <- (a + sum_c acc_c) / K``, reset when a loop ends) over the last ``window`` values;
    :meth:`add` returns True when the loop should stop: the range of the window is below
    ``threshold`` (``stop_when="flat"``, outer loop, reference lambda_1 = 0.04) or above it
    (``"moved"``, inner loop, lambda_2 = 0.03)."""

    def __init__(self, threshold: float, stop_when: str, window: int = 10):
        if stop_when not in ("flat", "moved"):
            raise ValueError(f"stop_when={stop_when!r}")
        self.threshold, self.stop_when, self.window = float(threshold), stop_when, int(window)
        self.history: list[float] = []
        self.value = 0.0

    def add(self, class_accuracies: torch.Tensor) -> bool:
        self.value = (self.value + float(class_accuracies.sum())) / len(class_accuracies)
        self.history.append(self.value)
        if len(self.history) < self.window:
            return False
        spread = max(self.history) - min(self.history)
        stop = spread < self.threshold if self.stop_when == "flat" else spread > self.threshold
        if stop:
            self.history, self.value = [], 0.0
        else:
            self.history.pop(0)
        return stop


@torch.no_grad()
def class_accuracies(net: nn.Module, real: torch.Tensor) -> torch.Tensor:
    """``[K]``: the accuracy of ``net`` on each class's real batch ``real`` ``[K, B, ...]``."""
    k, b = real.shape[:2]
    pred = net(real.reshape(-1, *real.shape[2:])).argmax(1).view(k, b)
    return (pred == torch.arange(k, device=pred.device).view(k, 1)).float().mean(1)
