"""PAD's difficulty curriculum for ``task=teacher``: the scores against their formulas, the
per-epoch subsets against a transcription of ``buffer_CL.py``'s rule, the cached scores, a tiny
``task=teacher teacher.curriculum=el2n`` run whose store ``method=pad`` reads, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from datamodules.syn_set import SyntheticSet
from datamodules.trajectories import ExpertStore
from lightning_modules.condense.curriculum import (
    easy_to_hard,
    el2n,
    epoch_subset,
    grand_last_layer,
    score_examples,
)
from lightning_modules.errors import UserError
from lightning_modules.nets import build_classifier
from tests.conftest import run_train
from tests.test_distill import only_run, tiny


# -- the scores ---------------------------------------------------------------------------------
def test_el2n_is_the_norm_of_softmax_minus_onehot():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(7, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 4, 2, 2, 1, 3, 0])
    expected = []
    for row, y in zip(logits.tolist(), labels.tolist(), strict=True):
        e = [torch.tensor(v, dtype=torch.float64).exp() for v in row]
        p = [v / sum(e) for v in e]
        expected.append(sum((p[k] - (1.0 if k == y else 0.0)) ** 2 for k in range(5)) ** 0.5)
    torch.testing.assert_close(el2n(logits, labels), torch.stack(expected), rtol=1e-13, atol=0)


def test_grand_is_the_last_layer_gradient_norm():
    """Against autograd: the per-example gradient of the cross-entropy with respect to the last
    linear layer (weight and bias) of a tiny ConvNet, its norm; and DeepCore's concatenation."""
    torch.manual_seed(0)
    net = build_classifier("convnet", num_classes=3, im_size=8, depth=1, width=4).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 2, 0])
    expected = []
    for i in range(5):
        net.zero_grad()
        F.cross_entropy(net(x[i : i + 1]), y[i : i + 1]).backward()
        grads = [net.classifier.weight.grad.flatten(), net.classifier.bias.grad]
        expected.append(torch.cat(grads).norm())
    ours = score_examples(net, x, y, "grand", batch_size=2)
    torch.testing.assert_close(ours, torch.stack(expected), rtol=1e-12, atol=0)
    # DeepCore's expression: ||cat[g, (e x g)]|| with g = dloss/dlogits (sum over the batch)
    with torch.no_grad():
        e, logits = net.embed(x), net(x)
    g_out = logits.softmax(1) - F.one_hot(y, 3).double()
    cat = torch.cat([g_out, (e[:, None, :] * g_out[:, :, None]).flatten(1)], dim=1)
    torch.testing.assert_close(grand_last_layer(logits, y, e), cat.norm(dim=1), rtol=1e-12, atol=0)
    # and el2n through a net equals the formula on its logits
    torch.testing.assert_close(score_examples(net, x, y, "el2n"), el2n(logits, y))


def test_easy_to_hard_sorts_each_class_stably():
    scores = torch.tensor([0.5, 0.1, 0.9, 0.1, 0.3, 0.2], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 0, 1, 1])
    order = easy_to_hard(scores, labels, 2)
    assert [o.tolist() for o in order] == [[1, 3, 0], [5, 4, 2]]


# -- the schedule: buffer_CL.py's rule, transcribed -------------------------------------------
def reference_indices(sorted_diff_indices, e, args):
    """``buffer/buffer_CL.py``'s choice of the epoch's images (``sorted_diff_indices``: one row
    of example indices per class, easiest first; ``linear_cl_scheduler_acse`` inlined)."""
    data_size_by_class = sorted_diff_indices.shape[1]
    if e <= args["add_end_epoch"]:
        a, b = args["init_ratio"], args["add_end_epoch"]
        p = min(1, 1.0 * a + (1 - a) * 1.0 * e / b)
        return sorted_diff_indices[:, : int(p * data_size_by_class)].flatten()
    if args["add_end_epoch"] < e <= args["rm_epoch_first"]:
        return sorted_diff_indices.flatten()
    if args["rm_epoch_first"] < e <= args["rm_epoch_second"]:
        p = args["rm_easy_ratio_first"]
    else:
        p = args["rm_easy_ratio_second"]
    return sorted_diff_indices[:, int(p * data_size_by_class) :].flatten()


