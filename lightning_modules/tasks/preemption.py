"""A checkpoint at submitit's pre-timeout / preemption signal, for the Trainer tasks (classify,
distill, ddpm) run as a one-process submitit job (``hydra/launcher=slurm|local``).

submitit handles that signal (USR2, ``signal_delay_s`` before the time limit) by requeueing the job
and exiting at once, in the middle of whatever step is running: the work since the last periodic
checkpoint would be redone. :class:`SaveAtRequeueSignal` holds the signal until the running
training step ends, writes ``checkpoints/last.ckpt`` there (what a requeued job continues from),
then calls submitit's own handler unchanged, which requeues and exits. The signal is never lost:
outside ``fit`` (before it, after it, during ``test``) submitit's handler is the one installed,
and a signal that arrives after the last training step is handed over at teardown.

Lightning's own SLURM auto-requeue (``SLURMEnvironment``, SIGUSR1, ``hpc_ckpt_*.ckpt``) is left
alone: submitit does not send SIGUSR1, so under submitit it never fires and nothing competes.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import lightning as L

log = logging.getLogger(__name__)


def in_submitit_job() -> bool:
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def requeue_signal() -> signal.Signals:
    """The signal submitit's job handler listens to (USR2 unless SUBMITIT_PREEMPT_SIGNAL says)."""
    from submitit import JobEnvironment

    return JobEnvironment._usr_sig()


class SaveAtRequeueSignal(L.Callback):
    """Save ``path`` at the end of the training step during which submitit's signal arrived, then
    let submitit requeue. One process only: the ranks of a multi-process job would have to agree
    on the step first (they keep submitit's handler: requeue without a checkpoint)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.signum = None  # the signal this callback holds while fit runs
        self.submitit_handler = None
        self.pending = None  # the held signal, until the step ends

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or trainer.world_size > 1 or not in_submitit_job():
            return
        signum = requeue_signal()
        handler = signal.getsignal(signum)
        if not callable(handler):  # submitit installed nothing: no requeue to prepare for
            return
        self.signum, self.submitit_handler, self.pending = signum, handler, None
        signal.signal(signum, self._hold)

    def _hold(self, signum, frame) -> None:
        if self.signum is None:  # reinstalled after fit (Lightning restores what it found)
            self.submitit_handler(signum, frame)
            return
        self.pending = signum  # no logging here: a signal handler must not take the log's lock

    def on_train_batch_end(self, trainer, *args) -> None:
        if self.pending is not None:
            self._save_and_requeue(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.pending is not None:
            self._save_and_requeue(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.pending is not None and not trainer.sanity_checking:
            self._save_and_requeue(trainer)

    def _save_and_requeue(self, trainer) -> None:
        trainer.save_checkpoint(self.path)
        log.warning(
            "saved %s at step %d (epoch %d) on the requeue signal; submitit requeues the job",
            self.path, trainer.global_step, trainer.current_epoch,
        )  # fmt: skip
        self._hand_over()

    def _hand_over(self) -> None:
        """Put submitit's handler back; run it on a signal still held (it requeues and exits)."""
        if self.signum is None:
            return
        signum, pending, handler = self.signum, self.pending, self.submitit_handler
        signal.signal(signum, handler)
        self.signum, self.pending = None, None
        if pending is not None:
            handler(pending, None)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._hand_over()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.submitit_handler is None:
            return
        signum = self.signum or requeue_signal()
        self._hand_over()  # a signal after the last step: requeue as submitit would have
        if signal.getsignal(signum) == self._hold:  # put back by Lightning's own teardown
            signal.signal(signum, self.submitit_handler)
