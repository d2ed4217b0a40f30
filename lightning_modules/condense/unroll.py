"""The student's unrolled training on the synthetic set, differentiable in the images and α.

From the expert's θ_0 = θ_i the student takes J steps (plain torch, no Lightning):

    x_j = aug_j(X[idx_j]),   g_j = ∇_θ CE(f(θ_j, x_j), y[idx_j]),   θ_{j+1} = θ_j - α g_j

where idx_j is the next chunk (``batch_syn`` images) of a random permutation of the synthetic
set (a fresh permutation when one is used up, as in MTT) and aug_j a random augmentation (DSA)
drawn from an explicit generator. :func:`student_unroll` returns θ_J, differentiable with
respect to the images X, the learnable lr α and (optionally) θ_0, in one of two modes:

``full``
    autograd keeps every step's graph (``create_graph``), so memory grows linearly in J.
``recompute``
    exact and constant in activation memory: the forward pass keeps only the J flat vectors
    θ_0..θ_{J-1} (no graph); the backward pass walks the steps in reverse and, for step j,
    rebuilds g_j with ``create_graph`` (replaying idx_j and the augmentation draw from the
    generator state saved before it), then takes ONE vector-Jacobian product of
    θ_{j+1} = θ_j - α g_j with the incoming adjoint λ_{j+1}:

        ∂/∂X += -α (∂g_j/∂X)ᵀ λ_{j+1},   ∂/∂α += -⟨g_j, λ_{j+1}⟩,   λ_j = λ_{j+1} - α H_j λ_{j+1}

    (H_j λ is a Hessian-vector product). The result equals ``full`` up to float rounding.
    TESLA (Cui et al. 2023) is constant-memory too but drops second-order terms; this is exact.

Both modes draw the same permutations and augmentations from the same generator, in the same
order, so with equal generator states they produce the same θ_J and the same gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.nets.functional import FlatParams

#: ``loss_fn(theta, x, y) -> scalar``: the student's training loss at flat parameters ``theta``
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
#: ``augment(x, generator) -> x'``: random, differentiable in ``x``, all randomness from generator
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]

MODES = ("full", "recompute")


def classifier_loss(net: nn.Module, layout: FlatParams | None = None, soft: bool = False) -> LossFn:
    """Cross-entropy of ``net`` evaluated at flat parameters (``functional_call``).

    ``soft=True``: ``y`` are label logits ``[B, classes]`` and the target is their softmax,
    mean over the batch of -Σ_c softmax(y)_c log softmax(f)_c (DATM's soft cross-entropy).
    """
    layout = layout or FlatParams(net)

    def loss_fn(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = layout.call(net, theta, x)
        return F.cross_entropy(logits, y.softmax(1) if soft else y)

    return loss_fn


class _ChunkStream:
    """Chunks of successive random permutations of ``range(n)``, drawn lazily (MTT's order)."""

    def __init__(self, n: int, batch: int | None, generator: torch.Generator | None, device):
        self.n, self.batch = n, (batch if batch and batch < n else n)
        self.generator, self.device = generator, device
        self.pending: list[torch.Tensor] = []

    def next(self) -> torch.Tensor:
        if not self.pending:
            if self.generator is None:
                order = torch.arange(self.n)
            else:
                order = torch.randperm(
                    self.n, generator=self.generator, device=self.generator.device
                )
            self.pending = list(order.to(self.device).split(self.batch))
        return self.pending.pop(0)


def _check(images, labels, lr, steps, mode, augment, generator):
    if mode not in MODES:
        raise ValueError(f"unknown unroll mode {mode!r}; use one of {MODES}")
    if steps < 1:
        raise ValueError(f"syn_steps must be >= 1, got {steps}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if lr.numel() != 1:
        raise ValueError("the learnable lr must be a single number")
    if augment is not None and generator is None:
        raise ValueError("an augmentation needs an explicit generator (for replay)")


def student_unroll(
    loss_fn: LossFn,
    theta0: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    lr: torch.Tensor,
    *,
    steps: int,
    batch_syn: int | None = None,
    augment: Augment | None = None,
    generator: torch.Generator | None = None,
    mode: str = "full",
    keep_on: str | torch.device | None = None,
) -> torch.Tensor:
    """Unroll ``steps`` SGD steps of the student and return its last parameters θ_J.

    Args:
        loss_fn: the student's loss ``(theta, x, y) -> scalar`` (see :func:`classifier_loss`).
        theta0: start parameters ``[P]`` (the expert's θ_i; gets a gradient if it requires one).
        images: synthetic images ``[N, C, H, W]`` (usually a leaf that requires grad).
        labels: ``[N]`` int64, or ``[N, classes]`` float label logits (with a soft ``loss_fn``;
            then θ_J is differentiable in them too).
        lr: the learnable step size α, a one-element tensor.
        steps: J, the number of student steps.
        batch_syn: images per step (``None`` or >= N: all of them, permuted).
        augment: ``augment(x, generator)``; called once per step, replayed in ``recompute``.
        generator: source of the permutations and augmentation draws; it is advanced exactly as
            a ``full`` unroll advances it, whatever the mode. ``None`` (only without ``augment``):
            chunks in index order.
        mode: ``full`` or ``recompute`` (same result; recompute's memory is constant in J).
        keep_on: ``recompute`` only: device that holds the J stored parameter vectors (e.g.
            ``"cpu"`` to keep GPU memory independent of J); None: the images' device.

    Returns:
        θ_J ``[P]``, differentiable with respect to ``images``, ``lr``, ``theta0`` and float
        ``labels``.
    """
    _check(images, labels, lr, steps, mode, augment, generator)
    chunks = _ChunkStream(len(images), batch_syn, generator, images.device)
    if mode == "full":
        return _unroll_full(loss_fn, theta0, images, labels, lr, steps, chunks, augment, generator)
    return _RecomputeUnroll.apply(
        theta0, images, lr, labels, loss_fn, steps, chunks, augment, generator, keep_on
    )


def _unroll_full(loss_fn, theta0, images, labels, lr, steps, chunks, augment, generator):
    theta = theta0 if theta0.requires_grad else theta0.detach().requires_grad_(True)
    for _ in range(steps):
        idx = chunks.next()
        x = images[idx]
        if augment is not None:
            x = augment(x, generator)
        loss = loss_fn(theta, x, labels[idx])
        (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
        theta = theta - lr * grad
    return theta


def _stored(theta: torch.Tensor, keep_on) -> torch.Tensor:
    """θ_j kept for the backward pass, on ``keep_on``; GPU -> CPU goes to pinned memory
    asynchronously (stream order keeps it correct), so offloading costs little time."""
    theta = theta.detach()
    if keep_on is None:
        return theta
    keep_on = torch.device(keep_on)
    if keep_on.type == "cpu" and theta.is_cuda:
        host = torch.empty(theta.shape, dtype=theta.dtype, pin_memory=True)
        return host.copy_(theta, non_blocking=True)
    return theta.to(keep_on)


class _RecomputeUnroll(torch.autograd.Function):
    """θ_J with a backward pass that recomputes one step's graph at a time (see module doc)."""

    @staticmethod
    def forward(
        ctx, theta0, images, lr, labels, loss_fn, steps, chunks, augment, generator, keep_on
    ):
        images_d, lr_d, labels_d = images.detach(), lr.detach(), labels.detach()
        theta = theta0.detach()
        thetas, indices, states = [], [], []
        for _ in range(steps):
            idx = chunks.next()
            state = generator.get_state() if augment is not None else None
            with torch.enable_grad():
                leaf = theta.requires_grad_(True)
                x = images_d[idx]
                if augment is not None:
                    x = augment(x, generator)
                (grad,) = torch.autograd.grad(loss_fn(leaf, x, labels_d[idx]), leaf)
            thetas.append(_stored(theta, keep_on))
            indices.append(idx)
            states.append(state)
            theta = (theta.detach() - lr_d * grad).detach()
        ctx.save_for_backward(images, lr, labels, *thetas)
        ctx.indices, ctx.states = indices, states
        ctx.loss_fn, ctx.augment = loss_fn, augment
        ctx.generator_device = generator.device if generator is not None else None
        return theta

    @staticmethod
    def backward(ctx, adjoint):
        images, lr, labels, *thetas = ctx.saved_tensors
        want_theta0, want_images, want_lr, want_labels = ctx.needs_input_grad[:4]
        grad_images = torch.zeros_like(images) if want_images else None
        grad_lr = torch.zeros_like(lr) if want_lr else None
        grad_labels = torch.zeros_like(labels) if want_labels else None
        replay = torch.Generator(device=ctx.generator_device) if ctx.augment is not None else None
        lam = adjoint
        for j in reversed(range(len(thetas))):
            idx = ctx.indices[j]
            with torch.enable_grad():
                # same-stream copies: ordered after the forward's copy out, no sync needed
                theta = thetas[j].to(adjoint.device, non_blocking=True).requires_grad_(True)
                chunk = images.detach()[idx].requires_grad_(want_images)
                alpha = lr.detach().requires_grad_(want_lr)
                y = labels.detach()[idx].requires_grad_(want_labels)
                x = chunk
                if ctx.augment is not None:
                    replay.set_state(ctx.states[j])  # the same draw as in the forward pass
                    x = ctx.augment(x, replay)
                loss = ctx.loss_fn(theta, x, y)
                (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
                theta_next = theta - alpha * grad
                inputs = [theta] + ([chunk] if want_images else []) + ([alpha] if want_lr else [])
                inputs += [y] if want_labels else []
                # one VJP: λ_j = λ - αHλ, and the image and α gradients of this step
                vjp = torch.autograd.grad(theta_next, inputs, grad_outputs=lam, allow_unused=True)
            lam = vjp[0].detach()
            rest = list(vjp[1:])
            if want_images:
                g = rest.pop(0)
                if g is not None:
                    grad_images.index_add_(0, idx, g.detach())
            if want_lr:
                grad_lr += rest.pop(0).detach().reshape(grad_lr.shape)
            if want_labels:
                g = rest.pop(0)
                if g is not None:
                    grad_labels.index_add_(0, idx, g.detach())
        # no gradients for loss_fn, steps, chunks, augment, generator, keep_on
        return (lam if want_theta0 else None, grad_images, grad_lr, grad_labels) + (None,) * 6
