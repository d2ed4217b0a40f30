"""The settings of a DC / DSA / DM / CAFE / KIP distillation
(``task=distill method=dc|dsa|dm|cafe|kip``).

``method.*`` holds the method's own keys (``conf/method/<name>.yaml``); the keys every method
shares stay in ``distill.*`` (``iterations``, ``lr_img``, ``momentum``, ``init``, ``dsa_strategy``,
evaluation and checkpoint keys). Null keys take the published row
``conf/preset/<method>/<dataset>_ipc<ipc>.yaml``, then the reference code's defaults; DC/DSA loop
counts follow the reference's schedule by IPC. The trajectory-matching keys of ``distill.*``
(``eps``, ``syn_steps``, ...) belong to ``method=mtt``: changing one under another method is an
error, as is a ``method.*`` key the chosen method does not have.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_modules.condense.gradient_matching import PUBLISHED_LOOPS
from lightning_modules.errors import UserError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
METHODS = ("mtt", "datm", "pad", "dc", "dsa", "dm", "cafe", "kip")
#: the trajectory-matching family: one unroll and one masked loss, the method is a policy
TRAJECTORY_METHODS = ("mtt", "datm", "pad")
#: kernels a user can choose for method=kip (rf_fc is a measuring aid of condense.kernel_ridge)
KIP_KERNELS = ("ntk_fc", "nngp_fc", "rf_convnet")
#: distill.* keys only trajectory matching reads
MTT_KEYS = (
    "eps",
    "syn_steps",
    "expert_epochs",
    "max_start_epoch",
    "batch_syn",
    "lr_lr",
    "lr_teacher",
    "lr_floor",
    "unroll",
    "offload",
    "trajectories",
    "max_experts",
)
#: the reference code's argparse defaults (main.py for DC/DSA, main_DM.py for DM)
REFERENCE_DEFAULTS = {
    "dc": {"iterations": 1000, "lr_img": 0.1},
    "dsa": {"iterations": 1000, "lr_img": 0.1},
    "dm": {"iterations": 20000, "lr_img": 1.0},
    "cafe": {"iterations": 2000, "lr_img": 0.1},  # kaiwang960112/CAFE distill.py
    "kip": {"iterations": 1000, "lr_img": 0.01},  # Adam; not verified against the KIP code
}


def method_name(cfg: DictConfig) -> str:
    """``cfg.method.name`` (``mtt`` when the config has no method group), checked."""
    node = cfg.get("method")
    name = "mtt" if node is None else str(node.get("name", "mtt"))
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return name


def method_defaults(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "method" / f"{name}.yaml"))


def published_matching_row(method: str, dataset: str, ipc: int) -> dict | None:
    path = CONF_DIR / "preset" / method / f"{dataset}_ipc{int(ipc)}.yaml"
    return OmegaConf.to_container(OmegaConf.load(path)) if path.exists() else None


def check_method_keys(cfg: DictConfig, name: str) -> None:
    """Refuse keys that belong to another method (see module docstring)."""
    if name not in TRAJECTORY_METHODS:
        defaults = OmegaConf.load(CONF_DIR / "task" / "distill.yaml").distill
        for key in MTT_KEYS:
            if key in cfg.distill and cfg.distill[key] != defaults.get(key):
                raise UserError(
                    f"distill.{key} is a key of method=mtt (trajectory matching); method={name} "
                    f"does not use it: drop it (this method's keys: conf/method/{name}.yaml)"
                )
    allowed = set(method_defaults(name))
    extra = sorted(set(cfg.get("method") or {}) - allowed)
    if extra:
        owners = [m for m in METHODS if extra[0] in method_defaults(m)]
        owner = f" (a key of method={'/'.join(owners)})" if owners else ""
        raise UserError(
            f"method.{extra[0]}{owner} is not a key of method={name}; its keys: "
            f"{', '.join('method.' + k for k in sorted(allowed - {'name'})) or 'none'}"
        )


def resolve_matching_settings(cfg: DictConfig) -> DictConfig:
    """A resolved copy of ``cfg`` with the DC/DSA/DM row applied and the values checked."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    name = method_name(cfg)
    check_method_keys(cfg, name)
    d, m = cfg.distill, cfg.method
    ipc = int(cfg.ipc)
    if ipc < 1:
        raise UserError(f"ipc must be at least 1, got {cfg.ipc}")
    preset = str(d.get("preset", "auto")).lower()
    row = published_matching_row(name, str(cfg.dataset.name), ipc) if preset == "auto" else None
    row = row or {}
    with open_dict(cfg):
        for key in ("iterations", "lr_img"):
            if d[key] is None:
                d[key] = row.get(key, REFERENCE_DEFAULTS[name][key])
        for key in m:
            if m[key] is None and key in row:
                m[key] = row[key]
        if name in ("dc", "dsa"):
            loops = PUBLISHED_LOOPS.get(ipc) if preset == "auto" else None
            if (m.outer_loop is None or m.inner_loop is None) and loops is None:
                known = ", ".join(str(i) for i in PUBLISHED_LOOPS)
                raise UserError(
                    f"method={name} has no published loop schedule for ipc={ipc} (published for "
                    f"ipc {known}); set method.outer_loop and method.inner_loop"
                )
            if m.outer_loop is None:
                m.outer_loop = loops[0]
            if m.inner_loop is None:
                m.inner_loop = loops[1]
        if cfg.dataset.get("zca") is None:
            cfg.dataset.zca = bool(row.get("zca", False))
        if d.get("init") is None:
            d.init = "real"
    if d.init == "correct":
        raise UserError(
            f"distill.init=correct needs expert trajectories (method=mtt|datm|pad); method={name} "
            "has none: use real or noise"
        )
    validate_matching(cfg, name)
    return cfg


