"""Legendre and Fourier bases: orthonormal on the support, exact on their span, usable by every
FTT optimiser."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.tt.bases import FourierBasis, LegendreBasis, make_basis
from lightning_modules.tt.ftt import FunctionalTT
from tests.helpers import assert_close_scaled, solver_options

LO, HI = torch.tensor([-1.5, 0.0]), torch.tensor([2.5, 3.0])


@pytest.mark.parametrize("cls", [LegendreBasis, FourierBasis])
def test_basis_is_orthonormal_on_the_support(cls):
    basis = cls(LO, HI, 7)
    grid = torch.linspace(0, 1, 20001, dtype=torch.float64)[:, None]
    u = LO + grid * (HI - LO)  # [G, 2]
    values = basis.dense(u)  # [G, 2, 7]
    gram = torch.einsum("gci,gcj->cij", values, values) / len(grid)
    assert_close_scaled(gram, torch.eye(7).expand(2, 7, 7).double(), 2e-3)  # quadrature error


@pytest.mark.parametrize("name", ["bspline", "legendre", "fourier"])
def test_each_basis_reproduces_a_function_in_its_span(name):
    """Least squares on a few points recovers a random member of the span to round-off."""
    basis = make_basis(name, LO, HI, 6, degree=2)
    g = torch.Generator().manual_seed(0)
    coef = torch.randn(2, 6, generator=g, dtype=torch.float64)

    def f(u):
        return torch.einsum("nci,ci->nc", basis.dense(u), coef)

    u = LO + torch.rand(200, 2, generator=g, dtype=torch.float64) * (HI - LO)
    phi = basis.dense(u)
    fit = torch.stack([torch.linalg.lstsq(phi[:, c], f(u)[:, c]).solution for c in range(2)])
    assert_close_scaled(fit, coef, 1e-8)
    # and the sparse layout the FTT uses gives the same values as the dense one
    values, first = basis.sparse(u)
    dense = torch.zeros_like(phi).scatter_add_(
        -1, first[..., None] + torch.arange(values.shape[-1]), values
    )
    torch.testing.assert_close(dense, phi)


def test_legendre_reproduces_polynomials_and_clamps_inputs():
    basis = LegendreBasis(LO, HI, 4)
    u = torch.tensor([[-3.0, 1.0], [0.5, 5.0]], dtype=torch.float64)
    cubic = basis.dense(basis.clamp(u))
    torch.testing.assert_close(basis.dense(u), cubic)  # clamped like the splines
    lin = basis.linear_coefficients()
    assert_close_scaled(torch.einsum("nci,ci->nc", basis.dense(u), lin), basis.clamp(u), 1e-6)


@pytest.mark.parametrize("name", ["legendre", "fourier"])
def test_identity_init_is_one_for_global_bases(name):
    net = FunctionalTT(data_shape=(2,), timesteps=20, basis=name, num_basis=5, rank=3, init_noise=0)
    x = torch.randn(10, 2)
    t = torch.randint(0, 20, (10,))
    assert_close_scaled(net(x, t), torch.ones(10, 2), 1e-5)


@pytest.mark.parametrize("name", ["legendre", "fourier"])
@pytest.mark.parametrize("optimizer", ["als", "dmrg", "riemannian", "adam"])
def test_every_optimiser_lowers_the_loss_with_each_basis(name, optimizer):
    from lightning_modules.diffusion.steppers import make_stepper

    torch.manual_seed(0)
    target = FunctionalTT(
        data_shape=(2,), timesteps=20, basis=name, num_basis=4, rank=2, init="random", seed=1
    )
    init = "linear" if optimizer == "riemannian" else "identity"
    net = FunctionalTT(data_shape=(2,), timesteps=20, basis=name, num_basis=4, rank=2, init=init)
    sweep = {"ridge": 1e-6, "sweeps": 1, "samples": 512, "batch": 256, "fixed": True}
    options = {
        "als": sweep,
        "dmrg": {**sweep, "max_rank": 2, "tol": 1e-6, "max_unknowns": 4096},
        "riemannian": solver_options("riemannian", lr=0.5),
        "adam": {"lr": 5e-2, "grad_clip": None, "weight_decay": 0.0},
    }[optimizer]
    stepper = make_stepper(optimizer, net, **options)
    g = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(512, 2, generator=g)
    t = torch.randint(0, 20, (512,), generator=g)
    with torch.no_grad():
        eps = target(x, t)

    def loss():
        with torch.no_grad():
            return float(((net(x, t) - eps) ** 2).mean())

    before = loss()
    for _ in range(3 if optimizer in ("als", "dmrg") else 60):
        stepper.step(lambda: (x, t, eps), lambda v: v)
    assert loss() < 0.5 * before
