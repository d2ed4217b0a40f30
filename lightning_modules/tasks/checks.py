"""The Trainer keys a task sets itself (the schema, ``lightning_modules/schema``, checks every
other key and rule before anything starts)."""

from __future__ import annotations

from omegaconf import DictConfig

from lightning_modules.errors import UserError
from lightning_modules.schema.relations import trainer_file_keys


def check_trainer_overrides(cfg: DictConfig, overrides: dict) -> None:
    """A task that sets a Trainer key itself (``max_epochs`` from ``task.epochs``, ...) refuses
    the same key added to the trainer config, which it would silently override."""
    clash = sorted((set(cfg.trainer) - trainer_file_keys()) & set(overrides))
    if clash:
        raise UserError(
            f"trainer.{clash[0]} is set by task={cfg.task.name} itself (to {overrides[clash[0]]}); "
            "use the task's key instead (task.epochs, distill.iterations, ddpm.steps, ...)"
        )
