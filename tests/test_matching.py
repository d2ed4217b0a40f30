"""Pruning mask and matching loss: the signed-ratio rule, the 0/0 guard, and ε = 0 = plain MTT."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.condense.matching import (
    check_eps,
    matching_loss,
    prune_mask,
    pruned_fraction,
)
from lightning_modules.condense.unroll import classifier_loss, student_unroll
from lightning_modules.nets import FlatParams, build_classifier
from tests.helpers import assert_close_scaled


def test_signed_ratio_rule_case_by_case():
    target = torch.tensor([1.0, 1.0, 1.0, 1.0, -2.0, 1.0, 0.0, 0.0, 3.0, 1.0])
    student = torch.tensor([1.0, 0.2, 0.05, -1.0, -2.5, 11.0, 0.0, 1.0, 0.0, 9.0])
    keep = prune_mask(student, target, eps=0.1)
    # r:    1  0.2  0.05(<ε) -1(sign) 1.25  11(1/r<ε) 0/0(keep) inf(drop) 0(drop) 9(keep)
    assert keep.tolist() == [True, True, False, False, True, False, True, False, False, True]
    assert pruned_fraction(keep) == pytest.approx(0.5)


def test_rule_matches_literal_division_where_defined():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(10000, generator=g), torch.randn(10000, generator=g)
    for eps in (0.01, 0.1, 0.3, 0.9):
        r = s / t
        literal = ~((r < eps) | (1 / r < eps))
        assert torch.equal(prune_mask(s, t, eps), literal)


def test_eps_zero_keeps_everything_even_sign_flips():
    s, t = torch.tensor([-1.0, 0.0, 2.0]), torch.tensor([1.0, 3.0, 0.0])
    assert prune_mask(s, t, 0.0).all()


@pytest.mark.parametrize("eps", [-0.1, 1.0, 2.0])
def test_eps_outside_unit_interval_rejected(eps):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        check_eps(eps)


def test_masked_loss_masks_numerator_and_denominator():
    start = torch.tensor([0.0, 0.0, 0.0])
    target = torch.tensor([1.0, 2.0, 3.0])
    student = torch.tensor([0.5, 2.0, 100.0], requires_grad=True)
    keep = torch.tensor([True, True, False])
    loss = matching_loss(student, start, target, keep)
    assert loss.item() == pytest.approx(0.25 / 5.0)
    loss.backward()
    assert student.grad[2] == 0  # pruned indices get no gradient
    assert matching_loss(student, start, target).item() == pytest.approx((0.25 + 97**2) / 14)


def test_loss_not_finite_when_everything_pruned():
    t = torch.ones(4)
    assert not torch.isfinite(matching_loss(t * 2, t * 0, t, torch.zeros(4, dtype=torch.bool)))


def mtt_reference(net, start, target, images, labels, syn_lr, syn_steps, batch_syn, seed):
    """MTT's inner loop and loss written out plainly, as in the authors' distill.py."""
    g = torch.Generator().manual_seed(seed)
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    sizes = [p.numel() for _, p in net.named_parameters()]
    student_params = [start.clone().requires_grad_(True)]
    chunks = []
    for _ in range(syn_steps):
        if not chunks:
            chunks = list(torch.split(torch.randperm(len(images), generator=g), batch_syn))
        these = chunks.pop(0)
        params = {
            n: c.view(s) for n, c, s in zip(names, torch.split(student_params[-1], sizes), shapes)
        }
        out = torch.func.functional_call(net, params, (images[these],))
        ce = F.cross_entropy(out, labels[these])
        grad = torch.autograd.grad(ce, student_params[-1], create_graph=True)[0]
        student_params.append(student_params[-1] - syn_lr * grad)
    num_params = start.numel()
    param_loss = F.mse_loss(student_params[-1], target, reduction="sum") / num_params
    param_dist = F.mse_loss(start, target, reduction="sum") / num_params
    return param_loss / param_dist


def test_eps_zero_is_plain_mtt_loss_and_gradients():
    net = build_classifier("convnet", num_classes=3, im_size=16, depth=2, width=8)
    layout = FlatParams(net)
    g = torch.Generator().manual_seed(1)
    start = 0.2 * torch.randn(layout.numel, generator=g)  # functional_call ignores net's own init
    target = start + 0.02 * torch.randn(start.shape, generator=g)
    base = torch.randn(9, 3, 16, 16, generator=g)
    labels = torch.arange(3).repeat_interleave(3)

    def ours():
        images = base.clone().requires_grad_(True)
        lr = torch.tensor(0.01, requires_grad=True)
        end = student_unroll(
            classifier_loss(net, layout), start, images, labels, lr,
            steps=4, batch_syn=4, generator=torch.Generator().manual_seed(7),
        )  # fmt: skip
        loss = matching_loss(end, start, target, prune_mask(end, target, 0.0))
        loss.backward()
        return loss.detach(), images.grad, lr.grad

    def reference():
        images = base.clone().requires_grad_(True)
        lr = torch.tensor(0.01, requires_grad=True)
        loss = mtt_reference(net, start, target, images, labels, lr, 4, 4, seed=7)
        loss.backward()
        return loss.detach(), images.grad, lr.grad

    (l1, gi1, gl1), (l2, gi2, gl2) = ours(), reference()
    # equal up to the rounding of MTT's extra division by the parameter count
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=0)
    assert_close_scaled(gi1, gi2, 1e-5)
    assert_close_scaled(gl1, gl2, 1e-5)
    # and pruning at ε > 0 changes the loss: the comparison above is not vacuous
    images = base.clone()
    end = student_unroll(
        classifier_loss(net, layout), start, images, labels, torch.tensor(0.01),
        steps=4, batch_syn=4, generator=torch.Generator().manual_seed(7),
    )  # fmt: skip
    assert pruned_fraction(prune_mask(end, target, 0.3)) > 0
