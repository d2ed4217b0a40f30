"""ALS and Riemannian optimisers of the FTT: recovery, monotonicity, rank, projection, errors."""

import pytest
import torch

from lightning_modules.errors import UserError
from lightning_modules.tt.algebra import (
    bond_singular_values,
    full_tensor,
    gram,
    is_left_orthogonal,
    is_right_orthogonal,
    orthogonalize,
    round_tt,
    tt_inner,
)
from lightning_modules.tt.als import ALS
from lightning_modules.tt.flops import (
    adam_step_flops,
    als_sweep_flops,
    ftt_forward_flops,
    riemannian_step_flops,
)
from lightning_modules.tt.ftt import FunctionalTT
from lightning_modules.tt.riemannian import (
    RiemannianGD,
    mixed_gradients,
    project_gradients,
    tangent_dense,
    tangent_to_cores,
)
from lightning_modules.tt.steppers import make_tt_stepper
from tests.helpers import solver_options

LAYOUTS = [(2, "additive", "per_coordinate"), (2, "core", "per_coordinate"), (3, "core", "core")]


def _problem(dim, time, output, *, n=512, seed=0, dtype=torch.float64, rank=3, num_basis=6):
    """A random FTT (the truth), a model of the same rank and a draw() of its exact outputs."""
    kw = dict(
        data_shape=(dim,), timesteps=50, time=time, output=output, num_basis=num_basis, rank=rank
    )
    truth = FunctionalTT(init="random", seed=seed + 1, **kw).double()
    model = FunctionalTT(seed=seed, **kw).to(dtype)
    g = torch.Generator().manual_seed(seed)

    def draw():
        x = 2 * torch.randn(n, dim, generator=g, dtype=torch.float64)
        t = torch.randint(0, 50, (n,), generator=g)
        with torch.no_grad():
            return x.to(dtype), t, truth(x, t).to(dtype)

    return truth, model, draw


def _relative_error(model, truth, seed=123):
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(2000, truth.dim, generator=g, dtype=torch.float64)
    t = torch.randint(0, 50, (2000,), generator=g)
    with torch.no_grad():
        y = truth(x, t)
        return float((model(x.to(model.cores[0].dtype), t).double() - y).norm() / y.norm())


# ------------------------------------------------------------------------------------------ ALS
@pytest.mark.parametrize("dim,time,output", LAYOUTS)
def test_als_recovers_an_ftt_of_the_same_rank(dim, time, output):
    truth, model, draw = _problem(dim, time, output)
    als = ALS(
        model, **solver_options("als", ridge=0.0, sweeps=8, samples=2048, batch=512, fixed=True)
    )
    assert _relative_error(model, truth) > 0.1
    stats = als.step(draw)
    assert _relative_error(model, truth) < 1e-6
    assert stats["loss"] < 1e-12 and stats["sweeps"] == 8


def test_als_in_float32_reaches_float32_accuracy():
    truth, model, draw = _problem(2, "core", "per_coordinate", dtype=torch.float32)
    ALS(
        model, **solver_options("als", ridge=1e-12, sweeps=6, samples=2048, batch=512, fixed=True)
    ).step(draw)
    assert model.cores[0].dtype == torch.float32
    assert _relative_error(model, truth) < 1e-5


def test_als_chunks_only_bound_memory():
    _, model, draw = _problem(2, "core", "per_coordinate")
    chunks = ALS(model, **solver_options("als", samples=600, batch=600)).collect(draw)
    small = ALS(model, **solver_options("als", samples=600, batch=128))
    pieces = [
        (x[i : i + 128], t[i : i + 128], e[i : i + 128])
        for x, t, e in chunks
        for i in range(0, x.shape[0], 128)
    ]
    cores = [c.detach() for c in model.cores]
    for k in range(model.num_cores):
        whole = ALS(model, **solver_options("als")).normal_equations(cores, k, chunks)
        split = small.normal_equations(cores, k, pieces)
        for a, b in zip(whole[:3], split[:3]):
            torch.testing.assert_close(a, b)
        assert whole[3] == split[3] == 600 * model.num_outputs


