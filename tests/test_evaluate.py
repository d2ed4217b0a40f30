"""Evaluation: the protocol, the two training paths, the task through train.py and as a library."""

from __future__ import annotations

import json

import pytest
import torch

import train
from datamodules.cifar import CIFARDataModule
from datamodules.syn_set import SyntheticSet
from lightning_modules.condense.evaluation import (
    _Protocol,
    check_net_names,
    evaluate_set,
    init_parameters,
    results_markdown,
)
from lightning_modules.errors import UserError
from lightning_modules.nets import build_classifier
from lightning_modules.utils.seeds import derive_seed
from tests.conftest import run_train
from tests.helpers import assert_close_scaled


def make_set_file(dm, path, ipc=2, lr=0.02, net=None):
    g = torch.Generator().manual_seed(0)
    images = torch.cat([dm.real_images(c, ipc, g) for c in range(dm.num_classes)])
    labels = torch.arange(dm.num_classes).repeat_interleave(ipc)
    config = {"seed": 0, **({"net": net} if net is not None else {})}
    SyntheticSet(
        images, labels, lr, dm.transform.state_dict(), dm.name, ipc, "random", config
    ).save(path)
    return path


def small(**kw):
    base = dict(nets=["convnet"], num_classes=10, lr=0.01, num_eval=2, epochs=2, progress=False)
    return {**base, **kw}


def test_results_have_the_agreed_shape(tiny_dm):
    x, y = tiny_dm.train_x[:20], tiny_dm.train_y[:20]
    res = evaluate_set(x, y, tiny_dm.test_x, tiny_dm.test_y, **small(nets=["convnet", "alexnet"]))
    assert list(res) == ["convnet", "alexnet"]
    for r in res.values():
        assert len(r["accs"]) == 2 and all(0 <= a <= 100 for a in r["accs"])
        assert r["mean"] == pytest.approx(sum(r["accs"]) / 2)
        assert r["std"] == pytest.approx(abs(r["accs"][0] - r["accs"][1]) / 2)  # population std
        # accuracies on 40 test images are multiples of 2.5 %
        assert all(abs(a / 2.5 - round(a / 2.5)) < 1e-6 for a in r["accs"])
    table = results_markdown(res, "title")
    assert (
        "**title**" in table and "| convnet |" in table and "±" in table and "| alexnet |" in table
    )


def test_training_on_the_set_learns(tiny_dm):
    """Colour-coded classes: a few epochs on 60 images beat chance (10 %) by far (~90 %)."""
    res = evaluate_set(
        tiny_dm.train_x,
        tiny_dm.train_y,
        tiny_dm.test_x,
        tiny_dm.test_y,
        **small(epochs=4, num_eval=1, dsa_strategy="none", lr=0.01, batch_size=32),
    )
    assert res["convnet"]["mean"] > 50
    assert res["convnet"]["train_loss"][0] < 2.0  # started at ~log(10) = 2.3


def test_together_and_one_by_one_train_the_same_networks(tiny_dm):
    x, y = tiny_dm.train_x[:24], tiny_dm.train_y[:24]
    kw = small(num_eval=2, epochs=2, batch_size=16, return_nets=True)  # two batches per epoch
    vec = evaluate_set(x, y, tiny_dm.test_x, tiny_dm.test_y, together=True, **kw)
    seq = evaluate_set(x, y, tiny_dm.test_x, tiny_dm.test_y, together=False, **kw)
    assert vec["convnet"]["accs"] == seq["convnet"]["accs"]
    assert vec["convnet"]["train_loss"] == pytest.approx(seq["convnet"]["train_loss"], rel=1e-4)
    for a, b in zip(vec["_nets"]["convnet"], seq["_nets"]["convnet"]):
        # relative to the network's weight scale: the norm shifts stay near 0, so their own
        # magnitude (~1e-3) is no yardstick for float32 rounding (measured up to 9e-5 here)
        scale = max(float(q.abs().max()) for q in b.parameters())
        for p, q in zip(a.parameters(), b.parameters()):
            assert_close_scaled(p, q, 5e-4, scale=scale)
    # and the networks differ from each other (own init, order and DSA draws)
    first, second = vec["_nets"]["convnet"]
    assert not torch.allclose(first.classifier.weight, second.classifier.weight)


