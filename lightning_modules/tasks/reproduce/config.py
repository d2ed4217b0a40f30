"""What a ``task=reproduce`` run is: the table and columns asked for, the settings every stage
shares (scale knobs written into the sub-task keys, the published row applied once), the work dir
and each stage's config."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from datamodules.trajectories import default_store_dir
from lightning_modules.errors import UserError
from lightning_modules.tasks import settings
from lightning_modules.tasks.reproduce import paper_numbers

METHODS = (
    "random", "forgetting", "herding", "dc", "dsa", "dm", "cafe", "kip", "mtt", "pruning", "datm",
    "pad",
)  # fmt: skip


#: trajectory matching with learned soft labels (task=distill method=<name>): their sets are
#: evaluated on their soft labels (acc_soft, the published protocol) and on hard labels (acc_hard)
SOFT_LABEL_METHODS = ("datm", "pad")


#: the columns that need expert trajectories
NEEDS_EXPERTS = ("mtt", "pruning", "herding", *SOFT_LABEL_METHODS)


#: distillations by gradient or distribution matching (task=distill method=<name>)
MATCHING = ("dc", "dsa", "dm", "cafe", "kip")


CORESETS = ("random", "forgetting", "herding")


TABLES = ("row", "cross_arch", "kip")


NUM_STAGES = 5


NET_LABELS = {
    "convnet": "ConvNet",
    "alexnet": "AlexNet",
    "vgg11": "VGG11",
    "resnet18": "ResNet18",
    "resnet18_ap": "ResNet18_AP",
}


# reproduce.<knob> -> the sub-task key it sets (null leaves that key alone)
SCALE_KNOBS = {
    "experts": "teacher.num_experts",
    "expert_epochs": "teacher.epochs",
    "iterations": "distill.iterations",
    "syn_steps": "distill.syn_steps",
    "max_start_epoch": "distill.max_start_epoch",
    "eval_epochs": "evaluate.epochs",
    "num_eval": "evaluate.num_eval",
}


# the coreset keys each selection depends on (its cache key)
_OPTIMISER = ("lr", "momentum", "weight_decay", "batch_size", "dsa", "dsa_strategy")


CORESET_KEYS = {
    "random": ("method",),
    "herding": ("method", "features", "expert_index", "train_epochs") + _OPTIMISER,
    "forgetting": ("method", "forgetting_epochs") + _OPTIMISER,
}


# keys that change how a stage runs, not what it makes: left out of the cache keys
_OPERATIONAL = {
    "dataset": ("data_dir", "download", "cache_dir", "batch_size", "eval_batch_size", "_target_"),
    "net": ("_target_",),
    "distill": (
        "trajectories",
        "max_experts",
        "eval_every",
        "eval_nets",
        "eval_num",
        "eval_epochs",
        "eval_batch_size",
        "final_eval",
        "checkpoint_every",
        "unroll",
        "offload",
        "max_bad_steps",
    ),
    "coreset": ("out", "store"),
}


def _stage(n: int) -> str:
    return f"[{n}/{NUM_STAGES}]"


def settle(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` with the scale knobs written into the sub-task keys and the distillation
    preset applied (which also fixes ``dataset.zca`` for every stage), interpolations kept."""
    r = cfg.reproduce
    eps = float(r.eps)  # in (0, 1): the schema; the ε = 0 column (MTT) is always run
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        for knob, target in SCALE_KNOBS.items():
            if r.get(knob) is not None:
                OmegaConf.update(cfg, target, r[knob], force_add=True)
        cfg.teacher.first_index = 0
        cfg.distill.eps = eps
        cfg.distill.max_experts = int(cfg.teacher.num_experts)
        # every set is evaluated in stage 4 with one protocol; no evaluation inside distill
        cfg.distill.eval_every = 0
        cfg.distill.final_eval = False
        resolved = settings.resolve_settings(cfg)  # dataset.zca: null follows the row
        for key in settings.PRESET_KEYS:
            cfg.distill[key] = resolved.distill[key]
        cfg.dataset.zca = bool(resolved.dataset.zca)
        cfg.distill.preset = "none"  # applied once, here: every stage sees exactly these values
    return cfg  # the scale knobs are counts >= 1 (the schema): the keys they set are too


def check_one_device(cfg: DictConfig) -> None:
    """The stages run one after another in this process: several devices would repeat them."""
    devices = cfg.trainer.get("devices", 1)
    many = devices == -1 or (isinstance(devices, int) and devices > 1)
    many = many or (not isinstance(devices, (int, str)) and len(devices) > 1)
    if many or int(cfg.trainer.get("num_nodes", 1)) > 1:
        raise UserError(
            "task=reproduce runs its stages in one process on one device (trainer.devices=1); "
            "to use several GPUs, fill the expert store first with one process per GPU "
            "(CUDA_VISIBLE_DEVICES=k python train.py task=teacher ...), then task=reproduce "
            "reuses those experts"
        )


