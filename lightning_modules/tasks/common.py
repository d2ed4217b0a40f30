"""The toolbox every task runner shares: data, nets, logger and trainer built from the config,
images and results to the logger, files written from rank zero, and ``run_task`` (how one task
runs another's stage without importing its runner).
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from lightning_modules.errors import UserError
from lightning_modules.utils import files
from lightning_modules.utils.progress import progress_bar
from lightning_modules.utils.ranks import global_rank, multi_node_environment


def instantiate_checked(node: DictConfig, **kwargs):
    """``hydra.utils.instantiate`` that lets a ``UserError`` raised by the target through as is.

    Hydra wraps every exception of a target in an ``InstantiationException``; unwrapped, a bad
    option still reaches ``train.py`` as one clear line instead of a traceback.
    """
    from hydra.errors import InstantiationException

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise


def build_datamodule(cfg: DictConfig, **overrides) -> L.LightningDataModule:
    return instantiate_checked(cfg.dataset, **overrides)


def require_images(dm, task: str) -> None:
    if not hasattr(dm, "num_classes"):
        raise UserError(f"task={task} needs an image dataset (dataset=cifar10 or cifar100)")


def build_net(net_cfg: DictConfig, dm):
    """Instantiate a classifier config for the datamodule's channels, size and classes."""
    return instantiate_checked(
        net_cfg, channels=dm.channels, num_classes=dm.num_classes, im_size=dm.im_size
    )


def build_logger(cfg: DictConfig, resume_epoch: int | None = None):
    """The configured Lightning logger, or False for ``logger=none``.

    With ``resume=true`` a CSV logger keeps the rows the killed run wrote to ``metrics.csv``
    (Lightning's writer would delete the file) and appends the new ones: all of them, or, when
    ``resume_epoch`` (the epoch of the checkpoint the run restarts from) is given, the rows of
    that epoch and before: the resumed run logs the later epochs again.
    """
    if cfg.get("logger") is None or cfg.logger.get("_target_") is None:
        return False
    logger = instantiate(cfg.logger)
    init = getattr(logger, "_wandb_init", None)  # WandbLogger: wandb.init's keywords, used lazily
    if isinstance(init, dict) and init.get("anonymous") is None:
        # Lightning always passes anonymous=None, and wandb warns that the setting is deprecated
        # on every run, the one line left on a quiet (WANDB_SILENT) console
        init.pop("anonymous", None)
    Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
    if cfg.get("resume") and type(logger).__name__ == "CSVLogger" and rank_zero_only.rank == 0:
        _keep_csv_rows(logger, resume_epoch)
    return logger


def _keep_csv_rows(logger, resume_epoch: int | None) -> None:
    """Put the earlier ``metrics.csv`` rows (up to ``resume_epoch``) back under a CSV logger."""
    import csv

    path = Path(logger.log_dir) / "metrics.csv"
    if not path.is_file():
        return
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        keys, rows = sorted(reader.fieldnames or []), list(reader)
    if resume_epoch is not None:
        rows = [
            r for r in rows if r.get("epoch", "") in ("", None) or int(r["epoch"]) <= resume_epoch
        ]
    import warnings

    with warnings.catch_warnings():  # "previous log files will be deleted": put back below
        warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
        writer = logger.experiment  # created now: it deletes metrics.csv
    with path.open("w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=keys)
        out.writeheader()
        out.writerows(rows)
    writer.metrics_keys = keys  # later saves append under this header (or widen it)


def log_config(logger, cfg: DictConfig) -> None:
    """Hyperparameters as one plain dict (W&B shows nested keys as a.b.c)."""
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))


class ProgressBar(RichProgressBar):
    """Lightning's Rich bar; a one-epoch run (distillation: its iterations are one epoch's
    steps) is labelled ``Iterations``, not ``Epoch 0/0``, and a step budget shows no
    ``Epoch 0/-2``."""

    def _get_train_description(self, current_epoch: int) -> str:
        epochs = self.trainer.max_epochs
        if epochs == 1:
            return "Iterations"
        if epochs is None or epochs < 1:  # a step budget (ddpm.steps): no last epoch to show
            return f"Epoch {current_epoch}"
        return super()._get_train_description(current_epoch)


