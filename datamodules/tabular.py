"""Real tabular data shipped inside scikit-learn, as vector data for the DDPM (``dataset=tabular``).

``dataset.name`` picks one of the ``sklearn.datasets.load_*`` tables (nothing is downloaded):

===============  ======  ====  ==========================================================
name             rows    D     what a row is
===============  ======  ====  ==========================================================
digits           1797    64    an 8 x 8 handwritten digit, grey levels 0..16 (3 pixels are
                               always 0: they stay exactly 0 after standardising)
breast_cancer    569     30    features of a breast-mass image (Wisconsin diagnostic)
wine             178     13    chemical analysis of an Italian wine
diabetes         442     10    age, sex, BMI, blood pressure, six serum measurements
===============  ======  ====  ==========================================================

Only the feature matrix is modelled (no labels or regression targets). A seeded
``reference_fraction`` of the rows (``derive_seed(seed, "tabular_reference", name)``) is held out
as the reference sample of the metrics and their floor bands; every coordinate is standardised
with the mean and std of the remaining training rows.
"""

from __future__ import annotations

import numpy as np

from datamodules.vectors import VectorDataModule
from lightning_modules.errors import UserError
from lightning_modules.utils.seeds import derive_seed

TABLES = ("digits", "breast_cancer", "wine", "diabetes")


def load_table(name: str) -> np.ndarray:
    """The ``[rows, D]`` float64 feature matrix of the sklearn table ``name``."""
    if name not in TABLES:
        raise UserError(f"dataset.name={name!r}: use one of {', '.join(TABLES)}")
    from sklearn import datasets

    return np.asarray(getattr(datasets, f"load_{name}")().data, dtype=np.float64)


def reference_split(rows: int, fraction: float, seed: int, name: str):
    """``(train indices, reference indices)``: a seeded ``fraction`` of ``rows`` held out."""
    if not 0 < fraction < 1:
        raise UserError(f"dataset.reference_fraction={fraction}: use a fraction in (0, 1)")
    n_ref = int(round(fraction * rows))
    if n_ref < 2 or rows - n_ref < 2:
        raise UserError(
            f"dataset.reference_fraction={fraction} leaves {n_ref} reference and "
            f"{rows - n_ref} training rows of {rows}; each side needs at least 2"
        )
    order = np.random.default_rng(derive_seed(seed, "tabular_reference", name)).permutation(rows)
    return np.sort(order[n_ref:]), np.sort(order[:n_ref])


class TabularDataModule(VectorDataModule):
    """One sklearn table (module docstring), standardised per coordinate, with a held-out
    reference sample.

    Args:
        name: one of :data:`TABLES`.
        reference_fraction: share of the rows held out as the reference sample.
    """

    def __init__(
        self,
        name: str = "digits",
        reference_fraction: float = 0.2,
        batch_size: int = 256,
        seed: int = 0,
    ):
        super().__init__(batch_size=batch_size, seed=seed)
        if name not in TABLES:
            raise UserError(f"dataset.name={name!r}: use one of {', '.join(TABLES)}")
        self.name = name
        self.reference_fraction = float(reference_fraction)

    def setup(self, stage: str | None = None) -> None:
        if self.train_x is not None:
            return
        table = load_table(self.name)
        train, reference = reference_split(
            len(table), self.reference_fraction, self.seed, self.name
        )
        self._standardise(table[train], table[reference], per_coordinate=True)
