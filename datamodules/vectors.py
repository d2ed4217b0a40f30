"""Low-dimensional vector data for the DDPM: sklearn's swiss roll and the user's own points.

Both hold a training sample and a held-out reference sample of real data (for the sample-quality
metrics), scaled to unit order by one scalar so the shape of the data is kept.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch

from datamodules.tensor_data import batch_loader
from lightning_modules.errors import UserError


class VectorDataModule(L.LightningDataModule):
    """Base: ``train_x`` [N, D] and ``reference_x`` [M, D], already scaled; batches are tensors."""

    def __init__(self, batch_size: int = 256, seed: int = 0):
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed
        self.train_x: torch.Tensor | None = None
        self.reference_x: torch.Tensor | None = None
        self.shift = torch.zeros(1)
        self.scale = 1.0

    @property
    def dim(self) -> int:
        self.setup()
        return self.train_x.shape[1]

    @property
    def data_shape(self) -> tuple[int, ...]:
        """Shape of one sample, ``(D,)`` (what the DDPM eps-networks are built for)."""
        return (self.dim,)

    def _standardise(
        self, train: np.ndarray, reference: np.ndarray, per_coordinate: bool = False
    ) -> None:
        """Centre on the training mean and divide by one scalar std (the shape of the data is
        kept) or, with ``per_coordinate``, by each coordinate's training std (a constant
        coordinate keeps scale 1)."""
        train_t = torch.as_tensor(train, dtype=torch.float32)
        self.shift = train_t.mean(0)
        if per_coordinate:
            std = train_t.std(0)
            self.scale = torch.where(std > 0, std, torch.ones_like(std))
        else:
            self.scale = float((train_t - self.shift).std()) or 1.0
        self.train_x = (train_t - self.shift) / self.scale
        self.reference_x = (
            torch.as_tensor(reference, dtype=torch.float32) - self.shift
        ) / self.scale

    def to_data_space(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.as_tensor(self.scale).to(x) + self.shift.to(x)

    def train_dataloader(self):
        return batch_loader(self.train_x, batch_size=self.batch_size, shuffle=True, seed=self.seed)

    def val_dataloader(self):
        return batch_loader(self.reference_x, batch_size=self.batch_size, shuffle=False)


class SwissRollDataModule(VectorDataModule):
    """sklearn ``make_swiss_roll``; ``dim=2`` keeps the (x, z) coordinates, ``dim=3`` all three."""

    def __init__(
        self,
        dim: int = 2,
        num_samples: int = 10000,
        num_reference: int = 2000,
        noise: float = 0.5,
        batch_size: int = 256,
        seed: int = 0,
    ):
        super().__init__(batch_size=batch_size, seed=seed)
        if dim not in (2, 3):
            raise UserError(f"dataset.dim={dim}: the swiss roll is 2-D (x, z) or 3-D")
        self.dim_ = dim
        self.num_samples = num_samples
        self.num_reference = num_reference
        self.noise = noise

    def setup(self, stage: str | None = None) -> None:
        if self.train_x is not None:
            return
        from sklearn.datasets import make_swiss_roll

        def draw(n, seed):
            x, _ = make_swiss_roll(n_samples=n, noise=self.noise, random_state=seed)
            return x[:, [0, 2]] if self.dim_ == 2 else x

        # the reference sample uses its own seed so it is independent of the training sample
        self._standardise(
            draw(self.num_samples, self.seed), draw(self.num_reference, self.seed + 10_000)
        )

    def structure_metric(self, x_data: torch.Tensor, band: float = 3.0) -> dict | None:
        """2-D only: share of samples within ``band`` noise stds of the noiseless roll."""
        if self.dim_ != 2:
            return None
        curve = swiss_roll_curve(np.linspace(0, 1, 8000))
        return {"mode_share": curve_band_share(x_data.cpu().numpy(), curve, band * self.noise)}

    def exact_eps(self, alpha_bar: torch.Tensor, per_curve: int = 600):
        """2-D only: the exact noise predictor of an equal-weight mixture of isotropic Gaussians
        (the noise std) at ``per_curve`` points of the noiseless roll, evenly spaced in its
        parameter as sklearn draws it, in the standardised coordinates (None in 3-D)."""
        if self.dim_ != 2:
            return None
        from lightning_modules.diffusion.oracles import MixtureEps

        self.setup()
        centres = torch.as_tensor(swiss_roll_curve(np.linspace(0, 1, per_curve)))
        centres = (centres - self.shift.double()) / self.scale
        return MixtureEps(centres, self.noise / self.scale, alpha_bar)


def curve_band_share(x: np.ndarray, curve: np.ndarray, band: float, chunk: int = 1024) -> float:
    """Share of the points ``x [N, 2]`` within ``band`` of a densely drawn curve ``[M, 2]``."""
    x, curve = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(curve, dtype=torch.float64)
    near = [torch.cdist(x[i : i + chunk], curve).amin(1) <= band for i in range(0, len(x), chunk)]
    return float(torch.cat(near).double().mean()) if near else float("nan")


def swiss_roll_curve(u: np.ndarray) -> np.ndarray:
    """sklearn's roll without noise in the (x, z) plane: ``t (cos t, sin t)``, t in [1.5π, 4.5π]."""
    t = 1.5 * np.pi * (1 + 2 * u)
    return np.stack([t * np.cos(t), t * np.sin(t)], 1)


