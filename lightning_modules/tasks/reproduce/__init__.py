"""``task=reproduce``: one command per paper table (Li et al. 2024; REFERENCE.md section A).

``python train.py task=reproduce dataset=cifar10 ipc=10`` makes what a Table I row needs, in order:

1. experts: ``task=teacher`` into the expert store (experts already there are skipped);
2. distillation with the paper's ε (``reproduce.eps``, 0.1) and with ε = 0 (MTT): ``task=distill``;
3. Random / Herding / Forgetting coresets: ``task=coreset``;
4. evaluation of every set (and with ``reproduce.full=true`` the whole train split) with one
   protocol: the same networks, epochs and ``num_eval`` for all (``evaluate_set``);
5. the row, measured beside the published numbers: printed, ``row.md`` / ``row.json`` in the run
   dir, and in ``summary.json``; the sets' PNG grids are copied to ``<run dir>/sets/``.

``table=cross_arch`` does Table III instead: the CIFAR-10 IPC 10 sets distilled with ε and with
ε = 0, each evaluated on ConvNet, AlexNet, VGG11 and ResNet18.

Every sub-task runs in-process on a config derived from this one, in its own folder of the work
dir (``reproduce.workdir``, default ``<runs_dir>/reproduce_cache/<dataset>-ipc<ipc>[-zca]-<hash>``,
the hash over the net, the data subset and the seed) with its own ``summary.json``. A stage's
``stage.json`` records the settings that made it: a rerun reuses a finished stage whose settings
match, recomputes one whose settings changed (saying which), and continues a killed distillation
from its last checkpoint; evaluations are cached per set file, network and protocol. So a killed
``task=reproduce`` run, started again with the same command, continues from where it stopped.

The ``reproduce.*`` scale knobs (experts, expert_epochs, iterations, syn_steps, max_start_epoch,
eval_epochs, num_eval) are written into the sub-tasks' own keys (``teacher.num_experts``, ...);
``null`` leaves those keys as they are, i.e. the published settings. With few expert epochs,
``distill.max_start_epoch`` is capped to what the experts hold (logged).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from datamodules.trajectories import ExpertStore, default_store_dir
from lightning_modules.tasks.reproduce import paper_numbers
from lightning_modules.errors import UserError
from lightning_modules.tasks.common import finite_metrics, write_json

log = logging.getLogger(__name__)

METHODS = ("random", "forgetting", "herding", "mtt", "pruning")
CORESETS = ("random", "forgetting", "herding")
TABLES = ("row", "cross_arch")
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


# -- configuration ------------------------------------------------------------------------------
def settle(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` with the scale knobs written into the sub-task keys and the distillation
    preset applied (which also fixes ``dataset.zca`` for every stage), interpolations kept."""
    from lightning_modules.tasks import distill as distill_task

    r = cfg.reproduce
    eps = float(r.eps)
    if not 0 < eps < 1:
        raise UserError(
            f"reproduce.eps={r.eps} must be in (0, 1); the ε = 0 column (MTT) is always run"
        )
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
        explicit = None  # dataset.zca follows the published row unless given on the command line
        if r.get("zca") is not None:
            cfg.dataset.zca = bool(r.zca)
            explicit = (distill_task.command_line_keys() or set()) | {"dataset.zca"}
        resolved = distill_task.resolve_settings(cfg, explicit)
        for key in distill_task.PRESET_KEYS + ("iterations",):
            cfg.distill[key] = resolved.distill[key]
        cfg.dataset.zca = bool(resolved.dataset.zca)
        cfg.distill.preset = "none"  # applied once, here: every stage sees exactly these values
    for key in ("num_experts", "epochs"):
        if int(cfg.teacher[key]) < 1:
            raise UserError(f"teacher.{key} (reproduce scale) must be at least 1")
    if int(cfg.evaluate.num_eval) < 1 or int(cfg.evaluate.epochs) < 1:
        raise UserError("reproduce.num_eval and reproduce.eval_epochs must be at least 1")
    return cfg


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
        raise UserError(f"table={table!r}; use row (Table I) or cross_arch (Table III)")
    return table


