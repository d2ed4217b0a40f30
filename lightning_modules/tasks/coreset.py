"""``task=coreset``: random / herding / forgetting selection of ``ipc`` real images per class.

The chosen training images (in model input space, ZCA included) are written as a
``SyntheticSet`` with ``lr=None`` to ``coreset.out`` (default ``<run dir>/set.pt``), with a PNG
grid beside the run, so ``task=evaluate`` treats coresets and distilled sets alike.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from datamodules.syn_set import SyntheticSet
from datamodules.trajectories import ExpertStore, default_store_dir
from lightning_modules.condense.coresets import (
    ForgettingTracker,
    check_ipc,
    herding_per_class,
    most_forgotten_per_class,
    random_per_class,
)
from lightning_modules.condense.dsa import make_dsa
from lightning_modules.condense.experts import accuracy, build_seeded, embed, sgd_train
from lightning_modules.errors import UserError
from lightning_modules.nets.functional import FlatParams
from lightning_modules.tasks.common import (
    build_datamodule,
    build_logger,
    build_net,
    log_config,
    log_images,
    net_options,
    require_images,
    show_progress,
)
from lightning_modules.utils.devices import resolve_device
from lightning_modules.utils.seeds import derive_seed

log = logging.getLogger(__name__)


def run(cfg: DictConfig, out_dir: Path) -> dict:
    c = cfg.coreset  # method, features and counts: checked by the schema before the run
    dm = build_datamodule(cfg)
    require_images(dm, "coreset")
    dm.prepare_data()
    dm.setup()
    ipc = int(cfg.ipc)
    check_ipc(dm.train_y, ipc, dm.num_classes)  # before any training
    logger = build_logger(cfg)
    log_config(logger, cfg)
    generator = torch.Generator().manual_seed(derive_seed(cfg.seed, "coreset"))
    metrics: dict = {}
    if c.method == "random":
        chosen = random_per_class(dm.train_y, ipc, dm.num_classes, generator)
    elif c.method == "herding":
        net, metrics = feature_network(cfg, dm)
        chosen = herding_per_class(embed(net, dm.train_x), dm.train_y, ipc, dm.num_classes)
    else:
        scores, metrics = forgetting_run(cfg, dm)
        chosen = most_forgotten_per_class(
            scores, dm.train_y, ipc, dm.num_classes, generator, never_learned=c.never_learned
        )
    coreset = SyntheticSet(
        images=dm.train_x[chosen].clone(),
        labels=dm.train_y[chosen].clone(),
        lr=None,
        transform=dm.transform.state_dict(),
        dataset=dm.name,
        ipc=ipc,
        method=c.method,
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    set_path = Path(c.out) if c.out else out_dir / "set.pt"
    coreset.save(set_path)
    grid = coreset.save_grid(out_dir / "set.png", dm.num_classes)
    log_images(logger, "coreset", grid)
    if logger:
        logger.finalize("success")
    log.info("coreset %s ipc=%d: %d images -> %s", c.method, ipc, coreset.num_images, set_path)
    return {
        "set_path": str(set_path),
        "method": c.method,
        "ipc": ipc,
        "num_images": coreset.num_images,
        "train_images": len(dm.train_x),
        "grid": str(grid),
        **metrics,
    }


def _train(cfg: DictConfig, dm, epochs: int, purpose: str, on_batch=None):
    """A fresh ``net`` trained with the ``coreset`` optimiser settings, with a progress bar."""
    c = cfg.coreset
    if int(epochs) < 1:
        raise UserError(f"coreset {purpose} needs at least one epoch of training, got {epochs}")
    seed = derive_seed(cfg.seed, "coreset-net")
    device = resolve_device(cfg.trainer.get("accelerator", "auto"))
    net = build_seeded(lambda: build_net(cfg.net, dm), seed).to(device)
    steps = int(epochs) * -(-len(dm.train_x) // int(c.batch_size))
    with show_progress(cfg) as bar:
        job = bar.add_task(purpose, total=steps, status="")
        sgd_train(
            net,
            dm.train_x,
            dm.train_y,
            epochs=int(epochs),
            lr=float(c.lr),
            momentum=float(c.momentum),
            weight_decay=float(c.weight_decay),
            batch_size=int(c.batch_size),
            augment=make_dsa(c.dsa_strategy if c.dsa else None),
            shuffle_generator=torch.Generator().manual_seed(derive_seed(seed, "batches")),
            augment_generator=torch.Generator().manual_seed(derive_seed(seed, "dsa")),
            on_batch=on_batch,
            on_epoch=lambda e: bar.update(job, status=f"epoch {e}"),
            on_step=lambda: bar.advance(job),
        )
    return net


def feature_network(cfg: DictConfig, dm) -> tuple[torch.nn.Module, dict]:
    """The network whose ``embed`` herding uses: an expert's final snapshot, or one trained here."""
    c = cfg.coreset
    store = ExpertStore(
        c.store if c.store else default_store_dir(dm.name, bool(dm.zca), cfg.net.name)
    )
    net = build_net(cfg.net, dm)
    layout = FlatParams(net)
    if c.features == "expert" or (c.features == "auto" and store.indices()):
        try:
            store.check(
                net=net_options(cfg.net), dataset=dm.name, zca=bool(dm.zca), num_params=layout.numel
            )
        except UserError as e:
            hint = (
                ""
                if c.features == "expert"
                else " (or coreset.features=train to train a feature network)"
            )
            raise UserError(f"{e}{hint}") from None
        index = int(c.expert_index) if c.expert_index is not None else store.indices()[0]
        expert = store.load(index)
        layout.load_into(net, expert.params(expert.epochs))
        net = net.to(resolve_device(cfg.trainer.get("accelerator", "auto")))
        acc = accuracy(net, dm.test_x, dm.test_y)
        log.info(
            "herding in the features of expert %d (epoch %d) from %s",
            index,
            expert.epochs,
            store.root,
        )
        return net, {
            "feature_source": f"{store.path(index)}@epoch{expert.epochs}",
            "feature_net_test_acc": acc,
        }
    log.info(
        "no expert in %s: training a feature network for %d epochs", store.root, c.train_epochs
    )
    net = _train(cfg, dm, c.train_epochs, "feature network")
    acc = accuracy(net, dm.test_x, dm.test_y)
    return net, {
        "feature_source": f"trained {int(c.train_epochs)} epochs",
        "feature_net_test_acc": acc,
    }


def forgetting_run(cfg: DictConfig, dm) -> tuple[torch.Tensor, dict]:
    """Train for ``coreset.forgetting_epochs`` counting forgetting events; scores and stats."""
    tracker = ForgettingTracker(len(dm.train_x))

    def on_batch(indices, logits, labels):
        tracker.update(indices, logits.argmax(1) == labels)

    net = _train(cfg, dm, cfg.coreset.forgetting_epochs, "forgetting run", on_batch=on_batch)
    learned = tracker.learned
    return tracker.scores(), {
        "forgetting_net_test_acc": accuracy(net, dm.test_x, dm.test_y),
        "never_learned_fraction": float((~learned).float().mean()),
        "mean_forgetting_events": float(tracker.counts.float().mean()),
        "max_forgetting_events": int(tracker.counts.max()),
    }
