import numpy as np
import pytest
import torch

from datamodules.vectors import PointsDataModule, SwissRollDataModule
from lightning_modules.errors import UserError
from tests.helpers import assert_close_scaled


@pytest.mark.parametrize("dim", [2, 3])
def test_swiss_roll_is_unit_scale_with_independent_reference(dim):
    dm = SwissRollDataModule(dim=dim, num_samples=2000, num_reference=500)
    dm.setup()
    assert dm.train_x.shape == (2000, dim) and dm.reference_x.shape == (500, dim)
    assert abs(dm.train_x.std().item() - 1) < 1e-3 and dm.train_x.mean(0).abs().max() < 1e-4
    assert not torch.equal(dm.train_x[:500], dm.reference_x)
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (256, dim)
    from sklearn.datasets import make_swiss_roll

    raw, _ = make_swiss_roll(n_samples=2000, noise=0.5, random_state=0)
    raw = torch.as_tensor(raw[:, [0, 2]] if dim == 2 else raw, dtype=torch.float32)
    assert_close_scaled(dm.to_data_space(dm.train_x), raw, 1e-4)


def test_swiss_roll_bad_dim():
    with pytest.raises(UserError, match="dim=4"):
        SwissRollDataModule(dim=4)


@pytest.mark.parametrize("suffix", [".npy", ".csv"])
def test_points_from_file(tmp_path, suffix):
    data = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    path = tmp_path / f"p{suffix}"
    np.save(path, data) if suffix == ".npy" else np.savetxt(path, data, delimiter=",")
    dm = PointsDataModule(path=str(path), reference_fraction=0.2)
    dm.setup()
    assert dm.train_x.shape == (40, 4) and dm.reference_x.shape == (10, 4)


@pytest.mark.parametrize(
    "array,match",
    [
        (np.zeros((1, 3)), "shape"),  # one point (a 1-D array is N points in 1-D, as in a CSV)
        (np.zeros((3, 2, 2)), "shape"),
        (np.array([[1.0, np.nan], [0, 0], [1, 1]]), "NaN"),
    ],
)
def test_points_bad_files(tmp_path, array, match):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(UserError, match=match):
        PointsDataModule(path=str(path)).setup()


def test_points_missing_path():
    with pytest.raises(UserError, match="dataset.path"):
        PointsDataModule(path=None).setup()


def test_one_dimensional_points_read_the_same_from_npy_and_csv(tmp_path):
    from datamodules.vectors import load_points

    values = np.linspace(-1, 1, 7)
    np.save(tmp_path / "p.npy", values)  # a 1-D array
    np.savetxt(tmp_path / "p.csv", values[:, None], delimiter=",")  # one column
    a, b = load_points(str(tmp_path / "p.npy")), load_points(str(tmp_path / "p.csv"))
    assert a.shape == b.shape == (7, 1)
    np.testing.assert_allclose(a, b)