def table_kind(cfg: DictConfig) -> str:
    table = str(cfg.get("table", "row"))
    if table not in TABLES:
        raise UserError(
            f"table={table!r}; use row (Table I), cross_arch (Table III) or kip (Table II)"
        )
    return table


def chosen_methods(cfg: DictConfig, table: str) -> list[str]:
    if table == "cross_arch":  # DATM / PAD sets join when reproduce.methods names them
        asked = cfg.reproduce.methods
        asked = [asked] if isinstance(asked, str) else list(asked)
        return ["mtt", "pruning"] + [m for m in SOFT_LABEL_METHODS if m in asked]
    if table == "kip":
        return ["kip", "pruning"]
    methods = cfg.reproduce.methods
    methods = [methods] if isinstance(methods, str) else list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(
            f"reproduce.methods={methods}: choose from {', '.join(METHODS)} "
            "(pruning = distillation with reproduce.eps, mtt = ε 0; dc, dsa, dm, cafe, kip, "
            "datm, pad = task=distill method=<name>)"
        )
    return [m for m in METHODS if m in methods]  # table order


def chosen_nets(cfg: DictConfig, table: str) -> list[str]:
    from lightning_modules.condense.evaluation import check_net_names

    nets = cfg.reproduce.nets
    if table == "kip":
        if str(cfg.net.name) != "convnet" or nets not in (None, ["convnet"], "convnet"):
            raise UserError(
                "table=kip (Table II) evaluates ConvNets of several widths: net=convnet"
            )
        return ["convnet"]
    if nets is None:
        nets = list(paper_numbers.CROSS_ARCH_NETS) if table == "cross_arch" else [cfg.net.name]
    return check_net_names(list(nets) if not isinstance(nets, str) else [nets])


def kip_widths(cfg: DictConfig) -> list[int]:
    """Table II's evaluation widths of the KIP set (``reproduce.kip_widths``), checked."""
    widths = cfg.reproduce.get("kip_widths") or [1024, 128]
    widths = [widths] if isinstance(widths, int) else list(widths)
    if not widths or any(not isinstance(w, int) or w < 1 for w in widths):
        raise UserError(
            f"reproduce.kip_widths={widths}: give positive ConvNet widths, e.g. [1024,128]"
        )
    return widths


def with_width(cfg: DictConfig, width: int) -> DictConfig:
    """``cfg`` with the evaluation ConvNet of width ``width``."""
    sub = copy.deepcopy(cfg)
    with open_dict(sub):
        sub.net.width = int(width)
    return sub


def _digest(payload, n: int = 8) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _block(cfg: DictConfig, name: str) -> dict:
    block = OmegaConf.to_container(cfg[name], resolve=True)
    for key in _OPERATIONAL.get(name, ()):
        block.pop(key, None)
    return block


def _canonical(payload) -> dict:
    return json.loads(json.dumps(payload, sort_keys=True, default=str))


def default_workdir(cfg: DictConfig) -> Path:
    """``<runs_dir>/reproduce_cache/<dataset>-ipc<ipc>[-zca]-<hash of net, subset and seed>``."""
    scale = {
        "net": _block(cfg, "net"),
        "train_per_class": cfg.dataset.get("train_per_class"),
        "test_per_class": cfg.dataset.get("test_per_class"),
        "subset_seed": cfg.dataset.get("subset_seed"),
        "seed": int(cfg.seed),
    }
    name = f"{cfg.dataset.name}-ipc{int(cfg.ipc)}{'-zca' if cfg.dataset.zca else ''}"
    return Path(cfg.paths.runs_dir) / "reproduce_cache" / f"{name}-{_digest(scale, 6)}"


def expert_store_dir(cfg: DictConfig, workdir: Path) -> Path:
    """``reproduce.experts_dir``; else the teacher's default store on the whole train split (shared
    with ``task=teacher``/``distill``), or ``<workdir>/experts/<net>`` on a subset (experts of a
    subset are other trajectories and must not mix with full-data ones)."""
    if cfg.reproduce.get("experts_dir"):
        return Path(cfg.reproduce.experts_dir)
    if cfg.dataset.get("train_per_class"):
        return workdir / "experts" / str(cfg.net.name)
    return default_store_dir(cfg.dataset.name, bool(cfg.dataset.zca), cfg.net.name)


def derive(cfg: DictConfig, task: str, out_dir: Path, name: str, **blocks) -> DictConfig:
    """The config of a sub-task: ``cfg`` with ``task.name``, its run dir and block values set."""
    sub = copy.deepcopy(cfg)
    with open_dict(sub):
        sub.task.name = task
        sub.paths.output_dir = str(out_dir)
        sub.resume = bool(blocks.pop("resume", False))
        for block, values in blocks.items():
            for key, value in values.items():
                sub[block][key] = value
        target = str(sub.get("logger", {}).get("_target_") or "")
        if target.endswith("WandbLogger"):  # one W&B run per stage, grouped by this reproduce run
            sub.logger.group = sub.logger.get("group") or Path(cfg.paths.output_dir).name
            sub.logger.name = name
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    OmegaConf.save(sub, Path(out_dir) / "config.yaml", resolve=False)
    return sub
