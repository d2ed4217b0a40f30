"""Dataset condensation by gradient matching (DC, DSA) and by distribution matching (DM).

The LightningModule owns the synthetic images (its only trainable parameter) and does one
iteration of the method per training step with manual optimisation; the maths lives in
:mod:`lightning_modules.condense.gradient_matching` and
:mod:`lightning_modules.condense.distribution_matching`.

- ``dc`` / ``dsa`` (REFERENCE.md C): a freshly initialised network per iteration; ``outer_loop``
  times: one image step on the summed per-class gradient-matching loss (``dsa``: one siamese
  augmentation draw per class), then, except after the last, ``inner_loop`` epochs of network
  SGD on the synthetic set (``dsa``: per-sample augmentation).
- ``dm``: a freshly initialised, untrained network per iteration; one image step on the summed
  per-class squared distance of mean embeddings under a siamese draw per class.

One training step is one iteration, so ``global_step`` counts iterations (the set writer and
checkpoints key on it): the first ``outer_loop - 1`` image steps go through the plain torch
optimiser, the last through Lightning's. Everything random in iteration t on rank r (network
init, real batches, shuffles, augmentation) comes from one generator seeded by (seed, r, t), so
a resumed run continues exactly. Under DDP each rank draws its own network and real batches and
the image gradient of every image step is averaged over the ranks (as for MTT).
"""

from __future__ import annotations

import copy
import logging
import time

import lightning as L
import torch
from torch import nn

from lightning_modules.condense.distribution_matching import distribution_matching_loss
from lightning_modules.condense.evaluation import init_parameters
from lightning_modules.condense.gradient_matching import (
    gradient_matching_loss,
    train_network_on_set,
)
from lightning_modules.errors import UserError
from lightning_modules.utils.seeds import derive_seed

log = logging.getLogger(__name__)

METHODS = ("dc", "dsa", "dm")


