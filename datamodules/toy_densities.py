"""2-D toy densities for the DDPM (``dataset=moons|circles|8gaussians|checkerboard|pinwheel|
2spirals``), each with a training sample, an independent held-out reference sample and a
*structure metric* that knows where the density's mass must lie.

Every density is drawn in its own coordinates from a seeded numpy generator (written here, no
sklearn), then standardised like the swiss roll (one shift, one scalar scale). The structure
metric takes samples in those data coordinates (``to_data_space``) and returns

* 8gaussians: ``mode_share`` (share within 3 std of a mode centre) and ``mode_counts`` (per
  mode, the samples within 3 std of it);
* checkerboard: ``mode_share`` = share inside a filled square;
* moons, circles, 2spirals (and the 2-D swiss roll in :mod:`.vectors`): ``mode_share`` = share
  within ``band`` noise std of the noiseless curve;
* pinwheel: ``mode_share`` = share within 3 std of an arm (the arm's warp inverted by a
  fixed-point iteration).

The same metric on the reference sample is the data's own value a model is compared with.

``exact_eps(alpha_bar)`` is each density's exact noise predictor in the standardised coordinates
(:mod:`lightning_modules.diffusion.oracles`): 8gaussians exactly; moons, circles, 2spirals an
equal-weight mixture of isotropic Gaussians (the noise std) at ``per_curve`` points per branch of
the noiseless curve, evenly spaced in the curve's own parameter as the sampler draws it (spacing
below the noise std); pinwheel per arm the radial coordinate at ``per_curve`` normal quantiles,
each a Gaussian of the arm's width across the (warped) arm, degenerate along it; checkerboard
exactly (uniform on 8 squares).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from datamodules.vectors import VectorDataModule, curve_band_share
from lightning_modules.diffusion.oracles import BoxesEps, MixtureEps
from lightning_modules.errors import UserError

DENSITIES = ("moons", "circles", "8gaussians", "checkerboard", "pinwheel", "2spirals")


# -- samplers: (n, rng, noise) -> [n, 2] -----------------------------------------------------------
# a curve maps u in [0, 1] and a branch flag to points on the noiseless curve
def _moons_curve(u: np.ndarray, which: np.ndarray) -> np.ndarray:
    theta = math.pi * u
    upper = np.stack([np.cos(theta), np.sin(theta)], 1)
    lower = np.stack([1 - np.cos(theta), 0.5 - np.sin(theta)], 1)
    return np.where(which[:, None], lower, upper)


def moons(n: int, rng: np.random.Generator, noise: float) -> np.ndarray:
    return _moons_curve(rng.random(n), rng.random(n) < 0.5) + noise * rng.standard_normal((n, 2))


def _circles_curve(u: np.ndarray, which: np.ndarray) -> np.ndarray:
    theta = 2 * math.pi * u
    radius = np.where(which, 0.5, 1.0)
    return radius[:, None] * np.stack([np.cos(theta), np.sin(theta)], 1)


def circles(n: int, rng: np.random.Generator, noise: float) -> np.ndarray:
    return _circles_curve(rng.random(n), rng.random(n) < 0.5) + noise * rng.standard_normal((n, 2))


def gaussian_centres(radius: float = 2.0) -> np.ndarray:
    angle = np.arange(8) * math.pi / 4
    return radius * np.stack([np.cos(angle), np.sin(angle)], 1)


def eight_gaussians(n: int, rng: np.random.Generator, noise: float) -> np.ndarray:
    return gaussian_centres()[rng.integers(0, 8, n)] + noise * rng.standard_normal((n, 2))


def checkerboard_cells() -> np.ndarray:
    """Lower-left corners [8, 2] of the filled unit squares of the 4 x 4 board on [-2, 2]²."""
    return np.array([(i, j) for i in range(-2, 2) for j in range(-2, 2) if (i + j) % 2 == 0])


def checkerboard(n: int, rng: np.random.Generator, noise: float = 0.0) -> np.ndarray:
    """Uniform on the filled squares of a 4 x 4 board on [-2, 2]² (``floor x + floor y`` even)."""
    cells = checkerboard_cells()
    pick = cells[rng.integers(0, len(cells), n)]
    return pick + rng.random((n, 2))


PINWHEEL = {"arms": 5, "radial_std": 0.3, "rate": 0.25}


def pinwheel(n: int, rng: np.random.Generator, noise: float) -> np.ndarray:
    """Arms ``f ~ N((1, 0), diag(radial², noise²))`` rotated by ``2πl/arms + rate·exp(f_0)``."""
    arm = rng.integers(0, PINWHEEL["arms"], n)
    f = rng.standard_normal((n, 2)) * [PINWHEEL["radial_std"], noise] + [1.0, 0.0]
    angle = 2 * math.pi * arm / PINWHEEL["arms"] + PINWHEEL["rate"] * np.exp(f[:, 0])
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([c * f[:, 0] - s * f[:, 1], s * f[:, 0] + c * f[:, 1]], 1)


def _spirals_curve(u: np.ndarray, which: np.ndarray) -> np.ndarray:
    theta = np.sqrt(u) * 3 * math.pi
    point = theta[:, None] * np.stack([np.cos(theta), np.sin(theta)], 1) / math.pi
    return np.where(which[:, None], -point, point)


def two_spirals(n: int, rng: np.random.Generator, noise: float) -> np.ndarray:
    return _spirals_curve(rng.random(n), rng.random(n) < 0.5) + noise * rng.standard_normal((n, 2))


SAMPLERS = {
    "moons": moons,
    "circles": circles,
    "8gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "pinwheel": pinwheel,
    "2spirals": two_spirals,
}


# -- structure metrics: samples [N, 2] in data coordinates -> dict --------------------------------
def _dense_curve(curve, n: int = 4000) -> np.ndarray:
    u = np.linspace(0, 1, n)
    return np.concatenate([curve(u, np.zeros(n, bool)), curve(u, np.ones(n, bool))])


def eight_gaussians_modes(x: np.ndarray, noise: float) -> dict:
    d = np.linalg.norm(x[:, None, :] - gaussian_centres()[None], axis=-1)  # [N, 8]
    nearest, close = d.argmin(1), d.min(1) <= 3 * noise
    counts = np.bincount(nearest[close], minlength=8)
    return {"mode_share": float(close.mean()), "mode_counts": counts.tolist()}


def checkerboard_modes(x: np.ndarray, noise: float = 0.0) -> dict:
    inside = (np.abs(x) <= 2).all(1)
    even = (np.floor(x[:, 0]) + np.floor(x[:, 1])) % 2 == 0
    return {"mode_share": float((inside & even).mean())}


def pinwheel_modes(x: np.ndarray, noise: float, iterations: int = 30) -> dict:
    """Invert each arm's warp (``f = R(-angle(f_0)) x``) and test ``|whitened f| <= 3``."""
    best = np.full(len(x), np.inf)
    for arm in range(PINWHEEL["arms"]):
        f0 = np.linalg.norm(x, axis=1)
        for _ in range(iterations):
            angle = 2 * math.pi * arm / PINWHEEL["arms"] + PINWHEEL["rate"] * np.exp(
                np.clip(f0, -5, 5)
            )
            c, s = np.cos(angle), np.sin(angle)
            f0, f1 = c * x[:, 0] + s * x[:, 1], -s * x[:, 0] + c * x[:, 1]
        z = np.hypot((f0 - 1) / PINWHEEL["radial_std"], f1 / noise)
        best = np.minimum(best, z)
    return {"mode_share": float((best <= 3).mean())}


