"""DDPM training as a thin LightningModule over plain-torch pieces.

The maths lives in ``lightning_modules.diffusion`` (schedule, forward process, sampler) and the
optimisation in a *stepper* (``lightning_modules.diffusion.steppers``): adam / sgd, or the
tensor-train ALS / Riemannian steppers. Lightning owns the loop, devices, DDP, logging and
checkpoints; optimisation is manual because ALS and Riemannian steps are not ``loss.backward()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from lightning_modules.diffusion.schedules import NoiseSchedule
from lightning_modules.diffusion.steppers import Stepper
from lightning_modules.errors import UserError
from lightning_modules.utils.seeds import derive_seed


def ema_with_warmup(decay: float):
    """EMA update with decay min(decay, (1 + n) / (10 + n)) after n updates.

    A fixed 0.999 average of a short run is mostly the random initialisation; the warm-up
    lets the average follow the weights early and settle to ``decay`` later.
    """

    @torch.no_grad()
    def update(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        n = float(num_averaged)
        d = min(decay, (1 + n) / (10 + n))
        torch._foreach_lerp_(averaged, current, 1 - d)

    return update


class DDPMModule(L.LightningModule):
    """Trains ``eps_net`` with the simple DDPM loss through a stepper; samples on demand.

    Args:
        eps_net: ``eps_net(x_t, t)`` with ``t`` in ``0..T-1``.
        schedule: the β schedule (forward process and sampler).
        make_stepper: ``make_stepper(eps_net) -> Stepper``, called once the net is on its device.
        train_data: the whole training set in model space; a stepper that calls ``draw()`` more
            than once per step gets random batches of it after the loader's batch.
        ema_decay: keep an exponential moving average of the weights (None = off), with the
            warm-up of ``ema_with_warmup``; sampling then uses the average.
        seed: seeds this module's generators (offset by the DDP rank for training noise).
        describe: a short "what was run" string for error messages (optimizer and lr).
        on_epoch_end: ``f(module, epoch)`` called on rank zero after every training epoch.
        max_steps: stop after this many optimiser steps (None = the Trainer's ``max_epochs``).
            The module stops the fit itself rather than through the Trainer's ``max_steps``:
            Lightning resumes an iteration-based fit from an end-of-epoch checkpoint with one
            extra batch of the finished epoch, and a killed run would not end where the
            uninterrupted one does.
    """

    def __init__(
        self,
        eps_net: nn.Module,
        schedule: NoiseSchedule,
        make_stepper: Callable[[nn.Module], Stepper],
        *,
        train_data: Tensor,
        ema_decay: float | None = None,
        seed: int = 0,
        describe: str = "",
        on_epoch_end: Callable[[DDPMModule, int], None] | None = None,
        max_steps: int | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.eps_net = eps_net
        self.schedule = schedule
        self._make_stepper = make_stepper
        self.train_data = train_data
        self.seed = seed
        self.describe = describe
        self.on_epoch_end = on_epoch_end
        self.max_steps = max_steps
        self.ema: AveragedModel | None = None
        if ema_decay:
            if not 0 < ema_decay < 1:
                raise UserError(
                    f"ddpm.ema={ema_decay}: an EMA decay is in (0, 1), e.g. 0.999, or null for none"
                )
            self.ema = AveragedModel(
                eps_net, multi_avg_fn=ema_with_warmup(ema_decay), use_buffers=True
            )
            self.ema.requires_grad_(False)
        self.stepper: Stepper | None = None
        self.generator: torch.Generator | None = None
        self.loss_history: list[tuple[int, float]] = []
        self.steps_done = 0
        self._pending_state: dict | None = None

    # -- setup ---------------------------------------------------------------------------------
    def configure_optimizers(self):
        return None  # the stepper owns the optimiser (see module docstring)

    def on_fit_start(self) -> None:
        self.stepper = self._make_stepper(self.eps_net)
        self.generator = torch.Generator(device=self.device).manual_seed(
            derive_seed(self.seed, "ddpm_noise", self.global_rank)
        )
        self._data_generator = torch.Generator().manual_seed(
            derive_seed(self.seed, "ddpm_batches", self.global_rank)
        )
        if self._pending_state is not None:
            self._restore(self._pending_state)
            self._pending_state = None

    # -- training ------------------------------------------------------------------------------
    def _reduce_sum(self, x: Tensor) -> Tensor:
        if self.trainer.world_size <= 1:
            return x
        return self.trainer.strategy.reduce(x.clone(), reduce_op="sum")

    def _random_batch(self, n: int) -> Tensor:
        idx = torch.randint(0, len(self.train_data), (n,), generator=self._data_generator)
        return self.train_data[idx].to(self.device)

    def _budget_spent(self) -> bool:
        return self.max_steps is not None and self.steps_done >= self.max_steps

    def on_train_batch_start(self, batch, batch_idx):
        if self._budget_spent():  # a resumed run whose budget was already spent: no more steps
            self.trainer.should_stop = True
            return -1  # Lightning: skip the rest of this epoch
        return None

    def training_step(self, batch, batch_idx):
        x0 = batch[0] if isinstance(batch, (tuple, list)) else batch
        draws = 0

        def draw():
            nonlocal draws
            x = x0 if draws == 0 else self._random_batch(len(x0))
            draws += 1
            return self.schedule.training_triple(x, self.generator)

        out = self.stepper.step(draw, self._reduce_sum)
        loss = float(out["loss"])
        if not math.isfinite(loss):
            raise UserError(
                f"the training loss became {loss} at step {self.steps_done + 1} ({self.describe}); "
                "lower ddpm.lr, set ddpm.grad_clip, or check the data"
            )
        self.steps_done += 1
        self._count_optimizer_step()
        if self._budget_spent():
            self.trainer.should_stop = True  # ends this epoch after the step (all ranks alike)
        if self.ema is not None:
            self.ema.update_parameters(self.eps_net)
        self.loss_history.append((self.steps_done, loss))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(x0))
        for key, value in out.items():
            if key != "loss":
                self.log(
                    f"train/{key}", float(value), on_step=True, on_epoch=False, batch_size=len(x0)
                )

    def _count_optimizer_step(self) -> None:
        # steppers bypass Lightning's optimisers, so advance its step counter by hand: max_steps,
        # global_step and checkpointing all read it
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()

    def on_train_epoch_end(self) -> None:
        if self.on_epoch_end is not None and self.trainer.is_global_zero:
            self.on_epoch_end(self, self.current_epoch)

    # -- sampling ------------------------------------------------------------------------------
    @property
    def sampling_net(self) -> nn.Module:
        """The EMA weights when kept, else the trained weights."""
        return self.ema.module if self.ema is not None else self.eps_net

    @torch.no_grad()
    def sample(
        self, num_samples: int, data_shape: tuple[int, ...], generator: torch.Generator, **kwargs
    ):
        """``NoiseSchedule.sample`` with the sampling net in eval mode (dropout off)."""
        net = self.sampling_net
        was_training = net.training
        net.eval()
        try:
            return self.schedule.sample(
                net, num_samples, data_shape, generator, device=self.device, **kwargs
            )
        finally:
            net.train(was_training)

    # -- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = {"loss_history": self.loss_history, "steps_done": self.steps_done}
        if self.stepper is not None and hasattr(self.stepper, "state_dict"):
            state["stepper"] = self.stepper.state_dict()
        if self.generator is not None:
            # every rank draws its own noise: keep each rank's state, not rank zero's for all
            state["generator"] = self._per_rank(self.generator.get_state())
            state["data_generator"] = self._per_rank(self._data_generator.get_state())
        checkpoint["ddpm"] = state

    def _per_rank(self, state: Tensor) -> list[Tensor]:
        """``[state of rank 0, state of rank 1, ...]`` (called on every rank, like the hook)."""
        if self.trainer.world_size <= 1:
            return [state]
        return [s.cpu() for s in self.all_gather(state.to(self.device))]

    def _own(self, states):
        """This rank's state from ``_per_rank``'s list (an older checkpoint holds one state)."""
        if isinstance(states, (list, tuple)):
            return states[self.global_rank] if self.global_rank < len(states) else None
        return states

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # the stepper does not exist yet: restore once on_fit_start has built it
        self._pending_state = checkpoint.get("ddpm")

    def _restore(self, state: dict) -> None:
        self.loss_history = list(state.get("loss_history", []))
        self.steps_done = int(state.get("steps_done", 0))
        if "stepper" in state and hasattr(self.stepper, "load_state_dict"):
            self.stepper.load_state_dict(state["stepper"])
        if "generator" in state:
            noise, data = self._own(state["generator"]), self._own(state["data_generator"])
            if noise is not None:  # None: more ranks than saved; keep this rank's fresh seeds
                self.generator.set_state(noise.cpu())
                self._data_generator.set_state(data.cpu())
