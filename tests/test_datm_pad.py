"""method=datm / method=pad: one iteration against transcriptions of the reference updates
(float64), PAD's masks, the start window, soft-label initialisation, presets, bad input and
tiny runs through train.py."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from datamodules.expert_pairs import ExpertPairsDataModule
from datamodules.syn_set import SyntheticSet
from lightning_modules.condense.datm import (
    correctly_classified,
    expert_label_logits,
    start_epoch_upper,
)
from lightning_modules.condense.dsa import DSA
from lightning_modules.condense.matching import (
    depth_mask,
    loss_ratio_mask,
    matching_loss,
    prune_mask,
    selection_mask,
)
from lightning_modules.condense.unroll import classifier_loss, student_unroll
from lightning_modules.distillation import DistillationModule
from lightning_modules.errors import UserError
from lightning_modules.nets import FlatParams, build_classifier
from lightning_modules.tasks import settings
from lightning_modules.tasks.trajectory_family import resolve_trajectory_settings
from tests.conftest import run_train
from tests.test_distill import (
    expect_user_error,
    kill_after_first_checkpoint,
    only_run,
    tiny,
    tiny_net,
    write_experts,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_experts(tmp_path_factory.mktemp("store") / "experts", epochs=4)


# -- transcriptions of the reference updates (NUS-HPC-AI-Lab/DATM distill/DATM.py, PAD) ----------
def reference_unroll(net, start, images, label_syn, syn_lr, *, syn_steps, batch_syn, g, dsa):
    """DATM.py's inner loop as written there: chunks of a randperm popped from the END, the
    augmentation, SoftCrossEntropy = sum(-log_softmax(out) * softmax(y)) / batch, one SGD step
    with create_graph. (DSA here is the project's, drawing from ``g`` in the project's order.)"""
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    sizes = [p.numel() for _, p in net.named_parameters()]
    student_params = [start.clone().requires_grad_(True)]
    indices_chunks = []
    for _ in range(syn_steps):
        if not indices_chunks:
            indices = torch.randperm(len(images), generator=g)
            indices_chunks = list(torch.split(indices, batch_syn))
        these_indices = indices_chunks.pop()
        x = images[these_indices]
        this_y = label_syn[these_indices]
        if dsa is not None:
            x = dsa(x, g)
        flat = student_params[-1]
        params = {n: c.view(s) for n, c, s in zip(names, torch.split(flat, sizes), shapes)}
        out = torch.func.functional_call(net, params, (x,))
        ce_loss = torch.sum(-F.log_softmax(out, dim=1) * F.softmax(this_y, dim=1)) / out.shape[0]
        grad = torch.autograd.grad(ce_loss, student_params[-1], create_graph=True)[0]
        student_params.append(student_params[-1] - syn_lr * grad)
    return student_params[-1]


def datm_reference_loss(end, start, target):
    num_params = start.numel()
    param_loss = F.mse_loss(end, target, reduction="sum") / num_params
    param_dist = F.mse_loss(start, target, reduction="sum") / num_params
    return param_loss / param_dist


def pad_reference_loss(end, start, target, *, loss_ratio=0.0, depth_ratio=0.0):
    """PAD.py (loss variant) / PAD_depth.py (depth variant) as written there."""
    param_losses = F.mse_loss(end, target, reduction="none")
    param_dists = F.mse_loss(start, target, reduction="none")
    if depth_ratio:
        loss_indices = torch.arange(len(param_losses))
        keep_indices = loss_indices[int(depth_ratio * len(param_losses)) :]
    else:
        _, loss_indices = torch.sort(param_losses)
        keep_indices = loss_indices[int(loss_ratio * len(param_losses)) :]
    num_params = start.numel()
    param_loss = param_losses[keep_indices].sum() / num_params
    param_dist = param_dists[keep_indices].sum() / num_params
    return param_loss / param_dist


def tiny_case(seed=0):
    torch.manual_seed(0)
    net = build_classifier("convnet", num_classes=3, im_size=8, depth=1, width=4).double()
    layout = FlatParams(net)
    g = torch.Generator().manual_seed(seed)
    start = 0.3 * torch.randn(layout.numel, generator=g, dtype=torch.float64)
    target = start + 0.05 * torch.randn(start.shape, generator=g, dtype=torch.float64)
    images = torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64)
    logits = torch.randn(6, 3, generator=g, dtype=torch.float64)
    return net, layout, start, target, images, logits


def ours_and_reference(dsa, seed, mode="full", **select):
    net, layout, start, target, images0, logits0 = tiny_case(seed)
    results = []
    for side in ("ours", "reference"):
        images = images0.clone().requires_grad_(True)
        logits = logits0.clone().requires_grad_(True)
        lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
        g = torch.Generator().manual_seed(11)
        if side == "ours":
            end = student_unroll(
                classifier_loss(net, layout, soft=True), start, images, logits, lr,
                steps=5, batch_syn=None, augment=dsa, generator=g, mode=mode,
            )  # fmt: skip
            mask = selection_mask(end, target, **select)
            loss = matching_loss(end, start, target, mask)
        else:
            end = reference_unroll(
                net, start, images, logits, lr, syn_steps=5, batch_syn=6, g=g, dsa=dsa
            )
            if select.get("loss_ratio") or select.get("depth_ratio"):
                loss = pad_reference_loss(end, start, target, **select)
            else:
                loss = datm_reference_loss(end, start, target)
        grads = torch.autograd.grad(loss, [images, logits, lr])
        results.append((loss.detach(), *grads))
    return results


@pytest.mark.parametrize("dsa", [None, DSA()], ids=["no-dsa", "dsa"])
@pytest.mark.parametrize("mode", ["full", "recompute"])
def test_one_datm_iteration_equals_the_reference_update_float64(dsa, mode):
    ours, ref = ours_and_reference(dsa, seed=1, mode=mode)
    for name, a, b in zip(("loss", "images", "labels", "lr"), ours, ref):
        assert b.abs().max() > 0, name  # a zero gradient would make the comparison vacuous
        tol = 1e-13 if mode == "full" else 1e-10
        torch.testing.assert_close(a, b, rtol=tol, atol=1e-15, msg=name)


@pytest.mark.parametrize(
    "select",
    [{"loss_ratio": 0.5}, {"loss_ratio": 0.25}, {"depth_ratio": 0.5}, {"depth_ratio": 0.3}],
)
def test_one_pad_iteration_equals_the_reference_masked_loss_float64(select):
    ours, ref = ours_and_reference(DSA(), seed=2, **select)
    for name, a, b in zip(("loss", "images", "labels", "lr"), ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15, msg=name)
    plain, _ = ours_and_reference(DSA(), seed=2)
    assert not torch.allclose(plain[0], ours[0])  # the selection changes the loss


def test_pad_masks_by_hand():
    end = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    target = torch.tensor([1.1, 2.0, 2.0, 4.5, 5.0, 9.0])  # errors .01 0 1 .25 0 9
    assert loss_ratio_mask(end, target, 0.5).tolist() == [False, False, True, True, False, True]
    assert depth_mask(6, 0.5).tolist() == [False] * 3 + [True] * 3
    assert depth_mask(6, 0.4).tolist() == [False] * 2 + [True] * 4  # floor(2.4) = 2
    # composition: eps's signed-ratio mask first, then the smallest-error cut among the kept
    end2 = torch.tensor([1.0, -2.0, 3.0, 4.0, 5.0, 6.0])  # index 1 flips sign: ε drops it
    keep = selection_mask(end2, target, eps=0.1, loss_ratio=0.4)
    eps_keep = prune_mask(end2, target, 0.1)
    assert eps_keep.tolist() == [True, False, True, True, True, True]
    # 5 kept, floor(0.4 * 5) = 2 dropped: errors of the kept .01 1 .25 0 9 -> drop idx 4, 0
    assert keep.tolist() == [False, False, True, True, False, True]
    both = selection_mask(end, target, depth_ratio=0.5, loss_ratio=0.34)
    assert both.tolist() == [False, False, False, True, False, True]  # 3 left, 1 dropped (4)


def test_start_window_follows_the_reference_rule(store):
    def reference_upper(it, cur, top, end):  # DATM.py's Sequential_Generation
        upper = cur + int((top - cur) * it / end)
        return min(upper, top)

    for it in range(0, 40):
        assert start_epoch_upper(
            it, max_start_epoch=4, current_max_start_epoch=2, expansion_end_epoch=7
        ) == reference_upper(it, 2, 4, 7)
    assert start_epoch_upper(5, max_start_epoch=4) == 4
    pairs = ExpertPairsDataModule(
        str(store), expert_epochs=1, max_start_epoch=4, iterations=60, seed=0,
        min_start_epoch=1, current_max_start_epoch=2, expansion_end_epoch=20,
    )  # fmt: skip
    pairs.setup()
    drawn = {t: pairs.choose(t)[1] for t in range(60)}
    assert all(1 <= e < reference_upper(t, 2, 4, 20) for t, e in drawn.items())
    assert set(drawn[t] for t in range(10)) == {1}  # upper = 2 for the first 10 iterations
    assert 3 in set(drawn.values())  # later the window reaches max_start_epoch - 1


def test_bad_window_is_one_line(store):
    with pytest.raises(UserError, match="min_start_epoch"):
        ExpertPairsDataModule(
            str(store), expert_epochs=1, max_start_epoch=4, iterations=1,
            min_start_epoch=3, current_max_start_epoch=2, expansion_end_epoch=5,
        )  # fmt: skip


# -- soft labels and initial images -----------------------------------------------------------
def fake_logits(theta, x):
    """Logits whose argmax is the class written in pixel (0, 0, 0) unless theta's bias wins."""
    k = theta.numel()
    return 5.0 * F.one_hot(x[:, 0, 0, 0].long(), k).to(theta.dtype) + theta


