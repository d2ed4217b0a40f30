"""Long tensor trains (issue 15): numbers stay in range for thousands of cores, and the cached
sweeps (environments extended one core at a time) give the uncached formula's results."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_modules.errors import UserError
from lightning_modules.tt import algebra, sweep
from lightning_modules.tt.als import ALS
from lightning_modules.tt.dmrg import DMRG
from lightning_modules.tt.ftt import FunctionalTT
from lightning_modules.tt.interfaces import contract_core
from lightning_modules.tt.riemannian import RiemannianGD
from tests.helpers import assert_close_scaled, solver_options

T = 50


def _long(dim: int, dtype=torch.float64, rank=2, num_basis=4, seed=0) -> FunctionalTT:
    """``dim + 2`` cores: the coordinates, a time core and an output core in the middle (P = 1)."""
    net = FunctionalTT(
        data_shape=(dim,),
        timesteps=T,
        time="core",
        output="core",
        num_basis=num_basis,
        rank=rank,
        init_noise=0.1,
        seed=seed,
    )
    return net.to(dtype)


def _batch(dim: int, n: int, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=dtype)
    t = torch.randint(0, T, (n,), generator=g)
    return x, t


def _reference(net: FunctionalTT, cores, x, t) -> torch.Tensor:
    """``y [P, N, J]`` by the plain product of the cores in float64, no normalisation."""
    cores = [c.detach().double() for c in cores]
    bases = net.site_basis(x.double(), t, torch.float64)
    state = torch.ones(net.num_tts, x.shape[0], 1, 1, dtype=torch.float64)
    for core, basis in zip(cores, bases):
        if basis is None:
            state = torch.einsum("pnxa,pajb->pnjb", state, core)
        else:
            values, index = basis
            m = torch.einsum("ns,pnsab->pnab", values, core.permute(0, 2, 1, 3)[:, index])
            state = torch.einsum("pnja,pnab->pnjb", state, m)
    return state[..., 0]


def _lopsided(net: FunctionalTT) -> list[torch.Tensor]:
    """The same function with cores left of the output core x4 and right of it x1/4 (exact
    powers of two): the plain partial products then leave even float64's range (4^1535)."""
    out = next(k for k, (kind, _) in enumerate(net.sites) if kind == "out")
    xs_left = [k for k in range(out) if net.sites[k][0] == "x"]
    xs_right = list(range(out + 1, net.num_cores))
    assert len(xs_left) == len(xs_right)
    cores = [c.detach().clone() for c in net.cores]
    for k in xs_left:
        cores[k] *= 4.0
    for k in xs_right:
        cores[k] /= 4.0
    return cores


# ------------------------------------------------------------------------- long contractions
@pytest.mark.parametrize("num_cores", [768, 3072])
def test_interfaces_of_long_trains_stay_finite_and_exact(num_cores):
    net = _long(num_cores - 2, dtype=torch.float32)
    x, t = _batch(net.dim, 3, dtype=torch.float32)
    reference = _reference(net, net.cores, x, t)  # the balanced cores: float64 copes
    cores = _lopsided(net)
    out = net.sites.index(("out", -1))
    for k in (0, out - 1, out, out + 1, num_cores - 1):
        iface = net.interfaces(k, x, t, cores=cores, normalised=True)
        for part in (iface.left, iface.right, iface.log_scale):
            assert torch.isfinite(part).all()
        y = contract_core(cores[k].double(), _as_double(iface))
        assert_close_scaled(y, reference, 1e-4)


def _as_double(iface):
    iface.left, iface.right, iface.values = (
        iface.left.double(),
        iface.right.double(),
        iface.values.double(),
    )
    return iface


def test_forward_of_a_3072_core_ftt_is_finite_and_matches_float64():
    net = _long(3070, dtype=torch.float32)
    x, t = _batch(net.dim, 4, dtype=torch.float32)
    reference = net.to_data_layout(_reference(net, net.cores, x, t))
    with torch.no_grad():
        for param, core in zip(net.cores, _lopsided(net)):
            param.copy_(core)
        y = net(x, t)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert_close_scaled(y.double(), reference, 1e-4)


# ------------------------------------------------------------------------------- long sweeps
def _targets(x):
    return torch.tanh(x) + 0.1 * torch.sin(3 * x)


def test_one_als_sweep_on_a_256_core_train_lowers_the_loss():
    net = _long(254)
    x, t = _batch(254, 256)
    eps = _targets(x)
    with torch.no_grad():
        before = float(((net(x, t) - eps) ** 2).mean())
    loss = ALS(net, **solver_options("als", ridge=1e-6, samples=256, batch=128)).sweep(
        [(x[:128], t[:128], eps[:128]), (x[128:], t[128:], eps[128:])]
    )
    with torch.no_grad():
        after = float(((net(x, t) - eps) ** 2).mean())
    assert all(torch.isfinite(c).all() for c in net.cores)
    assert after < 0.5 * before
    assert after == pytest.approx(loss, rel=1e-6)


def test_dmrg_sweep_on_a_long_train_stays_finite_and_descends():
    net = _long(126)
    x, t = _batch(126, 128)
    eps = _targets(x)
    dmrg = DMRG(
        net, ridge=1e-4, sweeps=1, samples=128, batch=128, fixed=True,
        max_rank=3, tol=1e-3, max_unknowns=5000,
    )  # fmt: skip
    before = dmrg.loss([(x, t, eps)])
    after = dmrg.sweep([(x, t, eps)])
    assert all(torch.isfinite(c).all() for c in net.cores)
    assert after < 0.5 * before and max(net.ranks) <= 3