def test_als_collects_the_requested_samples_in_chunks():
    _, model, draw = _problem(2, "core", "per_coordinate", n=300)
    chunks = ALS(model, **solver_options("als", samples=1000, batch=256)).collect(draw)
    assert sum(c[0].shape[0] for c in chunks) == 1000
    assert max(c[0].shape[0] for c in chunks) <= 256


def test_grouped_gram_equals_dense_features():
    net = FunctionalTT(
        data_shape=(3,), time="core", output="core", num_basis=5, rank=2, init="random"
    ).double()
    x, t = torch.randn(40, 3, dtype=torch.float64), torch.randint(0, 1000, (40,))
    for k in range(net.num_cores):
        iface = net.interfaces(k, x, t)
        n = net.mode_sizes[k]
        P, N, J, r0 = iface.left.shape
        phi = torch.zeros(N, J, n, dtype=torch.float64)
        phi.scatter_add_(2, iface.index.expand(N, J, -1), iface.values.expand(N, J, -1).clone())
        z = torch.einsum("pnja,nji,pnjb->pnjaib", iface.left, phi, iface.right).reshape(
            P, N * J, -1
        )
        torch.testing.assert_close(gram(iface, n), z.transpose(1, 2) @ z)


def test_als_ridge_shrinks_the_solution():
    _, model, draw = _problem(2, "additive", "per_coordinate")
    chunks = ALS(model, **solver_options("als", samples=1024)).collect(draw)
    norms = []
    for ridge in (1e-8, 10.0):
        m = FunctionalTT(
            data_shape=(2,), timesteps=50, time="additive", num_basis=6, rank=3
        ).double()
        ALS(m, **solver_options("als", ridge=ridge)).sweep(chunks)
        norms.append(m(chunks[0][0], chunks[0][1]).norm().item())
    assert norms[1] < 0.5 * norms[0]


def test_als_singular_system_suggests_a_ridge():
    # 20 samples for a 2 x 6 x 2-dimensional core: the normal equations cannot have full rank
    _, model, draw = _problem(2, "core", "per_coordinate", n=20)
    with pytest.raises(UserError, match=r"(singular|ill-conditioned).*als.ridge"):
        ALS(model, **solver_options("als", ridge=0.0, samples=20, sweeps=1)).step(draw)
    # a ridge makes it solvable
    ALS(model, **solver_options("als", ridge=1e-6, samples=20, sweeps=1)).step(draw)


def test_als_sums_the_normal_equations_over_ranks():
    # two identical ranks: a reduce_sum that doubles must leave the step unchanged, which holds
    # only if the row count is reduced with the equations (the ridge does not scale with them)
    _, model_a, draw = _problem(2, "core", "per_coordinate")
    _, model_b, _ = _problem(2, "core", "per_coordinate")
    chunks = ALS(model_a, **solver_options("als", samples=512)).collect(draw)
    for model, reduce in ((model_a, lambda x: x), (model_b, lambda x: 2 * x)):
        ALS(model, **solver_options("als", ridge=1e-2)).sweep(chunks, reduce)
    for a, b in zip(model_a.cores, model_b.cores):
        torch.testing.assert_close(a, b)


def _ddp_worker(rank, world, init_file, result_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    _, model, _ = _problem(2, "core", "per_coordinate")
    _, _, draw = _problem(2, "core", "per_coordinate", seed=rank + 10)

    def reduce_sum(x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    ALS(model, **solver_options("als", ridge=1e-3, sweeps=1, samples=256, batch=256)).step(
        draw, reduce_sum
    )
    if rank == 0:
        torch.save([c.detach() for c in model.cores], result_file)
    dist.destroy_process_group()


@pytest.mark.slow
def test_als_under_ddp_equals_one_process_on_all_samples(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "cores.pt")), nprocs=2)
    distributed = torch.load(tmp_path / "cores.pt")
    # one process on the union of both ranks' samples
    _, model, _ = _problem(2, "core", "per_coordinate")
    chunks = []
    for rank in range(2):
        _, _, draw = _problem(2, "core", "per_coordinate", seed=rank + 10)
        chunks += ALS(model, **solver_options("als", samples=256, batch=256)).collect(draw)
    ALS(model, **solver_options("als", ridge=1e-3)).sweep(chunks)
    for a, b in zip(model.cores, distributed):
        torch.testing.assert_close(a.detach(), b)


