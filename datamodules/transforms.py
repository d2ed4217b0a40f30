"""The map from [0, 1] pixels to model input space (mean/std or ZCA), with its inverse.

A distilled set lives in model input space and is useless without this map, so the map is a
plain dict of tensors (``state_dict``) that travels inside every set file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
}


class PixelTransform:
    """``forward`` maps [0, 1] images to model input space, ``inverse`` maps back for viewing."""

    def __init__(self, kind: str, **tensors: torch.Tensor | float):
        if kind not in ("meanstd", "zca"):
            raise ValueError(f"unknown pixel transform {kind!r}")
        self.kind = kind
        self.tensors = tensors

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def mean_std(cls, mean, std) -> PixelTransform:
        return cls(
            "meanstd",
            mean=torch.tensor(mean, dtype=torch.float32),
            std=torch.tensor(std, dtype=torch.float32),
        )

    @classmethod
    def fit_zca(cls, images01: torch.Tensor, eps: float = 0.1) -> PixelTransform:
        """Fit ZCA whitening on [0, 1] images (N, C, H, W) with kornia, as MTT does."""
        from kornia.enhance import ZCAWhitening

        zca = ZCAWhitening(eps=eps, compute_inv=True)
        zca.fit(images01.float())
        return cls(
            "zca",
            mean=zca.mean_vector.detach().reshape(-1).clone(),
            matrix=zca.transform_matrix.detach().clone(),
            inverse=zca.transform_inv.detach().clone(),
            eps=float(eps),
        )

    @classmethod
    def from_state(cls, state: dict) -> PixelTransform:
        state = dict(state)
        return cls(state.pop("kind"), **state)

    def state_dict(self) -> dict:
        return {"kind": self.kind, **self.tensors}

    # -- application --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tensors
        if self.kind == "meanstd":
            return (x - _chan(t["mean"], x)) / _chan(t["std"], x)
        flat = x.reshape(len(x), -1) - t["mean"].to(x)
        return (flat @ t["matrix"].to(x).T).reshape(x.shape)

    __call__ = forward

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tensors
        if self.kind == "meanstd":
            return x * _chan(t["std"], x) + _chan(t["mean"], x)
        flat = x.reshape(len(x), -1) @ t["inverse"].to(x).T
        return (flat + t["mean"].to(x)).reshape(x.shape)

    def same_as(self, other: PixelTransform, atol: float = 1e-5) -> bool:
        """Whether two transforms map pixels identically (used to check sets against data)."""
        if self.kind != other.kind:
            return False
        for key, value in self.tensors.items():
            theirs = other.tensors.get(key)
            if isinstance(value, torch.Tensor):
                if not isinstance(theirs, torch.Tensor) or value.shape != theirs.shape:
                    return False
                if not torch.allclose(value.float(), theirs.float(), atol=atol):
                    return False
            elif value != theirs:
                return False
        return True

    def describe(self) -> str:
        return f"ZCA (eps={self.tensors['eps']})" if self.kind == "zca" else "mean/std"


def _chan(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x).view(1, -1, 1, 1)


def cached_zca(images_uint8: torch.Tensor, eps: float, cache_dir: str | Path, tag: str):
    """Fit ZCA once per (data, eps) and keep it on disk; later runs load it in milliseconds."""
    digest = hashlib.sha1(images_uint8.numpy().tobytes()).hexdigest()[:12]
    path = Path(cache_dir) / "zca" / f"{tag}-eps{eps:g}-{digest}.pt"
    if path.exists():
        try:
            return PixelTransform.from_state(torch.load(path, weights_only=True)), path
        except Exception:  # a half-written cache from a killed run: refit below
            path.unlink(missing_ok=True)
    transform = PixelTransform.fit_zca(images_uint8.float() / 255.0, eps=eps)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(transform.state_dict(), tmp)
    tmp.replace(path)  # atomic: parallel runs never read a partial file
    return transform, path
