"""Soft-label evaluation and DD-Ranking's scores: the loss against the reference criterion, the
formulas against hand-computed values, the training loop against a transcription of DATM's
``evaluate_synset`` with its ``SoftCrossEntropy``, and the task end to end at toy size."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import train
from datamodules.cifar import CIFARDataModule
from datamodules.syn_set import SyntheticSet
from datamodules.trajectories import ExpertStore
from lightning_modules.condense import ddranking
from lightning_modules.condense.evaluation import _fresh_net, evaluate_set
from lightning_modules.condense.soft_labels import label_loss, soft_cross_entropy
from lightning_modules.errors import UserError
from lightning_modules.nets.functional import FlatParams
from lightning_modules.utils.seeds import derive_seed

TINY_NET = {"name": "convnet", "width": 8, "depth": 2}


# -- the loss ------------------------------------------------------------------------------------
def datm_soft_cross_entropy(inputs, target):
    """DATM's SoftCrossEntropy (distill/DATM.py, distill/evaluation.py), written out."""
    input_log_likelihood = -F.log_softmax(inputs, dim=1)
    target_log_likelihood = F.softmax(target, dim=1)
    batch = inputs.shape[0]
    return torch.sum(torch.mul(input_log_likelihood, target_log_likelihood)) / batch


def ddranking_sce(stu, tea, temperature):
    """DD-Ranking's SoftCrossEntropyLoss (ddranking/loss/sce.py, scale_loss=False), written out."""
    log_p = -F.log_softmax(stu / temperature, dim=1)
    q = F.softmax(tea / temperature, dim=1)
    return torch.sum(torch.mul(log_p, q)) / stu.size(0)


def test_soft_cross_entropy_is_the_reference_criterion():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 4, generator=g, dtype=torch.float64) * 3
    ours, ref = soft_cross_entropy(z, y), datm_soft_cross_entropy(z, y)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-15)
    (g_ours,) = torch.autograd.grad(ours, z)
    (g_ref,) = torch.autograd.grad(datm_soft_cross_entropy(z, y), z)
    torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=1e-15)
    # softmax(z) - softmax(y), over the batch: the gradient written by hand
    torch.testing.assert_close(g_ours, (z.softmax(1) - y.softmax(1)).detach() / 5)
    torch.testing.assert_close(
        soft_cross_entropy(z, y, 1.2), ddranking_sce(z, y, 1.2), rtol=0, atol=1e-15
    )
    # hard labels: plain cross-entropy; one-hot label logits of large margin approach it
    hard = torch.tensor([0, 3, 1, 2, 2])
    torch.testing.assert_close(label_loss(z, hard), F.cross_entropy(z, hard))
    onehot = F.one_hot(hard, 4).double() * 60
    torch.testing.assert_close(label_loss(z, onehot), F.cross_entropy(z, hard))
    with pytest.raises(ValueError, match="do not match"):
        soft_cross_entropy(z, y[:, :3])


# -- the formulas --------------------------------------------------------------------------------
def test_ddranking_formulas_on_a_hand_computed_case():
    # N maps [-1, 1] onto [0, 1]; N(0) = (1 - 1/e) / (e - 1/e) = 1 / (e + 1)
    assert ddranking.normalise(-1) == pytest.approx(0.0, abs=1e-15)
    assert ddranking.normalise(1) == pytest.approx(1.0)
    assert ddranking.normalise(0) == pytest.approx(1 / (math.e + 1))
    # full 80 %, set hard 60 %, set soft 70 %, random soft 50 %: HLR 20, IOR 20 -> alpha 0
    assert ddranking.hlr(80, 60) == 20 and ddranking.ior(70, 50) == 20
    assert ddranking.lrs(20, 20) == pytest.approx(100 / (math.e + 1))  # 26.894...
    assert ddranking.lrs(20, 20) == pytest.approx(26.894142, abs=1e-6)
    # w = 1: only IOR counts, alpha = 0.2: (e^0.2 - e^-1) / (e - e^-1)
    assert ddranking.lrs(20, 20, weight=1.0) == pytest.approx(
        36.3139, abs=1e-4
    )  # 0.853524 / 2.350402
    # ARS: gains 20 with DSA, 0 without -> beta 0.1 -> N(0.1) = 0.313688
    assert ddranking.ars(70, 50, 40, 40) == pytest.approx(31.3688, abs=1e-4)
    # a perfect set (HLR 0, IOR 100 points at w=1) scores 100; the worst scores 0
    assert ddranking.lrs(0, 100, weight=1.0) == pytest.approx(100)
    assert ddranking.lrs(100, 0, weight=0.0) == pytest.approx(0, abs=1e-12)


