"""Dataset distillation by trajectory matching with parameter pruning (MTT + Li et al. 2024).

The LightningModule owns the synthetic images and the learnable student lr α (its only
trainable parameters) and does one distillation iteration per training step with manual
optimisation; the maths lives in plain-torch modules:

- :func:`lightning_modules.condense.unroll.student_unroll`: J student steps from the expert's θ_i
  (``full`` or exact constant-memory ``recompute``), DSA on every step;
- :func:`~lightning_modules.condense.matching.selection_mask` /
  :func:`~lightning_modules.condense.matching.matching_loss`: the keep-mask (ε's signed ratios,
  PAD's depth and smallest-error cuts; no gradient) and the masked normalised matching loss.

The trajectory-matching family is one module with a policy: MTT (hard labels, eps=0), the seed
method (eps > 0), DATM (learned soft labels ``label_logits`` with their own SGD ``lr_y`` /
``momentum_y``, and no update when the loss exceeds ``threshold``; its start window lives in the
pair stream) and PAD (DATM + ``depth_ratio`` / ``loss_ratio``); every switch composes.

Under DDP each rank unrolls its own (expert, start epoch) pair; the image and α gradients
(and the logged loss and pruned fraction) are averaged across ranks with one all-reduce, so the
update equals a single-process step on the mean of the ranks' losses.
"""

from __future__ import annotations

import logging
import time

import lightning as L
import torch
from torch import nn

from lightning_modules.condense.matching import (
    check_eps,
    check_ratio,
    matching_loss,
    selection_mask,
)
from lightning_modules.condense.unroll import MODES, classifier_loss, student_unroll
from lightning_modules.errors import UserError
from lightning_modules.nets.functional import FlatParams
from lightning_modules.utils.seeds import derive_seed

log = logging.getLogger(__name__)


