"""Argument checks shared by every hook state, codec and tool.

Each returns the value normalized (``float``, ``int``, ``bool``) or raises a ``ValueError``
(``TypeError`` for a wrong kind of value where that is clearer) that says what was given, what
is allowed and, where one helps, what to do: ``"commcomp: clip_norm must be a finite number >
0 or None, got -1"``. They never change anything else, so a state that validates all its
options before it assigns any is left untouched by bad input.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

SEED_LIMIT = 2 ** 63


class ArgumentTypeError(TypeError, ValueError):
    """A value of the wrong kind (a str for an int): both a TypeError and a ValueError, so
    callers catching either see it."""


def _bound(b: int) -> str:
    return "2**63" if b == SEED_LIMIT else str(b)


def _fail(name: str, want: str, v, hint: str = "", exc=ValueError):
    raise exc(f"commcomp: {name} must be {want}, got {v!r}" + (f"; {hint}" if hint else ""))


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def positive(v, name: str, *, allow_none: bool = False, hint: str = "") -> Optional[float]:
    """A finite number > 0 (or None where ``allow_none``)."""
    if v is None and allow_none:
        return None
    if not _is_real(v) or not math.isfinite(v) or not v > 0:
        _fail(name, "a finite number > 0" + (" or None" if allow_none else ""), v, hint,
              exc=ValueError if _is_real(v) else ArgumentTypeError)
    return float(v)


def nonneg(v, name: str, *, allow_none: bool = False, hint: str = "") -> Optional[float]:
    """A finite number >= 0 (or None where ``allow_none``)."""
    if v is None and allow_none:
        return None
    if not _is_real(v) or not math.isfinite(v) or v < 0:
        _fail(name, "a finite number >= 0" + (" or None" if allow_none else ""), v, hint)
    return float(v)


def fraction(v, name: str, *, closed_low: bool = False, hint: str = "") -> float:
    """A number in (0, 1] (or [0, 1] with ``closed_low``)."""
    ok = _is_real(v) and math.isfinite(v) and (v >= 0 if closed_low else v > 0) and v <= 1
    if not ok:
        _fail(name, f"a number in {'[' if closed_low else '('}0, 1]", v, hint)
    return float(v)


def integer(v, name: str, *, low: Optional[int] = None, high: Optional[int] = None,
            allow_none: bool = False, hint: str = "") -> Optional[int]:
    """An int in [low, high) (either bound optional), or None where ``allow_none``."""
    if v is None and allow_none:
        return None
    if not _is_int(v) or (low is not None and v < low) or (high is not None and v >= high):
        if low is not None and high is not None:
            want = f"an int in [{low}, {_bound(high)})"
        elif low is not None:
            want = f"an int >= {low}"
        else:
            want = "an int" if high is None else f"an int < {_bound(high)}"
        _fail(name, want + (" or None" if allow_none else ""), v, hint,
              exc=ValueError if _is_int(v) else ArgumentTypeError)
    return int(v)


def seed(v, name: str = "seed", *, allow_none: bool = False, hint: str = "") -> Optional[int]:
    """A seed: an int in [0, 2**63) (the range every stream in commcomp accepts)."""
    return integer(v, name, low=0, high=SEED_LIMIT, allow_none=allow_none, hint=hint)


def boolean(v, name: str) -> bool:
    """True or False (not 0/1, not a string)."""
    if not isinstance(v, bool):
        _fail(name, "True or False", v, exc=TypeError)
    return v


def choice(v, name: str, allowed: Sequence, *, hint: str = ""):
    """One of ``allowed``."""
    if isinstance(v, bool) or v not in tuple(allowed):
        _fail(name, f"one of {tuple(allowed)}", v, hint)
    return v


def power_of_two(v, name: str, *, allow_none: bool = False) -> Optional[int]:
    """A power of two (1, 2, 4, ...), or None where ``allow_none``."""
    if v is None and allow_none:
        return None
    if not _is_int(v) or v < 1 or v & (v - 1):
        _fail(name, "a power of two" + (" or None" if allow_none else ""), v)
    return int(v)


__all__ = ["ArgumentTypeError", "boolean", "choice", "fraction", "integer", "nonneg", "positive", "power_of_two", "seed"]