@pytest.mark.parametrize("per_class", [20, 37, 5000])
@pytest.mark.parametrize(
    "args",
    [  # the README's CIFAR-10 command, and the script's own argparse defaults (train_epochs 50)
        dict(
            init_ratio=0.75,
            add_end_epoch=20,
            rm_epoch_first=40,
            rm_epoch_second=60,
            rm_easy_ratio_first=0.1,
            rm_easy_ratio_second=0.2,
        ),  # fmt: skip
        dict(
            init_ratio=1.0,
            add_end_epoch=100,
            rm_epoch_first=40,
            rm_epoch_second=60,
            rm_easy_ratio_first=0.1,
            rm_easy_ratio_second=0.1,
        ),  # fmt: skip
        dict(
            init_ratio=0.3,
            add_end_epoch=7,
            rm_epoch_first=9,
            rm_epoch_second=12,
            rm_easy_ratio_first=0.33,
            rm_easy_ratio_second=0.5,
        ),  # fmt: skip
    ],
)
def test_epoch_subsets_equal_buffer_cl(args, per_class):
    classes = 3
    g = torch.Generator().manual_seed(per_class)
    sorted_diff = torch.randperm(classes * per_class, generator=g).view(classes, per_class)
    order = list(sorted_diff)
    for e in range(100):
        ours = epoch_subset(
            order,
            e,
            init_ratio=args["init_ratio"],
            add_end_epoch=args["add_end_epoch"],
            rm_epochs=[args["rm_epoch_first"], args["rm_epoch_second"]],
            rm_easy_ratios=[args["rm_easy_ratio_first"], args["rm_easy_ratio_second"]],
        )
        assert torch.equal(ours, reference_indices(sorted_diff, e, args)), e


def test_subset_sizes_by_hand():
    """10 per class, 2 classes: start at 0.5, all at epoch 4, -20% after 6, -50% after 8."""
    order = [torch.arange(10), torch.arange(10, 20)]
    kw = dict(init_ratio=0.5, add_end_epoch=4, rm_epochs=[6, 8], rm_easy_ratios=[0.2, 0.5])
    sizes = [len(epoch_subset(order, e, **kw)) for e in range(11)]
    # p = 0.5, 0.625, 0.75, 0.875, 1 -> int(10p) = 5, 6, 7, 8, 10 per class
    assert sizes == [10, 12, 14, 16, 20, 20, 20, 16, 16, 10, 10]
    assert epoch_subset(order, 0, **kw).tolist() == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14]
    assert epoch_subset(order, 9, **kw).tolist() == list(range(5, 10)) + list(range(15, 20))


# -- task=teacher -------------------------------------------------------------------------------
def curriculum_overrides(data, store, *extra):
    return [
        "task=teacher",
        "dataset=cifar10",
        f"dataset.data_dir={data}",
        "dataset.download=false",
        "dataset.zca=false",
        "teacher.num_experts=1",
        "teacher.epochs=3",
        "teacher.dsa=false",
        "teacher.batch_size=64",
        f"teacher.out={store}",
        "net.width=8",
        "net.depth=2",
        "logger=none",
        "teacher.curriculum=el2n",
        "teacher.score_epochs=1",
        "teacher.score_repeats=2",
        "teacher.init_ratio=0.5",
        "teacher.add_end_epoch=1",
        "teacher.rm_epochs=[1]",
        "teacher.rm_easy_ratios=[0.25]",
        *extra,
    ]


