"""task=distill: presets, the module against a plain MTT loop, bad input, resume, DDP, sweep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml

from datamodules.expert_pairs import ExpertPairsDataModule
from datamodules.syn_set import SyntheticSet
from datamodules.trajectories import ExpertStore
from lightning_modules.condense.dsa import DSA
from lightning_modules.distillation import DistillationModule
from lightning_modules.errors import UserError
from lightning_modules.nets import FlatParams, build_classifier
from lightning_modules.tasks import distill as distill_task
from lightning_modules.tasks import settings
from tests.conftest import ROOT, run_train
from tests.helpers import assert_close_scaled, scaled_error
from tests.helpers import sweep_agent_commands as agent_commands

NET = {
    "name": "convnet",
    "depth": 2,
    "width": 8,
    "norm": "instancenorm",
    "act": "relu",
    "pool": "avgpool",
}


def tiny_net(num_classes=10, im_size=32):
    options = {k: v for k, v in NET.items() if k != "name"}
    return build_classifier(
        "convnet", channels=3, num_classes=num_classes, im_size=im_size, **options
    )


def write_experts(
    root: Path, *, n=2, epochs=3, dataset="cifar10", zca=False, net=NET, num_classes=10, seed=0
):
    """Experts whose snapshots are a seeded random walk (the files are what task=teacher writes)."""
    layout = FlatParams(tiny_net(num_classes))
    g = torch.Generator().manual_seed(seed)
    store = ExpertStore(root)
    for i in range(n):
        theta = [0.1 * torch.randn(layout.numel, generator=g)]
        for _ in range(epochs):
            theta.append(theta[-1] + 0.01 * torch.randn(layout.numel, generator=g))
        meta = {
            "net": dict(net),
            "param_names": layout.names,
            "param_shapes": [list(s) for s in layout.shapes],
            "dataset": dataset,
            "zca": zca,
            "zca_eps": 0.1 if zca else None,
            "lr": 0.01,
            "seed": i,
            "epochs": epochs,
            "batch_size": 256,
            "dsa_strategy": "color_crop_cutout_flip_scale_rotate",
            "test_acc": [10.0] * (epochs + 1),
            "num_classes": num_classes,
            "channels": 3,
            "im_size": 32,
        }
        store.write(i, torch.stack(theta), meta)
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_experts(tmp_path_factory.mktemp("store") / "experts")


def tiny(data: Path, store: Path, **extra) -> list[str]:
    """Overrides for a run of a few seconds on the tiny data with the tiny net."""
    values = {
        "task": "distill",
        "ipc": 1,
        "dataset.data_dir": data,
        "dataset.download": "false",
        "dataset.zca": "false",
        "net.width": 8,
        "net.depth": 2,
        "distill.trajectories": store,
        "distill.iterations": 4,
        "distill.syn_steps": 3,
        "distill.expert_epochs": 1,
        "distill.max_start_epoch": 2,
        "distill.eval_every": 0,
        "distill.eval_epochs": 2,
        "distill.eval_num": 1,
        "distill.checkpoint_every": 2,
        "logger": "csv",
        "trainer.enable_progress_bar": "false",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


# -- presets ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset,ipc", list(settings.published_rows("mtt")))
def test_preset_rows(compose, dataset, ipc):
    cfg = compose("task=distill", f"dataset={dataset}", f"ipc={ipc}")
    eff = settings.resolve_settings(cfg)
    row = settings.published_row("mtt", dataset, ipc)
    assert eff.distill.iterations == 5000
    for key in settings.PRESET_KEYS:
        assert eff.distill[key] == row[key], key
    assert eff.dataset.zca is row["zca"]
    assert cfg.distill.syn_steps is None  # the composed config itself is untouched


def test_six_published_mtt_rows():
    assert sorted(settings.published_rows("mtt")) == [
        (d, i) for d in ("cifar10", "cifar100") for i in (1, 10, 50)
    ]


def short(x: float) -> str:
    return f"{x:g}".replace("e-0", "e-")


def test_docs_preset_table_matches_the_preset_files():
    """The docs' MTT table (docs/tasks/distill.md) is the conf/preset/mtt files, row for row."""
    text = (ROOT / "docs" / "tasks" / "distill.md").read_text()
    head = "| dataset | IPC | syn_steps | expert_epochs | max_start_epoch | lr_img | lr_lr |"
    lines = text[text.index(head) :].splitlines()[2:]
    table = {}
    for line in lines:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        table[(cells[0], int(cells[1]))] = cells[2:]
    rows = settings.published_rows("mtt")
    assert set(table) == set(rows)
    for key, row in rows.items():
        want = [
            str(row["syn_steps"]), str(row["expert_epochs"]), str(row["max_start_epoch"]),
            short(row["lr_img"]), short(row["lr_lr"]), short(row["lr_teacher"]),
            str(row["batch_syn"]), "yes" if row["zca"] else "no",
        ]  # fmt: skip
        assert table[key] == want, key


