"""The table of ``task=reproduce``: the measured row (or Table III) beside the published
numbers as markdown and JSON, the sets side by side as one PNG, and both to the logger."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from lightning_modules.tasks.common import build_logger, finish_wandb, log_images, net_options
from lightning_modules.tasks.reproduce import paper_numbers
from lightning_modules.tasks.reproduce.config import NET_LABELS
from lightning_modules.utils.files import atomic_path

#: the two evaluations of a soft-label set (DATM, PAD): column suffix -> its label
LABEL_KINDS = {"_soft": "acc_soft", "_hard": "acc_hard"}


def column_label(method: str, eps: float) -> str:
    for suffix, name in LABEL_KINDS.items():
        if method.endswith(suffix):
            return f"{column_label(method.removesuffix(suffix), eps)}, {name}"
    return {
        "random": "Random",
        "forgetting": "Forgetting",
        "herding": "Herding",
        "dc": "DC",
        "dsa": "DSA",
        "dm": "DM",
        "cafe": "CAFE (+DSA)",
        "kip": "KIP (width 128)",
        "mtt": "MTT (ε=0)",
        "pruning": f"pruning (ε={eps:g})",
        "datm": "DATM",
        "pad": "PAD",
        "full": "full dataset",
    }[method]


def result_columns(methods: list[str], results: dict) -> list[str]:
    """The table's columns: a method, or its ``_soft`` and ``_hard`` evaluations (soft labels)."""
    out = []
    for m in methods:
        split = [m + s for s in LABEL_KINDS if m + s in results]
        out += split if split and m not in results else [m]
    return out


def column_result(results: dict, method: str, net: str) -> dict | None:
    """A method's headline result on ``net``: its only one, or its soft-label one."""
    by_net = results.get(method) or results.get(method + "_soft") or {}
    return by_net.get(net)


def paper_value(paper: dict, column: str):
    """The published number of a column: none for a soft-label set's hard-label evaluation
    (DATM and PAD publish soft-label accuracies)."""
    if column.endswith("_hard"):
        return None
    return paper.get(column.removesuffix("_soft"))


def _net_text(cfg: DictConfig) -> str:
    """``convnet`` plus the options that differ from conf/net/<name>.yaml."""
    name = str(cfg.net.name)
    default_file = Path(__file__).resolve().parents[3] / "conf" / "net" / f"{name}.yaml"
    defaults = OmegaConf.to_container(OmegaConf.load(default_file)) if default_file.exists() else {}
    changed = [f"{k}={v}" for k, v in net_options(cfg.net).items() if defaults.get(k) != v]
    return name + (f" ({', '.join(changed)})" if changed else "")


def _split_text(per_class) -> str:
    return f"{per_class} images/class" if per_class else "all images"


def scale(cfg: DictConfig, experts: dict | None) -> dict:
    """What was run, as a dict and as text (short for the table, long under it)."""
    d, e = cfg.distill, cfg.evaluate
    info = {
        "net": _net_text(cfg),
        "zca": bool(cfg.dataset.zca),
        "train": _split_text(cfg.dataset.get("train_per_class")),
        "test": _split_text(cfg.dataset.get("test_per_class")),
        "experts": experts["num_experts"] if experts else 0,
        "expert_epochs": experts["epochs"] if experts else 0,
        "iterations": int(d.iterations),
        "syn_steps": int(d.syn_steps),
        "max_start_epoch": int(d.max_start_epoch),
        "eval_epochs": int(e.epochs),
        "num_eval": int(e.num_eval),
        "threads": torch.get_num_threads(),
    }
    info["short"] = (
        f"{info['net']}, {info['experts']} experts x {info['expert_epochs']} ep, "
        f"{info['iterations']} it x {info['syn_steps']} steps, eval {info['num_eval']} x "
        f"{info['eval_epochs']} ep"
        + (
            f", train {cfg.dataset.train_per_class}/class"
            if cfg.dataset.get("train_per_class")
            else ""
        )
    )
    info["long"] = (
        f"net {info['net']}; ZCA {'on' if info['zca'] else 'off'}; train split {info['train']}; "
        f"test split {info['test']}; {info['experts']} experts of {info['expert_epochs']} epochs; "
        f"distillation {info['iterations']} iterations, syn_steps {info['syn_steps']}, "
        f"expert_epochs {int(d.expert_epochs)}, max_start_epoch {info['max_start_epoch']}, "
        f"lr_img {d.lr_img:g}, lr_lr {d.lr_lr:g}, lr_teacher {d.lr_teacher:g}; evaluation "
        f"{info['num_eval']} networks x {info['eval_epochs']} epochs each, final epoch; "
        f"{info['threads']} CPU thread(s)"
    )
    return info


def _cell(result: dict | None) -> str:
    return "—" if not result else f"{result['mean']:.1f} ± {result['std']:.1f}"


def _paper_cell(value) -> str:
    return "—" if value is None else f"{value:.1f}"