def test_expert_label_logits_average_only_the_experts_that_are_right():
    x = torch.zeros(3, 1, 1, 1)
    x[:, 0, 0, 0] = torch.tensor([0.0, 1.0, 2.0])
    labels = torch.tensor([0, 1, 1])
    e1 = torch.tensor([0.0, 0.0, 0.0])  # predicts 0, 1, 2: right on images 0 and 1
    e2 = torch.tensor([0.0, 6.0, 0.0])  # predicts 1, 1, 1: right on images 1 and 2
    out = expert_label_logits(fake_logits, [e1, e2], x, labels, only_correct=True)
    torch.testing.assert_close(out[0], torch.tensor([5.0, 0.0, 0.0]))  # e1 only
    torch.testing.assert_close(out[1], torch.tensor([0.0, 8.0, 0.0]))  # mean of 5 and 11
    torch.testing.assert_close(out[2], torch.tensor([0.0, 6.0, 5.0]))  # e2 only
    first = expert_label_logits(fake_logits, [e1, e2], x, labels, only_correct=False)
    torch.testing.assert_close(first, fake_logits(e1, x))
    with pytest.raises(ValueError, match="no expert classifies initial image 2"):
        expert_label_logits(fake_logits, [e1], x, labels, only_correct=True)


def test_correctly_classified_takes_the_first_right_ones_then_other_experts():
    x = torch.zeros(5, 1, 1, 1)
    x[:, 0, 0, 0] = torch.tensor([2.0, 1.0, 0.0, 1.0, 1.0])
    e1 = torch.zeros(3)
    assert correctly_classified(fake_logits, [e1], x, 1, 2).tolist() == [1, 3]
    assert correctly_classified(fake_logits, [e1], x, 0, 2) is None  # only one right
    e2 = torch.tensor([6.0, 0.0, 0.0])  # predicts 0 everywhere
    assert correctly_classified(fake_logits, [e1, e2], x, 0, 2).tolist() == [0, 2]