def test_preset_overrides_win(compose):
    cfg = compose(
        "task=distill", "dataset=cifar100", "ipc=50", "distill.syn_steps=7", "dataset.zca=false"
    )
    eff = settings.resolve_settings(cfg)
    assert eff.distill.syn_steps == 7 and eff.distill.batch_syn == 125 and eff.dataset.zca is False
    # dataset.zca=true on a ZCA-off row is kept as well
    cfg = compose("task=distill", "dataset=cifar10", "ipc=50", "dataset.zca=true")
    assert settings.resolve_settings(cfg).dataset.zca is True


def test_dataset_zca_null_follows_the_row(compose):
    assert compose("task=distill", "ipc=1").dataset.zca is None  # the default: follow the row
    assert settings.resolve_settings(compose("task=distill", "ipc=1")).dataset.zca is True
    assert settings.resolve_settings(compose("task=distill", "ipc=50")).dataset.zca is False
    none = compose("task=distill", "ipc=1", "distill.preset=none", "distill.syn_steps=1")
    with pytest.raises(UserError):  # no row: the other keys are missing, zca would be off
        settings.resolve_settings(none)


def test_no_row_names_the_missing_keys(compose):
    cfg = compose("task=distill", "ipc=3")
    with pytest.raises(UserError, match=r"no published hyperparameters.*distill\.syn_steps"):
        settings.resolve_settings(cfg)


@pytest.mark.parametrize("ipc", [0, -2, 1.5])
def test_bad_ipc_is_named_before_the_preset(compose, ipc):
    with pytest.raises(UserError, match=f"ipc must be a positive whole number.*got {ipc}"):
        settings.resolve_settings(compose("task=distill", f"ipc={ipc}"))


# -- the module against a plain MTT loop ---------------------------------------------------------
def mtt_reference_loss(net, images, labels, lr, start, target, *, steps, batch_syn, generator, dsa):
    """MTT's inner loop and loss, written plainly (DSA in place of MTT's DiffAugment)."""
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    sizes = [p.numel() for _, p in net.named_parameters()]
    student = [start.clone().requires_grad_(True)]
    chunks = []
    for _ in range(steps):
        if not chunks:
            chunks = list(torch.split(torch.randperm(len(images), generator=generator), batch_syn))
        these = chunks.pop(0)
        x = dsa(images[these], generator)
        params = {n: c.view(s) for n, c, s in zip(names, torch.split(student[-1], sizes), shapes)}
        out = torch.func.functional_call(net, params, (x,))
        grad = torch.autograd.grad(
            F.cross_entropy(out, labels[these]), student[-1], create_graph=True
        )[0]
        student.append(student[-1] - lr * grad)
    n = start.numel()
    return (F.mse_loss(student[-1], target, reduction="sum") / n) / (
        F.mse_loss(start, target, reduction="sum") / n
    )


def make_module(images, labels, **kw):
    settings = dict(
        lr_teacher=0.01,
        lr_img=100.0,
        lr_lr=1e-3,
        eps=0.0,
        syn_steps=4,
        batch_syn=7,
        dsa=DSA(),
        seed=3,
    )
    settings.update(kw)
    return DistillationModule(tiny_net(), images, labels, **settings)