def build_trainer(cfg: DictConfig, logger=None, callbacks=(), **overrides) -> L.Trainer:
    """A Trainer from ``cfg.trainer`` with a rich progress bar and the run dir as root; in a
    submitit job it also writes ``checkpoints/last.ckpt`` at submitit's requeue signal."""
    from lightning_modules.tasks.checks import check_trainer_overrides
    from lightning_modules.tasks.preemption import SaveAtRequeueSignal, in_submitit_job

    check_trainer_overrides(cfg, overrides)
    callbacks = list(callbacks)
    if in_submitit_job():  # the file classify, distill and ddpm continue from
        callbacks.append(SaveAtRequeueSignal(Path(cfg.paths.output_dir) / "checkpoints/last.ckpt"))
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(ProgressBar(leave=True))
    trainer = instantiate(
        cfg.trainer,
        default_root_dir=cfg.paths.output_dir,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        **overrides,
    )
    return trainer


def finite_metrics(metrics: dict) -> dict:
    """Plain Python numbers (tensors unwrapped); NaN and inf stay floats: ``write_json`` writes
    them as null with a ``non_finite`` field, and ``diverged`` refuses them in a loss."""
    return {k: v.item() if hasattr(v, "item") else v for k, v in metrics.items()}


def require_finite(what: str, tensors, hint: str) -> None:
    """Refuse to write ``what`` as a run's result when it holds NaN or inf (after the task's own
    skip/retry logic): an error naming the keys to change, not a file that looks finished."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise UserError(
                f"training diverged: the {what} hold NaN or inf, so none was written; {hint}"
            )


def diverged(metrics: dict) -> list[str]:
    """The loss metrics that are NaN or inf: training diverged, whatever the runner wrote."""
    return [
        f"{k}={v}"
        for k, v in metrics.items()
        if "loss" in k and isinstance(v, float) and not math.isfinite(v)
    ]


@rank_zero_only
def write_json(path: str | Path, payload) -> None:
    """``payload`` as JSON at ``path``, atomically, from rank zero only."""
    files.write_json(path, payload)


def run_task(name: str, cfg: DictConfig, out_dir: str | Path) -> dict:
    """Run the runner of ``task=<name>`` (``lightning_modules/tasks/<name>.py``) on ``cfg``.

    The one way a task starts another's work (``train.py`` for the command line, ``reproduce``
    for its stages): runners never import one another.

    Raises:
        UserError: no runner of that name.
    """
    try:
        runner = importlib.import_module(f"lightning_modules.tasks.{name}")
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("lightning_modules.tasks"):
            raise UserError(f"unknown task {name!r}") from None
        raise
    return runner.run(cfg, Path(out_dir))


def process_rank(cfg: DictConfig) -> int:
    """This process's global rank from the environment (before Lightning sets it up)."""
    devices = cfg.trainer.get("devices", 1)
    return global_rank(int(devices) if str(devices).isdigit() else 1)


def num_nodes(cfg: DictConfig) -> int:
    return int(cfg.trainer.get("num_nodes", 1) or 1)


def check_multi_node(cfg: DictConfig) -> None:
    """``trainer.num_nodes`` > 1 needs processes started on every node by someone."""
    if num_nodes(cfg) > 1 and not multi_node_environment():
        raise UserError(
            f"trainer.num_nodes={num_nodes(cfg)} but no multi-node environment: submit with "
            "hydra/launcher=slurm (or srun), or start one process per node with NODE_RANK, "
            "MASTER_ADDR and MASTER_PORT set (docs/guides/clusters.md)"
        )


#: seconds the other nodes wait for rank zero's marker in a folder that must be shared
SHARED_DIR_TIMEOUT_S = float(os.environ.get("TTDISTILL_SHARED_DIR_TIMEOUT_S", 300))


def check_shared_dir(path: str | Path, cfg: DictConfig, what: str) -> None:
    """On several nodes, ``path`` (run dir, expert store) must be one folder that every node
    sees: rank zero writes a marker naming this job, every other rank waits to read it.

    Raises:
        UserError: a rank other than zero did not see rank zero's marker in time.
    """
    if num_nodes(cfg) <= 1:
        return
    env = os.environ
    job = ":".join(env.get(k, "") for k in ("SLURM_JOB_ID", "MASTER_ADDR", "MASTER_PORT"))
    marker = Path(path) / ".rank0_marker"
    if process_rank(cfg) == 0:
        files.write_text(marker, job)
        return
    deadline = time.monotonic() + SHARED_DIR_TIMEOUT_S
    while time.monotonic() < deadline:
        if marker.exists() and marker.read_text() == job:
            return
        time.sleep(0.5)
    raise UserError(
        f"{what} {path} is not shared between the nodes: rank {process_rank(cfg)} cannot see "
        f"rank zero's marker there after {SHARED_DIR_TIMEOUT_S:g} s; put it on a file system "
        "every node mounts (paths.runs_dir, teacher.out / distill.trajectories)"
    )


