"""``task=distill``: distil ``dataset`` into ``ipc`` images per class by trajectory matching with
parameter pruning (MTT + Li et al. 2024; REFERENCE.md section A).

``python train.py task=distill dataset=cifar100 ipc=50`` runs the published row of the MTT
hyperparameter table for that dataset and IPC (:data:`PRESETS`): every ``distill.*`` key left
``null`` in ``conf/task/distill.yaml`` takes the row's value, and ``dataset.zca`` follows the row
unless it is given on the command line. Any key can still be overridden.

Run directory: ``sets/iter_XXXXXX.pt`` (+ ``.png`` grid) at iteration 0 and every
``distill.eval_every`` iterations, ``set.pt`` / ``set.png`` at the end (SyntheticSet format),
``checkpoints/last.ckpt`` every ``distill.checkpoint_every`` iterations (``resume=true``
continues from it), ``distill_config.yaml`` (the settings after the preset), ``eval.md`` and
``summary.json`` (``final_acc``; the best intermediate accuracy is ``best_acc_chosen_on_test``).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict

from datamodules.expert_pairs import ExpertPairsDataModule, derive_seed
from datamodules.trajectories import ExpertStore, default_store_dir, teacher_command
from lightning_modules.distillation import DistillationModule
from lightning_modules.errors import UserError
from lightning_modules.condense.matching import check_eps
from lightning_modules.nets.functional import FlatParams
from lightning_modules.tasks.common import (
    build_datamodule,
    build_logger,
    build_net,
    build_trainer,
    log_config,
    require_images,
)
from lightning_modules.condense.unroll import MODES

log = logging.getLogger(__name__)

#: MTT's hyperparameters for ConvNet-3 (REFERENCE.md A, the corrected text table); 5000 iterations
PRESETS: dict[tuple[str, int], dict] = {
    ("cifar10", 1): dict(syn_steps=50, expert_epochs=2, max_start_epoch=2, lr_img=100, lr_lr=1e-7, lr_teacher=0.01, batch_syn="all", zca=True),  # noqa: E501
    ("cifar10", 10): dict(syn_steps=30, expert_epochs=2, max_start_epoch=20, lr_img=100, lr_lr=1e-5, lr_teacher=0.001, batch_syn="all", zca=True),  # noqa: E501
    ("cifar10", 50): dict(syn_steps=30, expert_epochs=2, max_start_epoch=40, lr_img=1000, lr_lr=1e-5, lr_teacher=0.001, batch_syn="all", zca=False),  # noqa: E501
    ("cifar100", 1): dict(syn_steps=20, expert_epochs=3, max_start_epoch=20, lr_img=1000, lr_lr=1e-5, lr_teacher=0.01, batch_syn="all", zca=True),  # noqa: E501
    ("cifar100", 10): dict(syn_steps=20, expert_epochs=2, max_start_epoch=20, lr_img=1000, lr_lr=1e-5, lr_teacher=0.01, batch_syn="all", zca=False),  # noqa: E501
    ("cifar100", 50): dict(syn_steps=80, expert_epochs=2, max_start_epoch=40, lr_img=1000, lr_lr=1e-5, lr_teacher=0.01, batch_syn=125, zca=True),  # noqa: E501
}  # fmt: skip
DEFAULT_ITERATIONS = 5000
PRESET_KEYS = (
    "syn_steps",
    "expert_epochs",
    "max_start_epoch",
    "lr_img",
    "lr_lr",
    "lr_teacher",
    "batch_syn",
)
INIT_STREAM = 2  # seed stream of the initial images (pairs and unrolls use 0 and 1)


# -- configuration ------------------------------------------------------------------------------
def command_line_keys() -> set[str] | None:
    """Keys given as overrides on the command line; None when not running under Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return None
        overrides = HydraConfig.get().overrides.task
    except (ImportError, ValueError):
        return None
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides}


