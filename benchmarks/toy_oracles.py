"""What a *perfect* noise model scores on the 2-D suite: the exact predictor
``ε*(x_t, t) = E[ε | x_t] = -sqrt(1 - ᾱ_t) ∇ log p_t(x_t)`` of each density, sampled by the
project's own chain (``NoiseSchedule.sample`` with the task's schedule and clip box) and scored
exactly as ``task=ddpm`` scores a model: SW / Sinkhorn / MMD as the median of draws beside the
floor band, and the density's structure metric beside the data's own.

    python benchmarks/toy_oracles.py                       # all 7 densities, 3 draws
    python benchmarks/toy_oracles.py --densities circles --steps 1000 50 --draws 5

Rows per density:
* true density: fresh draws of the density itself (new seeds, the task's standardisation), i.e.
  what any sampler could at best reach;
* exact ε*, <steps> ancestral / DDIM steps: the chain's own error (time discretisation, clip)
  with a noise model that has no error.

The exact predictor, in the task's standardised coordinates (``p_t`` is ``p_0`` pushed through
``x_t = sqrt(ᾱ) x_0 + sqrt(1 - ᾱ) ε``):
* moons, circles, 2spirals, swiss roll, 8gaussians: ``p_0`` an equal-weight mixture of isotropic
  Gaussians (the noise std) at points of the noiseless curve, evenly spaced in the curve's own
  parameter as the sampler draws it (spacing below the noise std), or at the 8 centres;
* pinwheel: per arm, the radial coordinate at ``per_curve`` normal quantiles, each a Gaussian of
  the arm's width across the (warped) arm, degenerate along it;
* checkerboard: uniform on 8 squares, so ``p_t`` is a sum of products of normal-CDF differences
  (computed in log space, gradient by autograd).

The table says whether the floor band's 95 % point is reachable at all: a metric whose perfect
model lands above it half the time cannot certify a model inside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from scipy.stats import norm
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datamodules import toy_densities as toy  # noqa: E402
from datamodules.vectors import swiss_roll_curve  # noqa: E402
from lightning_modules.diffusion.metrics import floor_bands, vector_sample_metrics  # noqa: E402
from lightning_modules.diffusion.schedules import NoiseSchedule, vector_clip_box  # noqa: E402
from lightning_modules.utils.seeds import derive_seed  # noqa: E402

DENSITIES = (*toy.DENSITIES, "swiss_roll")


class MixtureEps:
    """ε* of an equal-weight mixture ``Σ_k N(m_k, σ² I)`` or, with ``across`` [K, 2] unit
    vectors u_k, ``Σ_k N(m_k, σ² u_k u_kᵀ)``, at noise level ``alpha_bar[t]``.

    ``x_t | k ~ N(a m_k, s² I + a² Σ_k)`` (a = sqrt(ᾱ), s = sqrt(1 - ᾱ)); the score is the
    posterior-weighted mean of the component scores, all as [N, K] matrix products.
    """

    def __init__(
        self, means: Tensor, noise: float, alpha_bar: Tensor, across: Tensor | None = None
    ):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.noise, self.alpha_bar = float(noise), alpha_bar.double()
        self.across = None if across is None else torch.as_tensor(across, dtype=torch.float64)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        ab = float(self.alpha_bar[int(t[0])])
        a, s2 = math.sqrt(ab), 1 - ab
        y, m = x.double(), self.means
        dist2 = (y * y).sum(1, keepdim=True) - 2 * a * y @ m.T + a * a * (m * m).sum(1)  # [N, K]
        if self.across is None:  # C_k = v I
            v = s2 + a * a * self.noise**2
            w = torch.softmax(-dist2 / (2 * v), dim=1)
            score = (a * w @ m - y) / v
        else:  # C_k = s² (I + c' u uᵀ): C⁻¹ r = (r - c (u·r) u) / s², c = a²σ² / (s² + a²σ²)
            u = self.across
            c = a * a * self.noise**2 / (s2 + a * a * self.noise**2)
            proj = y @ u.T - a * (u * m).sum(1)  # u_k · (y - a m_k), [N, K]
            w = torch.softmax(
                -(dist2 - c * proj * proj) / (2 * s2), dim=1
            )  # log det: same for all k
            score = -(y - a * w @ m - c * (w * proj) @ u) / s2
        return (-math.sqrt(s2) * score).to(x.dtype)


class CheckerboardEps:
    """ε* of the uniform density on boxes ``bounds`` [K, 2, 2] (box, coordinate, lo/hi)."""

    def __init__(self, bounds: Tensor, alpha_bar: Tensor):
        self.bounds, self.alpha_bar = (
            torch.as_tensor(bounds, dtype=torch.float64),
            alpha_bar.double(),
        )

    @staticmethod
    def _log_cdf_diff(hi: Tensor, lo: Tensor) -> Tensor:
        """log(Φ(hi) - Φ(lo)) for hi > lo, on the side of 0 where the tails are accurate."""
        flip = lo > 0
        hi, lo = torch.where(flip, -lo, hi), torch.where(flip, -hi, lo)
        log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
        d = (log_lo - log_hi).clamp(max=-1e-300)
        # log(1 - e^d), each branch fed only the values it is accurate (and differentiable) on
        near = d > -math.log(2)
        d_near, d_far = torch.where(near, d, -math.log(2)), torch.where(near, -math.log(2), d)
        log1mexp = torch.where(near, torch.log(-torch.expm1(d_near)), torch.log1p(-d_far.exp()))
        return log_hi + log1mexp

    def log_density(self, y: Tensor, ab: float) -> Tensor:
        a, s = math.sqrt(ab), math.sqrt(1 - ab)
        lo, hi = self.bounds[None, :, :, 0], self.bounds[None, :, :, 1]  # [1, K, 2]
        z = y[:, None, :]  # [N, 1, 2]
        terms = self._log_cdf_diff((z - a * lo) / s, (z - a * hi) / s).sum(2)  # [N, K]
        return torch.logsumexp(terms, dim=1)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        ab = float(self.alpha_bar[int(t[0])])
        with torch.enable_grad():
            y = x.detach().double().requires_grad_(True)
            (score,) = torch.autograd.grad(self.log_density(y, ab).sum(), y)
        return (-math.sqrt(1 - ab) * score).to(x.dtype)


def density_data(name: str, seed: int):
    """The datamodule of ``conf/dataset/<name>.yaml`` at ``seed``, set up."""
    cfg = OmegaConf.create(
        {"seed": seed, "dataset": OmegaConf.load(ROOT / "conf" / "dataset" / f"{name}.yaml")}
    )
    dm = instantiate(cfg.dataset)
    dm.setup()
    return dm


def exact_eps(name: str, dm, alpha_bar: Tensor, per_curve: int = 600):
    """The exact predictor of density ``name`` in ``dm``'s standardised coordinates."""
    shift, scale = dm.shift.double(), float(dm.scale)

    def std(points) -> Tensor:
        return (torch.as_tensor(points, dtype=torch.float64) - shift) / scale

    if name == "checkerboard":
        corners = torch.as_tensor(toy.checkerboard_cells(), dtype=torch.float64)
        bounds = torch.stack([corners, corners + 1], dim=2)  # [8, coordinate, lo/hi]
        return CheckerboardEps((bounds - shift[None, :, None]) / scale, alpha_bar)
    if name == "8gaussians":
        return MixtureEps(std(toy.gaussian_centres()), dm.noise / scale, alpha_bar)
    if name == "pinwheel":
        f0 = 1.0 + toy.PINWHEEL["radial_std"] * norm.ppf((np.arange(per_curve) + 0.5) / per_curve)
        arms = np.repeat(np.arange(toy.PINWHEEL["arms"]), per_curve)
        f0 = np.tile(f0, toy.PINWHEEL["arms"])
        angle = 2 * math.pi * arms / toy.PINWHEEL["arms"] + toy.PINWHEEL["rate"] * np.exp(f0)
        centres = f0[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1)
        across = np.stack([-np.sin(angle), np.cos(angle)], 1)  # R(angle) (0, 1)
        return MixtureEps(std(centres), dm.noise / scale, alpha_bar, torch.as_tensor(across))
    if name == "swiss_roll":
        return MixtureEps(
            std(swiss_roll_curve(np.linspace(0, 1, per_curve))), dm.noise / scale, alpha_bar
        )
    curves = {
        "moons": toy._moons_curve,
        "circles": toy._circles_curve,
        "2spirals": toy._spirals_curve,
    }
    return MixtureEps(std(toy._dense_curve(curves[name], per_curve)), dm.noise / scale, alpha_bar)