def test_seeded_repeatable_and_global_rng_untouched(tiny_dm):
    x, y = tiny_dm.train_x[:20], tiny_dm.train_y[:20]
    state = torch.get_rng_state()
    a = evaluate_set(x, y, tiny_dm.test_x, tiny_dm.test_y, seed=5, return_nets=True, **small())
    assert torch.equal(torch.get_rng_state(), state)  # nothing drew from the global generator
    b = evaluate_set(x, y, tiny_dm.test_x, tiny_dm.test_y, seed=5, return_nets=True, **small())
    c = evaluate_set(x, y, tiny_dm.test_x, tiny_dm.test_y, seed=6, return_nets=True, **small())
    wa, wb, wc = (r["_nets"]["convnet"][0].classifier.weight for r in (a, b, c))
    assert torch.equal(wa, wb) and not torch.allclose(wa, wc)
    assert (
        derive_seed(0, "convnet", 0) != derive_seed(0, "convnet", 1) != derive_seed(1, "convnet", 0)
    )


def test_init_parameters_matches_pytorch_default_ranges():
    net = build_classifier("convnet", 3, 10, 32)
    init_parameters(net, torch.Generator().manual_seed(0))
    conv = net.features[0]
    bound = (
        1 / (conv.weight[0].numel()) ** 0.5
    )  # kaiming_uniform(a=sqrt 5) gives U(±1/sqrt(fan_in))
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound
    assert conv.bias.abs().max() <= bound
    assert torch.equal(net.features[1].weight, torch.ones(128))  # instance-norm scale


def _proto(epochs: int, protocol: str) -> _Protocol:
    return _Protocol(
        lr=0.1,
        epochs=epochs,
        batch_size=4,
        momentum=0.9,
        weight_decay=0,
        dsa_strategy="none",
        eval_batch_size=8,
        protocol=protocol,
    )


def test_half_protocol_drops_lr_tenfold_at_half():
    proto = _proto(10, "half")
    assert proto.train_epochs == 10
    assert [proto.lr_at(e) for e in (0, 4)] == [0.1, 0.1]
    assert [proto.lr_at(e) for e in (5, 9)] == pytest.approx([0.01, 0.01])
    assert _proto(1, "half").lr_at(0) == 0.1


def test_mtt_protocol_schedule_is_the_reference_one():
    """MTT: epochs 0..E (E + 1 of them); lr / 10 after epoch E // 2 + 1."""
    proto = _proto(1000, "mtt")
    assert proto.train_epochs == 1001
    assert proto.lr_at(501) == 0.1 and proto.lr_at(502) == pytest.approx(0.01)
    assert proto.lr_at(1000) == pytest.approx(0.01)
    # short runs: the decay falls after the last epoch
    assert [_proto(e, "mtt").lr_at(e) for e in (1, 2)] == [0.1, 0.1]
    assert _proto(3, "mtt").lr_at(2) == 0.1 and _proto(3, "mtt").lr_at(3) == pytest.approx(0.01)
    with pytest.raises(UserError, match="evaluate.protocol must be one of mtt, half"):
        _proto(4, "cosine")


def reference_evaluate_synset(net, g, images, labels, *, lr, epochs, batch_size, dsa):
    """MTT's utils.evaluate_synset written out, with our generator for order and DSA draws."""
    lr_schedule = [epochs // 2 + 1]
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005)
    for ep in range(epochs + 1):
        net.train()
        for idx in torch.randperm(len(images), generator=g).split(batch_size):
            loss = torch.nn.functional.cross_entropy(net(dsa(images[idx], g)), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if ep in lr_schedule:
            lr *= 0.1
            opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005)
    return net


def test_mtt_protocol_trains_the_reference_loops_weights(tiny_dm):
    """One tiny ConvNet, one by one and vmap-batched, against the hand-written reference loop."""
    from lightning_modules.condense.dsa import DEFAULT_STRATEGY, DSA
    from lightning_modules.condense.evaluation import _fresh_net

    x, y = tiny_dm.train_x[:24], tiny_dm.train_y[:24]
    tiny = {"convnet": {"width": 8, "depth": 2}}
    kw = dict(nets=["convnet"], num_classes=10, lr=0.05, num_eval=2, epochs=4, batch_size=16)
    kw.update(progress=False, return_nets=True, net_options=tiny, seed=3)
    g = torch.Generator().manual_seed(derive_seed(3, "convnet", 0))
    ref = _fresh_net("convnet", 3, 10, 32, g, width=8, depth=2)
    ref = reference_evaluate_synset(
        ref, g, x, y, lr=0.05, epochs=4, batch_size=16, dsa=DSA(DEFAULT_STRATEGY)
    )
    one = evaluate_set(x, y, tiny_dm.test_x, tiny_dm.test_y, together=False, **kw)
    both = evaluate_set(x, y, tiny_dm.test_x, tiny_dm.test_y, together=True, **kw)
    half = evaluate_set(x, y, tiny_dm.test_x, tiny_dm.test_y, protocol="half", **kw)
    for p, q, r in zip(
        ref.parameters(),
        one["_nets"]["convnet"][0].parameters(),
        both["_nets"]["convnet"][0].parameters(),
    ):
        assert torch.equal(p, q)  # the same operations in the same order
        assert_close_scaled(r, p, 1e-4)  # vmap: up to float rounding
    flat = torch.nn.utils.parameters_to_vector
    gap = flat(half["_nets"]["convnet"][0].parameters()) - flat(ref.parameters())
    assert gap.abs().max() > 1e-2  # the other schedule is another network
    assert one["convnet"]["options"] == {"width": 8, "depth": 2}
    assert one["convnet"]["params"] == sum(p.numel() for p in ref.parameters())


