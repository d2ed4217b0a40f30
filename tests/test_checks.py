"""Bad counts and ignored trainer keys: one line through train.py, exit 2, nothing started."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from lightning_modules.errors import UserError
from lightning_modules.schema import validate as check_config
from lightning_modules.tasks.checks import check_trainer_overrides
from tests.conftest import run_train

CASES = [
    (["task=classify", "dataset.train_per_class=0"], "dataset.train_per_class must be a positive"),
    (["task=classify", "task.epochs=-1"], "task.epochs must be a positive whole number, got -1"),
    (["task=classify", "+trainer.max_epochs=3"], "trainer.max_epochs is set by task=classify"),
    (["task=teacher", "+trainer.max_epochs=3"], "task=teacher runs its own loop"),
    (["task=teacher", "teacher.epochs=1.5"], "teacher.epochs must be a positive whole number"),
    (["task=ddpm", "dataset=swiss_roll", "ddpm.steps=0"], "ddpm.steps must be a positive"),
    (["task=ddpm", "dataset=swiss_roll", "ddpm.batch_size=0"], "ddpm.batch_size must be"),
    (["task=distill", "ipc=0"], "ipc must be a positive whole number, got 0"),
    (["task=evaluate", "evaluate.num_eval=0"], "evaluate.num_eval must be a positive"),
    (["task=reproduce", "reproduce.num_eval=-3"], "reproduce.num_eval must be a positive"),
]


@pytest.mark.parametrize("overrides,message", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_value_is_one_line_and_nothing_starts(tmp_path, overrides, message):
    r = run_train(*overrides, "logger=csv", f"paths.runs_dir={tmp_path}/runs", cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], lines[-3:]
    assert "Traceback" not in r.stderr
    assert not list((tmp_path / "runs").rglob("summary.json"))
    assert not list((tmp_path / "runs").rglob("config_resolved.yaml"))  # run() never began


def test_counts_accept_null_and_good_values(compose):
    check_config(compose("task=classify", "dataset.train_per_class=5", "task.epochs=2"))
    check_config(compose("task=ddpm", "dataset=swiss_roll", "ddpm.steps=3"))
    check_config(compose("task=classify", "+trainer.max_time=00:00:01:00"))  # a Trainer key


def test_trainer_file_keys_are_not_clashes(compose):
    cfg = compose("task=distill")  # log_every_n_steps is in conf/trainer/default.yaml
    check_trainer_overrides(cfg, {"log_every_n_steps": 1, "max_steps": 5})
    cfg = compose("task=distill", "+trainer.max_steps=3")
    with pytest.raises(UserError, match="trainer.max_steps is set by task=distill"):
        check_trainer_overrides(cfg, {"max_steps": 5})


def test_a_boolean_is_not_a_count():
    cfg = OmegaConf.create({"task": {"name": "classify", "epochs": True}})
    with pytest.raises(UserError, match="task.epochs"):
        check_config(cfg)
