"""Argument checks for the layers' public entries (constructors, GSAModel.generate).

Each raises a ValueError that names the caller's argument and what was expected, so that a bad value
fails at the call that took it rather than later, as a ZeroDivisionError, a negative tensor dimension
or a kernel error naming some internal tensor, or not at all (a NaN or an ignored value).
"""
from __future__ import annotations

import math
import numbers
import operator


def integer(name: str, value, minimum: int) -> int:
    """value as a Python int, checked >= minimum. bool and non-integral numbers (2.0 included) are
    rejected: a float size here would only fail later, inside nn.Linear or range()."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def real(name: str, value, *, above: float | None = None, at_least: float | None = None,
         note: str = "") -> float:
    """value as a finite Python float, checked > above and/or >= at_least. NaN and +-inf are always
    rejected: every float argument of the layers scales something, and a non-finite one gives NaN
    outputs or degenerate ones (an infinite temperature samples uniformly). `note` ends the message (why the bound, what a boundary value means)."""
    bounds = [f"> {above}"] * (above is not None) + [f">= {at_least}"] * (at_least is not None)
    expected = " ".join(["a finite number", " and ".join(bounds)]).strip() + (f" ({note})" if note else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    number = float(value)
    if (not math.isfinite(number) or (above is not None and not number > above)
            or (at_least is not None and not number >= at_least)):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return number
