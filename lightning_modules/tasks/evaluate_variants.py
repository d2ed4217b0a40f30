"""What ``task=evaluate`` trains besides the set itself: its other label protocol and the
references of DD-Ranking's scores (``evaluate.labels``, ``evaluate.ddranking.*``).

Each *variant* is one training set under one protocol; every variant is trained with the same
networks (network ``k`` of every variant starts from the same seed), optimiser, schedule and
epochs as the set:

- ``set``: the set under its own protocol: its soft labels when it has them (and
  ``evaluate.labels`` is ``both`` or ``soft``), else its hard labels;
- ``set_hard``: a soft-label set again on its hard labels (``evaluate.labels=both``);
- ``random``: a random real subset of the same per-class size under the set's protocol (the IOR
  reference); for soft labels the subset is labelled by a teacher's logits
  (``evaluate.ddranking.teacher``: the mean logits of expert snapshots);
- ``set_noaug`` / ``random_noaug``: both without DSA (``evaluate.ddranking.ars=true``: ARS);
- ``full``: the whole train split on hard labels (the HLR reference), only when its accuracy is
  neither given (``evaluate.ddranking.full_acc``) nor cached from an earlier run
  (``evaluate.ddranking.full_cache``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from lightning_modules.condense.ddranking import mean_logits, random_subset_indices, round_scores
from lightning_modules.condense.evaluation import DEFAULT_LR, _fresh_net
from lightning_modules.errors import UserError
from lightning_modules.utils import files
from lightning_modules.utils.seeds import derive_seed

log = logging.getLogger(__name__)

LABELS = ("both", "soft", "hard")
#: dataset keys that change how data is read, not what it is (left out of the full-data cache key)
_OPERATIONAL = ("data_dir", "download", "cache_dir", "batch_size", "eval_batch_size", "_target_")


@dataclass
class Variant:
    """One training set under one protocol (see the module docstring)."""

    name: str
    kind: str  # "soft" | "hard": the labels it trains on
    images: torch.Tensor
    labels: torch.Tensor
    lr: float
    dsa_strategy: str
    num_eval: int
    epochs: int
    extra: dict = field(default_factory=dict)  # what else keys its cached parts

    @property
    def parts_dir(self) -> str:
        return "evaluate_parts" if self.name == "set" else f"evaluate_parts_{self.name}"


def own_kind(e: DictConfig, syn) -> str:
    """The set's own label protocol: ``soft`` for a set with soft labels (unless
    ``evaluate.labels=hard``), else ``hard``; ``UserError`` for ``soft`` on a hard-label set."""
    labels = str(e.get("labels", "both"))
    has_soft = syn is not None and syn.soft_labels is not None
    if labels == "soft" and not has_soft:
        what = "the full train split" if syn is None else f"set {syn.name} ({syn.method})"
        raise UserError(
            f"evaluate.labels=soft but {what} has no soft labels; use evaluate.labels=both or hard"
        )
    return "soft" if has_soft and labels != "hard" else "hard"


def ddranking_on(e: DictConfig, syn) -> bool:
    """DD-Ranking scores are for set files (not ``evaluate.set=full``) when enabled."""
    return syn is not None and bool((e.get("ddranking") or {}).get("enabled", True))


def _digest(payload) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def plan_variants(
    cfg: DictConfig, dm, syn, lr: float, nets: list[str], options: dict
) -> tuple[list, dict]:
    """The variants to train and the context the scores need (``full`` accuracies already known,
    where they come from). ``options``: each net's constructor options (the full-data accuracy
    is that of the same network). Everything is checked before anything trains."""
    e = cfg.evaluate
    kind = own_kind(e, syn)
    base = dict(lr=lr, dsa_strategy=str(e.dsa_strategy), num_eval=int(e.num_eval))
    base["epochs"] = int(e.epochs)
    if syn is None:
        images, labels = dm.train_x, dm.train_y
    else:
        images = syn.images
        labels = syn.soft_labels if kind == "soft" else syn.labels
    variants = [Variant("set", kind, images, labels, **base)]
    if kind == "soft" and str(e.get("labels", "both")) == "both":
        variants.append(Variant("set_hard", "hard", syn.images, syn.labels, **base))
    context = {"own": kind, "ddranking": ddranking_on(e, syn), "full": {}, "full_source": {}}
    context["options"] = options
    if not context["ddranking"]:
        return variants, context
    d = e.ddranking
    r_images, r_labels, r_info = random_set(cfg, dm, syn, kind)
    context["random"] = r_info
    variants.append(Variant("random", kind, r_images, r_labels, **base, extra=r_info))
    if bool(d.get("ars", False)):
        noaug = {**base, "dsa_strategy": "none"}
        variants.append(Variant("set_noaug", kind, images, labels, **noaug))
        variants.append(Variant("random_noaug", kind, r_images, r_labels, **noaug, extra=r_info))
    full_runs = []
    for net in nets:
        acc, source = known_full_acc(cfg, dm, net, options.get(net) or {})
        if acc is not None:
            context["full"][net], context["full_source"][net] = acc, source
        else:
            full_runs.append(net)
    if full_runs:
        fb = dict(lr=DEFAULT_LR, dsa_strategy=str(e.dsa_strategy), num_eval=int(d.full_num_eval))
        full = Variant("full", "hard", dm.train_x, dm.train_y, epochs=int(d.full_epochs), **fb)
        full.extra = {"nets": full_runs}
        variants.append(full)
    return variants, context


# -- the random reference ------------------------------------------------------------------------
def random_set(cfg: DictConfig, dm, syn, kind: str):
    """``(images, labels, info)`` of the random real subset: the set's per-class counts drawn
    from the train split with a generator seeded from ``seed``, or ``evaluate.ddranking.
    random_set`` (a set file of the same per-class counts); soft labels from the teacher."""
    from datamodules.syn_set import SyntheticSet

    d = cfg.evaluate.ddranking
    counts = torch.bincount(syn.labels, minlength=dm.num_classes)
    if d.get("random_set"):
        rnd = SyntheticSet.load(d.random_set)
        rnd.check_against(dm)
        theirs = torch.bincount(rnd.labels, minlength=dm.num_classes)
        if not torch.equal(theirs, counts):
            raise UserError(
                f"evaluate.ddranking.random_set {rnd.name} has {theirs.tolist()} images per "
                f"class, the set {counts.tolist()}; DD-Ranking compares sets of the same size"
            )
        images, hard, info = rnd.images, rnd.labels, {"random_set": str(d.random_set)}
    else:
        g = torch.Generator().manual_seed(derive_seed(int(cfg.seed), "ddranking-random"))
        try:
            idx = random_subset_indices(dm.train_y, counts, g)
        except ValueError as err:
            raise UserError(f"no random subset as large as the set: {err}") from None
        images, hard = dm.train_x[idx], dm.train_y[idx]
        info = {"random_set": "drawn", "seed": int(cfg.seed), "digest": _digest(idx.tolist())}
    if kind == "hard":
        return images, hard, info
    logits, teacher = teacher_logits(cfg, dm, syn, images)
    return images, logits, {**info, "teacher": teacher}


def teacher_store(cfg: DictConfig, syn) -> Path:
    """``evaluate.ddranking.teacher``, else the expert store the set was distilled from."""
    d = cfg.evaluate.ddranking
    given = d.get("teacher")
    recorded = (((syn.config if syn else None) or {}).get("distill") or {}).get("trajectories")
    path = given or recorded
    if not path or not Path(path).is_dir():
        raise UserError(
            "a soft-label set's IOR needs soft labels for the random subset: give "
            "evaluate.ddranking.teacher=<expert store> (a task=teacher folder; its experts' logits "
            f"label the subset){f', the recorded store {recorded} is absent' if recorded else ''}"
            ", or evaluate.ddranking.enabled=false"
        )
    return Path(path)


def teacher_logits(cfg: DictConfig, dm, syn, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Mean logits of ``images`` over the teacher experts at snapshot ``teacher_epoch``."""
    from datamodules.trajectories import ExpertStore
    from lightning_modules.nets.functional import FlatParams

    d = cfg.evaluate.ddranking
    store = ExpertStore(teacher_store(cfg, syn))
    indices = store.indices()
    if d.get("teacher_experts") is not None:
        indices = indices[: int(d.teacher_experts)]
    if not indices:
        raise UserError(f"no experts in {store.root} (evaluate.ddranking.teacher)")
    nets, epochs = [], []
    for i in indices:
        expert = store.load(i)
        meta = expert.meta
        if meta["dataset"] != dm.name or bool(meta["zca"]) != bool(getattr(dm, "zca", False)):
            raise UserError(
                f"teacher expert {store.path(i)} was trained on {meta['dataset']} (ZCA "
                f"{bool(meta['zca'])}); the set is {dm.name} (ZCA {bool(getattr(dm, 'zca', 0))})"
            )
        spec = dict(meta["net"]) if isinstance(meta["net"], dict) else {"name": meta["net"]}
        spec.pop("_target_", None)
        name = spec.pop("name")
        net = _fresh_net(
            name, dm.channels, dm.num_classes, dm.im_size, torch.Generator().manual_seed(0), **spec
        )
        epoch = expert.epochs if int(d.teacher_epoch) < 0 else int(d.teacher_epoch)
        FlatParams(net).load_into(net, expert.params(epoch).float())
        nets.append(net)
        epochs.append(epoch)
    logits = mean_logits(nets, images)
    info = {"store": str(store.root), "experts": indices, "epochs": sorted(set(epochs))}
    return logits, info


