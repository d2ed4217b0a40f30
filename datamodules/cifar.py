"""CIFAR-10/100 from the official "python version" layout, kept in memory as tensors.

Layout under ``data_dir`` (what the official archives unpack to, and what torchvision reads)::

    cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    cifar-100-python/{train, test, meta}

If the folder is missing, the official ``.tar.gz`` beside it is unpacked; if that is missing
too and ``download`` is on, the archive is downloaded and its md5 checked.
"""

from __future__ import annotations

import pickle
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch

from datamodules.tensor_data import batch_loader
from datamodules.transforms import CIFAR_STATS, PixelTransform, cached_zca
from lightning_modules.errors import UserError
from lightning_modules.utils.files import file_digest


@dataclass(frozen=True)
class CifarSpec:
    folder: str
    archive: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    meta_file: str
    names_key: str
    num_classes: int

    @property
    def url(self) -> str:
        return f"https://www.cs.toronto.edu/~kriz/{self.archive}"


SPECS = {
    "cifar10": CifarSpec(
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        label_key="labels",
        meta_file="batches.meta",
        names_key="label_names",
        num_classes=10,
    ),
    "cifar100": CifarSpec(
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        train_files=("train",),
        test_files=("test",),
        label_key="fine_labels",
        meta_file="meta",
        names_key="fine_label_names",
        num_classes=100,
    ),
}


def _spec(name: str) -> CifarSpec:
    if name not in SPECS:
        raise UserError(f"unknown CIFAR dataset {name!r}; choose one of {sorted(SPECS)}")
    return SPECS[name]


def _download(url: str, dest: Path) -> None:
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    tmp = dest.with_suffix(dest.suffix + ".part")
    with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as out:
        total = int(response.headers.get("Content-Length", 0)) or None
        with Progress(
            *Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn()
        ) as bar:
            task = bar.add_task(f"download {dest.name}", total=total)
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
                bar.advance(task, len(chunk))
    tmp.replace(dest)


def ensure_cifar(name: str, data_dir: str | Path, download: bool) -> Path:
    """Return the unpacked folder for ``name``, unpacking or downloading the archive if needed."""
    spec = _spec(name)
    root = Path(data_dir).expanduser()
    folder = root / spec.folder
    if folder.is_dir():
        return folder
    archive = root / spec.archive
    if not archive.exists():
        if not download:
            raise UserError(
                f"{name} not found: expected {folder} (or the archive {archive}); "
                f"set dataset.data_dir to where it is, or dataset.download=true to fetch {spec.url}"
            )
        root.mkdir(parents=True, exist_ok=True)
        try:
            _download(spec.url, archive)
        except Exception as e:  # network errors come in many types; all mean the same here
            raise UserError(
                f"could not download {spec.url} to {archive} ({type(e).__name__}: {e}); "
                f"put the archive or the {spec.folder}/ folder in dataset.data_dir={root} "
                "and set dataset.download=false"
            ) from None
        if file_digest(archive, "md5") != spec.md5:
            archive.unlink()
            raise UserError(
                f"downloaded {spec.url} has the wrong md5 (truncated?); deleted it, retry"
            )
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(root, filter="data")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError(
            f"archive {archive} is truncated or corrupt ({e}); delete it and download it again"
        ) from None
    if not folder.is_dir():
        raise UserError(f"archive {archive} did not contain the folder {spec.folder}/")
    return folder


def _load_pickle(path: Path) -> dict:
    if not path.exists():
        raise UserError(f"CIFAR file {path} is missing; the folder {path.parent} is incomplete")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except Exception as e:
        raise UserError(f"CIFAR file {path} is truncated or corrupt ({type(e).__name__})") from None


