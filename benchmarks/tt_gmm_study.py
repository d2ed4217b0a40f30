"""Up to which dimension does a tensor-train noise model work? ``dataset=gmm`` against its exact
noise predictor, over D and K.

Arms (each one ``python train.py task=ddpm dataset=gmm dataset.dim=D dataset.components=K ...``
per seed; every arm gets the same ``ddpm.steps`` / ``ddpm.sample_steps`` except ALS, whose
training steps are sweeps):

* ``resnet``: ``eps_net=resnet`` (the ResNet-MLP), Adam;
* ``ftt_eps_adam``: ``eps_net=ftt`` with its defaults (ε form), Adam;
* ``ftt_eps_als``: ``eps_net=ftt eps_net.num_basis=8 eps_net.skip=none`` trained by ALS on
  16,384 fresh pairs per sweep, 4 sweeps (the form the capacity diagnosis points to);
* ``ftt_density``: ``eps_net=ftt eps_net.param=density`` with 8 learned bumps per coordinate
  and rank K, Adam for half the steps (its per-step cost is at or above the ResNet's beyond
  D = 10: the cost question is asked in training time, not steps);
* ``ftt_density_start``: the same model at its k-means start (``init=auto``), not trained (one
  step at ``ddpm.lr=0``): how much of the density arm's quality is the start's.

Per run: parameters, train and sample seconds, final loss, the SW / Sinkhorn / MMD ratios to the
exact predictor, mode share and the largest component-share gap. A run folder holding a finished
run of the same overrides is read, not rerun (``tt_compare.finished_with``), so a killed study
restarted with the same command redoes only what it had not finished. Writes ``cells.json``,
``tt_gmm_study.md`` (the mean and spread over seeds per cell) and ``loss_vs_dim.png`` /
``ratio_vs_dim.png`` under ``--out``.

    python benchmarks/tt_gmm_study.py --out runs/tt_gmm_study          # the full grid (hours)
    python benchmarks/tt_gmm_study.py --dims 10 20 --components 4 --seeds 0 --out runs/slice
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.tt_compare import finished_with  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE = ["task=ddpm", "dataset=gmm", "logger=csv", "trainer.enable_progress_bar=false", "threads=1"]
ARMS = ("resnet", "ftt_eps_adam", "ftt_eps_als", "ftt_density", "ftt_density_start")
KEYS = ["params", "train_s", "sample_s", "final_loss", "sw_ratio", "sinkhorn_ratio", "mmd_ratio"]
KEYS += ["mode_share", "mode_share_oracle", "component_share_gap", "component_share_gap_oracle"]


def arm_args(arm: str, components: int, steps: int) -> list[str]:
    """The overrides of one arm (module docstring)."""
    if arm == "resnet":
        return ["eps_net=resnet", f"ddpm.steps={steps}"]
    if arm == "ftt_eps_adam":
        return ["eps_net=ftt", f"ddpm.steps={steps}"]
    if arm == "ftt_eps_als":
        return [
            "eps_net=ftt",
            "eps_net.num_basis=8",
            "eps_net.skip=none",
            "ddpm.optimizer=als",
            "als.samples=16384",
            "als.sweeps=4",
            "ddpm.steps=1",
        ]
    density = ["eps_net=ftt", "eps_net.param=density", "eps_net.num_basis=8"]
    density.append(f"eps_net.rank={components}")
    if arm == "ftt_density":
        return [*density, f"ddpm.steps={max(1, steps // 2)}"]
    if arm == "ftt_density_start":  # the k-means start alone: one step at lr 0
        return [*density, "ddpm.lr=0", "ddpm.steps=1"]
    raise SystemExit(f"unknown arm {arm!r}; use {', '.join(ARMS)}")


def run_one(arm, dim, components, seed, args) -> dict:
    run_dir = args.out / f"{arm}_d{dim}_k{components}_seed{seed}"
    overrides = [
        *BASE,
        f"dataset.dim={dim}",
        f"dataset.components={components}",
        *arm_args(arm, components, args.steps),
        f"ddpm.sample_steps={args.sample_steps}",
        f"seed={seed}",
        *args.extra,
    ]
    argv = [sys.executable, str(ROOT / "train.py"), *overrides, f"paths.output_dir={run_dir}"]
    cell = {"arm": arm, "dim": dim, "components": components, "seed": seed}
    reused = finished_with(run_dir, argv[2:])
    start = time.perf_counter()
    if not reused:
        env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
        env.setdefault("OMP_NUM_THREADS", "1")
        r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr[-2000:], file=sys.stderr)
            return {**cell, "error": (r.stderr.strip().splitlines() or ["?"])[-1][:160]}
        (run_dir / "wall_s.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    summary = json.loads((run_dir / "summary.json").read_text())
    wall = run_dir / "wall_s.txt"
    return {
        **cell,
        "reused": reused,
        "wall_s": float(wall.read_text()) if wall.exists() else None,
        "command": "python train.py " + " ".join(overrides),
        **{k: summary.get(k) for k in KEYS},
    }


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"


def table(cells: list[dict]) -> str:
    """Mean ± std over seeds per (D, K, arm); failed runs named."""
    cols = ["params", "train_s", "final_loss", "sw_ratio", "sinkhorn_ratio"]
    cols += ["mode_share", "component_share_gap"]
    lines = ["| D | K | arm | seeds | " + " | ".join(cols) + " |"]
    lines.append("|" + "---|" * (4 + len(cols)))
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault((c["dim"], c["components"], c["arm"]), []).append(c)
    for (dim, k, arm), group in sorted(groups.items(), key=lambda kv: kv[0]):
        ok = [c for c in group if "error" not in c]
        if not ok:
            lines.append(f"| {dim} | {k} | {arm} | 0 | failed: {group[0]['error']} |")
            continue
        row = [_mean_spread([float(c[key]) for c in ok]) for key in cols]
        lines.append(f"| {dim} | {k} | {arm} | {len(ok)} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plots(cells: list[dict], out: Path) -> list[Path]:
    """``final_loss`` and ``sw_ratio`` against D, mean over seeds: one colour per arm, solid for
    K = 4 and dashed for K = 8; the ratio on a log axis (a failed arm sits 25x above the rest)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    colours = {arm: f"C{i}" for i, arm in enumerate(ARMS)}
    for key, name in (("final_loss", "loss_vs_dim.png"), ("sw_ratio", "ratio_vs_dim.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        lines: dict[tuple, dict[int, list[float]]] = {}
        for c in cells:
            if "error" not in c and c.get(key) is not None:
                line = lines.setdefault((c["arm"], c["components"]), {})
                line.setdefault(c["dim"], []).append(float(c[key]))
        for (arm, k), points in sorted(lines.items()):
            dims = sorted(points)
            ax.plot(dims, [statistics.mean(points[d]) for d in dims], "o-" if k == 4 else "s--",
                    color=colours.get(arm), label=f"{arm} K={k}")  # fmt: skip
        all_dims = sorted({c["dim"] for c in cells})
        ax.set_xscale("log")
        ax.set_xticks(all_dims, [str(d) for d in all_dims])
        ax.minorticks_off()
        ax.set_xlabel("D")
        ax.set_ylabel(
            key + (" (mean over seeds)" if key == "final_loss" else " to the exact predictor")
        )
        if key == "sw_ratio":
            ax.set_yscale("log")
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.axhline(1.15, color="grey", lw=0.8, ls=":")
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        paths.append(out / name)
    return paths


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[2, 5, 10, 20, 50])
    p.add_argument("--components", type=int, nargs="+", default=[4, 8])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--steps", type=int, default=2000, help="ddpm.steps of the Adam arms")
    p.add_argument("--sample-steps", type=int, default=200, help="ddpm.sample_steps, all arms")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--extra", nargs="*", default=[], help="overrides added to every run")
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    cells = []
    for dim in args.dims:
        for k in args.components:
            for seed in args.seeds:
                for arm in args.arms:
                    cells.append(run_one(arm, dim, k, seed, args))
                    print(json.dumps(cells[-1]), flush=True)
                    (args.out / "cells.json").write_text(json.dumps(cells, indent=1))
    (args.out / "tt_gmm_study.md").write_text(table(cells))
    plots(cells, args.out)
    return cells


if __name__ == "__main__":
    main()
