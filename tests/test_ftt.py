"""Functional tensor train noise model: identity init, shapes, interfaces, supports, errors."""

import math

import pytest
import torch
from hydra.utils import instantiate

from lightning_modules.errors import UserError
from lightning_modules.tt.ftt import FunctionalTT
from lightning_modules.tt.interfaces import contract_core
from tests.helpers import assert_close_scaled, solver_options


def _batch(shape, n=7, T=100, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g) * scale, torch.randint(0, T, (n,), generator=g)


@pytest.mark.parametrize("time", ["additive", "core"])
@pytest.mark.parametrize("output", ["per_coordinate", "core"])
@pytest.mark.parametrize("dim", [2, 3])
def test_identity_init_outputs_one_everywhere(dim, time, output):
    net = FunctionalTT(
        data_shape=(dim,),
        timesteps=100,
        time=time,
        output=output,
        num_basis=6,
        rank=4,
        init_noise=0.0,
    )
    # inside the support, at its edges and far outside it (clamped): splines sum to one
    x, t = _batch((dim,), n=50, scale=3.0)
    x[0] = 100.0
    y = net(x, t)
    assert y.shape == (50, dim)
    assert_close_scaled(y, torch.ones_like(y), 1e-6)
    # with the default noise the output stays O(1)
    noisy = FunctionalTT(
        data_shape=(dim,), timesteps=100, time=time, output=output, num_basis=6, rank=4
    )
    assert (noisy(x, t) - 1).abs().max() < 0.2


@pytest.mark.parametrize(
    "dim,time,output,cores",
    [
        (2, "additive", "per_coordinate", ["x", "x"]),
        (2, "core", "per_coordinate", ["x", "t", "x"]),
        (3, "core", "core", ["x", "x", "t", "out", "x"]),
        (3, "additive", "core", ["x", "x", "out", "x"]),
    ],
)
def test_core_layout_and_parameter_count(dim, time, output, cores):
    m, r = 6, 3
    net = FunctionalTT(data_shape=(dim,), time=time, output=output, num_basis=m, rank=r)
    assert [kind for kind, _ in net.sites] == cores
    P = dim if output == "per_coordinate" else 1
    sizes = [{"x": m, "t": m, "out": dim}[c] for c in cores]
    ranks = [1] + [r] * (len(cores) - 1) + [1]
    assert [tuple(c.shape) for c in net.cores] == [
        (P, ranks[k], sizes[k], ranks[k + 1]) for k in range(len(cores))
    ]
    assert net.num_parameters() == sum(
        P * ranks[k] * sizes[k] * ranks[k + 1] for k in range(len(cores))
    )
    assert len(net.tt(0)) == len(cores)


def test_cifar_shapes_with_an_output_core():
    net = FunctionalTT(
        data_shape=(3, 32, 32), timesteps=1000, output="core", num_basis=4, rank=2, init_noise=0.0
    )
    assert net.num_cores == 3 * 32 * 32 + 2
    x, t = _batch((3, 32, 32), n=2, T=1000)
    y = net(x, t)
    assert y.shape == (2, 3, 32, 32)
    # float32 rounding of 3072 partitions of unity in a row
    assert_close_scaled(y, torch.ones_like(y), 1e-3)


def test_per_coordinate_on_images_is_a_user_error_with_the_size():
    with pytest.raises(UserError, match=r"3072 TTs .*use eps_net.output=core"):
        FunctionalTT(data_shape=(3, 32, 32), output="per_coordinate")


@pytest.mark.parametrize(
    "time,output", [("additive", "per_coordinate"), ("core", "per_coordinate"), ("core", "core")]
)
def test_output_is_linear_in_each_core_through_the_interfaces(time, output):
    net = FunctionalTT(
        data_shape=(3,), timesteps=50, time=time, output=output, num_basis=5, rank=3, init="random"
    ).double()
    x, t = _batch((3,), n=11, T=50)
    y = net.evaluate(x.double(), t)
    for k in range(net.num_cores):
        iface = net.interfaces(k, x.double(), t)
        torch.testing.assert_close(contract_core(net.cores[k], iface), y)
        # linear in core k: another core k gives the other model's output
        other = torch.randn_like(net.cores[k])
        swapped = [other if i == k else c for i, c in enumerate(net.cores)]
        torch.testing.assert_close(
            contract_core(other, iface), net.evaluate(x.double(), t, cores=swapped)
        )
    assert net.to_data_layout(y).shape == (11, 3)
    torch.testing.assert_close(net.from_data_layout(net.to_data_layout(y)), y)


