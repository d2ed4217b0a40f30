"""``eps_net.param=density eps_net.bump=box`` and ``eps_net.init=histogram``: the diffused box
against a numerical convolution, its log-mass in the far tails, the score against autograd, the
histogram start's densities, and the refusals."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.diffusion.oracles import log_normal_mass
from lightning_modules.errors import UserError
from lightning_modules.schema import validate
from tests.test_ftt_density import T, _alpha_bar, _net


def test_log_normal_mass_is_log_of_a_cdf_difference_and_stays_finite_in_the_tails():
    """Against ``log(Φ(hi) - Φ(lo))`` written out where float64 holds it, both sides of 0; in
    the far tails (where that underflows to log 0) against the Mills-ratio asymptote
    ``log φ(hi) - log|hi|`` and finite in float32 too."""
    g = torch.Generator().manual_seed(0)
    lo = 6 * torch.randn(2000, generator=g, dtype=torch.float64)
    hi = lo + torch.rand(2000, generator=g, dtype=torch.float64) * 3 + 1e-3
    ndtr = torch.special.ndtr
    # Φ(hi) - Φ(lo) = Φ(-lo) - Φ(-hi): the form without cancellation on each side of 0
    direct = torch.where(lo > 0, ndtr(-lo) - ndtr(-hi), ndtr(hi) - ndtr(lo)).log()
    ok = direct > -12  # where torch's ndtr still has its digits (at -7.5: 1e-5 relative)
    torch.testing.assert_close(log_normal_mass(hi, lo)[ok], direct[ok], rtol=1e-8, atol=1e-10)
    far = torch.tensor([-40.0, -200.0, -1000.0], dtype=torch.float64)
    mills = -0.5 * far**2 - 0.5 * math.log(2 * math.pi) - far.abs().log()
    torch.testing.assert_close(log_normal_mass(far, far - 5), mills, rtol=1e-3, atol=0.0)
    torch.testing.assert_close(log_normal_mass(-far + 5, -far), mills, rtol=1e-3, atol=0.0)
    single = log_normal_mass(far.float(), far.float() - 5)
    assert torch.isfinite(single).all()


def test_a_diffused_box_is_the_convolution_of_the_box_with_the_noise():
    """``log φ^t`` of each box (plus the dropped ``-log a``) against the convolution of
    ``U[c - h/2, c + h/2]`` with ``x = a y + s ε`` by the trapezoid rule on a fine grid."""
    net = _net(dim=1, rank=1, bumps=4, noise=0.0, bump="box")
    x = torch.linspace(-3, 3, 61, dtype=torch.float64)[:, None]
    ab = _alpha_bar().double()
    for t in (0, 20, T - 1):
        a, s = ab[t].sqrt(), (1 - ab[t]).sqrt()
        log_phi, _ = net._bumps(x, torch.full((61,), t))
        for i in range(4):
            c, h = float(net.centres[0, i].detach()), float(net.log_width[0, i].detach().exp())
            y = torch.linspace(c - h / 2, c + h / 2, 20001, dtype=torch.float64)
            kernel = torch.exp(-0.5 * ((x - a * y[None]) / s) ** 2) / (s * math.sqrt(2 * math.pi))
            numeric = torch.trapezoid(kernel / h, y, dim=1)
            ours = (log_phi[:, 0, i] - a.log()).exp()
            torch.testing.assert_close(ours, numeric, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_box_eps_is_minus_sqrt_one_minus_alpha_bar_times_autograd_of_log_q(dim):
    """The analytic box score inside the contraction against autograd of ``log_density``, boxes
    moved off their cells with unequal widths, inputs inside and far outside, every t."""
    net = _net(dim=dim, bump="box")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        net.centres += 0.3 * torch.randn(net.centres.shape, generator=g, dtype=torch.float64)
        net.log_width += 0.5 * torch.randn(net.log_width.shape, generator=g, dtype=torch.float64)
    x = torch.randn(400, dim, generator=g, dtype=torch.float64) * 3
    t = torch.randint(0, T, (400,), generator=g)
    y = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(net.log_density(y, t).sum(), y)
    ab = _alpha_bar().double()[t][:, None]
    torch.testing.assert_close(net(x, t), -(1 - ab).sqrt() * grad, rtol=1e-7, atol=1e-9)
    far = torch.tensor([[9.0, -9.0, 0.0][:dim]], dtype=torch.float64)
    score = net.score(far, torch.tensor([0]))
    assert score[0, 0] < -1 and (dim == 1 or score[0, 1] > 1)
    # the boxes tile the data's range before they were moved: 10 cells of width 0.4 on [-2, 2]
    fresh = _net(dim=dim, bump="box")
    torch.testing.assert_close(fresh.log_width.exp(), torch.full((dim, 10), 0.4).double())
    torch.testing.assert_close(fresh.centres[0], torch.linspace(-1.8, 1.8, 10).double())


def test_the_histogram_start_with_boxes_is_the_histogram_density():
    """init=histogram, boxes, rank = bumps: at t = 0 (s = 0.01, well inside a 0.4-wide cell)
    the density ratio of two cells' centres is their count ratio (rank 12: the two extra
    components stay at the floor); an empty cell starts ``e^HISTOGRAM_FLOOR`` (and the
    off-diagonal haze) below the fullest."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3000, 2, generator=g, dtype=torch.float64) * 4 - 2
    x = x[(x[:, 0] > 0) | (x[:, 1] > 0)]  # the lower-left quarter left empty
    x[0], x[1] = torch.tensor([-2.0, 2.0]), torch.tensor([2.0, -2.0])  # the range is [-2, 2]²
    net = _net(dim=2, rank=12, bumps=10, noise=0.0, bump="box", train_data=x, init="histogram")
    cells = torch.floor((x + 2) / 0.4).clamp(max=9).long()
    counts = torch.zeros(10, 10, dtype=torch.float64)
    counts.index_put_((cells[:, 0], cells[:, 1]), torch.ones(len(x), dtype=torch.float64), True)
    mid = torch.linspace(-1.8, 1.8, 10, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(mid, mid, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        log_q = net.log_density(grid, torch.zeros(100, dtype=torch.long)).reshape(10, 10)
    full = counts > 0
    expected = counts[full].log() - counts.max().log()
    torch.testing.assert_close(log_q[full] - log_q.max(), expected, rtol=0, atol=2e-3)
    # the floor, plus the first core's off-diagonal e^-12 times the column's mass (10 cells)
    assert (log_q[~full] - log_q.max() < -9).all() and (~full).sum() >= 16
    score = net.score(torch.tensor([[-0.3, -0.3]], dtype=torch.float64), torch.tensor([20]))
    assert (score > 0.5).all(), score  # in the empty quarter's corner: pulled out of it


def test_the_histogram_start_and_the_bump_are_refused_where_they_cannot_apply(compose):
    x = torch.randn(200, 3, dtype=torch.float64)
    with pytest.raises(UserError, match="init=histogram needs 2-D data and eps_net.rank >="):
        _net(dim=3, rank=10, train_data=x, init="histogram")
    with pytest.raises(UserError, match="here D = 2, rank 4, 10 bumps"):
        _net(dim=2, rank=4, train_data=x[:, :2], init="histogram")
    with pytest.raises(UserError, match="eps_net.bump='triangle': use gaussian or box"):
        _net(dim=2, bump="triangle")
    cfg = compose("task=ddpm", "dataset=moons", "eps_net=ftt", "eps_net.init=histogram")
    with pytest.raises(UserError, match="eps_net.init=histogram needs eps_net.param=density"):
        validate(cfg, composed=True)
    density = ("task=ddpm", "eps_net=ftt", "eps_net.param=density", "eps_net.init=histogram")
    for overrides, message in (
        (("dataset=moons", "eps_net.rank=4"), r"rank >= eps_net.num_basis \(16\), got 4"),
        (("dataset=gmm", "eps_net.rank=16"), "needs 2-D data, got dataset.dim=10"),
        (("dataset=tabular", "eps_net.rank=16"), "needs 2-D data, got TabularDataModule"),
    ):
        with pytest.raises(UserError, match=message):
            validate(compose(*density, *overrides), composed=True)
    validate(compose(*density, "dataset=moons", "eps_net.rank=16"), composed=True)
    cfg = compose("task=ddpm", "dataset=moons", "eps_net=ftt", "eps_net.bump=triangle")
    with pytest.raises(UserError, match="eps_net.bump"):
        validate(cfg, composed=True)