class PointsDataModule(VectorDataModule):
    """An N x D array from ``.npy`` or ``.csv``; ``reference_fraction`` of it is held out."""

    def __init__(
        self,
        path: str | None = None,
        reference_fraction: float = 0.2,
        batch_size: int = 256,
        seed: int = 0,
    ):
        super().__init__(batch_size=batch_size, seed=seed)
        self.path = path
        self.reference_fraction = reference_fraction

    def setup(self, stage: str | None = None) -> None:
        if self.train_x is not None:
            return
        data = load_points(self.path)
        g = np.random.default_rng(self.seed)
        order = g.permutation(len(data))
        n_ref = max(1, int(round(self.reference_fraction * len(data))))
        if len(data) - n_ref < 2:
            raise UserError(f"points file {self.path} has {len(data)} rows; need at least 3")
        self._standardise(data[order[n_ref:]], data[order[:n_ref]])


def load_points(path: str | None) -> np.ndarray:
    """Read and check an N x D float array (N > 1, 1 <= D <= 64, all finite); a 1-D array or a
    one-column CSV is N x 1 (one rule for both formats)."""
    if not path:
        raise UserError("dataset=points needs dataset.path=<file.npy or file.csv> (an N x D array)")
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"points file {p} does not exist (dataset.path)")
    try:
        if p.suffix == ".npy":
            data = np.load(p, allow_pickle=False)
        elif p.suffix in (".csv", ".txt"):
            data = np.loadtxt(p, delimiter=",", ndmin=2)
        else:
            raise UserError(f"points file {p}: use a .npy or .csv file")
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"points file {p} could not be read ({type(e).__name__}: {e})") from None
    data = np.asarray(data)
    if data.ndim == 1:  # N values are N points in one dimension, from .npy as from a 1-column CSV
        data = data.reshape(-1, 1)
    if data.ndim != 2 or not 1 <= data.shape[1] <= 64 or data.shape[0] < 2:
        raise UserError(
            f"points file {p} has shape {data.shape}; expected N x D with N > 1 and D <= 64"
        )
    if not np.issubdtype(data.dtype, np.number):
        raise UserError(f"points file {p} is not numeric (dtype {data.dtype})")
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).any(axis=1).sum())
        raise UserError(f"points file {p} has {bad} rows with NaN or inf; clean them first")
    return data.astype(np.float32)