# -- the module: labels learned with their own SGD, the threshold skip ------------------------
def make_module(images, logits, **kw):
    settings_ = dict(
        lr_teacher=0.01, lr_img=10.0, lr_lr=1e-4, eps=0.0, syn_steps=3, batch_syn=None,
        dsa=DSA(), seed=3, label_logits=logits, lr_y=2.0, momentum_y=0.9,
    )  # fmt: skip
    settings_.update(kw)
    return DistillationModule(tiny_net(), images, torch.arange(10), **settings_)


def fit_one(module, store, tmp_path):
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    pairs = ExpertPairsDataModule(str(store), expert_epochs=1, max_start_epoch=2, iterations=1)
    trainer.fit(module, datamodule=pairs)
    pairs.setup()
    return pairs.pair(0), trainer


def test_training_step_updates_labels_with_their_sgd_and_skips_above_threshold(store, tmp_path):
    g = torch.Generator().manual_seed(0)
    images0, logits0 = torch.randn(10, 3, 32, 32, generator=g), torch.randn(10, 10, generator=g)
    module = make_module(images0, logits0, threshold=None)
    pair, trainer = fit_one(module, store, tmp_path)
    fresh = make_module(images0, logits0)
    loss, _ = fresh.match(pair["start"], pair["target"], fresh.unroll_generator(0, 0))
    gi, gy, gl = torch.autograd.grad(loss, [fresh.images, fresh.label_logits, fresh.syn_lr])
    torch.testing.assert_close(
        module.label_logits.detach(), logits0 - 2.0 * gy, rtol=1e-5, atol=1e-7
    )
    torch.testing.assert_close(module.images.detach(), images0 - 10.0 * gi, rtol=1e-5, atol=1e-6)
    assert gy.abs().sum() > 0 and module.threshold_skips == 0
    # a threshold below the loss: nothing moves, the skip is counted and logged
    module = make_module(images0, logits0, threshold=float(loss) / 2)
    _, trainer = fit_one(module, store, tmp_path)
    assert torch.equal(module.images.detach(), images0)
    assert torch.equal(module.label_logits.detach(), logits0)
    assert module.threshold_skips == 1 and trainer.callback_metrics["distill/threshold_skips"] == 1