# ----------------------------------------------------------------------------------- Riemannian
def test_projection_is_idempotent_and_orthogonal():
    net = FunctionalTT(data_shape=(2,), time="core", num_basis=5, rank=3, init="random").double()
    cores = [c.detach() for c in net.cores]
    left, right = orthogonalize(cores, len(cores) - 1), orthogonalize(cores, 0)
    assert all(is_left_orthogonal(c) for c in left[:-1]) and all(
        is_right_orthogonal(c) for c in right[1:]
    )
    z = torch.randn_like(full_tensor(cores))
    xi = tangent_dense(left, right, project_gradients(left, mixed_gradients(left, right, z)))
    xi2 = tangent_dense(left, right, project_gradients(left, mixed_gradients(left, right, xi)))
    torch.testing.assert_close(xi2, xi)
    assert abs(float(((z - xi) * xi).sum())) < 1e-10 * float((xi * xi).sum())
    # the point itself lies in its tangent space
    x = full_tensor(cores)
    torch.testing.assert_close(
        tangent_dense(left, right, project_gradients(left, mixed_gradients(left, right, x))), x
    )


def test_sample_gradient_is_the_projected_euclidean_gradient():
    net = FunctionalTT(data_shape=(2,), time="core", num_basis=5, rank=3, init="random").double()
    x, t = torch.randn(60, 2, dtype=torch.float64), torch.randint(0, 1000, (60,))
    eps = torch.randn(60, 2, dtype=torch.float64)
    opt = RiemannianGD(net, **solver_options("riemannian"))
    cores = [c.detach() for c in net.cores]
    left, right, deltas, loss = opt.riemannian_gradient(cores, x, t, net.from_data_layout(eps))
    # the Euclidean gradient as a dense tensor: Σ_n dLoss/dy_n ⊗_k φ_k(u_n)
    phis = []
    for (values, index), n in zip(net.site_basis(x, t), net.mode_sizes):
        phis.append(torch.zeros(60, n, dtype=torch.float64).scatter_add_(1, index, values))
    weights = 2 * (net.evaluate(x, t) - net.from_data_layout(eps))[..., 0] / eps.numel()
    euclid = torch.einsum("pn,na,nb,nc->pabc", weights, *phis)
    expected = project_gradients(left, mixed_gradients(left, right, euclid))
    for a, b in zip(deltas, expected):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        assert loss == pytest.approx(float(((net(x, t) - eps) ** 2).mean()))


def test_tangent_cores_and_rounding():
    net = FunctionalTT(data_shape=(2,), time="core", num_basis=5, rank=3, init="random").double()
    cores = [c.detach() for c in net.cores]
    left, right = orthogonalize(cores, len(cores) - 1), orthogonalize(cores, 0)
    deltas = project_gradients(left, [torch.randn_like(c) for c in cores])
    block = tangent_to_cores(left, right, deltas, 0.3)
    assert [c.shape[-1] for c in block[:-1]] == [6, 6]
    torch.testing.assert_close(
        full_tensor(block), full_tensor(cores) + 0.3 * tangent_dense(left, right, deltas)
    )
    alone = tangent_to_cores(left, right, deltas, 0.3, point=False)  # the tangent vector alone
    torch.testing.assert_close(full_tensor(alone), 0.3 * tangent_dense(left, right, deltas))
    # rounding a TT that has rank 3 stored at rank 6 is exact
    padded = tangent_to_cores(left, right, [torch.zeros_like(d) for d in deltas], 1.0)
    rounded, kept = round_tt(padded, 3)
    torch.testing.assert_close(full_tensor(rounded), full_tensor(cores))
    assert [tuple(c.shape) for c in rounded] == [tuple(c.shape) for c in cores]
    torch.testing.assert_close(
        tt_inner(rounded, rounded), (full_tensor(cores) ** 2).flatten(1).sum(1)
    )


