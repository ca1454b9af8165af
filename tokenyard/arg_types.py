"""argparse `type=` checks the commands share: a value out of range is a usage error that
names the option and what was expected (argparse prefixes the option), before any work."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

_N = TypeVar("_N", int, float)


def _checked(text: str, parse: Callable[[str], _N], ok: Callable[[_N], bool], expected: str) -> _N:
    try:
        value = parse(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def at_least_one(text: str) -> int:
    """An integer >= 1 (counts, versions, limits)."""
    return _checked(text, int, lambda v: v >= 1, "an integer >= 1")


def port(text: str) -> int:
    """A TCP port to listen on; 0 asks for any free one."""
    return _checked(text, int, lambda v: 0 <= v <= 65535, "a TCP port 1-65535 (0: any free port)")


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    return _checked(text, float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _checked(text, float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def seconds(text: str) -> float:
    """A deadline: a finite number of seconds > 0."""
    return _checked(text, float, lambda v: math.isfinite(v) and v > 0, "a number of seconds > 0")
