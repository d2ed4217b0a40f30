"""Which parameters should trajectory matching ignore? The masking-direction study, paired.

Arms (each one ``python train.py task=distill ...`` per IPC and seed): plain MTT; the seed
method's ε-pruning (drop the HARDEST-to-match parameters) at ε ∈ {0.05, 0.1, 0.2}; PAD's
``loss_ratio`` (drop the EASIEST) at 0.25 and 0.5; PAD's ``depth_ratio`` 0.5 (drop the shallow
layers); DATM (learned soft labels, easy-first start window, no masking) and DATM + ε 0.1.

Seeds are PAIRED: seed ``s`` gives every arm the same experts (one ``task=teacher`` store per
seed), the same initial images (``distill.init`` is the same for every arm, ``real`` by default)
and the same evaluation networks (the run's ``seed``), so an arm's accuracy minus MTT's on the
same seed is a paired difference. Per arm: the mean hard-label accuracy and its 95 % t-interval,
the paired difference to MTT with its 95 % t-interval, the paired t-test and sign-test
p-values, the matching loss's masked fraction (last iteration and mean over the run), and with
``--evaluate`` the numbers ``task=evaluate`` reports for the set (soft-label accuracy and the
DD-Ranking scores ``hlr`` / ``ior`` / ``lrs`` when that task provides them; blank otherwise).

    python benchmarks/masking_study.py --scale cpu --data-dir ../shared/data --out runs/masking
    python benchmarks/masking_study.py --scale smoke --data-dir ../shared/data --arms MTT "eps 0.1"

Every run is a subprocess of ``train.py``; a run folder holding a finished run of the same
overrides is read, not rerun (``tt_compare.finished_with``), so a killed study restarted with the
same command redoes only the unfinished cell. Writes ``cells.json``, ``masking_study.md`` and
the plots ``accuracy.png`` / ``masked_fraction.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.tt_compare import _slug, finished_with  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE = ["logger=csv", "trainer.enable_progress_bar=false", "threads=1"]
ARMS = {
    "MTT": ["method=mtt", "distill.eps=0"],
    "eps 0.05": ["method=mtt", "distill.eps=0.05"],
    "eps 0.1": ["method=mtt", "distill.eps=0.1"],
    "eps 0.2": ["method=mtt", "distill.eps=0.2"],
    "PAD loss 0.25": [
        "method=pad",
        "distill.eps=0",
        "method.depth_ratio=0",
        "method.loss_ratio=0.25",
    ],
    "PAD loss 0.5": [
        "method=pad",
        "distill.eps=0",
        "method.depth_ratio=0",
        "method.loss_ratio=0.5",
    ],
    "PAD depth 0.5": [
        "method=pad",
        "distill.eps=0",
        "method.depth_ratio=0.5",
        "method.loss_ratio=0",
    ],
    "DATM": ["method=datm", "distill.eps=0"],
    "DATM + eps 0.1": ["method=datm", "distill.eps=0.1"],
}
BASELINE = "MTT"
# scale presets; every entry can be overridden by its own flag
SCALES_CPU = dict(
    train_per_class=500,
    test_per_class=200,
    zca=True,
    width=32,
    depth=3,
    experts=5,
    teacher_epochs=15,
    teacher_batch=256,
    iterations=200,
    syn_steps=20,
    expert_epochs=2,
    max_start_epoch=10,
    eval_nets=["convnet"],
    eval_num=3,
    eval_epochs=300,
    seeds=5,
)  # fmt: skip

SCALES = {
    # the intended study: the small CIFAR-10 protocol of the project's earlier MTT-vs-ε run
    "cpu": SCALES_CPU,
    # what one 2-core CPU runs in about two hours (two processes, one per IPC): the cpu scale with
    # 200 images per class, width 16, 3 experts x 10 epochs of batch 64 (batch 256 gave 8 steps an
    # epoch and experts at 18-20 %), 50 iterations of 10 student steps
    "small": dict(
        SCALES_CPU,
        train_per_class=200,
        width=16,
        experts=3,
        teacher_epochs=10,
        teacher_batch=64,
        iterations=50,
        syn_steps=10,
        max_start_epoch=6,
        eval_epochs=200,
    ),
    # a smoke run: the pipeline on real CIFAR-10 in minutes, numbers without meaning
    "smoke": dict(
        train_per_class=50,
        test_per_class=50,
        zca=False,
        width=16,
        depth=3,
        experts=1,
        teacher_epochs=3,
        teacher_batch=64,
        iterations=10,
        syn_steps=5,
        expert_epochs=1,
        max_start_epoch=2,
        eval_nets=["convnet"],
        eval_num=1,
        eval_epochs=50,
        seeds=2,
    ),  # fmt: skip
}


# -- statistics ---------------------------------------------------------------------------------
def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and the two-sided t-interval ``(mean, lo, hi)``; one value gives an infinite band."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, -math.inf, math.inf
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def paired(arm: list[float], base: list[float], level: float = 0.95) -> dict:
    """Paired difference ``arm − base`` over the same seeds: mean, t-interval, the paired t-test's
    two-sided p-value and the exact sign test's (ties dropped)."""
    from scipy import stats

    if len(arm) != len(base):
        raise ValueError("paired samples need the same seeds on both sides")
    d = [a - b for a, b in zip(arm, base)]
    mean, lo, hi = mean_ci(d, level)
    n = len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else 0.0
    if n < 2:
        p_t = math.nan
    elif sd == 0:
        p_t = 1.0 if mean == 0 else 0.0
    else:
        t = mean / (sd / math.sqrt(n))
        p_t = float(2 * stats.t.sf(abs(t), n - 1))
    plus, minus = sum(x > 0 for x in d), sum(x < 0 for x in d)
    p_sign = float(stats.binomtest(plus, plus + minus, 0.5).pvalue) if plus + minus else 1.0
    return {"diff": mean, "lo": lo, "hi": hi, "p_t": p_t, "p_sign": p_sign, "wins": plus, "n": n}


