"""Issue 6's target, measured end to end through ``train.py``: on the 2-D swiss roll, does an FTT
trained by ALS or Riemannian GD reach the sliced Wasserstein of the ResNet-MLP trained by Adam,
in less training time and with fewer parameters?

Each method is one ``python train.py task=ddpm dataset=swiss_roll ...`` run in its own process
(the commands are printed and stored); the table reads their ``summary.json``: parameters,
training seconds (sampling excluded), SW and MMD of 2000 samples against the held-out reference,
each beside its floor (real vs real).

    python benchmarks/tt_compare.py                       # one seed, ~8 minutes on 2 CPU cores
    python benchmarks/tt_compare.py --seeds 0 1 2         # median over seeds
    python benchmarks/tt_compare.py --methods "FTT + ALS" "ResNet + Adam" --out /tmp/cmp
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
BASE = ["task=ddpm", "dataset=swiss_roll", "logger=csv", "trainer.enable_progress_bar=false"]
METHODS = {
    # the task's defaults: 100 epochs of Adam (lr 2e-3, EMA 0.995) on the ResNet-MLP
    "ResNet + Adam": ["eps_net=resnet"],
    "FTT + Adam": ["eps_net=ftt", "eps_net.init=linear", "ddpm.lr=0.01", "ddpm.epochs=30"],
    # ALS: 2 steps of 2 sweeps on 65536 fresh triples each; EMA off (ALS re-gauges the cores)
    "FTT + ALS": [
        "eps_net=ftt",
        "ddpm.optimizer=als",
        "ddpm.steps=2",
        "als.samples=65536",
        "ddpm.ema=null",
    ],
    "FTT + ALS (rank 4)": [
        "eps_net=ftt",
        "eps_net.rank=4",
        "ddpm.optimizer=als",
        "ddpm.steps=2",
        "als.samples=32768",
        "ddpm.ema=null",
    ],
    "FTT + Riemannian": [
        "eps_net=ftt",
        "eps_net.init=linear",
        "ddpm.optimizer=riemannian",
        "riemannian.lr=300",
        "ddpm.steps=1500",
        "ddpm.ema=null",
    ],
}
KEYS = ["params", "train_s", "sample_s", "sw", "sw_floor", "mmd", "mmd_floor", "final_loss"]


def run_one(label: str, seed: int, out: Path, extra: list[str]) -> dict:
    run_dir = (
        out
        / f"{label.replace(' ', '_').replace('+', '').replace('(', '').replace(')', '')}_seed{seed}"
    )
    argv = [
        sys.executable,
        str(ROOT / "train.py"),
        *BASE,
        *METHODS[label],
        f"seed={seed}",
        f"paths.output_dir={run_dir}",
        *extra,
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    r = subprocess.run(argv, cwd=out, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stderr[-2000:], file=sys.stderr)
        return {"method": label, "seed": seed, "error": r.stderr.strip().splitlines()[-1][:120]}
    summary = json.loads((run_dir / "summary.json").read_text())
    command = "python train.py " + " ".join([*BASE, *METHODS[label], f"seed={seed}", *extra])
    return {
        "method": label,
        "seed": seed,
        "command": command,
        "wall_s": time.perf_counter() - start,
        **{k: summary.get(k) for k in KEYS},
    }


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "tt_compare")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra overrides for every run")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for label in args.methods:
        for seed in args.seeds:
            res = run_one(label, seed, args.out, args.overrides)
            runs.append(res)
            print(
                f"  {label} seed {seed}: "
                + ", ".join(
                    f"{k}={res.get(k)}"
                    for k in ("sw", "train_s", "error")
                    if res.get(k) is not None
                ),
                flush=True,
            )
    rows = []
    for label in args.methods:
        ok = [r for r in runs if r["method"] == label and "error" not in r]
        if not ok:
            rows.append(
                f"| {label} | failed: {next(r['error'] for r in runs if r['method'] == label)} |"
            )
            continue
        med = {k: statistics.median(r[k] for r in ok) for k in KEYS if ok[0].get(k) is not None}
        sws = ", ".join(f"{r['sw']:.3f}" for r in ok)
        rows.append(
            f"| {label} | {med['params']:,.0f} | {med['train_s']:.1f} | {med['sw']:.3f} ({sws}) | "
            f"{med['sw_floor']:.3f} | {med['mmd']:.4f} | {med['mmd_floor']:.4f} | "
            f"{med['final_loss']:.3f} |"
        )
    header = (
        "| method | params | train s | SW (per seed) | SW floor | MMD | MMD floor | final loss |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    commands = "\n".join(f"    {r['command']}" for r in runs if "command" in r)
    text = (
        f"## tt_compare (median over seeds {args.seeds})\n\n{header}\n"
        + "\n".join(rows)
        + f"\n\nCommands:\n\n{commands}\n"
    )
    print(text)
    tmp = args.out / ".table.md.tmp"
    tmp.write_text(text)
    tmp.replace(args.out / "table.md")
    (args.out / "runs.json").write_text(json.dumps(runs, indent=2))
    return text


if __name__ == "__main__":
    main()