# -- config: presets, defaults, bad input ----------------------------------------------------
ROW_KEYS = set(settings.PRESET_KEYS) | {"init", "zca", "min_start_epoch", "lr_y", "threshold"}
ROW_KEYS |= {"current_max_start_epoch", "expansion_end_epoch"}


@pytest.mark.parametrize("method", ["datm", "pad"])
def test_six_published_rows_each(compose, method):
    rows = settings.published_rows(method)
    assert sorted(rows) == [(d, i) for d in ("cifar10", "cifar100") for i in (1, 10, 50)]
    for (dataset, ipc), row in rows.items():
        want = ROW_KEYS | ({"depth_ratio", "loss_ratio"} if method == "pad" else set())
        assert set(row) == want, (dataset, ipc)
        cfg = compose("task=distill", f"method={method}", f"dataset={dataset}", f"ipc={ipc}")
        eff = resolve_trajectory_settings(cfg)
        assert eff.distill.iterations == 10000 and eff.distill.eps == 0.0
        assert eff.distill.init == row["init"] and eff.dataset.zca is True
        for key in ("lr_y", "threshold", "current_max_start_epoch", "min_start_epoch"):
            assert eff.method[key] == row[key]


def test_datm_cifar10_ipc10_row_and_composition(compose):
    eff = resolve_trajectory_settings(compose("task=distill", "method=datm", "ipc=10"))
    d, m = eff.distill, eff.method
    assert (d.syn_steps, d.expert_epochs, d.batch_syn, d.lr_img, d.lr_teacher) == (
        80,
        2,
        100,
        100,
        0.01,
    )
    assert (m.min_start_epoch, m.current_max_start_epoch, d.max_start_epoch) == (0, 10, 20)
    assert (m.expansion_end_epoch, m.lr_y, m.momentum_y, m.threshold) == (1000, 2.0, 0.9, 1.0)
    with_eps = resolve_trajectory_settings(
        compose("task=distill", "method=datm", "ipc=10", "distill.eps=0.1")
    )
    assert with_eps.distill.eps == 0.1
    mtt = resolve_trajectory_settings(compose("task=distill", "ipc=10"))
    assert mtt.distill.eps == 0.1 and mtt.distill.init == "real"  # MTT's defaults unchanged
    pad = resolve_trajectory_settings(compose("task=distill", "method=pad", "ipc=10"))
    assert (pad.method.depth_ratio, pad.method.loss_ratio, pad.distill.batch_syn) == (0.5, 0.0, 500)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (
            ["method=datm", "method.lr_y=-1"],
            r"method.lr_y must be a finite number >= 0 or null, got -1",
        ),
        (
            ["method=pad", "method.depth_ratio=1.0"],
            r"method.depth_ratio must be a number in \[0, 1\) or null, got 1.0",
        ),
        (
            ["method=pad", "method.loss_ratio=-0.1"],
            r"method.loss_ratio must be a number in \[0, 1\)",
        ),
        (["method=datm", "+method.depth_ratio=0.5"], "not a key of method=datm"),
        (
            ["method=datm", "method.threshold=0"],
            "method.threshold must be a positive number or null",
        ),
        (["method=datm", "distill.eps=1.0"], r"distill.eps must be a number in \[0, 1\)"),
        (["method=datm", "ipc=3"], "no published hyperparameters"),
        (["method=dm", "distill.init=correct"], "needs expert trajectories"),
        (
            ["method=datm", "distill.init=best"],
            "distill.init must be one of real, noise, correct or null, got 'best'",
        ),
    ],
)
def test_bad_values_are_one_line(compose, overrides, match):
    from lightning_modules.tasks.matching_settings import resolve_matching_settings

    cfg = compose("task=distill", *overrides)
    resolve = resolve_matching_settings if "method=dm" in overrides else resolve_trajectory_settings
    with pytest.raises(UserError, match=match) as err:
        resolve(cfg)
    assert "\n" not in str(err.value)