def chosen_methods(cfg: DictConfig, table: str) -> list[str]:
    if table == "cross_arch":
        return ["mtt", "pruning"]
    methods = cfg.reproduce.methods
    methods = [methods] if isinstance(methods, str) else list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(
            f"reproduce.methods={methods}: choose from {', '.join(METHODS)} "
            "(pruning = distillation with reproduce.eps, mtt = ε 0)"
        )
    return [m for m in METHODS if m in methods]  # table order


def chosen_nets(cfg: DictConfig, table: str) -> list[str]:
    from lightning_modules.condense.evaluation import check_net_names

    nets = cfg.reproduce.nets
    if nets is None:
        nets = list(paper_numbers.CROSS_ARCH_NETS) if table == "cross_arch" else [cfg.net.name]
    return check_net_names(list(nets) if not isinstance(nets, str) else [nets])


def net_options(cfg: DictConfig) -> dict:
    """The options of ``net`` without name and target (what evaluation passes to the builder)."""
    options = OmegaConf.to_container(cfg.net, resolve=True)
    options.pop("_target_", None)
    options.pop("name", None)
    return options


def _digest(payload, n: int = 8) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _block(cfg: DictConfig, name: str) -> dict:
    block = OmegaConf.to_container(cfg[name], resolve=True)
    for key in _OPERATIONAL.get(name, ()):
        block.pop(key, None)
    return block


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


