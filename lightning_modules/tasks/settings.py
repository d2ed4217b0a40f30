"""The settings of a distillation run: the published row of its method, dataset and IPC
(``conf/preset/<method>/<dataset>_ipc<ipc>.yaml``) filled into the ``distill.*`` keys left null,
and the checks that refuse a bad value before anything starts.

Used by ``task=distill`` and by ``task=reproduce`` (which fixes the settings once for all its
stages). It depends on the config alone: ``dataset.zca: null`` follows the row's ``zca``, a
value given anywhere (command line, experiment file, Python) wins over it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_modules.condense.matching import check_eps
from lightning_modules.condense.unroll import MODES
from lightning_modules.errors import UserError

log = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).resolve().parents[2] / "conf" / "preset"
#: distill.eps when null: MTT runs as the seed method (pruning on), DATM/PAD as published
DEFAULT_EPS = {"mtt": 0.1, "datm": 0.0, "pad": 0.0}
#: distill.init values: random real images, N(0, 1) noise, real images an expert gets right
INITS = ("real", "noise", "correct")
#: the keys a published MTT row sets (null in conf/task/distill.yaml, filled from the row)
PRESET_KEYS = (
    "iterations",
    "syn_steps",
    "expert_epochs",
    "max_start_epoch",
    "lr_img",
    "lr_lr",
    "lr_teacher",
    "batch_syn",
)


def preset_path(method: str, dataset: str, ipc: int) -> Path:
    return PRESET_DIR / method / f"{dataset}_ipc{int(ipc)}.yaml"


def published_row(method: str, dataset: str, ipc: int) -> dict | None:
    """The published hyperparameters of (method, dataset, ipc) as a dict; None when there are
    none."""
    path = preset_path(method, dataset, ipc)
    return OmegaConf.to_container(OmegaConf.load(path)) if path.exists() else None


def published_rows(method: str) -> dict[tuple[str, int], dict]:
    """Every published row of ``method``: ``{(dataset, ipc): row}``, sorted."""
    rows = {}
    for path in sorted((PRESET_DIR / method).glob("*_ipc*.yaml")):
        dataset, ipc = path.stem.rsplit("_ipc", 1)
        rows[(dataset, int(ipc))] = OmegaConf.to_container(OmegaConf.load(path))
    return dict(sorted(rows.items(), key=lambda kv: (kv[0][0] != "cifar10", kv[0])))


def resolve_settings(cfg: DictConfig, method: str = "mtt") -> DictConfig:
    """A resolved copy of ``cfg`` with the published row applied and every value checked.

    Null ``distill.*`` keys get the row's values; ``dataset.zca: null`` gets the row's ZCA
    setting (off without a row). A non-null ``dataset.zca`` that disagrees with the row is kept
    and logged.

    Raises:
        UserError: a key is still missing (no row for this dataset and IPC) or a value is bad.
    """
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    d = cfg.distill
    preset = str(d.get("preset", "auto")).lower()
    if preset not in ("auto", "none"):
        raise UserError(f"distill.preset={d.preset!r}; use auto (the published row) or none")
    check_ipc(cfg.ipc)
    row = published_row(method, str(cfg.dataset.name), int(cfg.ipc)) if preset == "auto" else None
    with open_dict(cfg):
        for key in PRESET_KEYS:
            if d[key] is None and row is not None:
                d[key] = row[key]
        if d.get("eps") is None:
            d.eps = DEFAULT_EPS[method]
        if d.get("init") is None:  # DATM/PAD rows name their initial images; else real ones
            d.init = (row or {}).get("init", "real")
        if cfg.dataset.get("zca") is None:
            cfg.dataset.zca = bool(row["zca"]) if row is not None else False
        elif row is not None and bool(cfg.dataset.zca) != bool(row["zca"]):
            log.warning(
                "dataset.zca=%s overrides the published row (ZCA %s)",
                str(bool(cfg.dataset.zca)).lower(), "on" if row["zca"] else "off",
            )  # fmt: skip
        missing = [k for k in PRESET_KEYS if d[k] is None]
        if missing:
            rows = ", ".join(f"{n} ipc={i}" for n, i in published_rows(method))
            raise UserError(
                f"no published hyperparameters for dataset={cfg.dataset.name} ipc={cfg.ipc} "
                f"(rows: {rows}); set {', '.join('distill.' + k for k in missing)}"
            )
    validate(cfg)
    return cfg


def check_ipc(ipc) -> int:
    """``ipc`` as a positive int, or a ``UserError`` naming the bad value."""
    try:
        value = int(ipc)
    except (TypeError, ValueError):
        value = None
    if value is None or value < 1 or value != float(ipc):
        raise UserError(f"ipc must be a positive whole number of images per class, got {ipc}")
    return value


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


def validate_shared(d: DictConfig) -> None:
    """The ``distill.*`` checks every method shares (evaluation schedule, initial images)."""
    if int(d.eval_every or 0) < 0 or int(d.eval_epochs) < 1:
        raise UserError(
            "distill.eval_every must be >= 0 (0: only at the end) and distill.eval_epochs >= 1"
        )
    if d.init not in INITS:
        raise UserError(
            f"distill.init={d.init!r}; use real (random real images), noise, or correct (real "
            "images an expert classifies correctly; trajectory matching only)"
        )


def validate(cfg: DictConfig) -> None:
    """One clear ``UserError`` for the first bad ``distill.*`` value."""
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
    validate_shared(d)
    if d.unroll not in MODES:
        raise UserError(
            f"distill.unroll={d.unroll!r}; use full or recompute (same gradient, constant memory)"
        )
    if float(d.lr_teacher) <= float(d.lr_floor):
        raise UserError(
            f"distill.lr_teacher={d.lr_teacher} must be above distill.lr_floor={d.lr_floor}"
        )
    batch_syn_value(d.batch_syn)
    offload_value(d.offload)
