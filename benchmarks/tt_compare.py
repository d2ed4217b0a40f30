"""The TT study on the toy-density suite, end to end through ``train.py``: every density x
method x basis x seed is one ``python train.py task=ddpm dataset=<density> ...`` run in its own
process (the commands are stored); the table reads their ``summary.json``: parameters, training
and sampling seconds, SW / Sinkhorn / MMD as the median of the sample draws beside the floor
band (5-95 % over real-vs-real pairs), and the structure metric beside the data's own.

    python benchmarks/tt_compare.py                                    # swiss roll, all methods
    python benchmarks/tt_compare.py --datasets moons circles 8gaussians checkerboard pinwheel \
        2spirals swiss_roll --methods "ResNet + Adam" "FTT + ALS" "FTT + DMRG" \
        --overrides ddpm.sampler=ddim ddpm.sample_steps=50 --out benchmarks/results/tt_suite
    python benchmarks/tt_compare.py --bases bspline legendre fourier --seeds 0 1 2
    python benchmarks/tt_compare.py --datasets "tabular dataset.name=wine" \
        "cifar10_pca dataset.dim=32 dataset.data_dir=$PWD/../shared/data dataset.download=false"

A dataset spec is the ``dataset=`` value followed by that dataset's own overrides. A run
folder under ``--out`` that holds a finished run of the same overrides is read, not rerun: a
killed study restarted with the same command loses only the run it was in.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = ["task=ddpm", "logger=csv", "trainer.enable_progress_bar=false"]
METHODS = {
    # the task's defaults: 100 epochs of Adam (lr 2e-3, EMA 0.995) on the ResNet-MLP
    "ResNet + Adam": ["eps_net=resnet"],
    "FTT + Adam": ["eps_net=ftt", "eps_net.init=linear", "ddpm.lr=0.01", "ddpm.epochs=30"],
    # ALS: 2 steps of 2 sweeps on 65536 fresh triples each; EMA off (ALS re-gauges the cores)
    # ALS and DMRG ran from the identity init (the default before eps_net.init=auto)
    "FTT + ALS": [
        "eps_net=ftt",
        "eps_net.init=identity",
        "ddpm.optimizer=als",
        "ddpm.steps=2",
        "als.samples=65536",
        "ddpm.ema=null",
    ],
    "FTT + ALS (rank 4)": [
        "eps_net=ftt",
        "eps_net.init=identity",
        "eps_net.rank=4",
        "ddpm.optimizer=als",
        "ddpm.steps=2",
        "als.samples=32768",
        "ddpm.ema=null",
    ],
    # DMRG: the task's dmrg block (2 steps of 2 sweeps on 32768 triples, ridge 1e-4, max rank 8)
    "FTT + DMRG": ["eps_net=ftt", "eps_net.init=identity", "ddpm.optimizer=dmrg", "ddpm.ema=null"],
    "FTT + Riemannian": [
        "eps_net=ftt",
        "eps_net.init=linear",
        "ddpm.optimizer=riemannian",
        "ddpm.steps=1500",
        "ddpm.ema=null",
    ],
    # the real-data comparison (tabular, cifar10_pca): an output core (eps_net.output=auto
    # beyond D = 8) with the PCA skip, rank 4 so that the FTT has at most half the ResNet's
    # parameters at D = 32; the skip alone is the Gaussian baseline every FTT arm starts from
    "ResNet + Adam, 2000 steps": ["eps_net=resnet", "ddpm.steps=2000"],
    "PCA skip alone": ["eps_net=ftt", "eps_net.rank=4", "ddpm.lr=0", "ddpm.steps=1"],
    "FTT r4 + Adam": ["eps_net=ftt", "eps_net.rank=4", "ddpm.steps=2000"],
    "FTT r4 + ALS": [
        "eps_net=ftt",
        "eps_net.rank=4",
        "ddpm.optimizer=als",
        "ddpm.steps=6",
        "ddpm.ema=null",
    ],
    "FTT r4 + Riemannian": [
        "eps_net=ftt",
        "eps_net.rank=4",
        "ddpm.optimizer=riemannian",
        "ddpm.steps=300",
        "ddpm.ema=null",
    ],
    # what a user gets without options `python train.py task=ddpm
    # dataset=<density> eps_net=ftt [ddpm.optimizer=...]`
    "FTT + Adam, defaults": ["eps_net=ftt"],
    "FTT + ALS, defaults": ["eps_net=ftt", "ddpm.optimizer=als"],
    "FTT + DMRG, defaults": ["eps_net=ftt", "ddpm.optimizer=dmrg"],
    "FTT + Riemannian, defaults": ["eps_net=ftt", "ddpm.optimizer=riemannian"],
    # ALS with twice the splines per coordinate (time keeps 16): the capacity probe's best
    # parameter count on checkerboard and 2spirals (the toy-suite study's target), 3,072 in 2-D
    "FTT + ALS, 32 splines": [
        "eps_net=ftt",
        "ddpm.optimizer=als",
        "eps_net.num_basis=32",
        "eps_net.time_basis=16",
    ],
}
# the density form (lightning_modules/tt/density.py) from its k-means start, 64 learned bumps
# per coordinate and rank 64 (a 2-D density is then a non-negative 64 x 64 grid of product
# bumps); its default lr (core_lr_scale auto = 1)
METHODS["FTT density + Adam"] = [
    "eps_net=ftt",
    "eps_net.param=density",
    "eps_net.num_basis=64",
    "eps_net.rank=64",
    "ddpm.steps=4000",
]
# the same size with box bumps (sharp edges stay sharp) from the data's 2-D histogram on the
# 64 x 64 grid of boxes (with rank 64 exactly the histogram density); the start alone, untrained
# (ddpm.lr=0); and Gaussian bumps from the same start (which of the two changes does the work)
HISTOGRAM = [*METHODS["FTT density + Adam"][:4], "eps_net.init=histogram"]
BOXES = [*HISTOGRAM, "eps_net.bump=box"]
METHODS["FTT density, boxes + Adam"] = [*BOXES, "ddpm.steps=4000"]
METHODS["FTT density, boxes, untrained"] = [*BOXES, "ddpm.lr=0", "ddpm.steps=1"]
METHODS["FTT density, Gaussians + Adam"] = [*HISTOGRAM, "ddpm.steps=4000"]
TOY_METHODS = list(METHODS)[:6]  # the default: the arms of the 2-D suite
BANDED = ["sw", "sinkhorn", "mmd"]
KEYS = ["params", "train_s", "sample_s", "final_loss", "mode_share", "mode_share_data"]
KEYS += ["mode_share_oracle"]
KEYS += [f"{m}{s}" for m in BANDED for s in ("", "_floor", "_floor_lo", "_floor_hi")]
KEYS += ["sw_in_band", "sinkhorn_in_band", "mmd_in_band", "mode_share_ok", "bond_ranks"]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


def dataset_args(spec: str) -> list[str]:
    """``"moons"`` → ``[dataset=moons]``; ``"tabular dataset.name=wine"`` → the dataset and its
    own overrides (a spec is the ``dataset=`` value followed by overrides, space-separated)."""
    name, *overrides = spec.split()
    return [f"dataset={name}", *overrides]


def short_name(spec: str) -> str:
    """The spec as a table label: its name and the overrides that select data, not paths
    (``"cifar10_pca dataset.dim=32 dataset.data_dir=..."`` → ``"cifar10_pca dim=32"``)."""
    name, *overrides = spec.split()
    keep = [o.removeprefix("dataset.") for o in overrides if "/" not in o]
    return " ".join([name, *(o for o in keep if not o.startswith("download"))])


def finished_with(run_dir: Path, overrides: list[str]) -> bool:
    """Whether ``run_dir`` holds a finished run of exactly these overrides (Hydra's
    ``.hydra/overrides.yaml``): a killed study restarted with the same command reruns only what
    it had not finished."""
    import yaml

    recorded = run_dir / ".hydra" / "overrides.yaml"
    finished = (run_dir / "summary.json").exists() and recorded.exists()
    return finished and yaml.safe_load(recorded.read_text()) == overrides


def run_one(label: str, dataset: str, basis: str, seed: int, out: Path, extra: list[str]) -> dict:
    run_dir = out / f"{_slug(short_name(dataset))}_{_slug(label)}_{basis}_seed{seed}"
    basis_arg = [f"eps_net.basis={basis}"] if "FTT" in label else []
    args = [*dataset_args(dataset), *METHODS[label], *basis_arg, f"seed={seed}", *extra]
    argv = [sys.executable, str(ROOT / "train.py"), *BASE, *args, f"paths.output_dir={run_dir}"]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    reused = finished_with(run_dir, argv[2:])
    r = None if reused else subprocess.run(argv, cwd=out, env=env, capture_output=True, text=True)
    if r is not None and r.returncode != 0:
        print(r.stderr[-2000:], file=sys.stderr)
        error = (r.stderr.strip().splitlines() or ["?"])[-1][:160]
        return {
            "method": label,
            "dataset": short_name(dataset),
            "basis": basis,
            "seed": seed,
            "error": error,
        }
    summary = json.loads((run_dir / "summary.json").read_text())
    command = "python train.py " + " ".join([*BASE, *args])
    return {
        "method": label,
        "dataset": short_name(dataset),
        "basis": basis,
        "seed": seed,
        "command": command,
        "wall_s": summary.get("wall_s") if reused else time.perf_counter() - start,
        **{k: summary.get(k) for k in KEYS},
    }


def _cell(ok: list[dict], key: str) -> str:
    """Median over seeds with the floor band and an in-band mark."""
    med = statistics.median(r[key] for r in ok)
    lo = statistics.median(r[f"{key}_floor_lo"] for r in ok)
    hi = statistics.median(r[f"{key}_floor_hi"] for r in ok)
    inside = sum(bool(r[f"{key}_in_band"]) for r in ok)
    return f"{med:.3f} [{lo:.3f}, {hi:.3f}] {inside}/{len(ok)}"


def table(runs: list[dict]) -> str:
    header = (
        "| density | method | basis | params | train s | sample s | SW [floor band] in | "
        "Sinkhorn [floor band] in | MMD [floor band] in | mode share (data; exact predictor) | "
        "ranks |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    rows, seen = [], []
    for r in runs:
        key = (r["dataset"], r["method"], r["basis"])
        if key not in seen:
            seen.append(key)
    for dataset, label, basis in seen:
        group = [
            r for r in runs if (r["dataset"], r["method"], r["basis"]) == (dataset, label, basis)
        ]
        ok = [r for r in group if "error" not in r]
        basis_txt = basis if "FTT" in label else "-"
        if not ok:
            rows.append(f"| {dataset} | {label} | {basis_txt} | failed: {group[0]['error']} |")
            continue
        med = {k: statistics.median(r[k] for r in ok) for k in ("params", "train_s", "sample_s")}
        if ok[0].get("mode_share") is not None:
            share = statistics.median(r["mode_share"] for r in ok)
            mode = f"{100 * share:.1f} % ({100 * ok[0]['mode_share_data']:.1f} %"
            if ok[0].get("mode_share_oracle") is not None:  # the exact predictor, same chain
                exact = statistics.median(r["mode_share_oracle"] for r in ok)
                mode += f"; exact predictor {100 * exact:.1f} %"
            mode += ")"
        else:
            mode = "-"
        ranks = ok[0].get("bond_ranks") or "-"
        if isinstance(ranks, list) and len(set(ranks)) == 1:
            ranks = f"{ranks[0]} (all {len(ranks)} bonds)"  # fixed rank: one number, not a list
        rows.append(
            f"| {dataset} | {label} | {basis_txt} | {med['params']:,.0f} | {med['train_s']:.1f} | "
            f"{med['sample_s']:.2f} | {_cell(ok, 'sw')} | {_cell(ok, 'sinkhorn')} | "
            f"{_cell(ok, 'mmd')} | {mode} | {ranks} |"
        )
    return header + "\n" + "\n".join(rows)


def plot(runs: list[dict], path: Path) -> None:
    """SW of each method per density, as a ratio to the floor band's upper end (1 = its edge)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in runs if "error" not in r]
    datasets = list(dict.fromkeys(r["dataset"] for r in ok))

    def name(r):
        return f"{r['method']} ({r['basis']})" if "FTT" in r["method"] else r["method"]

    methods = list(dict.fromkeys(name(r) for r in ok))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for j, method in enumerate(methods):
        for ax, key in zip(axes, ("sw", "sinkhorn")):
            xs, ys = [], []
            for i, d in enumerate(datasets):
                vals = [
                    r[key] / r[f"{key}_floor_hi"]
                    for r in ok
                    if r["dataset"] == d and name(r) == method
                ]
                if vals:
                    xs.append(i + 0.8 * (j / max(len(methods), 1) - 0.4))
                    ys.append(statistics.median(vals))
            ax.bar(xs, ys, width=0.8 / max(len(methods), 1), label=method)
    for ax, key in zip(axes, ("SW", "Sinkhorn")):
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xticks(range(len(datasets)), datasets, rotation=30)
        ax.set_ylabel(f"{key} / floor band top (<= 1: inside)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=TOY_METHODS, choices=list(METHODS))
    parser.add_argument("--datasets", nargs="+", default=["swiss_roll"])
    parser.add_argument("--bases", nargs="+", default=["bspline"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "tt_compare")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra overrides for every run")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()  # the runs' cwd is the output folder
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for dataset in args.datasets:
        for label in args.methods:
            for basis in args.bases if "FTT" in label else ["bspline"]:
                for seed in args.seeds:
                    res = run_one(label, dataset, basis, seed, args.out, args.overrides)
                    runs.append(res)
                    shown = ("sw", "sw_floor_hi", "sinkhorn", "mode_share", "train_s", "error")
                    print(
                        f"  {dataset} | {label} | {basis} | seed {seed}: "
                        + ", ".join(f"{k}={res.get(k)}" for k in shown if res.get(k) is not None),
                        flush=True,
                    )
                    (args.out / "runs.json").write_text(json.dumps(runs, indent=2))
    commands = "\n".join(f"    {r['command']}" for r in runs if "command" in r)
    write_table(runs, args.seeds, commands, args.out)
    return (args.out / "table.md").read_text()


def write_table(runs: list[dict], seeds: list[int], commands: str, out: Path) -> None:
    """``table.md`` and ``suite.png`` in ``out`` for ``runs`` (also for runs.json files merged
    by hand: ``write_table(json.load(...) + json.load(...), ...)``)."""
    text = (
        f"## tt_compare (median over seeds {seeds}; cells: median of the sample draws "
        "[floor band 5-95 %] and how many seeds are inside the band)\n\n"
        + table(runs)
        + f"\n\nCommands:\n\n{commands}\n"
    )
    print(text)
    tmp = out / ".table.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "table.md")
    plot(runs, out / "suite.png")


if __name__ == "__main__":
    main()