def finish_wandb() -> None:
    """Close a sub-task's W&B run so that the next stage gets its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def _dotted_diff(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _dotted_diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a} -> {b}"]


def _canonical(payload) -> dict:
    return json.loads(json.dumps(payload, sort_keys=True, default=str))


class Stage:
    """One cached step in the work dir: its folder, the settings that made it, whether it ended.

    ``stage.json`` holds ``{"key": settings, "done": bool, "metrics": {...}}``.
    """

    def __init__(self, workdir: Path, name: str, key: dict):
        self.name = name
        self.dir = Path(workdir) / name
        self.key = _canonical(key)
        self.record = self.dir / "stage.json"

    @property
    def set_path(self) -> Path:
        return self.dir / "set.pt"

    def saved(self) -> dict | None:
        try:
            return json.loads(self.record.read_text())
        except (OSError, ValueError):
            return None

    def done(self) -> bool:
        saved = self.saved()
        return bool(
            saved and saved.get("key") == self.key and saved.get("done") and self.set_path.exists()
        )

    def start(self) -> bool:
        """Prepare the folder; True when an unfinished run with the same settings is there."""
        saved = self.saved()
        if saved is not None and saved.get("key") != self.key:
            changed = _dotted_diff(saved.get("key"), self.key)
            log.info(
                "%s: settings changed since the cached run in %s (%s); recomputing",
                self.name, self.dir, "; ".join(changed[:4]) + (" ..." if len(changed) > 4 else ""),
            )  # fmt: skip
            shutil.rmtree(self.dir)
            saved = None
        elif saved is None and self.dir.exists():
            shutil.rmtree(self.dir)  # a folder without a record is debris of an older layout
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.record, {"key": self.key, "done": False})
        return saved is not None

    def finish(self, metrics: dict) -> None:
        write_json(self.record, {"key": self.key, "done": True, "metrics": metrics})

    def metrics(self) -> dict:
        return (self.saved() or {}).get("metrics", {})


# -- stages ---------------------------------------------------------------------------------------
def ensure_experts(cfg: DictConfig, workdir: Path) -> dict:
    """Stage 1: experts 0..n-1 in the store (trained by task=teacher when missing)."""
    from lightning_modules.tasks import teacher as teacher_task

    store = ExpertStore(cfg.teacher.out)
    n = int(cfg.teacher.num_experts)
    missing = [i for i in range(n) if not store.exists(i)]
    if not missing:
        log.info("%s experts: %d in %s, reused", _stage(1), n, store.root)
    else:
        log.info(
            "%s experts: training %d of %d (%d epochs each) into %s",
            _stage(1), len(missing), n, int(cfg.teacher.epochs), store.root,
        )  # fmt: skip
        out_dir = workdir / "teacher"
        sub = derive(cfg, "teacher", out_dir, "teacher")
        try:
            metrics = teacher_task.run(sub, out_dir)
        except UserError as e:
            raise UserError(
                f"{e} (task=reproduce: reproduce.experts_dir=<folder> uses another store)"
            ) from None
        finally:
            finish_wandb()
        write_json(out_dir / "summary.json", {"task": "teacher", **finite_metrics(metrics)})
        missing = [i for i in range(n) if not store.exists(i)]
        if missing:
            raise UserError(
                f"experts {missing} of {store.root} are being trained by another process; "
                "run task=reproduce again when it has finished"
            )
    experts = [store.load(i) for i in range(n)]
    check_recipe(cfg, store, experts)
    return {
        "store": str(store.root),
        "num_experts": n,
        "epochs": min(e.epochs for e in experts),
        "final_test_acc": [float(e.meta["test_acc"][-1]) for e in experts],
        # what identifies the trajectories (a cache key: other experts, other sets)
        "identity": [
            [e.meta.get("seed"), e.epochs, round(float(e.meta["test_acc"][-1]), 4)] for e in experts
        ],
    }


def check_recipe(cfg: DictConfig, store: ExpertStore, experts: list) -> None:
    """Experts reused from the store must follow this run's teacher settings."""
    from lightning_modules.tasks.teacher import RECIPE_KEYS, make_augment

    t = cfg.teacher
    want = {key: t[key] for key in RECIPE_KEYS if key not in ("epochs", "dsa_strategy")}
    want["dsa_strategy"] = t.dsa_strategy if make_augment(t.dsa, t.dsa_strategy) else ""
    for expert in experts:
        for key, value in want.items():
            held = expert.meta.get(key)
            if held != value:
                raise UserError(
                    f"store {store.root} holds expert {expert.index} trained with {key}={held}, "
                    f"this run has teacher.{key}={value}; use the same setting or another store "
                    "(reproduce.experts_dir=<folder>)"
                )
        if expert.epochs < int(t.epochs):
            raise UserError(
                f"store {store.root} holds expert {expert.index} of {expert.epochs} epochs, this "
                f"run asks for {t.epochs} (reproduce.expert_epochs); use another store "
                "(reproduce.experts_dir=<folder>) or fewer epochs"
            )


def cap_start_epoch(cfg: DictConfig, expert_epochs_held: int) -> None:
    """Lower ``distill.max_start_epoch`` to what experts of ``expert_epochs_held`` epochs allow."""
    d = cfg.distill
    highest = expert_epochs_held - int(d.expert_epochs) + 1
    if highest < 1:
        raise UserError(
            f"the experts hold {expert_epochs_held} epochs but distill.expert_epochs="
            f"{d.expert_epochs}; raise reproduce.expert_epochs to at least {d.expert_epochs}"
        )
    if int(d.max_start_epoch) > highest:
        log.info(
            "distill.max_start_epoch capped from %d to %d: the experts hold %d epochs "
            "(reproduce.expert_epochs)",
            int(d.max_start_epoch), highest, expert_epochs_held,
        )  # fmt: skip
        with open_dict(cfg):
            d.max_start_epoch = highest


def _common_key(cfg: DictConfig) -> dict:
    return {
        "seed": int(cfg.seed),
        "ipc": int(cfg.ipc),
        "dataset": _block(cfg, "dataset"),
        "net": _block(cfg, "net"),
    }


