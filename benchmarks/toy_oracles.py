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

The exact predictor is the datamodule's own ``exact_eps`` (``datamodules/toy_densities.py`` and
``datamodules/vectors.py`` say how each density's ``p_0`` is written, on
``lightning_modules/diffusion/oracles.py``); ``task=ddpm`` samples the same predictor beside
every model (``sw_oracle``, ``sw_ratio``, ...).

The table says whether the floor band's 95 % point is reachable at all: a metric whose perfect
model lands above it half the time cannot certify a model inside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datamodules import toy_densities as toy  # noqa: E402
from lightning_modules.diffusion.metrics import floor_bands, vector_sample_metrics  # noqa: E402
from lightning_modules.diffusion.schedules import NoiseSchedule, vector_clip_box  # noqa: E402
from lightning_modules.utils.seeds import derive_seed  # noqa: E402

DENSITIES = (*toy.DENSITIES, "swiss_roll")


def density_data(name: str, seed: int):
    """The datamodule of ``conf/dataset/<name>.yaml`` at ``seed``, set up."""
    cfg = OmegaConf.create(
        {"seed": seed, "dataset": OmegaConf.load(ROOT / "conf" / "dataset" / f"{name}.yaml")}
    )
    dm = instantiate(cfg.dataset)
    dm.setup()
    return dm


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
    eps = dm.exact_eps(schedule.alpha_bar)

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