@pytest.mark.parametrize("dim,time,output", LAYOUTS)
def test_riemannian_with_backtracking_never_increases_the_loss_and_keeps_the_rank(
    dim, time, output
):
    truth, model, draw = _problem(dim, time, output, n=256)
    x, t, eps = draw()
    opt = RiemannianGD(model, **solver_options("riemannian", lr=1.0, max_backtracks=40))
    exact = opt.line_minimiser
    opt.line_minimiser = lambda *args: 1e4 * exact(*args)  # a first trial far too big
    losses, backtracks = [], 0
    for _ in range(25):
        stats = opt.step(x, t, eps)
        losses.append(stats["loss"])
        backtracks += stats["backtracks"]
        assert stats["loss_after"] <= stats["loss"]
    assert all(b <= a for a, b in zip(losses, losses[1:]))
    assert losses[-1] < 0.5 * losses[0] and backtracks > 0
    assert [tuple(c.shape) for c in model.cores] == [tuple(c.shape) for c in truth.cores]
    for s in bond_singular_values([c.detach() for c in model.cores]):
        assert s.shape[-1] == model.rank and float(s.min()) > 1e-8 * float(s.max())


def test_riemannian_fixed_step_takes_lr_times_the_line_minimiser():
    _, model, draw = _problem(2, "core", "per_coordinate")
    stats = RiemannianGD(model, **solver_options("riemannian", lr=0.25, armijo=False)).step(*draw())
    assert stats["line_minimiser"] > 0 and stats["backtracks"] == 0
    assert stats["step_size"] == pytest.approx(0.25 * stats["line_minimiser"], rel=1e-12)


@pytest.mark.parametrize("dim,time,output", LAYOUTS)
def test_line_minimiser_is_the_vertex_of_the_loss_along_the_tangent_line(dim, time, output):
    """Before retraction the batch loss along ``X - α ξ`` is a parabola in ``α``: its values at
    0 and 2α* are equal and the one at α* is below both (a wrong α* breaks the symmetry)."""
    _, model, draw = _problem(dim, time, output)
    x, t, eps = draw()
    opt, target = RiemannianGD(model, **solver_options("riemannian")), model.from_data_layout(eps)
    cores = [c.detach() for c in model.cores]
    left, right, deltas, _ = opt.riemannian_gradient(cores, x, t, target)
    best = opt.line_minimiser(left, right, deltas, opt._grad_sq, x, t, target, lambda v: v)

    def loss(alpha):
        return opt._loss(tangent_to_cores(left, right, deltas, -alpha), x, t, target, lambda v: v)

    assert best > 0
    assert loss(0.0) == pytest.approx(loss(2 * best), rel=1e-8)
    assert loss(best) < loss(0.9 * best) and loss(best) < loss(1.1 * best) < loss(0.0)


def test_riemannian_without_descent_is_a_user_error():
    _, model, draw = _problem(2, "core", "per_coordinate")
    opt = RiemannianGD(model, **solver_options("riemannian", lr=1.0, max_backtracks=0))
    exact = opt.line_minimiser
    opt.line_minimiser = lambda *args: 1e9 * exact(*args)
    with pytest.raises(UserError, match="no descent after 0 backtracks.*lower riemannian.lr"):
        opt.step(*draw())


@pytest.mark.parametrize("lr", [0.0, 1.5])
def test_riemannian_lr_outside_0_1_is_refused(lr):
    _, model, _ = _problem(2, "core", "per_coordinate")
    with pytest.raises(UserError, match=r"riemannian.lr=.*in \(0, 1\]"):
        RiemannianGD(model, **solver_options("riemannian", lr=lr))


def test_a_tangent_without_output_is_no_step():
    _, model, draw = _problem(2, "core", "per_coordinate")
    opt = RiemannianGD(model, **solver_options("riemannian"))
    opt.line_minimiser = lambda *args: 0.0
    before = [c.detach().clone() for c in model.cores]
    stats = opt.step(*draw())
    assert stats["step_size"] == 0.0 and stats["loss_after"] == stats["loss"]
    assert all(torch.equal(a, b) for a, b in zip(before, model.cores))


def test_rank_larger_than_the_core_dimensions_allow():
    with pytest.raises(UserError, match="rank=7 is larger than the TT allows"):
        FunctionalTT(data_shape=(2,), time="additive", num_basis=6, rank=7)


