"""Capacity or optimisation? Noise models fitted to the *exact* noise predictor of a Gaussian
mixture (``dataset=gmm``) beside the same models trained on the DDPM loss.

The DDPM loss splits as ``E||ε - ε_θ||² = E||ε - ε*||² + E||ε* - ε_θ||²`` (ε* = E[ε | x_t], the
mixture's closed form, ``lightning_modules/diffusion/oracles.py``): the first term is the same for
every model, the second (*excess*) is what a model can improve. Each row fits one model with one
solver to one target on (x_t, t) pairs from the training sample and reports the excess on
held-out pairs from the reference sample, per coordinate, overall and by noise level:

* target ε*: least squares directly to the exact predictor. For an FTT, ALS solves each core's
  least squares exactly, so many sweeps on a fixed sample give (close to) the best the
  representation reaches: its *capacity*; for the ResNet-MLP it is Adam's regression.
* target ε: the DDPM loss itself (same solver, same samples/steps), i.e. what training reaches.

    python benchmarks/tt_gmm_capacity.py --dim 10 --components 4
    python benchmarks/tt_gmm_capacity.py --dim 20 --components 8 --ftt core:none:16:8 \\
        --adam-ftt core:pca:16:8 --out benchmarks/results/tt_gmm_capacity/d20_k8

``--ftt output:skip:num_basis:rank`` names the FTT forms fitted by ALS (with a skip, ALS fits
the TT to the skip's *normalised* residual ``(target - skip) / c_out``, the project's ALS
objective, so its error in ε is weighted by 1 / c_out²); ``--adam-ftt`` those trained by Adam
(error in ε itself), beside the ResNet-MLP (width 64, depth 3, the task's default).

The schedule is ``conf/task/ddpm.yaml``'s (linear β, T = 1000); ``t`` is uniform. Prints a
Markdown table; ``--out`` also writes ``table.md`` and ``rows.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datamodules.gmm import GaussianMixtureDataModule  # noqa: E402
from lightning_modules.diffusion.schedules import NoiseSchedule  # noqa: E402
from lightning_modules.diffusion.steppers import make_stepper  # noqa: E402
from lightning_modules.nets.eps_mlp import ResNetMLP  # noqa: E402
from lightning_modules.tt.ftt import FunctionalTT  # noqa: E402

#: noise-level bands of the excess error (0-based t)
BANDS = ((0, 100), (100, 500), (500, 1000))


def pool(x0: torch.Tensor, schedule: NoiseSchedule, eps_star, n: int, seed: int) -> dict:
    """``n`` (x_t, t, ε, ε*) with x_0 drawn (with replacement) from ``x0``, t uniform."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(x0), (n,), generator=g)
    x_t, t, eps = schedule.training_triple(x0[pick], g)
    return {"x_t": x_t, "t": t, "eps": eps, "star": eps_star(x_t, t)}


def excess(net, test: dict, batch: int = 4096) -> dict:
    """Per-coordinate mean of (ε_θ - ε*)² on ``test``: overall and per band of :data:`BANDS`."""
    with torch.no_grad():
        pred = torch.cat(
            [
                net(test["x_t"][i : i + batch], test["t"][i : i + batch])
                for i in range(0, len(test["t"]), batch)
            ]
        )
    err = ((pred - test["star"]) ** 2).mean(1)
    out = {"excess": float(err.mean())}
    for lo, hi in BANDS:
        band = (test["t"] >= lo) & (test["t"] < hi)
        out[f"excess_t{lo}"] = float(err[band].mean())
    return out


def fit_als(net, train: dict, target: str, sweeps: int, ridge: float) -> float:
    """``sweeps`` ALS sweeps on the fixed ``train`` pool with ``target`` (``star`` or ``eps``)."""
    n = len(train["t"])
    stepper = make_stepper(
        "als", net, ridge=ridge, sweeps=sweeps, samples=n, batch=4096, fixed=True
    )
    start = time.perf_counter()
    stepper.step(lambda: (train["x_t"], train["t"], train[target]))
    return time.perf_counter() - start


def fit_adam(net, x0, schedule, eps_star, target: str, steps: int, lr: float, seed: int) -> float:
    """``steps`` Adam steps (the task's stepper, grad clip 1) on fresh batches of 256."""
    stepper = make_stepper("adam", net, lr=lr, weight_decay=0.0, grad_clip=1.0)
    g = torch.Generator().manual_seed(seed)

    def draw():
        x_t, t, eps = schedule.training_triple(
            x0[torch.randint(0, len(x0), (256,), generator=g)], g
        )
        return x_t, t, eps_star(x_t, t) if target == "star" else eps

    start = time.perf_counter()
    for _ in range(steps):
        stepper.step(draw, lambda v: v)
    return time.perf_counter() - start


def ftt(dm, schedule, *, rank, num_basis, output, skip, seed) -> FunctionalTT:
    x = dm.train_x
    return FunctionalTT(
        data_shape=(dm.dim,),
        timesteps=schedule.timesteps,
        data_bounds=(x.amin(0), x.amax(0)),
        rank=rank,
        num_basis=num_basis,
        output=output,
        init="identity",
        skip=skip,
        skip_components=min(128, dm.dim),
        train_data=x,
        alpha_bar=schedule.alpha_bar,
        core_lr_scale="auto",
        seed=seed,
    )


