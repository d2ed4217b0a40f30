"""Sampling quality vs steps: one FTT trained by ALS (the task's defaults) per density, then
sampled by the ancestral chain and by DDIM (η = 0) with 10, 50, 200 and 1000 steps; each row is
the time to draw 2000 samples (one batched network call per step for all samples) and SW /
Sinkhorn against the held-out reference beside the floor band, plus the structure metric.

    python benchmarks/tt_sampling.py --datasets moons checkerboard \
        --out benchmarks/results/tt_sampling
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from datamodules.toy_densities import ToyDensityDataModule
from lightning_modules.diffusion import metrics
from lightning_modules.diffusion.schedules import NoiseSchedule
from lightning_modules.tt.als import ALS
from lightning_modules.tt.ftt import FunctionalTT

ROOT = Path(__file__).resolve().parents[1]


def train_ftt(x0: torch.Tensor, schedule: NoiseSchedule, seed: int) -> tuple[FunctionalTT, float]:
    """conf/eps_net/ftt.yaml + the task's als block: 2 steps x 2 sweeps x 65536 triples."""
    net = FunctionalTT(
        data_shape=(2,), timesteps=schedule.timesteps, data_bounds=(x0.amin(0), x0.amax(0))
    )
    g = torch.Generator().manual_seed(seed)

    def draw():
        idx = torch.randint(0, len(x0), (256,), generator=g)
        return schedule.training_triple(x0[idx], g)

    als = ALS(net, ridge=1e-6, sweeps=2, samples=65536, batch=2048, fixed=False)
    start = time.perf_counter()
    for _ in range(2):
        als.step(draw)
    return net, time.perf_counter() - start


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--datasets", nargs="+", default=["moons", "checkerboard"])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 50, 200, 1000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "tt_sampling")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    schedule = NoiseSchedule.from_config("linear", 1000)
    rows = []
    for density in args.datasets:
        noise = OmegaConf.load(ROOT / "conf" / "dataset" / f"{density}.yaml").noise
        dm = ToyDensityDataModule(density=density, noise=noise, seed=args.seed)
        dm.setup()
        x0 = dm.train_x
        net, train_s = train_ftt(x0, schedule, args.seed)
        lo, hi = x0.amin(0), x0.amax(0)
        clip = (lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
        own = dm.structure_metric(dm.to_data_space(dm.reference_x))["mode_share"]
        floors = metrics.floor_bands(dm.reference_x, x0, len(dm.reference_x), seed=args.seed)
        for sampler in ("ancestral", "ddim"):
            for steps in args.steps:
                g = torch.Generator().manual_seed(args.seed + 1)
                start = time.perf_counter()
                with torch.no_grad():
                    x, _ = schedule.sample(
                        net, 2000, (2,), g, steps=steps, sampler=sampler, clip=clip
                    )
                sample_s = time.perf_counter() - start
                m = metrics.vector_sample_metrics(
                    x, dm.reference_x, x0, seed=args.seed, floors=floors
                )
                share = dm.structure_metric(dm.to_data_space(x))["mode_share"]
                row = {
                    "dataset": density,
                    "sampler": sampler,
                    "steps": steps,
                    "sample_s": sample_s,
                    "train_s": train_s,
                    "mode_share": share,
                    "mode_share_data": own,
                    **{k: m[k] for k in m if not k.endswith("_draws")},
                }
                rows.append(row)
                print(
                    f"{density} {sampler} {steps}: {sample_s:.2f} s, SW {m['sw']:.3f} "
                    f"[{m['sw_floor_lo']:.3f}, {m['sw_floor_hi']:.3f}], Sinkhorn "
                    f"{m['sinkhorn']:.3f} [{m['sinkhorn_floor_lo']:.3f}, "
                    f"{m['sinkhorn_floor_hi']:.3f}], mode share {share:.3f} ({own:.3f})",
                    flush=True,
                )
                (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    lines = [
        "| density | sampler | steps | sample s | SW [floor band] | Sinkhorn [floor band] | "
        "mode share (data) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['sampler']} | {r['steps']} | {r['sample_s']:.2f} | "
            f"{r['sw']:.3f} [{r['sw_floor_lo']:.3f}, {r['sw_floor_hi']:.3f}] | "
            f"{r['sinkhorn']:.3f} [{r['sinkhorn_floor_lo']:.3f}, {r['sinkhorn_floor_hi']:.3f}] | "
            f"{100 * r['mode_share']:.1f} % ({100 * r['mode_share_data']:.1f} %) |"
        )
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
