"""The toy-density suite: datasets with their structure metrics, floor bands, Sinkhorn, DDIM."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from datamodules.toy_densities import DENSITIES, ToyDensityDataModule, structure_metric
from lightning_modules.diffusion import metrics
from lightning_modules.diffusion.schedules import NoiseSchedule, make_betas
from lightning_modules.errors import UserError

NOISE = {
    "moons": 0.05,
    "circles": 0.04,
    "8gaussians": 0.1,
    "checkerboard": 0.0,
    "pinwheel": 0.05,
    "2spirals": 0.1,
}


@pytest.mark.parametrize("density", DENSITIES)
def test_density_standardised_with_independent_reference_and_own_structure(density):
    dm = ToyDensityDataModule(
        density=density, noise=NOISE[density], num_samples=3000, num_reference=1000
    )
    dm.setup()
    assert dm.train_x.shape == (3000, 2) and dm.reference_x.shape == (1000, 2)
    assert dm.train_x.mean(0).abs().max() < 1e-5 and abs(float(dm.train_x.std()) - 1) < 0.02
    assert not torch.equal(dm.reference_x[:10], dm.train_x[:10])
    own = dm.structure_metric(dm.to_data_space(dm.reference_x))["mode_share"]
    assert own > 0.97
    # blurring the real sample by a fraction of its spread must be seen by the structure metric
    blurred = dm.reference_x + 0.15 * torch.randn(
        1000, 2, generator=torch.Generator().manual_seed(0)
    )
    assert dm.structure_metric(dm.to_data_space(blurred))["mode_share"] < own - 0.1


def test_eight_gaussians_counts_missing_modes():
    dm = ToyDensityDataModule(density="8gaussians", noise=0.1, num_samples=2000)
    dm.setup()
    x = dm.to_data_space(dm.reference_x).numpy()
    angle = np.arctan2(x[:, 1], x[:, 0])
    collapsed = x[np.abs(angle) < 0.3]  # only the mode at angle 0
    m = structure_metric("8gaussians", collapsed, 0.1)
    assert m["mode_share"] > 0.95
    assert m["mode_counts"][0] == round(m["mode_share"] * len(collapsed))
    assert sum(m["mode_counts"][1:]) == 0


def test_checkerboard_wrong_squares_score_zero():
    assert (
        structure_metric("checkerboard", np.array([[0.5, 0.5], [-0.5, -0.5]]), 0)["mode_share"]
        == 1.0
    )
    assert (
        structure_metric("checkerboard", np.array([[1.5, 0.5], [2.5, 0.5]]), 0)["mode_share"] == 0.0
    )


def test_unknown_density_is_a_user_error():
    with pytest.raises(UserError, match="dataset.density"):
        ToyDensityDataModule(density="banana")


# -- floor bands and Sinkhorn ------------------------------------------------------------------
def test_floor_band_holds_real_data_and_rejects_a_shift():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(4000, 2, generator=g)
    reference = torch.randn(500, 2, generator=g)
    good = [torch.randn(500, 2, generator=g) for _ in range(3)]
    bad = [d + 1.0 for d in good]
    m_good = metrics.vector_sample_metrics(
        good, reference, real, floor_pairs=10, sinkhorn_samples=200, sinkhorn_reg=0.1
    )
    m_bad = metrics.vector_sample_metrics(
        bad, reference, real, floor_pairs=10, sinkhorn_samples=200, sinkhorn_reg=0.1
    )
    for key in ("sw", "mmd", "sinkhorn"):
        assert m_good[f"{key}_floor_lo"] <= m_good[f"{key}_floor"] <= m_good[f"{key}_floor_hi"]
        assert len(m_good[f"{key}_draws"]) == 3
        assert m_good[f"{key}_floor_hi"] == m_bad[f"{key}_floor_hi"]  # same real pairs
        assert not m_bad[f"{key}_in_band"]
        assert m_bad[key] > 3 * m_bad[f"{key}_floor_hi"]
    assert m_good["sw_in_band"] and m_good["mmd_in_band"]
    assert any("floor band" in line for line in metrics.metrics_lines(m_good))


def test_sinkhorn_divergence_zero_on_itself_and_grows_with_a_shift():
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(1))
    # zero up to rounding relative to the transport costs it cancels (squared distances ~ 2 var)
    assert abs(metrics.sinkhorn_divergence(x, x)) <= 1e-8 * float(2 * x.var(0).sum())
    near, far = (metrics.sinkhorn_divergence(x, x + s) for s in (0.2, 1.0))
    assert 0 < near < far
    # entropic OT with squared cost: a shift by v costs ~ |v|² once debiased
    assert far == pytest.approx(2.0, rel=0.1)


# -- DDIM --------------------------------------------------------------------------------------
class GaussianEps:
    """The exact ε of standard-normal data scaled by ``s``: ε*(x_t, t) for x_0 ~ N(0, s² I)."""

    def __init__(self, schedule, s):
        self.ab, self.s = schedule.alpha_bar, s

    def __call__(self, x, t):
        ab = self.ab[t].to(x.dtype)[:, None]
        var = ab * self.s**2 + 1 - ab
        return x * (1 - ab).sqrt() / var


@pytest.mark.parametrize("steps", [None, 20])
def test_ddim_eta_one_is_the_ancestral_chain_and_eta_zero_is_deterministic(steps):
    s = NoiseSchedule(make_betas("linear", 200))
    net = GaussianEps(s, 0.5)

    def run(**kw):
        g = torch.Generator().manual_seed(3)
        return s.sample(net, 400, (2,), g, steps=steps, dtype=torch.float64, **kw)[0]

    torch.testing.assert_close(run(sampler="ddim", eta=1.0), run(sampler="ancestral"))
    a, b = run(sampler="ddim", eta=0.0), run(sampler="ddim", eta=0.0)
    torch.testing.assert_close(a, b)
    # η = 0 draws no noise after x_T: a different generator state later changes nothing
    g = torch.Generator().manual_seed(3)
    x_only = s.sample(net, 400, (2,), g, steps=steps, sampler="ddim", dtype=torch.float64)[0]
    torch.testing.assert_close(x_only, a)


def test_ddim_samples_the_right_gaussian_and_improves_with_steps():
    """With the exact ε of N(0, 0.5² I) data; DDIM's big first steps shrink a little."""
    s = NoiseSchedule(make_betas("linear", 1000))
    stds = {}
    for steps in (50, 1000):
        g = torch.Generator().manual_seed(0)
        x, _ = s.sample(
            GaussianEps(s, 0.5), 4000, (2,), g, steps=steps, sampler="ddim", dtype=torch.float64
        )
        stds[steps] = float(x.std())
    assert math.isclose(stds[50], 0.5, rel_tol=0.1)
    assert math.isclose(stds[1000], 0.5, rel_tol=0.03)
    assert abs(stds[1000] - 0.5) < abs(stds[50] - 0.5)


