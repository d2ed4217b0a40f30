"""The FTT on image-shaped data: output core, Gaussian skip, core learning-rate scale."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lightning_modules.diffusion.schedules import NoiseSchedule
from lightning_modules.diffusion.skip import GaussianSkip, fit_skip
from lightning_modules.diffusion.steppers import make_stepper
from lightning_modules.errors import UserError
from lightning_modules.tt.density import DENSITY_KEYS
from lightning_modules.tt.ftt import FunctionalTT
from lightning_modules.tt.steppers import make_tt_stepper
from tests.helpers import assert_close_scaled

CONF = Path(__file__).resolve().parents[1] / "conf" / "eps_net" / "ftt.yaml"


def _tiny_images(n=16, seed=0):
    """``n`` smooth 3x4x4 images in [-1, 1]: a colour per image plus a vertical ramp."""
    g = torch.Generator().manual_seed(seed)
    colour = torch.rand(n, 3, 1, 1, generator=g) * 2 - 1
    ramp = torch.linspace(-0.5, 0.5, 4)[None, None, :, None] * torch.rand(n, 1, 1, 1, generator=g)
    return (colour + ramp).clamp(-1, 1).expand(n, 3, 4, 4).contiguous()


def _ftt(x, schedule, **overrides):
    """The FTT with the defaults of conf/eps_net/ftt.yaml and an output core."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONF))
    cfg.pop("_target_")
    assert cfg.pop("param") == "eps"  # the ε form is the default and the class built here
    for key in DENSITY_KEYS:  # the density form's own keys (the factory drops them too)
        cfg.pop(key)
    cfg.update(time_basis=None, seed=0, output="core", **overrides)
    return FunctionalTT(
        data_shape=tuple(x.shape[1:]),
        timesteps=schedule.timesteps,
        data_bounds=(x.amin(0), x.amax(0)),
        alpha_bar=schedule.alpha_bar,
        train_data=x,
        **cfg,
    )


def _eval_loss(net, x, schedule, seed=9, repeats=128):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x_t, t, eps = schedule.training_triple(x.repeat(repeats, 1, 1, 1), g)
        return float(((net(x_t, t) - eps) ** 2).mean())