NOTE = (
    "Paper numbers: the best of several checkpoints chosen on the test set (MTT family), "
    "5000 iterations, up to 200 experts, 5 networks x 1000 epochs. Measured: the final set, "
    "accuracy after the last evaluation epoch, mean ± std over the networks."
)


def row_table(cfg, methods, nets, results, info, images) -> tuple[str, dict]:
    """Table I: methods as columns, the paper's line then one measured line per net."""
    eps = float(cfg.reproduce.eps)
    ds, ipc = str(cfg.dataset.name), int(cfg.ipc)
    paper = paper_numbers.published_row(ds, ipc, methods)
    columns = result_columns(list(methods), results) + ["full"]
    head = f"Table I row: {ds} IPC {ipc}, test accuracy (%)"
    lines = [
        f"**{head}**",
        "",
        "| | " + " | ".join(column_label(c, eps) for c in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    soft = [m for m in paper_numbers.SOFT_LABEL_SOURCES if m in methods]
    if paper:
        source = "; ".join([" Li et al. 2024 Table I"] + [f"{m.upper()}: its paper" for m in soft])
        lines.append(
            f"| paper (ConvNet-3,{source}) | "
            + " | ".join(_paper_cell(paper_value(paper, c)) for c in columns)
            + " |"
        )
    for net in nets:
        cells = [_cell(results.get(c, {}).get(net)) for c in columns]
        label = f"measured here, {NET_LABELS.get(net, net)} (scale: {info['short']})"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"Scale: {info['long']}.", "", NOTE]
    if soft:
        lines.append(SOFT_NOTE)
    if not paper:
        lines.append(f"The paper has no Table I numbers for {ds} IPC {ipc}.")
    lines += images_line(images)
    record = {
        "table": "row",
        "dataset": ds,
        "ipc": ipc,
        "eps": eps,
        "columns": columns,
        "labels": {c: column_label(c, eps) for c in columns},
        "paper": {
            "source": paper_numbers.SOURCE,
            "net": "convnet",
            "acc": paper,
            **(
                {"soft_label_sources": {m: paper_numbers.SOFT_LABEL_SOURCES[m] for m in soft}}
                if soft
                else {}
            ),
        },  # fmt: skip
        "measured": {"scale": info, "acc": measured_only(results)},
        "images": images,
    }
    return "\n".join(lines) + "\n", record


SOFT_NOTE = (
    "DATM / PAD: their sets carry learned soft labels; acc_soft trains on them (their published "
    "protocol, DATM's soft cross-entropy), acc_hard on the same images with hard labels. The "
    "published numbers are soft-label ones."
)


def kip_kernel(cfg: DictConfig) -> str:
    """The kernel the KIP stage used: ``reproduce.method_keys.kip.kernel`` or the method's
    default (``conf/method/kip.yaml``)."""
    given = (cfg.reproduce.get("method_keys") or {}).get("kip", {}).get("kernel")
    default = Path(__file__).resolve().parents[3] / "conf" / "method" / "kip.yaml"
    return str(given or OmegaConf.load(default).get("kernel", "?"))


def kip_table(cfg, methods, nets, results, info, images) -> tuple[str, dict]:
    """Table II: the KIP set on ConvNets of each width, the pruning set at the row's width,
    the paper's numbers (KIP with the infinite-width ConvNet kernel) beside them."""
    eps = float(cfg.reproduce.eps)
    ds, ipc = str(cfg.dataset.name), int(cfg.ipc)
    kip_paper = paper_numbers.KIP_TABLE2.get((ds, ipc), {})
    ours_paper = paper_numbers.table1(ds, ipc).get("pruning")
    cells = [("kip", w) for w in nets if w in results["kip"]]
    cells += [(m, w) for m in methods if m != "kip" for w in nets if w in results.get(m, {})]
    kernel = kip_kernel(cfg)
    labels = [f"{'KIP' if m == 'kip' else column_label(m, eps)}, ConvNet {w}" for m, w in cells]

    def paper_value(method: str, width: str):
        w = int(width.split()[-1])
        if method == "kip":
            return kip_paper.get(w)
        return ours_paper if w == 128 else None

    lines = [
        f"**Table II: {ds} IPC {ipc}, test accuracy (%)**",
        "",
        "| | " + " | ".join(labels) + " |",
        "|---" * (len(cells) + 1) + "|",
        "| paper (Li et al. 2024 Table II; KIP: infinite-width ConvNet kernel) | "
        + " | ".join(_paper_cell(paper_value(m, w)) for m, w in cells)
        + " |",
        f"| measured here (KIP kernel {kernel}; scale: {info['short']}) | "
        + " | ".join(_cell(results[m][w]) for m, w in cells)
        + " |",
        "",
        f"Scale: {info['long']}.",
        "",
        "KIP here is trained with the kernel named above, not the paper's infinite-width ConvNet "
        "NTK (docs/methods/cafe_kip.md); its set is evaluated with hard labels.",
    ]
    lines += images_line(images)
    record = {
        "table": "kip",
        "dataset": ds,
        "ipc": ipc,
        "eps": eps,
        "cells": [{"method": m, "width": w} for m, w in cells],
        "paper": {
            "source": paper_numbers.SOURCE,
            "acc": {f"{m} {w}": paper_value(m, w) for m, w in cells},
        },
        "measured": {"scale": info, "acc": measured_only(results)},
        "images": images,
    }
    return "\n".join(lines) + "\n", record


def images_line(images: dict) -> list[str]:
    """The markdown links to the sets' grids (nothing when there are none)."""
    if not images:
        return []
    return ["", "Sets as images: " + ", ".join(f"[{m}]({p})" for m, p in images.items())]


def measured_only(results: dict) -> dict:
    """The accuracies without how they were obtained (cache hits, seconds)."""
    keep = ("accs", "mean", "std", "lr", "epochs")
    return {
        column: {net: {k: r[k] for k in keep if k in r} for net, r in by_net.items()}
        for column, by_net in results.items()
    }


def cross_arch_table(cfg, methods, nets, results, info, images) -> tuple[str, dict]:
    """Table III: nets as columns; per method the paper's line and the measured line."""
    eps = float(cfg.reproduce.eps)
    ds, ipc = str(cfg.dataset.name), int(cfg.ipc)
    paper = paper_numbers.cross_arch(ds, ipc)
    head = f"Table III: cross-architecture, {ds} IPC {ipc}, test accuracy (%)"
    lines = [
        f"**{head}**",
        "",
        "| | " + " | ".join(NET_LABELS.get(n, n) for n in nets) + " |",
        "|---" * (len(nets) + 1) + "|",
    ]
    order = [m for m in ("pruning", "mtt") if m in methods]  # pruning first, as in the paper
    for method in order + [m for m in methods if m not in order]:
        label = column_label(method, eps)
        if paper and method in paper:
            cells = [_paper_cell(paper.get(method, {}).get(n)) for n in nets]
            lines.append(f"| {label}, paper | " + " | ".join(cells) + " |")
        for column in result_columns([method], results):
            cells = [_cell(results.get(column, {}).get(n)) for n in nets]
            label = column_label(column, eps)
            lines.append(
                f"| {label}, measured here (scale: {info['short']}) | " + " | ".join(cells) + " |"
            )
    lines += ["", f"Scale: {info['long']}.", "", NOTE]
    if any(m in paper_numbers.SOFT_LABEL_SOURCES for m in methods):
        lines.append(SOFT_NOTE + " No cross-architecture numbers of theirs are quoted here.")
    if not paper:
        lines.append(
            f"The paper's Table III is CIFAR-10 IPC 10; no published numbers for {ds} IPC {ipc}."
        )
    lines += images_line(images)
    record = {
        "table": "cross_arch",
        "dataset": ds,
        "ipc": ipc,
        "eps": eps,
        "nets": nets,
        "paper": {"source": paper_numbers.SOURCE, "acc": paper},
        "measured": {"scale": info, "acc": measured_only(results)},
        "images": images,
    }
    return "\n".join(lines) + "\n", record


def comparison_png(sets: dict, titles: dict, path: Path) -> Path:
    """The sets side by side (a row per class, transform undone), titled with their accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from datamodules.syn_set import SyntheticSet

    grids = {m: SyntheticSet.load(p).grid().numpy() for m, p in sets.items()}
    widths = [g.shape[1] for g in grids.values()]
    height = max(g.shape[0] for g in grids.values())
    zoom = max(1, min(4, 400 // height))  # small sets are enlarged to be seen
    fig, axes = plt.subplots(
        1,
        len(grids),
        figsize=(max(3.0, sum(widths) * zoom / 100 + 0.6 * len(grids)), height * zoom / 100 + 0.7),
        gridspec_kw={"width_ratios": widths},
        squeeze=False,
    )
    for ax, (method, grid) in zip(axes[0], grids.items()):
        ax.imshow(grid, interpolation="nearest", cmap="gray" if grid.ndim == 2 else None)
        ax.set_title(titles[method], fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path


def log_table(cfg: DictConfig, record: dict, summary: dict, images: dict, out_dir: Path) -> None:
    """The measured means (and for W&B the table and the set images) to the configured logger."""
    logger = build_logger(cfg)
    if not logger:
        return
    logger.log_metrics({k: v for k, v in summary.items() if k.startswith("acc_")})
    if type(logger).__name__ == "WandbLogger":
        rows = [
            [column, net, r["mean"], r["std"]]
            for column, by_net in record["measured"]["acc"].items()
            for net, r in by_net.items()
        ]
        logger.log_table(key="reproduce/measured", columns=["set", "net", "mean", "std"], data=rows)
    for method, path in images.items():
        log_images(logger, f"reproduce/{method}", out_dir / path)
    logger.save()
    logger.finalize("success")
    finish_wandb()
