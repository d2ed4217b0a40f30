"""DDPM maths: schedules, forward process, sampler, steppers, metrics and pictures."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.diffusion import metrics, plots
from lightning_modules.diffusion.schedules import NoiseSchedule, make_betas, respaced_indices
from lightning_modules.diffusion.steppers import GradientStepper, make_stepper
from lightning_modules.errors import UserError
from lightning_modules.nets.eps_mlp import ResNetMLP


# -- schedules ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_alpha_bar_decreases_to_near_zero(kind):
    s = NoiseSchedule(make_betas(kind, 1000))
    ab = s.alpha_bar
    assert len(ab) == 1000 and s.timesteps == 1000
    assert bool((ab[1:] < ab[:-1]).all()) and 0 < ab[-1] < 1e-4 and ab[0] < 1
    assert bool(((s.betas > 0) & (s.betas < 1)).all())


def test_default_linear_schedule_is_ho_et_al():
    betas = make_betas()
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    # ᾱ_T of the published schedule is about 4e-5
    assert NoiseSchedule(betas).alpha_bar[-1].item() == pytest.approx(4.0e-5, rel=0.1)


def test_short_toy_schedule_is_not_in_noise():
    # the pitfall the defaults avoid: T = 50 linear leaves ᾱ_T far from zero
    assert NoiseSchedule(make_betas("linear", 50)).alpha_bar[-1] > 0.5


@pytest.mark.parametrize(
    "kwargs", [dict(schedule="quadratic"), dict(timesteps=0), dict(beta_start=0.1, beta_end=0.01)]
)
def test_bad_schedule_is_user_error(kwargs):
    with pytest.raises(UserError):
        make_betas(**kwargs)


def test_forward_process_moments_by_statistics():
    s = NoiseSchedule(make_betas("linear", 1000))
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.full((n, 2), 1.5)
    x0[:, 1] = -2.0
    for k in (0, 300, 999):
        t = torch.full((n,), k)
        x_t = s.q_sample(x0, t, torch.randn(x0.shape, generator=g))
        ab = s.alpha_bar[k].item()
        mean, var = math.sqrt(ab) * x0[0], torch.full((2,), 1 - ab)
        se = torch.sqrt(var / n)
        assert torch.all((x_t.mean(0) - mean).abs() < 5 * se + 1e-7), (k, x_t.mean(0), mean)
        # variance of a sample variance: 2 σ⁴ / n
        assert torch.all((x_t.var(0) - var).abs() < 5 * var * math.sqrt(2 / n)), (
            k,
            x_t.var(0),
            var,
        )


def test_training_triple_covers_all_steps_and_matches_q_sample():
    s = NoiseSchedule(make_betas("linear", 20))
    x0 = torch.randn(4000, 3)
    x_t, t, eps = s.training_triple(x0, torch.Generator().manual_seed(1))
    assert t.dtype == torch.long and t.min() == 0 and t.max() == 19 and len(t.unique()) == 20
    torch.testing.assert_close(x_t, s.q_sample(x0, t, eps))
    assert abs(eps.std().item() - 1) < 0.05


def test_respaced_indices():
    assert respaced_indices(1000, None) == list(range(1000))
    idx = respaced_indices(1000, 10)
    assert len(idx) == 10 and idx[0] == 0 and idx[-1] == 999 and idx == sorted(idx)
    with pytest.raises(UserError):
        respaced_indices(1000, 0)


def test_full_chain_coefficients_are_ho_et_al():
    s = NoiseSchedule(make_betas("linear", 100))
    c = s.sampling_coefficients(None, "posterior")
    ab, ab_prev = s.alpha_bar, torch.cat([torch.ones(1, dtype=torch.float64), s.alpha_bar[:-1]])
    beta_tilde = s.betas * (1 - ab_prev) / (1 - ab)
    torch.testing.assert_close(c["sigma"] ** 2, beta_tilde)
    # posterior mean in eps form: (x_t - β_t / sqrt(1 - ᾱ_t) ε) / sqrt(α_t)
    x_t, eps = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    k = 40
    x0_hat = (x_t - c["sqrt_1m_ab"][k] * eps) / c["sqrt_ab"][k]
    mean = c["c_x0"][k] * x0_hat + c["c_xt"][k] * x_t
    expect = (x_t - s.betas[k] / (1 - ab[k]).sqrt() * eps) / s.alphas[k].sqrt()
    torch.testing.assert_close(mean, expect)
    assert c["sigma"][0] == 0


class GaussianOptimalEps:
    """The exact E[ε | x_t] for data x_0 ~ N(m, s² I): a sampler fed it must return N(m, s²)."""

    def __init__(self, schedule: NoiseSchedule, m: float, s: float):
        self.ab = schedule.alpha_bar.float()
        self.m, self.s = m, s

    def __call__(self, x_t, t):
        ab = self.ab[t].reshape(-1, *([1] * (x_t.ndim - 1)))
        return (1 - ab).sqrt() * (x_t - ab.sqrt() * self.m) / (ab * self.s**2 + 1 - ab)


@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_ancestral_sampling_recovers_gaussian_data(variance):
    s = NoiseSchedule(make_betas("linear", 1000))
    eps_net = GaussianOptimalEps(s, m=1.5, s=0.3)
    x, _ = s.sample(eps_net, 4000, (2,), torch.Generator().manual_seed(0), variance=variance)
    assert x.shape == (4000, 2)
    # sampling error, in units of the data's spread s = 0.3 (the mean's standard error is s/63)
    assert ((x.mean(0) - 1.5).abs() < 0.1 * 0.3).all(), x.mean(0)
    assert ((x.std(0) - 0.3).abs() < 0.05 * 0.3).all(), x.std(0)


def test_respaced_chain_keeps_the_mean_and_brackets_the_spread():
    """With 50 of 1000 steps the mean stays exact; the posterior variance β̃ ignores the x̂_0
    uncertainty of long jumps (too narrow), β overshoots (too wide): the known trade-off."""
    s = NoiseSchedule(make_betas("linear", 1000))
    eps_net = GaussianOptimalEps(s, m=1.5, s=0.3)
    stds = {}
    for variance in ("posterior", "beta"):
        x, _ = s.sample(
            eps_net, 4000, (2,), torch.Generator().manual_seed(0), steps=50, variance=variance
        )
        assert ((x.mean(0) - 1.5).abs() < 0.1 * 0.3).all(), x.mean(0)  # 0.1 x the spread
        stds[variance] = x.std().item()
    assert 0.2 < stds["posterior"] < 0.29 and 0.305 < stds["beta"] < 0.36, stds


def test_sampling_shapes_snapshots_batches_and_clip():
    s = NoiseSchedule(make_betas("linear", 30))
    net = ResNetMLP((3, 4, 4), timesteps=30, width=16, depth=1)
    g = torch.Generator().manual_seed(0)
    x, snaps = s.sample(
        net, 7, (3, 4, 4), g, steps=10, batch_size=3, snapshots=4, snapshot_samples=2, clip=1.0
    )
    assert x.shape == (7, 3, 4, 4) and torch.isfinite(x).all()
    assert [sn.step for sn in snaps][0] == 30 and snaps[-1].step == 0 and len(snaps) == 4
    assert all(sn.x.shape == (2, 3, 4, 4) for sn in snaps)
    # same generator seed → same samples
    x2, _ = s.sample(
        net, 7, (3, 4, 4), torch.Generator().manual_seed(0), steps=10, batch_size=3, clip=1.0
    )
    torch.testing.assert_close(x, x2)


def test_clipping_x0_to_a_box_keeps_samples_of_a_bad_net_inside():
    s = NoiseSchedule(make_betas("linear", 200))

    def zero_eps(x, t):  # a useless net: x̂_0 = x_t / sqrt(ᾱ_t) grows without bound
        return torch.zeros_like(x)

    g = torch.Generator().manual_seed(0)
    free, _ = s.sample(zero_eps, 500, (2,), g)
    lo, hi = torch.tensor([-1.0, -2.0]), torch.tensor([3.0, 0.5])
    boxed, _ = s.sample(zero_eps, 500, (2,), torch.Generator().manual_seed(0), clip=(lo, hi))
    assert free.abs().max() > 5
    # the last reverse step returns x̂_0 itself, so the samples lie in the box
    assert bool(((boxed >= lo) & (boxed <= hi)).all())


# -- steppers ----------------------------------------------------------------------------------
def _fixed_loss(schedule, net, x0, seed=123):
    with torch.no_grad():
        return schedule.loss(net, x0, torch.Generator().manual_seed(seed)).item()


@pytest.mark.parametrize("name,lr", [("adam", 3e-3), ("sgd", 0.05)])
def test_a_few_steps_lower_the_loss(name, lr):
    torch.manual_seed(0)
    s = NoiseSchedule(make_betas("linear", 100))
    x0 = torch.randn(64, 2) * 0.5 + torch.tensor([2.0, -1.0])
    net = ResNetMLP((2,), timesteps=100, width=32, depth=2)
    options = {"lr": lr, "grad_clip": 1.0, "weight_decay": 0.0}
    stepper = make_stepper(name, net, **options, **({"momentum": 0.9} if name == "sgd" else {}))
    g = torch.Generator().manual_seed(0)
    before = _fixed_loss(s, net, x0)
    for _ in range(60):
        out = stepper.step(lambda: s.training_triple(x0, g), lambda x: x)
        assert math.isfinite(out["loss"]) and "grad_norm" in out
    assert _fixed_loss(s, net, x0) < 0.8 * before


def test_gradient_stepper_averages_over_ranks():
    """With reduce_sum simulating 2 ranks of identical gradients, the step is the 1-rank step."""
    s = NoiseSchedule(make_betas("linear", 10))
    x0 = torch.randn(16, 2)
    nets = [ResNetMLP((2,), timesteps=10, width=8, depth=1) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    triple = s.training_triple(x0, torch.Generator().manual_seed(0))
    for net, reduce_sum in zip(nets, (lambda x: x, lambda x: 2 * x)):
        GradientStepper(net, torch.optim.SGD(net.parameters(), lr=0.1)).step(
            lambda: triple, reduce_sum
        )
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b)


def test_make_stepper_rejects_unknown_names_and_tt_steppers_on_other_nets():
    net = ResNetMLP((2,), width=8, depth=1)
    with pytest.raises(UserError, match="ddpm.optimizer"):
        make_stepper("lbfgs", net, lr=1e-3)
    with pytest.raises(UserError, match="takes the options"):
        make_stepper("adam", net, lr=1e-3)  # every option is given: defaults live in conf/
    pytest.importorskip("lightning_modules.tt.steppers")
    blocks = {
        "als": {"ridge": 1e-6, "sweeps": 2, "samples": 64, "batch": 32, "fixed": False},
        "riemannian": {"lr": 0.5, "armijo": True, "shrink": 0.5, "max_backtracks": 20},
    }
    for name, options in blocks.items():
        with pytest.raises(UserError):
            make_stepper(name, net, **options)


# -- metrics -----------------------------------------------------------------------------------
def test_metrics_zero_for_identical_positive_for_shifted():
    x = torch.randn(500, 3, generator=torch.Generator().manual_seed(0))
    # zero up to rounding relative to the numbers involved: coordinates of size x.std() ~ 1
    # (the sliced distance), kernel values of at most 1 (the MMD's cancelling sums)
    assert abs(metrics.sliced_wasserstein(x, x)) <= 1e-12 * float(x.std())
    assert abs(metrics.mmd_rbf(x, x)) <= 1e-6 * 1.0
    shifted = x + torch.tensor([1.0, 0.0, 0.0])
    assert metrics.sliced_wasserstein(x, shifted) > 0.3
    assert metrics.mmd_rbf(x, shifted) > 0.1


def test_sliced_wasserstein_of_a_translation():
    # W2 along θ of a translation v is |θ·v|; its mean square over the sphere is |v|² / D
    x = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0))
    sw = metrics.sliced_wasserstein(x, x + torch.tensor([2.0, 0.0]), num_projections=4000, seed=1)
    assert sw == pytest.approx(2.0 / math.sqrt(2), rel=0.03)
    # seeded: the same projections every call
    y = torch.randn(1000, 2, generator=torch.Generator().manual_seed(1))
    assert metrics.sliced_wasserstein(x, y, seed=3) == metrics.sliced_wasserstein(x, y, seed=3)


def test_metrics_reject_bad_shapes():
    with pytest.raises(ValueError):
        metrics.sliced_wasserstein(torch.zeros(5, 2), torch.zeros(6, 2))
    with pytest.raises(ValueError):
        metrics.mmd_rbf(torch.zeros(5, 2), torch.zeros(5, 3))


def test_vector_sample_metrics_floor_below_a_bad_model():
    g = torch.Generator().manual_seed(0)
    real, reference = torch.randn(3000, 2, generator=g), torch.randn(800, 2, generator=g)
    good = torch.randn(1000, 2, generator=g)
    bad = good * 1.8
    floors = metrics.floor_bands(reference, real, 800, sinkhorn_samples=200, sinkhorn_reg=0.1)
    m_good = metrics.vector_sample_metrics(good, reference, real, floors=floors)
    m_bad = metrics.vector_sample_metrics(bad, reference, real, floors=floors)
    assert m_good["metric_samples"] == 800 and m_good["sw_floor"] == m_bad["sw_floor"]
    assert m_bad["sw"] > 3 * m_bad["sw_floor"] and m_bad["mmd"] > 3 * m_bad["mmd_floor"]
    assert m_good["sw"] < 2.5 * m_good["sw_floor"]
    assert any("floor" in line for line in metrics.metrics_lines(m_good))


# -- pictures ----------------------------------------------------------------------------------
def test_pictures_are_written(tmp_path):
    from lightning_modules.diffusion.schedules import Snapshot

    g = torch.Generator().manual_seed(0)
    for dim in (2, 3):
        x = torch.randn(100, dim, generator=g)
        assert plots.scatter_samples(x, x + 1, tmp_path / f"s{dim}.png").stat().st_size > 1000
    assert len(plots.coordinate_pairs(3)) == 3 and plots.coordinate_pairs(2) == [(0, 1)]
    snaps = [Snapshot(step=10, x=torch.randn(50, 2)), Snapshot(step=0, x=torch.randn(50, 2))]
    plots.reverse_process_scatter(snaps, tmp_path / "rev.png", data=torch.randn(50, 2))
    plots.loss_curve(range(100), torch.rand(100).tolist(), tmp_path / "loss.png")
    imgs = torch.rand(10, 3, 8, 8)
    plots.image_grid(imgs, tmp_path / "grid.png", nrow=4)
    assert plots.image_grid_array(imgs, nrow=4).shape == (3 * 10 + 2, 4 * 10 + 2, 3)
    plots.reverse_process_images(
        [Snapshot(5, imgs[:3] * 2 - 1), Snapshot(0, imgs[3:6] * 2 - 1)], tmp_path / "rev_img.png"
    )
    for name in ("rev.png", "loss.png", "grid.png", "rev_img.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob(".*tmp"))