def test_training_step_eps0_is_plain_mtt(store, tmp_path):
    """One Trainer iteration at eps=0: loss and update equal a plain MTT loop's."""
    g = torch.Generator().manual_seed(0)
    images0 = torch.randn(10, 3, 32, 32, generator=g)
    labels = torch.arange(10)
    pairs = ExpertPairsDataModule(
        str(store), expert_epochs=1, max_start_epoch=2, iterations=1, seed=5
    )
    pairs.setup()
    pair = pairs.pair(0, rank=0)

    module = make_module(images0, labels)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=pairs)

    images = images0.clone().requires_grad_(True)
    lr = torch.tensor(0.01, requires_grad=True)
    loss = mtt_reference_loss(
        tiny_net(),
        images,
        labels,
        lr,
        pair["start"],
        pair["target"],
        steps=4,
        batch_syn=7,
        generator=module.unroll_generator(0, 0),
        dsa=DSA(),
    )
    gi, gl = torch.autograd.grad(loss, [images, lr])
    logged = trainer.callback_metrics
    torch.testing.assert_close(logged["distill/loss"], loss.detach(), rtol=1e-5, atol=0)
    assert float(logged["distill/pruned_fraction"]) == 0.0
    # first SGD step with momentum: the buffer is the gradient itself
    assert_close_scaled(module.images.detach(), images0 - 100.0 * gi, 1e-5)
    assert_close_scaled(module.syn_lr.detach(), 0.01 - 1e-3 * gl, 1e-5)
    assert gi.abs().sum() > 0


def test_recompute_module_matches_full(store):
    g = torch.Generator().manual_seed(1)
    images0, labels = torch.randn(10, 3, 32, 32, generator=g), torch.arange(10)
    pairs = ExpertPairsDataModule(str(store), expert_epochs=2, max_start_epoch=1, iterations=1)
    pairs.setup()
    pair = pairs.pair(3)
    grads = {}
    for mode in ("full", "recompute"):
        m = make_module(images0, labels, eps=0.1, unroll=mode, batch_syn=None)
        loss, _ = m.match(pair["start"], pair["target"], m.unroll_generator(3, 0))
        grads[mode] = torch.autograd.grad(loss, [m.images, m.syn_lr])
    for a, b in zip(grads["full"], grads["recompute"]):
        assert_close_scaled(b, a, 2e-4)


def test_lr_floor_and_non_finite_guard(store, tmp_path, caplog):
    g = torch.Generator().manual_seed(2)
    images0, labels = torch.randn(10, 3, 32, 32, generator=g), torch.arange(10)
    pairs = ExpertPairsDataModule(str(store), expert_epochs=1, max_start_epoch=2, iterations=3)
    # a huge lr step on α drives it below the floor on the first update
    module = make_module(images0, labels, lr_lr=1e9, lr_floor=1e-4)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=pairs)
    assert module.floor_hits >= 1 and float(module.syn_lr.detach()) == pytest.approx(1e-4)
    assert "fell below distill.lr_floor" in caplog.text

    # non-finite images: every loss is nan; the third in a row stops the run with a clear message
    module = make_module(torch.full_like(images0, float("nan")), labels, max_bad_steps=3)
    before = module.images.detach().clone()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(UserError, match="3 non-finite matching losses in a row"):
        trainer.fit(
            module,
            datamodule=ExpertPairsDataModule(
                str(store), expert_epochs=1, max_start_epoch=2, iterations=5
            ),
        )
    assert module.bad_total == 3
    assert torch.equal(module.images.detach().isnan(), before.isnan())  # no update was applied


# -- bad input: one line each ---------------------------------------------------------------------
@pytest.fixture
def run_task(compose, tmp_path):
    """``run`` in-process (the same run as under train.py: it depends on the config alone)."""

    def _run(*overrides):
        return expect_user_error(compose, tmp_path, *overrides)

    return _run


def expect_user_error(compose, tmp_path, *overrides):
    cfg = compose(*overrides)
    with pytest.raises(UserError) as err:
        distill_task.run(cfg, tmp_path / "run")
    message = str(err.value)
    assert "\n" not in message
    return message


def test_no_experts_names_teacher_command(run_task, tiny_data, tmp_path):
    msg = run_task(*tiny(tiny_data, tmp_path / "empty"))
    assert "no expert trajectories" in msg
    assert "python train.py task=teacher dataset=cifar10 dataset.zca=false net=convnet" in msg


def test_default_store_follows_dataset_zca_and_net(compose, tiny_data, tmp_path):
    cfg = settings.resolve_settings(compose("task=distill", "dataset=cifar100", "ipc=1"))
    assert distill_task.expert_store(cfg).root == Path("trajectories/cifar100-zca/convnet")


