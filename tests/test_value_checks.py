"""Values that cannot work in task=evaluate / task=classify: one line, exit 2, before any data
(the counts through tasks.checks, the lr, val_every and protocol through the runners)."""

from __future__ import annotations

import pytest

from tests.conftest import run_train

CASES = {
    "classify-epochs-negative": (
        ["task=classify", "task.epochs=-1"],
        "task.epochs must be a positive whole number, got -1",
    ),
    "classify-epochs-fraction": (
        ["task=classify", "task.epochs=1.5"],
        "task.epochs must be a positive whole number, got 1.5",
    ),
    "classify-batch-zero": (
        ["task=classify", "dataset.batch_size=0"],
        "dataset.batch_size must be a positive whole number, got 0",
    ),
    "classify-lr-zero": (
        ["task=classify", "task.lr=0"],
        "task.lr must be a positive number, got 0",
    ),
    "evaluate-num-eval-zero": (
        ["task=evaluate", "evaluate.set=full", "evaluate.num_eval=0"],
        "evaluate.num_eval must be a positive whole number, got 0",
    ),
    "evaluate-epochs-negative": (
        ["task=evaluate", "evaluate.set=full", "evaluate.epochs=-1"],
        "evaluate.epochs must be a positive whole number, got -1",
    ),
    "evaluate-batch-text": (
        ["task=evaluate", "evaluate.set=full", "evaluate.batch_size=many"],
        "evaluate.batch_size must be a positive whole number, got 'many'",
    ),
    "classify-val-every-zero": (
        ["task=classify", "task.val_every=0"],
        "task.val_every must be a positive whole number, got 0",
    ),
    "evaluate-lr-negative": (
        ["task=evaluate", "evaluate.set=full", "evaluate.lr=-0.1"],
        "evaluate.lr must be a positive number or null, got -0.1",
    ),
    "evaluate-protocol": (
        ["task=evaluate", "evaluate.set=full", "evaluate.protocol=cosine"],
        "evaluate.protocol must be one of mtt, half, got 'cosine'",
    ),
    "evaluate-labels": (
        ["task=evaluate", "evaluate.set=full", "evaluate.labels=mixed"],
        "evaluate.labels must be one of both, soft, hard, got 'mixed'",
    ),
    "evaluate-ddranking-full-epochs": (
        ["task=evaluate", "evaluate.set=full", "evaluate.ddranking.full_epochs=0"],
        "evaluate.ddranking.full_epochs must be a positive whole number, got 0",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_bad_count_is_one_line_and_exit_2(case, tiny_data, tmp_path):
    overrides, message = CASES[case]
    done = run_train(
        *overrides,
        f"dataset.data_dir={tiny_data}",
        "dataset.download=false",
        "logger=none",
        f"paths.runs_dir={tmp_path}",
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0] == f"error: {message}", done.stderr[-2000:]
