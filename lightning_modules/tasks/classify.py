"""``task=classify``: train ``net`` on the real train split, report test accuracy.

``resume=true`` restarts from ``checkpoints/last.ckpt`` (written after every epoch) with the
weights, optimiser, schedule and the loader's shuffle generator, so the resumed run ends at the
uninterrupted run's weights; a CSV logger keeps the rows written before the kill.

The trained net's penultimate layer (``net.embed`` behind the input map) is written as
``feature_extractor.pt2`` (format: ``lightning_modules/nets/feature_export.py``), the feature
network of ``task=ddpm``'s ConvNet-FID/KID.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from lightning_modules.classifier import ClassifierModule
from lightning_modules.nets.feature_export import export_feature_extractor
from lightning_modules.tasks.common import (
    ShuffleState,
    build_datamodule,
    build_logger,
    build_net,
    build_trainer,
    epoch_checkpoints,
    log_config,
    require_finite,
    require_images,
)


def _resume_point(cfg: DictConfig, last: Path) -> tuple[str | None, int | None]:
    """``(checkpoint path, its epoch)`` for ``resume=true``, else ``(None, None)``."""
    if not (cfg.resume and last.exists()):
        return None, None
    epoch = torch.load(last, map_location="cpu", weights_only=False).get("epoch")
    return str(last), epoch


def run(cfg: DictConfig, out_dir: Path) -> dict:
    t = cfg.task
    dm = build_datamodule(cfg)
    require_images(dm, "classify")
    dm.prepare_data()
    dm.setup()
    module = ClassifierModule(
        build_net(cfg.net, dm),
        num_classes=dm.num_classes,
        lr=t.lr,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        epochs=t.epochs,
        schedule=t.schedule,
    )
    ckpt_dir = out_dir / "checkpoints"
    ckpt_path, resume_epoch = _resume_point(cfg, ckpt_dir / "last.ckpt")
    logger = build_logger(cfg, resume_epoch=resume_epoch)
    log_config(logger, cfg)
    # one loader for the whole fit, its shuffle generator checkpointed (the datamodule's
    # train_dataloader() would start every fit, a resumed one too, from the seed)
    loader = dm.train_dataloader()
    callbacks = [epoch_checkpoints(ckpt_dir)]
    if getattr(loader, "generator", None) is not None:
        callbacks.append(ShuffleState(loader.generator))
    trainer = build_trainer(
        cfg,
        logger=logger,
        callbacks=callbacks,
        max_epochs=t.epochs,
        check_val_every_n_epoch=t.val_every,
    )
    trainer.fit(
        module,
        train_dataloaders=loader,
        val_dataloaders=dm.val_dataloader(),
        ckpt_path=ckpt_path,
    )
    result = trainer.test(module, datamodule=dm, verbose=False)[0]
    hint = f"lower task.lr (now {t.lr})"
    loss = torch.tensor(float(result["test/loss"]))
    require_finite("network's weights and test loss", [loss, *module.net.parameters()], hint)
    extra = {}
    if trainer.is_global_zero and hasattr(module.net, "embed"):
        # the penultimate layer as a file: task=ddpm's ConvNet-FID/KID (ddpm.feature_extractor)
        path = export_feature_extractor(
            module.net, dm.transform.state_dict(), out_dir / "feature_extractor.pt2", dm.data_shape
        )
        extra["feature_extractor"] = str(path)
    return {
        **extra,
        "test_acc": result["test/acc"],
        "test_loss": result["test/loss"],
        "epochs": t.epochs,
        "train_images": len(dm.train_x),
        "test_images": len(dm.test_x),
        "params": sum(p.numel() for p in module.net.parameters()),
    }
