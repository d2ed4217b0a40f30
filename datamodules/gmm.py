"""A Gaussian mixture in D dimensions (``dataset=gmm``): exact scores, known modes and weights.

``p_0 = Σ_k w_k N(μ_k, scale² I_D)`` with ``components`` = K means and weights drawn from the
run's seed:

* means: K points of N(0, I_D) (the best-spread of 32 seeded candidate sets, i.e. the largest
  smallest pairwise distance relative to the largest norm), rescaled so that the smallest
  distance between two means is ``separation`` component stds;
* weights: ``w_k ∝ 1 + u_k``, u_k ~ U(0, 1): unequal (up to 2:1) but none vanishing.

Like every vector dataset it is centred and divided by one scalar std (``scale`` thus only sets
the units of ``samples.npy``; the shape is set by ``separation``, ``dim`` and ``components``).
The training and the held-out reference samples come from independent seeds.

Its exact noise predictor at every t is :class:`~lightning_modules.diffusion.oracles.MixtureEps`
(``exact_eps``). The structure metric assigns each sample to its nearest mean and counts it if it
lies within the radius that holds the same mass as 3σ in one dimension (99.73 %: the χ²_D
quantile, ``3σ`` at D = 1, 5.2σ at D = 10, 6.5σ at D = 20): ``mode_share`` (share within the
radius of some mean), ``component_shares`` (per component, the share of all samples within its
radius) beside ``component_weights``, and ``component_share_gap`` = max_k |share_k - w_k|.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from datamodules.vectors import VectorDataModule
from lightning_modules.diffusion.oracles import MixtureEps
from lightning_modules.errors import UserError

#: the one-dimensional 3σ mass the structure metric's radius holds in every dimension
THREE_SIGMA_MASS = math.erf(3 / math.sqrt(2))


def mixture_parameters(
    dim: int, components: int, separation: float, scale: float, seed: int, candidates: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """``(means [K, D], weights [K])`` of the mixture (module docstring), from ``seed``."""
    rng = np.random.default_rng(seed)
    best, best_spread = None, -1.0
    for _ in range(candidates if components > 1 else 1):
        points = rng.standard_normal((components, dim))
        if components == 1:
            best = points
            break
        d = np.linalg.norm(points[:, None] - points[None], axis=-1)
        spread = d[np.triu_indices(components, 1)].min() / np.linalg.norm(points, axis=1).max()
        if spread > best_spread:
            best, best_spread = points, spread
    if components > 1:
        d = np.linalg.norm(best[:, None] - best[None], axis=-1)[np.triu_indices(components, 1)]
        best = best * (separation * scale / d.min())
    weights = 1 + rng.random(components)
    return best, weights / weights.sum()


def sample_mixture(
    n: int, means: np.ndarray, weights: np.ndarray, scale: float, rng: np.random.Generator
) -> np.ndarray:
    k = rng.choice(len(weights), size=n, p=weights)
    return means[k] + scale * rng.standard_normal((n, means.shape[1]))


def mode_radius(dim: int, std: float) -> float:
    """The radius around a mean holding ``THREE_SIGMA_MASS`` of N(0, std² I_dim)."""
    from scipy.stats import chi2

    return float(std * math.sqrt(chi2.ppf(THREE_SIGMA_MASS, dim)))


def component_structure(x: np.ndarray, means: np.ndarray, weights: np.ndarray, std: float) -> dict:
    """The structure metric (module docstring) of samples ``x`` [N, D] in data coordinates."""
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    d = torch.cdist(x, torch.as_tensor(means, dtype=torch.float64))  # [N, K]
    nearest, dist = d.argmin(1), d.amin(1)
    inside = dist <= mode_radius(means.shape[1], std)
    counts = torch.bincount(nearest[inside], minlength=len(means)).numpy()
    shares = counts / max(len(x), 1)
    return {
        "mode_share": float(inside.double().mean()),
        "mode_counts": counts.tolist(),
        "component_shares": shares.tolist(),
        "component_weights": np.asarray(weights, dtype=np.float64).tolist(),
        "component_share_gap": float(np.abs(shares - weights).max()),
    }


class GaussianMixtureDataModule(VectorDataModule):
    """``num_samples`` training and ``num_reference`` held-out points of the mixture.

    Args:
        dim: the dimension D (>= 1).
        components: the number of components K (>= 1).
        separation: the smallest distance between two means, in component stds (> 0).
        scale: the component std in data units (> 0).
    """

    def __init__(
        self,
        dim: int = 10,
        components: int = 4,
        separation: float = 6.0,
        scale: float = 1.0,
        num_samples: int = 10000,
        num_reference: int = 2000,
        batch_size: int = 256,
        seed: int = 0,
    ):
        super().__init__(batch_size=batch_size, seed=seed)

        def whole(v, low):
            return isinstance(v, int) and not isinstance(v, bool) and v >= low

        def positive(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0

        checks = {
            "dim": (dim, whole(dim, 1), "an integer >= 1"),
            "components": (components, whole(components, 1), "an integer >= 1"),
            "separation": (separation, positive(separation), "a positive number of component stds"),
            "scale": (scale, positive(scale), "a positive component std"),
            "num_samples": (num_samples, whole(num_samples, 2), "an integer >= 2"),
            "num_reference": (num_reference, whole(num_reference, 2), "an integer >= 2"),
        }
        for key, (value, ok, need) in checks.items():
            if not ok:
                raise UserError(f"dataset.{key}={value!r}: use {need}")
        self.dim_, self.components = int(dim), int(components)
        self.separation, self.noise = float(separation), float(scale)
        self.num_samples, self.num_reference = int(num_samples), int(num_reference)
        self.means, self.weights = mixture_parameters(
            self.dim_, self.components, self.separation, self.noise, seed=seed
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_x is not None:
            return

        def sample(n, seed):
            rng = np.random.default_rng(seed)
            return sample_mixture(n, self.means, self.weights, self.noise, rng)

        # the parameters use the seed itself; the two samples their own offsets
        self._standardise(
            sample(self.num_samples, self.seed + 1), sample(self.num_reference, self.seed + 10_000)
        )

    def structure_metric(self, x_data: torch.Tensor) -> dict:
        return component_structure(x_data.cpu().numpy(), self.means, self.weights, self.noise)

    def exact_eps(self, alpha_bar: torch.Tensor) -> MixtureEps:
        """ε*(x_t, t) of the mixture in the standardised coordinates."""
        self.setup()
        means = (torch.as_tensor(self.means) - self.shift.double()) / self.scale
        return MixtureEps(means, self.noise / self.scale, alpha_bar, weights=self.weights)
