"""``eps_net=ftt eps_net.param=density``: the score contraction against autograd of log q, the
rank-K exactness for a Gaussian mixture (measured against ``MixtureEps``), a tiny task run, and
the refused optimisers and skips."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

import train
from lightning_modules.diffusion.oracles import MixtureEps
from lightning_modules.diffusion.schedules import NoiseSchedule, make_betas
from lightning_modules.errors import UserError
from lightning_modules.schema import validate
from lightning_modules.tt.density import DensityTT, build_ftt
from lightning_modules.tt.ftt import FunctionalTT
from lightning_modules.tt.steppers import make_tt_stepper
from tests.conftest import run_train
from tests.test_ddpm_oracle import TINY_GMM

T = 200


def _alpha_bar():
    return NoiseSchedule(make_betas("linear", T, 1e-4, 0.1)).alpha_bar


def _net(dim=3, rank=3, bumps=10, noise=1.0, **kw):
    bounds = (-2 * torch.ones(dim), 2 * torch.ones(dim))
    net = DensityTT(
        data_shape=(dim,), timesteps=T, data_bounds=bounds, num_basis=bumps, rank=rank,
        init_noise=noise, alpha_bar=_alpha_bar(), **kw,
    )  # fmt: skip
    return net.double()


@pytest.mark.parametrize("dim", [1, 2, 3, 7])
def test_eps_is_minus_sqrt_one_minus_alpha_bar_times_autograd_of_log_q(dim):
    """Random positive cores, bumps moved off the grid with unequal widths; inputs inside and
    far outside the bumps' range, every t. ``score`` contracts by a doubling scan, ``log_density``
    by a plain loop over the sites: D = 7 exercises a scan over a non-power of two."""
    net = _net(dim=dim)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        net.centres += 0.3 * torch.randn(net.centres.shape, generator=g, dtype=torch.float64)
        net.log_width += 0.5 * torch.randn(net.log_width.shape, generator=g, dtype=torch.float64)
    x = torch.randn(400, dim, generator=g, dtype=torch.float64) * 3  # reaches |x| ~ 9
    t = torch.randint(0, T, (400,), generator=g)
    y = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(net.log_density(y, t).sum(), y)
    ab = _alpha_bar().double()[t][:, None]
    torch.testing.assert_close(net(x, t), -(1 - ab).sqrt() * grad, rtol=1e-10, atol=1e-10)
    # outside the range the score still pulls back towards the bumps (no clamp, no dead zone)
    far = torch.tensor([[9.0, -9.0, 0.0, 0.0, 0.0, 0.0, 0.0][:dim]], dtype=torch.float64)
    score = net.score(far, torch.tensor([0]))
    assert score[0, 0] < -1 and (dim == 1 or score[0, 1] > 1)


def _mixture_tt(means, weights, sigma, bumps, lo, hi):
    """The rank-K non-negative TT of Σ_k w_k Π_d N(μ_kd, σ²): factor k of coordinate d is
    Σ_i c_i N(c_i, h²) with c_i = N(c_i; μ_kd, σ² - h²) (a discretised convolution)."""
    K, D = means.shape
    net = DensityTT(
        data_shape=(D,), timesteps=T, data_bounds=(lo * torch.ones(D), hi * torch.ones(D)),
        num_basis=bumps, rank=K, init_noise=0.0, alpha_bar=_alpha_bar(),
    ).double()  # fmt: skip
    h = float(net.log_width[0, 0].exp())
    assert sigma > h
    nu2 = sigma**2 - h**2
    with torch.no_grad():
        for d in range(D):
            c = net.centres[d]  # [m]
            log_coef = -((c[None, :] - means[:, d, None]) ** 2) / (2 * nu2)  # [K, m]
            core = torch.full(net.log_cores[d].shape, -math.inf, dtype=torch.float64)
            for k in range(K):
                a = 0 if d == 0 else k
                b = 0 if d == D - 1 else k
                core[a, :, b] = log_coef[k] + (math.log(weights[k]) if d == 0 else 0.0)
            net.log_cores[d].copy_(core)
    return net


@pytest.mark.parametrize("dim", [2, 3])
def test_a_hand_built_rank_k_tt_is_the_mixtures_exact_predictor(dim):
    """The exactness claim, measured: K = 2, σ = 0.5, bumps on [-4, 4]. With 41 bumps
    (h = 0.2) the hand-built rank-2 TT's ε is within 1e-5 of ``MixtureEps`` at every t, on
    points of the diffused mixture and anywhere in [-3.5, 3.5]^D (measured: < 1e-6); with 21
    (h = 0.4, a coarse grid for the N(μ, σ² - h²) weights) within 3e-3 (measured: 1.2e-3).
    Beyond the bumps' range the score is that of the outermost bumps, not the mixture's."""
    g = torch.Generator().manual_seed(1)
    means = torch.tensor([[-1.2, 0.8, 0.3], [1.0, -0.9, -0.5]], dtype=torch.float64)[:, :dim]
    weights, sigma = [0.35, 0.65], 0.5
    ab = _alpha_bar()
    exact = MixtureEps(means, sigma, ab, weights=torch.tensor(weights))
    t = torch.randint(0, T, (3000,), generator=g)
    k = (torch.rand(3000, generator=g) < weights[1]).long()
    x0 = means[k] + sigma * torch.randn(3000, dim, generator=g, dtype=torch.float64)
    a = ab.double()[t][:, None].sqrt()
    x_t = a * x0 + (1 - a * a).sqrt() * torch.randn(3000, dim, generator=g, dtype=torch.float64)
    box = 3.5 * (2 * torch.rand(3000, dim, generator=g, dtype=torch.float64) - 1)
    for bumps, tol in ((41, 1e-5), (21, 3e-3)):
        net = _mixture_tt(means, weights, sigma, bumps=bumps, lo=-4.0, hi=4.0)
        # cores, plus a centre and a width per coordinate and bump
        assert net.num_parameters() == bumps * (2 + 4 * (dim - 2) + 2) + 2 * dim * bumps
        with torch.no_grad():
            for x in (x_t, box):
                err = float((net(x, t) - exact(x, t)).abs().max())
                assert err < tol, (bumps, err)
    # coarse bumps (h > σ) cannot hold a component this narrow: the construction needs h < σ
    with pytest.raises(AssertionError):
        _mixture_tt(means, weights, sigma, bumps=9, lo=-4.0, hi=4.0)


def test_the_factory_builds_either_form_and_refuses_bad_values():
    options = {"data_shape": (2,), "timesteps": T, "alpha_bar": _alpha_bar()}
    assert isinstance(build_ftt(**options), FunctionalTT)
    net = build_ftt(param="density", rank=2, num_basis=8, **options)
    assert isinstance(net, DensityTT) and net.ranks == [1, 2, 1]
    assert net.num_parameters() == 2 * 8 * 2 + 2 * 2 * 8 and net.flops_per_sample() > 0
    with pytest.raises(UserError, match="eps_net.param='score': use eps or density"):
        build_ftt(param="score", **options)
    with pytest.raises(UserError, match="eps_net.skip=pca does not apply"):
        build_ftt(param="density", skip="pca", **options)
    with pytest.raises(UserError, match="needs the schedule's alpha_bar"):
        build_ftt(param="density", data_shape=(2,), timesteps=T)
    with pytest.raises(UserError, match="ddpm.optimizer=als does not apply"):
        make_tt_stepper("als", net)
    with pytest.raises(UserError, match="eps_net.init=linear does not apply"):
        build_ftt(param="density", init="linear", **options)


def test_init_follows_the_data_marginals_or_seeds_components_at_k_means_clusters():
    """init=identity: each coordinate's factor is its bump-smoothed histogram on the grid;
    init=auto: rank component k is bump k of every coordinate, centred on the k-th k-means
    cluster of the training points with that cluster's std, its share in the first core."""
    g = torch.Generator().manual_seed(0)
    corner = torch.tensor([[1.5, 1.5], [1.5, -1.5], [-1.5, 1.5], [-1.5, -1.5]])
    which = torch.tensor([0] * 10 + [1] * 20 + [2] * 30 + [3] * 40)
    x = corner[which] + 0.1 * torch.randn(100, 2, generator=g)
    net = _net(dim=2, rank=2, bumps=13, noise=0.0, train_data=x, init="identity")
    q = net.log_cores[0][0, :, 0].exp()
    centres = net.centres[0]
    assert q[centres.sub(-1.5).abs().argmin()] > 20 * q[centres.abs().argmin()]
    torch.testing.assert_close(net.log_cores[0][0, :, 0], net.log_cores[0][0, :, 1])
    seeded = _net(dim=2, rank=4, bumps=6, noise=0.0, train_data=x, init="auto")
    found = seeded.centres[:, :4].T.detach()  # [k, D]: the clusters' means
    nearest = torch.cdist(found, corner.double()).argmin(1)
    assert sorted(nearest.tolist()) == [0, 1, 2, 3], found  # one component on each cluster
    assert torch.cdist(found, corner.double()).min(1).values.max() < 0.1
    widths = seeded.log_width[:, :4].exp()
    assert ((widths > 0.05) & (widths < 0.2)).all(), widths
    share = seeded.log_cores[0][0, torch.arange(4), torch.arange(4)].exp()
    expected = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)[nearest]
    torch.testing.assert_close(share, expected, rtol=1e-6, atol=1e-6)
    # everything off the component's own bump and bond starts e^-8 smaller
    off = seeded.log_cores[1][0, 1:, 0]
    assert (off < -7).all()


