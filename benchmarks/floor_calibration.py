"""How often does an *exact* sample of a toy density land inside the floor band? The project's
rule (``metrics.floor_bands``: pairs of two fresh real samples, training and reference pooled)
beside an alternative that holds the reference fixed (a random subset of the training sample
against the reference sample every model is scored against).

A model is scored against one fixed reference sample of 2,000 points, so a band is calibrated
when exact draws of the density (fresh seeds, the task's standardisation) land at or below its
top about 95 % of the time on *every* reference, not only on average over references.

    python benchmarks/floor_calibration.py --seeds 0 1 2 --draws 16 --out DIR
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.toy_oracles import (  # noqa: E402
    DENSITIES,
    density_data,
    exact_sample,
    metric_options,
    write_results,
)
from lightning_modules.diffusion import metrics  # noqa: E402
from lightning_modules.utils.seeds import derive_seed  # noqa: E402

KEYS = ("sw", "sinkhorn", "mmd")
RULES = ("pooled", "conditioned")


def conditioned_tops(reference, real, n: int, *, floor_pairs: int, seed: int, **options) -> dict:
    """The alternative: 95 % points over random size-``n`` subsets of ``real`` vs ``reference``."""
    scores = metrics._scorer(reference[:n], seed=seed, **options)
    g = torch.Generator().manual_seed(seed + 1)
    values = [
        scores(real[torch.randperm(len(real), generator=g)[:n]], reference[:n])
        for _ in range(floor_pairs)
    ]
    return {f"{k}_floor_hi": float(np.quantile([v[k] for v in values], 0.95)) for k in KEYS}


def calibrate(densities, seeds, draws: int, task) -> tuple[list[str], list[dict]]:
    options = metric_options(task)
    pairs = int(task.floor_pairs)
    lines = [
        f"## floor_calibration ({draws} exact draws per reference, {pairs} pairs per band; "
        f"threads={torch.get_num_threads()})",
        "",
        "| density | seed | SW band top: pooled / conditioned | exact draws' SW, median | "
        "exact draws inside (SW, Sinkhorn, MMD): pooled | conditioned |",
        "|---|---|---|---|---|---|",
    ]
    rows = []
    for name in densities:
        for seed in seeds:
            dm = density_data(name, seed)
            ref, train = dm.reference_x.double(), dm.train_x.double()
            n = len(ref)
            band = {"floor_pairs": pairs, "seed": seed, **options}
            tops = {
                "pooled": metrics.floor_bands(ref, train, n, **band),
                "conditioned": conditioned_tops(ref, train, n, **band),
            }
            exact = [
                exact_sample(name, dm, n, derive_seed(seed, "floor_calibration", k))
                for k in range(draws)
            ]
            m = metrics.vector_sample_metrics(
                exact, ref, train, floors=tops["pooled"], seed=seed, **options
            )
            row = {"density": name, "seed": seed, "exact_sw_median": m["sw"]}
            for rule in RULES:
                for k in KEYS:
                    row[f"{rule}_{k}_top"] = tops[rule][f"{k}_floor_hi"]
                    row[f"{rule}_{k}_inside"] = float(
                        np.mean(np.array(m[f"{k}_draws"]) <= tops[rule][f"{k}_floor_hi"])
                    )
            rows.append(row)
            cells = [
                ", ".join(f"{100 * row[f'{r}_{k}_inside']:.0f} %" for k in KEYS) for r in RULES
            ]
            lines.append(
                f"| {name} | {seed} | {row['pooled_sw_top']:.3f} / {row['conditioned_sw_top']:.3f} "
                f"| {m['sw']:.3f} | {cells[0]} | {cells[1]} |"
            )
            print(lines[-1], file=sys.stderr, flush=True)
    summary = []
    for rule in RULES:
        cells = []
        for k in KEYS:
            v = np.array([r[f"{rule}_{k}_inside"] for r in rows])
            cells.append(f"{100 * v.mean():.0f} % ({100 * v.min():.0f}-{100 * v.max():.0f})")
        summary.append(", ".join(cells))
    lines.append(f"| all: mean (min-max) over references | | | | {summary[0]} | {summary[1]} |")
    return lines, rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--densities", nargs="+", default=list(DENSITIES), choices=DENSITIES)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--draws", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None, help="write table.md and rows.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    task = OmegaConf.load(ROOT / "conf" / "task" / "ddpm.yaml").ddpm
    lines, rows = calibrate(args.densities, args.seeds, args.draws, task)
    write_results(args.out, lines, rows)
    return rows


if __name__ == "__main__":
    main()
