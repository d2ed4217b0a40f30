"""The second paper's experiment plan: FTT noise models trained by Adam, ALS and Riemannian GD
against the ResNet-MLP trained by Adam, on the 2-D swiss roll or any density of the toy suite
(``--dataset moons|circles|8gaussians|checkerboard|pinwheel|2spirals``; DDPM, linear β, T = 1000).

Every command prints a Markdown table and writes ``table.md``, ``results.json`` and PNG plots to
``--out`` (default ``outputs/tt_study/<command>``); ``--wandb`` also logs them to W&B (offline
unless WANDB_MODE says otherwise). Training runs in-process on the plain-torch modules (no
Lightning), so time is the optimiser's own; quality is the sliced Wasserstein distance (SW) of
``--eval-samples`` samples from the full 1000-step ancestral sampler against the held-out
reference, beside its floor (real vs real at the same size), plus MMD and the number of
samples that ran away (``far``: ``max |x| > 4``; SW is dominated by such outliers) and, for the
suite's densities, the structure metric (``mode_share``, beside the reference sample's own).

    python benchmarks/tt_study.py capacity        # rank x num_basis (x time): SW, params, time
    python benchmarks/tt_study.py optim           # ridge / samples (ALS), lr (Riemannian, Adam)
    python benchmarks/tt_study.py landscape       # 1-D / 2-D loss slices (filter-normalised)
    python benchmarks/tt_study.py convergence     # loss and SW vs wall time and FLOPs
    python benchmarks/tt_study.py cost            # analytic FLOPs per step, s/step, peak memory
    python benchmarks/tt_study.py convergence --budget 120 --eval-samples 2000   # larger
    python benchmarks/tt_study.py convergence --dataset checkerboard              # another density

Each default run takes one to three minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from lightning_modules.diffusion import metrics  # noqa: E402
from lightning_modules.diffusion.schedules import NoiseSchedule  # noqa: E402
from lightning_modules.tt.als import ALS  # noqa: E402
from lightning_modules.tt.flops import (  # noqa: E402
    adam_step_flops,
    als_sweep_flops,
    riemannian_step_flops,
)
from lightning_modules.tt.ftt import FunctionalTT  # noqa: E402
from lightning_modules.tt.riemannian import RiemannianGD  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAR = 4.0  # |x| beyond this in standardised units is a runaway sample (the data reach ~2.2)


# ---------------------------------------------------------------------------------- the problem
@dataclass
class Problem:
    """A standardised density (``conf/dataset/<dataset>.yaml``), the forward process and the
    metrics; ``dim`` is the swiss roll's (2 or 3)."""

    dim: int = 2
    seed: int = 0
    eval_samples: int = 1000
    dataset: str = "swiss_roll"
    train: torch.Tensor = field(init=False)
    reference: torch.Tensor = field(init=False)

    def __post_init__(self):
        from hydra.utils import instantiate

        cfg = OmegaConf.load(ROOT / "conf" / "dataset" / f"{self.dataset}.yaml")
        cfg.seed = self.seed
        if self.dataset == "swiss_roll":
            cfg.dim = self.dim
        self.dm = dm = instantiate(cfg)
        self._floors: dict = {}
        dm.setup()
        self.dim = dm.dim
        self.train, self.reference = dm.train_x, dm.reference_x
        self.schedule = NoiseSchedule.from_config("linear", 1000)
        self.bounds = (self.train.amin(0), self.train.amax(0))
        self.data_gen = torch.Generator().manual_seed(self.seed + 1)
        g = torch.Generator().manual_seed(self.seed + 2)
        # a fixed held-out set of triples: the population loss every method is compared on
        idx = torch.randint(0, len(self.train), (8192,), generator=g)
        self.val = self.schedule.training_triple(self.train[idx], g)

    def floors(self, n: int, seed: int) -> dict:
        """The floor bands for ``n`` samples (``metrics.floor_bands``), computed once per size."""
        n = min(n, len(self.reference), (len(self.train) + len(self.reference)) // 2)
        if (n, seed) not in self._floors:
            self._floors[n, seed] = metrics.floor_bands(self.reference, self.train, n, seed=seed)
        return self._floors[n, seed]

    def draw(self, batch: int = 256):
        idx = torch.randint(0, len(self.train), (batch,), generator=self.data_gen)
        return self.schedule.training_triple(self.train[idx], self.data_gen)

    @torch.no_grad()
    def val_loss(self, net) -> float:
        x, t, e = self.val
        return float(((net(x, t) - e) ** 2).mean())

    @torch.no_grad()
    def quality(self, net, seed: int = 0) -> dict:
        g = torch.Generator().manual_seed(1000 + seed)
        samples, _ = self.schedule.sample(net, self.eval_samples, (self.dim,), g)
        m = metrics.vector_sample_metrics(
            samples, self.reference, self.train, seed=seed, floors=self.floors(len(samples), seed)
        )
        far = samples.abs().amax(1) > FAR
        m["far"] = int(far.sum())
        structure = getattr(self.dm, "structure_metric", None)
        own = structure(self.dm.to_data_space(self.reference)) if structure else None
        if own is not None:
            m["mode_share"] = structure(self.dm.to_data_space(samples))["mode_share"]
            m["mode_share_data"] = own["mode_share"]
        m["sw_without_far"] = (
            metrics.vector_sample_metrics(
                samples[~far],
                self.reference,
                self.train,
                seed=seed,
                floors=self.floors(int((~far).sum()), seed),
            )["sw"]
            if (~far).sum() > 1
            else float("nan")
        )
        return m


def build_ftt(problem: Problem, **options) -> FunctionalTT:
    kw = dict(data_shape=(problem.dim,), timesteps=1000, data_bounds=problem.bounds, seed=0)
    return FunctionalTT(**{**kw, **options})


def build_resnet(problem: Problem, **options):
    from hydra.utils import instantiate

    cfg = OmegaConf.load(ROOT / "conf/eps_net/resnet.yaml")
    cfg = OmegaConf.merge(cfg, options)
    return instantiate(cfg, data_shape=(problem.dim,), timesteps=1000, data_bounds=problem.bounds)


# ------------------------------------------------------------------------------------- methods
class Method:
    """One optimiser on one net: ``step()`` returns (loss, analytic FLOPs of the step)."""

    def __init__(self, name: str, net, problem: Problem, **opts):
        self.name, self.net, self.problem, self.opts = name, net, problem, opts
        batch = int(opts.get("batch", 256))
        self.batch = batch
        if name == "adam":
            self.opt = torch.optim.Adam(net.parameters(), lr=float(opts.get("lr", 1e-2)))
            fwd = net.flops_per_sample()
            self.step_flops = adam_step_flops(sum(p.numel() for p in net.parameters()), batch, fwd)
        elif name == "als":
            self.als = ALS(
                net,
                ridge=float(opts.get("ridge", 1e-6)),
                sweeps=1,
                samples=int(opts.get("samples", 32768)),
                batch=int(opts.get("chunk", 2048)),
                fixed=bool(opts.get("fixed", False)),
            )
            self.step_flops = als_sweep_flops(net, self.als.samples)
        elif name == "riemannian":
            self.gd = RiemannianGD(
                net,
                lr=float(opts.get("lr", 0.03)),
                armijo=bool(opts.get("armijo", True)),
                shrink=0.5,
                max_backtracks=20,
            )
        else:
            raise ValueError(name)

    def step(self) -> tuple[float, int]:
        if self.name == "adam":
            x, t, e = self.problem.draw(self.batch)
            loss = ((self.net(x, t) - e) ** 2).mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), float(self.opts.get("clip", 1.0)))
            self.opt.step()
            return float(loss), self.step_flops
        if self.name == "als":
            out = self.als.step(lambda: self.problem.draw(self.batch))
            return out["loss"], self.step_flops
        out = self.gd.step(*self.problem.draw(self.batch))
        trials = 1 + int(out["backtracks"])
        return out["loss"], riemannian_step_flops(self.net, self.batch, trials)


