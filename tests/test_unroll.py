"""Student unroll: `recompute` gives the gradients of `full` (DSA on), and replays its draws."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.condense.dsa import DSA
from lightning_modules.condense.matching import matching_loss, prune_mask
from lightning_modules.condense.unroll import classifier_loss, student_unroll
from lightning_modules.nets import FlatParams, build_classifier
from tests.helpers import assert_close_scaled


def tiny_problem(dtype=torch.float64, n_per_class=3, classes=4, seed=0):
    """A small ConvNet, a start/target pair near its init, and a synthetic set (all seeded)."""
    g = torch.Generator().manual_seed(seed)
    net = build_classifier(
        "convnet", channels=3, num_classes=classes, im_size=16, depth=2, width=8
    ).to(dtype)
    layout = FlatParams(net)
    start = 0.2 * torch.randn(layout.numel, generator=g, dtype=dtype)  # not the global RNG's init
    target = start + 0.05 * torch.randn(start.shape, generator=g, dtype=dtype)
    images = torch.randn(classes * n_per_class, 3, 16, 16, generator=g, dtype=dtype)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return net, layout, start, target, images, labels


def grads_of(mode, augment, *, eps=0.1, steps=5, batch_syn=5, dtype=torch.float64, seed=0):
    net, layout, start, target, images, labels = tiny_problem(dtype)
    images = images.clone().requires_grad_(True)
    lr = torch.tensor(0.05, dtype=dtype, requires_grad=True)
    theta0 = start.clone().requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    end = student_unroll(
        classifier_loss(net, layout), theta0, images, labels, lr,
        steps=steps, batch_syn=batch_syn, augment=augment, generator=gen, mode=mode,
    )  # fmt: skip
    mask = prune_mask(end, target, eps)
    loss = matching_loss(end, start, target, mask)
    loss.backward()
    return {
        "end": end.detach(),
        "loss": loss.detach(),
        "images": images.grad,
        "lr": lr.grad,
        "theta0": theta0.grad,
        "gen_state": gen.get_state(),
    }


def dsa_augment(x, generator):
    return DSA("color_crop_cutout_flip_scale_rotate")(x, generator)


def shift_noise_augment(x, generator):
    """A test-local replayable augmentation: random per-sample scale plus additive noise."""
    scale = 1 + 0.2 * torch.rand(len(x), 1, 1, 1, generator=generator).to(x)
    return x * scale + 0.1 * torch.randn(x.shape, generator=generator).to(x)


@pytest.mark.parametrize(
    "augment", [dsa_augment, shift_noise_augment, None], ids=["dsa", "own", "none"]
)
def test_recompute_equals_full_float64(augment):
    # 5 steps of 5 images from 12: chunks cross permutation boundaries, so replay must be exact
    full = grads_of("full", augment)
    rec = grads_of("recompute", augment)
    assert torch.equal(full["gen_state"], rec["gen_state"])  # both modes consume the same draws
    assert_close_scaled(rec["end"], full["end"], 1e-11)
    assert_close_scaled(rec["loss"], full["loss"], 1e-11)
    for key in ("images", "lr", "theta0"):
        assert full[key].abs().sum() > 0, key
        assert_close_scaled(rec[key], full[key], 1e-9)


def test_recompute_equals_full_float32_with_dsa():
    full = grads_of("full", dsa_augment, dtype=torch.float32, steps=8, batch_syn=None)
    rec = grads_of("recompute", dsa_augment, dtype=torch.float32, steps=8, batch_syn=None)
    for key in ("images", "lr", "theta0"):
        assert_close_scaled(rec[key], full[key], 2e-4)


def test_recompute_keep_on_cpu_is_the_same():
    a = grads_of("recompute", dsa_augment)
    net, layout, start, target, images, labels = tiny_problem()
    images = images.clone().requires_grad_(True)
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    end = student_unroll(
        classifier_loss(net, layout), start, images, labels, lr, steps=5, batch_syn=5,
        augment=dsa_augment, generator=torch.Generator().manual_seed(0), mode="recompute",
        keep_on="cpu",
    )  # fmt: skip
    matching_loss(end, start, target, prune_mask(end, target, 0.1)).backward()
    torch.testing.assert_close(images.grad, a["images"], rtol=0, atol=0)


def test_draws_differ_between_generator_states():
    """The augmentation matters: another generator state gives another gradient."""
    a = grads_of("recompute", dsa_augment, seed=0)
    b = grads_of("recompute", dsa_augment, seed=1)
    assert not torch.allclose(a["images"], b["images"])


def test_full_matches_finite_difference_in_lr():
    """d loss / d α of the unroll against a central difference (float64, no augmentation)."""
    net, layout, start, target, images, labels = tiny_problem()
    loss_fn = classifier_loss(net, layout)

    def loss_at(alpha, mode="full"):
        lr = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
        end = student_unroll(loss_fn, start, images, labels, lr, steps=3, mode=mode)
        loss = matching_loss(end, start, target)
        return loss, lr

    for mode in ("full", "recompute"):
        loss, lr = loss_at(0.05, mode)
        loss.backward()
        h = 1e-6
        fd = (loss_at(0.05 + h)[0] - loss_at(0.05 - h)[0]) / (2 * h)
        assert_close_scaled(lr.grad, fd.detach(), 1e-5)


def test_bad_arguments():
    net, layout, start, _, images, labels = tiny_problem()
    lr = torch.tensor(0.01, dtype=torch.float64)
    with pytest.raises(ValueError, match="mode"):
        student_unroll(classifier_loss(net), start, images, labels, lr, steps=1, mode="tesla")
    with pytest.raises(ValueError, match="generator"):
        student_unroll(
            classifier_loss(net), start, images, labels, lr, steps=1, augment=dsa_augment
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("keep_on", [None, "cpu"])
def test_recompute_equals_full_on_cuda(keep_on):
    """Same check on the GPU: CPU generators drive the draws for CUDA images."""
    net, layout, start, target, images, labels = tiny_problem(torch.float64)
    net, start, target, labels = net.cuda(), start.cuda(), target.cuda(), labels.cuda()
    out = {}
    for mode in ("full", "recompute"):
        x = images.cuda().requires_grad_(True)
        lr = torch.tensor(0.05, dtype=torch.float64, device="cuda", requires_grad=True)
        end = student_unroll(
            classifier_loss(net, layout), start, x, labels, lr, steps=5, batch_syn=5,
            augment=dsa_augment, generator=torch.Generator().manual_seed(0), mode=mode,
            keep_on=keep_on if mode == "recompute" else None,
        )  # fmt: skip
        matching_loss(end, start, target, prune_mask(end, target, 0.1)).backward()
        out[mode] = (x.grad, lr.grad)
    for a, b in zip(out["full"], out["recompute"]):
        assert_close_scaled(b, a, 1e-9)
