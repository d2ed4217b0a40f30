"""The exact noise predictors (``lightning_modules/diffusion/oracles.py``, built by the 2-D
suite's datamodules) against direct transcriptions:
``ε* = -sqrt(1 - ᾱ) ∇ log p_t`` with ``p_t`` written out by torch.distributions or by plain
normal-CDF differences, and a short chain with the exact predictor that must keep the modes."""

import math
from functools import partial

import torch
from torch import distributions as D

from benchmarks.toy_oracles import density_data, structure
from lightning_modules.diffusion.oracles import BoxesEps, MixtureEps
from lightning_modules.diffusion.schedules import NoiseSchedule, make_betas


def _autograd_eps(log_p, x: torch.Tensor, ab: float) -> torch.Tensor:
    y = x.clone().requires_grad_(True)
    (score,) = torch.autograd.grad(log_p(y).sum(), y)
    return -math.sqrt(1 - ab) * score


def test_mixture_eps_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    means, sigma = torch.randn(5, 2, generator=g, dtype=torch.float64), 0.3
    angle = torch.rand(5, generator=g, dtype=torch.float64) * math.pi
    across = torch.stack([-angle.sin(), angle.cos()], 1)
    x = 2 * torch.randn(7, 2, generator=g, dtype=torch.float64)
    alpha_bar = torch.tensor([0.999, 0.5, 0.02], dtype=torch.float64)
    for t, ab in enumerate(alpha_bar.tolist()):
        a, s2 = math.sqrt(ab), 1 - ab
        tt = torch.full((7,), t)
        mix = D.Categorical(torch.ones(5, dtype=torch.float64))
        iso = D.MixtureSameFamily(
            mix, D.MultivariateNormal(a * means, (s2 + ab * sigma**2) * torch.eye(2).double())
        )
        cov = s2 * torch.eye(2).double() + ab * sigma**2 * across[:, :, None] * across[:, None, :]
        deg = D.MixtureSameFamily(mix, D.MultivariateNormal(a * means, cov))
        torch.testing.assert_close(
            MixtureEps(means, sigma, alpha_bar)(x, tt), _autograd_eps(iso.log_prob, x, ab)
        )
        torch.testing.assert_close(
            MixtureEps(means, sigma, alpha_bar, across=across)(x, tt),
            _autograd_eps(deg.log_prob, x, ab),
        )


def _boxes_log_p(y, bounds, a, s):
    """log of the sum over boxes of the product over coordinates of Phi differences."""
    lo, hi = bounds[None, :, :, 0], bounds[None, :, :, 1]
    z = y[:, None, :]
    diff = torch.special.ndtr((z - a * lo) / s) - torch.special.ndtr((z - a * hi) / s)
    return diff.prod(2).sum(1).log()


def test_boxes_eps_matches_cdf_formula_and_is_finite_far_out():
    bounds = torch.tensor([[[0.0, 1.0], [0.0, 1.0]], [[-1.0, 0.0], [-1.0, 0.5]]]).double()
    alpha_bar = torch.tensor([0.9999, 0.7, 0.05], dtype=torch.float64)
    x = torch.tensor([[0.5, 0.5], [-0.3, 0.2], [1.4, -0.2], [0.0, 0.0]], dtype=torch.float64)
    eps = BoxesEps(bounds, alpha_bar)
    for t, ab in enumerate(alpha_bar.tolist()[1:], start=1):
        log_p = partial(_boxes_log_p, bounds=bounds, a=math.sqrt(ab), s=math.sqrt(1 - ab))
        torch.testing.assert_close(eps(x, torch.full((4,), t)), _autograd_eps(log_p, x, ab))
    far = eps(torch.tensor([[40.0, -40.0], [0.5, 0.5]]).double(), torch.zeros(2, dtype=torch.long))
    assert torch.isfinite(far).all()
    assert far[0, 0] > 0 and far[0, 1] < 0  # pointing back towards the boxes (eps = -s * score)


def test_exact_chain_keeps_every_8gaussians_mode():
    dm = density_data("8gaussians", seed=0)
    schedule = NoiseSchedule(make_betas("linear", 200, 1e-4, 0.1))
    eps = dm.exact_eps(schedule.alpha_bar)
    g = torch.Generator().manual_seed(0)
    x, _ = schedule.sample(eps, 800, (2,), g, dtype=torch.float64)
    counts = dm.structure_metric(dm.to_data_space(x.float()))["mode_counts"]
    assert structure(dm, x) > 0.97 and min(counts) > 60, counts


def test_each_row_keeps_its_own_noise_level():
    """One call with a different t per row equals the rows evaluated one t at a time."""
    schedule = NoiseSchedule(make_betas("linear", 100, 1e-4, 0.2))
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.tensor([0, 5, 20, 50, 80, 99])
    for name in ("checkerboard", "pinwheel"):
        eps = density_data(name, seed=0).exact_eps(schedule.alpha_bar)
        rows = torch.cat([eps(x[i : i + 1], t[i : i + 1]) for i in range(6)])
        torch.testing.assert_close(eps(x, t), rows)
