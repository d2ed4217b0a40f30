"""The set file: round trip, bad files, checks against the data, PNG grid."""

from __future__ import annotations

import pickle

import pytest
import torch
from omegaconf import OmegaConf

import datamodules.cifar as cifar
from datamodules.cifar import CIFARDataModule
from datamodules.syn_set import FORMAT, SyntheticSet
from datamodules.transforms import PixelTransform
from lightning_modules.errors import UserError
from tests.helpers import assert_close_scaled, write_cifar


def cheap_zca(images_uint8, eps, cache_dir, tag):
    """Stand-in for the 3072 x 3072 ZCA fit (half a minute on a shared CPU): an invertible map."""
    d = images_uint8[0].numel()
    mean = images_uint8.float().div(255).reshape(len(images_uint8), -1).mean(0)
    return PixelTransform(
        "zca", mean=mean, matrix=2 * torch.eye(d), inverse=0.5 * torch.eye(d), eps=float(eps)
    ), None


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_cifar(root, "cifar10", train_per_class=4, test_per_class=2)
    write_cifar(root, "cifar100", train_per_class=2, test_per_class=1)
    return root


def make_dm(root, tmp_path, monkeypatch, name="cifar10", zca=False, zca_eps=0.1):
    monkeypatch.setattr(cifar, "cached_zca", cheap_zca)
    dm = CIFARDataModule(
        name, data_dir=str(root), download=False, zca=zca, zca_eps=zca_eps, cache_dir=str(tmp_path)
    )
    dm.setup()
    return dm


def make_set(dm, ipc=2, lr=0.02, method="random") -> SyntheticSet:
    g = torch.Generator().manual_seed(0)
    images = torch.cat([dm.real_images(c, ipc, g) for c in range(dm.num_classes)])
    labels = torch.arange(dm.num_classes).repeat_interleave(ipc)
    return SyntheticSet(
        images, labels, lr, dm.transform.state_dict(), dm.name, ipc, method, {"seed": 0}
    )


def test_round_trip_keeps_every_field(data_root, tmp_path, monkeypatch):
    dm = make_dm(data_root, tmp_path, monkeypatch)
    config = OmegaConf.create({"seed": 3, "distill": {"eps": 0.1, "lr": None}, "nets": ["convnet"]})
    syn = SyntheticSet(
        torch.randn(20, 3, 32, 32),
        torch.arange(10).repeat(2),
        0.0123,
        dm.transform.state_dict(),
        "cifar10",
        2,
        "mtt",
        config,
    )
    path = tmp_path / "sets" / "mtt.pt"
    syn.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["mtt.pt"]  # no temporary file left behind
    back = SyntheticSet.load(path)
    assert torch.equal(back.images, syn.images) and back.images.dtype == torch.float32
    assert torch.equal(back.labels, syn.labels) and back.labels.dtype == torch.int64
    assert back.lr == pytest.approx(0.0123)
    assert (back.dataset, back.ipc, back.method) == ("cifar10", 2, "mtt")
    assert back.config == {"seed": 3, "distill": {"eps": 0.1, "lr": None}, "nets": ["convnet"]}
    assert back.pixel_transform.same_as(dm.transform)
    assert back.source == str(path)
    # plain torch.load with weights_only reads it: no pickled code in the file
    assert torch.load(path, weights_only=True)["format"] == FORMAT


def test_no_lr_round_trips_as_none(data_root, tmp_path, monkeypatch):
    syn = make_set(make_dm(data_root, tmp_path, monkeypatch), lr=None)
    syn.save(tmp_path / "s.pt")
    assert SyntheticSet.load(tmp_path / "s.pt").lr is None


