"""Functional tensor trains for the DDPM noise model and their optimisers (plain torch).

``bspline``: the B-spline bases; ``ftt``: the FTT noise model; ``algebra``: TT orthogonalisation,
rounding and normal equations; ``environments`` / ``sweep``: the cached, per-sample normalised
partial products of a sweep and its scaled-orthogonal gauge (long trains, cost linear in the
number of cores); ``als`` / ``dmrg`` / ``riemannian``: the optimisers; ``steppers``: their
adapters for the DDPM training loop; ``flops``: analytic operation counts.
"""

from lightning_modules.tt.bspline import BSplineBasis
from lightning_modules.tt.ftt import FunctionalTT

__all__ = ["BSplineBasis", "FunctionalTT"]