def resolve_settings(cfg: DictConfig, explicit: set[str] | None = None) -> DictConfig:
    """A copy of ``cfg`` with the preset applied.

    Null ``distill.*`` keys get the published row's values. ``dataset.zca`` gets the row's ZCA
    setting unless it is in ``explicit``, the keys given on the command line (default: read from
    Hydra). Without a command line (``run(cfg)`` called from Python) ``dataset.zca`` is taken as
    the caller composed it.
    """
    if explicit is None:
        explicit = command_line_keys()
        if explicit is None:
            explicit = {"dataset.zca"}
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    d = cfg.distill
    preset = str(d.get("preset", "auto")).lower()
    if preset not in ("auto", "none"):
        raise UserError(f"distill.preset={d.preset!r}; use auto (the published row) or none")
    row = PRESETS.get((str(cfg.dataset.name), int(cfg.ipc))) if preset == "auto" else None
    with open_dict(cfg):
        if d.iterations is None:
            d.iterations = DEFAULT_ITERATIONS
        if row is not None:
            for key in PRESET_KEYS:
                if d[key] is None:
                    d[key] = row[key]
            if "dataset.zca" in explicit:
                if bool(cfg.dataset.zca) != row["zca"]:
                    log.warning(
                        "dataset.zca=%s overrides the published row (ZCA %s)",
                        str(bool(cfg.dataset.zca)).lower(), "on" if row["zca"] else "off",
                    )  # fmt: skip
            else:
                cfg.dataset.zca = row["zca"]
        missing = [k for k in PRESET_KEYS if d[k] is None]
        if missing:
            rows = ", ".join(f"{n} ipc={i}" for n, i in PRESETS)
            raise UserError(
                f"no published hyperparameters for dataset={cfg.dataset.name} ipc={cfg.ipc} "
                f"(rows: {rows}); set {', '.join('distill.' + k for k in missing)}"
            )
    validate(cfg)
    return cfg


def batch_syn_value(value) -> int | None:
    """``all``/0/None -> None (the whole set), else a positive int."""
    if value is None or str(value).lower() == "all" or value == 0:
        return None
    try:
        value = int(value)
    except ValueError:
        raise UserError(f"distill.batch_syn={value!r}; give a positive number or 'all'") from None
    if value < 1:
        raise UserError(f"distill.batch_syn={value}; give a positive number or 'all'")
    return value


def offload_value(value) -> bool | str:
    if isinstance(value, bool) or str(value).lower() == "auto":
        return value if isinstance(value, bool) else "auto"
    raise UserError(f"distill.offload={value!r}; use auto (on a GPU), true or false")


def validate(cfg: DictConfig) -> None:
    d = cfg.distill
    try:
        check_eps(d.eps)
    except (ValueError, TypeError):
        raise UserError(
            f"distill.eps={d.eps} is outside [0, 1); use 0 for plain MTT or e.g. 0.1 (the default)"
        ) from None
    for key in (
        "iterations",
        "syn_steps",
        "expert_epochs",
        "max_start_epoch",
        "checkpoint_every",
        "eval_num",
    ):
        if int(d[key]) < 1:
            raise UserError(f"distill.{key} must be at least 1, got {d[key]}")
    if int(d.eval_every or 0) < 0 or int(d.eval_epochs) < 1:
        raise UserError(
            "distill.eval_every must be >= 0 (0: only at the end) and distill.eval_epochs >= 1"
        )
    if d.init not in ("real", "noise"):
        raise UserError(f"distill.init={d.init!r}; use real (random real images) or noise")
    if d.unroll not in MODES:
        raise UserError(
            f"distill.unroll={d.unroll!r}; use full or recompute (same gradient, constant memory)"
        )
    if float(d.lr_teacher) <= float(d.lr_floor):
        raise UserError(
            f"distill.lr_teacher={d.lr_teacher} must be above distill.lr_floor={d.lr_floor}"
        )
    if int(cfg.ipc) < 1:
        raise UserError(f"ipc must be at least 1, got {cfg.ipc}")
    batch_syn_value(d.batch_syn)
    offload_value(d.offload)


def expert_store(cfg: DictConfig) -> ExpertStore:
    """``distill.trajectories`` or the teacher's default store for this dataset, ZCA and net."""
    d = cfg.distill
    root = d.trajectories or default_store_dir(
        cfg.dataset.name, bool(cfg.dataset.zca), cfg.net.name
    )
    return ExpertStore(root)