def structure_metric(density: str, x: np.ndarray, noise: float, band: float = 3.0) -> dict:
    """The density's structure metric (module docstring) of samples ``x`` in data coordinates."""
    x = np.asarray(x, dtype=np.float64)
    if density == "8gaussians":
        return eight_gaussians_modes(x, noise)
    if density == "checkerboard":
        return checkerboard_modes(x)
    if density == "pinwheel":
        return pinwheel_modes(x, noise)
    curves = {"moons": _moons_curve, "circles": _circles_curve, "2spirals": _spirals_curve}
    curve = _dense_curve(curves[density])
    return {"mode_share": curve_band_share(x, curve, band * noise)}


class ToyDensityDataModule(VectorDataModule):
    """One of :data:`DENSITIES`: ``num_samples`` training and ``num_reference`` held-out points.

    Args:
        density: the density's name.
        noise: its noise scale (std of the Gaussian blur, of the 8 modes, of a pinwheel arm's
            width; unused by checkerboard).
        band: the structure metric's curve band in noise stds (moons, circles, 2spirals).
    """

    def __init__(
        self,
        density: str = "moons",
        noise: float = 0.05,
        num_samples: int = 10000,
        num_reference: int = 2000,
        band: float = 3.0,
        batch_size: int = 256,
        seed: int = 0,
    ):
        super().__init__(batch_size=batch_size, seed=seed)
        if density not in SAMPLERS:
            raise UserError(f"dataset.density={density!r}: use one of {', '.join(DENSITIES)}")
        if noise <= 0 and density != "checkerboard":
            raise UserError(f"dataset.noise={noise}: {density} needs a positive noise scale")
        self.density, self.noise, self.band = density, float(noise), float(band)
        self.num_samples, self.num_reference = int(num_samples), int(num_reference)

    def setup(self, stage: str | None = None) -> None:
        if self.train_x is not None:
            return
        draw = SAMPLERS[self.density]

        def sample(n, seed):
            return draw(n, np.random.default_rng(seed), self.noise)

        # the reference sample has its own seed: independent of the training sample
        self._standardise(
            sample(self.num_samples, self.seed), sample(self.num_reference, self.seed + 10_000)
        )

    def structure_metric(self, x_data: torch.Tensor) -> dict:
        return structure_metric(self.density, x_data.cpu().numpy(), self.noise, self.band)

    def exact_eps(self, alpha_bar: torch.Tensor, per_curve: int = 600):
        """The density's exact noise predictor in the standardised coordinates (module doc)."""
        self.setup()
        return exact_eps(self.density, self.noise, self.shift, self.scale, alpha_bar, per_curve)