# -- runs ---------------------------------------------------------------------------------------
def run(
    argv_tail: list[str], run_dir: Path, log_dir: Path, start: bool = True
) -> tuple[dict | None, bool, float]:
    """``train.py`` with these overrides into ``run_dir`` unless a finished run of exactly them is
    there; returns its summary, whether it was reused, and the wall seconds of its process
    (measured when it ran, kept in ``process_wall_s.txt``). ``start=False``: nothing is run, and
    an unfinished run gives ``(None, False, nan)``."""
    overrides = [*argv_tail, f"paths.output_dir={run_dir}"]
    wall_file = run_dir / "process_wall_s.txt"
    if finished_with(run_dir, overrides):
        wall = float(wall_file.read_text()) if wall_file.exists() else math.nan
        return json.loads((run_dir / "summary.json").read_text()), True, wall
    if not start:
        return None, False, math.nan
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    tic = time.perf_counter()
    r = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        cwd=log_dir,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - tic
    if r.returncode != 0:
        tail = "\n".join(r.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"train.py {' '.join(overrides)} failed:\n{tail}")
    wall_file.write_text(f"{wall:.1f}\n")
    return json.loads((run_dir / "summary.json").read_text()), False, wall


def common(a: argparse.Namespace) -> list[str]:
    """Data and network overrides shared by experts, distillation and evaluation."""
    data = [
        f"dataset.train_per_class={a.train_per_class}",
        f"dataset.test_per_class={a.test_per_class}",
    ]
    if a.data_dir:
        data += [f"dataset.data_dir={Path(a.data_dir).resolve()}", "dataset.download=false"]
    net = [f"net.width={a.width}", f"net.depth={a.depth}"]
    return ["dataset=cifar10", f"dataset.zca={str(a.zca).lower()}", *data, *net, *a.overrides]


def teacher_args(a, seed: int, store: Path) -> list[str]:
    return [
        "task=teacher", *BASE, *common(a), f"seed={seed}", f"teacher.num_experts={a.experts}",
        f"teacher.epochs={a.teacher_epochs}", f"teacher.batch_size={a.teacher_batch}",
        f"teacher.out={store}",
    ]  # fmt: skip