def exact_sample(name: str, dm, n: int, seed: int) -> Tensor:
    """``n`` points of the true density (its datamodule at another ``seed``, sklearn's swiss
    roll needs one below 2³²) in ``dm``'s standardised coordinates."""
    other = density_data(name, seed % 2**31)
    return (other.to_data_space(other.train_x[:n]).double() - dm.shift) / dm.scale


def metric_options(task) -> dict:
    """The task's settings of the vector metrics (``conf/task/ddpm.yaml``'s ``ddpm`` block)."""
    return {
        "num_projections": int(task.sw_projections),
        "sinkhorn_reg": float(task.sinkhorn_reg),
        "sinkhorn_samples": int(task.sinkhorn_samples),
    }


def structure(dm, x: Tensor) -> float:
    return float(dm.structure_metric(dm.to_data_space(x.float()))["mode_share"])


def sample_makers(name: str, dm, schedule: NoiseSchedule, task, steps_list, seed: int) -> dict:
    """Row label → ``make(draw) -> [n, 2]`` samples in ``dm``'s coordinates (module docstring)."""
    n = len(dm.reference_x)
    clip = vector_clip_box(dm.train_x.double(), float(task.clip_margin))
    eps = exact_eps(name, dm, schedule.alpha_bar)

    def fresh(draw: int) -> Tensor:
        return exact_sample(name, dm, n, derive_seed(seed, "toy_oracle_fresh", draw))

    def chain(sampler: str, steps: int, draw: int) -> Tensor:
        g = torch.Generator().manual_seed(derive_seed(seed, "ddpm_sample", draw))
        x, _ = schedule.sample(
            eps, n, (2,), g, steps=steps, clip=clip, sampler=sampler, dtype=torch.float64
        )
        return x

    makers = {"true density (fresh draws)": fresh}
    chains = [("ancestral", s) for s in steps_list]
    chains += [("ddim", s) for s in steps_list if s < schedule.timesteps]
    for sampler, steps in chains:
        makers[f"exact ε*, {steps} {sampler} steps"] = partial(chain, sampler, steps)
    return makers


