"""The stages of ``task=reproduce``: experts, distilled sets, coresets (each a sub-task run in
its own cached folder through ``run_task``) and the one-protocol evaluation of every set."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from datamodules.trajectories import ExpertStore
from lightning_modules.condense.dsa import make_dsa
from lightning_modules.condense.experts import RECIPE_KEYS
from lightning_modules.errors import UserError
from lightning_modules.tasks.common import (
    finish_wandb,
    finite_metrics,
    net_options,
    run_task,
    write_json,
)
from lightning_modules.tasks.reproduce import start_window
from lightning_modules.tasks.reproduce.config import (
    CORESET_KEYS,
    MATCHING,
    SCALE_KNOBS,
    SOFT_LABEL_METHODS,
    _block,
    _canonical,
    _digest,
    _stage,
    derive,
)
from lightning_modules.utils.files import file_digest

log = logging.getLogger(__name__)


def run_stage(sub: DictConfig, out_dir: Path) -> dict:
    """Run the sub-task ``sub.task.name`` in ``out_dir`` (its own W&B run, its own summary)."""
    try:
        metrics = finite_metrics(run_task(sub.task.name, sub, out_dir))
    finally:
        finish_wandb()
    write_json(Path(out_dir) / "summary.json", {"task": sub.task.name, **metrics})
    return metrics


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


def _dotted_diff(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _dotted_diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a} -> {b}"]


def ensure_experts(cfg: DictConfig, workdir: Path) -> dict:
    """Stage 1: experts 0..n-1 in the store (trained by task=teacher when missing)."""
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
        try:
            run_stage(derive(cfg, "teacher", out_dir, "teacher"), out_dir)
        except UserError as e:
            raise UserError(
                f"{e} (task=reproduce: reproduce.experts_dir=<folder> uses another store)"
            ) from None
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
    t = cfg.teacher
    want = {key: t[key] for key in RECIPE_KEYS if key not in ("epochs", "dsa_strategy")}
    want["dsa_strategy"] = t.dsa_strategy if make_dsa(t.dsa_strategy if t.dsa else None) else ""
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


def _common_key(cfg: DictConfig) -> dict:
    return {
        "seed": int(cfg.seed),
        "ipc": int(cfg.ipc),
        "dataset": _block(cfg, "dataset"),
        "net": _block(cfg, "net"),
    }


def distill_stage(cfg: DictConfig, method: str, workdir: Path, experts: dict) -> Stage:
    """The cached stage of one distillation (``pruning`` with reproduce.eps, ``mtt`` with ε = 0)."""
    block = _block(cfg, "distill")
    block["eps"] = _method_eps(cfg, method)
    key = {**_common_key(cfg), "distill": block, "experts": experts["identity"]}
    return Stage(workdir, method, key)


def _method_eps(cfg: DictConfig, method: str) -> float:
    return float(cfg.reproduce.eps) if method == "pruning" else 0.0


def distilled_set(cfg: DictConfig, method: str, workdir: Path, experts: dict) -> tuple[Stage, bool]:
    """Stage 2: one distillation (``pruning`` with reproduce.eps, ``mtt`` with ε = 0)."""
    eps = _method_eps(cfg, method)
    stage = distill_stage(cfg, method, workdir, experts)
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
    stage.finish(run_stage(sub, stage.dir))
    return stage, False


def matching_stage(cfg: DictConfig, method: str, workdir: Path) -> tuple[Stage, DictConfig]:
    """The cached stage of a DC / DSA / DM / CAFE / KIP distillation and its sub-task config."""
    from lightning_modules.tasks.matching_settings import matching_stage_config

    sub_cfg = matching_stage_config(cfg, method, iterations=cfg.reproduce.get("iterations"))
    key = {
        **_common_key(cfg),
        "distill": _block(sub_cfg, "distill"),
        "method": OmegaConf.to_container(sub_cfg.method, resolve=True),
    }
    return Stage(workdir, method, key), sub_cfg


def matched_set(cfg: DictConfig, method: str, workdir: Path) -> tuple[Stage, bool]:
    """Stage 2: a DC / DSA / DM distillation (``task=distill method=<name>``) with the method's
    published row, in the row's pixel space (``dataset.zca`` as settled for every column)."""
    iterations = cfg.reproduce.get("iterations")
    stage, sub_cfg = matching_stage(cfg, method, workdir)
    if stage.done():
        log.info("%s distill method=%s: reused %s", _stage(2), method, stage.set_path)
        return stage, True
    resuming = stage.start() and (stage.dir / "checkpoints" / "last.ckpt").exists()
    log.info(
        "%s distill method=%s: %s%s iterations -> %s",
        _stage(2), method, "resuming, " if resuming else "",
        iterations if iterations is not None else "the published", stage.dir,
    )  # fmt: skip
    sub = derive(sub_cfg, "distill", stage.dir, method, resume=resuming)
    stage.finish(run_stage(sub, stage.dir))
    return stage, False