def validate_matching(cfg: DictConfig, name: str) -> None:
    """The filled settings against the schema (the published row's values included), and what
    depends on the network: CAFE's layer weights, one per block and one for the output."""
    from lightning_modules.schema import validate as check_schema

    check_schema(cfg)
    m = cfg.method
    if name == "cafe" and m.layer_weights is not None and len(m.layer_weights) < 2:
        raise UserError("method.layer_weights: one weight per ConvNet block and one for the output")


def method_options(m: DictConfig, keys) -> dict:
    """``{key: value}`` of ``m`` for ``keys`` present in it (lists as lists)."""
    return {
        k: OmegaConf.to_object(m[k]) if OmegaConf.is_config(m[k]) else m[k] for k in keys if k in m
    }


def batched_value(value) -> bool | str:
    text = str(value).lower()
    return "auto" if text == "auto" else text == "true"


def matching_stage_config(cfg: DictConfig, method: str, iterations=None) -> DictConfig:
    """``cfg`` (a composed ``task=reproduce`` config, MTT settings applied) made into the config of
    a ``task=distill method=<method>`` stage: the method's own keys from ``conf/method``, the MTT
    keys back at their defaults, ``reproduce.method_keys.<method>`` on top (scale knobs such as
    ``outer_loop``), ``iterations`` (None: the method's published row) and its ``lr_img`` from
    the row; ``dataset.zca`` and the shared keys stay as they are."""
    import copy

    sub = copy.deepcopy(cfg)
    defaults = OmegaConf.load(CONF_DIR / "task" / "distill.yaml").distill
    with open_dict(sub):
        sub.method = OmegaConf.create(method_defaults(method))
        scale = (cfg.get("reproduce") or {}).get("method_keys") or {}
        for key, value in (scale.get(method) or {}).items():
            sub.method[key] = value  # an unknown key is refused by check_method_keys
        for key in MTT_KEYS:
            sub.distill[key] = defaults.get(key)
        sub.distill.preset = "auto"
        sub.distill.iterations = None if iterations is None else int(iterations)
        sub.distill.lr_img = None
    return sub
