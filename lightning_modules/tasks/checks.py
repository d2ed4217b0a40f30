"""Checks every task's counts and trainer keys before anything starts (``train.run`` calls
:func:`check_config` first): a bad value is one ``UserError`` line, never a silently different
run (``dataset.train_per_class=0`` training on everything, ``task.epochs=-1`` never stopping,
``+trainer.max_epochs=3`` ignored)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lightning_modules.errors import UserError

#: keys that must be whole numbers >= 1 when given (null keeps its documented meaning)
POSITIVE_COUNTS = (
    "ipc",
    "dataset.train_per_class",
    "dataset.test_per_class",
    "dataset.batch_size",
    "dataset.eval_batch_size",
    "task.epochs",
    "teacher.num_experts",
    "teacher.epochs",
    "teacher.batch_size",
    "coreset.train_epochs",
    "coreset.forgetting_epochs",
    "coreset.batch_size",
    "evaluate.num_eval",
    "evaluate.epochs",
    "evaluate.batch_size",
    "evaluate.eval_batch_size",
    "distill.iterations",
    "distill.syn_steps",
    "distill.expert_epochs",
    "distill.max_start_epoch",
    "distill.checkpoint_every",
    "distill.eval_num",
    "distill.eval_epochs",
    "distill.eval_batch_size",
    "distill.max_experts",
    "method.chunk",
    "method.rf_models",
    "method.depth",
    "method.window",
    "method.max_outer",
    "method.max_inner",
    "method.batch_test",
    "ddpm.timesteps",
    "ddpm.epochs",
    "ddpm.steps",
    "ddpm.batch_size",
    "ddpm.num_samples",
    "ddpm.sample_steps",
    "ddpm.sample_batch",
    "ddpm.kid_subsets",
    "ddpm.kid_subset_size",
    "reproduce.experts",
    "reproduce.expert_epochs",
    "reproduce.iterations",
    "reproduce.syn_steps",
    "reproduce.max_start_epoch",
    "reproduce.eval_epochs",
    "reproduce.num_eval",
    "reproduce.expert_jobs",
)
#: keys that must be whole numbers >= 0 when given
NON_NEGATIVE_COUNTS = (
    "teacher.first_index",
    "distill.eval_every",
    "ddpm.sample_every",
    "ddpm.snapshots",
    "seed",
)
#: tasks that run their own loop: the Trainer's keys beyond the trainer config files mean nothing
PLAIN_LOOP_TASKS = ("teacher", "coreset", "evaluate", "reproduce")
#: the Trainer keys each Trainer task sets itself (from its own keys)
TASK_TRAINER_KEYS = {
    "classify": ("max_epochs", "max_steps", "check_val_every_n_epoch"),
    "distill": ("max_epochs", "max_steps", "use_distributed_sampler"),
    "ddpm": ("max_epochs", "max_steps"),
}
#: the keys the trainer config files define (conf/trainer/*.yaml); ``+trainer.<key>`` adds others
TRAINER_DIR = Path(__file__).resolve().parents[2] / "conf" / "trainer"


def check_config(cfg: DictConfig) -> None:
    """Raise ``UserError`` for the first bad count or a trainer key the task would ignore."""
    for key in POSITIVE_COUNTS:
        _check_count(cfg, key, minimum=1)
    for key in NON_NEGATIVE_COUNTS:
        _check_count(cfg, key, minimum=0)
    extra = sorted(set(cfg.get("trainer") or {}) - trainer_file_keys())
    task = str(cfg.task.name)
    if extra and task in PLAIN_LOOP_TASKS:
        raise UserError(
            f"task={task} runs its own loop and would ignore trainer.{extra[0]}; "
            "drop it (the task's own keys set epochs and steps)"
        )
    clash = [k for k in TASK_TRAINER_KEYS.get(task, ()) if k in extra]
    if clash:
        raise UserError(
            f"trainer.{clash[0]} is set by task={task} itself; use the task's key instead "
            "(task.epochs, distill.iterations, ddpm.steps, ...)"
        )


def check_trainer_overrides(cfg: DictConfig, overrides: dict) -> None:
    """A task that sets a Trainer key itself (``max_epochs`` from ``task.epochs``, ...) refuses
    the same key added to the trainer config, which it would silently override."""
    clash = sorted((set(cfg.trainer) - trainer_file_keys()) & set(overrides))
    if clash:
        raise UserError(
            f"trainer.{clash[0]} is set by task={cfg.task.name} itself (to {overrides[clash[0]]}); "
            "use the task's key instead (task.epochs, distill.iterations, ddpm.steps, ...)"
        )


def trainer_file_keys() -> set[str]:
    keys: set[str] = set()
    for path in TRAINER_DIR.glob("*.yaml"):
        keys |= set(OmegaConf.load(path)) - {"defaults"}
    return keys


def _check_count(cfg: DictConfig, key: str, minimum: int) -> None:
    value = OmegaConf.select(cfg, key, default=None)
    if value is None:
        return
    try:
        whole = int(value) == float(value) and not isinstance(value, bool)
    except (TypeError, ValueError):
        whole = False
    if not whole or int(value) < minimum:
        need = "a positive whole number" if minimum == 1 else "a whole number >= 0"
        raise UserError(f"{key} must be {need}, got {value!r}")
