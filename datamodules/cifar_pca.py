"""CIFAR in a PCA latent, as vector data for the DDPM (``dataset=cifar10_pca dataset.dim=d``).

Images are flattened in [-1, 1] pixel space (the range the image DDPM trains in), a PCA with
``dim`` components is fitted on the train split (after ``train_per_class`` subsetting, if set)
and cached on disk; the latent coordinates ``z = (x - mean) Vᵀ`` are standardised per coordinate
with the training latents' std (their mean is 0 by construction). The reference sample is the
test split encoded (at most ``num_reference`` images, a seeded random subset).
:meth:`CIFARPCADataModule.decode_images` maps model-space vectors back to images in [0, 1].

PCA cache (``<cache_dir>/pca/<name>-d<dim>-<digest>.pt``, ``torch.save`` of a dict, written
atomically): ``format`` ("cifar_pca/1"), ``mean`` float32 [3072], ``components`` float32
[dim, 3072] (orthonormal rows, largest variance first, sign fixed so the largest-magnitude entry
of each row is positive), ``variances`` float64 [dim] (the latent variances), ``total_variance``
(the trace of the pixel covariance), ``num_train`` and ``digest`` (sha1 of the train images'
uint8 bytes, first 12 hex digits). The key is the data digest and ``dim``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from datamodules.cifar import SPECS, balanced_subset, ensure_cifar, read_cifar
from datamodules.vectors import VectorDataModule
from lightning_modules.errors import UserError
from lightning_modules.utils.files import atomic_path
from lightning_modules.utils.pca import principal_components
from lightning_modules.utils.seeds import derive_seed

PCA_FORMAT = "cifar_pca/1"


def to_pixels(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] → float64 [N, C·H·W] in [-1, 1]."""
    return images_u8.reshape(len(images_u8), -1).double() / 127.5 - 1


def fit_pca(images_u8: torch.Tensor, dim: int) -> dict:
    """The first ``dim`` principal components of the images in [-1, 1] (float64; see
    :func:`~lightning_modules.utils.pca.principal_components`). They are fitted on the uint8
    values, so 50,000 x 3072 images never need a float64 copy, and mapped to [-1, 1] pixels
    (an affine map: same directions, variances / 127.5²)."""
    pc = principal_components(images_u8.reshape(len(images_u8), -1), dim)
    if pc.vectors.shape[1] < dim:
        n = len(images_u8)
        raise UserError(f"dataset.dim={dim}: {n} training images give at most {n - 1} directions")
    scale = 127.5**2
    return {
        "format": PCA_FORMAT,
        "mean": (pc.mean / 127.5 - 1).float(),
        "components": pc.vectors.T.contiguous().float(),
        "variances": pc.variances / scale,
        "total_variance": pc.total_variance / scale,
        "num_train": len(images_u8),
    }


def cached_pca(images_u8: torch.Tensor, dim: int, cache_dir: str | Path, tag: str):
    """Fit the PCA once per (train images, dim) and keep it on disk; ``(pca dict, path)``."""
    digest = hashlib.sha1(images_u8.numpy().tobytes()).hexdigest()[:12]
    path = Path(cache_dir) / "pca" / f"{tag}-d{dim}-{digest}.pt"
    if path.exists():
        try:
            pca = torch.load(path, weights_only=True)
            if pca.get("format") == PCA_FORMAT and pca["components"].shape[0] == dim:
                return pca, path
        except Exception:  # unreadable (e.g. a foreign file): refit and replace it below
            pass
    pca = {**fit_pca(images_u8, dim), "digest": digest}
    with atomic_path(path) as tmp:
        torch.save(pca, tmp)
    return pca, path