def test_sampler_name_and_eta_are_checked():
    s = NoiseSchedule(make_betas("linear", 10))
    with pytest.raises(UserError, match="ddpm.sampler"):
        s.sample(GaussianEps(s, 1.0), 4, (2,), sampler="euler")
    with pytest.raises(UserError, match="ddpm.eta"):
        s.sample(GaussianEps(s, 1.0), 4, (2,), sampler="ddim", eta=-1)


# -- task=ddpm on the suite (in process, tiny) -------------------------------------------------
TINY_SUITE = [
    "task=ddpm",
    "dataset.num_samples=600",
    "dataset.num_reference=200",
    "ddpm.timesteps=100",
    "ddpm.batch_size=64",
    "ddpm.sw_projections=200",
    "ddpm.floor_pairs=10",
    "ddpm.sinkhorn_samples=150",
    "ddpm.snapshots=0",
    "logger=csv",
    "trainer.enable_progress_bar=false",
]
SMALL_SWEEPS = ["samples=2048", "batch=1024", "sweeps=1", "steps=1"]


def test_checkerboard_ftt_dmrg_writes_bands_sinkhorn_mode_share_and_ranks(compose):
    import train

    cfg = compose(
        *TINY_SUITE,
        "dataset=checkerboard",
        "eps_net=ftt",
        "eps_net.num_basis=6",
        "eps_net.rank=4",
        "ddpm.optimizer=dmrg",
        "dmrg.max_rank=3",
        *[f"dmrg.{o}" for o in SMALL_SWEEPS],
        "ddpm.sampler=ddim",
        "ddpm.sample_steps=20",
    )
    summary = train.run(cfg)
    for key in ("sw", "sw_floor_lo", "sw_floor_hi", "sinkhorn", "sinkhorn_floor_hi", "mode_share"):
        assert isinstance(summary[key], float), key
    assert summary["sw_floor_lo"] <= summary["sw_floor"] <= summary["sw_floor_hi"]
    assert len(summary["sw_draws"]) == 3 and 0 <= summary["mode_share"] <= 1
    assert summary["mode_share_data"] == 1.0  # the reference is exactly on the board
    assert summary["bond_ranks"] == [3, 3] and summary["optimizer"] == "dmrg"
    assert summary["sampler"] == "ddim" and summary["sample_steps"] == 20


@pytest.mark.parametrize("basis", ["legendre", "fourier"])
def test_ftt_with_global_basis_and_ddim_runs_end_to_end(compose, basis):
    import train

    cfg = compose(
        *TINY_SUITE,
        "dataset=8gaussians",
        "eps_net=ftt",
        f"eps_net.basis={basis}",
        "eps_net.num_basis=5",
        "eps_net.rank=3",
        "ddpm.optimizer=als",
        *[f"als.{o}" for o in SMALL_SWEEPS],
        "ddpm.sampler=ddim",
        "ddpm.sample_steps=10",
    )
    summary = train.run(cfg)
    assert summary["basis"] == basis and len(summary["mode_counts"]) == 8
    assert math.isfinite(summary["sw"]) and math.isfinite(summary["sinkhorn"])


@pytest.mark.parametrize("net", ["resnet", "unet"])
def test_ddim_50_steps_runs_for_the_network_noise_models(compose, tiny_data, net):
    """``ddpm.sampler=ddim`` works for every noise model (FTT: the tests above)."""
    import train

    if net == "resnet":
        args = [
            *TINY_SUITE,
            "dataset=moons",
            "eps_net=resnet",
            "eps_net.width=16",
            "eps_net.depth=1",
            "ddpm.epochs=1",
        ]
    else:
        args = [
            "task=ddpm",
            "dataset=cifar10",
            f"dataset.data_dir={tiny_data}",
            "dataset.download=false",
            "ddpm.timesteps=100",
            "ddpm.steps=2",
            "ddpm.batch_size=8",
            "ddpm.num_samples=4",
            "logger=csv",
            "trainer.enable_progress_bar=false",
            "eps_net=unet",
            "eps_net.ch=8",
            "eps_net.ch_mult=[1,2]",
            "eps_net.attn_resolutions=[16]",
        ]
    summary = train.run(compose(*args, "ddpm.sampler=ddim", "ddpm.sample_steps=50"))
    assert summary["sampler"] == "ddim" and summary["sample_steps"] == 50
    assert summary["sample_s"] > 0
