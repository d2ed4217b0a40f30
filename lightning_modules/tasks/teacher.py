"""``task=teacher``: train expert trajectories into a store (one file per expert).

Each expert is a fresh ``net`` (init drawn from ``derive_seed(seed, "expert", index)``) trained
with the MTT expert recipe (plain SGD, lr 0.01, batch 256, DSA on), on every epoch's subset of
PAD's difficulty curriculum with ``teacher.curriculum=el2n|grand``, and with GSAM steps (FTD's
flat experts, ``condense/gsam.py``) with ``teacher.optimizer=gsam`` (``teacher_curriculum.py``,
recorded in each expert's ``meta["curriculum"]``); its parameters at epoch 0
and after every epoch, and its test accuracy per epoch, go to ``<store>/expert_<index>.pt``. Experts
already on disk are skipped and indices another process is training are left to it, so
reruns resume and several processes fill one store without clobbering. Under ``trainer=ddp``
(``trainer.devices=N``) each rank trains its share of the pending experts on its own device
and rank zero writes the summary and plot.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from datamodules.trajectories import ExpertStore, default_store_dir
from lightning_modules.condense.dsa import make_dsa
from lightning_modules.condense.experts import RECIPE_KEYS, build_seeded, train_expert
from lightning_modules.errors import UserError
from lightning_modules.nets.functional import FlatParams
from lightning_modules.tasks.common import (
    build_datamodule,
    build_logger,
    build_net,
    check_shared_dir,
    gather_objects,
    launch_fabric,
    log_config,
    log_images,
    net_options,
    rank_zero_first,
    require_images,
    show_progress,
)
from lightning_modules.tasks.teacher_curriculum import (
    build_curriculum,
    curriculum_mismatch,
    settings_of,
)
from lightning_modules.utils.devices import resolve_device
from lightning_modules.utils.seeds import derive_seed

log = logging.getLogger(__name__)


def store_for(cfg: DictConfig, dm, out: str | None) -> ExpertStore:
    """``out``, or the default store of this dataset / ZCA setting / net."""
    return ExpertStore(out if out else default_store_dir(dm.name, bool(dm.zca), cfg.net.name))


def _check_recipe(store: ExpertStore, recipe: dict, curriculum: dict | None) -> None:
    """Refuse to add experts of another recipe (or curriculum) to a store that holds some."""
    for index in store.indices():
        meta = store.load(index).meta
        for key in RECIPE_KEYS:
            if meta.get(key) != recipe[key]:
                raise UserError(
                    f"store {store.root} holds expert {index} trained with {key}={meta.get(key)}, "
                    f"this run has teacher.{key if key != 'dsa_strategy' else 'dsa/dsa_strategy'}="
                    f"{recipe[key]}; use another teacher.out or the same settings"
                )
        if meta.get("curriculum") != curriculum:  # stores from before the option: none
            raise UserError(
                curriculum_mismatch(store.root, index, meta.get("curriculum"), curriculum)
            )


def _check_gsam(store: ExpertStore, gsam: dict | None) -> None:
    """Refuse to mix GSAM and plain-SGD experts (or other rho / alpha) in one store."""
    for index in store.indices():
        stored = store.load(index).meta.get("gsam")  # stores from before the option: SGD
        if stored != gsam:
            old, new = (f"gsam {g['rho']}/{g['alpha']}" if g else "sgd" for g in (stored, gsam))
            raise UserError(
                f"store {store.root} holds expert {index} trained with teacher.optimizer={old} "
                f"(rho/alpha), this run has {new}; use another teacher.out or the same settings"
            )


def run(cfg: DictConfig, out_dir: Path) -> dict:
    # trainer=ddp / ddp_cpu: one process per device, the pending experts split across ranks
    fabric = launch_fabric(cfg, "teacher")
    rank = fabric.global_rank if fabric else 0
    job = _build(cfg, fabric)
    logger = build_logger(cfg)
    log_config(logger, cfg)
    wanted = list(
        range(
            int(cfg.teacher.first_index),
            int(cfg.teacher.first_index) + int(cfg.teacher.num_experts),
        )
    )
    mine, skipped = _share_of_pending(job, wanted, fabric)
    outcome = _train_experts(cfg, job, mine, logger, enabled=rank == 0)
    outcome["skipped"] += skipped
    per_rank = gather_objects(fabric, outcome)
    if rank != 0:
        return {"rank": rank}
    return _summarise(job, wanted, per_rank, out_dir, logger)


class _Job:
    """What every expert of this run shares: data, store, parameter layout, recipe, device."""

    def __init__(self, cfg: DictConfig, fabric):
        t = cfg.teacher
        self.cfg = cfg
        self.dm = build_datamodule(cfg)
        require_images(self.dm, "teacher")
        with rank_zero_first(fabric):  # rank zero fits and caches ZCA once; the others read it
            self.dm.prepare_data()
            self.dm.setup()
        self.store = store_for(cfg, self.dm, t.out)
        self.net_cfg = net_options(cfg.net)
        self.layout = FlatParams(build_net(cfg.net, self.dm))
        self.augment = make_dsa(t.dsa_strategy if t.dsa else None)
        self.recipe = {
            "epochs": int(t.epochs),
            "lr": float(t.lr),
            "momentum": float(t.momentum),
            "weight_decay": float(t.weight_decay),
            "batch_size": int(t.batch_size),
            "dsa_strategy": t.dsa_strategy if self.augment is not None else "",
        }
        accelerator = cfg.trainer.get("accelerator", "auto")
        self.device = fabric.device if fabric else resolve_device(accelerator)
        self.steps_per_expert = int(t.epochs) * -(-len(self.dm.train_x) // int(t.batch_size))
        self.curriculum = None  # set by _build: PAD's difficulty curriculum, if any
        # FTD's flat experts (DATM's and PAD's buffer scripts): GSAM around this SGD, or None
        self.gsam = (
            {"rho": float(t.gsam_rho), "alpha": float(t.gsam_alpha), "adaptive": True}
            if t.optimizer == "gsam"
            else None
        )


def _build(cfg: DictConfig, fabric) -> _Job:
    """The shared setup, checked against the experts already in the store."""
    job = _Job(cfg, fabric)
    job.store.root.mkdir(parents=True, exist_ok=True)
    check_shared_dir(job.store.root, cfg, "the expert store")  # nodes write experts into one store
    if job.store.indices():
        job.store.check(
            net=job.net_cfg, dataset=job.dm.name, zca=bool(job.dm.zca), num_params=job.layout.numel
        )
        _check_recipe(job.store, job.recipe, settings_of(cfg))
        _check_gsam(job.store, job.gsam)
    job.curriculum = build_curriculum(job, fabric)  # PAD's difficulty curriculum, or None
    if job.curriculum is not None:
        batch = int(cfg.teacher.batch_size)
        sizes = job.curriculum.sizes(int(cfg.teacher.epochs))
        job.steps_per_expert = sum(-(-n // batch) for n in sizes)
    return job


def _share_of_pending(job: _Job, wanted: list[int], fabric) -> tuple[list[int], list[int]]:
    """This rank's share of the experts not yet in the store, and the ones already there."""
    # rank zero's listing decides the split, so no index is left to nobody
    pending = [i for i in wanted if not job.store.exists(i)]
    if fabric is not None:
        pending = fabric.broadcast(pending, src=0)
    rank, world = (fabric.global_rank, fabric.world_size) if fabric else (0, 1)
    mine = pending[rank::world]
    log.info(
        "teacher: %d experts wanted in %s (%d already there), %d params, on %s%s",
        len(wanted), job.store.root, len(wanted) - len(pending), job.layout.numel, job.device,
        f" (rank {rank} of {world}: experts {mine})" if world > 1 else "",
    )  # fmt: skip
    return mine, [i for i in wanted if i not in pending]


