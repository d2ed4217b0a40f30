"""train.py end to end, as a user runs it: subprocesses, run directories, summary.json."""

from __future__ import annotations

import json

from tests.conftest import run_train


def _only_run_dir(root, task):
    dirs = [d for d in (root / task).iterdir() if d.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_classify_end_to_end_writes_summary(tiny_data, tmp_path):
    out = run_train(
        "task=classify",
        f"dataset.data_dir={tiny_data}",
        "dataset.download=false",
        "task.epochs=2",
        "logger=csv",
        "net.width=16",
        f"paths.runs_dir={tmp_path}/outputs",
        f"paths.cache_dir={tmp_path}/cache",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = _only_run_dir(tmp_path / "outputs", "classify")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0.0 <= summary["test_acc"] <= 1.0 and summary["epochs"] == 2
    assert summary["train_images"] == 200 and summary["test_images"] == 50
    assert (run_dir / "config.yaml").exists() and (run_dir / "checkpoints" / "last.ckpt").exists()
    assert (run_dir / "csv" / "metrics.csv").exists()
    # the run directory name carries microseconds, so parallel runs never collide
    assert len(run_dir.name.split("_")[-1]) == 6


def test_wandb_offline_run_writes_its_files_in_the_run_dir(tiny_data, tmp_path):
    out = run_train(
        "task=classify",
        f"dataset.data_dir={tiny_data}",
        "dataset.download=false",
        "task.epochs=1",
        "net.width=8",
        "dataset.train_per_class=4",
        "logger=wandb",
        f"paths.runs_dir={tmp_path}/outputs",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = _only_run_dir(tmp_path / "outputs", "classify")
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline, list(run_dir.rglob("*"))[:20]
    assert list(offline[0].glob("*.wandb"))
    assert not (tmp_path / "wandb").exists()  # nothing written outside the run dir


def test_missing_data_is_one_line_not_a_traceback(tmp_path):
    out = run_train(
        "task=classify",
        f"dataset.data_dir={tmp_path}/nowhere",
        "dataset.download=false",
        "logger=none",
        f"paths.runs_dir={tmp_path}/outputs",
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "dataset.download=true" in errors[0]


def test_subset_too_large_is_one_line(tiny_data, tmp_path):
    out = run_train(
        "task=classify",
        f"dataset.data_dir={tiny_data}",
        "dataset.download=false",
        "dataset.test_per_class=99",
        "logger=none",
        f"paths.runs_dir={tmp_path}/outputs",
        cwd=tmp_path,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert (
        "error: dataset.test_per_class=99 but the test split has only 5 images of class 0"
        in out.stderr
    )


def test_classify_resume_continues_from_last_checkpoint(tiny_data, tmp_path):
    common = [
        "task=classify",
        f"dataset.data_dir={tiny_data}",
        "dataset.download=false",
        "net.width=8",
        "logger=csv",
        f"paths.runs_dir={tmp_path}/outputs",
    ]
    first = run_train(*common, "task.epochs=2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    # same config, more epochs would be a different config: resume the identical command instead
    second = run_train(*common, "task.epochs=2", "resume=true", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    dirs = list((tmp_path / "outputs" / "classify").iterdir())
    assert len(dirs) == 1  # the resumed run wrote into the first run's directory...
    assert len(list((dirs[0] / "resumed").iterdir())) == 1  # ...and keeps its own log inside it
    assert "Restoring states from the checkpoint" in second.stderr + second.stdout


def test_progress_bar_names_iterations_and_step_budgets_not_epoch_0_of_0():
    from types import SimpleNamespace

    from lightning_modules.tasks.common import ProgressBar

    bar = ProgressBar()
    labels = []
    for epochs in (1, -1, 5):  # distillation (one epoch of iterations), ddpm.steps, classify
        bar._trainer = SimpleNamespace(max_epochs=epochs)
        labels.append(bar._get_train_description(0).strip())
    assert labels == ["Iterations", "Epoch 0", "Epoch 0/4"]
