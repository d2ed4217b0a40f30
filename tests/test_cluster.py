"""Beyond one machine: submitit's launcher (hydra/launcher=local, the SLURM code path on one
machine), two nodes simulated by two processes (NODE_RANK 0/1 over gloo on 127.0.0.1), and the
one-line errors of a cluster set up wrong."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datamodules.syn_set import SyntheticSet
from datamodules.trajectories import ExpertStore
from tests.conftest import ROOT, run_train

QUIET = ["logger=csv", "trainer.enable_progress_bar=false"]
TWO_NODES = [
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.num_nodes=2",
    "trainer.strategy=ddp",
]


def data_args(tiny_data: Path) -> list[str]:
    return [f"dataset.data_dir={tiny_data}", "dataset.download=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(
    *overrides: str, cwd: Path, run_dirs: tuple[Path, Path], timeout: int = 300, only=None
):
    """``train.py`` once per simulated node, as a user starts it on each node of a cluster
    without SLURM: ``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` and one run dir. With
    ``only=k`` wait for node k alone and stop the other (which would wait for it forever)."""
    port = free_port()
    procs = []
    for node, run_dir in enumerate(run_dirs):
        env = {
            **os.environ,
            "NODE_RANK": str(node),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WANDB_MODE": "offline",
            "OMP_NUM_THREADS": "1",
            "TTDISTILL_SHARED_DIR_TIMEOUT_S": "20",
        }
        cmd = [sys.executable, str(ROOT / "train.py"), *overrides, *TWO_NODES, *QUIET]
        cmd.append(f"hydra.run.dir={run_dir}")
        procs.append(
            subprocess.Popen(
                cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    if only is not None:
        out, err = procs[only].communicate(timeout=timeout)
        for q in procs:
            q.kill()
        return {only: (procs[only].returncode, err)}
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append((p.returncode, err))
    return outs


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


# -- two nodes, results equal to one process ------------------------------------------------------
@pytest.mark.slow
def test_classify_on_two_nodes_equals_two_ranks_on_one(tiny_data, tmp_path):
    args = ["task=classify", *data_args(tiny_data), "dataset.train_per_class=4"]
    args += ["net.width=8", "task.epochs=2"]
    run = tmp_path / "nodes"
    outs = two_nodes(*args, cwd=tmp_path, run_dirs=(run, run))
    assert all(rc == 0 for rc, _ in outs), outs[0][1][-2000:] + outs[1][1][-2000:]
    r = run_train(
        *args, "trainer=ddp_cpu", *QUIET, f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert summary(run)["test_acc"] == summary(tmp_path / "one")["test_acc"]
    assert summary(run)["test_loss"] == pytest.approx(summary(tmp_path / "one")["test_loss"])
    assert len(list(run.glob("**/metrics.csv"))) == 1  # one logger wrote, on node 0


@pytest.mark.slow
def test_teacher_on_two_nodes_fills_one_store(tiny_data, tmp_path):
    store = tmp_path / "store"
    args = ["task=teacher", *data_args(tiny_data), "dataset.train_per_class=4", "net.width=8"]
    args += ["net.depth=2", "teacher.epochs=1", "teacher.num_experts=3", f"teacher.out={store}"]
    run = tmp_path / "nodes"
    outs = two_nodes(*args, cwd=tmp_path, run_dirs=(run, run))
    assert all(rc == 0 for rc, _ in outs), outs[0][1][-2000:] + outs[1][1][-2000:]
    assert summary(run)["trained_by_rank"] == [[0, 2], [1]]
    assert ExpertStore(store).indices() == [0, 1, 2]
    one = tmp_path / "one_store"
    r = run_train(*args[:-1], f"teacher.out={one}", *QUIET, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    for i in range(3):  # node 1's expert is the one a single process trains for that index
        torch.testing.assert_close(
            ExpertStore(store).load(i).snapshots, ExpertStore(one).load(i).snapshots
        )


@pytest.mark.slow
def test_distill_and_evaluate_on_two_nodes(tiny_data, tmp_path):
    store = tmp_path / "experts"
    r = run_train(
        "task=teacher", *data_args(tiny_data), "dataset.train_per_class=4", "net.width=8",
        "net.depth=2", "teacher.epochs=2", "teacher.num_experts=2", f"teacher.out={store}",
        *QUIET, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    distill = [
        "task=distill", "ipc=1", *data_args(tiny_data), "dataset.zca=false", "net.width=8",
        "net.depth=2", f"distill.trajectories={store}", "distill.iterations=3",
        "distill.syn_steps=2", "distill.expert_epochs=1", "distill.max_start_epoch=2",
        "distill.eval_every=0", "distill.final_eval=false", "distill.lr_img=100",
        "distill.lr_lr=1e-5", "distill.lr_teacher=0.01", "distill.batch_syn=all",
    ]  # fmt: skip
    run = tmp_path / "nodes"
    outs = two_nodes(*distill, cwd=tmp_path, run_dirs=(run, run))
    assert all(rc == 0 for rc, _ in outs), outs[0][1][-2000:] + outs[1][1][-2000:]
    one = tmp_path / "one"
    r = run_train(*distill, "trainer=ddp_cpu", *QUIET, f"hydra.run.dir={one}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = SyntheticSet.load(run / "set.pt"), SyntheticSet.load(one / "set.pt")
    torch.testing.assert_close(a.images, b.images)  # two nodes = two ranks on one node

    evaluate = ["task=evaluate", *data_args(tiny_data), f"evaluate.set={run / 'set.pt'}"]
    evaluate += ["evaluate.nets=[convnet]", "evaluate.num_eval=2", "evaluate.epochs=2"]
    evaluate += ["evaluate.device=cpu", "dataset.zca=false", "evaluate.ddranking.enabled=false"]
    ev_run = tmp_path / "ev_nodes"
    outs = two_nodes(*evaluate, cwd=tmp_path, run_dirs=(ev_run, ev_run))
    assert all(rc == 0 for rc, _ in outs), outs[0][1][-2000:] + outs[1][1][-2000:]
    r = run_train(*evaluate, *QUIET, f"hydra.run.dir={tmp_path / 'ev_one'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert summary(ev_run)["acc_convnet_mean"] == summary(tmp_path / "ev_one")["acc_convnet_mean"]


# -- submitit's launcher --------------------------------------------------------------------------
@pytest.mark.slow
def test_local_launcher_fills_one_store_from_two_jobs(tiny_data, tmp_path):
    """The issue's example at tiny scale: two jobs, one shard each, one store."""
    r = run_train(
        "-m", "hydra/launcher=local", "task=teacher", "teacher.first_index=0,1",
        "teacher.num_experts=1", "teacher.epochs=1", *data_args(tiny_data),
        "dataset.train_per_class=4", "net.width=8", "net.depth=2", *QUIET,
        cwd=tmp_path, timeout=400,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert ExpertStore(tmp_path / "trajectories/cifar10/convnet").indices() == [0, 1]
    summaries = [
        json.loads(p.read_text()) for p in tmp_path.glob("outputs/multirun/*/*/summary.json")
    ]
    assert sorted(s["trained_indices"][0] for s in summaries) == [0, 1]


@pytest.mark.slow
def test_local_launcher_jobs_on_one_index_train_it_once(tiny_data, tmp_path):
    """Two concurrent jobs asking for the same expert: the store's claim lets one train it."""
    r = run_train(
        "-m", "hydra/launcher=local", "task=teacher", "teacher.first_index=0,0",
        "teacher.num_experts=1", "teacher.epochs=1", *data_args(tiny_data),
        "dataset.train_per_class=4", "net.width=8", "net.depth=2", *QUIET,
        cwd=tmp_path, timeout=400,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    summaries = [
        json.loads(p.read_text()) for p in tmp_path.glob("outputs/multirun/*/*/summary.json")
    ]
    assert len(summaries) == 2
    assert sum(s["experts_trained"] for s in summaries) == 1
    assert ExpertStore(tmp_path / "trajectories/cifar10/convnet").indices() == [0]


# -- a cluster set up wrong: one line each ---------------------------------------------------------
def test_num_nodes_without_a_multi_node_environment(tmp_path):
    env = {
        k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "NODE_RANK", "WORLD_SIZE")
    }
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    r = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "task=classify", "trainer.num_nodes=2", *QUIET],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: trainer.num_nodes=2 but no multi")


@pytest.mark.slow
def test_run_dir_not_shared_between_nodes(tiny_data, tmp_path):
    """Each node with its own run dir: node 1 cannot see node 0's marker and says so."""
    args = ["task=classify", *data_args(tiny_data), "dataset.train_per_class=4", "net.width=8"]
    dirs = (tmp_path / "a", tmp_path / "b")
    rc, err = two_nodes(*args, "task.epochs=1", cwd=tmp_path, run_dirs=dirs, timeout=120, only=1)[1]
    assert rc == 2, err[-2000:]
    assert "is not shared between the nodes" in err.strip().splitlines()[-1]


def test_launcher_without_the_plugin_is_one_line(monkeypatch):
    import importlib.util

    import train

    assert train.check_launcher(["task=teacher"]) is None
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if "submitit" in name else real(name, *a),
    )
    message = train.check_launcher(["-m", "hydra/launcher=slurm", "task=teacher"])
    assert message and 'pip install -e ".[slurm]"' in message


def _signal_local_job(tiny_data, tmp_path, *overrides: str) -> tuple[Path, str]:
    """Start a ``task=classify`` job under ``hydra/launcher=local``, send its submitit job the
    pre-timeout signal (USR2) once an epoch checkpoint exists, wait for the (requeued) job to
    finish; ``(run dir, the jobs' logs in order)``."""
    import glob
    import signal
    import time

    cmd = [
        sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=local", "task=classify",
        *data_args(tiny_data), "dataset.train_per_class=4", "net.width=8", *overrides, *QUIET,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    pattern = str(tmp_path / "outputs/multirun/*/0/checkpoints/last.ckpt")
    deadline = time.monotonic() + 240
    while not glob.glob(pattern) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert glob.glob(pattern), "no epoch checkpoint appeared"
    job = subprocess.run(
        ["pgrep", "-f", f"submitit.core._submit {tmp_path}"], capture_output=True, text=True
    ).stdout.split()
    assert job, "no submitit job process"
    os.kill(int(job[0]), signal.SIGUSR2)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    (run_dir,) = [Path(p).parents[1] for p in glob.glob(pattern)]
    logs = "".join(
        Path(p).read_text() for p in sorted(glob.glob(str(run_dir.parent / ".submitit/*/*.out")))
    )
    return run_dir, logs


@pytest.mark.slow
def test_signalled_local_job_is_requeued_and_continues(tiny_data, tmp_path):
    """submitit's pre-timeout signal (USR2) on a running job: submitit requeues it, the requeued
    job finds its own run dir holding this run and continues from the last epoch checkpoint."""
    run_dir, logs = _signal_local_job(tiny_data, tmp_path, "task.epochs=40")
    assert summary(run_dir)["epochs"] == 40
    assert "Requeued job" in logs and "already holds this run: continuing it" in logs


@pytest.mark.slow
def test_signalled_job_saves_a_checkpoint_at_the_signal(tiny_data, tmp_path):
    """The requeue signal mid-epoch: the job finishes its training step, writes last.ckpt there
    (not only at the epoch end before), submitit requeues it, and the requeued job continues from
    that step to the end."""
    run_dir, logs = _signal_local_job(tiny_data, tmp_path, "task.epochs=30", "dataset.batch_size=4")
    assert summary(run_dir)["epochs"] == 30
    saved = logs.index("on the requeue signal; submitit requeues the job")
    assert saved < logs.index("Requeued job") < logs.index("already holds this run")
    step = int(logs[:saved].rsplit("at step ", 1)[1].split()[0])
    assert step > 0
    # the requeued job restored that checkpoint
    assert f"Restoring states from the checkpoint path at {run_dir}" in logs