def soft_label_stage_config(cfg: DictConfig, method: str) -> DictConfig:
    """``cfg`` made into the config of a ``task=distill method=datm|pad`` stage: the method's keys
    from ``conf/method/<method>.yaml``, the MTT row settled into ``distill.*`` cleared so that the
    method's own published row fills them (``distill.preset=auto``), the scale knobs applied again
    on top, ``reproduce.method_keys.<method>`` over the method's keys, and ε = 0."""
    import copy

    from lightning_modules.tasks import settings
    from lightning_modules.tasks.matching_settings import CONF_DIR

    path = CONF_DIR / "method" / f"{method}.yaml"
    if not path.exists():
        raise UserError(
            f"reproduce column {method} distils with task=distill method={method}, which this "
            f"checkout lacks ({path} is missing)"
        )
    sub = copy.deepcopy(cfg)
    with open_dict(sub):
        sub.method = OmegaConf.load(path)
        for key, value in ((cfg.reproduce.get("method_keys") or {}).get(method) or {}).items():
            sub.method[key] = value
        for key in settings.PRESET_KEYS:
            sub.distill[key] = None
        for knob, target in SCALE_KNOBS.items():
            if target.startswith("distill.") and cfg.reproduce.get(knob) is not None:
                OmegaConf.update(sub, target, cfg.reproduce[knob], force_add=True)
        sub.distill.preset = "auto"
        sub.distill.eps = 0.0
    return sub


def soft_label_stage(
    cfg: DictConfig, method: str, workdir: Path, experts: dict
) -> tuple[Stage, DictConfig]:
    """The cached stage of a DATM / PAD distillation and its sub-task config."""
    sub = soft_label_stage_config(cfg, method)
    if experts:
        sub = start_window.fitted_to_experts(sub, experts["epochs"])
    key = {
        **_common_key(cfg),
        "distill": _block(sub, "distill"),
        "method": OmegaConf.to_container(sub.method, resolve=True),
        "experts": experts["identity"] if experts else None,
    }
    return Stage(workdir, method, key), sub


def soft_label_set(cfg: DictConfig, method: str, workdir: Path, experts: dict):
    """Stage 2: a DATM / PAD distillation (``task=distill method=<method>``) with its published
    row, from the row's experts. Returns ``(stage, reused)``."""
    stage, sub_cfg = soft_label_stage(cfg, method, workdir, experts)
    if stage.done():
        log.info("%s distill method=%s: reused %s", _stage(2), method, stage.set_path)
        return stage, True
    resuming = stage.start() and (stage.dir / "checkpoints" / "last.ckpt").exists()
    log.info(
        "%s distill method=%s: %s%d experts -> %s", _stage(2), method,
        "resuming, " if resuming else "", experts["num_experts"], stage.dir,
    )  # fmt: skip
    sub = derive(sub_cfg, "distill", stage.dir, method, resume=resuming)
    stage.finish(run_stage(sub, stage.dir))
    return stage, False


def coreset_stage(cfg: DictConfig, method: str, workdir: Path, experts: dict | None) -> Stage:
    """The cached stage of one coreset."""
    block = _block(cfg, "coreset")
    block["method"] = method
    key = {**_common_key(cfg), "coreset": {k: block[k] for k in CORESET_KEYS[method]}}
    if method == "herding":
        key["experts"] = experts["identity"][:1] if experts else None  # the first expert's features
    if method == "random":
        key.pop("net")  # the choice does not involve a network
    return Stage(workdir, method, key)


def coreset(cfg: DictConfig, method: str, workdir: Path, experts: dict) -> tuple[Stage, bool]:
    """Stage 3: one coreset (random, herding in an expert's features, forgetting)."""
    stage = coreset_stage(cfg, method, workdir, experts)
    if stage.done():
        log.info("%s coreset %s: reused %s", _stage(3), method, stage.set_path)
        return stage, True
    stage.start()
    log.info("%s coreset %s -> %s", _stage(3), method, stage.dir)
    sub = derive(cfg, "coreset", stage.dir, method, coreset={"method": method, "out": None})
    stage.finish(run_stage(sub, stage.dir))
    return stage, False


def set_stage(cfg: DictConfig, method: str, workdir: Path, experts: dict | None) -> Stage:
    """The cached stage that makes the set of column ``method`` (nothing is run)."""
    if method in ("pruning", "mtt"):
        return distill_stage(cfg, method, workdir, experts)
    if method in MATCHING:
        return matching_stage(cfg, method, workdir)[0]
    if method in SOFT_LABEL_METHODS:
        return soft_label_stage(cfg, method, workdir, experts)[0]
    return coreset_stage(cfg, method, workdir, experts)


def make_set(cfg: DictConfig, method: str, workdir: Path, experts: dict | None):
    """Stages 2-3 for one column: its set, reused when cached. Returns ``(stage, reused)``."""
    if method in ("pruning", "mtt"):
        return distilled_set(cfg, method, workdir, experts)
    if method in MATCHING:
        return matched_set(cfg, method, workdir)
    if method in SOFT_LABEL_METHODS:
        return soft_label_set(cfg, method, workdir, experts)
    return coreset(cfg, method, workdir, experts)


