"""ConvNet-FID/KID through torchmetrics, and the feature-extractor file task=classify writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from datamodules.transforms import PixelTransform
from lightning_modules.diffusion import image_metrics
from lightning_modules.errors import UserError
from lightning_modules.nets.classifiers import ConvNet
from lightning_modules.nets.feature_export import export_feature_extractor
from tests.helpers import assert_close_scaled

MEANSTD = PixelTransform.mean_std((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)).state_dict()
OPTIONS = {"kid_subsets": 4, "kid_subset_size": 50, "seed": 0}


def tiny_convnet(seed: int = 0, width: int = 8) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet(channels=3, num_classes=10, im_size=8, depth=2, width=width).eval()


@pytest.fixture(scope="module")
def extractor(tmp_path_factory):
    """A random (untrained) ConvNet's penultimate layer exported as task=classify does."""
    path = tmp_path_factory.mktemp("features") / "feature_extractor.pt2"
    return export_feature_extractor(tiny_convnet(), MEANSTD, path, (3, 8, 8))


def images(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.3 + 0.4 * torch.rand(n, 3, 8, 8, generator=g) + shift).clamp(0, 1)


def test_exported_features_are_the_penultimate_layer_behind_the_input_map(tmp_path):
    net = tiny_convnet(seed=1)
    x01 = images(5, 0)
    zca = PixelTransform.fit_zca(images(40, 1), eps=0.1)
    for state in (MEANSTD, zca.state_dict()):
        path = export_feature_extractor(net, state, tmp_path / f"{state['kind']}.pt2", (3, 8, 8))
        feats = image_metrics.load_feature_extractor(path)(x01)
        want = net.embed(PixelTransform.from_state(state)(x01))
        assert feats.shape == (5, 8 * 2 * 2)
        assert_close_scaled(feats, want, 1e-5)
    # any batch size, one image too (torchmetrics and the chunked extraction rely on it)
    assert image_metrics.feature_network(path, (3, 8, 8)).net(images(1, 2)).shape == (1, 32)


def test_fid_of_a_set_with_itself_is_zero_and_with_a_shifted_set_positive(extractor):
    feature = image_metrics.feature_network(extractor, (3, 8, 8))
    a = images(120, 0)
    assert abs(image_metrics.convnet_fid(a, a, feature)) < 1e-3
    shifted = image_metrics.convnet_fid(images(120, 0, shift=0.3), a, feature)
    other = image_metrics.convnet_fid(images(120, 1), a, feature)  # same law, other draw
    assert shifted > 0.05 and shifted > 3 * other


def test_torchmetrics_fid_equals_the_frechet_formula(extractor):
    """||μ1 - μ2||² + tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^½), written out with scipy's sqrtm."""
    feature = image_metrics.feature_network(extractor, (3, 8, 8))
    fake, real = images(80, 3, shift=0.1), images(80, 4)
    a, b = feature(fake).numpy(), feature(real).numpy()
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(s1 @ s2).real
    want = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * root)
    got = image_metrics.convnet_fid(fake, real, feature)
    # FID is a difference of traces: its rounding is relative to the terms, not to the result
    assert abs(got - want) <= 1e-4 * (np.trace(s1 + s2) + ((a.mean(0) - b.mean(0)) ** 2).sum())


def test_kid_is_near_zero_for_one_law_positive_for_a_shift_and_seeded(extractor):
    feature = image_metrics.feature_network(extractor, (3, 8, 8))
    a, b = images(100, 0), images(100, 1)
    same = image_metrics.convnet_kid(a, b, feature, subsets=4, subset_size=50, seed=0)[0]
    far = image_metrics.convnet_kid(
        images(100, 0, 0.2), b, feature, subsets=4, subset_size=50, seed=0
    )
    assert far[0] > 10 * abs(same) and far[0] > 0
    again = image_metrics.convnet_kid(
        images(100, 0, 0.2), b, feature, subsets=4, subset_size=50, seed=0
    )
    assert again == far
    state = torch.random.get_rng_state()
    image_metrics.convnet_kid(a, b, feature, subsets=2, subset_size=50, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global stream is untouched


def test_convnet_scores_labels_and_real_floor(extractor):
    out = image_metrics.convnet_scores(
        images(60, 0, 0.2), images(60, 1), str(extractor), floor01=images(60, 2), **OPTIONS
    )
    assert out["fid_samples"] == 60 and out["convnet_fid"] > out["convnet_fid_real"] >= 0
    assert "ConvNet-FID" in out["fid_note"] and "ConvNet-FID" in image_metrics.scores_line(out)
    none = image_metrics.convnet_scores(images(4, 0), images(4, 1), None, **OPTIONS)
    assert none["convnet_fid"] is None and "not computed" in image_metrics.scores_line(none)


def test_bad_feature_files_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        image_metrics.load_feature_extractor(tmp_path / "missing.pt2")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(UserError, match="could not be loaded"):
        image_metrics.load_feature_extractor(tmp_path / "junk.pt")
    flat = torch.jit.script(torch.nn.Linear(5, 2))  # takes vectors, not images
    flat.save(str(tmp_path / "flat.pt"))
    with pytest.raises(UserError, match="does not take images"):
        image_metrics.feature_network(tmp_path / "flat.pt", (3, 8, 8))


def test_task_classify_writes_a_loadable_feature_extractor(compose, tiny_data):
    import train

    cfg = compose(
        "task=classify",
        f"dataset.data_dir={tiny_data}",
        "dataset.download=false",
        "dataset.train_per_class=4",
        "dataset.test_per_class=2",
        "net.width=8",
        "task.epochs=1",
        "logger=csv",
        "trainer.enable_progress_bar=false",
    )
    summary = train.run(cfg)
    path = train.Path(summary["feature_extractor"])
    assert path == train.Path(cfg.paths.output_dir) / "feature_extractor.pt2"
    feature = image_metrics.feature_network(path, (3, 32, 32))
    assert feature.num_features == 8 * 4 * 4  # ConvNet-3's penultimate layer
    assert feature(images(3, 0).repeat(1, 1, 4, 4)).shape == (3, 128)