def test_round_scores_pair_rounds_and_average_them():
    out = ddranking.round_scores(
        full_acc=80.0,
        set_hard=[60.0, 62.0],
        set_own=[70.0, 66.0],
        random_own=[50.0, 54.0],
        set_noaug=[40.0, 41.0],
        random_noaug=[40.0, 39.0],
    )
    assert out["hlr"]["runs"] == [20.0, 18.0] and out["hlr"]["mean"] == 19.0
    assert out["ior"]["runs"] == [20.0, 12.0] and out["ior"]["std"] == 4.0
    lrs1 = 100 * ddranking.normalise(0.5 * 0.20 - 0.5 * 0.20)
    lrs2 = 100 * ddranking.normalise(0.5 * 0.12 - 0.5 * 0.18)
    assert out["lrs"]["runs"] == pytest.approx([lrs1, lrs2])
    assert out["lrs"]["mean"] == pytest.approx((lrs1 + lrs2) / 2)  # mean of rounds, not of means
    ars2 = 100 * ddranking.normalise(0.5 * 0.12 + 0.5 * 0.02)
    assert out["ars"]["runs"] == pytest.approx([31.3688, ars2], abs=1e-4)
    missing = ddranking.round_scores(
        full_acc=None, set_hard=None, set_own=[50.0], random_own=[40.0]
    )
    assert missing["hlr"] is None and missing["lrs"] is None and missing["ars"] is None
    assert missing["ior"]["mean"] == 10.0


def test_random_subset_has_the_sets_counts():
    labels = torch.arange(4).repeat_interleave(5)
    idx = ddranking.random_subset_indices(labels, torch.tensor([2, 0, 1, 3]), torch.Generator())
    assert torch.bincount(labels[idx], minlength=4).tolist() == [2, 0, 1, 3]
    assert len(set(idx.tolist())) == 6
    with pytest.raises(ValueError, match="class 0 has 5"):
        ddranking.random_subset_indices(labels, torch.tensor([6, 0, 0, 0]), torch.Generator())