def evaluation_cache(
    cfg: DictConfig, column: str, set_path: Path | None, net: str, workdir: Path, labels=None
) -> tuple[Path, dict]:
    """Where the evaluation of one set (``None``: the train split) on ``net`` is cached, and the
    protocol that keys it: the set file's digest, the net and its options, the training recipe,
    and for a soft-label set which labels (``soft``/``hard``) it trained on."""
    e, r = cfg.evaluate, cfg.reproduce
    options = {cfg.net.name: net_options(cfg.net)}  # the experts' net, as configured
    epochs = int(e.epochs if column != "full" or r.full_epochs is None else r.full_epochs)
    protocol = {
        "set": file_digest(set_path) if set_path is not None else "full",
        "net": net,
        "options": options.get(net, {}),
        "epochs": epochs,
        "protocol": str(e.protocol),
        "num_eval": int(e.num_eval),
        "lr": e.lr,
        "batch_size": int(e.batch_size),
        "momentum": float(e.momentum),
        "weight_decay": float(e.weight_decay),
        "dsa_strategy": str(e.dsa_strategy),
        "seed": int(cfg.seed),
        "data": _block(cfg, "dataset"),
    }
    if labels is not None:
        protocol["labels"] = labels
        protocol["soft_temperature"] = float(e.get("soft_temperature", 1.0))
    folder = (workdir / "full") if set_path is None else Path(set_path).parent
    return folder / "eval" / f"{net}-{_digest(protocol)}.json", protocol


def cached_evaluation(cache: Path, protocol: dict) -> dict | None:
    """The result cached at ``cache`` when it was made with ``protocol``, else None."""
    try:
        saved = json.loads(Path(cache).read_text())
    except (OSError, ValueError):
        return None
    return saved["result"] if saved.get("key") == _canonical(protocol) else None


def evaluate_all(cfg: DictConfig, entries: dict, nets: list[str], workdir: Path) -> dict:
    """Stage 4: every set (and ``full``) on every net with one protocol, cached per file and net.

    ``entries`` maps a column (method or ``full``) to its set file or None for the train split.
    A set with learned soft labels (DATM, PAD) is evaluated twice, on its soft labels and on its
    hard labels, under the columns ``<column>_soft`` and ``<column>_hard`` (never mixed).
    Returns ``{column: {net: {"accs", "mean", "std", "lr", "epochs", "cached"}}}``.
    """
    from datamodules.syn_set import SyntheticSet

    results: dict = {}
    state: dict = {"dm": None}
    for column, set_path in entries.items():
        syn = SyntheticSet.load(set_path) if set_path is not None else None
        kinds = ["soft", "hard"] if syn is not None and syn.soft_labels is not None else [None]
        for kind in kinds:
            name = column if kind is None else f"{column}_{kind}"
            results[name] = {
                net: _evaluate_one(cfg, column, set_path, syn, net, workdir, kind, state)
                for net in nets
            }
    return results


def _evaluate_one(cfg, column, set_path, syn, net, workdir, kind, state) -> dict:
    """One set (or the train split) on one net, from the cache or trained now."""
    from lightning_modules.condense.evaluation import DEFAULT_LR, evaluate_set
    from lightning_modules.tasks.common import build_datamodule, require_images

    e = cfg.evaluate
    name = column if kind is None else f"{column} ({kind} labels)"
    cache, protocol = evaluation_cache(cfg, column, set_path, net, workdir, labels=kind)
    saved = cached_evaluation(cache, protocol)
    if saved is not None:
        log.info(
            "%s evaluate %s on %s: reused %.2f ± %.2f (%s)",
            _stage(4), name, net, saved["mean"], saved["std"], cache,
        )  # fmt: skip
        return {**saved, "cached": True}
    epochs = int(protocol["epochs"])
    if state["dm"] is None:
        dm = build_datamodule(cfg)
        require_images(dm, "reproduce")
        dm.prepare_data()
        dm.setup()
        state["dm"] = dm
    dm = state["dm"]
    if syn is None:
        images, labels, set_lr = dm.train_x, dm.train_y, None
    else:
        syn.check_against(dm)
        labels = syn.soft_labels if kind == "soft" else syn.labels
        images, set_lr = syn.images, syn.lr
    lr = float(e.lr) if e.lr is not None else (set_lr if set_lr is not None else DEFAULT_LR)
    log.info(
        "%s evaluate %s on %s: %d networks x %d epochs, lr %.4g, %d train / %d test images",
        _stage(4), name, net, int(e.num_eval), epochs, lr, len(images), len(dm.test_x),
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
        net_options={cfg.net.name: net_options(cfg.net)},  # the experts' net, as configured
        protocol=str(e.protocol),
        soft_temperature=float(e.get("soft_temperature", 1.0)),
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
    log.info("%s   %s on %s: %.2f ± %.2f", _stage(4), name, net, result["mean"], result["std"])
    return {**result, "cached": False}