def exact_eps(density: str, noise: float, shift, scale: float, alpha_bar, per_curve: int = 600):
    """ε* of ``density`` in coordinates ``(x - shift) / scale`` (module docstring)."""
    shift, scale = torch.as_tensor(shift, dtype=torch.float64), float(scale)

    def std(points) -> torch.Tensor:
        return (torch.as_tensor(points, dtype=torch.float64) - shift) / scale

    if density == "checkerboard":
        corners = torch.as_tensor(checkerboard_cells(), dtype=torch.float64)
        bounds = torch.stack([corners, corners + 1], dim=2)  # [8, coordinate, lo/hi]
        return BoxesEps((bounds - shift[None, :, None]) / scale, alpha_bar)
    if density == "8gaussians":
        return MixtureEps(std(gaussian_centres()), noise / scale, alpha_bar)
    if density == "pinwheel":
        arms, q = PINWHEEL["arms"], (torch.arange(per_curve, dtype=torch.float64) + 0.5) / per_curve
        f0 = (1.0 + PINWHEEL["radial_std"] * torch.special.ndtri(q)).repeat(arms).numpy()
        arm = np.repeat(np.arange(arms), per_curve)
        angle = 2 * math.pi * arm / arms + PINWHEEL["rate"] * np.exp(f0)
        centres = f0[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1)
        across = np.stack([-np.sin(angle), np.cos(angle)], 1)  # R(angle) (0, 1)
        return MixtureEps(std(centres), noise / scale, alpha_bar, across=torch.as_tensor(across))
    curves = {"moons": _moons_curve, "circles": _circles_curve, "2spirals": _spirals_curve}
    return MixtureEps(std(_dense_curve(curves[density], per_curve)), noise / scale, alpha_bar)