def distill_args(a, arm: str, ipc: int, seed: int, store: Path) -> list[str]:
    nets = "[" + ",".join(a.eval_nets) + "]"
    datm_window = []
    if "method=datm" in ARMS[arm] or "method=pad" in ARMS[arm]:
        # DATM's easy-first window at this scale: from half the start range, widening to all of
        # it by half the iterations (the published CIFAR-10 IPC 10 row: 10 -> 20 by 1000 of 10k)
        datm_window = [
            f"method.current_max_start_epoch={max(1, a.max_start_epoch // 2)}",
            f"method.expansion_end_epoch={max(1, a.iterations // 2)}",
        ]
    return [
        "task=distill", *BASE, *common(a), f"ipc={ipc}", f"seed={seed}", *ARMS[arm],
        *datm_window, f"distill.init={a.init}", f"distill.trajectories={store}",
        f"distill.iterations={a.iterations}", f"distill.syn_steps={a.syn_steps}",
        f"distill.expert_epochs={a.expert_epochs}", f"distill.max_start_epoch={a.max_start_epoch}",
        "distill.batch_syn=all", f"distill.eval_every={a.eval_every}", f"distill.eval_nets={nets}",
        f"distill.eval_num={a.eval_num}", f"distill.eval_epochs={a.eval_epochs}",
        f"distill.checkpoint_every={max(1, a.iterations // 4)}",
    ]  # fmt: skip


def evaluate_args(a, set_file: Path, seed: int) -> list[str]:
    nets = "[" + ",".join(a.eval_nets) + "]"
    return [
        "task=evaluate", *BASE, *common(a), f"seed={seed}", f"evaluate.set={set_file}",
        f"evaluate.nets={nets}", f"evaluate.num_eval={a.eval_num}",
        f"evaluate.epochs={a.eval_epochs}", "evaluate.grid=false",
    ]  # fmt: skip