class MatchingModule(L.LightningModule):
    """Learns a synthetic set by gradient matching (``dc``, ``dsa``) or distribution matching
    (``dm``).

    Args:
        net: the architecture; a fresh copy with fresh weights is drawn every iteration.
        images: initial synthetic images ``[K * ipc, C, H, W]``, class-major (labels
            ``0,..,0,1,..``).
        labels: their classes.
        real_images, real_labels: the real train split (model input space); not checkpointed.
        method: ``dc``, ``dsa`` or ``dm``.
        lr_img, momentum: SGD on the images.
        batch_real: real images per class per step (capped at the smallest class).
        outer_loop, inner_loop: DC/DSA loop counts.
        lr_net, batch_train: DC/DSA network SGD on the synthetic set (no momentum).
        dsa: a DSA object (siamese draws for ``dsa`` and ``dm``); ignored by ``dc``.
        batched: per-class gradients in one ``vmap`` pass (True), a loop (False) or ``"auto"``
            (vmap on CUDA, loop on CPU, where measured faster: benchmarks/bench_matching.py).
        class_chunk: classes per batched pass (memory bound); None = all.
        seed: base seed of the per-iteration generators.
    """

    def __init__(
        self,
        net: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        real_images: torch.Tensor,
        real_labels: torch.Tensor,
        *,
        method: str,
        lr_img: float,
        momentum: float = 0.5,
        batch_real: int = 256,
        outer_loop: int = 1,
        inner_loop: int = 0,
        lr_net: float = 0.01,
        batch_train: int = 256,
        dsa=None,
        batched: bool | str = "auto",
        class_chunk: int | None = None,
        max_bad_steps: int = 10,
        seed: int = 0,
    ):
        super().__init__()
        if method not in METHODS:
            raise UserError(f"method={method!r}; use one of {', '.join(METHODS)}")
        self.automatic_optimization = False
        self.method = method
        self.num_classes = int(labels.max()) + 1
        self.ipc = len(labels) // self.num_classes
        expected = torch.arange(self.num_classes).repeat_interleave(self.ipc)
        if len(labels) != self.num_classes * self.ipc or not torch.equal(labels.cpu(), expected):
            raise ValueError("synthetic labels must be class-major with the same ipc per class")
        self.lr_img, self.momentum = float(lr_img), float(momentum)
        self.batch_real, self.batch_train = int(batch_real), int(batch_train)
        self.outer_loop, self.inner_loop = int(outer_loop), int(inner_loop)
        self.lr_net = float(lr_net)
        self.dsa = None if method == "dc" else dsa
        self.batched, self.class_chunk = batched, class_chunk
        self.max_bad_steps, self.seed = int(max_bad_steps), int(seed)
        self._template = [net.cpu()]  # a list: Lightning neither moves nor checkpoints it
        self.images = nn.Parameter(images.detach().clone().float())
        self.register_buffer("labels", labels.detach().clone().long())
        self._real = (real_images, real_labels.long())
        self._class_index = [
            torch.nonzero(real_labels == c).flatten() for c in range(self.num_classes)
        ]
        counts = [len(i) for i in self._class_index]
        if min(counts) < 1:
            raise UserError(f"class {counts.index(min(counts))} has no real training images")
        self.per_class = min(self.batch_real, min(counts))
        self.bad_in_row = 0
        self.bad_total = 0
        self.floor_hits = 0  # no learned lr: kept for the shared summary

    # -- optimiser ------------------------------------------------------------------------------
    def configure_optimizers(self):
        return torch.optim.SGD([self.images], lr=self.lr_img, momentum=self.momentum)

    def on_fit_start(self) -> None:
        x, y = self._real
        self._real = (x.to(self.device), y.to(self.device))
        self._class_index = [i.to(self.device) for i in self._class_index]

    # -- pieces of one iteration ----------------------------------------------------------------
    def iteration_generator(self, iteration: int, rank: int) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.seed, self.method, rank, iteration))

    def fresh_net(self, generator: torch.Generator) -> nn.Module:
        net = init_parameters(copy.deepcopy(self._template[0]), generator)
        return net.to(self.device).train()

    def real_batches(self, generator: torch.Generator) -> torch.Tensor:
        """``[K, B, C, H, W]``: ``B`` distinct random real images of every class."""
        x = self._real[0]
        rows = []
        for idx in self._class_index:
            pick = torch.randperm(len(idx), generator=generator)[: self.per_class]
            rows.append(idx[pick.to(idx.device)])
        return x[torch.stack(rows)]

    def synthetic_by_class(self) -> torch.Tensor:
        return self.images.view(self.num_classes, self.ipc, *self.images.shape[1:])

    def _batched(self) -> bool:
        if self.batched == "auto":
            return self.images.device.type == "cuda"
        return bool(self.batched)

    def matching_loss(self, net: nn.Module, generator: torch.Generator) -> torch.Tensor:
        """The method's loss for one image step, differentiable in the images."""
        real, syn = self.real_batches(generator), self.synthetic_by_class()
        if self.method == "dm":
            return distribution_matching_loss(
                net.embed, real, syn, dsa=self.dsa, generator=generator, chunk=self.class_chunk
            )
        return gradient_matching_loss(
            net,
            dict(net.named_parameters()),
            real,
            syn,
            dsa=self.dsa,
            generator=generator,
            batched=self._batched(),
            chunk_size=self.class_chunk,
        )

    # -- one iteration --------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        tic = time.perf_counter()
        opt = self.optimizers()
        iteration = int(batch["iteration"])
        g = self.iteration_generator(iteration, self.global_rank)
        net = self.fresh_net(g)
        if self.method == "dm":
            net.requires_grad_(False)
            steps = 1
        else:
            steps = self.outer_loop
            net_opt = torch.optim.SGD(net.parameters(), lr=self.lr_net)
        losses, norms = [], []
        for step in range(steps):
            loss = self.matching_loss(net, g)
            ok, mean_loss, grad_norm = self._image_step(opt, loss, last=step == steps - 1)
            losses.append(mean_loss)
            norms.append(grad_norm)
            if not ok:
                break
            if step < steps - 1 and self.inner_loop > 0:
                train_network_on_set(
                    net,
                    net_opt,
                    self.images,
                    self.labels,
                    epochs=self.inner_loop,
                    batch_size=self.batch_train,
                    augment=self._augment_per_sample if self.dsa is not None else None,
                    generator=g,
                )
        if not ok and step < steps - 1:
            opt.step()  # count the iteration (no gradient: the images do not move)
        if self.bad_in_row >= self.max_bad_steps:
            raise UserError(
                f"{self.bad_in_row} non-finite {self.method} losses in a row (last at iteration "
                f"{iteration}); lower distill.lr_img or check the data"
            )
        mean_loss = sum(losses) / len(losses)
        metrics = {
            "distill/loss": mean_loss,
            "distill/loss_per_class": mean_loss / self.num_classes,
            "distill/grad_norm_images": norms[-1],
            "distill/iteration_s": time.perf_counter() - tic,
            "distill/skipped_total": float(self.bad_total),
        }
        self.log_dict(metrics, on_step=True, on_epoch=False)
        self.log_dict({"loss": mean_loss}, prog_bar=True, logger=False)
        return {"loss": torch.tensor(mean_loss)}

    def _augment_per_sample(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.dsa(x, generator)

    def _image_step(self, opt, loss: torch.Tensor, last: bool) -> tuple[bool, float, float]:
        """One SGD step on the images with the rank-averaged gradient; skipped if not finite."""
        finite = bool(torch.isfinite(loss))
        grad = torch.autograd.grad(loss, self.images)[0] if finite else None
        if grad is None:
            grad = torch.full_like(self.images, float("nan"))
        packed = torch.cat([grad.reshape(-1), loss.detach().reshape(1)])
        if self.trainer.world_size > 1:
            packed = self.trainer.strategy.reduce(packed, reduce_op="mean")
        grad, mean_loss = packed[:-1].view_as(self.images), float(packed[-1])
        ok = bool(torch.isfinite(packed).all())
        if ok:
            self.images.grad = grad
            self.bad_in_row = 0
        else:
            self.images.grad = None
            self.bad_in_row += 1
            self.bad_total += 1
            log.warning("non-finite %s loss or gradient; image step skipped", self.method)
        # the last step of an iteration goes through Lightning (it counts global_step)
        (opt if last else opt.optimizer).step()
        opt.zero_grad(set_to_none=True)
        return ok, mean_loss, float(grad.norm()) if ok else float("nan")

    # -- state ----------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["distill_guards"] = {"bad_in_row": self.bad_in_row, "bad_total": self.bad_total}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        guards = checkpoint.get("distill_guards", {})
        self.bad_in_row = int(guards.get("bad_in_row", 0))
        self.bad_total = int(guards.get("bad_total", 0))

    def synthetic(self) -> tuple[torch.Tensor, torch.Tensor, None]:
        """The current set: ``(images, labels, None)`` (no learned lr) detached on the CPU."""
        return self.images.detach().cpu().clone(), self.labels.cpu().clone(), None