def distilled_set(cfg: DictConfig, method: str, workdir: Path, experts: dict) -> tuple[Stage, bool]:
    """Stage 2: one distillation (``pruning`` with reproduce.eps, ``mtt`` with ε = 0)."""
    from lightning_modules.tasks import distill as distill_task

    eps = float(cfg.reproduce.eps) if method == "pruning" else 0.0
    block = _block(cfg, "distill")
    block["eps"] = eps
    key = {**_common_key(cfg), "distill": block, "experts": experts["identity"]}
    stage = Stage(workdir, method, key)
    what = f"distill eps={eps:g}" + (" (MTT)" if method == "mtt" else "")
    if stage.done():
        log.info("%s %s: reused %s", _stage(2), what, stage.set_path)
        return stage, True
    resuming = stage.start() and (stage.dir / "checkpoints" / "last.ckpt").exists()
    d = cfg.distill
    log.info(
        "%s %s: %s%d iterations, syn_steps=%d, expert_epochs=%d, max_start_epoch=%d, "
        "%d experts -> %s",
        _stage(2), what, "resuming, " if resuming else "", int(d.iterations), int(d.syn_steps),
        int(d.expert_epochs), int(d.max_start_epoch), experts["num_experts"], stage.dir,
    )  # fmt: skip
    sub = derive(cfg, "distill", stage.dir, method, distill={"eps": eps}, resume=resuming)
    try:
        metrics = distill_task.run(sub, stage.dir)
    finally:
        finish_wandb()
    metrics = finite_metrics(metrics)
    write_json(stage.dir / "summary.json", {"task": "distill", **metrics})
    stage.finish(metrics)
    return stage, False