# -- the training loop ---------------------------------------------------------------------------
def reference_soft_evaluate_synset(net, g, images, label_logits, *, lr, epochs, batch_size, dsa):
    """DATM's utils_baseline.evaluate_synset with train_criterion=SoftCrossEntropy (SGD 0.9,
    wd 5e-4, epochs + 1 epochs, lr / 10 and a new optimiser after epoch epochs // 2 + 1), with
    our generator for the batch order and the DSA draws."""
    lr_schedule = [epochs // 2 + 1]
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005)
    for ep in range(epochs + 1):
        net.train()
        for idx in torch.randperm(len(images), generator=g).split(batch_size):
            loss = datm_soft_cross_entropy(net(dsa(images[idx], g)), label_logits[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if ep in lr_schedule:
            lr *= 0.1
            opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005)
    return net


def test_soft_label_training_is_datms_evaluate_synset(tiny_dm):
    from lightning_modules.condense.dsa import DEFAULT_STRATEGY, DSA

    x = tiny_dm.train_x[:24]
    y = torch.randn(24, 10, generator=torch.Generator().manual_seed(1)) * 2
    options = {k: v for k, v in TINY_NET.items() if k != "name"}
    kw = dict(nets=["convnet"], num_classes=10, lr=0.05, num_eval=2, epochs=4, batch_size=16)
    kw.update(progress=False, return_nets=True, net_options={"convnet": options}, seed=3)
    g = torch.Generator().manual_seed(derive_seed(3, "convnet", 0))
    ref = _fresh_net("convnet", 3, 10, 32, g, **options)
    ref = reference_soft_evaluate_synset(
        ref, g, x, y, lr=0.05, epochs=4, batch_size=16, dsa=DSA(DEFAULT_STRATEGY)
    )
    one = evaluate_set(x, y, tiny_dm.test_x, tiny_dm.test_y, together=False, **kw)
    both = evaluate_set(x, y, tiny_dm.test_x, tiny_dm.test_y, together=True, **kw)
    hard = evaluate_set(x, y.argmax(1), tiny_dm.test_x, tiny_dm.test_y, together=False, **kw)
    flat = torch.nn.utils.parameters_to_vector
    for p, q, r in zip(
        ref.parameters(), one["_nets"]["convnet"][0].parameters(),
        both["_nets"]["convnet"][0].parameters(),
    ):  # fmt: skip
        assert torch.equal(p, q)  # the same operations in the same order
        torch.testing.assert_close(r, p, atol=1e-5, rtol=1e-4)  # vmap: up to float rounding
    gap = flat(hard["_nets"]["convnet"][0].parameters()) - flat(ref.parameters())
    assert gap.abs().max() > 1e-3  # hard labels train another network


# -- the task ------------------------------------------------------------------------------------
def write_teacher(dm, root, epochs=2):
    """A one-expert store of a tiny ConvNet (random weights per snapshot): a stand-in teacher."""
    options = {k: v for k, v in TINY_NET.items() if k != "name"}
    net = _fresh_net("convnet", 3, 10, 32, torch.Generator().manual_seed(5), **options)
    layout = FlatParams(net)
    theta = layout.flatten(net)
    snaps = torch.stack([theta * (1 + 0.1 * e) for e in range(epochs + 1)])
    meta = {
        "net": {**TINY_NET, "_target_": "lightning_modules.nets.build_classifier"},
        "param_names": layout.names,
        "param_shapes": [list(s) for s in layout.shapes],
        "dataset": dm.name, "zca": False, "lr": 0.01, "seed": 0, "epochs": epochs,
        "batch_size": 256, "dsa_strategy": "", "test_acc": [10.0] * (epochs + 1),
        "num_classes": 10, "channels": 3, "im_size": 32,
    }  # fmt: skip
    ExpertStore(root).write(0, snaps, meta)
    return net, snaps


def soft_set_file(dm, path, store=None, ipc=2):
    g = torch.Generator().manual_seed(0)
    images = torch.cat([dm.real_images(c, ipc, g) for c in range(dm.num_classes)])
    labels = torch.arange(dm.num_classes).repeat_interleave(ipc)
    # hand-made soft labels: the true class ahead by 2, the next class by 1
    soft = 2.0 * F.one_hot(labels, 10) + 1.0 * F.one_hot((labels + 1) % 10, 10)
    config = {"seed": 0, "net": dict(TINY_NET)}
    if store is not None:
        config["distill"] = {"trajectories": str(store)}
    SyntheticSet(
        images, labels, 0.02, dm.transform.state_dict(), dm.name, ipc, "datm", config,
        soft_labels=soft.float(),
    ).save(path)  # fmt: skip
    return path


def _overrides(tiny_data, set_file, *more):
    return [
        "task=evaluate", f"evaluate.set={set_file}", "evaluate.nets=[convnet]",
        "evaluate.num_eval=2", "evaluate.epochs=2", f"dataset.data_dir={tiny_data}",
        "dataset.download=false", "dataset.train_per_class=4", "logger=none",
        "evaluate.ddranking.full_epochs=1", *more,
    ]  # fmt: skip


def test_soft_set_end_to_end_writes_both_accuracies_and_the_scores(compose, tiny_data, tmp_path):
    dm = CIFARDataModule(
        "cifar10", data_dir=str(tiny_data), download=False, cache_dir=str(tmp_path / "cache"),
        train_per_class=4,
    )  # fmt: skip
    dm.setup()
    store = tmp_path / "experts"
    teacher, snaps = write_teacher(dm, store)
    set_file = soft_set_file(dm, tmp_path / "set.pt", store=store)
    cfg = compose(*_overrides(tiny_data, set_file, "evaluate.ddranking.ars=true"))
    summary = train.run(cfg)
    out = tmp_path / "outputs" / "run"
    written = json.loads((out / "summary.json").read_text())
    for key in ("acc_soft", "acc_hard", "hlr", "ior", "lrs", "ars"):
        assert isinstance(written[key], float), key
    assert written["label_protocol"] == "soft"
    record = json.loads((out / "results.json").read_text())
    r = record["scores"]["nets"]["convnet"]
    # the set's own accuracies are the soft ones; the hard ones come from another variant
    assert written["acc_convnet_runs"] == r["acc_soft"]["runs"]
    assert record["variants"]["set_hard"]["convnet"]["accs"] == r["acc_hard"]["runs"]
    # the scores are the formulas applied round by round to what was trained
    full = record["variants"]["full"]["convnet"]["mean"]
    assert r["acc_full"] == full and "trained here" in r["acc_full_source"]
    rnd = record["variants"]["random"]["convnet"]["accs"]
    expect = ddranking.round_scores(
        full_acc=full, set_hard=r["acc_hard"]["runs"], set_own=r["acc_soft"]["runs"],
        random_own=rnd, set_noaug=record["variants"]["set_noaug"]["convnet"]["accs"],
        random_noaug=record["variants"]["random_noaug"]["convnet"]["accs"],
    )  # fmt: skip
    for key in ("hlr", "ior", "lrs", "ars"):
        assert written[key] == pytest.approx(expect[key]["mean"]), key
    assert written["hlr"] == pytest.approx(full - written["acc_hard"])
    # the random subset was labelled by the teacher's last snapshot
    assert record["scores"]["random"]["teacher"]["epochs"] == [2]
    assert "acc_soft (%)" in summary["table"] and "LRS" in summary["table"]
    # a second run reads the full-data accuracy from the cache instead of training it
    cfg.paths.output_dir = str(tmp_path / "outputs" / "again")
    again = train.run(cfg)
    record2 = json.loads((tmp_path / "outputs" / "again" / "results.json").read_text())
    assert "full" not in record2["variants"]
    assert record2["scores"]["nets"]["convnet"]["acc_full"] == full
    assert again["hlr"] == pytest.approx(summary["hlr"])


def test_teacher_logits_are_the_experts_outputs(compose, tiny_data, tmp_path):
    from lightning_modules.tasks.evaluate_variants import teacher_logits

    dm = CIFARDataModule(
        "cifar10", data_dir=str(tiny_data), download=False, cache_dir=str(tmp_path / "cache")
    )
    dm.setup()
    store = tmp_path / "experts"
    net, snaps = write_teacher(dm, store)
    cfg = compose("task=evaluate", f"evaluate.ddranking.teacher={store}", "logger=none")
    x = dm.train_x[:6]
    logits, info = teacher_logits(cfg, dm, None, x)
    FlatParams(net).load_into(net, snaps[-1])
    net.eval()
    torch.testing.assert_close(logits, net(x).detach())
    assert info["experts"] == [0] and info["epochs"] == [2]


def test_hard_set_reports_acc_hard_and_no_acc_soft(compose, tiny_data, tmp_path):
    from tests.test_evaluate import make_set_file

    dm = CIFARDataModule(
        "cifar10", data_dir=str(tiny_data), download=False, cache_dir=str(tmp_path / "cache")
    )
    dm.setup()
    set_file = make_set_file(dm, tmp_path / "set.pt", ipc=1)
    cfg = compose(*_overrides(tiny_data, set_file, "evaluate.ddranking.full_acc=50.0"))
    summary = train.run(cfg)
    assert summary["label_protocol"] == "hard" and summary["acc_soft"] is None
    assert summary["acc_hard"] == summary["acc_convnet_mean"]
    assert summary["hlr"] == pytest.approx(50.0 - summary["acc_hard"])
    assert summary["ars"] is None  # not asked for (evaluate.ddranking.ars=false)
    assert summary["networks_trained"] == 4  # the set and the random subset, two networks each


def test_bad_label_settings_are_user_errors(compose, tiny_data, tmp_path):
    from tests.test_evaluate import make_set_file

    dm = CIFARDataModule(
        "cifar10", data_dir=str(tiny_data), download=False, cache_dir=str(tmp_path / "cache")
    )
    dm.setup()
    hard_file = make_set_file(dm, tmp_path / "hard.pt", ipc=1)
    soft_file = soft_set_file(dm, tmp_path / "soft.pt", store=tmp_path / "nowhere")
    cases = {
        (hard_file, "evaluate.labels=soft"): "has no soft labels",
        (hard_file, "evaluate.labels=mixed"): "evaluate.labels must be one of both, soft, hard",
        (hard_file, "evaluate.ddranking.lrs_weight=2"): "lrs_weight must be a number in",
        (soft_file,): "evaluate.ddranking.teacher=<expert store>",
    }
    for (path, *more), message in cases.items():
        with pytest.raises(UserError, match=message):
            train.run(compose(*_overrides(tiny_data, path, *more)))


def test_full_accuracy_given_as_number_mapping_or_results_file(compose, tiny_data, tmp_path):
    from lightning_modules.tasks.evaluate_variants import full_cache_path, known_full_acc

    dm = CIFARDataModule(
        "cifar10", data_dir=str(tiny_data), download=False, cache_dir=str(tmp_path / "cache")
    )
    dm.setup()
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"results": {"convnet": {"mean": 61.5}}}))

    def known(value, net="convnet"):
        cfg = compose("task=evaluate", f"evaluate.ddranking.full_acc={value}")
        return known_full_acc(cfg, dm, net, {})

    assert known(55) == (55.0, "evaluate.ddranking.full_acc")
    assert known("{convnet: 57.5}")[0] == 57.5
    assert known(results) == (61.5, str(results))
    with pytest.raises(UserError, match="no accuracy for alexnet"):
        known("{convnet: 57.5}", net="alexnet")
    with pytest.raises(UserError, match="that evaluated alexnet"):
        known(results, net="alexnet")
    # nothing given and nothing cached: trained in the run; the cache is per network options
    cfg = compose("task=evaluate")
    assert known_full_acc(cfg, dm, "convnet", {}) == (None, None)
    assert full_cache_path(cfg, dm, "convnet", {"width": 32}) != full_cache_path(
        cfg, dm, "convnet", {}
    )
