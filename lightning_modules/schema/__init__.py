"""One schema for the whole configuration, checked once, right after composition.

``validate(cfg)`` raises ``UserError`` naming the first key whose value is not allowed (the key,
the value, what is allowed), then the first broken rule between keys. ``train.py`` runs it from a
Hydra callback (``ValidateConfig.on_run_start``), before Hydra creates the run folder, sets up
logging or the task touches threads, data or a logger: a bad value leaves nothing on disk.
``train.run`` runs it again for configs composed in-process (tests, scripts); task=distill and
task=reproduce re-check the settings they fill from a published row.

Where things live: ``kinds.py`` (what a kind of value is), ``keys.py`` (one line per key),
``relations.py`` (rules between keys). docs/configuration/validation.md tells how to add a key.
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig, OmegaConf

from lightning_modules.errors import UserError
from lightning_modules.schema import relations
from lightning_modules.schema.keys import EXTRA, KEYS, NESTED, OPEN

try:  # the callback base class; absent only in a Hydra too old for this project
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object


def resolved(cfg: DictConfig) -> dict:
    """The configuration as plain values (interpolations resolved), without Hydra's own node."""
    keep = [k for k in cfg if k != "hydra"]
    try:
        return OmegaConf.to_container(OmegaConf.masked_copy(cfg, keep), resolve=True)
    except Exception as e:  # an interpolation that names no key, a missing environment variable
        key = getattr(e, "full_key", None) or "a key"
        raise UserError(f"{key} cannot be resolved: {str(e).splitlines()[0]}") from None


def problem(key: str, value) -> str | None:
    """The one-line problem with ``key=value``, or None when the schema allows it."""
    kind = KEYS.get(key) or EXTRA.get(key)
    if kind is None:
        return None if key.startswith(OPEN) else _unknown(key)
    if kind.accepts(value):
        return None
    return f"{key} must be {kind.text()}, got {value!r}"


def _unknown(key: str) -> str:
    return f"{key} is not a key of this configuration (a typo? the keys are in conf/)"


def check_keys(data: dict, prefix: str = "") -> None:
    for name, value in data.items():
        key = f"{prefix}{name}"
        if key in NESTED and isinstance(value, dict):
            _check_nested(key, value)
            continue
        if key not in KEYS and isinstance(value, dict) and not key.startswith(OPEN):
            check_keys(value, key + ".")
            continue
        if (msg := problem(key, value)) is not None:
            raise UserError(msg)


def _check_nested(key: str, value: dict) -> None:
    """``{name: {leaf: value}}`` whose leaves are the keys ``<group>.<leaf>`` of ``NESTED``."""
    group, names = NESTED[key]
    for name, entries in value.items():
        if name not in names:
            raise UserError(f"{key}.{name}: {name!r} is not one of {', '.join(names)}")
        if not isinstance(entries, dict):
            raise UserError(f"{key}.{name} must be a mapping of {group}.* keys, got {entries!r}")
        for leaf, v in entries.items():
            if f"{group}.{leaf}" not in KEYS:
                raise UserError(f"{key}.{name}.{leaf}: {group}.{leaf} is not a key")
            if (msg := problem(f"{group}.{leaf}", v)) is not None:
                raise UserError(f"{key}.{name}.{leaf}: {msg}")


def validate(cfg: DictConfig, composed: bool = False) -> None:
    """Raise ``UserError`` for the first key or rule the configuration breaks.

    ``composed``: ``cfg`` is what a run was composed from (the callback, ``train.run``), so every
    block in it must belong to its task; a task's own re-check of a derived config passes False.
    """
    data = resolved(cfg)
    check_keys(data)
    for rule in relations.RULES + (relations.COMPOSED_RULES if composed else ()):
        if (msg := rule(data)) is not None:
            raise UserError(msg)


class ValidateConfig(Callback):
    """Hydra calls this after composing, before the run folder, logging or the task exist.

    A bad value: ``error: <one line>`` on stderr, exit status 2, nothing written. A multirun
    validates every job of the sweep before the sweep folder exists.
    """

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _or_exit(lambda c: validate(c, composed=True), config)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _or_exit(_validate_sweep, config)


def _validate_sweep(config: DictConfig) -> None:
    """Each job's config of a basic sweep (the launcher composes the same ones later)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    loader = GlobalHydra.instance().config_loader()
    task = list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    try:
        overrides = OverridesParser.create(config_loader=loader).parse_overrides(params + task)
        batches = BasicSweeper.split_arguments(overrides, None)
    except Exception:  # another sweeper's syntax (ranges, optuna): train.run checks each job
        return
    for batch in batches:
        for job in batch:
            validate(loader.load_sweep_config(config, list(job)), composed=True)


def _or_exit(check, config: DictConfig) -> None:
    try:
        check(config)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
