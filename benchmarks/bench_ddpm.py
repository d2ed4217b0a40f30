"""DDPM noise models on the 2-D and 3-D swiss roll at one fixed training budget.

Each eps-net runs ``python train.py task=ddpm dataset=swiss_roll`` in its default config (own
subprocess, so peak memory is per run) with the same number of optimiser steps, then the
table: parameters, training and sampling seconds, sliced Wasserstein and MMD against the
held-out reference sample, each beside its floor (two independent real samples). The UNet is
for images only and is listed as skipped.

    python benchmarks/bench_ddpm.py                         # 3900 steps (= 100 epochs), D = 2, 3
    python benchmarks/bench_ddpm.py --steps 1000 --dims 2 --nets resnet
    python benchmarks/bench_ddpm.py --eq6                   # also the literal eq. 6 ResNet
    python benchmarks/bench_ddpm.py --out benchmarks/results_ddpm.md
    python benchmarks/bench_ddpm.py --overrides ddpm.sample_steps=100 ddpm.ema=null
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {
    "resnet": ["eps_net=resnet"],
    "resnet (eq. 6 literal)": ["eps_net=resnet", "eps_net.time_in_blocks=false"],
    "ftt": ["eps_net=ftt", "eps_net.init=identity"],  # as measured (before init=auto)
    "unet": None,  # images only
}


def run_one(overrides: list[str], out_dir: Path, threads: int) -> dict:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, str(ROOT / "train.py"), *overrides, f"paths.output_dir={out_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " / ".join(tail)}
    return json.loads((out_dir / "summary.json").read_text())


def row(name: str, dim: int, s: dict) -> str:
    if "skipped" in s or "error" in s:
        return f"| {name} | {dim} | {s.get('skipped') or 'failed: ' + s['error']} |" + " |" * 8
    return (
        f"| {name} | {dim} | {s['params']:,} | {s['train_s']:.1f} | {s['sample_s']:.1f} "
        f"| {s['sw']:.4f} | {s['sw_floor']:.4f} | {s['sw'] / s['sw_floor']:.2f} "
        f"| {s['mmd']:.4f} | {s['mmd_floor']:.4f} | {s['peak_mem_mb']:.0f} |"
    )


HEADER = (
    "| eps-net | D | parameters | train s | sample s | SW | SW floor | SW / floor | MMD "
    "| MMD floor | peak RSS MB |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def main(argv=None) -> list[tuple[str, int, dict]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=3900, help="optimiser steps for every net")
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--nets", nargs="+", default=["resnet", "ftt", "unet"])
    parser.add_argument(
        "--eq6", action="store_true", help="add the literal eq. 6 ResNet (time only at the input)"
    )
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=None, help="also write the table here (markdown)"
    )
    parser.add_argument(
        "--overrides", nargs="*", default=[], help="extra train.py overrides for every run"
    )
    args = parser.parse_args(argv)
    names = list(args.nets)
    if args.eq6 and "resnet (eq. 6 literal)" not in names:
        names.insert(
            names.index("resnet") + 1 if "resnet" in names else 0, "resnet (eq. 6 literal)"
        )
    have_ftt = (ROOT / "lightning_modules" / "tt" / "ftt.py").exists()
    results = []
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_ddpm_") as tmp:
        for dim in args.dims:
            for name in names:
                if VARIANTS.get(name, ()) is None:
                    summary = {"skipped": "skipped: images only"}
                elif name == "ftt" and not have_ftt:
                    summary = {"skipped": "skipped: FunctionalTT not installed"}
                else:
                    overrides = [
                        "task=ddpm",
                        "dataset=swiss_roll",
                        f"dataset.dim={dim}",
                        *VARIANTS[name],
                        f"ddpm.steps={args.steps}",
                        f"seed={args.seed}",
                        "logger=none",
                        "trainer.enable_progress_bar=false",
                        *args.overrides,
                    ]
                    out = Path(tmp) / f"{name.split()[0]}_{len(results)}_d{dim}"
                    summary = run_one(overrides, out, args.threads)
                results.append((name, dim, summary))
                print(row(name, dim, summary), flush=True)
    if args.out:
        lines = [
            f"DDPM on the swiss roll, {args.steps} optimiser steps per net, seed {args.seed}, "
            f"OMP_NUM_THREADS={args.threads}; SW/MMD against 2000 held-out points, "
            "floor = the same metric between two real samples.",
            "",
            HEADER,
            *(row(n, d, s) for n, d, s in results),
        ]
        args.out.write_text("\n".join(lines) + "\n")
    return results


if __name__ == "__main__":
    main()