def train(
    method: Method,
    *,
    steps: int | None = None,
    budget_s: float | None = None,
    checkpoints=(),
    on_checkpoint=None,
) -> dict:
    """Run ``method`` for ``steps`` or ``budget_s`` seconds of its own time.

    At each wall time in ``checkpoints`` (seconds), the clock stops and ``on_checkpoint(wall,
    flops, step)`` runs (evaluation is not charged to the method).
    """
    wall, flops, step, losses = 0.0, 0, 0, []
    pending = sorted(checkpoints)
    while True:
        if steps is not None and step >= steps:
            break
        if budget_s is not None and wall >= budget_s:
            break
        start = time.perf_counter()
        loss, f = method.step()
        wall += time.perf_counter() - start
        flops += f
        step += 1
        losses.append((step, wall, flops, loss))
        while pending and wall >= pending[0]:
            pending.pop(0)
            if on_checkpoint:
                on_checkpoint(wall, flops, step)
    return {"wall_s": wall, "flops": flops, "steps": step, "losses": losses}


# ------------------------------------------------------------------------------------- output
def fmt(v) -> str:
    if isinstance(v, float):
        if v == 0 or not math.isfinite(v):
            return str(v)
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def markdown(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def save_fig(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def finish(
    args,
    name: str,
    rows: list[dict],
    columns: list[str],
    pictures: list[Path],
    extra: dict | None = None,
    note: str = "",
) -> str:
    table = markdown(rows, columns)
    text = (
        f"## tt_study {name}\n\n{note}\n\n{table}\n" if note else f"## tt_study {name}\n\n{table}\n"
    )
    print(text)
    write_atomic(args.out / "table.md", text)
    write_atomic(
        args.out / "results.json",
        json.dumps({"rows": rows, **(extra or {})}, indent=2, default=str),
    )
    for p in pictures:
        print(f"plot: {p}")
    if args.wandb:
        import wandb

        run = wandb.init(
            project="tt-study",
            name=name,
            config=vars(args) | {"out": str(args.out)},
            mode=os.environ.get("WANDB_MODE", "offline"),
        )
        run.log(
            {
                "table": wandb.Table(
                    columns=columns, data=[[r.get(c) for c in columns] for r in rows]
                )
            }
        )
        run.log({p.stem: wandb.Image(str(p)) for p in pictures})
        run.finish()
    return text


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------------ commands
def samples_for(net: FunctionalTT, per_unknown: int, low: int = 8192, high: int = 65536) -> int:
    """ALS samples per sweep: ``per_unknown`` x the largest core's unknowns, clipped."""
    unknowns = max(c[0].numel() for c in net.cores)
    return int(min(high, max(low, per_unknown * unknowns)))


def cmd_capacity(args) -> str:
    """rank x num_basis (x time) for ALS-trained FTTs: quality, parameters, time."""
    problem = Problem(eval_samples=args.eval_samples, dataset=args.dataset)
    rows = []
    for time_mode in args.times:
        for m in args.num_basis:
            for r in args.ranks:
                if r > m:
                    continue
                net = build_ftt(problem, rank=r, num_basis=m, time=time_mode)
                samples = samples_for(net, args.per_unknown)
                method = Method("als", net, problem, samples=samples, ridge=args.ridge)
                run = train(method, steps=args.sweeps)
                q = problem.quality(net)
                rows.append(
                    {
                        "time": time_mode,
                        "cores": net.num_cores,
                        "num_basis": m,
                        "rank": r,
                        "params": net.num_parameters(),
                        "als_samples": samples,
                        "train_s": run["wall_s"],
                        "val_loss": problem.val_loss(net),
                        "sw": q["sw"],
                        "sw_floor": q["sw_floor"],
                        "sw_without_far": q["sw_without_far"],
                        "far": q["far"],
                        "mmd": q["mmd"],
                        "mmd_floor": q["mmd_floor"],
                    }
                )
                print(
                    f"  time={time_mode} m={m} r={r}: sw {q['sw']:.3f}  ({run['wall_s']:.1f} s)",
                    flush=True,
                )
    plt = _plt()
    fig, axes = plt.subplots(1, len(args.times), figsize=(5.5 * len(args.times), 4), squeeze=False)
    for ax, time_mode in zip(axes[0], args.times):
        for m in args.num_basis:
            sel = [r for r in rows if r["time"] == time_mode and r["num_basis"] == m]
            ax.plot(
                [r["rank"] for r in sel],
                [r["sw_without_far"] for r in sel],
                "o-",
                label=f"m={m} (no far)",
            )
            ax.plot([r["rank"] for r in sel], [r["sw"] for r in sel], "x:", label=f"m={m} (all)")
        ax.axhline(rows[0]["sw_floor"], color="k", lw=0.8, ls="--", label="floor")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="TT rank",
            ylabel="sliced Wasserstein",
            title=f"FTT + ALS, time={time_mode}",
        )
        ax.legend(fontsize=7)
    pic = save_fig(fig, args.out / "capacity.png")
    cols = [
        "time",
        "cores",
        "num_basis",
        "rank",
        "params",
        "als_samples",
        "train_s",
        "val_loss",
        "sw",
        "sw_without_far",
        "far",
        "sw_floor",
        "mmd",
        "mmd_floor",
    ]
    note = (
        f"ALS, {args.sweeps} sweeps, ridge {args.ridge:g}, samples per sweep = "
        f"{args.per_unknown} x the largest core's unknowns (8192..65536); "
        f"{args.eval_samples} samples, full 1000-step sampler."
    )
    return finish(args, "capacity", rows, cols, [pic], note=note)


def cmd_optim(args) -> str:
    """Optimiser parameters: ALS ridge and samples, Riemannian lr (Armijo on/off), Adam lr."""
    problem = Problem(eval_samples=args.eval_samples, dataset=args.dataset)
    rows = []
    runs = [("als", dict(ridge=r, samples=args.als_samples), f"ridge={r:g}") for r in args.ridges]
    runs += [
        ("als", dict(ridge=1e-6, samples=s), f"samples={s}")
        for s in args.samples
        if s != args.als_samples
    ]
    runs += [
        ("riemannian", dict(lr=lr, armijo=a), f"lr={lr:g} armijo={a}")
        for lr in args.riem_lrs
        for a in (True, False)
    ]
    runs += [("adam", dict(lr=lr), f"lr={lr:g}") for lr in args.adam_lrs]
    for name, opts, label in runs:
        init = "linear" if name == "riemannian" else "identity"
        net = build_ftt(problem, rank=args.rank, num_basis=args.num_basis, init=init)
        method = Method(name, net, problem, **opts)
        steps = {"als": args.sweeps, "riemannian": args.riem_steps, "adam": args.adam_steps}[name]
        try:
            run = train(method, steps=steps)
        except Exception as e:  # a UserError (no descent, singular system) is a result here
            rows.append({"method": name, "setting": label, "error": str(e)[:80]})
            continue
        q = problem.quality(net)
        rows.append(
            {
                "method": name,
                "setting": label,
                "steps": run["steps"],
                "train_s": run["wall_s"],
                "val_loss": problem.val_loss(net),
                "sw": q["sw"],
                "sw_without_far": q["sw_without_far"],
                "far": q["far"],
                "sw_floor": q["sw_floor"],
                "mmd": q["mmd"],
            }
        )
        print(f"  {name} {label}: sw {q['sw']:.3f} ({run['wall_s']:.1f} s)", flush=True)
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, name in zip(axes, ("als", "riemannian", "adam")):
        sel = [r for r in rows if r["method"] == name and "sw" in r]
        ax.bar(range(len(sel)), [r["sw_without_far"] for r in sel], label="SW (no far)")
        ax.plot(range(len(sel)), [r["sw"] for r in sel], "kx", label="SW (all)")
        ax.set_xticks(
            range(len(sel)), [r["setting"] for r in sel], rotation=35, ha="right", fontsize=7
        )
        ax.set(yscale="log", title=f"FTT + {name}", ylabel="sliced Wasserstein")
        ax.legend(fontsize=7)
    pic = save_fig(fig, args.out / "optim.png")
    cols = [
        "method",
        "setting",
        "steps",
        "train_s",
        "val_loss",
        "sw",
        "sw_without_far",
        "far",
        "sw_floor",
        "mmd",
        "error",
    ]
    note = (
        f"FTT rank {args.rank}, num_basis {args.num_basis}, time=core; ALS {args.sweeps} sweeps "
        f"({args.als_samples} samples unless stated), Riemannian {args.riem_steps} steps "
        "from init=linear, "
        f"Adam {args.adam_steps} steps, batch 256."
    )
    return finish(args, "optim", rows, cols, [pic], note=note)


def _filter_normalised(
    params: list[torch.Tensor], g: torch.Generator, kind: str
) -> list[torch.Tensor]:
    """Random direction, each filter rescaled to its weights' norm (Li et al. 2018).

    ResNet: a filter is one output unit's row of a weight matrix; biases and LayerNorm get zero
    (as in Li et al.). FTT: a filter is one slice ``G[p, :, i, :]`` of a core.
    """
    out = []
    for p in params:
        d = torch.randn(p.shape, generator=g, dtype=p.dtype)
        if kind == "ftt":
            dims = (1, 3)  # per TT p and basis index i
            d = d * p.norm(dim=dims, keepdim=True) / d.norm(dim=dims, keepdim=True).clamp_min(1e-12)
        elif p.ndim >= 2:
            flat_p, flat_d = p.reshape(p.shape[0], -1), d.reshape(p.shape[0], -1)
            d = (
                flat_d * flat_p.norm(dim=1, keepdim=True) / flat_d.norm(dim=1, keepdim=True)
            ).reshape(p.shape)
        else:
            d = torch.zeros_like(p)
        out.append(d)
    return out


def cmd_landscape(args) -> str:
    """Loss along 1-D and 2-D random filter-normalised slices around trained nets."""
    problem = Problem(eval_samples=args.eval_samples, dataset=args.dataset)
    ftt = build_ftt(problem, rank=args.rank, num_basis=args.num_basis)
    train(Method("als", ftt, problem, samples=args.als_samples), steps=args.sweeps)
    resnet = build_resnet(problem)
    train(Method("adam", resnet, problem, lr=2e-3), steps=args.resnet_steps)
    x, t, e = problem.val
    x, t, e = x[: args.points], t[: args.points], e[: args.points]
    g = torch.Generator().manual_seed(0)
    alphas = torch.linspace(-args.span, args.span, args.steps1d)
    grid = torch.linspace(-args.span, args.span, args.steps2d)
    curves, surfaces, rows = {}, {}, []
    for label, net, kind in (("FTT + ALS", ftt, "ftt"), ("ResNet-MLP + Adam", resnet, "resnet")):
        params = [p for p in net.parameters()]
        theta = [p.detach().clone() for p in params]
        d1, d2 = _filter_normalised(theta, g, kind), _filter_normalised(theta, g, kind)

        @torch.no_grad()
        def loss_at(a: float, b: float = 0.0, net=net, params=params, theta=theta, d1=d1, d2=d2):
            for p, p0, u, v in zip(params, theta, d1, d2):
                p.copy_(p0 + a * u + b * v)
            return float(((net(x, t) - e) ** 2).mean())

        start = time.perf_counter()
        curves[label] = [loss_at(float(a)) for a in alphas]
        surfaces[label] = [[loss_at(float(a), float(b)) for a in grid] for b in grid]
        loss_at(0.0)  # restore
        centre = curves[label][len(alphas) // 2]
        half = [c for a, c in zip(alphas, curves[label]) if abs(float(a)) <= args.span / 2]
        rows.append(
            {
                "net": label,
                "params": sum(p.numel() for p in params),
                "loss_at_minimum": centre,
                "max_rel_rise_at_half_span": max(half) / centre - 1,
                "max_rel_rise_at_span": max(curves[label]) / centre - 1,
                "eval_s": time.perf_counter() - start,
            }
        )
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, ys in curves.items():
        ax.plot(alphas, ys, label=label)
    ax.set(
        yscale="log",
        xlabel="step along the filter-normalised direction",
        ylabel="DDPM loss",
        title="1-D loss slice around the trained nets",
    )
    ax.legend()
    pic1 = save_fig(fig, args.out / "landscape_1d.png")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (label, z) in zip(axes, surfaces.items()):
        z = torch.tensor(z).log10()
        cs = ax.contourf(grid, grid, z, levels=20, cmap="viridis")
        fig.colorbar(cs, ax=ax, label="log10 loss")
        ax.plot([0], [0], "r+")
        ax.set(title=label, xlabel="direction 1", ylabel="direction 2")
    pic2 = save_fig(fig, args.out / "landscape_2d.png")
    cols = [
        "net",
        "params",
        "loss_at_minimum",
        "max_rel_rise_at_half_span",
        "max_rel_rise_at_span",
        "eval_s",
    ]
    note = (
        f"FTT rank {args.rank}, m {args.num_basis} after {args.sweeps} ALS sweeps; ResNet-MLP "
        f"(conf/eps_net/resnet.yaml) after {args.resnet_steps} Adam steps; loss on "
        f"{args.points} fixed triples; span ±{args.span}."
    )
    return finish(
        args,
        "landscape",
        rows,
        cols,
        [pic1, pic2],
        extra={"alphas": alphas.tolist(), "curves": curves},
        note=note,
    )


def cmd_convergence(args) -> str:
    """Validation loss and SW against wall time and FLOPs for the four methods."""
    problem = Problem(eval_samples=args.eval_samples, dataset=args.dataset)
    setups = {
        "FTT + Adam": lambda: (
            "adam",
            build_ftt(problem, rank=args.rank, num_basis=args.num_basis),
            dict(lr=1e-2),
        ),
        "FTT + ALS": lambda: (
            "als",
            build_ftt(problem, rank=args.rank, num_basis=args.num_basis),
            dict(samples=args.als_samples),
        ),
        "FTT + Riemannian": lambda: (
            "riemannian",
            build_ftt(problem, rank=args.rank, num_basis=args.num_basis, init="linear"),
            dict(lr=args.riem_lr, armijo=True),
        ),
        "ResNet + Adam": lambda: ("adam", build_resnet(problem), dict(lr=2e-3)),
    }
    checkpoints = [args.budget * f for f in (0.1, 0.25, 0.5, 1.0)]
    traces, rows = {}, []
    for label in args.methods:
        name, net, opts = setups[label]()
        method = Method(name, net, problem, **opts)
        points = []

        def evaluate(wall, flops, step, net=net, points=points, label=label):
            q = problem.quality(net)
            points.append(
                {
                    "wall_s": wall,
                    "flops": flops,
                    "step": step,
                    "val_loss": problem.val_loss(net),
                    "sw": q["sw"],
                    "sw_without_far": q["sw_without_far"],
                    "far": q["far"],
                    "sw_floor": q["sw_floor"],
                    "mode_share": q.get("mode_share"),
                    "mode_share_data": q.get("mode_share_data"),
                }
            )
            print(f"  {label}: {wall:.1f} s, step {step}, sw {q['sw']:.3f}", flush=True)

        run = train(method, budget_s=args.budget, checkpoints=checkpoints, on_checkpoint=evaluate)
        if not points or points[-1]["step"] != run["steps"]:
            evaluate(run["wall_s"], run["flops"], run["steps"])
        traces[label] = {"points": points, "losses": run["losses"]}
        last = points[-1]
        rows.append(
            {
                "method": label,
                "params": sum(p.numel() for p in net.parameters()),
                "steps": run["steps"],
                "wall_s": run["wall_s"],
                "gflop": run["flops"] / 1e9,
                "val_loss": last["val_loss"],
                "sw": last["sw"],
                "sw_without_far": last["sw_without_far"],
                "far": last["far"],
                "best_sw": min(p["sw"] for p in points),
                "mode_share": last["mode_share"],
            }
        )
    floor = traces[args.methods[0]]["points"][-1]["sw_floor"]
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for label, tr in traces.items():
        pts = tr["points"]
        for col, key in enumerate(("wall_s", "flops")):
            axes[0, col].plot(
                [p[key] for p in pts], [p["val_loss"] for p in pts], "o-", label=label
            )
            axes[1, col].plot([p[key] for p in pts], [p["sw"] for p in pts], "o-", label=label)
    for col, xlabel in enumerate(("training wall time (s)", "analytic FLOPs")):
        axes[0, col].set(xscale="log", yscale="log", xlabel=xlabel, ylabel="validation loss")
        axes[1, col].set(xscale="log", yscale="log", xlabel=xlabel, ylabel="sliced Wasserstein")
        axes[1, col].axhline(floor, color="k", ls="--", lw=0.8, label="SW floor")
        axes[1, col].legend(fontsize=7)
    fig.suptitle(f"{problem.dataset}: convergence (evaluation time not charged)")
    pic = save_fig(fig, args.out / "convergence.png")
    cols = [
        "method",
        "params",
        "steps",
        "wall_s",
        "gflop",
        "val_loss",
        "sw",
        "sw_without_far",
        "far",
        "best_sw",
        "mode_share",
    ]
    note = (
        f"Budget {args.budget:g} s of training per method; SW of {args.eval_samples} samples "
        f"(floor {floor:.3f}); FTT rank {args.rank}, m {args.num_basis}, time=core; ALS "
        f"{args.als_samples} samples a sweep; Riemannian relative step {args.riem_lr:g} with "
        "Armijo from init=linear; Adam lr 1e-2 (FTT) / 2e-3 (ResNet), batch 256."
    )
    own = traces[args.methods[0]]["points"][-1]["mode_share_data"]
    if own is not None:
        note += f" The reference sample's own mode share: {own:.3f}."
    return finish(
        args,
        "convergence",
        rows,
        cols,
        [pic],
        extra={"traces": traces, "sw_floor": floor},
        note=note,
    )


def _memory_child(queue, label: str, args_dict: dict) -> None:
    """In a fresh process: build the method, then the peak RSS added by its steps."""
    torch.set_num_threads(1)
    args = argparse.Namespace(**args_dict)
    problem = Problem(dataset=args.dataset)
    method = _cost_method(label, problem, args)
    problem.draw(args.batch)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        method.step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(
        {
            "peak_extra_mb": peak - base,
            "s_per_step": sorted(times)[len(times) // 2],
            "flops": method.step_flops
            if hasattr(method, "step_flops")
            else riemannian_step_flops(method.net, method.batch, 1),
        }
    )


def _cost_method(label: str, problem: Problem, args) -> Method:
    if label == "ResNet + Adam":
        return Method("adam", build_resnet(problem), problem, lr=2e-3, batch=args.batch)
    net = build_ftt(problem, rank=args.rank, num_basis=args.num_basis, init="linear")
    name = {"FTT + Adam": "adam", "FTT + ALS": "als", "FTT + Riemannian": "riemannian"}[label]
    opts = dict(batch=args.batch, lr=1e-2 if name == "adam" else 0.03)
    if name == "als":
        opts.update(samples=args.als_samples, chunk=args.batch)
    return Method(name, net, problem, **opts)


def cmd_cost(args) -> str:
    """Analytic FLOPs per step, measured seconds per step and peak memory per method."""
    problem = Problem(dataset=args.dataset)
    rows = []
    ctx = mp.get_context("spawn")
    for label in ("FTT + Adam", "FTT + ALS", "FTT + Riemannian", "ResNet + Adam"):
        queue = ctx.Queue()
        proc = ctx.Process(
            target=_memory_child, args=(queue, label, vars(args) | {"out": str(args.out)})
        )
        proc.start()
        result = queue.get()
        proc.join()
        method = _cost_method(label, problem, args)
        net = method.net
        fwd = net.flops_per_sample()
        unit = (
            f"sweep of {args.als_samples} samples"
            if method.name == "als"
            else f"batch of {args.batch}"
        )
        rows.append(
            {
                "method": label,
                "params": sum(p.numel() for p in net.parameters()),
                "fwd_flops_per_sample": fwd,
                "step": unit,
                "mflop_per_step": result["flops"] / 1e6,
                "s_per_step": result["s_per_step"],
                "gflop_per_s": result["flops"] / result["s_per_step"] / 1e9,
                "peak_extra_mb": result["peak_extra_mb"],
            }
        )
        print(f"  {label}: {result}", flush=True)
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    labels = [r["method"] for r in rows]
    for ax, key, title in zip(
        axes,
        ("mflop_per_step", "s_per_step", "peak_extra_mb"),
        ("analytic MFLOP per step", "seconds per step (1 thread)", "peak extra memory (MB)"),
    ):
        ax.bar(range(len(rows)), [r[key] for r in rows])
        ax.set_xticks(range(len(rows)), labels, rotation=20, fontsize=8)
        ax.set(yscale="log", title=title)
    pic = save_fig(fig, args.out / "cost.png")
    cols = [
        "method",
        "params",
        "fwd_flops_per_sample",
        "step",
        "mflop_per_step",
        "s_per_step",
        "gflop_per_s",
        "peak_extra_mb",
    ]
    note = (
        f"FTT rank {args.rank}, m {args.num_basis}, time=core; batch {args.batch} for every method "
        f"(ALS accumulates its sweep in chunks of {args.batch}); FLOPs from "
        "lightning_modules/tt/flops.py (ResNet: its analytic forward x 3 + Adam); memory: peak RSS "
        "added by the steps in a fresh process."
    )
    return finish(args, "cost", rows, cols, [pic], note=note)


# ---------------------------------------------------------------------------------------- main
def main(argv=None) -> str:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "command", choices=["capacity", "optim", "landscape", "convergence", "cost"]
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for table.md, results.json, PNGs"
    )
    parser.add_argument("--wandb", action="store_true", help="also log the table and plots to W&B")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dataset", default="swiss_roll", help="a 2-D density of conf/dataset")
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--num-basis", type=int, default=16)
    parser.add_argument("--sweeps", type=int, default=3)
    parser.add_argument("--als-samples", type=int, default=32768)
    # capacity
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument(
        "--num-basis-list", dest="num_basis_list", type=int, nargs="+", default=[8, 16]
    )
    parser.add_argument("--times", nargs="+", default=["core", "additive"])
    parser.add_argument("--per-unknown", type=int, default=32)
    parser.add_argument("--ridge", type=float, default=1e-6)
    # optim
    parser.add_argument("--ridges", type=float, nargs="+", default=[1e-8, 1e-6, 1e-3, 1e-1])
    parser.add_argument("--samples", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--riem-lrs", type=float, nargs="+", default=[0.01, 0.03, 0.3])
    parser.add_argument("--riem-steps", type=int, default=300)
    parser.add_argument("--adam-lrs", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1])
    parser.add_argument("--adam-steps", type=int, default=600)
    # landscape
    parser.add_argument("--resnet-steps", type=int, default=1000)
    parser.add_argument("--points", type=int, default=4096)
    parser.add_argument("--span", type=float, default=1.0)
    parser.add_argument("--steps1d", type=int, default=41)
    parser.add_argument("--steps2d", type=int, default=17)
    # convergence
    parser.add_argument("--budget", type=float, default=20.0, help="training seconds per method")
    parser.add_argument("--riem-lr", type=float, default=0.03)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["FTT + Adam", "FTT + ALS", "FTT + Riemannian", "ResNet + Adam"],
    )
    # cost
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out = args.out or ROOT / "outputs" / "tt_study" / args.dataset / args.command
    args.out.mkdir(parents=True, exist_ok=True)
    if args.command == "capacity":
        args.num_basis = args.num_basis_list
    return {
        "capacity": cmd_capacity,
        "optim": cmd_optim,
        "landscape": cmd_landscape,
        "convergence": cmd_convergence,
        "cost": cmd_cost,
    }[args.command](args)


if __name__ == "__main__":
    main()