def coreset(cfg: DictConfig, method: str, workdir: Path, experts: dict) -> tuple[Stage, bool]:
    """Stage 3: one coreset (random, herding in an expert's features, forgetting)."""
    from lightning_modules.tasks import coreset as coreset_task

    block = _block(cfg, "coreset")
    block["method"] = method
    key = {**_common_key(cfg), "coreset": {k: block[k] for k in CORESET_KEYS[method]}}
    if method == "herding":
        key["experts"] = experts["identity"][:1] if experts else None  # the first expert's features
    if method == "random":
        key.pop("net")  # the choice does not involve a network
    stage = Stage(workdir, method, key)
    if stage.done():
        log.info("%s coreset %s: reused %s", _stage(3), method, stage.set_path)
        return stage, True
    stage.start()
    log.info("%s coreset %s -> %s", _stage(3), method, stage.dir)
    sub = derive(cfg, "coreset", stage.dir, method, coreset={"method": method, "out": None})
    try:
        metrics = coreset_task.run(sub, stage.dir)
    finally:
        finish_wandb()
    metrics = finite_metrics(metrics)
    write_json(stage.dir / "summary.json", {"task": "coreset", **metrics})
    stage.finish(metrics)
    return stage, False


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def evaluate_all(cfg: DictConfig, entries: dict, nets: list[str], workdir: Path) -> dict:
    """Stage 4: every set (and ``full``) on every net with one protocol, cached per file and net.

    ``entries`` maps a column (method or ``full``) to its set file or None for the train split.
    Returns ``{column: {net: {"accs", "mean", "std", "lr", "epochs", "cached"}}}``.
    """
    from datamodules.syn_set import SyntheticSet
    from lightning_modules.condense.evaluation import evaluate_set
    from lightning_modules.tasks.common import build_datamodule, require_images
    from lightning_modules.tasks.evaluate import DEFAULT_LR

    e, r = cfg.evaluate, cfg.reproduce
    dm = None
    options = {cfg.net.name: net_options(cfg)}  # the experts' net, as configured
    results: dict = {}
    for column, set_path in entries.items():
        epochs = int(e.epochs if column != "full" or r.full_epochs is None else r.full_epochs)
        digest = _file_digest(set_path) if set_path is not None else "full"
        results[column] = {}
        for net in nets:
            protocol = {
                "set": digest,
                "net": net,
                "options": options.get(net, {}),
                "epochs": epochs,
                "num_eval": int(e.num_eval),
                "lr": e.lr,
                "batch_size": int(e.batch_size),
                "momentum": float(e.momentum),
                "weight_decay": float(e.weight_decay),
                "dsa_strategy": str(e.dsa_strategy),
                "seed": int(cfg.seed),
                "data": _block(cfg, "dataset"),
            }
            folder = (workdir / "full") if set_path is None else Path(set_path).parent
            cache = folder / "eval" / f"{net}-{_digest(protocol)}.json"
            if cache.exists():
                saved = json.loads(cache.read_text())
                if saved.get("key") == _canonical(protocol):
                    results[column][net] = {**saved["result"], "cached": True}
                    log.info(
                        "%s evaluate %s on %s: reused %.2f ± %.2f (%s)",
                        _stage(4), column, net, saved["result"]["mean"], saved["result"]["std"],
                        cache,
                    )  # fmt: skip
                    continue
            if dm is None:
                dm = build_datamodule(cfg)
                require_images(dm, "reproduce")
                dm.prepare_data()
                dm.setup()
            if set_path is None:
                images, labels, set_lr = dm.train_x, dm.train_y, None
            else:
                syn = SyntheticSet.load(set_path)
                syn.check_against(dm)
                images, labels, set_lr = syn.images, syn.labels, syn.lr
            lr = float(e.lr) if e.lr is not None else (set_lr if set_lr is not None else DEFAULT_LR)
            log.info(
                "%s evaluate %s on %s: %d networks x %d epochs, lr %.4g, %d train / %d test images",
                _stage(4), column, net, int(e.num_eval), epochs, lr, len(images), len(dm.test_x),
            )  # fmt: skip
            together = e.get("together", "auto")
            out = evaluate_set(
                images,
                labels,
                dm.test_x,
                dm.test_y,
                nets=[net],
                num_classes=dm.num_classes,
                lr=lr,
                num_eval=int(e.num_eval),
                epochs=epochs,
                batch_size=int(e.batch_size),
                momentum=float(e.momentum),
                weight_decay=float(e.weight_decay),
                dsa_strategy=str(e.dsa_strategy),
                seed=int(cfg.seed),
                device=e.get("device", "auto"),
                progress=bool(cfg.trainer.get("enable_progress_bar", True)),
                together=together if isinstance(together, bool) else str(together),
                eval_batch_size=int(e.get("eval_batch_size", 1000)),
                net_options=options,
            )[net]
            result = {
                "accs": [float(a) for a in out["accs"]],
                "mean": float(out["mean"]),
                "std": float(out["std"]),
                "lr": lr,
                "epochs": epochs,
                "seconds": float(out.get("seconds", 0.0)),
            }
            write_json(cache, {"key": _canonical(protocol), "result": result})
            results[column][net] = {**result, "cached": False}
            log.info(
                "%s   %s on %s: %.2f ± %.2f", _stage(4), column, net, result["mean"], result["std"]
            )
    return results


# -- the table ------------------------------------------------------------------------------------
def column_label(method: str, eps: float) -> str:
    return {
        "random": "Random",
        "forgetting": "Forgetting",
        "herding": "Herding",
        "mtt": "MTT (ε=0)",
        "pruning": f"pruning (ε={eps:g})",
        "full": "full dataset",
    }[method]


def _net_text(cfg: DictConfig) -> str:
    """``convnet`` plus the options that differ from conf/net/<name>.yaml."""
    name = str(cfg.net.name)
    default_file = Path(__file__).resolve().parents[2] / "conf" / "net" / f"{name}.yaml"
    defaults = OmegaConf.to_container(OmegaConf.load(default_file)) if default_file.exists() else {}
    changed = [f"{k}={v}" for k, v in net_options(cfg).items() if defaults.get(k) != v]
    return name + (f" ({', '.join(changed)})" if changed else "")


def _split_text(per_class) -> str:
    return f"{per_class} images/class" if per_class else "all images"