def read_cifar(name: str, data_dir: str | Path, split: str, download: bool = False):
    """Read one split as ``(images uint8 [N, 3, 32, 32], labels int64 [N])``."""
    spec = _spec(name)
    folder = ensure_cifar(name, data_dir, download)
    files = spec.train_files if split == "train" else spec.test_files
    images, labels = [], []
    for file in files:
        entry = _load_pickle(folder / file)
        data = np.asarray(entry["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise UserError(
                f"CIFAR file {folder / file} has data of shape {data.shape}, not N x 3072"
            )
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(entry[spec.label_key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def class_names(name: str, data_dir: str | Path) -> list[str]:
    spec = _spec(name)
    path = Path(data_dir).expanduser() / spec.folder / spec.meta_file
    try:
        with open(path, "rb") as f:
            return list(pickle.load(f, encoding="latin1")[spec.names_key])
    except Exception:  # names are cosmetic; the meta file is optional
        return [str(c) for c in range(spec.num_classes)]


def balanced_subset(labels: torch.Tensor, per_class: int, num_classes: int, seed: int, split: str):
    """Indices of ``per_class`` examples of every class, drawn with a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        if per_class > len(idx):
            raise UserError(
                f"dataset.{split}_per_class={per_class} but the {split} split has only "
                f"{len(idx)} images of class {c}"
            )
        chosen.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.cat(chosen).sort().values


class CIFARDataModule(L.LightningDataModule):
    """CIFAR-10/100 as normalised (mean/std or ZCA) float tensors, with balanced subsets.

    Args:
        name: ``cifar10`` or ``cifar100``.
        data_dir: folder holding the official layout (or archive).
        download: fetch the official archive when nothing is found.
        zca: ZCA-whiten instead of mean/std normalisation (fitted on the full train split,
            cached under ``cache_dir``).
        zca_eps: ZCA regulariser; 0.1 as in MTT (kornia's default 1e-6 gives other images).
        train_per_class / test_per_class: class-balanced subsets for small runs.
        batch_size: training batch size.
        subset_seed: seed for the subsets and the shuffle.
    """

    channels = 3
    im_size = 32

    def __init__(
        self,
        name: str = "cifar10",
        data_dir: str = "data",
        download: bool = True,
        zca: bool | None = False,
        zca_eps: float = 0.1,
        train_per_class: int | None = None,
        test_per_class: int | None = None,
        batch_size: int = 256,
        eval_batch_size: int = 1024,
        subset_seed: int = 0,
        cache_dir: str = "cache",
    ):
        super().__init__()
        self.spec = _spec(name)
        self.name = name
        self.data_dir = data_dir
        self.download = download
        self.zca = bool(zca)  # null (follow the published row) is off outside distillation
        self.zca_eps = zca_eps
        self.train_per_class = train_per_class
        self.test_per_class = test_per_class
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.subset_seed = subset_seed
        self.cache_dir = cache_dir
        self.num_classes = self.spec.num_classes
        self.transform: PixelTransform | None = None
        self._ready = False

    def prepare_data(self) -> None:
        ensure_cifar(self.name, self.data_dir, self.download)

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        train_u8, train_y = read_cifar(self.name, self.data_dir, "train", self.download)
        test_u8, test_y = read_cifar(self.name, self.data_dir, "test", self.download)
        if self.zca:
            self.transform, _ = cached_zca(train_u8, self.zca_eps, self.cache_dir, self.name)
        else:
            self.transform = PixelTransform.mean_std(*CIFAR_STATS[self.name])
        if self.train_per_class:
            keep = balanced_subset(
                train_y, self.train_per_class, self.num_classes, self.subset_seed, "train"
            )
            train_u8, train_y = train_u8[keep], train_y[keep]
        if self.test_per_class:
            keep = balanced_subset(
                test_y, self.test_per_class, self.num_classes, self.subset_seed, "test"
            )
            test_u8, test_y = test_u8[keep], test_y[keep]
        self.train_x, self.train_y = self._to_input(train_u8), train_y
        self.test_x, self.test_y = self._to_input(test_u8), test_y
        self.class_names = class_names(self.name, self.data_dir)
        self._ready = True

    def _to_input(self, images_u8: torch.Tensor, chunk: int = 10000) -> torch.Tensor:
        parts = [
            self.transform(images_u8[i : i + chunk].float() / 255.0)
            for i in range(0, len(images_u8), chunk)
        ]
        return torch.cat(parts) if parts else torch.empty(0, 3, 32, 32)

    @property
    def data_shape(self) -> tuple[int, int, int]:
        """Shape of one image, ``(C, H, W)`` = (3, 32, 32)."""
        return (self.channels, self.im_size, self.im_size)

    # -- loaders ------------------------------------------------------------------------------
    def train_dataloader(self):
        return batch_loader(
            self.train_x,
            self.train_y,
            batch_size=self.batch_size,
            shuffle=True,
            seed=self.subset_seed,
        )

    def val_dataloader(self):
        return batch_loader(
            self.test_x, self.test_y, batch_size=self.eval_batch_size, shuffle=False
        )

    def test_dataloader(self):
        return self.val_dataloader()

    # -- helpers for distillation and coresets --------------------------------------------------
    def images_per_class(self) -> torch.Tensor:
        return torch.bincount(self.train_y, minlength=self.num_classes)

    def real_images(self, c: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` distinct random train images of class ``c`` in model input space."""
        idx = (self.train_y == c).nonzero().flatten()
        if n > len(idx):
            raise UserError(
                f"asked for {n} real images of class {c}, but the train split has {len(idx)}"
            )
        return self.train_x[idx[torch.randperm(len(idx), generator=generator)[:n]]].clone()
