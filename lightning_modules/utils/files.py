"""Atomic file writes: a reader (or a resumed run) never sees a half-written file."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    The temporary name starts with ``.<name>.tmp<pid>`` and keeps the suffix (so writers that
    pick a format by suffix, e.g. matplotlib, still work). It is removed when the block raises;
    a process killed inside the block leaves it behind, never a partial ``path``.

    >>> with atomic_path("out/set.pt") as tmp:
    ...     torch.save(obj, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, payload) -> Path:
    """Write ``payload`` as indented, strict JSON atomically (non-JSON values as ``str``).

    NaN and inf are not JSON: each becomes null, and a top-level ``non_finite`` field says which
    entries were what (``{"final_loss": "nan"}``), so strict parsers read the file and a reader
    still sees why the number is missing."""
    bad: dict[str, str] = {}
    clean = _finite(payload, "", bad)
    if bad and isinstance(clean, dict):
        clean["non_finite"] = bad
    return write_text(path, json.dumps(clean, indent=2, default=str, allow_nan=False))


def _finite(value, where: str, bad: dict):
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        bad[where or "value"] = str(value)
        return None
    if isinstance(value, dict):
        return {k: _finite(v, f"{where}.{k}" if where else str(k), bad) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v, f"{where}[{i}]", bad) for i, v in enumerate(value)]
    return value