def scale(cfg: DictConfig, experts: dict | None) -> dict:
    """What was run, as a dict and as text (short for the table, long under it)."""
    d, e = cfg.distill, cfg.evaluate
    info = {
        "net": _net_text(cfg),
        "zca": bool(cfg.dataset.zca),
        "train": _split_text(cfg.dataset.get("train_per_class")),
        "test": _split_text(cfg.dataset.get("test_per_class")),
        "experts": experts["num_experts"] if experts else 0,
        "expert_epochs": experts["epochs"] if experts else 0,
        "iterations": int(d.iterations),
        "syn_steps": int(d.syn_steps),
        "max_start_epoch": int(d.max_start_epoch),
        "eval_epochs": int(e.epochs),
        "num_eval": int(e.num_eval),
    }
    info["short"] = (
        f"{info['net']}, {info['experts']} experts x {info['expert_epochs']} ep, "
        f"{info['iterations']} it x {info['syn_steps']} steps, eval {info['num_eval']} x "
        f"{info['eval_epochs']} ep"
        + (
            f", train {cfg.dataset.train_per_class}/class"
            if cfg.dataset.get("train_per_class")
            else ""
        )
    )
    info["long"] = (
        f"net {info['net']}; ZCA {'on' if info['zca'] else 'off'}; train split {info['train']}; "
        f"test split {info['test']}; {info['experts']} experts of {info['expert_epochs']} epochs; "
        f"distillation {info['iterations']} iterations, syn_steps {info['syn_steps']}, "
        f"expert_epochs {int(d.expert_epochs)}, max_start_epoch {info['max_start_epoch']}, "
        f"lr_img {d.lr_img:g}, lr_lr {d.lr_lr:g}, lr_teacher {d.lr_teacher:g}; evaluation "
        f"{info['num_eval']} networks x {info['eval_epochs']} epochs each, final epoch"
    )
    return info


def _cell(result: dict | None) -> str:
    return "—" if not result else f"{result['mean']:.1f} ± {result['std']:.1f}"


def _paper_cell(value) -> str:
    return "—" if value is None else f"{value:.1f}"


NOTE = (
    "Paper numbers: the best of several checkpoints chosen on the test set (MTT family), "
    "5000 iterations, up to 200 experts, 5 networks x 1000 epochs. Measured: the final set, "
    "accuracy after the last evaluation epoch, mean ± std over the networks."
)