def check_store(cfg: DictConfig, store: ExpertStore, num_params: int) -> None:
    """One-line errors for a missing/empty store or experts of another net, dataset or ZCA."""
    from lightning_modules.tasks.teacher import net_options

    zca = bool(cfg.dataset.zca)
    if not store.indices():
        cmd = teacher_command(cfg.dataset.name, zca, cfg.net.name, store.root)
        raise UserError(
            f"no expert trajectories in {store.root} (dataset={cfg.dataset.name}, dataset.zca="
            f"{str(zca).lower()}, net={cfg.net.name}); train them first with: {cmd} "
            f"teacher.num_experts=<n> (at least {needed_epochs(cfg.distill)} epochs each), or point "
            "distill.trajectories at a store"
        )
    store.check(net=net_options(cfg.net), dataset=cfg.dataset.name, zca=zca, num_params=num_params)


def needed_epochs(d: DictConfig) -> int:
    """Epochs of snapshots the experts need: the last start epoch plus expert_epochs."""
    return int(d.max_start_epoch) - 1 + int(d.expert_epochs)


def initial_images(cfg: DictConfig, dm) -> tuple[torch.Tensor, torch.Tensor]:
    """``ipc`` images per class: random real train images (``init=real``) or N(0, 1) noise."""
    ipc, k = int(cfg.ipc), dm.num_classes
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, INIT_STREAM))
    labels = torch.arange(k).repeat_interleave(ipc)
    if cfg.distill.init == "noise":
        return torch.randn(k * ipc, dm.channels, dm.im_size, dm.im_size, generator=g), labels
    have = dm.images_per_class()
    if ipc > int(have.min()):
        c = int(have.argmin())
        subset = f" (dataset.train_per_class={dm.train_per_class})" if dm.train_per_class else ""
        raise UserError(
            f"ipc={ipc} but class {c} has only {int(have[c])} real training images"
            f"{subset}; "
            "lower ipc or use distill.init=noise"
        )
    return torch.cat([dm.real_images(c, ipc, generator=g) for c in range(k)]), labels


def make_dsa(d: DictConfig):
    if not d.dsa or str(d.dsa_strategy).lower() in ("", "none"):
        return None
    from lightning_modules.condense.dsa import DSA

    return DSA(d.dsa_strategy)


# -- artefacts ----------------------------------------------------------------------------------
class DistilledSetWriter(Callback):
    """Saves the set (+ PNG grid) at iteration 0 and every ``every`` iterations, evaluates it there
    and logs accuracy and grid; rank zero only, the other ranks wait at a barrier.

    A set file that already exists is not rewritten (a resumed run never writes a set twice).
    """

    def __init__(self, cfg: DictConfig, dm, out_dir: Path, every: int, iterations: int):
        self.cfg, self.dm, self.every, self.iterations = cfg, dm, int(every), int(iterations)
        self.dir = Path(out_dir) / "sets"
        self.history: list[dict] = []

    def make_set(self, module: DistillationModule):
        from datamodules.syn_set import SyntheticSet

        images, labels, lr = module.synthetic()
        return SyntheticSet(
            images=images,
            labels=labels,
            lr=lr,
            transform=self.dm.transform.state_dict(),
            dataset=self.dm.name,
            ipc=int(self.cfg.ipc),
            method="mtt" if float(self.cfg.distill.eps) == 0 else "distill",
            config=OmegaConf.to_container(self.cfg, resolve=True),
        )

    def state_dict(self) -> dict:
        return {"history": list(self.history)}  # intermediate accuracies survive a resume

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_step == 0:
            self._snapshot(trainer, pl_module, 0, evaluate=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        t = trainer.global_step
        if self.every and t % self.every == 0 and t < self.iterations:
            self._snapshot(trainer, pl_module, t, evaluate=True)

    def _snapshot(self, trainer, module, t: int, evaluate: bool) -> None:
        if trainer.is_global_zero:
            path = self.dir / f"iter_{t:06d}.pt"
            if path.exists():
                log.info("set %s already written (resumed run); not rewritten", path)
            else:
                syn = self.make_set(module)
                syn.save(path)
                png = syn.save_grid(path.with_suffix(".png"), self.dm.num_classes)
                log_image(trainer.logger, "distill/images", png, t)
                if evaluate:
                    results = evaluate_distilled(self.cfg, self.dm, syn, module.device)
                    record = {"iteration": t, **summarise(results)}
                    self.history.append(record)
                    if trainer.logger:
                        metrics = {f"eval/{k}": v for k, v in record.items() if k != "iteration"}
                        trainer.logger.log_metrics(metrics, step=t)
                    log.info("iteration %d: %s", t, record)
        trainer.strategy.barrier()


def log_image(logger, key: str, png: Path, step: int) -> None:
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger):
        logger.log_image(key=key, images=[str(png)], step=step)


