"""task=reproduce fanned out over submitit's launcher: the jobs each phase submits, the one-line
errors, and (slow) the same row as the single-process run, a dead stage picked up by a rerun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from datamodules.syn_set import SyntheticSet
from lightning_modules.errors import UserError
from lightning_modules.tasks.reproduce import fanout, prepare
from tests.conftest import run_train

LOCAL = {
    "_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
    "submitit_folder": "unused",
    "timeout_min": 60,
    "cpus_per_task": None,
    "gpus_per_node": 0,
    "tasks_per_node": 1,
    "mem_gb": None,
    "nodes": 1,
    "name": "train",
}


def test_no_hydra_launcher_means_one_process(compose):
    """``train.run`` without Hydra (and Hydra's basic launcher) keeps the single-process run."""
    assert fanout.enabled(compose("task=reproduce")) is None


def test_executor_takes_the_launcher_settings(tmp_path):
    executor = fanout.make_executor(LOCAL, tmp_path / "jobs")
    assert executor.cluster == "local"
    assert executor._executor.parameters["timeout_min"] == 60
    assert executor._executor.folder == (tmp_path / "jobs").resolve()


@pytest.mark.parametrize("key", ["tasks_per_node", "nodes"])
def test_several_processes_per_stage_job_is_one_line(tmp_path, key):
    with pytest.raises(UserError, match="one-process jobs"):
        fanout.make_executor({**LOCAL, key: 2}, tmp_path)


def test_expert_jobs_cover_the_missing_experts_in_contiguous_shares(compose, tmp_path):
    cfg = compose("task=reproduce", "reproduce.experts=10", "reproduce.expert_jobs=3")
    with open_dict(cfg):
        cfg.reproduce.experts_dir = str(tmp_path / "store")
    cfg, workdir = prepare(cfg)
    jobs = fanout._expert_jobs(cfg, workdir)
    assert list(jobs) == ["experts 0-2", "experts 3-5", "experts 6-9"]
    shard = jobs["experts 3-5"]
    assert "first_index: 3" in shard.cfg and "num_experts: 3" in shard.cfg
    assert int(cfg.teacher.first_index) == 0  # the run's own config is left alone
    (tmp_path / "store").mkdir()
    for i in (0, 1, 2, 6):  # a finished share is not submitted again
        (tmp_path / "store" / f"expert_{i:04d}.pt").write_bytes(b"")
    assert list(fanout._expert_jobs(cfg, workdir)) == ["experts 3-5", "experts 6-9"]


def test_a_failed_job_is_named_by_its_exception_line():
    message = (
        "Job (task=0) failed during processing with trace:\n----------------------\n"
        'Traceback (most recent call last):\n  File "x.py", line 1, in f\n'
        "lightning_modules.errors.UserError: store /s holds expert 0 trained with lr=0.1\n"
        "----------------------\nYou can check full logs at paths:\n  - /j/1_0_log.err\n"
    )
    assert fanout.job_error(RuntimeError(message)) == (
        "lightning_modules.errors.UserError: store /s holds expert 0 trained with lr=0.1"
    )
    assert fanout.job_error(ValueError("")) == "ValueError"


def test_expert_jobs_must_be_positive(compose, tmp_path):
    from lightning_modules.schema import validate as check_config

    with pytest.raises(UserError, match="reproduce.expert_jobs"):
        check_config(compose("task=reproduce", "reproduce.expert_jobs=0"))


def tiny(data: Path, experts: Path) -> list[str]:
    return [
        "task=reproduce", "ipc=1", f"dataset.data_dir={data}", "dataset.download=false",
        "dataset.zca=false", "net.width=8", "net.depth=2", "logger=csv",
        "trainer.enable_progress_bar=false", "threads=1", "reproduce.experts=2",
        "reproduce.expert_epochs=2", "reproduce.iterations=2", "reproduce.syn_steps=2",
        "reproduce.eval_epochs=2", "reproduce.num_eval=1", "coreset.forgetting_epochs=2",
        "reproduce.methods=[random,herding,mtt,pruning]", "reproduce.expert_jobs=2",
        f"reproduce.experts_dir={experts}",
    ]  # fmt: skip


def run_dir(root: Path) -> Path:
    (found,) = [p.parent for p in root.glob("outputs/**/row.json")]
    return found


@pytest.mark.slow
def test_fanned_out_row_equals_the_single_process_row(tiny_data, tmp_path):
    one, many = tmp_path / "one", tmp_path / "many"
    one.mkdir(), many.mkdir()
    r = run_train(*tiny(tiny_data, one / "experts"), cwd=one, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_train("-m", "hydra/launcher=local", *tiny(tiny_data, many / "experts"), cwd=many)
    assert r.returncode == 0, r.stderr[-3000:]
    single, fanned = run_dir(one), run_dir(many)

    # the jobs of each phase: 2 expert shares, one job per set, one per (set, network)
    jobs = json.loads((fanned / "stages.json").read_text())["jobs"]
    assert list(jobs["experts"]) == ["experts 0-0", "experts 1-1"]
    assert sorted(jobs["sets"]) == ["herding", "mtt", "pruning", "random"]
    assert len(jobs["evaluations"]) == 4
    assert json.loads((single / "stages.json").read_text())["jobs"] == {}

    # the same row, from the same sets
    row = json.loads((fanned / "row.json").read_text())["measured"]
    assert row == json.loads((single / "row.json").read_text())["measured"]
    work = {d: Path(json.loads((r / "summary.json").read_text())["workdir"]) for d, r in
            (("one", single), ("many", fanned))}  # fmt: skip
    for method in ("random", "herding", "mtt", "pruning"):
        a = SyntheticSet.load(one / work["one"] / method / "set.pt")
        b = SyntheticSet.load(many / work["many"] / method / "set.pt")
        torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)

    # a job that died mid-stage leaves it unfinished: the same command submits that stage alone
    record = many / work["many"] / "pruning" / "stage.json"
    saved = json.loads(record.read_text())
    record.write_text(json.dumps({"key": saved["key"], "done": False}))
    r = run_train("-m", "hydra/launcher=local", *tiny(tiny_data, many / "experts"), cwd=many)
    assert r.returncode == 0, r.stderr[-3000:]
    (again,) = [p for p in (many / "outputs/multirun").glob("*/0") if p != fanned]
    jobs = json.loads((again / "stages.json").read_text())["jobs"]
    assert (jobs["experts"], list(jobs["sets"]), jobs["evaluations"]) == ({}, ["pruning"], {})
    assert json.loads((again / "row.json").read_text())["measured"] == row