@pytest.mark.parametrize("optimizer", ["als", "dmrg", "riemannian"])
def test_core_solvers_are_refused_by_the_schema(compose, optimizer):
    cfg = compose("task=ddpm", "dataset=gmm", "eps_net=ftt", "eps_net.param=density",
                  f"ddpm.optimizer={optimizer}")  # fmt: skip
    with pytest.raises(UserError) as e:
        validate(cfg, composed=True)
    assert f"ddpm.optimizer={optimizer} does not apply to eps_net.param=density" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_skip_is_refused_by_the_schema(compose):
    cfg = compose("task=ddpm", "dataset=gmm", "eps_net=ftt", "eps_net.param=density",
                  "eps_net.skip=pca")  # fmt: skip
    with pytest.raises(UserError, match="eps_net.skip=pca does not apply"):
        validate(cfg, composed=True)


def test_train_py_refuses_als_in_one_line_exit_2(tmp_path):
    runs = tmp_path / "runs"
    r = run_train(
        "task=ddpm", "dataset=gmm", "eps_net=ftt", "eps_net.param=density", "ddpm.optimizer=als",
        f"paths.runs_dir={runs}", "logger=csv", cwd=tmp_path, timeout=120,
    )  # fmt: skip
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(lines) == 1 and "ddpm.optimizer=als does not apply" in lines[0], r.stderr[-2000:]
    assert not runs.exists() and os.listdir(tmp_path) == []


def test_a_tiny_gmm_run_writes_the_oracle_keys(compose):
    overrides = [o for o in TINY_GMM if not o.startswith("eps_net")]
    cfg = compose(*overrides, "eps_net=ftt", "eps_net.param=density", "eps_net.rank=3",
                  "eps_net.num_basis=12")  # fmt: skip
    summary = train.run(cfg)
    written = json.loads((Path(cfg.paths.output_dir) / "summary.json").read_text())
    for key in ("sw_ratio", "sinkhorn_ratio", "mmd_ratio", "mode_share_oracle",
                "component_shares", "component_share_gap", "component_shares_oracle"):  # fmt: skip
        assert key in written and key in summary, key
    cores, bumps = 12 * (3 + 9 + 9 + 3), 2 * 4 * 12  # a centre and a width per bump
    assert written["params"] == cores + bumps and written["bond_ranks"] == [3, 3, 3]
    assert math.isfinite(written["final_loss"]) and written["eps_net"] == "ftt"
