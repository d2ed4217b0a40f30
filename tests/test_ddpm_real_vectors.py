"""task=ddpm on real-world vector data: sklearn tables and CIFAR PCA latents (decoded to images
and scored with ConvNet-FID/KID), in process on tiny data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import train
from datamodules.transforms import CIFAR_STATS, PixelTransform
from lightning_modules.errors import UserError
from lightning_modules.nets.classifiers import ConvNet
from lightning_modules.nets.feature_export import export_feature_extractor
from tests.conftest import run_train

QUICK = [
    "task=ddpm",
    "ddpm.timesteps=50",
    "ddpm.batch_size=32",
    "ddpm.sample_steps=10",
    "ddpm.sw_projections=100",
    "ddpm.floor_pairs=4",
    "ddpm.metric_draws=2",
    "ddpm.sinkhorn_samples=100",
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "threads=1",
]
TINY_FTT = ["eps_net=ftt", "eps_net.rank=2", "eps_net.num_basis=5"]


def _pca(data_dir, *extra):
    return [
        *QUICK,
        "dataset=cifar10_pca",
        f"dataset.data_dir={data_dir}",
        "dataset.download=false",
        "dataset.dim=6",
        *extra,
    ]


def test_sinkhorn_switches_to_exact_ot_only_where_it_would_underflow():
    import ot

    from lightning_modules.diffusion import metrics

    assert metrics.sinkhorn_epsilon(h=2.0, reg=0.05) == 0.05  # toys: h² <= 5.3
    assert metrics.sinkhorn_epsilon(h=4.0, reg=0.05) == 0.0
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 13, generator=g), torch.randn(50, 13, generator=g) + 0.5
    w = np.full(50, 1 / 50)
    exact = ot.emd2(w, w, ot.dist(x.double().numpy(), y.double().numpy()))
    assert metrics.sinkhorn_divergence(x, y, reg=0) == pytest.approx(exact, rel=1e-9)


@pytest.fixture(scope="module")
def convnet_features(tmp_path_factory):
    torch.manual_seed(0)
    net = ConvNet(channels=3, num_classes=10, im_size=32, depth=3, width=4)
    state = PixelTransform.mean_std(*CIFAR_STATS["cifar10"]).state_dict()
    path = tmp_path_factory.mktemp("features") / "feature_extractor.pt2"
    return export_feature_extractor(net, state, path, (3, 32, 32))


@pytest.mark.parametrize(
    "net", [["eps_net=resnet", "eps_net.width=16", "eps_net.depth=1"], TINY_FTT]
)
def test_tabular_wine_writes_sw_and_its_floor_band(compose, net):
    cfg = compose(*QUICK, "dataset=tabular", "dataset.name=wine", "ddpm.steps=8", *net)
    summary = train.run(cfg)
    for key in ("sw", "sw_floor", "sw_floor_lo", "sw_floor_hi", "sinkhorn_floor_lo"):
        assert np.isfinite(summary[key]) and summary[key] > 0, key
    # 13-D: Sinkhorn at ε=0.05 underflows (garbage ~0): its ε → 0 limit, exact W2², instead
    assert summary["sinkhorn_eps"] == 0 and summary["sinkhorn"] > summary["sinkhorn_floor_lo"] > 0
    assert summary["sw_floor_lo"] <= summary["sw_floor"] <= summary["sw_floor_hi"]
    assert isinstance(summary["sw_in_band"], bool) and summary["metric_samples"] == 36
    samples = np.load(train.Path(cfg.paths.output_dir) / "samples.npy")
    assert samples.shape == (36, 13) and np.isfinite(samples).all()
    assert 5 < np.median(samples[:, 0]) < 20  # wine's alcohol (11-15 %): the table's own units


def test_cifar_pca_ftt_als_scores_latents_and_decoded_images(compose, tiny_data, convnet_features):
    cfg = compose(
        *_pca(tiny_data, "ddpm.optimizer=als", "ddpm.steps=1", "als.samples=1024", "als.batch=512"),
        *TINY_FTT,
        "eps_net.output=core",
        f"ddpm.feature_extractor={convnet_features}",
        "ddpm.num_samples=20",
    )
    summary = train.run(cfg)
    out = train.Path(cfg.paths.output_dir)
    assert summary["sw"] > 0 and summary["sw_floor_hi"] >= summary["sw_floor_lo"] > 0
    assert summary["convnet_fid"] >= 0 and summary["convnet_fid_real"] >= 0
    assert summary["fid_samples"] == 20 and summary["optimizer"] == "als"
    assert np.load(out / "samples.npy").shape == (20, 6)  # PCA coordinates
    for name in ("samples_grid.png", "reference_decoded.png", "samples_scatter.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name


def test_feature_extractor_on_a_table_is_refused_before_training(compose, convnet_features):
    cfg = compose(*QUICK, "dataset=tabular", f"ddpm.feature_extractor={convnet_features}")
    with pytest.raises(UserError, match="scores images"):
        train.run(cfg)
    assert not (train.Path(cfg.paths.output_dir) / "checkpoints").exists()


@pytest.mark.slow
def test_train_py_cifar_pca_resnet(tiny_data, tmp_path):
    out = run_train(
        *_pca(tiny_data, "ddpm.steps=5", "eps_net.width=16"),
        f"paths.runs_dir={tmp_path}/outputs",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "ddpm").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["dataset"] == "cifar10_pca" and summary["sw"] > 0
    assert "ConvNet-FID/KID: not computed" in out.stdout + out.stderr