def test_teacher_with_curriculum_writes_a_self_describing_store(tiny_data, tmp_path, compose):
    import train

    store_dir = tmp_path / "store"
    train.run(compose(*curriculum_overrides(tiny_data, store_dir)))
    meta = ExpertStore(store_dir).load(0).meta
    assert meta["curriculum"]["score"] == "el2n" and meta["curriculum"]["score_repeats"] == 2
    assert meta["curriculum"]["rm_easy_ratios"] == [0.25]
    # tiny data: 20 images per class; epoch 0 half, epoch 1 all, epoch 2 all but the easiest 5
    assert meta["train_sizes"] == [100, 200, 150]
    cache = store_dir / "curriculum_el2n.pt"
    saved = torch.load(cache, weights_only=True)
    assert saved["per_net"].shape == (2, 200) and saved["key"]["run_seed"] == 0
    assert not torch.equal(saved["per_net"][0], saved["per_net"][1])  # two independent nets
    # a killed run (one scoring net cached) resumes with the second and ends with the same scores
    other = tmp_path / "resumed"
    other.mkdir()
    torch.save({"key": saved["key"], "per_net": saved["per_net"][:1]}, other / cache.name)
    train.run(compose(*curriculum_overrides(tiny_data, other)))
    torch.testing.assert_close(torch.load(other / cache.name)["per_net"], saved["per_net"])
    assert torch.equal(
        ExpertStore(other).load(0).snapshots, ExpertStore(store_dir).load(0).snapshots
    )
    # a second run on the store reuses the scores (the file is not rewritten)
    mtime = cache.stat().st_mtime_ns
    summary = train.run(
        compose(*curriculum_overrides(tiny_data, store_dir, "teacher.num_experts=2"))
    )
    assert summary["trained_indices"] == [1] and cache.stat().st_mtime_ns == mtime
    # other curriculum settings (or none) are refused on this store
    with pytest.raises(UserError, match="teacher.curriculum=el2n, this run has none"):
        train.run(compose(*curriculum_overrides(tiny_data, store_dir, "teacher.curriculum=none")))
    with pytest.raises(UserError, match="teacher.score_repeats=2, this run has 3"):
        train.run(compose(*curriculum_overrides(tiny_data, store_dir, "teacher.score_repeats=3")))


def test_curriculum_experts_differ_from_plain_ones(tiny_data, tmp_path, compose):
    """Same seed, same init: the curriculum changes the trajectory (it is really used)."""
    import train

    plain, cl = tmp_path / "plain", tmp_path / "cl"
    train.run(compose(*curriculum_overrides(tiny_data, plain, "teacher.curriculum=none")))
    train.run(compose(*curriculum_overrides(tiny_data, cl, "teacher.curriculum=grand")))
    a, b = ExpertStore(plain).load(0), ExpertStore(cl).load(0)
    assert a.meta["curriculum"] is None and a.meta["train_sizes"] is None
    assert b.meta["curriculum"]["score"] == "grand" and (cl / "curriculum_grand.pt").exists()
    assert torch.equal(a.snapshots[0], b.snapshots[0])
    assert not torch.equal(a.snapshots[-1], b.snapshots[-1])


@pytest.mark.slow
def test_method_pad_distills_from_a_curriculum_store(tiny_data, tmp_path):
    store_dir = tmp_path / "store"
    r = run_train(
        *curriculum_overrides(tiny_data, store_dir, "teacher.num_experts=2"), cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr[-3000:]
    overrides = tiny(tiny_data, store_dir, **{"distill.init": "real", "distill.eval_epochs": 1})
    r = run_train(*overrides, "method=pad", f"paths.runs_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = only_run(tmp_path / "runs")
    assert SyntheticSet.load(run / "set.pt").method == "pad"
    assert json.loads((run / "summary.json").read_text())["iterations"] == 4


BAD = [
    ("teacher.curriculum=hardest", "teacher.curriculum must be one of none, el2n, grand"),
    ("teacher.init_ratio=0", "teacher.init_ratio must be"),
    ("teacher.score_repeats=0", "teacher.score_repeats must be"),
    ("teacher.rm_easy_ratios=[0.1,1.0]", "teacher.rm_easy_ratios"),
    ("teacher.rm_easy_ratios=[0.1]", "must have one entry per removal stage"),
    ("teacher.rm_epochs=[60,40]", "teacher.rm_epochs must be in increasing order"),
]


def bad_overrides(data, store, extra):
    overrides = [o for o in curriculum_overrides(data, store) if not o.startswith("teacher.rm_")]
    if not extra.startswith("teacher.rm_epochs"):
        overrides.append("teacher.rm_epochs=[40,60]")
    return [*overrides, extra]


@pytest.mark.parametrize("extra,message", BAD)
def test_bad_curriculum_values_are_refused(tiny_data, tmp_path, compose, extra, message):
    from lightning_modules.schema import validate

    with pytest.raises(UserError, match=message.replace("[", r"\[")) as err:
        validate(compose(*bad_overrides(tiny_data, tmp_path / "store", extra)), composed=True)
    assert "\n" not in str(err.value)


def test_bad_curriculum_value_is_one_line_and_exit_2(tiny_data, tmp_path):
    r = run_train(*bad_overrides(tiny_data, tmp_path / "store", BAD[0][0]), cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and BAD[0][1] in lines[0], r.stderr[-2000:]
    assert not (tmp_path / "store").exists()  # nothing started
