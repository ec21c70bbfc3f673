"""One check, and one message, per kind of argument: the same mistake reads the same wherever it is made.

`True` is an int to Python; as a step count or a batch size it is a mistake, so these refuse it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["check_choice", "check_flag", "check_fraction", "check_integer"]


def check_integer(name: str, value: object, *, least: int = 1, none: str | None = None) -> int | None:
    """`value` as an integer >= `least`; None passes where `none` says what it means (e.g. "never")."""
    if value is None and none is not None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        kind = "a positive integer" if least == 1 else f"an integer >= {least}"
        raise ValueError(f"{name}={value!r} must be {kind}" + (f", or None ({none})." if none else "."))
    return value


def check_fraction(name: str, value: object, *, meaning: str = "") -> float:
    """`value` as a number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and 0 <= value <= 1):
        raise ValueError(f"{name}={value!r} must be a number in [0, 1]" + (f" ({meaning})." if meaning else "."))
    return float(value)


def check_choice(name: str, value: object, choices: Iterable[object]) -> object:
    """`value`, if it is one of `choices` (listed in the message in their order)."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}.")
    return value


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r} must be True or False.")
    return value
