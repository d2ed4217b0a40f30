"""DMRG (two-site ALS with adaptive bond ranks): exact recovery, rank finding, monotone sweeps."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.errors import UserError
from lightning_modules.tt.dmrg import DMRG
from lightning_modules.tt.ftt import FunctionalTT
from tests.helpers import assert_close_scaled

T = 50


def _ftt(rank: int, seed: int, **kw) -> FunctionalTT:
    kw = {"num_basis": 6, "init": "random", **kw}
    net = FunctionalTT(data_shape=(2,), timesteps=T, rank=rank, seed=seed, **kw)
    return net.to(torch.float64)


def _draw_from(target, n=512, seed=0):
    """Triples whose ε is ``target(x, t)``: x uniform over the whole clamped support."""
    g = torch.Generator().manual_seed(seed)

    def draw():
        x = 7 * torch.rand(n, 2, generator=g, dtype=torch.float64) - 3.5
        t = torch.randint(0, T, (n,), generator=g)
        with torch.no_grad():
            return x, t, target(x, t)

    return draw


def _dmrg(net, **kw):
    options = {"ridge": 1e-12, "sweeps": 1, "samples": 4096, "batch": 1024, "fixed": True}
    options.update({"max_rank": 6, "tol": 1e-6, "max_unknowns": 10_000, **kw})
    return DMRG(net, **options)


def test_dmrg_recovers_a_low_rank_ftt_and_its_bond_ranks():
    target = _ftt(rank=2, seed=1)
    model = _ftt(rank=5, seed=2)  # starts larger than needed
    dmrg = _dmrg(model)
    draw = _draw_from(target)
    losses = [dmrg.step(draw)["loss"] for _ in range(3)]
    assert losses[-1] < 1e-18
    assert model.ranks == [1, 2, 2, 1]
    x, t, eps = _draw_from(target, seed=99)()  # unseen points
    with torch.no_grad():
        assert_close_scaled(model(x, t), eps, 1e-8)


def test_dmrg_finds_unequal_bond_ranks_with_an_output_core():
    target = _ftt(rank=3, seed=3, output="core", time="additive")
    target.cores[1].data[:, :, :, 1:] = 0  # bond 2 carries rank 1 only
    model = _ftt(rank=4, seed=4, output="core", time="additive")
    draw = _draw_from(target)
    dmrg = _dmrg(model)
    for _ in range(3):
        loss = dmrg.step(draw)["loss"]
    assert loss < 1e-16
    assert model.ranks[2] == 1 and model.ranks[1] <= 3


def test_dmrg_sweeps_never_raise_the_loss_on_their_samples():
    torch.manual_seed(0)
    target = _ftt(rank=4, seed=5)
    model = _ftt(rank=3, seed=6, init="identity")
    base = _draw_from(target)

    def noisy():  # not representable: the loss cannot reach zero
        x, t, eps = base()
        return x, t, eps + 0.3 * torch.randn_like(eps)

    dmrg = _dmrg(model, ridge=0.0 + 1e-10, max_rank=3, tol=0.0)
    chunks = dmrg.collect(noisy)
    losses = [dmrg.loss(chunks)]
    for _ in range(4):
        losses.append(dmrg.sweep(chunks))
    assert all(b <= a * (1 + 1e-9) for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.9 * losses[0]


def test_dmrg_refuses_merged_cores_too_big():
    with pytest.raises(UserError, match="unknowns"):
        _dmrg(_ftt(rank=4, seed=0), max_unknowns=10).step(_draw_from(_ftt(rank=1, seed=1)))


def test_an_ftt_loads_weights_whose_ranks_dmrg_changed():
    target = _ftt(rank=2, seed=1)
    model = _ftt(rank=5, seed=2)
    _dmrg(model).step(_draw_from(target))
    assert model.ranks == [1, 2, 2, 1]
    fresh = _ftt(rank=5, seed=3)
    fresh.load_state_dict(model.state_dict())
    assert fresh.ranks == [1, 2, 2, 1]
    x, t, _ = _draw_from(target, seed=5)()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t), model(x, t))