class DistillationModule(L.LightningModule):
    """Learns a synthetic set by matching expert trajectories, pruning hard-to-match parameters.

    Args:
        net: the student architecture (its own weights are never used: every call gets a flat
            parameter vector through ``functional_call``).
        images: initial synthetic images ``[N, C, H, W]`` (model input space).
        labels: their classes ``[N]`` (hard labels, fixed; what the set file's ``labels`` holds).
        lr_teacher: initial value of the learnable student lr α.
        lr_img / lr_lr: SGD step sizes of the images and of α (momentum ``momentum``).
        eps: pruning threshold ε in [0, 1); 0 is plain MTT.
        syn_steps: J, student steps per iteration.
        batch_syn: images per student step (None: all).
        unroll: ``full`` or ``recompute``.
        offload: ``recompute`` keeps its J parameter vectors in CPU memory, so GPU memory does
            not grow with ``syn_steps`` at all; ``"auto"``: when the images are on a GPU.
        dsa: a DSA object (``dsa(x, generator)``), or None for no augmentation.
        lr_floor: α is clamped to at least this after every update (logged when it acts).
        max_bad_steps: this many non-finite losses in a row stop the run.
        seed: base seed of the per-iteration unroll draws (mixed with rank and iteration).
        label_logits: ``[N, classes]`` initial learned soft labels (DATM/PAD), or None for hard
            labels. With them the student's loss is the soft cross-entropy against their softmax.
        lr_y / momentum_y: SGD of the label logits.
        threshold: no update of images, α and labels when the matching loss exceeds it (DATM);
            None: always update.
        depth_ratio / loss_ratio: PAD's parameter selection (drop the shallowest fraction / the
            smallest-error fraction of the parameters from the loss), in [0, 1).
    """

    def __init__(
        self,
        net: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        lr_teacher: float,
        lr_img: float,
        lr_lr: float,
        momentum: float = 0.5,
        eps: float = 0.1,
        syn_steps: int = 20,
        batch_syn: int | None = None,
        unroll: str = "full",
        offload: bool | str = "auto",
        dsa=None,
        lr_floor: float = 1e-6,
        max_bad_steps: int = 10,
        seed: int = 0,
        label_logits: torch.Tensor | None = None,
        lr_y: float = 0.0,
        momentum_y: float = 0.9,
        threshold: float | None = None,
        depth_ratio: float = 0.0,
        loss_ratio: float = 0.0,
    ):
        super().__init__()
        if unroll not in MODES:
            raise UserError(f"distill.unroll={unroll!r}; use one of {', '.join(MODES)}")
        self.automatic_optimization = False
        self.eps = check_eps(eps)
        self.syn_steps, self.batch_syn, self.unroll = int(syn_steps), batch_syn, unroll
        if offload not in (True, False, "auto"):
            raise UserError(f"distill.offload={offload!r}; use auto, true or false")
        self.offload = offload
        self.lr_img, self.lr_lr, self.momentum = float(lr_img), float(lr_lr), float(momentum)
        # the floor as float32 rounds it, so a clamped α compares equal to it, not below
        self.lr_floor = float(torch.tensor(float(lr_floor), dtype=torch.float32))
        self.max_bad_steps, self.seed = int(max_bad_steps), int(seed)
        self.net = net.requires_grad_(False)  # architecture only; frozen so DDP ignores it
        self.layout = FlatParams(net)
        self.loss_fn = classifier_loss(net, self.layout, soft=label_logits is not None)
        self.dsa = dsa
        self.images = nn.Parameter(images.detach().clone().float())
        self.syn_lr = nn.Parameter(torch.tensor(float(lr_teacher)))
        self.register_buffer("labels", labels.detach().clone().long())
        self.label_logits = None
        if label_logits is not None:
            if label_logits.shape[0] != len(images) or label_logits.dim() != 2:
                raise ValueError(f"label logits must be [N, classes], got {label_logits.shape}")
            self.label_logits = nn.Parameter(label_logits.detach().clone().float())
        self.lr_y, self.momentum_y = float(lr_y), float(momentum_y)
        self.threshold = None if threshold is None else float(threshold)
        self.depth_ratio = check_ratio("depth_ratio", depth_ratio)
        self.loss_ratio = check_ratio("loss_ratio", loss_ratio)
        # guard counters travel in checkpoints (on_save_checkpoint)
        self.bad_in_row = 0
        self.bad_total = 0
        self.floor_hits = 0
        self.threshold_skips = 0

    # -- optimiser ------------------------------------------------------------------------------
    def configure_optimizers(self):
        # one optimiser, a group per learned tensor: one step per iteration keeps
        # global_step = iteration
        groups = [
            {"params": [self.images], "lr": self.lr_img},
            {"params": [self.syn_lr], "lr": self.lr_lr},
        ]
        if self.label_logits is not None:
            groups.append(
                {"params": [self.label_logits], "lr": self.lr_y, "momentum": self.momentum_y}
            )
        return torch.optim.SGD(groups, lr=self.lr_img, momentum=self.momentum)

    def learned(self) -> list[nn.Parameter]:
        """The tensors one iteration updates: images, α, and the label logits when learned."""
        out = [self.images, self.syn_lr]
        return out + ([self.label_logits] if self.label_logits is not None else [])

    # -- one iteration --------------------------------------------------------------------------
    def unroll_generator(self, iteration: int, rank: int) -> torch.Generator:
        """The generator of iteration ``iteration`` on ``rank`` (batch permutations + DSA draws)."""
        return torch.Generator().manual_seed(derive_seed(self.seed, "unroll", rank, iteration))

    def match(self, start: torch.Tensor, target: torch.Tensor, generator: torch.Generator):
        """Unroll from ``start``; ``(loss, keep_mask)``, the loss differentiable in images and α."""
        augment = None
        if self.dsa is not None:
            dsa = self.dsa

            def augment(x, g):
                return dsa(x, g)

        end = student_unroll(
            self.loss_fn,
            start,
            self.images,
            self.labels if self.label_logits is None else self.label_logits,
            self.syn_lr,
            steps=self.syn_steps,
            batch_syn=self.batch_syn,
            augment=augment,
            generator=generator,
            mode=self.unroll,
            keep_on=self._keep_on(),
        )
        mask = selection_mask(
            end, target, eps=self.eps, depth_ratio=self.depth_ratio, loss_ratio=self.loss_ratio
        )
        return matching_loss(end, start, target, mask), mask

    def _keep_on(self) -> str | None:
        on_gpu = self.images.device.type == "cuda"
        return "cpu" if self.offload is True or (self.offload == "auto" and on_gpu) else None

    def training_step(self, batch, batch_idx):
        tic = time.perf_counter()
        opt = self.optimizers()
        iteration = int(batch["iteration"])
        generator = self.unroll_generator(iteration, self.global_rank)
        loss, mask = self.match(batch["start"], batch["target"], generator)
        finite = bool(torch.isfinite(loss))
        # every rank must take the same branch: skip if any rank's loss is not finite
        all_finite = (
            self._all_ranks(torch.tensor(1.0 if finite else 0.0, device=self.device), "min") > 0
        )
        params = self.learned()
        if all_finite:
            grads = torch.autograd.grad(loss, params)
        else:
            grads = [torch.zeros_like(p) for p in params]
        pruned = 1.0 - mask.float().mean()
        packed = torch.cat(
            [g.reshape(-1) for g in grads] + [loss.detach().reshape(1), pruned.reshape(1)]
        )
        packed = self._all_ranks(packed, "mean")  # one all-reduce: gradients and logged numbers
        grads, offset = [], 0
        for p in params:
            grads.append(packed[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        grad_images = grads[0]
        mean_loss, mean_pruned = packed[-2], packed[-1]
        ok = all_finite and bool(torch.isfinite(packed[:offset]).all())
        # DATM: a loss above the threshold updates nothing (the rank-mean, so ranks agree)
        over = ok and self.threshold is not None and float(mean_loss) > self.threshold
        if ok and not over:
            for p, g in zip(params, grads):
                p.grad = g
        else:
            for p in params:
                p.grad = None  # SGD skips params without a gradient (momentum untouched)
        if over:
            self.threshold_skips += 1
        if ok:
            self.bad_in_row = 0
        else:
            self.bad_in_row += 1
            self.bad_total += 1
            log.warning(
                "iteration %d: non-finite matching loss or gradient (%s); update skipped "
                "(%d in a row, %d in total)",
                iteration,
                float(mean_loss),
                self.bad_in_row,
                self.bad_total,
            )
        opt.step()  # with no gradient this changes nothing but still counts the iteration
        opt.zero_grad(set_to_none=True)
        floored = self._apply_lr_floor(iteration)
        if self.bad_in_row >= self.max_bad_steps:
            raise UserError(
                f"{self.bad_in_row} non-finite matching losses in a row (last at iteration "
                f"{iteration}); the images or α diverged: lower distill.lr_img / distill.lr_lr, "
                "or check the experts (distill.trajectories)"
            )
        metrics = {
            "distill/loss": float(mean_loss),
            "distill/pruned_fraction": float(mean_pruned),
            "distill/lr": float(self.syn_lr.detach()),
            "distill/start_epoch": float(batch["start_epoch"]),
            "distill/expert": float(batch["expert"]),
            "distill/grad_norm_images": float(grad_images.norm()) if ok else float("nan"),
            "distill/iteration_s": time.perf_counter() - tic,
            "distill/skipped_total": float(self.bad_total),
            "distill/lr_floor_hits": float(self.floor_hits),
        }
        if self.threshold is not None:
            metrics["distill/threshold_skips"] = float(self.threshold_skips)
        self.log_dict(metrics, on_step=True, on_epoch=False)
        shown = {"loss": metrics["distill/loss"], "pruned": metrics["distill/pruned_fraction"]}
        self.log_dict({**shown, "lr": metrics["distill/lr"]}, prog_bar=True, logger=False)
        return {"loss": mean_loss.detach(), "floored": floored}

    def _apply_lr_floor(self, iteration: int) -> bool:
        """Clamp α to ``lr_floor`` (MTT never clamps: α can go negative there)."""
        with torch.no_grad():
            value = float(self.syn_lr.detach())
            if value >= self.lr_floor:
                return False
            log.warning(
                "iteration %d: learned lr %.3g fell below distill.lr_floor=%g; clamped",
                iteration,
                value,
                self.lr_floor,
            )
            self.syn_lr.fill_(self.lr_floor)
            self.floor_hits += 1
            return True

    def _all_ranks(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        """Reduce over DDP ranks (identity on one process)."""
        if self.trainer.world_size <= 1:
            return tensor
        if op == "mean":
            return self.trainer.strategy.reduce(tensor, reduce_op="mean")
        out = tensor.clone()
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MIN)
        return out

    # -- state ----------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["distill_guards"] = {
            "bad_in_row": self.bad_in_row,
            "bad_total": self.bad_total,
            "floor_hits": self.floor_hits,
            "threshold_skips": self.threshold_skips,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        guards = checkpoint.get("distill_guards", {})
        self.bad_in_row = int(guards.get("bad_in_row", 0))
        self.bad_total = int(guards.get("bad_total", 0))
        self.floor_hits = int(guards.get("floor_hits", 0))
        self.threshold_skips = int(guards.get("threshold_skips", 0))

    def synthetic_soft_labels(self) -> torch.Tensor | None:
        """The learned label logits ``[N, classes]`` detached on the CPU (None: hard labels)."""
        return None if self.label_logits is None else self.label_logits.detach().cpu().clone()

    def synthetic(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The current set: ``(images, labels, lr)`` detached on the CPU."""
        return (
            self.images.detach().cpu().clone(),
            self.labels.cpu().clone(),
            float(self.syn_lr.detach()),
        )