# -- the full-data reference ---------------------------------------------------------------------
def full_key(cfg: DictConfig, dm, net: str, options: dict) -> dict:
    """What a full-data accuracy depends on (the cache key)."""
    e, d = cfg.evaluate, cfg.evaluate.ddranking
    data = OmegaConf.to_container(cfg.dataset, resolve=True)
    for key in _OPERATIONAL:
        data.pop(key, None)
    return {
        "dataset": data,
        "train_images": len(dm.train_x),
        "net": net,
        "options": options,
        "epochs": int(d.full_epochs),
        "num_eval": int(d.full_num_eval),
        "lr": DEFAULT_LR,
        "protocol": str(e.protocol),
        "batch_size": int(e.batch_size),
        "momentum": float(e.momentum),
        "weight_decay": float(e.weight_decay),
        "dsa_strategy": str(e.dsa_strategy),
        "seed": int(cfg.seed),
    }


def full_cache_path(cfg: DictConfig, dm, net: str, options: dict) -> Path:
    zca = "-zca" if getattr(dm, "zca", False) else ""
    root = Path(cfg.evaluate.ddranking.full_cache)
    return root / f"{dm.name}{zca}" / f"{net}-{_digest(full_key(cfg, dm, net, options))}.json"


def known_full_acc(cfg: DictConfig, dm, net: str, options: dict) -> tuple[float | None, str | None]:
    """The full-data accuracy of ``net`` when given or cached: ``(acc %, source)``."""
    given = cfg.evaluate.ddranking.get("full_acc")
    if given is not None:
        if isinstance(given, (int, float)) and not isinstance(given, bool):
            return float(given), "evaluate.ddranking.full_acc"
        if OmegaConf.is_dict(given) or isinstance(given, dict):
            if net not in given:
                raise UserError(f"evaluate.ddranking.full_acc has no accuracy for {net}")
            return float(given[net]), f"evaluate.ddranking.full_acc.{net}"
        return _acc_from_results(Path(str(given)), net), str(given)
    path = full_cache_path(cfg, dm, net, options)
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None, None
    if saved.get("key") != json.loads(json.dumps(full_key(cfg, dm, net, options), default=str)):
        return None, None
    return float(saved["mean"]), str(path)


