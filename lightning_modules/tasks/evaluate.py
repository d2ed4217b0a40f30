"""``task=evaluate``: score a set file (or the full train split) by training fresh networks on it.

Each architecture of ``evaluate.nets`` is built with the options the set was made with when it
is the set's architecture (``config.net`` of the set file), then ``evaluate.net_options.<arch>``
key by key on top (see :func:`resolve_net_options`). Writes ``results.md`` and ``results.json``
to the run dir, prints the table, logs it (W&B table or plain metrics) and returns
``acc_<net>_mean`` / ``acc_<net>_std`` plus the ``table`` for ``summary.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from datamodules.syn_set import SyntheticSet
from lightning_modules.condense.evaluation import (
    DEFAULT_LR,
    arch_options,
    check_net_names,
    evaluate_set,
    results_markdown,
)
from lightning_modules.errors import UserError
from lightning_modules.tasks import evaluate_variants as variants_
from lightning_modules.tasks.common import (
    build_datamodule,
    build_logger,
    gather_objects,
    launch_fabric,
    log_config,
    rank_zero_first,
    require_images,
    write_json,
)
from lightning_modules.utils import files
from lightning_modules.utils.devices import resolve_device

log = logging.getLogger(__name__)


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


PARTS_DIR = "evaluate_parts"  # one JSON per finished (net, index) network: what a resume skips


def _part_path(out_dir: Path, name: str, index: int, parts: str = PARTS_DIR) -> Path:
    return out_dir / parts / f"{name}_{index}.json"


def _write_part(out_dir: Path, part: dict, parts: str = PARTS_DIR) -> None:
    """Atomically, by the rank that trained it (``write_json`` writes on rank zero only)."""
    files.write_json(_part_path(out_dir, part["net"], part["index"], parts), part)


def set_digest(images, labels, lr: float, extra=None) -> str:
    """A fingerprint of the training set, lr and ``extra`` (protocol, net options): parts of
    another set file or another network are not reused."""
    import hashlib

    h = hashlib.sha1()
    for t in (images, labels):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    h.update(repr(float(lr)).encode())
    if extra is not None:
        h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def resolve_net_options(nets: list[str], syn, explicit) -> tuple[dict, dict]:
    """``({arch: constructor options}, {arch: where they come from})``.

    The rule: an architecture starts from its standard options; when it is the architecture the
    set was made with (``config.net.name`` of the set file) it takes that net's recorded options;
    then ``evaluate.net_options.<arch>`` overrides key by key. ``net.*`` of the evaluate command
    is not used (it is the classify/teacher/distill network). A recorded option that
    ``evaluate.net_options`` changes is logged once, as a warning.
    """
    explicit = OmegaConf.to_container(explicit, resolve=True) if explicit is not None else {}
    if not isinstance(explicit, dict):
        raise UserError(
            f"evaluate.net_options must map a net to its options, e.g. "
            f"'evaluate.net_options={{convnet: {{width: 64}}}}', got {explicit!r}"
        )
    unknown = sorted(set(explicit) - set(nets))
    if unknown:
        raise UserError(f"evaluate.net_options names {unknown}, which are not in evaluate.nets")
    recorded = dict(((syn.config or {}).get("net") or {}) if syn is not None else {})
    set_arch = str(recorded.get("name", "")).lower().replace("-", "_")
    options, source, changed = {}, {}, []
    for name in nets:
        mine = arch_options(name, {name: recorded}) if name == set_arch else {}
        given = arch_options(name, explicit)
        changed += [f"{name}.{k}: set {mine[k]!r} -> {v!r}" for k, v in given.items()
                    if k in mine and mine[k] != v]  # fmt: skip
        options[name] = {**mine, **given}
        source[name] = "+".join(
            [w for w, d in (("set", mine), ("evaluate.net_options", given)) if d] or ["standard"]
        )
    if changed:
        log.warning(
            "evaluating on other networks than the set was distilled with: %s", "; ".join(changed)
        )
    return options, source


def _finished_parts(
    out_dir: Path, jobs: list[tuple[str, int]], digests: dict, parts_dir: str = PARTS_DIR
) -> dict:
    """``{(net, index): part}`` of the networks an earlier (killed) attempt of this run finished
    on the same set and network (a set file rewritten since is evaluated afresh)."""
    parts = {}
    for name, k in jobs:
        path = _part_path(out_dir, name, k, parts_dir)
        if path.exists():
            part = json.loads(path.read_text())
            if part.get("set_digest") == digests[name]:
                parts[(name, k)] = part
            else:
                log.warning("%s was trained on another set or network: training it again", path)
    return parts


def _train_jobs(
    jobs: list[tuple[str, int]], out_dir: Path, *, digests: dict, together, parts_dir, **kwargs
) -> dict:
    """Train the networks ``jobs`` (net, index), writing each part as it finishes.

    Networks of one architecture go in one ``evaluate_set`` call when they train together
    (vmap on CUDA), else one call each, so a kill loses at most the networks in training.
    """
    device = resolve_device(kwargs["device"])
    batched = device.type == "cuda" if together in ("auto", None) else together is True
    parts = {}
    for name in dict.fromkeys(n for n, _ in jobs):
        ks = [k for n, k in jobs if n == name]
        for group in [ks] if batched else [[k] for k in ks]:
            r = evaluate_set(nets=[name], together=together, indices=group, **kwargs)[name]
            for i, k in enumerate(group):
                part = {
                    "net": name,
                    "index": k,
                    "acc": r["accs"][i],
                    "train_loss": r["train_loss"][i],
                    "seconds": r["seconds"] / len(group),
                    "options": r["options"],
                    "params": r["params"],
                    "device": str(device),
                    "set_digest": digests[name],
                }
                _write_part(out_dir, part, parts_dir)
                parts[(name, k)] = part
    return parts


def _assemble(nets: list[str], num_eval: int, parts: dict) -> dict:
    """The ``evaluate_set`` result shape from the parts, networks in index order."""
    results = {}
    for name in nets:
        mine = [parts[(name, k)] for k in range(num_eval)]
        accs = [p["acc"] for p in mine]
        results[name] = {
            "accs": accs,
            "mean": float(np.mean(accs)),
            "std": float(np.std(accs)),
            "train_loss": [p["train_loss"] for p in mine],
            "seconds": sum(p["seconds"] for p in mine),
            "options": mine[0].get("options"),
            "params": mine[0].get("params"),
        }
    return results


# -- the task, in its steps ---------------------------------------------------------------------
def _net_names(e: DictConfig) -> list[str]:
    """The evaluation networks (the schema checked each name and the counts)."""
    return check_net_names(list(e.nets) if not isinstance(e.nets, str) else [e.nets])


def _load_data(cfg: DictConfig, fabric):
    """The datamodule, set up (rank zero first: it fits and caches ZCA once)."""
    dm = build_datamodule(cfg)
    require_images(dm, "evaluate")
    with rank_zero_first(fabric):
        dm.prepare_data()
        dm.setup()
    return dm


def _train_my_share(cfg, fabric, out_dir: Path, plan: dict, dm) -> tuple[dict, int]:
    """Train this rank's share of the networks not finished earlier; every rank gets all parts.

    Returns ``({(net, index): part}, networks trained in this run)``.
    """
    e = cfg.evaluate
    rank, world = (fabric.global_rank, fabric.world_size) if fabric else (0, 1)
    num_eval = int(plan["num_eval"])
    jobs = [(name, k) for name in plan["nets"] for k in range(num_eval)]
    # resume=true: the same dir
    finished = _finished_parts(out_dir, jobs, plan["digests"], plan["parts"])
    # rank zero's listing decides the split, so every network is trained exactly once
    pending = [job for job in jobs if job not in finished]
    if fabric is not None:
        pending = [tuple(j) for j in fabric.broadcast(pending, src=0)]
    mine = pending[rank::world]
    log.info(
        "evaluating %s [%s] on %s (protocol %s): nets %s x%d, %d epochs, lr %g, DSA %s; %d "
        "networks done earlier%s", plan["description"], plan["variant"], plan["device"],
        e.protocol, plan["nets"], num_eval, plan["epochs"], plan["lr"], plan["dsa_strategy"],
        len(jobs) - len(pending),
        f"; rank {rank} of {world} trains {len(mine)}" if world > 1 else "",
    )  # fmt: skip
    trained = {}
    if mine:
        together = e.get("together", "auto")
        trained = _train_jobs(
            mine,
            out_dir,
            digests=plan["digests"],
            parts_dir=plan["parts"],
            together=together if isinstance(together, bool) else str(together),
            images=plan["images"],
            labels=plan["labels"],
            test_x=dm.test_x,
            test_y=dm.test_y,
            num_classes=dm.num_classes,
            lr=plan["lr"],
            num_eval=num_eval,
            epochs=int(plan["epochs"]),
            batch_size=int(e.batch_size),
            momentum=float(e.momentum),
            weight_decay=float(e.weight_decay),
            dsa_strategy=plan["dsa_strategy"],
            seed=int(cfg.seed),
            device=plan["device"],
            progress=bool(cfg.trainer.get("enable_progress_bar", True)) and rank == 0,
            eval_batch_size=int(e.get("eval_batch_size", 1000)),
            net_options=plan["options"],
            protocol=str(e.protocol),
            soft_temperature=float(e.get("soft_temperature", 1.0)),
        )
    for parts in gather_objects(fabric, list(trained.values())):
        finished.update({(p["net"], p["index"]): p for p in parts})
    return finished, len(pending)


def _save(out_dir: Path, cfg, plan: dict, dm, everything: dict, world: int, scores: dict):
    """``results.md`` and ``results.json``; returns the table and the record."""
    e, syn, results = cfg.evaluate, plan["syn"], everything["set"]
    title = (
        f"{plan['description']}; {scores['label_protocol']} labels, protocol {e.protocol}, "
        f"{e.epochs} epochs, lr {plan['lr']:g}, DSA {e.dsa_strategy or 'none'}, test on "
        f"{len(dm.test_x)} real images"
    )
    table = results_markdown(results, title)
    if len(everything) > 1 or scores["label_protocol"] == "soft":
        table += variants_.scores_markdown(scores)
    files.write_text(out_dir / "results.md", table)
    record = {
        "set": str(e.set),
        "description": plan["description"],
        "dataset": dm.name,
        "zca": bool(getattr(dm, "zca", False)),
        "lr": plan["lr"],
        "protocol": str(e.protocol),
        "epochs": int(e.epochs),
        "num_eval": int(e.num_eval),
        "dsa_strategy": e.dsa_strategy,
        "device": str(plan["device"]),
        "ranks": world,
        "test_images": len(dm.test_x),
        "train_images": len(plan["images"]),
        "method": syn.method if syn is not None else "full",
        "ipc": syn.ipc if syn is not None else None,
        "nets": {
            n: {
                "options": results[n]["options"],
                "params": results[n]["params"],
                "source": plan["sources"][n],
            }
            for n in plan["nets"]
        },  # fmt: skip
        "results": {n: r for n, r in results.items() if not n.startswith("_")},
        "variants": {v: r for v, r in everything.items() if v != "set"},
        "scores": scores,
        "config": OmegaConf.to_container(e, resolve=True),
    }
    write_json(out_dir / "results.json", record)
    return table, record


def _variant_plan(v, e: DictConfig, options: dict) -> dict:
    """The training settings of one variant and the digests that key its parts."""
    extra = {"protocol": str(e.protocol)}
    if v.name != "set":  # what the set's own parts have always been keyed by, and more
        extra.update(dsa=v.dsa_strategy, epochs=v.epochs, num_eval=v.num_eval, **v.extra)
    if v.kind == "soft":
        extra["soft_temperature"] = float(e.get("soft_temperature", 1.0))
    digests = {
        n: set_digest(v.images, v.labels, v.lr, {**extra, "options": options[n]}) for n in options
    }
    return {
        "variant": v.name,
        "images": v.images,
        "labels": v.labels,
        "lr": v.lr,
        "dsa_strategy": v.dsa_strategy,
        "num_eval": v.num_eval,
        "epochs": v.epochs,
        "parts": v.parts_dir,
        "digests": digests,
    }


def run(cfg: DictConfig, out_dir: Path) -> dict:
    e = cfg.evaluate
    nets = _net_names(e)
    # trainer=ddp / ddp_cpu: the (net, index) networks split across ranks
    fabric = launch_fabric(cfg, "evaluate")
    rank, world = (fabric.global_rank, fabric.world_size) if fabric else (0, 1)
    dm = _load_data(cfg, fabric)
    images, labels, lr, description, syn = load_training_set(e, dm)
    options, sources = resolve_net_options(nets, syn, e.get("net_options"))
    # checked before anything trains
    variants, context = variants_.plan_variants(cfg, dm, syn, lr, nets, options)
    plan = {
        "nets": nets,
        "images": images,
        "labels": labels,
        "lr": lr,
        "description": description,
        "syn": syn,
        "options": options,
        "sources": sources,
        "device": fabric.device if fabric else resolve_device(e.device),
    }
    grid = None
    if syn is not None and e.get("grid", True) and rank == 0:
        grid = syn.save_grid(out_dir / "set.png", num_classes=dm.num_classes)
    logger = build_logger(cfg)
    log_config(logger, cfg)
    everything, trained, total = {}, 0, 0
    for v in variants:
        v_nets = v.extra.get("nets", nets) if v.name == "full" else nets
        v_plan = {**plan, **_variant_plan(v, e, options), "nets": v_nets}
        finished, done_here = _train_my_share(cfg, fabric, out_dir, v_plan, dm)
        trained, total = trained + done_here, total + len(v_nets) * v.num_eval
        everything[v.name] = _assemble(v_nets, v.num_eval, finished) if rank == 0 else None
    if rank != 0:
        return {"rank": rank}
    if "full" in everything:
        variants_.store_full(cfg, dm, everything["full"], context)
    results = everything["set"]
    extra_keys, scores = variants_.summarise(everything, context, nets, e)
    table, _ = _save(out_dir, cfg, plan, dm, everything, world, scores)
    print("\n" + table, flush=True)
    metrics = {**summary_metrics(results), **extra_keys}
    log_results(logger, results, metrics, grid)
    return {
        **metrics,
        "objective": metrics[f"acc_{nets[0]}_mean"],
        "lr": lr,
        "train_images": len(images),
        "test_images": len(dm.test_x),
        "networks_trained": trained,
        "networks_reused": total - trained,
        "table": table,
    }
