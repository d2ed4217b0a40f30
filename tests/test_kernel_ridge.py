"""KIP: the KRR loss against its formula, the exact fc kernels against Monte-Carlo estimates of
wide finite networks, and the chunked kernels against one block."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.condense.kernel_ridge import (
    chunked_kernel,
    embedding_features,
    fc_kernel,
    fc_random_features,
    kip_loss,
    kip_loss_from_features,
    krr_predict,
)
from lightning_modules.nets.classifiers import ConvNet

D = torch.float64


def test_kip_loss_is_the_formula():
    g = torch.Generator().manual_seed(0)
    xs, xt = torch.randn(4, 5, generator=g, dtype=D), torch.randn(7, 5, generator=g, dtype=D)
    ys, yt = torch.randn(4, 3, generator=g, dtype=D), torch.randn(7, 3, generator=g, dtype=D)
    reg = 0.1
    k_ss, k_ts = xs @ xs.t() + 1, xt @ xs.t() + 1
    # written out: pred = K_ts (K_ss + reg * trace(K_ss) / n * I)^-1 Y_s; loss = 1/2 mean sq. error
    inv = torch.inverse(k_ss + reg * torch.trace(k_ss) / 4 * torch.eye(4, dtype=D))
    pred = k_ts @ inv @ ys
    want = sum(((pred[i, j] - yt[i, j]) ** 2) for i in range(7) for j in range(3)) / 21 / 2
    torch.testing.assert_close(krr_predict(k_ss, k_ts, ys, reg), pred)
    torch.testing.assert_close(kip_loss(k_ss, k_ts, ys, yt, reg), want)
    phi_s = torch.cat([xs, torch.ones(4, 1, dtype=D)], 1)
    phi_t = torch.cat([xt, torch.ones(7, 1, dtype=D)], 1)
    torch.testing.assert_close(kip_loss_from_features(phi_s, phi_t, ys, yt, reg), want)


def test_fc_kernel_of_depth_zero_is_the_linear_kernel():
    x = torch.randn(3, 2, 2, dtype=D)
    want = 2.0 * (x.flatten(1) @ x.flatten(1).t()) / 4 + 0.01
    torch.testing.assert_close(fc_kernel(x, x, depth=0, kind="nngp"), want)


@pytest.mark.parametrize("depth,width,nets", [(1, 2**15, 4), (2, 2**11, 16)])
def test_exact_nngp_against_a_wide_random_network(depth, width, nets):
    """Monte-Carlo: the mean inner products of the features of ``nets`` random fc nets of a
    large width approach the closed-form arc-cosine NNGP; far closer than at width 64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 4, 4, generator=g, dtype=D)
    exact = fc_kernel(x, x, depth=depth, kind="nngp")

    def estimate(width, nets):
        phis = [fc_random_features(x, width, depth=depth, generator=g) for _ in range(nets)]
        return sum(p @ p.t() for p in phis) / nets

    err = {w: float((estimate(w, nets) - exact).norm() / exact.norm()) for w in (64, width)}
    assert err[width] < 0.03, err
    assert err[width] < err[64] / 4, err


def test_exact_ntk_against_the_empirical_ntk_of_a_wide_network():
    """The NTK (NTK parameterisation, one hidden layer): the inner products of the parameter
    gradients of a random net of width 2^14 written out here approach the closed form."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, generator=g, dtype=D)
    width, w_var, b_var = 2**14, 2.0, 0.01
    params = [
        torch.randn(6, width, generator=g, dtype=D).requires_grad_(),
        torch.randn(width, generator=g, dtype=D).requires_grad_(),
        torch.randn(width, generator=g, dtype=D).requires_grad_(),
        torch.randn((), generator=g, dtype=D).requires_grad_(),
    ]

    def f(xi):
        w1, b1, w2, b2 = params
        h = xi @ w1 * math.sqrt(w_var / 6) + b1 * math.sqrt(b_var)
        return torch.relu(h) @ w2 * math.sqrt(w_var / width) + b2 * math.sqrt(b_var)

    grads = [torch.cat([gr.flatten() for gr in torch.autograd.grad(f(xi), params)]) for xi in x]
    emp = torch.stack(grads) @ torch.stack(grads).t()
    exact = fc_kernel(x, x, depth=1, kind="ntk")
    assert float((emp - exact).norm() / exact.norm()) < 0.03


def test_chunked_kernels_equal_one_block():
    g = torch.Generator().manual_seed(2)
    a, b = (
        torch.randn(7, 3, 4, 4, generator=g, dtype=D),
        torch.randn(5, 3, 4, 4, generator=g, dtype=D),
    )

    def kern(u, v):
        return fc_kernel(u, v, depth=2, kind="ntk")

    torch.testing.assert_close(chunked_kernel(kern, a, b, 3), kern(a, b))
    torch.manual_seed(0)
    nets = [
        ConvNet(channels=3, num_classes=2, im_size=4, depth=1, width=3).double() for _ in range(2)
    ]
    embeds = [n.embed for n in nets]
    phi = embedding_features(embeds, a, chunk=2)
    torch.testing.assert_close(phi, embedding_features(embeds, a))
    # the RFAD estimate: the mean over the nets of e_m(x) . e_m(x') / F
    want = sum(e(a) @ e(a).t() / e(a).shape[1] for e in embeds) / 2
    torch.testing.assert_close(phi @ phi.t(), want)