def test_riemannian_step_on_a_768_core_train_stays_finite():
    net = _long(766)
    x, t = _batch(766, 32)
    stats = RiemannianGD(net, **solver_options("riemannian", lr=1.0, armijo=False)).step(
        x, t, _targets(x)
    )
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    assert all(torch.isfinite(c).all() for c in net.cores)
    with torch.no_grad():
        assert torch.isfinite(net(x, t)).all()


def test_riemannian_steps_with_the_default_lr_descend_on_a_64_core_train():
    """The gradient shrinks like num_basis^(-K/2); a step relative to the line minimiser still
    moves (an absolute step of 300, the old default, found no descent from D = 30 on)."""
    net = _long(62)
    x, t = _batch(62, 256)
    eps = _targets(x)
    opt = RiemannianGD(net, **solver_options("riemannian"))  # the default relative step, Armijo on
    losses = [opt.step(x, t, eps) for _ in range(5)]
    assert losses[0]["grad_norm"] < 1e-6  # the scale an absolute step would have to beat
    assert all(s["loss_after"] < s["loss"] for s in losses)
    assert losses[-1]["loss_after"] < 0.9 * losses[0]["loss"]


# ------------------------------------------------------------- cached == uncached, exact gauge
@pytest.mark.parametrize(
    "dim,time,output",
    [(3, "core", "per_coordinate"), (3, "additive", "per_coordinate"), (4, "core", "core")],
)
def test_cached_als_sweep_matches_the_uncached_formula(dim, time, output):
    net = FunctionalTT(
        data_shape=(dim,), timesteps=T, time=time, output=output, num_basis=5, rank=3,
        init_noise=0.1,
    ).double()  # fmt: skip
    x, t = _batch(dim, 300)
    eps = _targets(x)
    chunks = [(x[i : i + 128], t[i : i + 128], eps[i : i + 128]) for i in range(0, 300, 128)]
    cached, plain = copy.deepcopy(net), copy.deepcopy(net)
    loss_cached = ALS(cached, **solver_options("als", ridge=1e-6)).sweep(chunks)
    loss_plain = ALS(plain, **solver_options("als", ridge=1e-6)).reference_sweep(chunks)
    # two orders of the same float64 algebra; the ridge-1e-6 solves amplify rounding by their
    # condition number, so the outputs agree to ~1e-10 of their size (4.5e-10 seen on one BLAS)
    assert loss_cached == pytest.approx(loss_plain, rel=1e-7)
    with torch.no_grad():
        assert_close_scaled(cached(x, t), plain(x, t), 1e-7)


def test_the_scaled_gauge_changes_no_result(monkeypatch):
    """Rescaling at every step (drift 0) and never (drift inf) give the same functions."""
    net = _long(10)
    x, t = _batch(10, 200)
    eps = _targets(x)
    results = []
    for drift in (0.0, float("inf")):
        monkeypatch.setattr(sweep, "SCALE_DRIFT", drift)
        monkeypatch.setattr(algebra, "CARRY_DRIFT", drift)
        a, r = copy.deepcopy(net), copy.deepcopy(net)
        ALS(a, **solver_options("als", ridge=1e-6)).sweep([(x, t, eps)])
        stats = RiemannianGD(r, **solver_options("riemannian", lr=0.5, armijo=False)).step(
            x, t, eps
        )
        with torch.no_grad():
            results.append((a(x, t), r(x, t), stats["grad_norm"]))
    (a0, r0, g0), (a1, r1, g1) = results
    assert_close_scaled(a0, a1, 1e-7)
    assert_close_scaled(r0, r1, 1e-7)
    assert g0 == pytest.approx(g1, rel=1e-7)


# --------------------------------------------------------------------------- true error causes
def test_als_names_interfaces_that_underflow():
    """The orthonormal gauge of the uncached formula underflows at 768 cores; the error says so
    instead of blaming the sample count (the cached sweep's scaled gauge does not underflow)."""
    net = _long(766)
    x, t = _batch(766, 16)
    with pytest.raises(UserError, match="zero for every sample.*not a sample-count problem"):
        ALS(net, **solver_options("als")).reference_sweep([(x, t, _targets(x))])


def test_als_names_non_finite_data():
    net = _long(4)
    x, t = _batch(4, 64)
    eps = _targets(x)
    eps[3, 1] = float("nan")
    with pytest.raises(UserError, match="not finite"):
        ALS(net, **solver_options("als")).sweep([(x, t, eps)])


# ----------------------------------------------------------------------------------------- DDP
def _ddp_long_worker(rank, world, init_file, result_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    net = _long(38)  # 40 cores: the scaled gauge rescales cores, from the all-reduced means
    x, t = _batch(38, 96, seed=rank + 10)

    def reduce_sum(z):
        z = z.clone()
        dist.all_reduce(z)
        return z

    ALS(net, **solver_options("als", ridge=1e-4)).sweep([(x, t, _targets(x))], reduce_sum)
    if rank == 0:
        torch.save([c.detach() for c in net.cores], result_file)
    dist.destroy_process_group()


@pytest.mark.slow
def test_long_als_under_ddp_equals_one_process_on_all_samples(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_long_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "c.pt")), nprocs=2)
    distributed = torch.load(tmp_path / "c.pt")
    net = _long(38)
    chunks = []
    for rank in range(2):
        x, t = _batch(38, 96, seed=rank + 10)
        chunks.append((x, t, _targets(x)))
    ALS(net, **solver_options("als", ridge=1e-4)).sweep(chunks)
    assert max(float(c.abs().max()) for c in distributed) > 50  # the gauge did rescale
    for a, b in zip(net.cores, distributed):
        assert_close_scaled(a.detach(), b, 1e-7)
