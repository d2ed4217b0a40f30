import pickle
import tarfile

import pytest
import torch

from datamodules.cifar import CIFARDataModule, balanced_subset, ensure_cifar, read_cifar
from lightning_modules.errors import UserError
from tests.helpers import assert_close_scaled, write_cifar


@pytest.mark.parametrize(
    "name,classes,train,test", [("cifar10", 10, 20, 5), ("cifar100", 100, 3, 2)]
)
def test_reader_reads_official_layout(tiny_data, name, classes, train, test):
    x, y = read_cifar(name, tiny_data, "train")
    assert x.dtype == torch.uint8 and x.shape == (classes * train, 3, 32, 32)
    assert torch.bincount(y, minlength=classes).tolist() == [train] * classes
    xt, yt = read_cifar(name, tiny_data, "test")
    assert xt.shape == (classes * test, 3, 32, 32) and yt.max() == classes - 1


def test_reader_keeps_channel_planes(tmp_path):
    """The official layout is R plane, G plane, B plane, row-major: check one pixel."""
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(tmp_path, "cifar10", 1, 1)
    with open(folder / "data_batch_1", "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    x, _ = read_cifar("cifar10", tmp_path, "train")
    row = entry["data"][0]
    assert x[0, 1, 2, 3].item() == row[1024 + 2 * 32 + 3]


def test_balanced_subset_is_balanced_and_seeded(tiny_data):
    _, y = read_cifar("cifar10", tiny_data, "train")
    a = balanced_subset(y, 7, 10, seed=1, split="train")
    b = balanced_subset(y, 7, 10, seed=1, split="train")
    c = balanced_subset(y, 7, 10, seed=2, split="train")
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.bincount(y[a], minlength=10).tolist() == [7] * 10


def test_subset_larger_than_split_is_a_user_error(tiny_data):
    dm = CIFARDataModule("cifar10", str(tiny_data), download=False, train_per_class=21)
    with pytest.raises(UserError, match="train_per_class=21.*only 20"):
        dm.setup()


def test_missing_data_names_path_url_and_option(tmp_path):
    with pytest.raises(UserError) as e:
        ensure_cifar("cifar10", tmp_path, download=False)
    msg = str(e.value)
    assert str(tmp_path) in msg and "cifar-10-python.tar.gz" in msg and "dataset.download" in msg
    assert "\n" not in msg


def test_archive_beside_folder_is_unpacked(tmp_path):
    src = write_cifar(tmp_path / "src", "cifar10", 2, 1)
    dest = tmp_path / "dest"
    dest.mkdir()
    with tarfile.open(dest / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    x, _ = read_cifar("cifar10", dest, "train")
    assert x.shape[0] == 20


def test_truncated_archive_is_a_user_error(tmp_path):
    src = write_cifar(tmp_path / "src", "cifar10", 2, 1)
    dest = tmp_path / "dest"
    dest.mkdir()
    archive = dest / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    archive.write_bytes(archive.read_bytes()[:2000])
    with pytest.raises(UserError, match="truncated or corrupt"):
        ensure_cifar("cifar10", dest, download=False)


def test_corrupt_batch_file_is_a_user_error(tmp_path):
    write_cifar(tmp_path, "cifar10", 2, 1)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x02garbage")
    with pytest.raises(UserError, match="data_batch_3 is truncated or corrupt"):
        read_cifar("cifar10", tmp_path, "train")


def test_datamodule_normalises_and_batches(tiny_data):
    dm = CIFARDataModule("cifar10", str(tiny_data), download=False, batch_size=16, test_per_class=3)
    dm.setup()
    assert dm.train_x.dtype == torch.float32 and len(dm.test_x) == 30
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and y.shape == (16,)
    back = dm.transform.inverse(dm.train_x[:4])
    assert back.min() >= -1e-5 and back.max() <= 1 + 1e-5
    imgs = dm.real_images(3, 5, torch.Generator().manual_seed(0))
    assert imgs.shape == (5, 3, 32, 32)
    with pytest.raises(UserError):
        dm.real_images(3, 21)


def test_zca_round_trip_and_cache(tiny_data, tmp_path):
    dm = CIFARDataModule(
        "cifar10", str(tiny_data), download=False, zca=True, cache_dir=str(tmp_path)
    )
    dm.setup()
    assert dm.transform.kind == "zca"
    cached = list((tmp_path / "zca").glob("cifar10-eps0.1-*.pt"))
    assert len(cached) == 1
    raw, _ = read_cifar("cifar10", tiny_data, "train")
    x01 = raw[:8].float() / 255
    assert_close_scaled(dm.transform.inverse(dm.transform(x01)), x01, 2e-4)
    # the cached transform is what a second datamodule uses, and it is the same map
    mtime = cached[0].stat().st_mtime_ns
    dm2 = CIFARDataModule(
        "cifar10", str(tiny_data), download=False, zca=True, cache_dir=str(tmp_path)
    )
    dm2.setup()
    assert cached[0].stat().st_mtime_ns == mtime and dm2.transform.same_as(dm.transform)
    # it is the eps=0.1 ZCA of MTT (kornia's default 1e-6 gives other images)
    assert dm.transform.tensors["eps"] == 0.1
