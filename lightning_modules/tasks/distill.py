"""``task=distill``: distil ``dataset`` into ``ipc`` images per class by trajectory matching with
parameter pruning (MTT + Li et al. 2024; REFERENCE.md section A).

``python train.py task=distill dataset=cifar100 ipc=50`` runs the published row of the MTT
hyperparameter table for that dataset and IPC (``conf/preset/mtt/<dataset>_ipc<ipc>.yaml``):
every ``distill.*`` key left ``null`` in ``conf/task/distill.yaml`` takes the row's value, and
``dataset.zca: null`` follows the row (:mod:`lightning_modules.tasks.settings`). Any key can
still be overridden.

Run directory: ``sets/iter_XXXXXX.pt`` (+ ``.png`` grid) at iteration 0 and every
``distill.eval_every`` iterations, ``set.pt`` / ``set.png`` at the end (SyntheticSet format),
``checkpoints/last.ckpt`` every ``distill.checkpoint_every`` iterations (``resume=true``
continues from it), ``distill_config.yaml`` (the settings after the preset), ``eval.md`` and
``summary.json`` (``final_acc``; the best intermediate accuracy is ``best_acc_chosen_on_test``).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from datamodules.expert_pairs import ExpertPairsDataModule
from datamodules.trajectories import ExpertStore, default_store_dir, teacher_command
from lightning_modules.condense.dsa import make_dsa
from lightning_modules.condense.evaluation import DEFAULT_LR
from lightning_modules.distillation import DistillationModule
from lightning_modules.errors import UserError
from lightning_modules.nets.functional import FlatParams
from lightning_modules.tasks.common import (
    build_datamodule,
    build_logger,
    build_net,
    build_trainer,
    log_config,
    log_images,
    net_options,
    process_rank,
    require_finite,
    require_images,
)
from lightning_modules.tasks.matching_settings import (
    TRAJECTORY_METHODS,
    batched_value,
    method_name,
    method_options,
    resolve_matching_settings,
)
from lightning_modules.tasks.settings import batch_syn_value, offload_value
from lightning_modules.tasks.trajectory_family import (
    correct_images,
    initial_label_logits,
    label_experts,
    net_logits,
    policy_options,
    resolve_trajectory_settings,
    window_options,
)
from lightning_modules.utils.files import atomic_path
from lightning_modules.utils.seeds import derive_seed

log = logging.getLogger(__name__)


def expert_store(cfg: DictConfig) -> ExpertStore:
    """``distill.trajectories`` or the teacher's default store for this dataset, ZCA and net."""
    d = cfg.distill
    root = d.trajectories or default_store_dir(
        cfg.dataset.name, bool(cfg.dataset.zca), cfg.net.name
    )
    return ExpertStore(root)


def check_store(cfg: DictConfig, store: ExpertStore, num_params: int) -> None:
    """One-line errors for a missing/empty store or experts of another net, dataset or ZCA."""
    zca = bool(cfg.dataset.zca)
    if not store.indices():
        cmd = teacher_command(cfg.dataset.name, zca, cfg.net.name, store.root)
        raise UserError(
            f"no expert trajectories in {store.root} (dataset={cfg.dataset.name}, dataset.zca="
            f"{str(zca).lower()}, net={cfg.net.name}); train them first with: {cmd} "
            f"teacher.num_experts=<n> (at least {needed_epochs(cfg.distill)} epochs each), or "
            "point distill.trajectories at a store"
        )
    store.check(net=net_options(cfg.net), dataset=cfg.dataset.name, zca=zca, num_params=num_params)


def needed_epochs(d: DictConfig) -> int:
    """Epochs of snapshots the experts need: the last start epoch plus expert_epochs."""
    return int(d.max_start_epoch) - 1 + int(d.expert_epochs)


