"""Library errors caused by a user's value, as one line naming the key.

The schema refuses what it can name (``keys.py``); a value it allows can still be refused deep in
torch, Lightning, scikit-learn or kornia (a size a network cannot take, a device Lightning cannot
use). ``train.py`` turns such an exception into ``error: <library> refused ...: <its first line>
(set by <key>=<value>)``, naming the override whose key or value the message mentions, else every
override given, instead of a traceback. Errors raised by this project's own code stay tracebacks:
those are bugs to report, not values to change.
"""

from __future__ import annotations

import re
import traceback

LIBRARIES = ("torch", "lightning", "sklearn", "kornia", "torchmetrics", "ot")


def library_of(exc: BaseException) -> str | None:
    """The library whose code raised ``exc`` (its innermost frame), or None."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return None
    path = frames[-1].filename.replace("\\", "/")
    for name in LIBRARIES:
        if f"/site-packages/{name}/" in path or f"/dist-packages/{name}/" in path:
            return name
    return None


def blame(message: str, overrides: list[str]) -> list[str]:
    """The ``key=value`` overrides a library message points at (its leaf name or its value)."""
    hits = []
    for item in overrides:
        key, sep, value = item.lstrip("+~").partition("=")
        if not sep or key.startswith("hydra"):
            continue
        leaf = key.rsplit(".", 1)[-1]
        words = set(re.findall(r"[A-Za-z_]+", message.lower()))
        if leaf.lower() in words or (value and re.search(rf"\b{re.escape(value)}\b", message)):
            hits.append(item)
    return hits


KINDS = (ValueError, TypeError, RuntimeError, AssertionError, IndexError)


def _library_error(exc: BaseException) -> tuple[BaseException, str] | None:
    """``exc`` or the exception it wraps (Hydra's ``InstantiationException`` around a Trainer
    or logger that refused an argument), when a library raised it; else None."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, KINDS) or type(exc).__name__ == "MisconfigurationException":
            library = library_of(exc)
            if library is not None:
                return exc, library
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def translate(exc: BaseException, overrides: list[str]) -> str | None:
    """The one line for an exception a library raised on a user's value; None for any other."""
    found = _library_error(exc)
    if found is None:
        return None
    exc, library = found
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    keys = blame(first, overrides) or [o for o in overrides if not o.startswith("hydra")]
    where = f" (set by {', '.join(keys)})" if keys else " (from the configuration's defaults)"
    return f"{library} refused a value: {first}{where}"