def test_bad_arguments_are_user_errors(tiny_dm):
    x, y = tiny_dm.train_x[:10], tiny_dm.train_y[:10]
    with pytest.raises(
        UserError, match=r"unknown net\(s\) \['lenet'\].*valid: convnet, alexnet, vgg11, resnet18"
    ):
        evaluate_set(x, y, x, y, **small(nets=["convnet", "lenet"]))
    with pytest.raises(UserError, match="positive"):
        evaluate_set(x, y, x, y, **small(lr=-0.01))
    with pytest.raises(UserError, match="empty"):
        evaluate_set(x[:0], y[:0], x, y, **small())
    with pytest.raises(UserError, match="together"):
        evaluate_set(x, y, x, y, **small(together="sometimes"))
    assert check_net_names(["ConvNet", "resnet18-ap"]) == ["convnet", "resnet18_ap"]


# -- the task -----------------------------------------------------------------------------------


def test_task_as_library_call(compose, tiny_data, tmp_path):
    dm = CIFARDataModule(
        "cifar10", data_dir=str(tiny_data), download=False, cache_dir=str(tmp_path / "cache")
    )
    dm.setup()
    set_file = make_set_file(dm, tmp_path / "set.pt", lr=0.02)
    cfg = compose(
        "task=evaluate",
        f"evaluate.set={set_file}",
        "evaluate.ddranking.enabled=false",
        "evaluate.nets=[convnet,alexnet]",
        "evaluate.num_eval=2",
        "evaluate.epochs=2",
        f"dataset.data_dir={tiny_data}",
        "dataset.download=false",
        "logger=csv",
    )
    summary = train.run(cfg)
    out = tmp_path / "outputs" / "run"
    for name in ("convnet", "alexnet"):
        assert f"acc_{name}_mean" in summary and f"acc_{name}_std" in summary
    assert summary["lr"] == pytest.approx(0.02)  # the set's learned lr
    assert summary["objective"] == summary["acc_convnet_mean"]
    assert json.loads((out / "summary.json").read_text())["table"] == summary["table"]
    assert (out / "results.md").read_text() == summary["table"]
    record = json.loads((out / "results.json").read_text())
    assert record["results"]["alexnet"]["accs"] == summary["acc_alexnet_runs"]
    assert (out / "set.png").stat().st_size > 0
    logged = (out / "csv" / "metrics.csv").read_text()
    assert "evaluate/acc_convnet_mean" in logged


CONVNET_W8 = {
    "_target_": "lightning_modules.nets.build_classifier",
    "name": "convnet",
    "depth": 2,
    "width": 8,
    "norm": "instancenorm",
    "act": "relu",
    "pool": "avgpool",
}


def test_task_evaluates_on_the_sets_own_network(compose, tiny_data, tmp_path, caplog):
    """A set distilled on a width-8 ConvNet-2 is evaluated on width-8 ConvNet-2s (other archs:
    standard); evaluate.net_options overrides key by key, with one warning."""
    dm = CIFARDataModule(
        "cifar10", data_dir=str(tiny_data), download=False, cache_dir=str(tmp_path / "cache")
    )
    dm.setup()
    set_file = make_set_file(dm, tmp_path / "set.pt", ipc=1, net=CONVNET_W8)
    common = [
        "task=evaluate",
        f"evaluate.set={set_file}",
        "evaluate.ddranking.enabled=false",
        "evaluate.num_eval=1",
        "evaluate.epochs=1",
        f"dataset.data_dir={tiny_data}",
        "dataset.download=false",
        "logger=none",
    ]
    cfg = compose(*common, "evaluate.nets=[convnet,alexnet]")
    train.run(cfg)
    out = tmp_path / "outputs" / "run"
    record = json.loads((out / "results.json").read_text())
    own = {k: v for k, v in CONVNET_W8.items() if k not in ("_target_", "name")}
    width8 = sum(p.numel() for p in build_classifier("convnet", 3, 10, 32, **own).parameters())
    standard = sum(p.numel() for p in build_classifier("alexnet", 3, 10, 32).parameters())
    assert record["nets"]["convnet"] == {"options": own, "params": width8, "source": "set"}
    assert record["nets"]["alexnet"] == {"options": {}, "params": standard, "source": "standard"}
    assert record["results"]["convnet"]["params"] == width8
    table = (out / "results.md").read_text()
    assert f"| {width8:,} |" in table and "width=8" in table and "| default |" in table
    # an explicit option wins over the set's, and the mismatch is said once
    cfg = compose(*common, "evaluate.nets=[convnet]", "evaluate.net_options={convnet:{width:4}}")
    cfg.paths.output_dir = str(tmp_path / "outputs" / "override")
    with caplog.at_level("WARNING"):
        train.run(cfg)
    record = json.loads((tmp_path / "outputs" / "override" / "results.json").read_text())
    assert record["nets"]["convnet"]["options"] == {**own, "width": 4}
    assert record["nets"]["convnet"]["source"] == "set+evaluate.net_options"
    warned = [r for r in caplog.records if "other networks than the set" in r.getMessage()]
    assert len(warned) == 1 and "convnet.width: set 8 -> 4" in warned[0].getMessage()