def test_support_covers_the_forward_process():
    lo, hi = torch.tensor([-2.0, -0.5]), torch.tensor([1.0, 3.0])
    net = FunctionalTT(data_shape=(2,), data_bounds=(lo, hi), margin=4.0, time="core")
    torch.testing.assert_close(net.x_basis.upper, torch.sqrt(hi.double() ** 2 + 16))
    torch.testing.assert_close(net.x_basis.lower, -torch.sqrt(lo.double() ** 2 + 16))
    # x_t = a x0 + b eps with a^2 + b^2 = 1, |eps| <= 4 never leaves it
    a = torch.linspace(0, 1, 101, dtype=torch.float64)[:, None]
    b = torch.sqrt(1 - a**2)
    for x0, e in [(hi, 4.0), (lo, -4.0)]:
        xt = a * x0.double() + b * e
        assert (xt <= net.x_basis.upper + 1e-9).all() and (xt >= net.x_basis.lower - 1e-9).all()
    additive = FunctionalTT(data_shape=(2,), data_bounds=(lo, hi), margin=4.0, time="additive")
    torch.testing.assert_close(additive.x_basis.upper, net.x_basis.upper + 1)


def test_gradient_descent_fits_a_function():
    torch.manual_seed(0)
    net = FunctionalTT(data_shape=(2,), timesteps=10, num_basis=8, rank=4)
    x, t = _batch((2,), n=256, T=10)
    target = torch.stack([torch.sin(x[:, 0]) * x[:, 1], t / 10 - x[:, 0]], dim=1)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    first = None
    for _ in range(150):
        loss = ((net(x, t) - target) ** 2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * first


def test_rank_larger_than_the_modes_allow():
    with pytest.raises(
        UserError, match=r"rank=9 is larger than the TT allows at bond 1 \(at most 8"
    ):
        FunctionalTT(data_shape=(2,), num_basis=8, rank=9)


def test_flops_per_sample_counts_the_sparse_forward():
    net = FunctionalTT(data_shape=(2,), time="core", num_basis=16, rank=8)
    flops = net.flops_per_sample()
    # three sites per TT, two TTs; each site forms an r x r' matrix from 3 slices and applies it
    per_tt = sum(2 * 3 * r0 * r1 + 2 * r0 * r1 for r0, r1 in [(1, 8), (8, 8), (8, 1)])
    assert per_tt * 2 <= flops <= per_tt * 2 + 200
    assert math.isfinite(flops)


def test_config_instantiates(compose):
    cfg = compose("eps_net=ftt")
    assert cfg.eps_net.name == "ftt"
    net = instantiate(
        cfg.eps_net, data_shape=(2,), timesteps=100, data_bounds=(-torch.ones(2), torch.ones(2))
    )
    assert (
        isinstance(net, FunctionalTT)
        and net.time_mode == "core"
        and net.num_basis == cfg.eps_net.time_basis
    )


@pytest.mark.parametrize("time", ["additive", "core"])
def test_linear_init_predicts_the_clamped_input(time):
    from lightning_modules.tt.ftt import sinusoidal_encoding

    net = FunctionalTT(data_shape=(2,), timesteps=100, time=time, init="linear", init_noise=0.0)
    x, t = _batch((2,), n=200, scale=3.0)
    u = x.double() + (sinusoidal_encoding(t, 2) if time == "additive" else 0)
    expected = net.x_basis.clamp(u).float()
    assert_close_scaled(net(x, t), expected, 1e-5)
    assert (net.x_basis.clamp(u) != u).any()  # some inputs were outside the support
    with pytest.raises(UserError, match="init=linear needs eps_net.output=per_coordinate"):
        FunctionalTT(data_shape=(3,), output="core", init="linear")


@pytest.mark.parametrize(
    "shape,expected",
    [((2,), "per_coordinate"), ((8,), "per_coordinate"), ((9,), "core"), ((3, 4, 4), "core")],
)
def test_output_auto_keeps_per_coordinate_trains_for_low_dimensions_only(shape, expected):
    net = FunctionalTT(data_shape=shape, output="auto", num_basis=4, rank=2)
    assert net.output_mode == expected


def test_als_auto_samples_gives_64_equations_per_unknown():
    from lightning_modules.tt.als import ALS

    per_coordinate = FunctionalTT(data_shape=(2,), output="per_coordinate", num_basis=16, rank=8)
    auto = solver_options("als", samples="auto")
    assert ALS(per_coordinate, **auto).samples == 65536  # the 2-D default it replaces
    core = FunctionalTT(data_shape=(32,), output="core", num_basis=16, rank=8)
    assert ALS(core, **auto).samples == 2048  # 32 equations per triple
    small = FunctionalTT(data_shape=(32,), output="core", num_basis=4, rank=2)
    assert ALS(small, **auto).samples == 1024  # the floor that covers the time steps
    with pytest.raises(UserError, match="als.samples"):
        ALS(core, **solver_options("als", samples="many"))