def test_output_core_ftt_learns_tiny_images_and_beats_its_skip():
    # before the skip: the loss stuck at ~0.98 (eps_hat ~ 0); a low-rank output core cannot copy
    # x_t, the high-noise optimum. The diagonal skip leaves the TT the correlations to learn
    torch.manual_seed(0)
    x, schedule = _tiny_images(), NoiseSchedule.from_config("linear", 1000)
    net = _ftt(x, schedule, rank=4, num_basis=8, skip="gaussian")
    skip_only = _eval_loss(net, x, schedule)  # the gain starts at 0: the skip alone
    stepper = make_stepper("adam", net, lr=1e-2, weight_decay=0.0, grad_clip=1.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        stepper.step(lambda: schedule.training_triple(x, g), lambda v: v)
    trained = _eval_loss(net, x, schedule)
    assert trained < 0.5
    assert trained < 0.95 * skip_only, (trained, skip_only)  # the TT adds to the skip


def test_output_core_outputs_span_at_most_rank_squared_directions():
    # y(x) = L(x)ᵀ G_out R(x): every output lies in the span of the r_L·r_R slices of G_out,
    # so without a skip the loss is >= 1 - r²/D for any input (ε is isotropic)
    net = FunctionalTT(data_shape=(3, 4, 4), output="core", rank=2, num_basis=6, init_noise=0.5)
    g = torch.Generator().manual_seed(0)
    y = net(torch.randn(200, 3, 4, 4, generator=g), torch.randint(0, 1000, (200,), generator=g))
    sv = torch.linalg.svdvals(y.detach().reshape(200, -1).double())
    assert sv[3] > 1e-3 * sv[0] and sv[4] < 1e-5 * sv[0]  # 4 = 2 x 2 directions, not 48


def test_gaussian_skip_is_the_best_predictor_for_gaussian_data():
    g = torch.Generator().manual_seed(0)
    mean, std = torch.tensor([0.5, -0.2, 0.0]), torch.tensor([0.3, 1.0, 0.05])
    x0 = mean + std * torch.randn(20000, 3, generator=g)
    schedule = NoiseSchedule.from_config("linear", 1000)
    skip = GaussianSkip(mean, std**2, schedule.alpha_bar)
    x_t, t, eps = schedule.training_triple(x0, g)
    pred, c_out = skip(x_t, t)
    loss = float(((pred - eps) ** 2).mean())
    assert loss == pytest.approx(skip.expected_loss(), rel=0.05)
    for factor in (0.8, 1.2):  # scaling the prediction away from the optimum costs loss
        assert float(((factor * pred - eps) ** 2).mean()) > loss
    # c_out is the residual's standard deviation: the normalised residual has unit variance
    assert float((((eps - pred) / c_out.clamp(min=1e-3)) ** 2).mean()) == pytest.approx(1, rel=0.1)


def test_pca_skip_with_all_components_is_the_exact_gaussian_predictor():
    g = torch.Generator().manual_seed(0)
    mix = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.3, 0.0], [0.2, -0.5, 0.05]])
    x0 = (torch.randn(400, 3, generator=g) @ mix.T + torch.tensor([0.3, -0.1, 0.0])).double()
    schedule = NoiseSchedule.from_config("linear", 1000)
    x_t, t, _ = schedule.training_triple(x0.float(), g)
    mu, cov = x0.mean(0), torch.cov(x0.T)
    ab = schedule.alpha_bar[t][:, None, None]
    inv = torch.linalg.inv(ab * cov + (1 - ab) * torch.eye(3))  # [N, 3, 3]
    z = x_t.double() - ab[:, 0].sqrt() * mu
    expected = (1 - ab[:, 0]).sqrt() * (inv @ z[..., None])[..., 0]
    c_out = (1 - (1 - ab[:, 0]) * torch.diagonal(inv, dim1=1, dim2=2)).sqrt()
    for k in (3, 2):  # k = 2: the third direction's variance becomes the isotropic floor
        skip = fit_skip("pca", x0, schedule.alpha_bar, components=k)
        pred, out = skip(x_t, t)
        if k == 3:
            assert_close_scaled(pred.double(), expected, 2e-3)
            assert_close_scaled(out.double(), c_out, 2e-3)
        assert skip.components.shape == (3, k) and float(skip.floor) >= 0
    diag = fit_skip("gaussian", x0, schedule.alpha_bar, components=0)
    assert_close_scaled(diag.var.double(), x0.var(0), 1e-5)


def test_skip_starts_as_the_skip_and_auto_follows_the_output():
    x, schedule = _tiny_images(), NoiseSchedule.from_config("linear", 100)
    net = _ftt(x, schedule, rank=2, num_basis=6)
    assert net.skip_mode == "pca" and float(net.out_gain.detach()) == 0.0
    g = torch.Generator().manual_seed(0)
    x_t, t, _ = schedule.training_triple(x, g)
    expected, _ = net.skip(x_t.reshape(len(x), -1), t)
    torch.testing.assert_close(net(x_t, t).reshape(len(x), -1), expected)
    # 16 images span 15 directions; the skip's cost is counted in the forward FLOPs
    assert net.skip.components.shape == (48, 15)
    assert net.flops_per_sample() - net._skip_flops() > 0 and net._skip_flops() == 6 * 48 * 15 + 576
    vec = FunctionalTT(data_shape=(2,), timesteps=100, skip="auto")
    assert vec.skip_mode == "none" and vec.skip is None
    with pytest.raises(UserError, match="eps_net.skip"):
        FunctionalTT(data_shape=(2,), timesteps=100, skip="linear")
    with pytest.raises(UserError, match="train_data"):
        FunctionalTT(data_shape=(2,), timesteps=100, skip="gaussian")