def test_window_above_max_is_refused_before_the_run(compose, tiny_data, store, tmp_path):
    extra = {"method": "datm", "method.current_max_start_epoch": 5, "distill.init": "real"}
    extra["method.expansion_end_epoch"] = 10
    msg = expect_user_error(compose, tmp_path, *tiny(tiny_data, store, **extra))
    assert "current_max_start_epoch" in msg


# -- through train.py ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [["method=datm"], ["method=pad", "method.loss_ratio=0.5"], ["method=datm", "distill.eps=0.1"]],
    ids=["datm", "pad", "datm+eps"],
)
def test_tiny_runs_write_sets_with_learned_labels(tiny_data, store, tmp_path, extra):
    overrides = tiny(tiny_data, store, **{"distill.init": "real", "distill.eval_epochs": 1})
    r = run_train(*overrides, *extra, f"paths.runs_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = only_run(tmp_path / "runs")
    summary = json.loads((run / "summary.json").read_text())
    syn = SyntheticSet.load(run / "set.pt")
    assert syn.method == extra[0].split("=")[1] and syn.soft_labels.shape == (10, 10)
    first = SyntheticSet.load(run / "sets" / "iter_000000.pt")
    assert not torch.equal(first.soft_labels, syn.soft_labels)  # the labels were learned
    assert summary["eps"] == (0.1 if "distill.eps=0.1" in extra else 0.0)
    assert summary["iterations"] == 4 and "threshold_skips" in summary
    if "distill.eps=0.1" in extra:
        assert summary["last_pruned_fraction"] > 0
    if extra == ["method=datm"]:  # the set, as written, through task=evaluate
        evaluate = [
            "task=evaluate", f"evaluate.set={run / 'set.pt'}", "evaluate.nets=[convnet]",
            "evaluate.num_eval=1", "evaluate.epochs=1", f"dataset.data_dir={tiny_data}",
            "dataset.download=false", "dataset.zca=false", "logger=none",
            "evaluate.ddranking.full_epochs=1", f"paths.runs_dir={tmp_path / 'evals'}",
        ]  # fmt: skip
        r = run_train(*evaluate, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        (written,) = (tmp_path / "evals" / "evaluate").glob("*/summary.json")
        scores = json.loads(written.read_text())
        for key in ("acc_soft", "acc_hard", "hlr", "ior", "lrs"):
            assert isinstance(scores[key], float), key


@pytest.mark.slow
def test_killed_datm_run_resumes_with_its_learned_labels(compose, tiny_data, store, tmp_path):
    """Kill after the first checkpoint, rerun with resume=true: the images, lr and learned labels
    (and their momentum) come back from the checkpoint; the end equals an uninterrupted run."""
    import train

    extra = {"method": "datm", "distill.init": "real", "distill.iterations": 16}
    extra.update({"distill.checkpoint_every": 4, "distill.syn_steps": 5, "method.threshold": 5.0})
    extra["distill.final_eval"] = "false"
    overrides = tiny(tiny_data, store, **extra)
    work = tmp_path / "killed"
    run_dir = kill_after_first_checkpoint(overrides, work)
    r = run_train(*overrides, "resume=true", cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = compose(*overrides)
    train.run(cfg)
    whole = SyntheticSet.load(Path(cfg.paths.output_dir) / "set.pt")
    resumed = SyntheticSet.load(run_dir / "set.pt")
    torch.testing.assert_close(resumed.images, whole.images, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(resumed.soft_labels, whole.soft_labels, rtol=1e-5, atol=1e-6)
    assert resumed.lr == pytest.approx(whole.lr, rel=1e-5)


@pytest.mark.slow
def test_datm_under_ddp_runs_and_learns_labels(tiny_data, store, tmp_path):
    extra = {"method": "datm", "distill.init": "real", "trainer": "ddp_cpu"}
    extra.update({"distill.iterations": 2, "distill.final_eval": "false"})
    r = run_train(*tiny(tiny_data, store, **extra), cwd=tmp_path, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    run = only_run(tmp_path / "outputs")
    first, last = (SyntheticSet.load(run / p) for p in ("sets/iter_000000.pt", "set.pt"))
    assert not torch.equal(first.soft_labels, last.soft_labels)
