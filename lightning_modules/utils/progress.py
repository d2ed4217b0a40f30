"""The one progress bar of the plain loops: Rich, as Lightning's ``RichProgressBar`` draws."""

from __future__ import annotations


def progress_bar(enabled: bool = True):
    """A Rich ``Progress`` with a free ``status`` field (``bar.update(job, status=...)``).

    Use as ``with progress_bar() as bar: job = bar.add_task("experts", total=n, status="")``.
    ``enabled=False`` (``trainer.enable_progress_bar=false``, ranks other than zero) draws nothing.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        disable=not enabled,
    )
