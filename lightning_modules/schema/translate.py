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


def translate(exc: BaseException, overrides: list[str]) -> str | None:
    """The one line for an exception a library raised on a user's value; None for any other."""
    if not isinstance(exc, (ValueError, TypeError, RuntimeError, AssertionError, IndexError)):
        if type(exc).__name__ != "MisconfigurationException":
            return None
    library = library_of(exc)
    if library is None:
        return None
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    keys = blame(first, overrides) or [o for o in overrides if not o.startswith("hydra")]
    where = f" (set by {', '.join(keys)})" if keys else " (from the configuration's defaults)"
    return f"{library} refused a value: {first}{where}"