@pytest.mark.parametrize(
    "kind,match",
    [
        ("dataset", "trained on cifar100, not dataset=cifar10"),
        ("zca", "dataset.zca=true, this run has dataset.zca=false"),
        ("net", "net.width=16, not 8"),
    ],
)
def test_experts_of_another_setting(run_task, tiny_data, tmp_path, kind, match):
    store = tmp_path / "other"
    if kind == "dataset":
        write_experts(store, dataset="cifar100")
    elif kind == "zca":
        write_experts(store, zca=True)
    else:
        write_experts(store, net={**NET, "width": 16})
    assert match in run_task(*tiny(tiny_data, store))


def test_ipc_above_real_images(run_task, tiny_data, store):
    explicit = {
        "distill.lr_img": 100,
        "distill.lr_lr": 1e-5,
        "distill.lr_teacher": 0.01,
        "distill.batch_syn": "all",
    }
    msg = run_task(*tiny(tiny_data, store, ipc=21, **explicit))  # no published row for ipc=21
    assert "ipc=21 but class" in msg and "has only 20 real training images" in msg


@pytest.mark.parametrize("eps", [-0.1, 1.0, 1.5])
def test_eps_outside_unit_interval(run_task, tiny_data, store, eps):
    msg = run_task(*tiny(tiny_data, store, **{"distill.eps": eps}))
    assert f"distill.eps must be a number in [0, 1) or null, got {eps}" in msg


def test_start_epoch_beyond_snapshots(run_task, tiny_data, store):
    msg = run_task(
        *tiny(tiny_data, store, **{"distill.max_start_epoch": 3, "distill.expert_epochs": 2})
    )
    assert "needs experts with at least 4 epochs" in msg and "has 3" in msg


# -- end to end through train.py ------------------------------------------------------------------
def read_metrics(run_dir: Path) -> list[dict]:
    import csv

    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def only_run(runs: Path) -> Path:
    """The one run directory (a resumed run's fresh Hydra dir holds only .hydra/ and a log)."""
    dirs = sorted(p for p in (runs / "distill").iterdir() if (p / "config.yaml").exists())
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_run_from_python_equals_the_command_line(compose, tiny_data, store, tmp_path):
    """``train.run(cfg)`` with the overrides of a ``python train.py ...`` call makes the same run:
    same settings after the preset (ZCA included), same set, same metrics."""
    import train

    overrides = tiny(tiny_data, store, **{"distill.eval_epochs": 1})
    overrides.remove("dataset.zca=false")  # dataset.zca: null (follow the row) on both sides
    overrides += ["distill.preset=none", "distill.lr_img=100", "distill.lr_lr=1e-5"]
    overrides += ["distill.lr_teacher=0.01", "distill.batch_syn=all"]
    cli = tmp_path / "cli"
    cache = f"paths.cache_dir={tmp_path / 'cache'}"  # the compose fixture's cache dir
    r = run_train(*overrides, f"paths.runs_dir={cli}", cache, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    cli_dir = only_run(cli)

    cfg = compose(*overrides)
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "py" / "run")
    summary = train.run(cfg)
    py_dir = tmp_path / "py" / "run"

    a = yaml.safe_load((cli_dir / "distill_config.yaml").read_text())
    b = yaml.safe_load((py_dir / "distill_config.yaml").read_text())
    for c in (a, b):  # where the run writes differs, nothing else
        c.pop("paths")
        c["logger"].pop("save_dir")
    assert a == b
    assert a["dataset"]["zca"] is False  # no row (preset=none): off on both sides
    sa, sb = SyntheticSet.load(cli_dir / "set.pt"), SyntheticSet.load(py_dir / "set.pt")
    assert torch.equal(sa.images, sb.images) and sa.lr == sb.lr
    cli_summary = json.loads((cli_dir / "summary.json").read_text())
    for key in ("final_acc", "learned_lr", "last_loss", "iterations"):
        assert cli_summary[key] == summary[key], key


