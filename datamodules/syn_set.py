"""The one file format for small training sets: distilled images and coreset selections alike.

A set file is ``torch.save`` of a plain dict (loadable with ``weights_only=True``)::

    format     "ttdistill.synthetic_set"
    version    2 (1: the same without soft_labels; both are read)
    images     float32 [N, C, H, W], model input space (mean/std-normalised or ZCA-whitened)
    labels     int64 [N]         hard class indices (always present)
    soft_labels float32 [N, classes] | None   learned label logits (DATM/PAD); None for hard-only
                                 sets. Version 1 files have no entry and read as None.
    lr         float | None      learned learning rate (distillation), None for coresets
    transform  dict              PixelTransform.state_dict(): kind "meanstd" (mean, std) or
                                 "zca" (mean, matrix, inverse, eps); undoes the images for viewing
    dataset    str               "cifar10" | "cifar100"
    ipc        int               images per class
    method     str               "mtt" | "distill" | "random" | "herding" | "forgetting" | ...
    config     dict              provenance: the resolved config of the run that made the set

The set is useless without its pixel transform (a ZCA-whitened image means nothing under mean/std
normalisation), so the transform travels inside the file and ``check_against`` refuses data that
maps pixels differently.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from datamodules.transforms import PixelTransform
from lightning_modules.errors import UserError

FORMAT = "ttdistill.synthetic_set"
VERSION = 2
_KEYS = ("images", "labels", "lr", "transform", "dataset", "ipc", "method", "config")
_OPTIONAL = ("soft_labels",)  # added in version 2; absent from version 1 files


@dataclass
class SyntheticSet:
    """A small labelled training set in model input space, with everything needed to use it.

    Args:
        images: ``[N, C, H, W]`` float32 in model input space.
        labels: ``[N]`` int64 class indices.
        lr: learned learning rate (distillation) or ``None``.
        transform: ``PixelTransform.state_dict()`` of the data the images live in.
        dataset: dataset name (``cifar10``/``cifar100``).
        ipc: images per class.
        method: what made the set (``mtt``, ``random``, ``herding``, ...).
        config: provenance, the resolved config of the producing run (plain dict).
        soft_labels: ``[N, classes]`` float32 learned label logits, or ``None`` (hard labels only).
    """

    images: torch.Tensor
    labels: torch.Tensor
    lr: float | None
    transform: dict
    dataset: str
    ipc: int
    method: str
    config: dict = field(default_factory=dict)
    soft_labels: torch.Tensor | None = None
    source: str | None = field(default=None, repr=False, compare=False)  # file it came from

    def __post_init__(self):
        self.images = self.images.detach().to("cpu", torch.float32).contiguous()
        self.labels = self.labels.detach().to("cpu", torch.int64).contiguous()
        if self.images.dim() != 4 or self.labels.dim() != 1 or len(self.images) != len(self.labels):
            raise ValueError(
                f"a set needs images [N, C, H, W] and labels [N]; got {tuple(self.images.shape)} "
                f"and {tuple(self.labels.shape)}"
            )
        if self.soft_labels is not None:
            self.soft_labels = self.soft_labels.detach().to("cpu", torch.float32).contiguous()
            if self.soft_labels.dim() != 2 or len(self.soft_labels) != len(self.labels):
                raise ValueError(
                    f"soft labels must be [N, classes] with N = {len(self.labels)}; "
                    f"got {tuple(self.soft_labels.shape)}"
                )
        self.lr = None if self.lr is None else float(self.lr)
        self.ipc = int(self.ipc)
        if not isinstance(self.config, dict):
            from omegaconf import OmegaConf  # provenance may arrive as a DictConfig

            self.config = OmegaConf.to_container(self.config, resolve=True)

    # -- facts --------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.source or f"<{self.method} set>"

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def pixel_transform(self) -> PixelTransform:
        return PixelTransform.from_state(self.transform)

    def images_per_class(self, num_classes: int | None = None) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=num_classes or 0)

    # -- file io ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "images": self.images,
            "labels": self.labels,
            "lr": self.lr,
            "transform": dict(self.transform),
            "dataset": self.dataset,
            "ipc": self.ipc,
            "method": self.method,
            "config": self.config,
            "soft_labels": self.soft_labels,
        }

    def save(self, path: str | Path) -> None:
        """Write the set to ``path`` atomically (tmp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        torch.save(self.state_dict(), tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> SyntheticSet:
        """Read a set file; ``UserError`` if it is missing, corrupt or not a set file."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise UserError(
                f"set file {path} does not exist; give the .pt file written by task=distill or "
                "task=coreset (evaluate.set=<file>), or evaluate.set=full for the real train set"
            )
        try:
            with warnings.catch_warnings():  # foreign pickles warn before they fail
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, pickle of other objects, random bytes: all unusable
            raise UserError(
                f"set file {path} is truncated or corrupt ({type(e).__name__}); re-create it"
            ) from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise UserError(
                f"{path} is not a synthetic-set file (no format={FORMAT!r} entry); "
                "expert trajectories and checkpoints are different files"
            )
        if state.get("version", 0) > VERSION:
            raise UserError(
                f"set file {path} has format version {state['version']}; "
                f"this code reads up to {VERSION}"
            )
        missing = [k for k in _KEYS if k not in state]
        if missing:
            raise UserError(f"set file {path} lacks {missing}; it is incomplete, re-create it")
        try:
            optional = {k: state.get(k) for k in _OPTIONAL}
            return cls(**{k: state[k] for k in _KEYS}, **optional, source=str(path))
        except (ValueError, TypeError, AttributeError) as e:
            raise UserError(f"set file {path} holds malformed entries ({e})") from None

    # -- checks -------------------------------------------------------------------------------
    def check_against(self, dm) -> None:
        """``UserError`` unless the set-up ``dm`` has the dataset, classes, size and transform."""
        if getattr(dm, "transform", None) is None:
            raise ValueError("check_against needs a datamodule after setup()")
        name = getattr(dm, "name", None)
        if name is not None and name != self.dataset:
            raise UserError(
                f"set {self.name} is for {self.dataset} but dataset={name}; "
                f"run with dataset={self.dataset}"
            )
        if len(self.labels) and int(self.labels.max()) >= dm.num_classes:
            raise UserError(
                f"set {self.name} has labels up to {int(self.labels.max())} but {name} has "
                f"{dm.num_classes} classes; use the dataset the set was made from ({self.dataset})"
            )
        want = (dm.channels, dm.im_size, dm.im_size)
        if tuple(self.images.shape[1:]) != want:
            raise UserError(
                f"set {self.name} has images of shape {tuple(self.images.shape[1:])} but {name} "
                f"gives {want}; use the dataset the set was made from"
            )
        theirs, ours = dm.transform, self.pixel_transform
        if ours.same_as(theirs):
            return
        if ours.kind == "zca" and theirs.kind != "zca":
            raise UserError(
                f"set {self.name} is ZCA-whitened ({ours.describe()}) but the dataset is mean/std "
                f"normalised; add dataset.zca=true dataset.zca_eps={ours.tensors['eps']:g}"
            )
        if ours.kind != "zca" and theirs.kind == "zca":
            raise UserError(
                f"set {self.name} is mean/std normalised but dataset.zca=true; "
                "drop dataset.zca=true"
            )
        raise UserError(
            f"set {self.name} maps pixels with {ours.describe()}, the dataset with "
            f"{theirs.describe()} fitted on other data; use the dataset and dataset.zca_eps "
            "the set was made with"
        )

    # -- viewing ------------------------------------------------------------------------------
    def grid(self, num_classes: int | None = None, pad: int = 2) -> torch.Tensor:
        """The images as one ``[H', W', C]`` array in [0, 1], a row per class, transform undone."""
        k = num_classes or (int(self.labels.max()) + 1 if len(self.labels) else 0)
        pixels = self.pixel_transform.inverse(self.images).clamp(0, 1)
        c, h, w = pixels.shape[1:]
        cols = max(1, int(self.images_per_class(k).max())) if k else 1
        canvas = torch.ones(c, k * (h + pad) + pad, cols * (w + pad) + pad)
        for cls in range(k):
            for j, img in enumerate(pixels[self.labels == cls]):
                top, left = pad + cls * (h + pad), pad + j * (w + pad)
                canvas[:, top : top + h, left : left + w] = img
        return canvas.permute(1, 2, 0).squeeze(-1)

    def save_grid(self, path_png: str | Path, num_classes: int | None = None) -> Path:
        """Write the grid as a PNG (atomic); returns the path."""
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import image as mpimg

        path = Path(path_png)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
        grid = self.grid(num_classes).numpy()
        mpimg.imsave(tmp, grid, cmap="gray" if grid.ndim == 2 else None, vmin=0.0, vmax=1.0)
        tmp.replace(path)
        return path