def _acc_from_results(path: Path, net: str) -> float:
    """``results.<net>.mean`` of the results.json of a ``task=evaluate evaluate.set=full`` run."""
    try:
        record = json.loads(path.read_text())
        return float(record["results"][net]["mean"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(
            f"evaluate.ddranking.full_acc={path}: give a number, {{net: number}}, or the "
            f"results.json of a task=evaluate evaluate.set=full run that evaluated {net}"
        ) from None


def store_full(cfg: DictConfig, dm, results: dict, context: dict) -> None:
    """Cache the full-data accuracies this run trained (rank zero) and put them in ``context``."""
    for net, r in results.items():
        options = context["options"].get(net) or {}
        path = full_cache_path(cfg, dm, net, options)
        key = full_key(cfg, dm, net, options)
        files.write_json(path, {"key": key, "mean": r["mean"], "std": r["std"], "accs": r["accs"]})
        context["full"][net], context["full_source"][net] = r["mean"], f"trained here ({path})"


# -- the scores ----------------------------------------------------------------------------------
def summarise(results: dict, context: dict, nets: list[str], e: DictConfig) -> tuple[dict, dict]:
    """``(summary keys, record)``: ``acc_soft``/``acc_hard`` per net and for the first net,
    and DD-Ranking's ``hlr``/``ior``/``lrs``/``ars`` the same way (None where not measured)."""
    own = context["own"]
    soft = results.get("set") if own == "soft" else None
    hard = results.get("set_hard") if own == "soft" else results.get("set")
    d = e.get("ddranking") or {}
    summary, record = {"label_protocol": own}, {"label_protocol": own, "nets": {}}
    for i, net in enumerate(nets):
        accs = {"acc_soft": soft[net] if soft else None, "acc_hard": hard[net] if hard else None}
        scores = {"hlr": None, "ior": None, "lrs": None, "ars": None}
        if context["ddranking"]:
            scores = round_scores(
                full_acc=context["full"].get(net),
                set_hard=hard[net]["accs"] if hard else None,
                set_own=results["set"][net]["accs"],
                random_own=results["random"][net]["accs"],
                set_noaug=_accs(results, "set_noaug", net),
                random_noaug=_accs(results, "random_noaug", net),
                lrs_weight=float(d.get("lrs_weight", 0.5)),
                ars_weight=float(d.get("ars_weight", 0.5)),
            )
        for key, r in {**accs, **scores}.items():
            summary[f"{key}_{net}_mean"] = r["mean"] if r else None
            summary[f"{key}_{net}_std"] = r["std"] if r else None
            if i == 0:
                summary[key] = r["mean"] if r else None
        record["nets"][net] = {
            **{k: _brief(r) for k, r in {**accs, **scores}.items()},
            "acc_random": _brief((results.get("random") or {}).get(net)),
            "acc_set_noaug": _brief((results.get("set_noaug") or {}).get(net)),
            "acc_random_noaug": _brief((results.get("random_noaug") or {}).get(net)),
            "acc_full": context["full"].get(net),
            "acc_full_source": context["full_source"].get(net),
        }
    if context["ddranking"]:
        record["random"] = context.get("random")
    return summary, record


def _accs(results: dict, variant: str, net: str):
    return results[variant][net]["accs"] if variant in results else None


def _brief(r: dict | None) -> dict | None:
    if not r:
        return None
    return {"mean": r["mean"], "std": r["std"], "runs": list(r.get("accs", r.get("runs", [])))}


def scores_markdown(record: dict) -> str:
    """Both label protocols and DD-Ranking's scores as one markdown table."""

    def cell(r, digits=2):
        return "—" if r is None else f"{r['mean']:.{digits}f} ± {r['std']:.{digits}f}"

    lines = [
        "",
        f"**Label protocols and DD-Ranking scores** (the set's own protocol: "
        f"{record['label_protocol']} labels; HLR/IOR in points, LRS/ARS in % of their range)",
        "",
        "| net | acc_soft (%) | acc_hard (%) | random, same protocol (%) | full data (%) "
        "| HLR ↓ | IOR ↑ | LRS ↑ | ARS ↑ |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for net, r in record["nets"].items():
        full = "—" if r["acc_full"] is None else f"{r['acc_full']:.2f}"
        lines.append(
            f"| {net} | {cell(r['acc_soft'])} | {cell(r['acc_hard'])} | {cell(r['acc_random'])} "
            f"| {full} | {cell(r['hlr'])} | {cell(r['ior'])} | {cell(r['lrs'])} "
            f"| {cell(r['ars'])} |"
        )
    return "\n".join(lines) + "\n"