def test_missing_and_corrupt_files_are_user_errors(data_root, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="does not exist"):
        SyntheticSet.load(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00not a torch file" * 10)
    with pytest.raises(UserError, match="truncated or corrupt"):
        SyntheticSet.load(tmp_path / "junk.pt")
    good = tmp_path / "good.pt"
    make_set(make_dm(data_root, tmp_path, monkeypatch)).save(good)
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        SyntheticSet.load(tmp_path / "cut.pt")
    torch.save({"snapshots": torch.zeros(3, 4)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a synthetic-set file"):
        SyntheticSet.load(tmp_path / "other.pt")
    with open(tmp_path / "pickle.pt", "wb") as f:  # arbitrary pickles are refused, not executed
        pickle.dump(OmegaConf, f)
    with pytest.raises(UserError, match="truncated or corrupt"):
        SyntheticSet.load(tmp_path / "pickle.pt")
    state = torch.load(good, weights_only=True)
    del state["labels"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(UserError, match="lacks"):
        SyntheticSet.load(tmp_path / "partial.pt")
    state = torch.load(good, weights_only=True)
    state["labels"] = state["labels"][:3]
    torch.save(state, tmp_path / "bad_shapes.pt")
    with pytest.raises(UserError, match="malformed"):
        SyntheticSet.load(tmp_path / "bad_shapes.pt")


def test_check_against_accepts_the_matching_dataset(data_root, tmp_path, monkeypatch):
    dm = make_dm(data_root, tmp_path, monkeypatch)
    make_set(dm).check_against(dm)
    zca_dm = make_dm(data_root, tmp_path, monkeypatch, zca=True)
    make_set(zca_dm).check_against(zca_dm)


def test_check_against_refuses_other_data(data_root, tmp_path, monkeypatch):
    dm = make_dm(data_root, tmp_path, monkeypatch)
    zca_dm = make_dm(data_root, tmp_path, monkeypatch, zca=True)
    syn, zca_syn = make_set(dm), make_set(zca_dm)
    with pytest.raises(UserError, match=r"ZCA-whitened .* add dataset\.zca=true"):
        zca_syn.check_against(dm)  # the user forgot dataset.zca=true
    with pytest.raises(UserError, match=r"drop dataset\.zca=true"):
        syn.check_against(zca_dm)
    other_eps = make_dm(data_root, tmp_path, monkeypatch, zca=True, zca_eps=0.5)
    with pytest.raises(UserError, match="fitted on other data"):
        zca_syn.check_against(other_eps)
    c100 = make_dm(data_root, tmp_path, monkeypatch, name="cifar100")
    with pytest.raises(UserError, match="is for cifar10 but dataset=cifar100"):
        syn.check_against(c100)
    many = make_set(c100, ipc=1)
    many.dataset = "cifar10"  # labels beyond CIFAR-10's classes
    with pytest.raises(UserError, match="labels up to 99"):
        many.check_against(dm)
    small = SyntheticSet(
        torch.zeros(10, 3, 16, 16),
        torch.arange(10),
        None,
        dm.transform.state_dict(),
        "cifar10",
        1,
        "x",
    )
    with pytest.raises(UserError, match=r"shape \(3, 16, 16\)"):
        small.check_against(dm)


def test_grid_has_a_row_per_class_and_undoes_the_transform(data_root, tmp_path, monkeypatch):
    import matplotlib.image as mpimg

    for zca in (False, True):
        dm = make_dm(data_root, tmp_path, monkeypatch, zca=zca)
        syn = make_set(dm, ipc=3)
        grid = syn.grid(pad=2)
        assert grid.shape == (10 * 34 + 2, 3 * 34 + 2, 3)
        # class 4's second image sits in row 4, column 1, back in [0, 1] pixels
        original = dm.transform.inverse(syn.images[syn.labels == 4][1:2])[0].permute(1, 2, 0)
        top, left = 2 + 4 * 34, 2 + 34
        assert_close_scaled(grid[top : top + 32, left : left + 32], original.clamp(0, 1), 1e-4)
        path = syn.save_grid(tmp_path / f"grid{zca}.png")
        png = mpimg.imread(path)
        assert png.shape[:2] == (342, 104)


def test_soft_labels_round_trip_and_version_1_files_read_without_them(tmp_path):
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 0, 1, 1])
    transform = {"kind": "meanstd", "mean": [0.0] * 3, "std": [1.0] * 3}
    soft = torch.randn(4, 10, dtype=torch.float64)
    syn = SyntheticSet(images, labels, 0.01, transform, "cifar10", 2, "datm", {}, soft_labels=soft)
    syn.save(tmp_path / "v2.pt")
    back = SyntheticSet.load(tmp_path / "v2.pt")
    assert back.soft_labels.dtype == torch.float32 and torch.equal(back.soft_labels, soft.float())
    old = syn.state_dict()
    old["version"] = 1
    del old["soft_labels"]
    torch.save(old, tmp_path / "v1.pt")
    assert SyntheticSet.load(tmp_path / "v1.pt").soft_labels is None
    with pytest.raises(ValueError, match="soft labels"):
        SyntheticSet(images, labels, 0.01, transform, "cifar10", 2, "datm", {}, torch.randn(3, 10))