def masked_trace(run_dir: Path) -> list[tuple[int, float]]:
    """``(step, distill/pruned_fraction)`` rows of the run's CSV log (the whole-vector fraction
    the matching loss ignored at that iteration)."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.exists():
        return []
    rows = []
    with open(path) as f:
        for row in csv.DictReader(f):
            value = row.get("distill/pruned_fraction")
            if value not in (None, ""):
                rows.append((int(row["step"]), float(value)))
    return rows


RANKING_KEYS = ("hlr", "ior", "lrs")


def evaluate_extras(summary: dict) -> dict:
    """Soft-label accuracy and DD-Ranking scores from ``task=evaluate``'s summary, when it has
    them (keys named ``*soft*`` and ``hlr``/``ior``/``lrs``, top level or under ``ddranking``)."""
    out = {}
    nested = summary.get("ddranking") if isinstance(summary.get("ddranking"), dict) else {}
    for key in RANKING_KEYS:
        value = summary.get(key, nested.get(key))
        if isinstance(value, int | float):
            out[key] = float(value)
    for key, value in summary.items():
        if "soft" in key and key.endswith("mean") and isinstance(value, int | float):
            out.setdefault("soft_acc", float(value))
    return out


def study(a: argparse.Namespace) -> list[dict]:
    from tqdm import tqdm

    out = Path(a.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    seeds = list(range(a.first_seed, a.first_seed + a.seeds))
    # seed-major: a study stopped after k seeds has k complete seeds (rerun with --seeds k)
    cells = [(ipc, arm, s) for s in seeds for ipc in a.ipcs for arm in a.arms]
    records, reused_cells, missing = [], 0, []
    start = not a.report_only
    bar = tqdm(total=len(seeds) + len(cells), desc="masking study", unit="cell", file=sys.stderr)
    for s in seeds:  # experts: one store per seed, shared by every arm and IPC of that seed
        store = out / "experts" / f"seed{s}"
        run(teacher_args(a, s, store / "store"), store, out / "logs", start)
        bar.update(1)
    for ipc, arm, s in cells:
        store = out / "experts" / f"seed{s}" / "store"
        run_dir = out / f"ipc{ipc}" / _slug(arm) / f"seed{s}"
        args = distill_args(a, arm, ipc, s, store)
        bar.set_postfix_str(f"ipc {ipc} {arm} seed {s}")
        summary, reused, wall = run(args, run_dir, out / "logs", start)
        if summary is None:  # --report-only: not run yet
            missing.append((ipc, arm, s))
            bar.update(1)
            continue
        record = {
            "ipc": ipc, "arm": arm, "seed": s, "reused": reused, "wall_s": wall,
            "command": "python train.py " + " ".join(args + [f"paths.output_dir={run_dir}"]),
            "hard_acc": summary.get("final_acc"),
            "last_masked": summary.get("last_pruned_fraction"),
            "threshold_skips": summary.get("threshold_skips"),
            "learned_lr": summary.get("learned_lr"),
            "masked_trace": masked_trace(run_dir),
        }  # fmt: skip
        if any(arm_rule(arm).values()):
            record["layer_masks"] = cached_layer_masks(run_dir, store, arm, a, s)
        if a.evaluate:
            ev_summary, ev_reused, ev_wall = run(
                evaluate_args(a, run_dir / "set.pt", s), run_dir / "evaluate", out / "logs", start
            )
            if ev_summary is None:
                missing.append((ipc, arm, s))
                bar.update(1)
                continue
            record.update(evaluate_extras(ev_summary))
            record["reused"] = reused and ev_reused
            record["wall_s"] += ev_wall
        reused_cells += record["reused"]
        records.append(record)
        bar.update(1)
    bar.close()
    print(f"{reused_cells} of {len(cells)} cells reused from {out}", file=sys.stderr)
    a.missing = missing
    return records


# -- which layers a rule masks ------------------------------------------------------------------
def arm_rule(arm: str) -> dict:
    """The arm's masking settings (ε, PAD's depth and loss ratios) from its overrides."""
    keys = {
        "distill.eps": "eps",
        "method.depth_ratio": "depth_ratio",
        "method.loss_ratio": "loss_ratio",
    }
    rule = {"eps": 0.0, "depth_ratio": 0.0, "loss_ratio": 0.0}
    for o in ARMS[arm]:
        key, _, value = o.partition("=")
        if key in keys:
            rule[keys[key]] = float(value)
    return rule


def layer_masks(run_dir: Path, store: Path, arm: str, a: argparse.Namespace, seed: int) -> dict:
    """Per layer, the fraction of parameters the arm's rule masks, for every set the run saved
    (``sets/iter_*.pt`` and the final ``set.pt``): the set's student is unrolled
    ``a.syn_steps`` steps (its learned lr, its labels, DSA as in the run) from ``a.probe_pairs``
    (expert, start epoch) pairs drawn from ``seed`` (the same pairs for every arm) and the rule's
    keep-mask is taken against the expert's target, as the matching loss does. The run logs only
    the whole-vector fraction; this recomputes the split after the fact."""
    import torch

    from datamodules.syn_set import SyntheticSet
    from datamodules.trajectories import ExpertStore
    from lightning_modules.condense.dsa import DSA
    from lightning_modules.condense.matching import selection_mask
    from lightning_modules.condense.unroll import classifier_loss, student_unroll
    from lightning_modules.nets import FlatParams, build_classifier

    rule = arm_rule(arm)
    experts = ExpertStore(store)
    indices = experts.indices()
    g = torch.Generator().manual_seed(seed)
    pairs = [
        (indices[int(torch.randint(len(indices), (1,), generator=g))],
         int(torch.randint(a.max_start_epoch, (1,), generator=g)))
        for _ in range(a.probe_pairs)
    ]  # fmt: skip
    snapshots = sorted((run_dir / "sets").glob("iter_*.pt"))
    files = [(int(p.stem.split("_")[1]), p) for p in snapshots] + [
        (a.iterations, run_dir / "set.pt")
    ]
    net = layout = None
    out = {}
    for iteration, path in files:
        syn = SyntheticSet.load(path)
        if net is None:
            im = syn.images.shape[-1]
            net = build_classifier(
                "convnet", syn.images.shape[1], 10, im, width=a.width, depth=a.depth
            )
            layout = FlatParams(net)
            groups = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in layout.names))
        soft = syn.soft_labels is not None
        targets = syn.soft_labels if soft else syn.labels
        loss_fn = classifier_loss(net, layout, soft=soft)
        masked = {name: [0, 0] for name in groups}
        for k, (index, start) in enumerate(pairs):
            expert = experts.load(index)
            theta = expert.params(start).clone()
            target = expert.params(start + a.expert_epochs).clone()
            draws = torch.Generator().manual_seed(seed * 1000 + k)
            end = student_unroll(
                loss_fn, theta, syn.images, targets, torch.tensor(float(syn.lr)),
                steps=a.syn_steps, augment=DSA("color_crop_cutout_flip_scale_rotate"),
                generator=draws,
            )  # fmt: skip
            keep = selection_mask(end.detach(), target, **rule)
            for name, size, part in zip(
                layout.names, layout.sizes, torch.split(keep, layout.sizes)
            ):
                group = masked[name.rsplit(".", 1)[0]]
                group[0] += int((~part).sum())
                group[1] += size
        out[iteration] = {name: m / n for name, (m, n) in masked.items()}
    return out


def cached_layer_masks(run_dir: Path, store: Path, arm: str, a: argparse.Namespace, seed: int):
    """:func:`layer_masks`, kept in the run folder with the settings that made it (a rerun of
    the same study reads it)."""
    key = {"arm": arm, "pairs": a.probe_pairs, "syn_steps": a.syn_steps, "seed": seed}
    path = run_dir / "layer_masks.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return {int(k): v for k, v in saved["masks"].items()}
    masks = layer_masks(run_dir, store, arm, a, seed)
    path.write_text(json.dumps({"key": key, "masks": masks}, indent=1))
    return masks


# -- report -------------------------------------------------------------------------------------
def _fmt(x, digits=2):
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def summarise(records: list[dict]) -> list[dict]:
    """One row per (IPC, arm): accuracy with its interval, the paired difference to MTT, masks."""
    rows = []
    for ipc in sorted({r["ipc"] for r in records}):
        at = [r for r in records if r["ipc"] == ipc]
        base = {r["seed"]: r["hard_acc"] for r in at if r["arm"] == BASELINE}
        for arm in dict.fromkeys(r["arm"] for r in at):
            runs = sorted((r for r in at if r["arm"] == arm), key=lambda r: r["seed"])
            accs = [r["hard_acc"] for r in runs]
            mean, lo, hi = mean_ci(accs)
            row = {"ipc": ipc, "arm": arm, "n": len(runs), "acc": mean, "lo": lo, "hi": hi}
            shared = [r for r in runs if r["seed"] in base]
            if arm != BASELINE and len(shared) >= 2:
                row["vs_mtt"] = paired(
                    [r["hard_acc"] for r in shared], [base[r["seed"]] for r in shared]
                )
            # PAD's cuts and DATM + ε sit on DATM's soft labels and window: their own effect is
            # the paired difference to DATM
            soft_base = {r["seed"]: r["hard_acc"] for r in at if r["arm"] == "DATM"}
            on_datm = [r for r in runs if r["seed"] in soft_base]
            if arm.startswith(("PAD", "DATM +")) and len(on_datm) >= 2:
                row["vs_datm"] = paired(
                    [r["hard_acc"] for r in on_datm], [soft_base[r["seed"]] for r in on_datm]
                )
            traces = [[v for _, v in r["masked_trace"]] for r in runs if r["masked_trace"]]
            if traces:
                row["masked_mean"] = sum(sum(t) / len(t) for t in traces) / len(traces)
            lasts = [r["last_masked"] for r in runs if r["last_masked"] is not None]
            row["masked_last"] = sum(lasts) / len(lasts) if lasts else None
            for key in ("soft_acc", *RANKING_KEYS, "threshold_skips"):
                vals = [r[key] for r in runs if r.get(key) is not None]
                row[key] = sum(vals) / len(vals) if vals else None
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| IPC | arm | seeds | hard-label acc % [95 % CI] | Δ vs MTT [95 % CI] | t-test p | "
        "sign p (wins) | Δ vs DATM [95 % CI], t p | masked, mean / last | soft-label acc % | "
        "hlr | ior | lrs | threshold skips |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        v = r.get("vs_mtt")
        delta = f"{v['diff']:+.2f} [{v['lo']:+.2f}, {v['hi']:+.2f}]" if v else "-"
        p_t = _fmt(v["p_t"], 3) if v else "-"
        p_s = f"{v['p_sign']:.3f} ({v['wins']}/{v['n']})" if v else "-"
        w = r.get("vs_datm")
        vs_datm = f"{w['diff']:+.2f} [{w['lo']:+.2f}, {w['hi']:+.2f}], {w['p_t']:.3f}" if w else "-"
        masked = f"{_fmt(r.get('masked_mean'), 3)} / {_fmt(r.get('masked_last'), 3)}"
        lines.append(
            f"| {r['ipc']} | {r['arm']} | {r['n']} | {r['acc']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}] "
            f"| {delta} | {p_t} | {p_s} | {vs_datm} | {masked} | {_fmt(r.get('soft_acc'))} | "
            f"{_fmt(r.get('hlr'), 3)} | {_fmt(r.get('ior'), 3)} | {_fmt(r.get('lrs'), 3)} | "
            f"{_fmt(r.get('threshold_skips'), 1)} |"
        )
    return "\n".join(lines) + "\n"


def layer_table(records: list[dict]) -> str:
    """Mean over seeds of the masked fraction per layer, at every probed iteration."""
    probed = [r for r in records if r.get("layer_masks")]
    if not probed:
        return ""
    layers = list(next(iter(probed[0]["layer_masks"].values())))
    lines = [
        "| IPC | arm | iteration | " + " | ".join(layers) + " |",
        "|---|---|---|" + "---|" * len(layers),
    ]
    keys = dict.fromkeys((r["ipc"], r["arm"]) for r in probed)
    for ipc, arm in keys:
        runs = [r for r in probed if (r["ipc"], r["arm"]) == (ipc, arm)]
        for it in sorted(runs[0]["layer_masks"]):
            cells = [sum(r["layer_masks"][it][name] for r in runs) / len(runs) for name in layers]
            lines.append(
                f"| {ipc} | {arm} | {it} | " + " | ".join(f"{c:.3f}" for c in cells) + " |"
            )
    return "\n".join(lines) + "\n"


def plots(records: list[dict], rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ipcs = sorted({r["ipc"] for r in rows})
    fig, axes = plt.subplots(1, len(ipcs), figsize=(5 * len(ipcs), 4), squeeze=False)
    for ax, ipc in zip(axes[0], ipcs):
        at = [r for r in rows if r["ipc"] == ipc]
        ys = range(len(at))
        for y, r in zip(ys, at):
            lo = r["lo"] if math.isfinite(r["lo"]) else r["acc"]
            hi = r["hi"] if math.isfinite(r["hi"]) else r["acc"]
            ax.errorbar(r["acc"], y, xerr=[[r["acc"] - lo], [hi - r["acc"]]], fmt="o", capsize=3)
            seeds = [c["hard_acc"] for c in records if c["ipc"] == ipc and c["arm"] == r["arm"]]
            ax.scatter(seeds, [y] * len(seeds), s=8, color="grey", zorder=0)
        ax.set_yticks(list(ys), [r["arm"] for r in at])
        ax.invert_yaxis()
        ax.set_xlabel("hard-label test accuracy % (mean, 95 % CI; grey: seeds)")
        ax.set_title(f"IPC {ipc}")
    fig.tight_layout()
    acc_png = out / "accuracy.png"
    fig.savefig(acc_png, dpi=110)
    plt.close(fig)

    arms = [a for a in dict.fromkeys(r["arm"] for r in records) if a.startswith(("eps", "PAD"))]
    fig, axes = plt.subplots(1, len(ipcs), figsize=(5 * len(ipcs), 4), squeeze=False)
    for ax, ipc in zip(axes[0], ipcs):
        for arm in arms:
            traces = [c["masked_trace"] for c in records if c["ipc"] == ipc and c["arm"] == arm]
            traces = [t for t in traces if t]
            if not traces:
                continue
            steps = [s for s, _ in traces[0]]
            n = min(len(t) for t in traces)
            mean = [sum(t[i][1] for t in traces) / len(traces) for i in range(n)]
            ax.plot(steps[:n], mean, label=arm)
        ax.set_xlabel("iteration")
        ax.set_ylabel("fraction of parameters masked (mean over seeds)")
        ax.set_title(f"IPC {ipc}")
        if ax.get_lines():
            ax.legend(fontsize=7)
    fig.tight_layout()
    mask_png = out / "masked_fraction.png"
    fig.savefig(mask_png, dpi=110)
    plt.close(fig)
    pngs = [acc_png, mask_png]

    probed = [(c["ipc"], c["arm"]) for c in records if c.get("layer_masks")]
    panels = [k for k in dict.fromkeys(probed) if k[1].startswith(("eps", "PAD loss"))]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
        for ax, (ipc, arm) in zip(axes[0], panels):
            runs = [c["layer_masks"] for c in records if (c["ipc"], c["arm"]) == (ipc, arm)]
            its = sorted(runs[0])
            for name in runs[0][its[0]]:
                ys = [sum(m[it][name] for m in runs) / len(runs) for it in its]
                ax.plot(its, ys, marker="o", label=name)
            ax.set_title(f"IPC {ipc}, {arm}", fontsize=9)
            ax.set_xlabel("iteration of the set")
            ax.set_ylim(0, 1)
        axes[0][0].set_ylabel("fraction masked per layer")
        axes[0][-1].legend(fontsize=6)
        fig.tight_layout()
        layers_png = out / "masked_layers.png"
        fig.savefig(layers_png, dpi=110)
        plt.close(fig)
        pngs.append(layers_png)
    return pngs


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--out", default="outputs/masking_study")  # run folders: git-ignored
    p.add_argument("--data-dir", default=None, help="CIFAR root (the official archive layout)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--ipcs", nargs="+", type=int, default=[1, 10])
    p.add_argument("--seeds", type=int, default=None, help="seeds per arm (scale: cpu 5)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--init", default="real", choices=["real", "correct", "noise"])
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument(
        "--probe-pairs", type=int, default=4, help="(expert, start) pairs per mask probe"
    )
    p.add_argument("--evaluate", action="store_true", help="also task=evaluate each set")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="start nothing: tabulate the finished cells and list the missing ones",
    )
    p.add_argument("--overrides", nargs="*", default=[], help="extra overrides for every run")
    for key, value in SCALES["cpu"].items():
        if key == "seeds":
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=None)
        elif isinstance(value, list):
            p.add_argument(flag, nargs="+", default=None)
        else:
            p.add_argument(flag, type=type(value), default=None)
    a = p.parse_args(argv)
    for key, value in SCALES[a.scale].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if BASELINE not in a.arms:
        p.error(f"--arms must include {BASELINE}: every difference is paired against it")
    if a.seeds < 2:
        p.error("--seeds must be at least 2 for a paired interval")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    out = Path(a.out).resolve()
    tic = time.perf_counter()
    records = study(a)
    if not records:
        print(f"no finished cell under {out}", file=sys.stderr)
        return 2
    rows = summarise(records)
    table = markdown(rows)
    pngs = plots(records, rows, out)
    scale = {k: getattr(a, k) for k in SCALES["cpu"]}
    (out / "cells.json").write_text(
        json.dumps({"scale": scale, "args": sys.argv[1:], "cells": records, "rows": rows}, indent=1)
    )
    wall = time.perf_counter() - tic
    timed = [r for r in records if math.isfinite(r["wall_s"])]  # runs older than the wall file: nan
    spent = sum(r["wall_s"] for r in timed if not r["reused"])
    cells = sum(r["wall_s"] for r in timed)
    head = f"Scale: {json.dumps(scale)}; init={a.init}. This call: {wall:.0f} s wall, "
    head += f"{spent:.0f} s in new runs; the {len(timed)} timed cells when they ran: {cells:.0f} s"
    head += f" ({len(records) - len(timed)} without a recorded time).\n\n"
    if a.missing:
        head += f"**{len(a.missing)} of {len(a.missing) + len(records)} cells not run yet** "
        head += "(`--report-only`; pairs use the seeds both arms have): "
        head += ", ".join(f"IPC {i} {arm} seed {s}" for i, arm, s in a.missing) + ".\n\n"
    layers = layer_table(records)
    text = head + table + ("\nMasked fraction per layer (probe):\n\n" + layers if layers else "")
    (out / "masking_study.md").write_text(text)
    print(text)
    print("plots: " + ", ".join(str(p) for p in pngs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
