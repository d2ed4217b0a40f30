"""``task=classify``: train ``net`` on the real train split, report test accuracy."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from lightning_modules.classifier import ClassifierModule
from lightning_modules.tasks.common import (
    build_datamodule,
    build_logger,
    build_net,
    build_trainer,
    epoch_checkpoints,
    log_config,
    require_images,
)


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
    logger = build_logger(cfg)
    log_config(logger, cfg)
    ckpt_dir = out_dir / "checkpoints"
    trainer = build_trainer(
        cfg,
        logger=logger,
        callbacks=[epoch_checkpoints(ckpt_dir)],
        max_epochs=t.epochs,
        check_val_every_n_epoch=t.val_every,
    )
    last = ckpt_dir / "last.ckpt"
    trainer.fit(
        module, datamodule=dm, ckpt_path=str(last) if cfg.resume and last.exists() else None
    )
    result = trainer.test(module, datamodule=dm, verbose=False)[0]
    return {
        "test_acc": result["test/acc"],
        "test_loss": result["test/loss"],
        "epochs": t.epochs,
        "train_images": len(dm.train_x),
        "test_images": len(dm.test_x),
        "params": sum(p.numel() for p in module.net.parameters()),
    }
