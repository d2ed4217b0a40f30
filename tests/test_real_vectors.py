"""Real-world vector data: sklearn's tables (dataset=tabular) and CIFAR PCA latents
(dataset=cifar10_pca), on tiny CIFAR archives written by the tests."""

from __future__ import annotations

import pytest
import torch

from datamodules.cifar import read_cifar
from datamodules.cifar_pca import CIFARPCADataModule, fit_pca, to_pixels
from datamodules.tabular import TABLES, TabularDataModule, load_table
from lightning_modules.errors import UserError
from tests.helpers import assert_close_scaled, write_cifar


# -- tabular --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,dim", [("digits", 64), ("breast_cancer", 30), ("wine", 13)])
def test_tables_are_standardised_with_train_statistics(name, dim):
    dm = TabularDataModule(name, reference_fraction=0.2, seed=0)
    dm.setup()
    rows = len(load_table(name))
    assert dm.train_x.shape[1] == dm.reference_x.shape[1] == dim
    assert len(dm.train_x) + len(dm.reference_x) == rows
    assert len(dm.reference_x) == round(0.2 * rows)
    assert dm.train_x.mean(0).abs().max() < 1e-4
    std = dm.train_x.std(0)
    assert ((std - 1).abs() < 1e-4).logical_or(std == 0).all()  # digits: 3 pixels always 0
    assert dm.reference_x.mean(0).abs().max() > 1e-3  # its own mean is not removed
    # to_data_space gives the table's rows back
    table = torch.as_tensor(load_table(name), dtype=torch.float32)
    back = dm.to_data_space(dm.reference_x)
    hits = [(table - row).abs().amax(1).min() < 1e-3 * table.abs().max() for row in back[:10]]
    assert all(hits)


def test_reference_split_is_seeded_and_disjoint():
    a, b, c = (TabularDataModule("wine", seed=s) for s in (0, 0, 1))
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.reference_x, b.reference_x) and not torch.equal(a.shift, c.shift)
    rows_train = {tuple(r) for r in a.to_data_space(a.train_x).round(decimals=2).tolist()}
    rows_ref = {tuple(r) for r in a.to_data_space(a.reference_x).round(decimals=2).tolist()}
    assert not rows_train & rows_ref


def test_bad_table_settings_are_one_line_user_errors():
    with pytest.raises(UserError) as e:
        TabularDataModule("iris")
    assert all(name in str(e.value) for name in TABLES) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="reference_fraction"):
        TabularDataModule("wine", reference_fraction=1.5).setup()


# -- CIFAR PCA ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_cifar(tmp_path_factory):
    return write_cifar(tmp_path_factory.mktemp("pca"), "cifar10", 8, 4, seed=3)


def pca_dm(root, cache, **kw):
    options = {"dim": 8, "data_dir": str(root), "download": False, "cache_dir": str(cache)}
    return CIFARPCADataModule(**{**options, **kw})


def test_pca_is_the_top_eigenspace_and_cached(small_cifar, tmp_path):
    dm = pca_dm(small_cifar, tmp_path)
    dm.setup()
    cached = list((tmp_path / "pca").glob("cifar10-d8-*.pt"))
    assert len(cached) == 1 and dm.cache_path == cached[0]
    v = dm.pca["components"].double()
    assert_close_scaled(v @ v.T, torch.eye(8, dtype=torch.float64), 1e-5)
    # the same subspace as the top right-singular vectors of the centred train pixels
    train_u8, _ = read_cifar("cifar10", small_cifar, "train")
    x = to_pixels(train_u8)
    _, s, vt = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    projector = vt[:8].T @ vt[:8]
    assert_close_scaled(v @ projector, v, 1e-4)
    torch.testing.assert_close(dm.pca["variances"], s[:8] ** 2 / (len(x) - 1), rtol=1e-6, atol=0)
    assert dm.train_x.shape == (80, 8) and dm.reference_x.shape == (40, 8)
    assert_close_scaled(dm.train_x.std(0), torch.ones(8), 1e-4)
    # a second datamodule reads the cache (unchanged file), and another dim is another file
    mtime = cached[0].stat().st_mtime_ns
    again = pca_dm(small_cifar, tmp_path)
    again.setup()
    assert cached[0].stat().st_mtime_ns == mtime and torch.equal(again.train_x, dm.train_x)
    pca_dm(small_cifar, tmp_path, dim=4).setup()
    assert len(list((tmp_path / "pca").glob("cifar10-d4-*.pt"))) == 1


def test_full_rank_latents_decode_to_the_images(small_cifar, tmp_path):
    dm = pca_dm(small_cifar, tmp_path, dim=79)  # 80 train images: rank 79 after centring
    dm.setup()
    train_u8, _ = read_cifar("cifar10", small_cifar, "train")
    assert_close_scaled(dm.decode_images(dm.train_x), train_u8.float() / 255, 2e-3)
    test_u8, _ = read_cifar("cifar10", small_cifar, "test")
    assert torch.equal(dm.test_images01, test_u8.float() / 255)
    assert dm.explained_variance == pytest.approx(1.0, rel=1e-6)


def test_subsets_reference_cap_and_bad_dims(small_cifar, tmp_path):
    dm = pca_dm(small_cifar, tmp_path, train_per_class=3, num_reference=10, seed=1)
    dm.setup()
    assert dm.train_x.shape == (30, 8) and dm.reference_x.shape == (10, 8)
    again = pca_dm(small_cifar, tmp_path, train_per_class=3, num_reference=10, seed=1)
    again.setup()
    assert torch.equal(dm.reference_x, again.reference_x)
    with pytest.raises(UserError, match="dataset.dim=30 needs more than 30 training images"):
        pca_dm(small_cifar, tmp_path, dim=30, train_per_class=3).setup()
    with pytest.raises(UserError, match="dataset.dim=0"):
        pca_dm(small_cifar, tmp_path, dim=0)
    with pytest.raises(UserError, match="dataset.name='svhn'"):
        pca_dm(small_cifar, tmp_path, name="svhn")


def test_fit_pca_both_paths_agree_and_fix_signs():
    """More images than pixels: covariance eigenvectors; fewer: an SVD. Same components."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (60, 3, 4, 4), generator=g, dtype=torch.uint8)  # 60 > 48
    by_eigh = fit_pca(images, 3)
    v = by_eigh["components"]
    assert (v[torch.arange(3), v.abs().argmax(1)] > 0).all()
    assert (by_eigh["variances"][:-1] >= by_eigh["variances"][1:]).all()
    x = to_pixels(images)
    _, s, vt = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    vt = vt[:3] * torch.sign(vt[:3][torch.arange(3), vt[:3].abs().argmax(1)]).unsqueeze(1)
    assert_close_scaled(v, vt.float(), 1e-5)
    torch.testing.assert_close(by_eigh["variances"], s[:3] ** 2 / 59, rtol=1e-8, atol=0)
    by_svd = fit_pca(images[:40], 3)  # 40 < 48
    assert by_svd["total_variance"] == pytest.approx(float(to_pixels(images[:40]).var(0).sum()))