@pytest.mark.slow
def test_teacher_then_distill_then_evaluate(tiny_data, tmp_path):
    """The issue's 'done when': tiny experts from task=teacher, distil ipc=1, the set is usable."""
    common = [
        f"dataset.data_dir={tiny_data}",
        "dataset.download=false",
        "net.width=8",
        "net.depth=2",
        "logger=csv",
        "trainer.enable_progress_bar=false",
    ]
    r = run_train(
        "task=teacher", *common, "teacher.epochs=2", "teacher.num_experts=2", cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(ExpertStore(tmp_path / "trajectories/cifar10/convnet").indices()) == 2
    r = run_train(
        "task=distill",
        "ipc=1",
        "dataset.zca=false",
        *common,
        "distill.iterations=4",
        "distill.syn_steps=3",
        "distill.expert_epochs=1",
        "distill.max_start_epoch=2",
        "distill.eval_every=2",
        "distill.eval_epochs=2",
        "distill.eval_num=1",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = only_run(tmp_path / "outputs")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iterations"] == 4 and 0 <= summary["final_acc"] <= 100
    assert "best_acc_chosen_on_test" in summary
    rows = read_metrics(run_dir)
    pruned = [float(r["distill/pruned_fraction"]) for r in rows if r.get("distill/pruned_fraction")]
    assert len(pruned) == 4 and all(0 <= p < 1 for p in pruned)
    assert any(r.get("eval/acc") for r in rows)  # the evaluation at iteration 2 was logged
    for name in (
        "set.pt",
        "set.png",
        "sets/iter_000000.pt",
        "sets/iter_000002.pt",
        "sets/iter_000002.png",
        "eval.md",
    ):
        assert (run_dir / name).exists(), name
    syn = SyntheticSet.load(run_dir / "set.pt")
    assert syn.method == "distill" and syn.ipc == 1 and len(syn.images) == 10 and syn.lr > 0
    # task=evaluate accepts the set
    evaluate = ["task=evaluate", f"evaluate.set={run_dir / 'set.pt'}", "evaluate.nets=[convnet]"]
    evaluate.append("evaluate.ddranking.enabled=false")  # DD-Ranking: tests/test_soft_labels.py
    r = run_train(*evaluate, *common, "evaluate.epochs=2", "evaluate.num_eval=1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (summary_file,) = (tmp_path / "outputs" / "evaluate").glob("*/summary.json")
    assert 0 <= json.loads(summary_file.read_text())["acc_convnet_mean"] <= 100


@pytest.mark.slow
def kill_after_first_checkpoint(overrides: list[str], work: Path) -> Path:
    """Start ``train.py`` in ``work``, SIGKILL it once its first checkpoint exists; the run dir
    (asserted unfinished: no summary.json)."""
    work.mkdir()
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *overrides], cwd=work, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if list((work / "outputs").glob("distill/*/checkpoints/last.ckpt")):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dir = only_run(work / "outputs")
    assert not (run_dir / "summary.json").exists(), "the run finished before it could be killed"
    return run_dir


def test_killed_run_resumes_from_last_checkpoint(tiny_data, store, tmp_path, compose):
    """Kill a run after its first checkpoint, rerun with resume=true: it continues where the
    checkpoint left off, writes no set twice, and ends with the uninterrupted run's images."""
    import train

    overrides = tiny(
        tiny_data,
        store,
        **{
            "distill.iterations": 24,
            "distill.checkpoint_every": 4,
            "distill.eval_every": 8,
            "distill.syn_steps": 5,
        },
    )
    work = tmp_path / "killed"
    run_dir = kill_after_first_checkpoint(overrides, work)
    step = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=False)["global_step"]
    assert 4 <= step < 24
    before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "sets").glob("*.pt")}

    r = run_train(*overrides, "resume=true", cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    assert only_run(work / "outputs") == run_dir  # continued in the same run directory
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iterations"] == 24
    after = {p.name: p.stat().st_mtime_ns for p in (run_dir / "sets").glob("*.pt")}
    assert all(after[name] == mtime for name, mtime in before.items())  # nothing rewritten
    assert set(after) == {"iter_000000.pt", "iter_000008.pt", "iter_000016.pt"}
    logged_steps = [int(r["step"]) for r in read_metrics(run_dir) if r.get("distill/loss")]
    assert (
        logged_steps[-1] == 23 and step in logged_steps
    )  # the resumed part starts at the checkpoint

    # the same config uninterrupted, in this process: the resumed run ends at the same set
    cfg = compose(*overrides)
    train.run(cfg)
    reference = SyntheticSet.load(Path(cfg.paths.output_dir) / "set.pt")
    resumed = SyntheticSet.load(run_dir / "set.pt")
    assert_close_scaled(resumed.images, reference.images, 1e-5)
    assert resumed.lr == pytest.approx(reference.lr, rel=1e-5)

    # a rerun of the finished run has nothing left to do and rewrites nothing
    mtime = (run_dir / "set.pt").stat().st_mtime_ns
    cfg = compose(*overrides, "resume=true")
    cfg.paths.runs_dir = str(work / "outputs")
    assert train.run(cfg)["iterations"] == 24
    assert (run_dir / "set.pt").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_two_ddp_ranks_equal_one_step_on_the_mean_loss(tiny_data, store, tmp_path, compose):
    """trainer=ddp_cpu, one iteration: the update equals a single-process step on the average of
    the two ranks' matching losses (rank r draws pair and DSA from seed, r and the iteration)."""
    overrides = tiny(
        tiny_data,
        store,
        **{
            "trainer": "ddp_cpu",
            "distill.iterations": 1,
            "distill.final_eval": "false",
            "distill.eps": 0.1,
            "distill.lr_lr": 1e-3,
        },
    )
    r = run_train(*overrides, cwd=tmp_path, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = only_run(tmp_path / "outputs")
    init = SyntheticSet.load(run_dir / "sets/iter_000000.pt")
    after = SyntheticSet.load(run_dir / "set.pt")

    cfg = settings.resolve_settings(compose(*overrides))
    d = cfg.distill
    pairs = ExpertPairsDataModule(
        str(store), expert_epochs=1, max_start_epoch=2, iterations=1, seed=cfg.seed
    )
    pairs.setup()
    module = make_module(
        init.images,
        init.labels,
        lr_img=float(d.lr_img),
        lr_lr=1e-3,
        lr_teacher=float(d.lr_teacher),
        eps=0.1,
        syn_steps=3,
        batch_syn=None,
        seed=cfg.seed,
    )
    losses = []
    for rank in (0, 1):
        pair = pairs.pair(0, rank)
        losses.append(
            module.match(pair["start"], pair["target"], module.unroll_generator(0, rank))[0]
        )
    gi, gl = torch.autograd.grad(
        (losses[0] + losses[1]) / 2, [module.images, module.syn_lr], retain_graph=True
    )
    expected = init.images - float(d.lr_img) * gi
    assert_close_scaled(after.images, expected, 1e-4)
    assert after.lr == pytest.approx(float(d.lr_teacher) - 1e-3 * float(gl), rel=1e-5)
    # rank 0 alone would have stepped elsewhere: the comparison sees the averaging
    (g0,) = torch.autograd.grad(losses[0], [module.images])
    assert scaled_error(after.images, init.images - float(d.lr_img) * g0) > 1e-4


# -- the ε sweep ----------------------------------------------------------------------------------


def test_sweep_file_expands_to_hydra_commands():
    spec = yaml.safe_load((ROOT / "conf/sweep/distill_eps.yaml").read_text())
    assert spec["metric"] == {"name": "final_acc", "goal": "maximize"}
    commands = agent_commands(ROOT / "conf/sweep/distill_eps.yaml", "python")
    eps = [c[-1] for c in commands]
    assert eps == [f"distill.eps={v}" for v in (0, 0.01, 0.05, 0.1, 0.2, 0.3)]
    assert all(
        c[:3] == ["/usr/bin/env", "python", "train.py"] and "task=distill" in c for c in commands
    )


@pytest.mark.slow
def test_one_sweep_command_runs_tiny(tiny_data, store, tmp_path):
    argv = agent_commands(ROOT / "conf/sweep/distill_eps.yaml", sys.executable)[1]  # eps = 0.01
    # the agent's command, then tiny-size overrides (later overrides win in Hydra)
    extra = [a for a in tiny(tiny_data, store) if not a.startswith(("task=", "logger="))]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "2"}
    r = subprocess.run(
        [*argv[1:2], str(ROOT / argv[2]), *argv[3:], *extra],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((only_run(tmp_path / "outputs") / "summary.json").read_text())
    assert summary["eps"] == 0.01 and "final_acc" in summary


@pytest.mark.slow
def test_hydra_multirun_over_eps(tiny_data, store, tmp_path):
    r = run_train(
        "-m",
        *tiny(tiny_data, store, **{"distill.eps": "0,0.1", "distill.iterations": 2}),
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summaries = [
        json.loads(p.read_text()) for p in (tmp_path / "outputs/multirun").glob("*/*/summary.json")
    ]
    assert sorted(s["eps"] for s in summaries) == [0.0, 0.1]
    assert sorted(s["method"] for s in summaries) == ["distill", "mtt"]
