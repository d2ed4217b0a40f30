"""DSA: differentiable, generator-driven, faithful ranges, identity, replay and siamese draws."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.condense.dsa import DEFAULT_STRATEGY, DSA, GROUP_DRAWS, DSAAugment, DSAParams
from lightning_modules.errors import UserError
from tests.helpers import assert_close_scaled

N = 4000  # samples for the statistical checks: uniform means are off by < 4 sigma ~ 0.02


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_uniform(values: torch.Tensor, lo: float, hi: float) -> None:
    """Inside [lo, hi], covering it, with the mean and spread of U[lo, hi]."""
    width = hi - lo
    assert values.min() >= lo - 1e-5 and values.max() <= hi + 1e-5
    assert values.min() < lo + 0.02 * width and values.max() > hi - 0.02 * width
    assert abs(values.mean().item() - (lo + hi) / 2) < 0.03 * width
    assert abs(values.std().item() - width / math.sqrt(12)) < 0.03 * width


@pytest.mark.parametrize("group", list(GROUP_DRAWS))
@pytest.mark.parametrize("per_sample", [True, False])
def test_gradients_reach_the_input(group, per_sample):
    dsa = DSA(group)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    params = dsa.draw(3, gen(1), per_sample=per_sample)
    # every op is (piecewise) linear in the pixels for fixed parameters: gradcheck is exact
    assert torch.autograd.gradcheck(lambda t: dsa.apply(t, params), (x,))
    weights = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    (dsa.apply(x, params) * weights).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_full_strategy_is_differentiable_through_a_call():
    x = torch.randn(16, 3, 32, 32, requires_grad=True)
    g = gen(0)
    for _ in range(12):  # several calls: several groups
        DSA(DEFAULT_STRATEGY)(x, g).square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_one_group_per_call_uniformly():
    dsa = DSA(DEFAULT_STRATEGY)
    g = gen(0)
    groups = [dsa.draw(2, g).group for _ in range(3000)]
    names = DEFAULT_STRATEGY.split("_")
    for name in names:
        assert abs(groups.count(name) / len(groups) - 1 / len(names)) < 0.03


def test_brightness_saturation_contrast_ranges():
    g = gen(2)
    out = DSA("brightness")(torch.zeros(N, 3, 2, 2), g)
    assert torch.allclose(out, out[:, :1, :1, :1].expand_as(out))  # one offset per image
    assert_uniform(out[:, 0, 0, 0], -0.5, 0.5)

    # channels 0, 1, 2 have per-pixel mean 1: channel 0 becomes 1 - factor
    x = torch.arange(3.0).view(1, 3, 1, 1).expand(N, 3, 2, 2)
    factor = 1 - DSA("saturation")(x, g)[:, 0, 0, 0]
    assert_uniform(factor, 0.0, 2.0)

    # image mean 0: contrast multiplies by its factor
    x = torch.tensor([-1.0, 1.0]).view(1, 1, 1, 2).expand(N, 3, 2, 2)
    factor = DSA("contrast")(x, g)[:, 0, 0, 1]
    assert_uniform(factor, 0.5, 1.5)


def test_flip_probability_and_crop_shifts():
    g = gen(3)
    ramp = torch.arange(32.0).view(1, 1, 1, 32).expand(N, 1, 2, 32)
    flipped = DSA("flip")(ramp, g)[:, 0, 0, 0] == 31
    assert abs(flipped.float().mean().item() - 0.5) < 0.03

    # pixel values are their own flat index + 1: the shift is where pixel (16, 16) came from
    x = (torch.arange(32 * 32.0) + 1).view(1, 1, 32, 32).expand(N, 1, 32, 32)
    centre = DSA("crop")(x, g)[:, 0, 16, 16].long() - 1
    dy, dx = centre // 32 - 16, centre % 32 - 16
    for shift in (dy, dx):
        counts = torch.bincount(shift + 4, minlength=9)
        assert len(counts) == 9 and shift.min() == -4 and shift.max() == 4  # integers in [-4, 4]
        assert (counts.float() / N - 1 / 9).abs().max() < 0.03
    # zeros are shifted in: an image shifted by k has k zero rows/columns
    shifted = DSA("crop")(torch.ones(200, 1, 32, 32), g)
    assert ((shifted == 0) | (shifted == 1)).all()


def test_cutout_square_statistics():
    g = gen(4)
    holes = DSA("cutout")(torch.ones(N, 1, 32, 32), g)[:, 0] == 0
    rows, cols = holes.any(2), holes.any(1)
    # the hole is a (possibly clipped) rectangle of at most 16 x 16
    assert (holes.sum((1, 2)) == rows.sum(1) * cols.sum(1)).all()
    assert rows.sum(1).max() == 16 and cols.sum(1).max() == 16
    # centre uniform over integers 0..32: expected covered rows per axis, by enumeration
    covered = torch.tensor([min(c + 8, 32) - max(c - 8, 0) for c in range(33)], dtype=torch.float)
    assert abs(rows.sum(1).float().mean() - covered.mean()) < 0.3
    assert abs(holes.sum((1, 2)).float().mean() - covered.mean() ** 2) < 5
    # clipped squares occur on every border
    assert (
        holes[:, 0].any() and holes[:, -1].any() and holes[:, :, 0].any() and holes[:, :, -1].any()
    )


def _ramp(n: int) -> torch.Tensor:
    """x-coordinate of each pixel in [-1, 1] on a 33 px grid (pixel 16 is the centre)."""
    return torch.linspace(-1, 1, 33).view(1, 1, 1, 33).expand(n, 1, 33, 33).contiguous()


def test_scale_factor_ranges():
    g = gen(5)
    # bilinear sampling of a linear ramp is exact: one pixel right of centre reads sx / 16
    out = DSA("scale")(_ramp(N), g)
    sx = out[:, 0, 16, 17] * 16
    assert_uniform(sx, 1 / 1.2, 1.2)
    ramp_y = _ramp(N).transpose(2, 3)
    sy = DSA("scale")(ramp_y, gen(5))[:, 0, 17, 16] * 16
    assert_uniform(sy, 1 / 1.2, 1.2)
    assert torch.corrcoef(torch.stack([sx, sy]))[0, 1].abs() < 0.1  # independent per axis


def test_rotation_angle_range():
    out = DSA("rotate")(_ramp(N), gen(6))[:, 0]
    cos, sin = out[:, 16, 17] * 16, out[:, 17, 16] * 16
    angle = torch.rad2deg(torch.atan2(sin, cos))
    assert_uniform(angle, -15.0, 15.0)


@pytest.mark.parametrize("strategy", ["", "none", None, "NONE"])
def test_empty_strategy_is_identity(strategy):
    x = torch.randn(4, 3, 8, 8)
    g = gen(0)
    state = g.get_state()
    dsa = DSA(strategy)
    assert dsa.is_identity and dsa(x, g) is x
    assert torch.equal(g.get_state(), state)  # draws nothing
    assert dsa.apply(x, dsa.draw(4, g)) is x
    assert DSAAugment("none")(x) is x


def test_same_generator_state_same_output():
    x = torch.randn(8, 3, 32, 32)
    dsa = DSA(DEFAULT_STRATEGY)
    g = gen(7)
    outputs = []
    for _ in range(10):
        state = g.get_state()
        first = dsa(x, g)
        g.set_state(state)
        assert torch.equal(dsa(x, g), first)
        outputs.append(first)
    assert not all(torch.equal(outputs[0], o) for o in outputs[1:])  # the stream moves on
    assert torch.equal(DSA(DEFAULT_STRATEGY)(x, gen(7)), outputs[0])  # same seed, same draw


def test_siamese_draw_is_shared_and_replays_on_a_second_batch():
    dsa = DSA(DEFAULT_STRATEGY)
    g = gen(8)
    a, b = torch.randn(5, 3, 16, 16), torch.randn(7, 3, 16, 16)
    for _ in range(12):
        params = dsa.draw(5, g, per_sample=False)
        # shared parameters: augmenting a batch piecewise equals augmenting it whole
        both = dsa.apply(torch.cat([a, b]), params)
        assert_close_scaled(both, torch.cat([dsa.apply(a, params), dsa.apply(b, params)]), 1e-6)
        # one image repeated gets one augmentation
        rep = dsa.apply(a[:1].expand(4, -1, -1, -1), params)
        assert_close_scaled(rep, rep[:1].expand_as(rep), 1e-6)


def test_per_sample_draw_replays_and_differs_between_samples():
    dsa = DSA("crop")
    g = gen(9)
    x = torch.randn(1, 3, 32, 32).expand(64, -1, -1, -1)
    params = dsa.draw(64, g)
    first, again = dsa.apply(x, params), dsa.apply(x.clone(), params)
    assert torch.equal(first, again)
    assert not torch.allclose(first, first[:1].expand_as(first))  # samples got different shifts
    with pytest.raises(ValueError, match="drawn for 64 samples"):
        dsa.apply(x[:10], params)


def test_params_move_and_are_not_required_on_the_generator_device():
    dsa = DSA("scale")
    params = dsa.draw(4, gen(0), device="cpu").to("cpu")
    assert isinstance(params, DSAParams) and params.size == 4
    if torch.cuda.is_available():  # a CPU generator drives CUDA images
        x = torch.randn(4, 3, 8, 8, device="cuda")
        assert dsa(x, gen(0)).device == x.device


def test_bad_strategy_and_ranges_are_user_errors():
    with pytest.raises(UserError, match="unknown DSA group"):
        DSA("color_blur")
    with pytest.raises(UserError, match="unknown DSA range"):
        DSA(DEFAULT_STRATEGY, angle=3)


def test_ranges_can_be_overridden():
    out = DSA("rotate", rotate=90.0)(_ramp(N), gen(6))[:, 0]
    angle = torch.rad2deg(torch.atan2(out[:, 17, 16], out[:, 16, 17]))
    assert angle.abs().max() > 60


def test_augment_module_owns_and_checkpoints_its_generator():
    x = torch.randn(8, 3, 32, 32)
    aug = DSAAugment(DEFAULT_STRATEGY, seed=3)
    aug(x)
    saved = {k: v for k, v in aug.state_dict().items()}
    expected = aug(x)
    resumed = DSAAugment(DEFAULT_STRATEGY, seed=999)
    resumed.load_state_dict(saved)
    assert torch.equal(resumed(x), expected)
    # usable as ClassifierModule's augment callable
    from lightning_modules.classifier import ClassifierModule
    from lightning_modules.nets import build_classifier

    module = ClassifierModule(
        build_classifier("convnet", depth=1, width=8), num_classes=10, augment=aug
    )
    assert module.augment(x).shape == x.shape
