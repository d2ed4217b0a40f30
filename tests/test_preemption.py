"""The checkpoint at submitit's requeue signal (lightning_modules/tasks/preemption.py), with a
stand-in for submitit's handler: held until the step ends, saved, then handed over once."""

from __future__ import annotations

import os
import signal

import lightning as L
import torch

from lightning_modules.tasks.preemption import SaveAtRequeueSignal, requeue_signal


class Signalling(L.LightningModule):
    """A linear model that sends itself the requeue signal during training step 3."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.steps_seen = []

    def training_step(self, batch, batch_idx):
        self.steps_seen.append(self.global_step)
        if self.global_step == 3:
            os.kill(os.getpid(), requeue_signal())
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_signal_is_held_to_the_step_end_saved_then_handed_to_submitit(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    calls = []

    def submitit_handler(signum, frame):  # submitit's would requeue and exit here
        calls.append((signum, (tmp_path / "last.ckpt").exists()))

    signum = requeue_signal()
    before = signal.signal(signum, submitit_handler)
    try:
        data = torch.utils.data.TensorDataset(torch.randn(8, 2))
        trainer = L.Trainer(
            max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
            callbacks=[SaveAtRequeueSignal(tmp_path / "last.ckpt")],
        )  # fmt: skip
        module = Signalling()
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=1))
        assert calls == [(signum, True)]  # once, after the checkpoint was written
        saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
        assert saved["global_step"] == 4  # the end of the step the signal came in (step 3)
        assert signal.getsignal(signum) is submitit_handler  # submitit's handler is back
    finally:
        signal.signal(signum, before)


def test_outside_a_submitit_job_nothing_is_installed(tmp_path, monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    signum = requeue_signal()
    before = signal.getsignal(signum)
    callback = SaveAtRequeueSignal(tmp_path / "last.ckpt")
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False)
    callback.setup(trainer, None, "fit")
    assert signal.getsignal(signum) is before and callback.signum is None


def test_which_requeued_jobs_continue_in_place(compose, tmp_path, monkeypatch):
    """Every rank decides alike from its environment: one process from the run dir; the ranks of
    a multi-process job only in a requeued SLURM job (SLURM_RESTART_COUNT, set for every task)."""
    from omegaconf import OmegaConf, open_dict

    import train

    cfg = compose("task=classify", "trainer.devices=2", "trainer.strategy=ddp")
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    for key in ("SLURM_RESTART_COUNT", "SLURM_NTASKS", "LOCAL_RANK", "SUBMITIT_LOCAL_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    assert not train.requeued_in_place(cfg)  # nothing in the run dir yet
    OmegaConf.save(cfg, tmp_path / "config.yaml")
    assert not train.requeued_in_place(cfg)  # two ranks, first attempt: a fresh start
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert train.requeued_in_place(cfg)  # requeued: every rank continues
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "")
    assert not train.requeued_in_place(cfg)  # not a submitit job: resume=true is the way
    one = compose("task=classify")
    with open_dict(one):
        one.paths.output_dir = str(tmp_path / "one")
    (tmp_path / "one").mkdir()
    OmegaConf.save(one, tmp_path / "one" / "config.yaml")
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    assert train.requeued_in_place(one)  # one process: the run dir alone decides