def table_line(row: dict) -> str:
    cells = []
    for k in ("sw", "sinkhorn", "mmd"):
        mark = "" if row[f"{k}_in_band"] else " **out**"
        cells.append(f"{row[k]:.3g} [{row[k + '_floor_lo']:.3g}, {row[k + '_floor_hi']:.3g}]{mark}")
    share, own = 100 * row["mode_share"], 100 * row["mode_share_data"]
    return (
        f"| {row['density']} | {row['samples']} | " + " | ".join(cells)
        + f" | {share:.1f} % ({own:.1f} %) | {row['sample_s']:.1f} |"
    )  # fmt: skip


def write_results(out: Path | None, lines: list[str], rows: list[dict]) -> None:
    """Print the table; with ``out``, also write it as ``table.md`` beside ``rows.json``."""
    table = "\n".join(lines)
    print(table)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(table + "\n")
        (out / "rows.json").write_text(json.dumps(rows, indent=1))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--densities", nargs="+", default=list(DENSITIES), choices=DENSITIES)
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 50])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write table.md and rows.json here")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    task = OmegaConf.load(ROOT / "conf" / "task" / "ddpm.yaml").ddpm
    schedule = NoiseSchedule.from_config(
        task.schedule, task.timesteps, task.beta_start, task.beta_end
    )
    options = {**metric_options(task), "seed": args.seed}
    lines = [
        f"## toy_oracles (exact noise predictor; median of {args.draws} draws of the reference "
        f"sample's size [floor band 5-95 % over {task.floor_pairs} real pairs]; "
        f"seed {args.seed}; threads={torch.get_num_threads()})",
        "",
        "| density | samples | SW [floor band] | Sinkhorn [floor band] | MMD [floor band] | "
        "mode share (data) | sample s per draw |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = []
    for name in args.densities:
        dm = density_data(name, args.seed)
        train, ref = dm.train_x.double(), dm.reference_x.double()
        floors = floor_bands(ref, train, len(ref), floor_pairs=int(task.floor_pairs), **options)
        own = structure(dm, ref)
        for label, make in sample_makers(name, dm, schedule, task, args.steps, args.seed).items():
            start = time.perf_counter()
            draws = [make(d) for d in range(args.draws)]
            seconds = (time.perf_counter() - start) / args.draws
            m = vector_sample_metrics(draws, ref, train, floors=floors, **options)
            share = float(np.median([structure(dm, d) for d in draws]))
            rows.append({"density": name, "samples": label, "sample_s": seconds,
                         "mode_share": share, "mode_share_data": own, **m})  # fmt: skip
            lines.append(table_line(rows[-1]))
            print(lines[-1], file=sys.stderr, flush=True)
    write_results(args.out, lines, rows)
    return rows


if __name__ == "__main__":
    main()