def test_tt_optimisers_fit_the_skips_normalised_residual():
    x, schedule = _tiny_images(), NoiseSchedule.from_config("linear", 100)
    net = _ftt(x, schedule, rank=2, num_basis=6)
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 100, (len(x),), generator=g)
    eps = torch.randn(x.shape, generator=g)
    ab = schedule.alpha_bar[t][:, None, None, None]
    x_t = ab.sqrt() * x + (1 - ab).sqrt() * eps
    stepper = make_tt_stepper("als", net, ridge=1e-6, sweeps=1, samples=16, batch=16, fixed=True)
    assert float(net.out_gain) == 1.0  # the gain is fixed at 1; the TT carries the residual
    skip, c_out = net.skip(x_t.reshape(len(x), -1), t)
    target = net.tt_target(x_t, t, eps).reshape(len(x), -1)
    torch.testing.assert_close(target, (eps.reshape(len(x), -1) - skip) / c_out.clamp(min=1e-4))

    def tt_out():
        return net.to_data_layout(net.evaluate(x_t, t)).float()

    skip_alone = float((target**2).mean())  # TT = 0
    stepper.step(lambda: (x_t, t, eps))
    assert float(((target - tt_out()) ** 2).mean()) < 0.5 * skip_alone
    # sampling sees ε̂ = skip + c_out · TT: the residual fitted above, mapped back
    torch.testing.assert_close(net(x_t, t).reshape(len(x), -1), skip + c_out * tt_out())


def test_riemannian_with_a_skip_starts_at_the_skip_and_a_set_gain_is_folded_into_the_tt():
    """The identity init outputs 1: as the skip's normalised residual that is a loss of 2 for
    Riemannian steps to walk back from. It starts near the skip alone instead, once per model."""
    x, schedule = _tiny_images(), NoiseSchedule.from_config("linear", 100)
    net = _ftt(x, schedule, rank=2, num_basis=6)
    g = torch.Generator().manual_seed(1)
    x_t, t, eps = schedule.training_triple(x, g)
    options = {"lr": 0.03, "armijo": True, "shrink": 0.5, "max_backtracks": 20}
    before = net.evaluate(x_t, t).detach()
    stepper = make_tt_stepper("riemannian", net, **options)
    after = net.evaluate(x_t, t).detach()
    assert float(net.out_gain) == 1.0 and before.abs().min() > 0.5
    torch.testing.assert_close(after, before * 1e-3)  # near the skip alone (TT = 0)
    skip_alone = float((net.tt_target(x_t, t, eps) ** 2).mean())  # the loss at TT = 0
    stats = stepper.step(lambda: (x_t, t, eps))
    assert stats["loss"] == pytest.approx(skip_alone, rel=1e-2)
    assert stats["loss_after"] < stats["loss"]
    # a resumed or rebuilt stepper changes nothing; a learnt gain is folded into the TT
    kept = net(x_t, t).detach()
    make_tt_stepper("riemannian", net, **options)
    torch.testing.assert_close(net(x_t, t).detach(), kept)
    with torch.no_grad():
        net.out_gain.fill_(0.3)  # as Adam might leave it
    learnt = net(x_t, t).detach()
    make_tt_stepper("als", net, ridge=1e-6, sweeps=1, samples=16, batch=16, fixed=True)
    assert float(net.out_gain) == 1.0
    torch.testing.assert_close(net(x_t, t).detach(), learnt)  # the same function


def test_core_lr_scale_sets_the_cores_learning_rate():
    x, schedule = _tiny_images(), NoiseSchedule.from_config("linear", 100)
    net = _ftt(x, schedule, rank=2, num_basis=6, core_lr_scale=0.01)
    stepper = make_stepper("adam", net, lr=0.5, weight_decay=0.0, grad_clip=None)
    lrs = {len(group["params"]): group["lr"] for group in stepper.optimizer.param_groups}
    assert lrs == {net.num_cores: pytest.approx(0.005), 1: 0.5}
    auto = _ftt(x, schedule, rank=2, num_basis=6, core_lr_scale="auto")
    assert auto.core_lr_scale == pytest.approx(auto.num_cores**-0.5)
    vec = FunctionalTT(data_shape=(2,), timesteps=100, core_lr_scale="auto")
    assert vec.core_lr_scale == 1.0
    for bad in (0.0, "fast"):
        with pytest.raises(UserError, match="core_lr_scale"):
            _ftt(x, schedule, rank=2, num_basis=6, core_lr_scale=bad)
