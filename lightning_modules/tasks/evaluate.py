"""``task=evaluate``: score a set file (or the full train split) by training fresh networks on it.

Writes ``results.md`` and ``results.json`` to the run dir, prints the table, logs it (W&B table
or plain metrics) and returns ``acc_<net>_mean`` / ``acc_<net>_std`` plus the ``table`` for
``summary.json``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from datamodules.syn_set import SyntheticSet
from lightning_modules.errors import UserError
from lightning_modules.evaluation import (
    check_net_names,
    evaluate_set,
    resolve_device,
    results_markdown,
)
from lightning_modules.tasks.common import (
    build_datamodule,
    build_logger,
    log_config,
    require_images,
    write_json,
)

log = logging.getLogger(__name__)

DEFAULT_LR = 0.01  # the lr of the coreset baselines and of real-data training in the field


def load_training_set(e: DictConfig, dm):
    """``(images, labels, lr, description, SyntheticSet | None)`` for ``evaluate.set``."""
    if e.set is None or str(e.set).strip() == "":
        raise UserError(
            "give the set to evaluate: evaluate.set=<file.pt> (from task=distill/coreset) "
            "or evaluate.set=full"
        )
    if str(e.set).lower() == "full":
        lr = DEFAULT_LR if e.lr is None else float(e.lr)
        return (
            dm.train_x,
            dm.train_y,
            lr,
            f"full {dm.name} train split ({len(dm.train_x)} images)",
            None,
        )
    syn = SyntheticSet.load(e.set)
    syn.check_against(dm)
    if e.lr is not None:
        lr = float(e.lr)
    elif syn.lr is not None:
        lr = syn.lr
    else:
        lr = DEFAULT_LR
        log.info(
            "set %s has no learned lr (method %s): using lr=%g (evaluate.lr overrides)",
            syn.source,
            syn.method,
            lr,
        )
    description = (
        f"{syn.method} {syn.dataset} ipc={syn.ipc} ({syn.num_images} images) from {syn.source}"
    )
    return syn.images, syn.labels, lr, description, syn


def summary_metrics(results: dict) -> dict:
    """``acc_<net>_mean``, ``acc_<net>_std`` and ``acc_<net>_runs`` per network."""
    out = {}
    for name, r in results.items():
        if name.startswith("_"):
            continue
        out[f"acc_{name}_mean"] = r["mean"]
        out[f"acc_{name}_std"] = r["std"]
        out[f"acc_{name}_runs"] = list(r["accs"])
    return out


def log_results(logger, results: dict, metrics: dict, grid: Path | None) -> None:
    """A W&B table (and the set's image) for W&B; plain metrics for any other logger."""
    if not logger:
        return
    from lightning.pytorch.loggers import WandbLogger

    logger.log_metrics({f"evaluate/{k}": v for k, v in metrics.items() if isinstance(v, float)})
    if isinstance(logger, WandbLogger):
        rows = [
            [n, r["mean"], r["std"], len(r["accs"]), ", ".join(f"{a:.2f}" for a in r["accs"])]
            for n, r in results.items()
        ]
        logger.log_table(
            key="evaluate/results", columns=["net", "mean", "std", "runs", "per run"], data=rows
        )
        if grid is not None:
            logger.log_image(key="evaluate/set", images=[str(grid)])
    logger.save()


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def run(cfg: DictConfig, out_dir: Path) -> dict:
    e = cfg.evaluate
    nets = check_net_names(
        list(e.nets) if not isinstance(e.nets, str) else [e.nets]
    )  # before loading data
    device = resolve_device(e.device)
    together = e.get("together", "auto")
    dm = build_datamodule(cfg)
    require_images(dm, "evaluate")
    dm.prepare_data()
    dm.setup()
    images, labels, lr, description, syn = load_training_set(e, dm)
    grid = None
    if syn is not None and e.get("grid", True):
        grid = syn.save_grid(out_dir / "set.png", num_classes=dm.num_classes)
    logger = build_logger(cfg)
    log_config(logger, cfg)
    log.info(
        "evaluating %s on %s: nets %s x%d, %d epochs, lr %g",
        description,
        device,
        nets,
        e.num_eval,
        e.epochs,
        lr,
    )
    results = evaluate_set(
        images,
        labels,
        dm.test_x,
        dm.test_y,
        nets=nets,
        num_classes=dm.num_classes,
        lr=lr,
        num_eval=int(e.num_eval),
        epochs=int(e.epochs),
        batch_size=int(e.batch_size),
        momentum=float(e.momentum),
        weight_decay=float(e.weight_decay),
        dsa_strategy=e.dsa_strategy,
        seed=int(cfg.seed),
        device=device,
        progress=bool(cfg.trainer.get("enable_progress_bar", True)),
        together=together if isinstance(together, bool) else str(together),
        eval_batch_size=int(e.get("eval_batch_size", 1000)),
    )
    title = (
        f"{description}; {e.epochs} epochs, lr {lr:g}, DSA {e.dsa_strategy or 'none'}, "
        f"test on {len(dm.test_x)} real images"
    )
    table = results_markdown(results, title)
    print("\n" + table, flush=True)
    _write_text(out_dir / "results.md", table)
    metrics = summary_metrics(results)
    record = {
        "set": str(e.set),
        "description": description,
        "dataset": dm.name,
        "zca": bool(getattr(dm, "zca", False)),
        "lr": lr,
        "epochs": int(e.epochs),
        "num_eval": int(e.num_eval),
        "dsa_strategy": e.dsa_strategy,
        "device": str(device),
        "test_images": len(dm.test_x),
        "train_images": len(images),
        "method": syn.method if syn is not None else "full",
        "ipc": syn.ipc if syn is not None else None,
        "results": {n: r for n, r in results.items() if not n.startswith("_")},
        "config": OmegaConf.to_container(e, resolve=True),
    }
    write_json(out_dir / "results.json", record)
    log_results(logger, results, metrics, grid)
    return {
        **metrics,
        "objective": metrics[f"acc_{nets[0]}_mean"],
        "lr": lr,
        "train_images": len(images),
        "test_images": len(dm.test_x),
        "table": table,
    }
