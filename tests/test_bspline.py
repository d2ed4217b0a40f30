"""B-spline basis of the FTT: partition of unity, support, sparse = dense evaluation."""

import pytest
import torch

from lightning_modules.errors import UserError
from lightning_modules.tt.bspline import BSplineBasis


def _basis(degree=2, m=7):
    return BSplineBasis(
        torch.tensor([-1.0, 0.0]), torch.tensor([2.0, 5.0]), num_basis=m, degree=degree
    )


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_partition_of_unity_on_the_support(degree):
    basis = _basis(degree)
    g = torch.Generator().manual_seed(0)
    u = basis.lower + (basis.upper - basis.lower) * torch.rand(
        2000, 2, generator=g, dtype=torch.float64
    )
    u[:2] = torch.stack([basis.lower, basis.upper])  # both ends of the support
    values = basis.dense(u, clamp=False)
    assert values.shape == (2000, 2, 7)
    torch.testing.assert_close(values.sum(-1), torch.ones(2000, 2, dtype=torch.float64))
    assert (values >= 0).all()


def test_knots_follow_the_ttde_construction():
    basis = _basis(degree=2, m=7)
    l, r, m, q = -1.0, 2.0, 7, 2
    h = (r - l) / (m - q)
    torch.testing.assert_close(
        basis.knots[0], torch.linspace(l - q * h, r + q * h, m + q + 1, dtype=torch.float64)
    )


def test_zero_outside_the_extended_band_and_clamped_inputs_see_the_boundary():
    basis = _basis(degree=2, m=7)
    h = basis.step
    outside = torch.stack([basis.lower - 2 * h - 1e-6, basis.upper + 2 * h + 1e-6])
    far = torch.stack([basis.lower - 100.0, basis.upper + 100.0])
    assert basis.dense(outside, clamp=False).abs().max() == 0
    assert basis.dense(far, clamp=False).abs().max() == 0
    # inside the extended band but outside [l, r]: splines no longer sum to one
    between = torch.stack([basis.lower - h, basis.upper + h])
    assert (basis.dense(between, clamp=False).sum(-1) < 1 - 1e-3).all()
    # the model clamps: far inputs give the values at the support's ends
    torch.testing.assert_close(
        basis.dense(far), basis.dense(torch.stack([basis.lower, basis.upper]))
    )


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_sparse_evaluation_matches_dense(degree):
    basis = _basis(degree, m=9)
    u = (
        torch.randn(3000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 4
        + 1
    )
    values, first = basis.sparse(u)
    assert values.shape == (3000, 2, degree + 1) and first.shape == (3000, 2)
    assert first.min() >= 0 and (first + degree).max() <= 8
    torch.testing.assert_close(basis.densify(values, first), basis.dense(u))


def test_degree_two_values_are_the_quadratic_pieces():
    basis = BSplineBasis(torch.tensor([0.0]), torch.tensor([3.0]), num_basis=5, degree=2)  # h = 1
    values, first = basis.sparse(torch.tensor([[1.25]], dtype=torch.float64))
    s = 0.25
    expected = torch.tensor(
        [(1 - s) ** 2 / 2, (1 + 2 * s - 2 * s**2) / 2, s**2 / 2], dtype=torch.float64
    )
    torch.testing.assert_close(values[0, 0], expected)
    assert first.item() == 1


def test_bad_basis_sizes():
    with pytest.raises(UserError, match="num_basis=2 must exceed eps_net.degree=2"):
        BSplineBasis(torch.zeros(1), torch.ones(1), num_basis=2, degree=2)
    with pytest.raises(UserError, match="upper bound"):
        BSplineBasis(torch.ones(1), torch.ones(1), num_basis=5, degree=2)


@pytest.mark.parametrize("degree", [1, 2, 3])
def test_greville_abscissae_reproduce_linear_functions(degree):
    basis = _basis(degree, m=8)
    u = basis.lower + (basis.upper - basis.lower) * torch.rand(500, 2, dtype=torch.float64)
    linear = (basis.dense(u) * basis.greville()[None]).sum(-1)
    torch.testing.assert_close(linear, u)
