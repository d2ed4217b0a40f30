"""Several processes (``trainer=ddp_cpu``: 2 ranks over gloo) and ``resume=true`` for every task.

Each DDP test runs ``train.py`` in a subprocess, as a user does (``strategy=ddp`` reruns the
command line for rank 1), and checks one run directory, one ``summary.json`` written by rank
zero, and its content against a single process. task=distill's DDP and kill/resume tests live
in tests/test_distill.py; classify's resume in tests/test_train.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from datamodules.trajectories import ExpertStore
from tests.conftest import ROOT, run_train
from tests.helpers import assert_close_scaled

QUIET = ["logger=csv", "trainer.enable_progress_bar=false"]


def data_args(tiny_data: Path) -> list[str]:
    return [f"dataset.data_dir={tiny_data}", "dataset.download=false"]


def only_run(runs: Path, task: str) -> Path:
    """The one run directory of ``task`` (each holds its config.yaml)."""
    dirs = sorted(p for p in (runs / task).iterdir() if (p / "config.yaml").exists())
    assert len(dirs) == 1, dirs
    assert len(list(runs.glob(f"{task}/**/summary.json"))) == 1
    return dirs[0]


def in_process(compose, tmp_path: Path, name: str, *overrides: str) -> tuple[dict, Path]:
    """The same config in this process, one rank, in its own run dir."""
    cfg = compose(*overrides)
    cfg.paths.output_dir = str(tmp_path / "single" / name)
    return train.run(cfg), Path(cfg.paths.output_dir)


def rank1_log(run_dir: Path) -> str:
    """Rank 1's log in the shared run dir (Lightning's launcher names its Hydra job so)."""
    (log,) = run_dir.glob("train_ddp_process_1.log")
    return log.read_text()


# -- one run, two ranks ---------------------------------------------------------------------------
@pytest.mark.slow
def test_classify_two_ranks(tiny_data, tmp_path):
    r = run_train(
        "task=classify",
        *data_args(tiny_data),
        "dataset.train_per_class=4",
        "net.width=8",
        "task.epochs=1",
        "trainer=ddp_cpu",
        *QUIET,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = only_run(tmp_path / "outputs", "classify")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train_images"] == 40 and summary["test_images"] == 50
    # the test accuracy is synced: rank 1 computed the very number rank 0 wrote
    logged = re.search(r"summary: .*'test_acc': ([0-9.e-]+)", rank1_log(run_dir))
    assert logged and float(logged.group(1)) == summary["test_acc"]
    assert len(list(run_dir.glob("**/metrics.csv"))) == 1  # one logger wrote
    assert (run_dir / "checkpoints" / "last.ckpt").exists()


@pytest.mark.slow
def test_teacher_splits_experts_across_ranks(tiny_data, tmp_path, compose):
    store = tmp_path / "store"
    args = [
        "task=teacher",
        *data_args(tiny_data),
        "dataset.train_per_class=4",
        "net.width=8",
        "net.depth=2",
        "teacher.epochs=2",
        "teacher.num_experts=3",
        f"teacher.out={store}",
    ]
    r = run_train(*args, "trainer=ddp_cpu", "logger=wandb", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = only_run(tmp_path / "outputs", "teacher")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["trained_by_rank"] == [[0, 2], [1]]
    assert summary["trained_indices"] == [0, 1, 2] and summary["experts_in_store"] == 3
    assert ExpertStore(store).indices() == [0, 1, 2]
    assert (run_dir / "expert_test_acc.png").stat().st_size > 0
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 1  # W&B from rank zero only
    # rank 1's expert is the one a single process trains for that index (seeded by index)
    in_process(
        compose,
        tmp_path,
        "teacher",
        *args[:-1],
        f"teacher.out={tmp_path / 'store1'}",
        "teacher.first_index=1",
        "teacher.num_experts=1",
        "logger=none",
    )
    assert_close_scaled(
        ExpertStore(store).load(1).snapshots,
        ExpertStore(tmp_path / "store1").load(1).snapshots,
        1e-5,
    )


def evaluate_args(tiny_data: Path) -> list[str]:
    return [
        "task=evaluate",
        "evaluate.set=full",
        *data_args(tiny_data),
        "dataset.train_per_class=4",
        "evaluate.nets=[convnet,alexnet]",
        "evaluate.num_eval=2",
        "evaluate.epochs=2",
        "evaluate.dsa_strategy=none",
        *QUIET,
    ]


@pytest.mark.slow
def test_evaluate_two_ranks_gives_the_single_process_table(tiny_data, tmp_path, compose):
    r = run_train(*evaluate_args(tiny_data), "trainer=ddp_cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = only_run(tmp_path / "outputs", "evaluate")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["networks_trained"] == 4
    assert len(list((run_dir / "evaluate_parts").glob("*.json"))) == 4
    assert json.loads((run_dir / "results.json").read_text())["ranks"] == 2
    single, _ = in_process(compose, tmp_path, "evaluate", *evaluate_args(tiny_data))
    assert summary["table"] == single["table"]
    assert summary["acc_alexnet_runs"] == single["acc_alexnet_runs"]
    assert (run_dir / "results.md").read_text() == single["table"]


DDPM = [
    "task=ddpm",
    "dataset=swiss_roll",
    "dataset.num_samples=600",
    "dataset.num_reference=200",
    "ddpm.timesteps=100",
    "ddpm.batch_size=64",
    "ddpm.sample_steps=20",
    "ddpm.sw_projections=200",
    *QUIET,
]
EPS_NETS = {
    "resnet": ["eps_net=resnet", "eps_net.width=16", "eps_net.depth=1"],
    "ftt_als": [
        "eps_net=ftt",
        "eps_net.rank=2",
        "eps_net.num_basis=6",
        "ddpm.optimizer=als",
        "als.samples=2048",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("net", list(EPS_NETS))
def test_ddpm_two_ranks_share_the_data(net, tmp_path):
    r = run_train(*DDPM, *EPS_NETS[net], "ddpm.steps=8", "trainer=ddp_cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = only_run(tmp_path / "outputs", "ddpm")
    summary = json.loads((run_dir / "summary.json").read_text())
    # 600 points over 2 ranks, 64 per batch: 4 steps per epoch, 8 steps in 2 (one process: 9, 1)
    assert summary["steps"] == 8 and summary["epochs"] == 2
    assert summary["sw"] > 0 and (run_dir / "samples.npy").exists()
    # the checkpoint keeps each rank's own noise generator, not rank zero's twice
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    noise = ckpt["ddpm"]["generator"]
    assert len(noise) == 2 and not torch.equal(noise[0], noise[1])


# -- kill, then resume=true -----------------------------------------------------------------------
def start_train(*overrides: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.setdefault("OMP_NUM_THREADS", "2")
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds (or at the deadline)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_killed_evaluate_resumes_without_retraining(tiny_data, tmp_path, compose):
    args = [*evaluate_args(tiny_data), "evaluate.nets=[convnet]", "evaluate.num_eval=6"]
    proc = start_train(*args, cwd=tmp_path)
    kill_when(proc, lambda: len(list(tmp_path.glob("outputs/evaluate/*/evaluate_parts/*"))) >= 2)
    run_dir = only_run_killed(tmp_path / "outputs", "evaluate")
    parts = {p.name: p.stat().st_mtime_ns for p in (run_dir / "evaluate_parts").glob("*.json")}
    assert 2 <= len(parts) < 6, "the run finished before it could be killed"
    assert not (run_dir / "summary.json").exists()

    r = run_train(*args, "resume=true", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert only_run(tmp_path / "outputs", "evaluate") == run_dir
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["networks_reused"] == len(parts)
    assert summary["networks_trained"] == 6 - len(parts)
    for name, mtime in parts.items():  # the finished networks were not trained again
        assert (run_dir / "evaluate_parts" / name).stat().st_mtime_ns == mtime
    uninterrupted, _ = in_process(compose, tmp_path, "evaluate", *args)
    assert summary["table"] == uninterrupted["table"]


def only_run_killed(runs: Path, task: str) -> Path:
    dirs = sorted(p for p in (runs / task).iterdir() if (p / "config.yaml").exists())
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "budget, steps, epochs",
    # a step budget that ends inside an epoch: Lightning's own max_steps resumed an
    # end-of-epoch checkpoint with one extra batch of the finished epoch (different weights)
    [("ddpm.epochs=4", 300, 4), ("ddpm.steps=290", 290, 4)],
    ids=["epochs", "steps"],
)
def test_killed_ddpm_resumes_from_its_checkpoint_to_the_same_weights(
    tmp_path, compose, budget, steps, epochs
):
    # 600 points in batches of 8: 75 steps per epoch, a checkpoint after each
    args = [*DDPM, *EPS_NETS["resnet"], budget, "ddpm.batch_size=8"]
    proc = start_train(*args, cwd=tmp_path)
    kill_when(proc, lambda: bool(list(tmp_path.glob("outputs/ddpm/*/checkpoints/last.ckpt"))))
    run_dir = only_run_killed(tmp_path / "outputs", "ddpm")
    assert not (run_dir / "summary.json").exists(), "the run finished before it could be killed"
    step = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert 75 <= step < steps

    r = run_train(*args, "resume=true", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert only_run(tmp_path / "outputs", "ddpm") == run_dir
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps and summary["epochs"] == epochs

    # the uninterrupted run ends at the same weights: the checkpoint held the noise and
    # data generators, the optimiser, the EMA and the loader's shuffle state
    reference, ref_dir = in_process(compose, tmp_path, "ddpm", *args)
    assert reference["steps"] == steps
    resumed = torch.load(run_dir / "eps_net.pt", weights_only=False)["state_dict"]
    expected = torch.load(ref_dir / "eps_net.pt", weights_only=False)["state_dict"]
    for key, value in expected.items():
        assert_close_scaled(resumed[key], value, 1e-5, msg=key)
    assert summary["final_loss"] == pytest.approx(reference["final_loss"], rel=1e-5)


def test_evaluate_parts_of_a_rewritten_set_are_not_reused(tiny_data, tmp_path, compose):
    """Resuming in a run dir whose set file has since been rewritten trains every network again."""
    from datamodules.cifar import CIFARDataModule
    from tests.test_evaluate import make_set_file

    dm = CIFARDataModule(
        "cifar10", data_dir=str(tiny_data), download=False, cache_dir=str(tmp_path / "cache")
    )
    dm.setup()
    set_file = make_set_file(dm, tmp_path / "set.pt", ipc=1)
    args = [
        "task=evaluate",
        f"evaluate.set={set_file}",
        "evaluate.ddranking.enabled=false",
        *data_args(tiny_data),
        "evaluate.nets=[convnet]",
        "evaluate.num_eval=2",
        "evaluate.epochs=1",
        "evaluate.dsa_strategy=none",
        "logger=none",
        "trainer.enable_progress_bar=false",
    ]
    first, run_dir = in_process(compose, tmp_path, "evaluate", *args)
    assert first["networks_trained"] == 2
    again, _ = in_process(compose, tmp_path, "evaluate", *args)  # the same dir, the same set
    assert again["networks_reused"] == 2 and again["table"] == first["table"]
    make_set_file(dm, set_file, ipc=1, lr=0.05)  # another lr: another training set
    other, _ = in_process(compose, tmp_path, "evaluate", *args)
    assert other["networks_reused"] == 0 and other["lr"] == 0.05


def test_evaluate_networks_trained_together_still_write_one_part_each(tiny_data, tmp_path, compose):
    """evaluate.together=true (the CUDA default): one evaluate_set call per architecture on this
    rank, one part per network, the same table as one by one up to float rounding."""
    args = [
        "task=evaluate",
        "evaluate.set=full",
        *data_args(tiny_data),
        "dataset.train_per_class=2",
        "evaluate.nets=[convnet]",
        "evaluate.num_eval=2",
        "evaluate.epochs=1",
        "evaluate.dsa_strategy=none",
        "logger=none",
        "trainer.enable_progress_bar=false",
    ]
    together, run_dir = in_process(compose, tmp_path, "together", *args, "evaluate.together=true")
    parts = sorted(p.name for p in (run_dir / "evaluate_parts").iterdir())
    assert parts == ["convnet_0.json", "convnet_1.json"] and together["networks_trained"] == 2
    _, other_dir = in_process(compose, tmp_path, "one_by_one", *args, "evaluate.together=false")

    def losses(d):
        return json.loads((d / "results.json").read_text())["results"]["convnet"]["train_loss"]

    assert losses(run_dir) == pytest.approx(losses(other_dir), rel=1e-4)  # the same networks
