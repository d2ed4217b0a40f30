"""CAFE's loss and loop control against direct transcriptions of the formulas (REFERENCE.md C;
kaiwang960112/CAFE distill.py) on tiny cases."""

from __future__ import annotations

import torch

from lightning_modules.condense.dsa import DSA
from lightning_modules.condense.feature_alignment import (
    AccuracyWatcher,
    cafe_loss,
    class_accuracies,
    convnet_layer_features,
)
from lightning_modules.nets.classifiers import ConvNet
from tests.helpers import assert_close_scaled

K, B, S = 3, 4, 2


def tiny():
    torch.manual_seed(0)
    net = ConvNet(channels=3, num_classes=K, im_size=8, depth=3, width=4).double()
    real = torch.randn(K, B, 3, 8, 8, dtype=torch.float64)
    syn = torch.randn(K, S, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    return net, real, syn


def direct_cafe(net, real, syn, weights=(0.1, 0.1, 1.0, 1.0), beta=0.01):
    """Written out: block outputs after act (layers 0-2, 4-6, 8-10) and the final pooled map;
    per class the squared distance of the mean maps, weighted; the same on the flattened
    embedding with weight 1; real samples classified by inner products with the class means of
    the synthetic embeddings, cross-entropy summed, times beta."""
    f = net.features

    def maps(x):
        a1 = f[2](f[1](f[0](x)))
        a2 = f[6](f[5](f[4](f[3](a1))))
        a3 = f[10](f[9](f[8](f[7](a2))))
        return [a1, a2, a3, f[11](a3)]

    total = torch.zeros((), dtype=real.dtype)
    centres, real_emb = [], []
    for c in range(K):
        with torch.no_grad():
            mr = maps(real[c])
        ms = maps(syn[c])
        for w, a, b in zip(weights, mr, ms):
            total = total + w * ((a.mean(0) - b.mean(0)) ** 2).sum()
        er, es = mr[-1].flatten(1), ms[-1].flatten(1)
        total = total + ((er.mean(0) - es.mean(0)) ** 2).sum()
        centres.append(es.mean(0))
        real_emb.append(er)
    for c in range(K):
        for i in range(B):
            logits = torch.stack([real_emb[c][i] @ centres[j] for j in range(K)])
            total = total - beta * torch.log_softmax(logits, 0)[c]
    return total


def test_cafe_loss_equals_the_formula_and_its_gradient():
    net, real, syn = tiny()
    want = direct_cafe(net, real, syn)
    (want_grad,) = torch.autograd.grad(want, syn)
    terms = cafe_loss(net, real, syn)
    (got_grad,) = torch.autograd.grad(terms["loss"], syn)
    assert_close_scaled(terms["loss"], want, 1e-10)
    assert_close_scaled(got_grad, want_grad, 1e-9)
    assert set(terms) == {"align", "embed", "disc", "loss"}


def test_cafe_loss_under_dsa_is_the_formula_on_siamese_views():
    net, real, syn = tiny()
    dsa = DSA("color_crop_cutout_flip_scale_rotate")
    g = torch.Generator().manual_seed(3)
    got = cafe_loss(net, real, syn, dsa=dsa, generator=g)["loss"]
    g = torch.Generator().manual_seed(3)
    rv, sv = [], []
    for c in range(K):
        p = dsa.draw(1, g, per_sample=False)
        rv.append(dsa.apply(real[c], p))
        sv.append(dsa.apply(syn[c], p))
    want = direct_cafe(net, torch.stack(rv), torch.stack(sv))
    assert_close_scaled(got, want, 1e-10)


def test_layer_features_of_a_depth_two_net():
    net = ConvNet(channels=3, num_classes=K, im_size=8, depth=2, width=4)
    x = torch.randn(2, 3, 8, 8)
    feats = convnet_layer_features(net, x)
    assert [tuple(f.shape) for f in feats] == [(2, 4, 8, 8), (2, 4, 4, 4), (2, 4, 2, 2)]
    torch.testing.assert_close(feats[-1].flatten(1), net.embed(x))


def reference_watch(values, threshold, flat, window=10):
    """The reference's loop (distill.py), written out: acc += sum; acc /= K; append; at `window`
    entries stop if (max - min) < threshold (outer) / > threshold (inner), else pop the oldest."""
    acc, watcher, stops = 0.0, [], []
    for v in values:
        acc += sum(v)
        acc /= len(v)
        watcher.append(acc)
        stop = False
        if len(watcher) == window:
            spread = max(watcher) - min(watcher)
            if (spread < threshold) if flat else (spread > threshold):
                watcher, acc, stop = [], 0.0, True
            else:
                watcher.pop(0)
        stops.append(stop)
    return stops


def test_accuracy_watcher_follows_the_reference_loop():
    g = torch.Generator().manual_seed(0)
    values = (torch.rand(60, K, generator=g) * 0.2 + torch.linspace(0, 0.5, 60)[:, None]).tolist()
    for threshold, flat in ((0.04, True), (0.03, False), (0.2, True)):
        w = AccuracyWatcher(threshold, "flat" if flat else "moved", window=10)
        got = [w.add(torch.tensor(v)) for v in values]
        assert got == reference_watch(values, threshold, flat)


def test_class_accuracies():
    net = ConvNet(channels=3, num_classes=K, im_size=8, depth=1, width=4)
    x = torch.randn(K, 5, 3, 8, 8)
    pred = net(x.reshape(-1, 3, 8, 8)).argmax(1).view(K, 5)
    want = torch.stack([(pred[c] == c).float().mean() for c in range(K)])
    torch.testing.assert_close(class_accuracies(net, x), want)