class CIFARPCADataModule(VectorDataModule):
    """CIFAR-10/100 as ``dim``-dimensional standardised PCA latents (module docstring).

    Args:
        name: ``cifar10`` or ``cifar100``.
        dim: number of principal components (the vector dimension D).
        num_reference: at most this many test images (seeded subset) form the reference sample;
            null: the whole (possibly ``test_per_class``-subsetted) test split.
        train_per_class / test_per_class: class-balanced subsets, as for ``dataset=cifar10``.
    """

    def __init__(
        self,
        name: str = "cifar10",
        dim: int = 32,
        data_dir: str = "data",
        download: bool = True,
        num_reference: int | None = 2000,
        train_per_class: int | None = None,
        test_per_class: int | None = None,
        subset_seed: int = 0,
        cache_dir: str = "cache",
        batch_size: int = 256,
        seed: int = 0,
    ):
        super().__init__(batch_size=batch_size, seed=seed)
        if name not in SPECS:
            raise UserError(f"dataset.name={name!r}: use one of {', '.join(SPECS)}")
        if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= 3072:
            raise UserError(f"dataset.dim={dim!r}: a whole number of components in 1..3072")
        if num_reference is not None and (isinstance(num_reference, bool) or num_reference < 2):
            raise UserError(f"dataset.num_reference={num_reference!r}: at least 2, or null")
        self.name, self.dim_ = name, dim
        self.data_dir, self.download, self.cache_dir = data_dir, download, cache_dir
        self.num_reference = num_reference
        self.train_per_class, self.test_per_class = train_per_class, test_per_class
        self.subset_seed = subset_seed
        self.pca: dict | None = None
        self.cache_path: Path | None = None
        self.test_images01: torch.Tensor | None = None

    def prepare_data(self) -> None:
        ensure_cifar(self.name, self.data_dir, self.download)

    def _split(self, split: str, per_class: int | None):
        images, labels = read_cifar(self.name, self.data_dir, split, self.download)
        if per_class:
            keep = balanced_subset(
                labels, per_class, SPECS[self.name].num_classes, self.subset_seed, split
            )
            images = images[keep]
        return images

    def setup(self, stage: str | None = None) -> None:
        if self.train_x is not None:
            return
        train_u8 = self._split("train", self.train_per_class)
        test_u8 = self._split("test", self.test_per_class)
        if self.dim_ >= len(train_u8):
            raise UserError(
                f"dataset.dim={self.dim_} needs more than {self.dim_} training images "
                f"(the train split has {len(train_u8)}): lower dataset.dim"
            )
        if self.num_reference is not None and len(test_u8) > self.num_reference:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "pca_reference", self.name))
            test_u8 = test_u8[torch.randperm(len(test_u8), generator=g)[: self.num_reference]]
        if len(test_u8) < 2:
            raise UserError(f"the {self.name} test split has {len(test_u8)} images; need 2")
        self.pca, self.cache_path = cached_pca(train_u8, self.dim_, self.cache_dir, self.name)
        self._standardise(self.encode(train_u8), self.encode(test_u8), per_coordinate=True)
        self.test_images01 = test_u8.float() / 255

    def encode(self, images_u8: torch.Tensor, chunk: int = 10000) -> torch.Tensor:
        """uint8 images → PCA latents ``z = (x - mean) Vᵀ`` (float32 [N, dim])."""
        mean, components = self.pca["mean"].double(), self.pca["components"].double()
        parts = [
            ((to_pixels(images_u8[i : i + chunk]) - mean) @ components.T).float()
            for i in range(0, len(images_u8), chunk)
        ]
        return torch.cat(parts)

    def decode_images(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space vectors [N, dim] → images [N, 3, 32, 32] in [0, 1] (clipped)."""
        z = self.to_data_space(x.detach().float().cpu())
        pixels = z @ self.pca["components"] + self.pca["mean"]
        return ((pixels.clamp(-1, 1) + 1) / 2).reshape(len(x), 3, 32, 32)

    @property
    def explained_variance(self) -> float:
        """Share of the train pixels' variance the ``dim`` components keep."""
        return float(self.pca["variances"].sum() / self.pca["total_variance"])
