"""The kinds of value a configuration key can hold: each says whether a value is allowed and how
to name what is allowed (the message's ``must be ...``).

Plain Python on purpose: the schema is checked before torch, Lightning or a data file is touched.
A kind is built by one short call (``count()``, ``positive()``, ``one_of("a", "b")``, ...);
``kind | other`` allows either (``one_of("auto") | count()``); ``null=True`` allows null.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: the sentinel for "no bound"
NO = None


@dataclass(frozen=True)
class Kind:
    """One allowed set of values. ``accepts`` is the whole test; ``text`` names the set."""

    null: bool = False

    def accepts(self, value) -> bool:
        if value is None:
            return self.null
        return self._accepts(value)

    def _accepts(self, value) -> bool:  # pragma: no cover - every kind overrides it
        raise NotImplementedError

    def text(self) -> str:
        return self._text() + (" or null" if self.null else "")

    def _text(self) -> str:  # pragma: no cover
        raise NotImplementedError

    def __or__(self, other: Kind) -> Kind:
        return Either(options=(self, other), null=self.null or other.null)


@dataclass(frozen=True)
class Either(Kind):
    options: tuple = ()

    def _accepts(self, value) -> bool:
        return any(k.accepts(value) for k in self.options)

    def _text(self) -> str:
        return " or ".join(k._text() for k in self.options)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Whole(Kind):
    """An integer (``2.0`` is not: a count written as a float is a typo or a unit mistake)."""

    ge: int = 1
    le: int | None = NO

    def _accepts(self, value) -> bool:
        if not isinstance(value, int) or isinstance(value, bool):
            return False
        return value >= self.ge and (self.le is None or value <= self.le)

    def _text(self) -> str:
        if self.le is not None:
            return f"a whole number in [{self.ge}, {self.le}]"
        return "a positive whole number" if self.ge == 1 else f"a whole number >= {self.ge}"


@dataclass(frozen=True)
class Real(Kind):
    """A finite number (NaN and inf never are), with open (gt, lt) or closed (ge, le) bounds."""

    gt: float | None = NO
    ge: float | None = NO
    lt: float | None = NO
    le: float | None = NO

    def _accepts(self, value) -> bool:
        if not _is_number(value) or not math.isfinite(value):
            return False
        return not (
            (self.gt is not None and not value > self.gt)
            or (self.ge is not None and not value >= self.ge)
            or (self.lt is not None and not value < self.lt)
            or (self.le is not None and not value <= self.le)
        )

    def _text(self) -> str:
        lo = "(" if self.gt is not None else "["
        hi = ")" if self.lt is not None else "]"
        a = self.gt if self.gt is not None else self.ge
        b = self.lt if self.lt is not None else self.le
        if a is not None and b is not None:
            return f"a number in {lo}{_fmt(a)}, {_fmt(b)}{hi}"
        if self.gt == 0:
            return "a positive number"
        if a is not None:
            return f"a finite number {'>' if self.gt is not None else '>='} {_fmt(a)}"
        if b is not None:
            return f"a finite number {'<' if self.lt is not None else '<='} {_fmt(b)}"
        return "a finite number"


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass(frozen=True)
class Flag(Kind):
    """``true`` or ``false`` only (``zca=maybe`` or ``zca=1`` is not a boolean)."""

    def _accepts(self, value) -> bool:
        return isinstance(value, bool)

    def _text(self) -> str:
        return "true or false"


@dataclass(frozen=True)
class OneOf(Kind):
    choices: tuple = ()

    def _accepts(self, value) -> bool:
        return isinstance(value, str) and value in self.choices

    def _text(self) -> str:
        return "one of " + ", ".join(self.choices)


@dataclass(frozen=True)
class Text(Kind):
    """Any non-empty string (a path, a name); ``prefix`` narrows it (``cuda:`` devices)."""

    prefix: str = ""
    what: str = "a string"

    def _accepts(self, value) -> bool:
        return isinstance(value, str) and value.startswith(self.prefix) and value != ""

    def _text(self) -> str:
        return self.what


@dataclass(frozen=True)
class Items(Kind):
    """A list whose every item is ``of`` (non-empty unless ``empty``)."""

    of: Kind = field(default_factory=lambda: Text())
    empty: bool = False

    def _accepts(self, value) -> bool:
        if not isinstance(value, (list, tuple)) or (not value and not self.empty):
            return False
        return all(self.of.accepts(v) for v in value)

    def _text(self) -> str:
        return f"a {'' if self.empty else 'non-empty '}list of {self.of._text()}"


@dataclass(frozen=True)
class Table(Kind):
    """A mapping checked by the validator itself (its entries are other keys' kinds)."""

    what: str = "a mapping"

    def _accepts(self, value) -> bool:
        return isinstance(value, dict)

    def _text(self) -> str:
        return self.what


# ----------------------------------------------------------------- the one-call constructors
def count(ge: int = 1, le: int | None = None, null: bool = False) -> Kind:
    """A whole number >= ``ge`` (1: a positive count), at most ``le`` (a stated memory bound)."""
    return Whole(ge=ge, le=le, null=null)


def number(gt=None, ge=None, lt=None, le=None, null: bool = False) -> Kind:
    return Real(gt=gt, ge=ge, lt=lt, le=le, null=null)


def positive(null: bool = False, le=None) -> Kind:
    return Real(gt=0, le=le, null=null)


def nonneg(null: bool = False, le=None) -> Kind:
    return Real(ge=0, le=le, null=null)


def fraction(null: bool = False) -> Kind:
    """A number in [0, 1]."""
    return Real(ge=0, le=1, null=null)


def flag(null: bool = False) -> Kind:
    return Flag(null=null)


def one_of(*choices: str, null: bool = False) -> Kind:
    return OneOf(choices=tuple(choices), null=null)


def text(null: bool = False, what: str = "a string") -> Kind:
    return Text(null=null, what=what)


def items(of: Kind, null: bool = False, empty: bool = False) -> Kind:
    return Items(of=of, null=null, empty=empty)


def table(what: str, null: bool = False) -> Kind:
    return Table(what=what, null=null)


def auto_or(kind: Kind) -> Kind:
    """``auto`` or ``kind``."""
    return one_of("auto") | kind
