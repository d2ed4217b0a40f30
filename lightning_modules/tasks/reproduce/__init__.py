"""``task=reproduce``: one command per paper table (Li et al. 2024; REFERENCE.md section A).

``python train.py task=reproduce dataset=cifar10 ipc=10`` makes what a Table I row needs, in order:

1. experts: ``task=teacher`` into the expert store (experts already there are skipped);
2. distillation with the paper's ε (``reproduce.eps``, 0.1) and with ε = 0 (MTT): ``task=distill``;
3. Random / Herding / Forgetting coresets: ``task=coreset``;
4. evaluation of every set (and with ``reproduce.full=true`` the whole train split) with one
   protocol: the same networks, epochs and ``num_eval`` for all (``evaluate_set``);
5. the row, measured beside the published numbers: printed, ``row.md`` / ``row.json`` in the run
   dir, and in ``summary.json``; the sets' PNG grids are copied to ``<run dir>/sets/``.

``table=cross_arch`` does Table III instead: the CIFAR-10 IPC 10 sets distilled with ε and with
ε = 0, each evaluated on ConvNet, AlexNet, VGG11 and ResNet18.

Every sub-task runs in-process on a config derived from this one, in its own folder of the work
dir (``reproduce.workdir``, default ``<runs_dir>/reproduce_cache/<dataset>-ipc<ipc>[-zca]-<hash>``,
the hash over the net, the data subset and the seed) with its own ``summary.json``. A stage's
``stage.json`` records the settings that made it: a rerun reuses a finished stage whose settings
match, recomputes one whose settings changed (saying which), and continues a killed distillation
from its last checkpoint; evaluations are cached per set file, network and protocol. So a killed
``task=reproduce`` run, started again with the same command, continues from where it stopped.

The ``reproduce.*`` scale knobs (experts, expert_epochs, iterations, syn_steps, max_start_epoch,
eval_epochs, num_eval) are written into the sub-tasks' own keys (``teacher.num_experts``, ...);
``null`` leaves those keys as they are, i.e. the published settings. With few expert epochs,
``distill.max_start_epoch`` is capped to what the experts hold (logged).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig, open_dict

from lightning_modules.tasks.common import write_json
from lightning_modules.tasks.reproduce import fanout
from lightning_modules.tasks.reproduce.config import (
    CORESETS,
    MATCHING,
    NEEDS_EXPERTS,
    SOFT_LABEL_METHODS,
    _stage,
    check_one_device,
    chosen_methods,
    chosen_nets,
    default_workdir,
    expert_store_dir,
    kip_widths,
    settle,
    table_kind,
    with_width,
)
from lightning_modules.tasks.reproduce.stages import (
    Stage,
    ensure_experts,
    evaluate_all,
    make_set,
)
from lightning_modules.tasks.reproduce.start_window import cap_start_epoch
from lightning_modules.tasks.reproduce.tables import (
    _cell,
    column_label,
    column_result,
    comparison_png,
    cross_arch_table,
    kip_table,
    log_table,
    row_table,
    scale,
)
from lightning_modules.utils.files import write_text

log = logging.getLogger(__name__)


def run(cfg: DictConfig, out_dir: Path) -> dict:
    out_dir = Path(out_dir)
    table = table_kind(cfg)
    check_one_device(cfg)
    methods, nets = chosen_methods(cfg, table), chosen_nets(cfg, table)
    cfg, workdir = prepare(cfg)
    log.info(
        "reproduce %s: %s ipc=%d (ZCA %s), methods %s, nets %s; work dir %s",
        "Table III (cross-architecture)" if table == "cross_arch" else "a Table I row",
        cfg.dataset.name, int(cfg.ipc), "on" if cfg.dataset.zca else "off", methods, nets, workdir,
    )  # fmt: skip
    launcher = fanout.enabled(cfg)  # a submitit launcher: the stages as parallel jobs first
    jobs = (
        fanout.run_phases(cfg, launcher, table, methods, nets, workdir, out_dir) if launcher else {}
    )
    experts, stages, reused = make_sets(cfg, methods, workdir)  # cached by the jobs, if any
    reused.update(dict.fromkeys(jobs.get("sets", {}), False))
    entries = {m: stages[m].set_path for m in methods}
    if cfg.reproduce.full:
        entries["full"] = None
    if table == "kip":
        results, nets = evaluate_widths(cfg, entries, workdir)
    else:
        results = evaluate_all(cfg, entries, nets, workdir)
    log.info("%s table", _stage(5))
    images = set_images(cfg, methods, nets, stages, results, out_dir)
    info = scale(cfg, experts)
    make = {"cross_arch": cross_arch_table, "kip": kip_table}.get(table, row_table)
    markdown, record = make(cfg, methods, nets, results, info, images)
    record.update(workdir=str(workdir), expert_store=cfg.teacher.out)
    record["stages"] = {m: str(s.dir) for m, s in stages.items()}
    if experts:
        record["experts"] = {k: v for k, v in experts.items() if k != "identity"}
    print("\n" + markdown, flush=True)
    write_text(out_dir / "row.md", markdown)
    write_json(out_dir / "row.json", record)  # what was measured: the same on every rerun
    write_json(out_dir / "stages.json", {**stage_details(stages, reused, results), "jobs": jobs})
    summary = summarise(cfg, table, nets, workdir, markdown, record, results, info, images)
    summary["reused"] = reused
    log_table(cfg, record, summary, images, out_dir)
    return summary


def evaluate_widths(cfg: DictConfig, entries: dict, workdir: Path) -> tuple[dict, list[str]]:
    """Table II: the KIP set on a ConvNet of each ``reproduce.kip_widths``, the other sets on the
    row's ``net.width``; results keyed ``width <w>`` in place of a net name."""
    widths = kip_widths(cfg)
    results: dict = {column: {} for column in entries}
    for width in widths:
        part = evaluate_all(with_width(cfg, width), {"kip": entries["kip"]}, ["convnet"], workdir)
        results["kip"][f"width {width}"] = part["kip"]["convnet"]
    own = int(cfg.net.width)
    others = {c: p for c, p in entries.items() if c != "kip"}
    for column, by_net in evaluate_all(cfg, others, ["convnet"], workdir).items():
        results[column][f"width {own}"] = by_net["convnet"]
    names = [f"width {w}" for w in widths]
    return results, names + ([f"width {own}"] if own not in widths else [])