def initial_images(cfg: DictConfig, dm) -> tuple[torch.Tensor, torch.Tensor]:
    """``ipc`` images per class: random real train images (``init=real``) or N(0, 1) noise."""
    ipc, k = int(cfg.ipc), dm.num_classes
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, "init"))
    labels = torch.arange(k).repeat_interleave(ipc)
    if cfg.distill.init == "noise":
        return torch.randn(k * ipc, dm.channels, dm.im_size, dm.im_size, generator=g), labels
    have = dm.images_per_class()
    if ipc > int(have.min()):
        c = int(have.argmin())
        subset = f" (dataset.train_per_class={dm.train_per_class})" if dm.train_per_class else ""
        raise UserError(
            f"ipc={ipc} but class {c} has only {int(have[c])} real training images"
            f"{subset}; "
            "lower ipc or use distill.init=noise"
        )
    return torch.cat([dm.real_images(c, ipc, generator=g) for c in range(k)]), labels


# -- artefacts ----------------------------------------------------------------------------------
class DistilledSetWriter(Callback):
    """Saves the set (+ PNG grid) at iteration 0 and every ``every`` iterations, evaluates it there
    and logs accuracy and grid; rank zero only, the other ranks wait at a barrier.

    A set file that already exists is not rewritten (a resumed run never writes a set twice).
    """

    def __init__(self, cfg: DictConfig, dm, out_dir: Path, every: int, iterations: int):
        self.cfg, self.dm, self.every, self.iterations = cfg, dm, int(every), int(iterations)
        self.dir = Path(out_dir) / "sets"
        self.history: list[dict] = []

    def make_set(self, module):
        from datamodules.syn_set import SyntheticSet

        images, labels, lr = module.synthetic()
        return SyntheticSet(
            images=images,
            labels=labels,
            lr=lr,
            transform=self.dm.transform.state_dict(),
            dataset=self.dm.name,
            ipc=int(self.cfg.ipc),
            method=set_method(self.cfg),
            config=OmegaConf.to_container(self.cfg, resolve=True),
            soft_labels=getattr(module, "synthetic_soft_labels", lambda: None)(),
        )

    def state_dict(self) -> dict:
        return {"history": list(self.history)}  # intermediate accuracies survive a resume

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_step == 0:
            self._snapshot(trainer, pl_module, 0, evaluate=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        t = trainer.global_step
        if self.every and t % self.every == 0 and t < self.iterations:
            self._snapshot(trainer, pl_module, t, evaluate=True)

    def _snapshot(self, trainer, module, t: int, evaluate: bool) -> None:
        if trainer.is_global_zero:
            path = self.dir / f"iter_{t:06d}.pt"
            if path.exists():
                log.info("set %s already written (resumed run); not rewritten", path)
            else:
                syn = self.make_set(module)
                syn.save(path)
                png = syn.save_grid(path.with_suffix(".png"), self.dm.num_classes)
                log_images(trainer.logger, "distill/images", png, t)
                if evaluate:
                    results = evaluate_distilled(self.cfg, self.dm, syn, module.device)
                    record = {"iteration": t, **summarise(results)}
                    self.history.append(record)
                    if trainer.logger:
                        metrics = {f"eval/{k}": v for k, v in record.items() if k != "iteration"}
                        trainer.logger.log_metrics(metrics, step=t)
                    log.info("iteration %d: %s", t, record)
        trainer.strategy.barrier()


def set_method(cfg: DictConfig) -> str:
    """The set file's ``method``: ``dc``/``dsa``/``dm``/``datm``/``pad`` (with any eps; the
    config says which), ``mtt`` (eps 0) or ``distill``."""
    name = method_name(cfg)
    if name != "mtt":
        return name
    return "mtt" if float(cfg.distill.eps) == 0 else "distill"


def evaluate_distilled(cfg: DictConfig, dm, syn, device) -> dict:
    """The set on ``distill.eval_nets``, the distillation net with its own options (``net.*``),
    under ``evaluate.protocol`` when the config has it (task=reproduce; ``+evaluate.protocol=``
    on a plain task=distill), else the evaluation's default (``mtt``)."""
    from lightning_modules.condense.evaluation import DEFAULT_PROTOCOL, evaluate_set

    d = cfg.distill
    return evaluate_set(
        syn.images,
        syn.labels,
        dm.test_x,
        dm.test_y,
        nets=list(d.eval_nets),
        num_classes=dm.num_classes,
        lr=DEFAULT_LR if syn.lr is None else float(syn.lr),  # DC/DSA/DM learn no lr
        num_eval=int(d.eval_num),
        epochs=int(d.eval_epochs),
        batch_size=int(d.eval_batch_size),
        dsa_strategy=d.dsa_strategy if d.dsa else "none",
        seed=int(cfg.seed),
        device=device,
        progress=bool(cfg.trainer.get("enable_progress_bar", True)),
        net_options={cfg.net.name: net_options(cfg.net)},
        protocol=str(OmegaConf.select(cfg, "evaluate.protocol", default=DEFAULT_PROTOCOL)),
    )


def summarise(results: dict) -> dict:
    """``acc_<net>`` / ``acc_<net>_std`` per net and ``acc`` (the first net's mean)."""
    out = {}
    for name, r in results.items():
        if name.startswith("_"):
            continue
        out.setdefault("acc", r["mean"])
        out[f"acc_{name}"], out[f"acc_{name}_std"] = r["mean"], r["std"]
    return out


# -- the task -----------------------------------------------------------------------------------
def run(cfg: DictConfig, out_dir: Path) -> dict:
    method = method_name(cfg)
    trajectory = method in TRAJECTORY_METHODS
    cfg = resolve_trajectory_settings(cfg) if trajectory else resolve_matching_settings(cfg)
    d = cfg.distill
    out_dir = Path(out_dir)
    dm = build_datamodule(cfg)
    require_images(dm, "distill")
    net = build_net(cfg.net, dm)  # channels, size and classes are known before loading the data
    build = build_mtt if trajectory else build_matching
    module, data = build(cfg, dm, net)
    write_config(cfg, out_dir / "distill_config.yaml")
    logger = build_logger(cfg)
    log_config(logger, cfg)
    ckpt_dir = out_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    writer = DistilledSetWriter(cfg, dm, out_dir, int(d.eval_every or 0), int(d.iterations))
    checkpoints = ModelCheckpoint(
        dirpath=ckpt_dir, every_n_train_steps=int(d.checkpoint_every), save_last=True, save_top_k=0
    )
    trainer = build_trainer(
        cfg,
        logger=logger,
        callbacks=[writer, checkpoints],
        max_steps=int(d.iterations),
        max_epochs=1,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    # the warning says checkpoints hold the state after the update: that is what resuming needs
    warnings.filterwarnings("ignore", message=".*manual optimization and every_n_train_steps.*")
    # the pair / iteration streams' __len__ is exact: they run in the main process (num_workers=0)
    warnings.filterwarnings("ignore", message=".*IterableDataset.*has `__len__` defined.*")
    resume_from = str(last) if cfg.resume and last.exists() else None
    if resume_from:
        done = finished_summary(last, out_dir, int(d.iterations))
        if done is not None:
            log.info("%s already finished all %d iterations; nothing to do", out_dir, d.iterations)
            return done
        log.info("resuming distillation from %s", resume_from)
    trainer.fit(module, datamodule=data, ckpt_path=resume_from)
    trainer.save_checkpoint(last)  # the finished state: a rerun with resume=true has nothing left
    if not trainer.is_global_zero:
        return {}
    return finish(cfg, dm, module, writer, out_dir, trainer, logger)


def build_mtt(cfg: DictConfig, dm, net):
    """Trajectory matching (MTT, DATM, PAD; + pruning): the module and its (expert, start
    epoch) pair stream."""
    d = cfg.distill
    layout = FlatParams(net)
    store = expert_store(cfg)
    check_store(cfg, store, layout.numel)  # before the data: a missing store fails in a second
    pairs = ExpertPairsDataModule(
        str(store.root),
        expert_epochs=int(d.expert_epochs),
        max_start_epoch=int(d.max_start_epoch),
        iterations=int(d.iterations),
        seed=int(cfg.seed),
        max_experts=d.max_experts,
        **window_options(cfg),
    )
    pairs.setup()
    dm.prepare_data()
    dm.setup()
    soft = method_name(cfg) != "mtt"
    experts = label_experts(cfg, pairs) if soft or d.init == "correct" else []
    logits_fn = net_logits(net, layout)
    if d.init == "correct":
        images, labels = correct_images(cfg, dm, logits_fn, experts)
    else:
        images, labels = initial_images(cfg, dm)
    label_logits = initial_label_logits(cfg, images, labels, logits_fn, experts) if soft else None
    if soft:
        agree = (label_logits.argmax(1) == labels).float().mean()
        log.info("initial soft labels: the expert logits pick the class of %.1f %%", 100 * agree)
    module = DistillationModule(
        net,
        images,
        labels,
        lr_teacher=float(d.lr_teacher),
        lr_img=float(d.lr_img),
        lr_lr=float(d.lr_lr),
        momentum=float(d.momentum),
        eps=float(d.eps),
        syn_steps=int(d.syn_steps),
        batch_syn=batch_syn_value(d.batch_syn),
        unroll=str(d.unroll),
        offload=offload_value(d.offload),
        dsa=make_dsa(d.dsa_strategy if d.dsa else None),
        lr_floor=float(d.lr_floor),
        max_bad_steps=int(d.max_bad_steps),
        seed=int(cfg.seed),
        label_logits=label_logits,
        **policy_options(cfg),
    )
    log.info(
        "distill %s ipc=%d (ZCA %s): %d experts in %s, %d iterations, syn_steps=%d, "
        "expert_epochs=%d, max_start_epoch=%d, eps=%g, unroll=%s",
        dm.name, cfg.ipc, "on" if dm.zca else "off", len(pairs.experts), store.root, d.iterations,
        d.syn_steps, d.expert_epochs, d.max_start_epoch, d.eps, d.unroll,
    )  # fmt: skip
    return module, pairs


def build_matching(cfg: DictConfig, dm, net):
    """DC / DSA / DM / CAFE / KIP: the module (it draws its networks and real batches itself)
    and the iteration stream."""
    from datamodules.iterations import IterationsDataModule
    from lightning_modules.set_matching import CAFE_DEFAULTS, KIP_DEFAULTS, MatchingModule

    d, m = cfg.distill, cfg.method
    dm.prepare_data()
    dm.setup()
    images, labels = initial_images(cfg, dm)
    loops = {}
    if m.name in ("dc", "dsa"):
        loops = dict(
            outer_loop=int(m.outer_loop),
            inner_loop=int(m.inner_loop),
            lr_net=float(m.lr_net),
            batch_train=int(m.batch_train),
            batched=batched_value(m.batched),
        )
    if m.name == "cafe":
        loops = dict(lr_net=float(m.lr_net), batch_train=int(m.batch_train))
        loops["cafe"] = method_options(m, CAFE_DEFAULTS)
    if m.name == "kip":
        loops = dict(kip=method_options(m, KIP_DEFAULTS))
    module = MatchingModule(
        net,
        images,
        labels,
        dm.train_x,
        dm.train_y,
        method=str(m.name),
        lr_img=float(d.lr_img),
        momentum=float(d.momentum),
        batch_real=int(m.batch_real),
        dsa=make_dsa(d.dsa_strategy if d.dsa else None),
        class_chunk=m.get("class_chunk"),
        max_bad_steps=int(d.max_bad_steps),
        seed=int(cfg.seed),
        **loops,
    )
    log.info(
        "distill %s ipc=%d with %s: %d iterations, lr_img=%g, %s",
        dm.name, cfg.ipc, m.name, d.iterations, d.lr_img,
        ", ".join(f"{k}={v}" for k, v in m.items() if k != "name"),
    )  # fmt: skip
    return module, IterationsDataModule(int(d.iterations))


def finished_summary(last: Path, out_dir: Path, iterations: int) -> dict | None:
    """The earlier summary when the checkpoint is at the end and the run wrote its results."""
    summary = out_dir / "summary.json"
    if not (summary.exists() and (out_dir / "set.pt").exists()):
        return None
    step = torch.load(last, map_location="cpu", weights_only=False, mmap=True).get("global_step", 0)
    if int(step) < iterations:
        return None
    previous = json.loads(summary.read_text())
    return {k: v for k, v in previous.items() if k not in ("task", "wall_s")}


def finish(cfg, dm, module, writer, out_dir: Path, trainer, logger) -> dict:
    """Final set, its evaluation, eval.md; the metrics for summary.json."""
    d = cfg.distill
    syn = writer.make_set(module)
    hint = f"lower distill.lr_img (now {d.lr_img}) or distill.lr_lr"
    require_finite("distilled images", [syn.images, torch.as_tensor(float(syn.lr or 0))], hint)
    syn.save(out_dir / "set.pt")
    png = syn.save_grid(out_dir / "set.png", dm.num_classes)
    log_images(logger, "distill/images", png, trainer.global_step)
    metrics = {
        "iterations": int(trainer.global_step),
        "learned_lr": syn.lr,
        "set": str(out_dir / "set.pt"),
        "method": syn.method,
        "skipped_updates": module.bad_total,
    }
    if method_name(cfg) in TRAJECTORY_METHODS:
        metrics.update(eps=float(d.eps), lr_floor_hits=module.floor_hits)
    if syn.soft_labels is not None:
        metrics["threshold_skips"] = module.threshold_skips
    if getattr(module, "soft_labels", None) is not None:  # KIP's learned labels, kept beside
        torch.save(module.soft_labels.detach().cpu(), out_dir / "learned_labels.pt")
        metrics["learned_labels"] = str(out_dir / "learned_labels.pt")
    last_logged = trainer.callback_metrics
    for key in ("distill/loss", "distill/pruned_fraction"):
        if key in last_logged:
            metrics[f"last_{key.split('/')[1]}"] = float(last_logged[key])
    if d.final_eval:
        from lightning_modules.condense.evaluation import results_markdown

        results = evaluate_distilled(cfg, dm, syn, module.device)
        final = summarise(results)
        metrics["final_acc"] = final["acc"]
        metrics.update({f"final_{k}": v for k, v in final.items() if k != "acc"})
        metrics["objective"] = final["acc"]
        chosen = [r["acc"] for r in writer.history] + [final["acc"]]
        # the MTT papers report the best checkpoint's accuracy, chosen on the test set
        metrics["best_acc_chosen_on_test"] = max(chosen)
        title = (
            f"{syn.method} {dm.name} ipc={cfg.ipc}, {metrics['iterations']} iterations (final set)"
        )
        (out_dir / "eval.md").write_text(results_markdown(results, title))
        if logger:
            logged = {f"eval/{k}": v for k, v in final.items()}
            # the sweep's metric (conf/sweep/distill_eps.yaml) is final_acc
            logged.update(
                final_acc=final["acc"], best_acc_chosen_on_test=metrics["best_acc_chosen_on_test"]
            )
            logger.log_metrics(logged, step=trainer.global_step)
    if logger:
        logger.finalize("success")
    return metrics


def write_config(cfg: DictConfig, path: Path) -> None:
    """The settings after the preset, from rank zero (the other DDP ranks share the run dir)."""
    if process_rank(cfg) == 0:
        with atomic_path(path) as tmp:
            OmegaConf.save(cfg, tmp, resolve=True)