def _train_experts(cfg: DictConfig, job: _Job, indices: list[int], logger, enabled: bool) -> dict:
    """Train and write each expert of ``indices`` that no other process holds or has finished."""
    trained, skipped, busy = [], [], []
    with show_progress(cfg, enabled=enabled) as bar:
        task = bar.add_task("experts", total=len(indices) * job.steps_per_expert, status="")
        for index in indices:
            claim = job.store.claim(index)
            if not claim.held:
                busy.append(index)  # another process is training it
                bar.advance(task, job.steps_per_expert)
                continue
            with claim:
                if job.store.exists(index):  # finished by another process since we listed
                    skipped.append(index)
                    bar.advance(task, job.steps_per_expert)
                    continue
                job.store.remove_partial(index)
                meta = _train_one(job, index, bar, task, logger)
                job.store.write(index, meta.pop("snapshots"), meta)
                trained.append(index)
    return {"trained": trained, "skipped": skipped, "busy": busy}


def _summarise(job: _Job, wanted: list[int], per_rank: list[dict], out_dir: Path, logger) -> dict:
    """Rank zero: the other ranks' curves to the logger, the accuracy plot, the metrics."""
    store = job.store
    trained = sorted(i for r in per_rank for i in r["trained"])
    skipped = sorted({i for r in per_rank for i in r["skipped"]} - set(trained))
    busy = sorted({i for r in per_rank for i in r["busy"]} - set(trained))
    _log_other_ranks(logger, store, per_rank[1:])
    if logger:
        logger.finalize("success")
    done = [i for i in wanted if store.exists(i)]
    final_acc = [store.load(i).meta["test_acc"][-1] for i in done]
    plot_path = plot_test_accuracy(store, done, out_dir / "expert_test_acc.png", logger)
    return {
        "store": str(store.root),
        "experts_trained": len(trained),
        "experts_skipped": len(skipped),
        "experts_busy_elsewhere": len(busy),
        "experts_in_store": len(store.indices()),
        "trained_indices": trained,
        "trained_by_rank": [r["trained"] for r in per_rank],
        "num_params": job.layout.numel,
        "final_test_acc_mean": sum(final_acc) / len(final_acc) if final_acc else float("nan"),
        "plot": str(plot_path) if plot_path else None,
    }