def test_task_full_train_split(compose, tiny_data):
    cfg = compose(
        "task=evaluate",
        "evaluate.set=full",
        "evaluate.nets=[convnet]",
        "evaluate.num_eval=1",
        "evaluate.epochs=1",
        f"dataset.data_dir={tiny_data}",
        "dataset.download=false",
        "dataset.train_per_class=3",
        "logger=none",
    )
    summary = train.run(cfg)
    assert summary["train_images"] == 30 and summary["lr"] == 0.01


def test_task_refuses_a_set_of_another_dataset(compose, tiny_data, tmp_path):
    dm = CIFARDataModule(
        "cifar100", data_dir=str(tiny_data), download=False, cache_dir=str(tmp_path / "cache")
    )
    dm.setup()
    set_file = make_set_file(dm, tmp_path / "c100.pt", ipc=1)
    cfg = compose(
        "task=evaluate", f"evaluate.set={set_file}", f"dataset.data_dir={tiny_data}", "logger=none"
    )
    with pytest.raises(
        UserError, match="is for cifar100 but dataset=cifar10; run with dataset=cifar100"
    ):
        train.run(cfg)


def test_task_missing_or_absent_set(compose, tiny_data, tmp_path):
    common = [f"dataset.data_dir={tiny_data}", "dataset.download=false", "logger=none"]
    with pytest.raises(UserError, match="does not exist"):
        train.run(compose("task=evaluate", f"evaluate.set={tmp_path / 'missing.pt'}", *common))
    with pytest.raises(UserError, match="give the set to evaluate"):
        train.run(compose("task=evaluate", *common))


@pytest.mark.slow
def test_train_py_prints_the_table_and_writes_summary(tiny_data, tmp_path):
    dm = CIFARDataModule(
        "cifar10", data_dir=str(tiny_data), download=False, cache_dir=str(tmp_path / "cache")
    )
    dm.setup()
    set_file = make_set_file(dm, tmp_path / "set.pt")
    common = [
        f"dataset.data_dir={tiny_data}",
        "dataset.download=false",
        f"paths.runs_dir={tmp_path / 'runs'}",
    ]
    done = run_train(
        "task=evaluate",
        f"evaluate.set={set_file}",
        "evaluate.ddranking.enabled=false",
        "evaluate.nets=[convnet,alexnet]",
        "evaluate.num_eval=2",
        "evaluate.epochs=2",
        "logger=none",
        *common,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| convnet |" in done.stdout and "| alexnet |" in done.stdout and "±" in done.stdout
    (summary_path,) = (tmp_path / "runs" / "evaluate").glob("*/summary.json")
    summary = json.loads(summary_path.read_text())
    assert {
        "acc_convnet_mean",
        "acc_convnet_std",
        "acc_alexnet_mean",
        "acc_alexnet_std",
        "table",
    } <= set(summary)
    assert "| convnet |" in summary["table"]


@pytest.mark.slow
def test_train_py_bad_input_is_one_line(tiny_data, tmp_path):
    common = [
        f"dataset.data_dir={tiny_data}",
        "dataset.download=false",
        "logger=none",
        f"paths.runs_dir={tmp_path}",
    ]
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 truncated")
    cases = {
        (
            "evaluate.set=full",
            "evaluate.nets=[convnet,lenet]",
        ): "evaluate.nets must be a non-empty list of one of convnet, alexnet, vgg11, resnet18",
        (f"evaluate.set={tmp_path / 'corrupt.pt'}",): "truncated or corrupt",
    }
    for overrides, message in cases.items():
        done = run_train("task=evaluate", *overrides, *common, cwd=tmp_path)
        assert done.returncode == 2, done.stderr[-2000:]
        lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (
            done.stderr
        )
