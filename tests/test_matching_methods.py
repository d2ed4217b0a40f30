"""task=distill method=dc|dsa|dm|cafe|kip: settings, bad input, the run end to end, resume, DDP."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules.iterations import IterationsDataModule
from datamodules.syn_set import SyntheticSet
from lightning_modules.condense.dsa import DSA
from lightning_modules.errors import UserError
from lightning_modules.nets import build_classifier
from lightning_modules.set_matching import MatchingModule
from lightning_modules.tasks.matching_settings import resolve_matching_settings
from tests.conftest import run_train
from tests.helpers import assert_close_scaled


def tiny(data: Path, method: str, **extra) -> list[str]:
    values = {
        "task": "distill",
        "method": method,
        "ipc": 1,
        "dataset.data_dir": data,
        "dataset.download": "false",
        "net.width": 8,
        "net.depth": 2,
        "distill.iterations": 3,
        "distill.eval_every": 2,
        "distill.eval_epochs": 2,
        "distill.eval_num": 1,
        "distill.checkpoint_every": 2,
        "method.batch_real": 8,
        "logger": "csv",
        "trainer.enable_progress_bar": "false",
    }
    if method in ("dc", "dsa"):
        values.update({"method.outer_loop": 2, "method.inner_loop": 1})
    if method == "cafe":
        values.update(
            {"method.window": 2, "method.max_outer": 3, "method.max_inner": 2,
             "method.batch_test": 4}
        )  # fmt: skip
    if method == "kip":
        values.update({"method.rf_models": 2, "method.chunk": 16})
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


# -- settings -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["dc", "dsa"])
@pytest.mark.parametrize("ipc,loops", [(1, (1, 1)), (10, (10, 50)), (50, (50, 10))])
def test_gradient_matching_rows(compose, method, ipc, loops):
    cfg = resolve_matching_settings(compose("task=distill", f"method={method}", f"ipc={ipc}"))
    assert (cfg.method.outer_loop, cfg.method.inner_loop) == loops
    assert cfg.distill.iterations == 1000 and cfg.distill.lr_img == 0.1
    assert cfg.method.batch_real == 256 and cfg.method.lr_net == 0.01
    assert cfg.dataset.zca is False


def test_dm_row_and_overrides(compose):
    cfg = resolve_matching_settings(compose("task=distill", "method=dm", "ipc=10"))
    assert cfg.distill.iterations == 20000 and cfg.distill.lr_img == 1.0
    cfg = resolve_matching_settings(
        compose("task=distill", "method=dm", "ipc=10", "distill.lr_img=3", "distill.iterations=7")
    )
    assert cfg.distill.iterations == 7 and cfg.distill.lr_img == 3


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["method=dm", "distill.eps=0.2"], "distill.eps is a key of method=mtt"),
        (["method=dsa", "distill.syn_steps=3"], "distill.syn_steps is a key of method=mtt"),
        (["method=dm", "+method.inner_loop=3"], "method.inner_loop .*method=dc/dsa"),
        (["method=dc", "ipc=7"], "no published loop schedule for ipc=7"),
    ],
)
def test_bad_method_input(compose, overrides, match):
    with pytest.raises(UserError, match=match):
        resolve_matching_settings(compose("task=distill", *overrides))


def test_explicit_loops_for_an_unpublished_ipc(compose):
    cfg = compose(
        "task=distill", "method=dc", "ipc=7", "method.outer_loop=3", "method.inner_loop=2"
    )
    cfg = resolve_matching_settings(cfg)
    assert (cfg.method.outer_loop, cfg.method.inner_loop) == (3, 2)


@pytest.mark.parametrize(
    "args,match",
    [
        (
            ["method=foo"],
            "error: unknown method 'foo'; choose one of cafe, datm, dc, dm, dsa, kip, mtt, pad",
        ),
        (["method=kip", "method.kernel=rbf"], "error: method.kernel must be one of ntk_fc"),
        (["method=kip", "method.chunk=0"], "error: method.chunk must be a positive whole number"),
        (
            ["method=dm", "method.learn_labels=true"],
            "error: method.learn_labels (a key of method=kip) is not a key of method=dm",
        ),
        (
            ["method=cafe", "+method.learn_labels=true"],
            "error: method.learn_labels (a key of method=kip) is not a key of method=cafe",
        ),
        (["method=dm", "distill.eps=0.3"], "error: distill.eps is a key of method=mtt"),
        (["method=dc", "ipc=7"], "error: method=dc has no published loop schedule"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, args, match):
    r = run_train("task=distill", *args, "logger=none", cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(match), r.stderr


# -- end to end ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["dc", "dsa", "dm", "cafe", "kip"])
def test_distill_writes_a_set_that_evaluate_accepts(tiny_data, compose, method):
    import train

    cfg = compose(*tiny(tiny_data, method))
    summary = train.run(cfg)
    run_dir = Path(cfg.paths.output_dir)
    syn = SyntheticSet.load(run_dir / "set.pt")
    assert syn.method == method and syn.lr is None and syn.num_images == 10
    assert summary["method"] == method and summary["iterations"] == 3
    assert summary["learned_lr"] is None and "eps" not in summary
    assert (run_dir / "sets/iter_000000.pt").exists() and (run_dir / "sets/iter_000002.pt").exists()
    assert (run_dir / "checkpoints/last.ckpt").exists() and (run_dir / "eval.md").exists()
    assert json.loads((run_dir / "summary.json").read_text())["method"] == method
    init = SyntheticSet.load(run_dir / "sets/iter_000000.pt")
    assert not torch.allclose(init.images, syn.images)  # the images moved

    ev = compose(
        "task=evaluate",
        f"evaluate.set={run_dir / 'set.pt'}",
        "evaluate.ddranking.enabled=false",
        f"dataset.data_dir={tiny_data}",
        "dataset.download=false",
        "evaluate.nets=[convnet]",
        "evaluate.num_eval=1",
        "evaluate.epochs=2",
        "logger=none",
        "trainer.enable_progress_bar=false",
    )
    ev.paths.output_dir = str(Path(ev.paths.runs_dir) / "evaluate")
    out = train.run(ev)
    assert out["lr"] == 0.01 and 0 <= out["acc_convnet_mean"] <= 100


# -- the module: resume and DDP -----------------------------------------------------------------
def make_module(method: str, seed: int = 0, **kip) -> MatchingModule:
    g = torch.Generator().manual_seed(0)
    k, ipc = 3, 2
    real_x = torch.randn(k * 6, 3, 8, 8, generator=g)
    real_y = torch.arange(k).repeat_interleave(6)
    images = torch.randn(k * ipc, 3, 8, 8, generator=g)
    labels = torch.arange(k).repeat_interleave(ipc)
    net = build_classifier("convnet", channels=3, num_classes=k, im_size=8, depth=2, width=4)
    loops = {"outer_loop": 2, "inner_loop": 2, "batch_train": 4} if method != "dm" else {}
    if method == "cafe":
        loops = {"batch_train": 4, "cafe": {"window": 2, "max_outer": 3, "batch_test": 3}}
    if method == "kip":
        loops = {"kip": {"rf_models": 2, "learn_labels": True, **kip}}
    return MatchingModule(
        net, images, labels, real_x, real_y, method=method, lr_img=0.5, batch_real=4,
        dsa=DSA("color_crop_cutout_flip_scale_rotate"), seed=seed, **loops,
    )  # fmt: skip


def fit(module, steps: int, root: Path, ckpt: str | None = None, every: int = 0) -> L.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = [ModelCheckpoint(root, every_n_train_steps=every, save_top_k=-1)] if every else []
    trainer = L.Trainer(
        max_steps=steps,
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=bool(every),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(module, datamodule=IterationsDataModule(steps), ckpt_path=ckpt)
    return trainer


@pytest.mark.parametrize("method", ["dsa", "dm", "cafe", "kip"])
def test_resumed_run_equals_uninterrupted(tmp_path, method):
    """Everything random in an iteration comes from (seed, rank, iteration): resumed from the
    checkpoint of iteration 2, a run ends where the uninterrupted one does (momentum included)."""
    straight = make_module(method)
    trainer = fit(straight, 4, tmp_path / "a", every=2)
    assert trainer.global_step == 4  # one step per iteration, whatever outer_loop is
    (mid,) = (tmp_path / "a").glob("*step=2.ckpt")
    resumed = make_module(method)
    fit(resumed, 4, tmp_path / "b", ckpt=str(mid))
    torch.testing.assert_close(resumed.images, straight.images)
    fresh = make_module(method)
    fit(fresh, 2, tmp_path / "c")
    assert not torch.allclose(fresh.images, straight.images)


@pytest.mark.slow
def test_two_ddp_ranks_average_the_image_gradient(tiny_data, tmp_path, compose):
    """trainer=ddp_cpu, one DM iteration: the update equals one SGD step on the mean of the two
    ranks' losses (each rank draws its own network and real batches)."""
    from lightning_modules.tasks import distill as distill_task

    overrides = tiny(
        tiny_data,
        "dm",
        **{"trainer": "ddp_cpu", "distill.iterations": 1, "distill.final_eval": "false"},
    )
    r = run_train(*overrides, cwd=tmp_path, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    (run_dir,) = [p.parent for p in (tmp_path / "outputs").glob("distill/*/set.pt")]
    init = SyntheticSet.load(run_dir / "sets/iter_000000.pt")
    after = SyntheticSet.load(run_dir / "set.pt")
    cfg = resolve_matching_settings(compose(*overrides))
    from lightning_modules.tasks.common import build_datamodule, build_net

    dm = build_datamodule(cfg)
    module, _ = distill_task.build_matching(cfg, dm, build_net(cfg.net, dm))
    module.images.data.copy_(init.images)
    losses = []
    for rank in (0, 1):
        g = module.iteration_generator(0, rank)
        losses.append(module.matching_loss(module.fresh_net(g).requires_grad_(False), g))
    (grad,) = torch.autograd.grad((losses[0] + losses[1]) / 2, module.images)
    expected = init.images - float(cfg.distill.lr_img) * grad
    assert_close_scaled(after.images, expected, 1e-4)


def test_cpu_scale_runs_dsa_and_dm_at_its_scale(compose):
    from lightning_modules.tasks.matching_settings import matching_stage_config
    from lightning_modules.tasks.reproduce.config import settle

    cfg = settle(compose("task=reproduce", "ipc=10", "+experiment=cpu_scale"))
    assert {"dsa", "dm"} <= set(cfg.reproduce.methods)
    dsa = resolve_matching_settings(matching_stage_config(cfg, "dsa", iterations=20))
    assert (dsa.method.outer_loop, dsa.method.inner_loop, dsa.method.batch_real) == (2, 5, 64)
    assert dsa.distill.iterations == 20 and dsa.distill.lr_img == 0.1
    assert dsa.dataset.zca == cfg.dataset.zca  # the row's one pixel space
    dm = resolve_matching_settings(matching_stage_config(cfg, "dm", iterations=None))
    assert dm.distill.iterations == 20000 and dm.distill.lr_img == 1.0


@pytest.mark.parametrize("method", ["dc", "dsa", "dm", "cafe"])
@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
@pytest.mark.parametrize("ipc", [1, 10, 50])
def test_every_published_row_resolves(compose, method, dataset, ipc):
    from lightning_modules.tasks.matching_settings import published_matching_row

    row = published_matching_row(method, dataset, ipc)
    assert row is not None and row["zca"] is False
    cfg = resolve_matching_settings(
        compose("task=distill", f"method={method}", f"dataset={dataset}", f"ipc={ipc}")
    )
    assert cfg.distill.iterations == row["iterations"] and cfg.distill.lr_img == row["lr_img"]
    assert all(cfg.method[k] == v for k, v in row.items() if k in cfg.method)


# -- CAFE and KIP -------------------------------------------------------------------------------
def test_cafe_row_is_the_reference(compose):
    cfg = resolve_matching_settings(compose("task=distill", "method=cafe", "ipc=10"))
    assert cfg.distill.iterations == 2000 and cfg.distill.lr_img == 0.1
    assert list(cfg.method.lr_milestones) == [1200, 1600, 1800]
    assert (cfg.method.beta, cfg.method.lambda_outer, cfg.method.lambda_inner) == (0.01, 0.04, 0.03)
    assert cfg.method.batch_real == 256 and cfg.dataset.zca is False


def test_cafe_halves_the_image_lr_at_the_milestones(tmp_path):
    module = make_module("cafe")
    module.cafe["lr_milestones"] = [1, 2]
    fit(module, 3, tmp_path)
    assert module.optimizers().optimizer.param_groups[0]["lr"] == pytest.approx(0.5 / 4)


@pytest.mark.parametrize("kernel", ["nngp_fc", "ntk_fc", "rf_convnet"])
def test_kip_learns_images_and_labels(tmp_path, kernel):
    module = make_module("kip", kernel=kernel, chunk=4)
    images, labels = module.images.detach().clone(), module.soft_labels.detach().clone()
    fit(module, 2, tmp_path)
    assert isinstance(module.optimizers().optimizer, torch.optim.Adam)
    assert not torch.allclose(module.images, images)
    assert not torch.allclose(module.soft_labels, labels)
    assert torch.equal(module.synthetic()[1], module.labels)  # the set keeps its hard labels


def test_kip_learned_labels_are_written_beside_the_set(tiny_data, compose):
    import train

    cfg = compose(*tiny(tiny_data, "kip", **{"method.learn_labels": "true",
                                             "method.kernel": "nngp_fc",
                                             "distill.final_eval": "false"}))  # fmt: skip
    summary = train.run(cfg)
    soft = torch.load(summary["learned_labels"])
    assert soft.shape == (10, 10)
    assert SyntheticSet.load(Path(cfg.paths.output_dir) / "set.pt").labels.tolist() == list(
        range(10)
    )