def finish_wandb() -> None:
    """Close the active W&B run (if wandb was imported at all) so that the next run, a stage of
    ``task=reproduce`` or a job of a multirun, gets its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def log_images(logger, key: str, paths, step: int | None = None) -> None:
    """Log PNGs to W&B when ``logger`` is a WandbLogger; other loggers keep them in the run dir."""
    if not logger or type(logger).__name__ != "WandbLogger":  # no wandb import for other loggers
        return
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    kwargs = {} if step is None else {"step": step}
    logger.log_image(key=key, images=[str(p) for p in paths], **kwargs)


def net_options(net_cfg: DictConfig) -> dict:
    """The ``net`` config as a plain dict, ``name`` and constructor options, without
    ``_target_``: what expert and set files record and what evaluation builds networks from."""
    options = OmegaConf.to_container(net_cfg, resolve=True)
    options.pop("_target_", None)
    return options


def show_progress(cfg: DictConfig, enabled: bool = True):
    """The plain loops' progress bar, off with ``trainer.enable_progress_bar=false``."""
    return progress_bar(enabled and bool(cfg.trainer.get("enable_progress_bar", True)))


# a rank of a plain-loop task may wait at its closing barrier for the slowest rank's last job
# (one expert, one evaluation network): far longer than torch's 30-minute default
PLAIN_LOOP_TIMEOUT_H = 24


def launch_fabric(cfg: DictConfig, task: str):
    """A launched ``lightning.fabric.Fabric`` from ``cfg.trainer`` when it asks for several
    processes, else ``None`` (one process: the task picks its device itself).

    For tasks that run their own loop (teacher, evaluate) under ``trainer=ddp`` / ``ddp_cpu``
    as Trainer tasks do: Lightning's subprocess launcher reruns this command line for local
    ranks 1.. (with Hydra's run dir passed along, so every rank works in the one run dir), and
    the process group is set up on return. ``rank_zero_only.rank`` is then the global rank, so
    ``write_json`` and loggers write from rank zero only.

    Raises:
        UserError: the trainer settings name no usable device, or a spawn/fork strategy (a
            plain loop cannot be pickled into spawned processes; use trainer.strategy=ddp).
    """
    from datetime import timedelta

    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    t = cfg.trainer
    strategy = str(t.get("strategy", "auto"))
    if "spawn" in strategy or "fork" in strategy:
        raise UserError(
            f"task={task} runs its own loop: use trainer.strategy=ddp (processes rerun train.py), "
            f"not {strategy}"
        )
    options = {
        "accelerator": t.get("accelerator", "auto"),
        "devices": t.get("devices", 1),
        "num_nodes": int(t.get("num_nodes", 1)),
    }
    try:
        fabric = Fabric(strategy=strategy, **options)
        if fabric.world_size == 1:
            return None
        if strategy in ("auto", "ddp"):
            fabric = Fabric(
                strategy=DDPStrategy(timeout=timedelta(hours=PLAIN_LOOP_TIMEOUT_H)), **options
            )
    except (ValueError, RuntimeError) as e:  # Lightning's MisconfigurationException included
        raise UserError(f"task={task}: trainer settings {options} ({strategy}): {e}") from None
    fabric.launch()
    return fabric


def gather_objects(fabric, obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without a fabric)."""
    if fabric is None:
        return [obj]
    import torch.distributed as dist

    out = [None] * fabric.world_size
    dist.all_gather_object(out, obj)
    return out


def rank_zero_first(fabric):
    """Rank zero runs the block first (e.g. fits and caches ZCA), the other ranks after it."""
    from contextlib import nullcontext

    return nullcontext() if fabric is None else fabric.rank_zero_first(local=False)


def epoch_checkpoints(ckpt_dir: str | Path):
    """A ``ModelCheckpoint`` that writes ``<ckpt_dir>/last.ckpt`` after every training epoch
    (what ``resume=true`` restarts from).

    Lightning 2.6 refreshes ``last.ckpt`` only in a step where a top-k checkpoint was saved, so
    ``save_top_k=0`` would leave it to the end of training; ``save_top_k=1`` without a monitor
    keeps one ``epoch=..-step=...ckpt`` (the newest) beside it. Saving at the end of every
    training epoch also when validation runs less often (``check_val_every_n_epoch > 1``).
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    return ModelCheckpoint(
        dirpath=ckpt_dir, save_last=True, save_top_k=1, save_on_train_epoch_end=True
    )


class ShuffleState(L.Callback):
    """Checkpoints a loader's shuffle generator, so a resumed run draws the batch order the
    uninterrupted run would (under DDP Lightning's DistributedSampler orders by epoch instead)."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.generator.set_state(state_dict["generator"])