def _log_other_ranks(logger, store: ExpertStore, per_rank: list[dict]) -> None:
    """Log the test-accuracy curves of experts other ranks trained (their loggers are silent)."""
    if not logger:
        return
    for index in (i for r in per_rank for i in r["trained"]):
        for epoch, acc in enumerate(store.load(index).meta["test_acc"]):
            logger.log_metrics({f"expert_{index:04d}/test_acc": acc}, step=epoch)


def _train_one(job: _Job, index: int, bar, task, logger) -> dict:
    """Train expert ``index``; its snapshots and metadata as one dict."""
    cfg, dm, layout, recipe, device = job.cfg, job.dm, job.layout, job.recipe, job.device
    seed = derive_seed(cfg.seed, "expert", index)
    net = build_seeded(lambda: build_net(cfg.net, dm), seed).to(device)
    start = time.perf_counter()

    def on_epoch(epoch: int, acc: float) -> None:
        bar.update(task, status=f"expert {index} epoch {epoch}: test {acc:.1f}%")
        if logger:
            logger.log_metrics({f"expert_{index:04d}/test_acc": acc}, step=epoch)

    bar.update(task, status=f"expert {index}")
    snapshots, test_acc = train_expert(
        net,
        dm.train_x,
        dm.train_y,
        dm.test_x,
        dm.test_y,
        epochs=recipe["epochs"],
        seed=seed,
        lr=recipe["lr"],
        momentum=recipe["momentum"],
        weight_decay=recipe["weight_decay"],
        batch_size=recipe["batch_size"],
        augment=job.augment,
        on_step=lambda: bar.advance(task),
        on_epoch=on_epoch,
        subset=job.curriculum.subset if job.curriculum else None,
        gsam=job.gsam,
    )
    log.info(
        "expert %d: test accuracy %.2f%% after %d epochs", index, test_acc[-1], recipe["epochs"]
    )
    return {
        "snapshots": snapshots,
        **recipe,
        "curriculum": job.curriculum.settings if job.curriculum else None,
        "gsam": job.gsam,
        "train_sizes": job.curriculum.sizes(recipe["epochs"]) if job.curriculum else None,
        "net": job.net_cfg,
        "param_names": list(layout.names),
        "param_shapes": [list(s) for s in layout.shapes],
        "num_params": layout.numel,
        "dataset": dm.name,
        "zca": bool(dm.zca),
        "zca_eps": float(dm.zca_eps) if dm.zca else None,
        "seed": seed,
        "run_seed": int(cfg.seed),
        "index": index,
        "test_acc": [float(a) for a in test_acc],
        "num_classes": int(dm.num_classes),
        "channels": int(dm.channels),
        "im_size": int(dm.im_size),
        "train_per_class": dm.train_per_class,
        "test_per_class": dm.test_per_class,
        "train_images": len(dm.train_x),
        "test_images": len(dm.test_x),
        "device": str(device),
        "wall_s": time.perf_counter() - start,
    }


def plot_test_accuracy(
    store: ExpertStore, indices: list[int], path: Path, logger=None
) -> Path | None:
    """Test accuracy per epoch of the experts ``indices`` as a PNG (and to W&B when active)."""
    if not indices:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    for index in indices:
        acc = store.load(index).meta["test_acc"]
        ax.plot(
            range(len(acc)),
            acc,
            lw=1,
            alpha=0.8,
            label=f"expert {index}" if len(indices) <= 10 else None,
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{len(indices)} experts in {store.root}", fontsize=9)
    ax.grid(alpha=0.3)
    if len(indices) <= 10:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log_images(logger, "expert_test_acc", path)
    return path
