"""DC/DSA gradient matching and DM distribution matching against direct transcriptions of the
formulas (REFERENCE.md C) on tiny cases."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_modules.condense.distribution_matching import distribution_matching_loss
from lightning_modules.condense.dsa import DSA
from lightning_modules.condense.gradient_matching import (
    class_gradients,
    gradient_matching_loss,
    layer_distance,
)
from lightning_modules.nets.classifiers import ConvNet
from tests.helpers import assert_close_scaled, scaled_error

K, B, S = 3, 4, 2


def tiny(dtype=torch.float64):
    torch.manual_seed(0)
    net = ConvNet(channels=3, num_classes=K, im_size=8, depth=2, width=4).to(dtype)
    real = torch.randn(K, B, 3, 8, 8, dtype=dtype)
    syn = torch.randn(K, S, 3, 8, 8, dtype=dtype, requires_grad=True)
    return net, real, syn


def direct_gm_loss(net, real, syn):
    """The reference's per-class loop, written out: sum over classes and weight tensors of
    sum over output units of 1 - cos; 1-D parameters skipped."""
    params = list(net.parameters())
    total = torch.zeros((), dtype=real.dtype)
    for c in range(K):
        lr_ = F.cross_entropy(net(real[c]), torch.full((B,), c))
        gr = [g.detach() for g in torch.autograd.grad(lr_, params)]
        ls = F.cross_entropy(net(syn[c]), torch.full((S,), c))
        gs = torch.autograd.grad(ls, params, create_graph=True)
        for a, b in zip(gr, gs):
            if a.dim() == 1:
                continue
            a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
            for i in range(a.shape[0]):
                cos = (a[i] @ b[i]) / (a[i].norm() * b[i].norm() + 1e-6)
                total = total + 1 - cos
    return total


def test_layer_distance_is_the_reference_distance():
    a, b = (
        torch.randn(5, 3, 3, 3, dtype=torch.float64),
        torch.randn(5, 3, 3, 3, dtype=torch.float64),
    )
    want = sum(
        1 - (a[i].flatten() @ b[i].flatten()) / (a[i].norm() * b[i].norm() + 1e-6) for i in range(5)
    )
    assert torch.allclose(layer_distance(a, b), want)
    assert float(layer_distance(a[:, 0, 0, 0], b[:, 0, 0, 0])) == 0.0  # 1-D: skipped


def test_gradient_matching_loss_equals_the_formula_and_its_gradient():
    net, real, syn = tiny()
    params = dict(net.named_parameters())
    want = direct_gm_loss(net, real, syn)
    (want_grad,) = torch.autograd.grad(want, syn)
    for batched in (True, False):
        got = gradient_matching_loss(net, params, real, syn, batched=batched)
        (got_grad,) = torch.autograd.grad(got, syn)
        assert_close_scaled(got, want, 1e-10, msg=f"batched={batched}")
        assert_close_scaled(got_grad, want_grad, 1e-9)


def test_class_gradients_batched_equals_loop():
    net, real, _ = tiny()
    params = {n: p.detach() for n, p in net.named_parameters()}
    y = torch.arange(K).view(K, 1).expand(K, B)
    a = class_gradients(net, params, real, y, batched=True, chunk_size=2)
    b = class_gradients(net, params, real, y, batched=False)
    # biases before a norm layer have zero gradient analytically (pure rounding): the scale is
    # that of all gradients together, the numbers whose rounding they carry
    scale = max(float(z.abs().max()) for z in b)
    assert all(scaled_error(x, z, scale) <= 1e-10 for x, z in zip(a, b))


def test_dsa_draw_is_shared_by_real_and_synthetic():
    """With DSA the loss equals the formula on views augmented by one draw per class."""
    net, real, syn = tiny()
    dsa = DSA("color_crop_cutout_flip_scale_rotate")
    g = torch.Generator().manual_seed(3)
    got = gradient_matching_loss(net, dict(net.named_parameters()), real, syn, dsa=dsa, generator=g)
    g = torch.Generator().manual_seed(3)
    views_r, views_s = [], []
    for c in range(K):
        p = dsa.draw(1, g, per_sample=False)
        views_r.append(dsa.apply(real[c], p))
        views_s.append(dsa.apply(syn[c], p))
    want = direct_gm_loss(net, torch.stack(views_r), torch.stack(views_s))
    assert_close_scaled(got, want, 1e-10)


def test_distribution_matching_loss_equals_the_formula():
    net, real, syn = tiny()
    want = sum(
        ((net.embed(real[c]).mean(0) - net.embed(syn[c]).mean(0)) ** 2).sum() for c in range(K)
    )
    for chunk in (None, 2):
        got = distribution_matching_loss(net.embed, real, syn, chunk=chunk)
        assert_close_scaled(got, want, 1e-10)
    (g1,) = torch.autograd.grad(want, syn)
    (g2,) = torch.autograd.grad(distribution_matching_loss(net.embed, real, syn), syn)
    assert_close_scaled(g1, g2, 1e-9)
    # siamese DSA: the same draw per class on both sides
    dsa = DSA("crop_scale")
    got = distribution_matching_loss(
        net.embed, real, syn, dsa=dsa, generator=torch.Generator().manual_seed(1)
    )
    g = torch.Generator().manual_seed(1)
    want = 0
    for c in range(K):
        p = dsa.draw(1, g, per_sample=False)
        d = net.embed(dsa.apply(real[c], p)).mean(0) - net.embed(dsa.apply(syn[c], p)).mean(0)
        want = want + (d**2).sum()
    assert_close_scaled(got, want, 1e-10)