# ------------------------------------------------------------------------------------ steppers
SWEEP = {"ridge": 1e-6, "sweeps": 1, "samples": 512, "batch": 256, "fixed": False}
BLOCKS = {
    "als": SWEEP,
    "dmrg": {**SWEEP, "ridge": 1e-4, "max_rank": 8, "tol": 1e-3, "max_unknowns": 8192},
    "riemannian": {"lr": 0.5, "armijo": True, "shrink": 0.5, "max_backtracks": 20},
}


@pytest.mark.parametrize("name", ["als", "dmrg", "riemannian"])
def test_make_tt_stepper_from_config(name):
    _, model, draw = _problem(2, "core", "per_coordinate", dtype=torch.float32)
    stepper = make_tt_stepper(name, model, **BLOCKS[name])
    before = [c.detach().clone() for c in model.cores]
    calls = []

    def counting_draw():
        calls.append(1)
        return draw()

    first = stepper.step(counting_draw, lambda x: x)
    second = stepper.step(counting_draw, lambda x: x)
    # (dmrg fits this exactly low-rank problem in one step: fresh samples then only add noise)
    assert isinstance(first["loss"], float)
    assert second["loss"] < first["loss"] or (name == "dmrg" and second["loss"] < 1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.cores))
    assert len(calls) == 2  # riemannian: one batch a step; als: 512 samples = one draw of 512
    if name in ("als", "dmrg"):
        resumed = make_tt_stepper(name, model, **BLOCKS[name])
        resumed.load_state_dict(stepper.state_dict())
        assert resumed.state_dict() == stepper.state_dict() == {"sweeps_done": 2}


def test_make_tt_stepper_errors():
    with pytest.raises(UserError, match="ddpm.optimizer=als needs eps_net=ftt"):
        make_tt_stepper("als", torch.nn.Linear(2, 2), **SWEEP)
    model = FunctionalTT()
    with pytest.raises(UserError, match="unknown tensor-train optimiser"):
        make_tt_stepper("lbfgs", model)
    with pytest.raises(UserError, match=r"unknown als keys \['rige'\]"):
        make_tt_stepper("als", model, **SWEEP, rige=1.0)
    with pytest.raises(UserError, match="als.ridge"):
        make_tt_stepper("als", model, **{**SWEEP, "ridge": -1.0})
    with pytest.raises(UserError, match=r"lacks \['max_rank'"):
        make_tt_stepper("dmrg", model, **SWEEP)
    with pytest.raises(UserError, match="riemannian.shrink"):
        make_tt_stepper("riemannian", model, **solver_options("riemannian", shrink=1.5))
    with pytest.raises(UserError, match=r"riemannian block lacks \['armijo', 'lr'"):
        make_tt_stepper("riemannian", model, shrink=0.5)


# --------------------------------------------------------------------------------------- flops
def test_forward_flops_match_a_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    for kw in (dict(), dict(time="additive"), dict(data_shape=(3,), output="core"), dict(rank=16)):
        net = FunctionalTT(**{"data_shape": (2,), **kw})
        x, t = torch.randn(100, *net.data_shape), torch.randint(0, 1000, (100,))
        with FlopCounterMode(display=False) as counter:
            net(x, t)
        counted = counter.get_total_flops() / 100  # matmuls only: no basis, no rank-1 products
        assert abs(ftt_forward_flops(net) - counted) <= 0.05 * counted + 60 * (net.dim + 1)


def test_optimiser_flops_grow_as_the_algorithms_say():
    small = FunctionalTT(data_shape=(2,), num_basis=16, rank=4)
    big = FunctionalTT(data_shape=(2,), num_basis=16, rank=8)
    # ALS: the r x m x r time core's solve grows like r^6, its rows like r^4
    assert als_sweep_flops(big, 8192) > 8 * als_sweep_flops(small, 8192)
    assert als_sweep_flops(small, 16384) < 2 * als_sweep_flops(small, 8192)
    assert riemannian_step_flops(small, 256, trials=3) > riemannian_step_flops(small, 256, trials=1)
    adam = adam_step_flops(small.num_parameters(), 256, ftt_forward_flops(small))
    assert adam == 3 * 256 * ftt_forward_flops(small) + 12 * small.num_parameters()
