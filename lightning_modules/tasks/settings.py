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

from lightning_modules.errors import UserError

log = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).resolve().parents[2] / "conf" / "preset"
#: distill.eps when null: MTT runs as the seed method (pruning on), DATM/PAD as published
DEFAULT_EPS = {"mtt": 0.1, "datm": 0.0, "pad": 0.0}
#: distill.init values: random real images, N(0, 1) noise, real images an expert gets right
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
    from lightning_modules.schema import validate as check_schema

    check_schema(cfg)  # the values as given (ipc=0 named before a row is looked up)
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    d = cfg.distill
    preset = str(d.get("preset", "auto")).lower()  # auto | none (the schema's choice)
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
    """The filled settings against the schema (a published row's values included), and the rule
    only a filled row can break: the student lr starts above its floor."""
    from lightning_modules.schema import validate as check_schema

    check_schema(cfg)
    d = cfg.distill
    if float(d.lr_teacher) <= float(d.lr_floor):
        raise UserError(
            f"distill.lr_teacher={d.lr_teacher} must be above distill.lr_floor={d.lr_floor}"
        )