def line(row: dict) -> str:
    bands = " | ".join(f"{row[f'excess_t{lo}']:.4f}" for lo, _ in BANDS)
    return (
        f"| {row['model']} | {row['solver']} | {row['target']} | {row['params']:,} | "
        f"{row['excess']:.4f} | {bands} | {row['fit_s']:.1f} |"
    )


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=10)
    p.add_argument("--components", type=int, default=4)
    p.add_argument("--separation", type=float, default=6.0)
    p.add_argument(
        "--ftt",
        nargs="*",
        default=["core:none:8:4", "core:none:8:8", "core:none:16:4", "core:none:16:8",
                 "per_coordinate:none:16:8", "core:pca:16:8"],
        help="FTT forms fitted by ALS, each output:skip:num_basis:rank",
    )  # fmt: skip
    p.add_argument("--targets", nargs="+", default=["star", "eps"], choices=["star", "eps"])
    p.add_argument(
        "--adam-ftt", nargs="*", default=["core:pca:16:8", "core:none:16:8"], help="as --ftt"
    )
    p.add_argument("--samples", type=int, default=32768, help="ALS pool of (x_t, t) pairs")
    p.add_argument("--sweeps", type=int, default=6, help="ALS sweeps on the fixed pool")
    p.add_argument("--ridge", type=float, default=1e-6)
    p.add_argument("--adam-steps", type=int, default=3000, help="0: no Adam rows")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--test", type=int, default=8192, help="held-out (x_t, t) pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    task = OmegaConf.load(ROOT / "conf" / "task" / "ddpm.yaml").ddpm
    schedule = NoiseSchedule.from_config(
        task.schedule, task.timesteps, task.beta_start, task.beta_end
    )
    dm = GaussianMixtureDataModule(
        dim=args.dim, components=args.components, separation=args.separation, seed=args.seed
    )
    dm.setup()
    eps_star = dm.exact_eps(schedule.alpha_bar)
    train = pool(dm.train_x, schedule, eps_star, args.samples, args.seed + 1)
    test = pool(dm.reference_x, schedule, eps_star, args.test, args.seed + 2)
    floor = float(((test["eps"] - test["star"]) ** 2).mean())
    bands = " | ".join(f"excess t∈[{lo},{hi})" for lo, hi in BANDS)
    lines = [
        f"## tt_gmm_capacity: gmm D={args.dim} K={args.components} separation "
        f"{args.separation}; held-out excess E(ε_θ - ε*)² per coordinate on {args.test} pairs "
        f"(the DDPM loss = {floor:.4f} + excess); ALS: {args.sweeps} sweeps on {args.samples} "
        f"fixed pairs, ridge {args.ridge}; Adam: {args.adam_steps} steps of 256, lr {args.lr}; "
        f"seed {args.seed}; threads={torch.get_num_threads()}",
        "",
        f"| model | solver | target | params | excess | {bands} | fit s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows: list[dict] = []

    def record(model: str, solver: str, target: str, net, seconds: float) -> None:
        params = sum(q.numel() for q in net.parameters())
        row = {"model": model, "solver": solver, "target": target, "params": params,
               "fit_s": seconds, **excess(net, test)}  # fmt: skip
        rows.append(row)
        lines.append(line(row))
        print(lines[-1], file=sys.stderr, flush=True)

    def zero(x, t):
        return torch.zeros_like(x)

    zero_row = {"model": "ε̂ = 0", "solver": "-", "target": "-", "params": 0, "fit_s": 0.0}
    rows.append({**zero_row, **excess(zero, test)})
    lines.append(line(rows[-1]))
    specs = [spec.split(":") for spec in args.ftt]
    for skip in sorted(
        {spec[1] for spec in specs + [a.split(":") for a in args.adam_ftt]} - {"none"}
    ):
        net = ftt(dm, schedule, rank=1, num_basis=4, output="core", skip=skip, seed=args.seed)
        row = {"model": f"{skip} skip alone", "solver": "closed form", "target": "-",
               "params": 0, "fit_s": 0.0}  # fmt: skip
        rows.append({**row, **excess(lambda x, t, s=net.skip: s(x, t)[0], test)})
        lines.append(line(rows[-1]))
    for (output, skip, m, r), target in itertools.product(specs, args.targets):
        net = ftt(
            dm, schedule, rank=int(r), num_basis=int(m), output=output, skip=skip, seed=args.seed
        )
        seconds = fit_als(net, train, target, args.sweeps, args.ridge)
        record(f"FTT {output} skip={skip} m={m} r={r}", "ALS", target, net, seconds)
    if args.adam_steps > 0:
        for target in args.targets:
            for output, skip, m, r in (a.split(":") for a in args.adam_ftt):
                net = ftt(
                    dm,
                    schedule,
                    rank=int(r),
                    num_basis=int(m),
                    output=output,
                    skip=skip,
                    seed=args.seed,
                )
                seconds = fit_adam(
                    net, dm.train_x, schedule, eps_star, target, args.adam_steps, args.lr, args.seed
                )
                record(f"FTT {output} skip={skip} m={m} r={r}", "Adam", target, net, seconds)
            with torch.random.fork_rng():  # ResNetMLP draws its weights from torch's RNG
                torch.manual_seed(args.seed)
                net = ResNetMLP(data_shape=(dm.dim,), timesteps=schedule.timesteps)
            seconds = fit_adam(
                net, dm.train_x, schedule, eps_star, target, args.adam_steps, args.lr, args.seed
            )
            record("ResNet-MLP width 64 depth 3", "Adam", target, net, seconds)
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").write_text(table + "\n")
        (args.out / "rows.json").write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
