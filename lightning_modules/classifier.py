"""Supervised classification of real images: the full-dataset baseline."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy


class ClassifierModule(L.LightningModule):
    """Trains ``net`` with SGD and cross-entropy; logs loss and accuracy per split.

    Args:
        net: any classifier mapping images to logits.
        num_classes: for the accuracy metrics.
        epochs: length of the run, for the learning-rate schedule.
        schedule: ``cosine``, ``step`` (lr / 10 at half, the distillation evaluation protocol)
            or ``constant``.
        augment: optional differentiable batch augmentation applied to training batches.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        epochs: int = 30,
        schedule: str = "cosine",
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__()
        if schedule not in ("cosine", "step", "constant"):
            raise ValueError(f"unknown schedule {schedule!r}")
        self.save_hyperparameters(ignore=["net", "augment"])
        self.net = net
        self.augment = augment
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.augment is not None:
            x = self.augment(x)
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _eval_step(self, batch, split: str, metric: MulticlassAccuracy):
        x, y = batch
        logits = self.net(x)
        metric(logits, y)
        self.log(f"{split}/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log(f"{split}/acc", metric, prog_bar=True)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test", self.test_acc)

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
        )
        if hp.schedule == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, hp.epochs))
        elif hp.schedule == "step":
            sched = torch.optim.lr_scheduler.MultiStepLR(
                opt, milestones=[max(1, hp.epochs // 2)], gamma=0.1
            )
        else:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
