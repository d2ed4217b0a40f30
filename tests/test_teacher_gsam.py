"""GSAM experts (``teacher.optimizer=gsam``): one step against a transcription of the update
rule of the references' ``gsam.py`` (float64), BatchNorm statistics, a tiny run, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from datamodules.trajectories import ExpertStore
from lightning_modules.condense.gsam import gsam_step
from lightning_modules.errors import UserError
from lightning_modules.nets import build_classifier


def transcribed_step(net, x, y, *, lr, rho, alpha, weight_decay, adaptive=True):
    """GSAM as the references' ``GSAM.step`` computes it, written out on the parameter list."""
    names = [n for n, _ in net.named_parameters()]
    w = [p.detach().clone() for p in net.parameters()]

    def grad_at(ws):
        ws = [v.clone().requires_grad_(True) for v in ws]
        loss = F.cross_entropy(functional_call(net, dict(zip(names, ws, strict=True)), (x,)), y)
        return list(torch.autograd.grad(loss, ws))

    def norm(vs):
        return torch.sqrt(sum((v**2).sum() for v in vs))

    g = grad_at(w)
    scale = rho / (norm([(wi.abs() if adaptive else 1.0) * gi for wi, gi in zip(w, g)]) + 1e-12)
    e = [gi * scale * (wi**2 if adaptive else 1.0) for wi, gi in zip(w, g)]
    gs = grad_at([wi + ei for wi, ei in zip(w, e)])
    cos = sum((a * b).sum() for a, b in zip(g, gs)) / (norm(gs) * norm(g) + 1e-12)
    d = [s - alpha * (gi - cos * norm(g) * s / (norm(gs) + 1e-12)) for gi, s in zip(g, gs)]
    return [wi - lr * (di + weight_decay * wi) for wi, di in zip(w, d)]


@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 5e-4])
def test_one_gsam_step_equals_the_transcription(adaptive, weight_decay):
    torch.manual_seed(0)
    net = build_classifier("convnet", num_classes=3, im_size=8, depth=2, width=4).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    kw = dict(lr=0.1, rho=0.05, alpha=0.3)
    expected = transcribed_step(net, x, y, weight_decay=weight_decay, adaptive=adaptive, **kw)
    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=kw["lr"], weight_decay=weight_decay)
    loss = gsam_step(
        net,
        lambda: F.cross_entropy(net(x), y),
        opt,
        rho=kw["rho"],
        alpha=kw["alpha"],
        adaptive=adaptive,
    )
    assert torch.isclose(loss, F.cross_entropy(functional_call(net, dict(zip(
        [n for n, _ in net.named_parameters()], before, strict=True)), (x,)), y))  # fmt: skip
    for ours, theirs in zip(net.parameters(), expected, strict=True):
        torch.testing.assert_close(ours.detach(), theirs, rtol=1e-12, atol=1e-15)
    # not SGD in disguise: the plain step lands elsewhere
    sgd = build_classifier("convnet", num_classes=3, im_size=8, depth=2, width=4).double()
    with torch.no_grad():
        for p, b in zip(sgd.parameters(), before, strict=True):
            p.copy_(b)
    plain = torch.optim.SGD(sgd.parameters(), lr=kw["lr"], weight_decay=weight_decay)
    F.cross_entropy(sgd(x), y).backward()
    plain.step()
    gap = max((a - b).abs().max() for a, b in zip(sgd.parameters(), net.parameters()))
    assert gap > 1e-6


def test_batchnorm_statistics_come_from_the_first_pass_only():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).double()
    twin = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).double()
    twin.load_state_dict(net.state_dict())
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.arange(8) % 3
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    gsam_step(net, lambda: F.cross_entropy(net(x), y), opt, rho=0.5, alpha=0.3)
    twin(x)  # one forward pass at the unperturbed weights
    torch.testing.assert_close(net[1].running_mean, twin[1].running_mean)
    torch.testing.assert_close(net[1].running_var, twin[1].running_var)
    assert net[1].momentum == twin[1].momentum  # restored


def gsam_overrides(data, store, *extra):
    return [
        "task=teacher",
        "dataset=cifar10",
        f"dataset.data_dir={data}",
        "dataset.download=false",
        "teacher.num_experts=1",
        "teacher.epochs=2",
        "teacher.batch_size=64",
        f"teacher.out={store}",
        "net.width=8",
        "logger=none",
        "teacher.optimizer=gsam",
        *extra,
    ]


def test_teacher_with_gsam_records_it_and_keeps_stores_apart(tiny_data, tmp_path, compose):
    import train

    store_dir = tmp_path / "store"
    train.run(compose(*gsam_overrides(tiny_data, store_dir, "teacher.dsa=false")))
    expert = ExpertStore(store_dir).load(0)
    assert expert.meta["gsam"] == {"rho": 0.01, "alpha": 0.3, "adaptive": True}
    plain_dir = tmp_path / "plain"
    train.run(compose(*gsam_overrides(tiny_data, plain_dir, "teacher.dsa=false",
                                      "teacher.optimizer=sgd")))  # fmt: skip
    plain = ExpertStore(plain_dir).load(0)
    assert plain.meta["gsam"] is None
    assert torch.equal(plain.snapshots[0], expert.snapshots[0])
    assert not torch.equal(plain.snapshots[-1], expert.snapshots[-1])
    with pytest.raises(UserError, match="teacher.optimizer=gsam 0.01/0.3.*this run has sgd"):
        train.run(compose(*gsam_overrides(tiny_data, store_dir, "teacher.optimizer=sgd",
                                          "teacher.dsa=false")))  # fmt: skip
    # with DSA and the curriculum together (PAD's buffer_CL.py recipe), on a fresh store
    both = tmp_path / "both"
    extra = ["teacher.curriculum=el2n", "teacher.score_epochs=1", "teacher.score_repeats=1"]
    train.run(compose(*gsam_overrides(tiny_data, both, *extra)))
    meta = ExpertStore(both).load(0).meta
    assert meta["gsam"]["rho"] == 0.01 and meta["curriculum"]["score"] == "el2n"


@pytest.mark.parametrize(
    "extra,message",
    [
        ("teacher.optimizer=adam", "teacher.optimizer must be one of sgd, gsam"),
        ("teacher.gsam_rho=0", "teacher.gsam_rho must be"),
        ("teacher.gsam_alpha=-1", "teacher.gsam_alpha must be"),
    ],
)
def test_bad_gsam_values_are_refused(tiny_data, tmp_path, compose, extra, message):
    from lightning_modules.schema import validate

    with pytest.raises(UserError, match=message) as err:
        validate(compose(*gsam_overrides(tiny_data, tmp_path / "s", extra)), composed=True)
    assert "\n" not in str(err.value)