def row_table(cfg, methods, nets, results, info, images) -> tuple[str, dict]:
    """Table I: methods as columns, the paper's line then one measured line per net."""
    eps = float(cfg.reproduce.eps)
    ds, ipc = str(cfg.dataset.name), int(cfg.ipc)
    paper = paper_numbers.table1(ds, ipc)
    columns = list(methods) + ["full"]
    head = f"Table I row: {ds} IPC {ipc}, test accuracy (%)"
    lines = [
        f"**{head}**",
        "",
        "| | " + " | ".join(column_label(c, eps) for c in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    if paper:
        lines.append(
            "| paper (ConvNet-3, Li et al. 2024 Table I) | "
            + " | ".join(_paper_cell(paper.get(c)) for c in columns)
            + " |"
        )
    for net in nets:
        cells = [_cell(results.get(c, {}).get(net)) for c in columns]
        label = f"measured here, {NET_LABELS.get(net, net)} (scale: {info['short']})"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"Scale: {info['long']}.", "", NOTE]
    if not paper:
        lines.append(f"The paper has no Table I numbers for {ds} IPC {ipc}.")
    if images:
        lines += ["", "Sets as images: " + ", ".join(f"[{m}]({p})" for m, p in images.items())]
    record = {
        "table": "row",
        "dataset": ds,
        "ipc": ipc,
        "eps": eps,
        "columns": columns,
        "labels": {c: column_label(c, eps) for c in columns},
        "paper": {"source": paper_numbers.SOURCE, "net": "convnet", "acc": paper},
        "measured": {"scale": info, "acc": results},
        "images": images,
    }
    return "\n".join(lines) + "\n", record


def cross_arch_table(cfg, methods, nets, results, info, images) -> tuple[str, dict]:
    """Table III: nets as columns; per method the paper's line and the measured line."""
    eps = float(cfg.reproduce.eps)
    ds, ipc = str(cfg.dataset.name), int(cfg.ipc)
    paper = paper_numbers.cross_arch(ds, ipc)
    head = f"Table III: cross-architecture, {ds} IPC {ipc}, test accuracy (%)"
    lines = [
        f"**{head}**",
        "",
        "| | " + " | ".join(NET_LABELS.get(n, n) for n in nets) + " |",
        "|---" * (len(nets) + 1) + "|",
    ]
    for method in reversed(methods):  # pruning first, as in the paper
        label = column_label(method, eps)
        if paper:
            cells = [_paper_cell(paper.get(method, {}).get(n)) for n in nets]
            lines.append(f"| {label}, paper | " + " | ".join(cells) + " |")
        cells = [_cell(results.get(method, {}).get(n)) for n in nets]
        lines.append(
            f"| {label}, measured here (scale: {info['short']}) | " + " | ".join(cells) + " |"
        )
    lines += ["", f"Scale: {info['long']}.", "", NOTE]
    if not paper:
        lines.append(
            f"The paper's Table III is CIFAR-10 IPC 10; no published numbers for {ds} IPC {ipc}."
        )
    if images:
        lines += ["", "Sets as images: " + ", ".join(f"[{m}]({p})" for m, p in images.items())]
    record = {
        "table": "cross_arch",
        "dataset": ds,
        "ipc": ipc,
        "eps": eps,
        "nets": nets,
        "paper": {"source": paper_numbers.SOURCE, "acc": paper},
        "measured": {"scale": info, "acc": results},
        "images": images,
    }
    return "\n".join(lines) + "\n", record


def comparison_png(sets: dict, titles: dict, path: Path) -> Path:
    """The sets side by side (a row per class, transform undone), titled with their accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from datamodules.syn_set import SyntheticSet

    grids = {m: SyntheticSet.load(p).grid().numpy() for m, p in sets.items()}
    widths = [g.shape[1] for g in grids.values()]
    height = max(g.shape[0] for g in grids.values())
    zoom = max(1, min(4, 400 // height))  # small sets are enlarged to be seen
    fig, axes = plt.subplots(
        1,
        len(grids),
        figsize=(max(3.0, sum(widths) * zoom / 100 + 0.6 * len(grids)), height * zoom / 100 + 0.7),
        gridspec_kw={"width_ratios": widths},
        squeeze=False,
    )
    for ax, (method, grid) in zip(axes[0], grids.items()):
        ax.imshow(grid, interpolation="nearest", cmap="gray" if grid.ndim == 2 else None)
        ax.set_title(titles[method], fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def log_table(cfg: DictConfig, record: dict, summary: dict, images: dict, out_dir: Path) -> None:
    """The measured means (and for W&B the table and the set images) to the configured logger."""
    from lightning_modules.tasks.common import build_logger

    logger = build_logger(cfg)
    if not logger:
        return
    from lightning.pytorch.loggers import WandbLogger

    logger.log_metrics({k: v for k, v in summary.items() if k.startswith("acc_")})
    if isinstance(logger, WandbLogger):
        rows = [
            [column, net, r["mean"], r["std"]]
            for column, by_net in record["measured"]["acc"].items()
            for net, r in by_net.items()
        ]
        logger.log_table(key="reproduce/measured", columns=["set", "net", "mean", "std"], data=rows)
        for method, path in images.items():
            logger.log_image(key=f"reproduce/{method}", images=[str(out_dir / path)])
    logger.save()
    logger.finalize("success")
    finish_wandb()


# -- the task -------------------------------------------------------------------------------------
def run(cfg: DictConfig, out_dir: Path) -> dict:
    out_dir = Path(out_dir)
    table = table_kind(cfg)
    check_one_device(cfg)
    methods = chosen_methods(cfg, table)
    nets = chosen_nets(cfg, table)
    cfg = settle(cfg)
    workdir = Path(cfg.reproduce.workdir) if cfg.reproduce.get("workdir") else default_workdir(cfg)
    store = expert_store_dir(cfg, workdir)
    with open_dict(cfg):
        cfg.teacher.out = str(store)
        cfg.distill.trajectories = str(store)
        cfg.coreset.store = str(store)
    log.info(
        "reproduce %s: %s ipc=%d (ZCA %s), methods %s, nets %s; work dir %s",
        "Table III (cross-architecture)" if table == "cross_arch" else "a Table I row",
        cfg.dataset.name, int(cfg.ipc), "on" if cfg.dataset.zca else "off", methods, nets, workdir,
    )  # fmt: skip
    workdir.mkdir(parents=True, exist_ok=True)
    needs_experts = any(m in ("mtt", "pruning", "herding") for m in methods)
    experts = ensure_experts(cfg, workdir) if needs_experts else None
    if experts is None:
        log.info("%s experts: not needed for %s", _stage(1), methods)
    if any(m in ("mtt", "pruning") for m in methods):
        cap_start_epoch(cfg, experts["epochs"])
    else:
        log.info("%s distillation: none in %s", _stage(2), methods)
    stages: dict[str, Stage] = {}
    reused: dict[str, bool] = {}
    for method in ("pruning", "mtt"):
        if method in methods:
            stages[method], reused[method] = distilled_set(cfg, method, workdir, experts)
    for method in CORESETS:
        if method in methods:
            stages[method], reused[method] = coreset(cfg, method, workdir, experts)
    if not any(m in CORESETS for m in methods):
        log.info("%s coresets: none in %s", _stage(3), methods)
    entries = {m: stages[m].set_path for m in methods}
    if cfg.reproduce.full:
        entries["full"] = None
    results = evaluate_all(cfg, entries, nets, workdir)

    log.info("%s table", _stage(5))
    images = {}
    for method in methods:
        png = stages[method].dir / "set.png"
        if png.exists():
            dest = out_dir / "sets" / f"{method}.png"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, dest)
            images[method] = str(dest.relative_to(out_dir))
    eps = float(cfg.reproduce.eps)
    titles = {
        m: column_label(m, eps) + "\n" + _cell(results[m].get(nets[0])).replace(" ± ", "±") + " %"
        for m in methods
    }
    compare = comparison_png(
        {m: stages[m].set_path for m in methods}, titles, out_dir / "sets" / "compare.png"
    )
    images = {"all sets": str(compare.relative_to(out_dir)), **images}
    info = scale(cfg, experts)
    make = cross_arch_table if table == "cross_arch" else row_table
    markdown, record = make(cfg, methods, nets, results, info, images)
    record["workdir"] = str(workdir)
    record["expert_store"] = str(store)
    record["stages"] = {
        m: {"dir": str(s.dir), "reused": reused[m], "metrics": s.metrics()}
        for m, s in stages.items()
    }
    if experts:
        record["experts"] = {k: v for k, v in experts.items() if k != "identity"}
    print("\n" + markdown, flush=True)
    _write_text(out_dir / "row.md", markdown)
    write_json(out_dir / "row.json", record)
    summary = {
        "table": table,
        "dataset": str(cfg.dataset.name),
        "ipc": int(cfg.ipc),
        "workdir": str(workdir),
        "row_md": markdown,
        "row": {  # row.json without the per-stage details
            "paper": record["paper"]["acc"],
            "measured": {
                column: {net: {"mean": r["mean"], "std": r["std"]} for net, r in by_net.items()}
                for column, by_net in results.items()
            },
            "scale": info["long"],
            "images": images,
        },
        "reused": reused,
    }
    first = nets[0]
    for column, by_net in results.items():
        for net, r in by_net.items():
            summary[f"acc_{column}_{net}" if len(nets) > 1 else f"acc_{column}"] = r["mean"]
    main = "pruning" if "pruning" in results else next(iter(results))
    summary["objective"] = results[main][first]["mean"]
    log_table(cfg, record, summary, images, out_dir)
    return summary
