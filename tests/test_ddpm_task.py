"""task=ddpm end to end: in process (fast) and through train.py as a user runs it (slow)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

import train
from datamodules.cifar import read_cifar
from lightning_modules.errors import UserError
from lightning_modules.tasks.ddpm import load_data
from tests.conftest import run_train
from tests.helpers import assert_close_scaled

HAVE_FTT = importlib.util.find_spec("lightning_modules.tt.ftt") is not None
VECTOR_NETS = ["resnet"] + (["ftt"] if HAVE_FTT else [])

TINY_DDPM = [
    "ddpm.timesteps=100",
    "ddpm.epochs=2",
    "ddpm.batch_size=64",
    "ddpm.sample_steps=20",
    "ddpm.sw_projections=200",
    "logger=csv",
    "trainer.enable_progress_bar=false",
]
TINY_ROLL = [
    "task=ddpm",
    "dataset=swiss_roll",
    "dataset.num_samples=600",
    "dataset.num_reference=200",
    *TINY_DDPM,
]
TINY_NET = {
    "resnet": ["eps_net=resnet", "eps_net.width=16", "eps_net.depth=1"],
    "ftt": ["eps_net=ftt", "eps_net.rank=2", "eps_net.num_basis=6"],
    "unet": [
        "eps_net=unet",
        "eps_net.ch=8",
        "eps_net.ch_mult=[1,2]",
        "eps_net.attn_resolutions=[16]",
    ],
}


def tiny_cifar(data_dir, *extra, net=("unet", *TINY_NET["unet"][1:])):
    return [
        "task=ddpm",
        "dataset=cifar10",
        f"dataset.data_dir={data_dir}",
        "dataset.download=false",
        "ddpm.timesteps=50",
        "ddpm.steps=3",
        "ddpm.batch_size=16",
        "ddpm.num_samples=6",
        "ddpm.sample_steps=4",
        "ddpm.snapshots=3",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        f"eps_net={net[0]}",
        *net[1:],
        *extra,
    ]


def _summary(cfg):
    return json.loads((train.Path(cfg.paths.output_dir) / "summary.json").read_text())


# -- in process --------------------------------------------------------------------------------
def test_swiss_roll_3d_in_process_with_epoch_samples_and_ema(compose):
    cfg = compose(
        *TINY_ROLL, *TINY_NET["resnet"], "dataset.dim=3", "ddpm.sample_every=1", "ddpm.ema=0.9"
    )
    summary = train.run(cfg)
    out = train.Path(cfg.paths.output_dir)
    for key in (
        "sw",
        "sw_floor",
        "mmd",
        "mmd_floor",
        "params",
        "train_s",
        "sample_s",
        "peak_mem_mb",
    ):
        assert isinstance(summary[key], (int, float)) and summary[key] >= 0, key
    assert (
        summary["sw_floor"] > 0
        and summary["metric_samples"] == 200
        and summary["sample_steps"] == 20
    )
    assert summary["steps"] == 2 * (600 // 64) and summary["flops_per_sample"] > 0
    samples = np.load(out / "samples.npy")
    assert samples.shape == (200, 3) and np.isfinite(samples).all()
    for name in (
        "samples_scatter.png",
        "reverse_process.png",
        "loss_curve.png",
        "samples_scatter_epoch0001.png",
    ):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    assert (out / "checkpoints" / "last.ckpt").exists() and (out / "eps_net.pt").exists()
    assert "val/sw" in (out / "csv" / "metrics.csv").read_text()


def test_steps_budget_resume_and_cosine(compose, caplog):
    from omegaconf import open_dict

    overrides = [*TINY_ROLL, *TINY_NET["resnet"], "ddpm.steps=7", "ddpm.schedule=cosine"]
    cfg = compose(*overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(train.Path(cfg.paths.runs_dir) / "ddpm" / "first")
    assert train.run(cfg)["steps"] == 7
    # the same config with resume=true finds the finished run; the step count it reports can
    # only come from the checkpoint, since max_steps is already reached and nothing trains
    again = compose(*overrides, "resume=true")
    with open_dict(again):
        again.paths.output_dir = str(train.Path(again.paths.runs_dir) / "ddpm" / "second")
    with caplog.at_level("INFO", logger="train"):
        summary = train.run(again)
    assert "resuming" in caplog.text and summary["steps"] == 7
    assert not (train.Path(again.paths.runs_dir) / "ddpm" / "second" / "summary.json").exists()


def test_points_dataset_in_process(compose, tmp_path):
    path = tmp_path / "points.csv"
    rng = np.random.default_rng(0)
    np.savetxt(path, rng.normal(size=(300, 2)) * [3.0, 0.5] + [10, -4], delimiter=",")
    cfg = compose(
        "task=ddpm", "dataset=points", f"dataset.path={path}", *TINY_DDPM, *TINY_NET["resnet"]
    )
    summary = train.run(cfg)
    assert summary["metric_samples"] == 60 and summary["sw"] > 0
    samples = np.load(train.Path(cfg.paths.output_dir) / "samples.npy")
    # saved in the file's own coordinates, not the standardised ones
    assert abs(samples[:, 0].mean() - 10) < 5


def test_non_finite_loss_stops_with_a_clear_error(compose):
    cfg = compose(
        *TINY_ROLL, *TINY_NET["resnet"], "ddpm.optimizer=sgd", "ddpm.lr=1e12", "ddpm.grad_clip=null"
    )
    with pytest.raises(UserError, match="loss became .* at step"):
        train.run(cfg)


def test_cifar_pixels_are_mapped_to_minus_one_one(compose, tiny_data):
    # the datamodule's mean/std input is undone with transform.inverse, then mapped to [-1, 1]
    data = load_data(compose(*tiny_cifar(tiny_data)))
    raw, _ = read_cifar("cifar10", tiny_data, "train")
    assert data.images and data.data_shape == (3, 32, 32)
    assert_close_scaled(data.train, raw.float() / 255 * 2 - 1, 1e-5)
    assert data.test_images01.min() >= 0 and data.test_images01.max() <= 1


def test_cifar_unet_in_process_writes_grid_and_fid_with_local_features(
    compose, tiny_data, tmp_path
):
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    )
    torch.jit.script(net).save(str(tmp_path / "features.pt"))
    cfg = compose(*tiny_cifar(tiny_data, f"ddpm.feature_extractor={tmp_path / 'features.pt'}"))
    summary = train.run(cfg)
    out = train.Path(cfg.paths.output_dir)
    assert (out / "samples_grid.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "reverse_process.png").exists() and (out / "loss_curve.png").exists()
    samples = torch.load(out / "samples.pt")
    assert samples.shape == (6, 3, 32, 32) and samples.dtype == torch.uint8
    assert summary["convnet_fid"] >= 0 and summary["fid_samples"] == 6 and summary["steps"] == 3
    assert summary["convnet_fid_real"] >= 0 and "within the project" in summary["fid_note"]


@pytest.mark.skipif(not HAVE_FTT, reason="FunctionalTT not written yet")
def test_cifar_ftt_output_core_starts_from_its_gaussian_skip(compose, tiny_data):
    # the default skip=auto is on for an output core: the step-1 loss is the skip's (well below
    # the 1 of eps_hat = 0), the gain is a trained parameter, and a grid is written
    cfg = compose(
        *tiny_cifar(tiny_data, net=("ftt", "eps_net.output=core", "eps_net.rank=2")),
        "eps_net.num_basis=4",
    )
    summary = train.run(cfg)
    out = train.Path(cfg.paths.output_dir)
    assert summary["final_loss"] < 0.9 and (out / "samples_grid.png").exists()
    state = torch.load(out / "eps_net.pt", weights_only=False)["state_dict"]
    assert "out_gain" in state and state["skip.mean"].shape == (3 * 32 * 32,)


# -- through train.py ----------------------------------------------------------------------------
def _run_dir(root):
    dirs = [d for d in (root / "ddpm").iterdir() if d.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", VECTOR_NETS)
def test_train_py_swiss_roll(name, tmp_path):
    out = run_train(*TINY_ROLL, *TINY_NET[name], f"paths.runs_dir={tmp_path}/outputs", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = _run_dir(tmp_path / "outputs")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["task"] == "ddpm" and summary["eps_net"] == name
    assert summary["sw"] > 0 and summary["sw_floor"] > 0
    assert np.load(run_dir / "samples.npy").shape == (200, 2)
    assert (run_dir / "samples_scatter.png").exists()
    assert "the floor band" in out.stdout + out.stderr


@pytest.mark.slow
def test_train_py_cifar_unet_says_when_no_feature_extractor(tiny_data, tmp_path):
    out = run_train(*tiny_cifar(tiny_data), f"paths.runs_dir={tmp_path}/outputs", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = _run_dir(tmp_path / "outputs")
    assert (run_dir / "samples_grid.png").exists()
    assert json.loads((run_dir / "summary.json").read_text())["convnet_fid"] is None
    assert "ConvNet-FID/KID: not computed: no feature extractor" in out.stdout + out.stderr


def _one_line_error(out, *needles):
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.slow
def test_bad_input_is_one_line(tmp_path, tiny_data):
    runs = f"paths.runs_dir={tmp_path}/outputs"
    out = run_train(*TINY_ROLL, "eps_net=unet", runs, cwd=tmp_path)
    _one_line_error(out, "eps_net=unet needs image data")

    bad = tmp_path / "bad.csv"
    bad.write_text("1,2\n3,nan\n5,6\n7,8\n")
    out = run_train(
        "task=ddpm", "dataset=points", f"dataset.path={bad}", *TINY_DDPM, runs, cwd=tmp_path
    )
    _one_line_error(out, "NaN")

    if HAVE_FTT:
        out = run_train(
            *tiny_cifar(tiny_data, net=("ftt", "eps_net.output=per_coordinate")),
            runs,
            cwd=tmp_path,
        )
        _one_line_error(out, "per_coordinate", "parameters")
        # a bad optimiser option stops before the Trainer exists (nothing started)
        out = run_train(
            *TINY_ROLL, "eps_net=ftt", "ddpm.optimizer=als", "als.samples=many", runs, cwd=tmp_path
        )
        _one_line_error(out, "als.samples")
        assert "GPU available" not in out.stdout + out.stderr
        out = run_train(
            *TINY_ROLL, "eps_net=ftt", "ddpm.optimizer=riemannian", "riemannian.lr=1.5",
            "logger=wandb", runs, cwd=tmp_path,
        )  # fmt: skip
        _one_line_error(out, "riemannian.lr must be a number in (0, 1], got 1.5")
        assert not list(tmp_path.glob("outputs/**/wandb"))  # no (offline) W&B run started either

    out = run_train(
        *TINY_ROLL,
        *TINY_NET["resnet"],
        "ddpm.optimizer=sgd",
        "ddpm.lr=1e12",
        "ddpm.grad_clip=null",
        runs,
        cwd=tmp_path,
    )
    _one_line_error(out, "loss became", "ddpm.lr")


def test_ema_warm_up_follows_early_weights():
    from torch.optim.swa_utils import AveragedModel

    from lightning_modules.ddpm import ema_with_warmup

    net = torch.nn.Linear(2, 1)
    ema = AveragedModel(net, multi_avg_fn=ema_with_warmup(0.999), use_buffers=True)
    ema.update_parameters(net)  # first update copies
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update_parameters(net)  # n = 1: decay min(0.999, 2 / 11)
    torch.testing.assert_close(ema.module.weight, start + (1 - 2 / 11))