def evaluate_distilled(cfg: DictConfig, dm, syn, device) -> dict:
    from lightning_modules.condense.evaluation import evaluate_set

    d = cfg.distill
    return evaluate_set(
        syn.images,
        syn.labels,
        dm.test_x,
        dm.test_y,
        nets=list(d.eval_nets),
        num_classes=dm.num_classes,
        lr=float(syn.lr),
        num_eval=int(d.eval_num),
        epochs=int(d.eval_epochs),
        batch_size=int(d.eval_batch_size),
        dsa_strategy=d.dsa_strategy if d.dsa else "none",
        seed=int(cfg.seed),
        device=device,
        progress=bool(cfg.trainer.get("enable_progress_bar", True)),
    )


def summarise(results: dict) -> dict:
    """``acc_<net>`` / ``acc_<net>_std`` per net and ``acc`` (the first net's mean)."""
    out = {}
    for name, r in results.items():
        if name.startswith("_"):
            continue
        out.setdefault("acc", r["mean"])
        out[f"acc_{name}"], out[f"acc_{name}_std"] = r["mean"], r["std"]
    return out


# -- the task -----------------------------------------------------------------------------------
def run(cfg: DictConfig, out_dir: Path) -> dict:
    cfg = resolve_settings(cfg)
    d = cfg.distill
    out_dir = Path(out_dir)
    dm = build_datamodule(cfg)
    require_images(dm, "distill")
    net = build_net(cfg.net, dm)  # channels, size and classes are known before loading the data
    layout = FlatParams(net)
    store = expert_store(cfg)
    check_store(cfg, store, layout.numel)  # before the data: a missing store fails in a second
    pairs = ExpertPairsDataModule(
        str(store.root),
        expert_epochs=int(d.expert_epochs),
        max_start_epoch=int(d.max_start_epoch),
        iterations=int(d.iterations),
        seed=int(cfg.seed),
        max_experts=d.max_experts,
    )
    pairs.setup()
    dm.prepare_data()
    dm.setup()
    images, labels = initial_images(cfg, dm)
    module = DistillationModule(
        net,
        images,
        labels,
        lr_teacher=float(d.lr_teacher),
        lr_img=float(d.lr_img),
        lr_lr=float(d.lr_lr),
        momentum=float(d.momentum),
        eps=float(d.eps),
        syn_steps=int(d.syn_steps),
        batch_syn=batch_syn_value(d.batch_syn),
        unroll=str(d.unroll),
        offload=offload_value(d.offload),
        dsa=make_dsa(d),
        lr_floor=float(d.lr_floor),
        max_bad_steps=int(d.max_bad_steps),
        seed=int(cfg.seed),
    )
    write_config(cfg, out_dir / "distill_config.yaml")
    log.info(
        "distill %s ipc=%d (ZCA %s): %d experts in %s, %d iterations, syn_steps=%d, "
        "expert_epochs=%d, max_start_epoch=%d, eps=%g, unroll=%s",
        dm.name, cfg.ipc, "on" if dm.zca else "off", len(pairs.experts), store.root, d.iterations,
        d.syn_steps, d.expert_epochs, d.max_start_epoch, d.eps, d.unroll,
    )  # fmt: skip
    logger = build_logger(cfg)
    log_config(logger, cfg)
    ckpt_dir = out_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    writer = DistilledSetWriter(cfg, dm, out_dir, int(d.eval_every or 0), int(d.iterations))
    checkpoints = ModelCheckpoint(
        dirpath=ckpt_dir, every_n_train_steps=int(d.checkpoint_every), save_last=True, save_top_k=0
    )
    trainer = build_trainer(
        cfg,
        logger=logger,
        callbacks=[writer, checkpoints],
        max_steps=int(d.iterations),
        max_epochs=1,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    # the warning says checkpoints hold the state after the update: that is what resuming needs
    warnings.filterwarnings("ignore", message=".*manual optimization and every_n_train_steps.*")
    resume_from = str(last) if cfg.resume and last.exists() else None
    if resume_from:
        done = finished_summary(last, out_dir, int(d.iterations))
        if done is not None:
            log.info("%s already finished all %d iterations; nothing to do", out_dir, d.iterations)
            return done
        log.info("resuming distillation from %s", resume_from)
    trainer.fit(module, datamodule=pairs, ckpt_path=resume_from)
    trainer.save_checkpoint(last)  # the finished state: a rerun with resume=true has nothing left
    if not trainer.is_global_zero:
        return {}
    return finish(cfg, dm, module, writer, out_dir, trainer, logger)


def finished_summary(last: Path, out_dir: Path, iterations: int) -> dict | None:
    """The earlier summary when the checkpoint is at the end and the run wrote its results."""
    summary = out_dir / "summary.json"
    if not (summary.exists() and (out_dir / "set.pt").exists()):
        return None
    step = torch.load(last, map_location="cpu", weights_only=False, mmap=True).get("global_step", 0)
    if int(step) < iterations:
        return None
    previous = json.loads(summary.read_text())
    return {k: v for k, v in previous.items() if k not in ("task", "wall_s")}


def finish(cfg, dm, module, writer, out_dir: Path, trainer, logger) -> dict:
    """Final set, its evaluation, eval.md; the metrics for summary.json."""
    d = cfg.distill
    syn = writer.make_set(module)
    syn.save(out_dir / "set.pt")
    png = syn.save_grid(out_dir / "set.png", dm.num_classes)
    log_image(logger, "distill/images", png, trainer.global_step)
    metrics = {
        "iterations": int(trainer.global_step),
        "learned_lr": syn.lr,
        "set": str(out_dir / "set.pt"),
        "method": syn.method,
        "eps": float(d.eps),
        "skipped_updates": module.bad_total,
        "lr_floor_hits": module.floor_hits,
    }
    last_logged = trainer.callback_metrics
    for key in ("distill/loss", "distill/pruned_fraction"):
        if key in last_logged:
            metrics[f"last_{key.split('/')[1]}"] = float(last_logged[key])
    if d.final_eval:
        from lightning_modules.condense.evaluation import results_markdown

        results = evaluate_distilled(cfg, dm, syn, module.device)
        final = summarise(results)
        metrics["final_acc"] = final["acc"]
        metrics.update({f"final_{k}": v for k, v in final.items() if k != "acc"})
        metrics["objective"] = final["acc"]
        chosen = [r["acc"] for r in writer.history] + [final["acc"]]
        # the MTT papers report the best checkpoint's accuracy, chosen on the test set
        metrics["best_acc_chosen_on_test"] = max(chosen)
        title = (
            f"{syn.method} {dm.name} ipc={cfg.ipc}, {metrics['iterations']} iterations (final set)"
        )
        (out_dir / "eval.md").write_text(results_markdown(results, title))
        if logger:
            logged = {f"eval/{k}": v for k, v in final.items()}
            # the sweep's metric (conf/sweep/distill_eps.yaml) is final_acc
            logged.update(
                final_acc=final["acc"], best_acc_chosen_on_test=metrics["best_acc_chosen_on_test"]
            )
            logger.log_metrics(logged, step=trainer.global_step)
    if logger:
        logger.finalize("success")
    return metrics


@torch.no_grad()
def write_config(cfg: DictConfig, path: Path) -> None:
    if _rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        OmegaConf.save(cfg, tmp, resolve=True)
        tmp.replace(path)


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))