def prepare(cfg: DictConfig) -> tuple[DictConfig, Path]:
    """The settled config (every stage's settings fixed once) and the work dir, with the expert
    store that teacher, distill and coreset stages share."""
    cfg = settle(cfg)
    workdir = Path(cfg.reproduce.workdir) if cfg.reproduce.get("workdir") else default_workdir(cfg)
    store = expert_store_dir(cfg, workdir)
    with open_dict(cfg):
        cfg.teacher.out = str(store)
        cfg.distill.trajectories = str(store)
        cfg.coreset.store = str(store)
    workdir.mkdir(parents=True, exist_ok=True)
    return cfg, workdir


def make_sets(cfg: DictConfig, methods: list[str], workdir: Path):
    """Stages 1-3: experts when a method needs them, the distilled sets, the coresets."""
    needs_experts = any(m in NEEDS_EXPERTS for m in methods)
    experts = ensure_experts(cfg, workdir) if needs_experts else None
    if experts is None:
        log.info("%s experts: not needed for %s", _stage(1), methods)
    if any(m in ("mtt", "pruning") for m in methods):
        cap_start_epoch(cfg, experts["epochs"])
    elif not any(m in MATCHING for m in methods):
        log.info("%s distillation: none in %s", _stage(2), methods)
    stages: dict[str, Stage] = {}
    reused: dict[str, bool] = {}
    # the order they always ran in, then DATM / PAD
    for method in ("pruning", "mtt", *MATCHING, *CORESETS, *SOFT_LABEL_METHODS):
        if method in methods:
            stages[method], reused[method] = make_set(cfg, method, workdir, experts)
    if not any(m in CORESETS for m in methods):
        log.info("%s coresets: none in %s", _stage(3), methods)
    return experts, stages, reused


def set_images(cfg, methods, nets, stages, results, out_dir: Path) -> dict[str, str]:
    """Each set's grid copied to ``<run dir>/sets/`` and all of them side by side in one PNG."""
    images = {}
    for method in methods:
        png = stages[method].dir / "set.png"
        if png.exists():
            dest = out_dir / "sets" / f"{method}.png"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, dest)
            images[method] = str(dest.relative_to(out_dir))
    eps = float(cfg.reproduce.eps)
    titles = {
        m: column_label(m, eps)
        + "\n"
        + _cell(column_result(results, m, nets[0])).replace(" ± ", "±")
        + " %"
        for m in methods
    }
    compare = comparison_png(
        {m: stages[m].set_path for m in methods}, titles, out_dir / "sets" / "compare.png"
    )
    return {"all sets": str(compare.relative_to(out_dir)), **images}


def stage_details(stages: dict, reused: dict, results: dict) -> dict:
    """How this run got there: which stages were reused, their metrics and timings, which
    evaluations came from the cache (kept out of row.json so that a rerun writes the same row)."""
    return {
        "stages": {
            m: {"dir": str(s.dir), "reused": reused[m], "metrics": s.metrics()}
            for m, s in stages.items()
        },
        "evaluations": {
            column: {n: {"cached": r["cached"], "seconds": r["seconds"]} for n, r in by_net.items()}
            for column, by_net in results.items()
        },
    }


def summarise(cfg, table, nets, workdir, markdown, record, results, info, images) -> dict:
    """summary.json: the row without the per-stage details, one ``acc_*`` key per cell."""
    summary = {
        "table": table,
        "dataset": str(cfg.dataset.name),
        "ipc": int(cfg.ipc),
        "workdir": str(workdir),
        "row_md": markdown,
        "row": {  # row.json without the per-stage details
            "paper": record["paper"]["acc"],
            "measured": {
                column: {net: {"mean": r["mean"], "std": r["std"]} for net, r in by_net.items()}
                for column, by_net in results.items()
            },
            "scale": info["long"],
            "images": images,
        },
    }
    for column, by_net in results.items():
        for net, r in by_net.items():
            name = net.replace(" ", "")  # "width 128" -> width128 (table=kip)
            summary[f"acc_{column}_{name}" if len(nets) > 1 else f"acc_{column}"] = r["mean"]
    main = "pruning" if "pruning" in results else next(iter(results))
    summary["objective"] = next(iter(results[main].values()))["mean"]
    return summary
