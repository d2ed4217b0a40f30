"""``dataset=gmm``: seeded parameters, its exact noise predictor against autograd of
``torch.distributions.MixtureSameFamily``, the structure metric, and bad values."""

import math

import numpy as np
import pytest
import torch
from torch import distributions as D

from datamodules.gmm import GaussianMixtureDataModule, component_structure, mode_radius
from lightning_modules.diffusion.schedules import NoiseSchedule, make_betas
from lightning_modules.errors import UserError


def _small(**kw):
    options = {"dim": 5, "components": 3, "num_samples": 600, "num_reference": 300, "seed": 3}
    dm = GaussianMixtureDataModule(**{**options, **kw})
    dm.setup()
    return dm


def test_parameters_are_seeded_and_separated():
    a, b, c = _small(), _small(), _small(seed=4)
    np.testing.assert_array_equal(a.means, b.means)
    torch.testing.assert_close(a.train_x, b.train_x)
    assert not np.allclose(a.means, c.means)
    d = np.linalg.norm(a.means[:, None] - a.means[None], axis=-1)[np.triu_indices(3, 1)]
    assert d.min() == pytest.approx(6.0 * 1.0)  # separation x scale
    assert a.weights.sum() == pytest.approx(1) and a.weights.max() / a.weights.min() <= 2
    assert not torch.equal(a.train_x[:300], a.reference_x)


def test_exact_eps_matches_autograd_of_mixture_same_family():
    """ε* = -sqrt(1 - ᾱ) ∇ log p_t, p_t = Σ w_k N(sqrt(ᾱ) μ_k, (ᾱ σ² + 1 - ᾱ) I), in the
    standardised coordinates, with a different t on every row."""
    dm = _small(scale=0.7)
    schedule = NoiseSchedule(make_betas("linear", 50, 1e-4, 0.2))
    eps = dm.exact_eps(schedule.alpha_bar)
    means = (torch.as_tensor(dm.means) - dm.shift.double()) / dm.scale
    sigma = 0.7 / dm.scale
    g = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(12, 5, generator=g, dtype=torch.float64)
    t = torch.randint(0, 50, (12,), generator=g)
    expected = []
    for i in range(12):
        ab = float(schedule.alpha_bar[t[i]])
        p_t = D.MixtureSameFamily(
            D.Categorical(torch.as_tensor(dm.weights)),
            D.Independent(D.Normal(math.sqrt(ab) * means, math.sqrt(ab * sigma**2 + 1 - ab)), 1),
        )
        y = x[i : i + 1].clone().requires_grad_(True)
        (score,) = torch.autograd.grad(p_t.log_prob(y).sum(), y)
        expected.append(-math.sqrt(1 - ab) * score)
    torch.testing.assert_close(eps(x, t), torch.cat(expected))


def test_structure_metric_of_the_data_and_of_a_collapsed_sample():
    dm = _small(num_reference=3000)
    own = dm.structure_metric(dm.to_data_space(dm.reference_x))
    # a share of 3000 draws moves by ~0.009 (1 sd) around its weight
    assert own["mode_share"] > 0.99 and own["component_share_gap"] < 0.04
    assert sum(own["mode_counts"]) == round(own["mode_share"] * 3000)
    # every sample on component 0: its share is 1, the others 0
    x = dm.means[0] + 0.1 * np.random.default_rng(0).standard_normal((100, 5))
    m = component_structure(x, dm.means, dm.weights, 1.0)
    assert m["component_shares"] == [1.0, 0.0, 0.0]
    assert m["component_share_gap"] == pytest.approx(1 - dm.weights[0])
    # far from every mean: nothing counted
    assert component_structure(x + 100, dm.means, dm.weights, 1.0)["mode_share"] == 0
    assert mode_radius(1, 1.0) == pytest.approx(3.0)  # the 3σ rule in one dimension


def test_exact_chain_samples_the_mixture():
    dm = _small(num_reference=1000)
    schedule = NoiseSchedule(make_betas("linear", 200, 1e-4, 0.1))
    g = torch.Generator().manual_seed(0)
    x, _ = schedule.sample(dm.exact_eps(schedule.alpha_bar), 1000, (5,), g, dtype=torch.float64)
    m = dm.structure_metric(dm.to_data_space(x.float()))
    assert m["mode_share"] > 0.97 and m["component_share_gap"] < 0.05, m


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("dim", 0, "dataset.dim=0"),
        ("components", 2.5, "dataset.components=2.5"),
        ("separation", -1.0, "dataset.separation=-1.0"),
        ("scale", 0, "dataset.scale=0"),
    ],
)
def test_bad_values_are_one_clear_error(key, value, match):
    with pytest.raises(UserError, match=match):
        GaussianMixtureDataModule(**{key: value})
