"""Command-line argument types shared by ``precision-sweep`` (``studies.cli``) and ``studies.ddp``.

Each type is an argparse ``type=`` callable that raises ``argparse.ArgumentTypeError`` with a one-line message
naming what is valid; :class:`OneLineParser` prints parse errors as one line (no usage block) and exits 2.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Callable, NoReturn

__all__ = ["OneLineParser", "int_at_least", "positive_int", "nonneg_int", "positive_float"]


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports errors as ONE line, ``precision-sweep: error: <message>``, and exits with status 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"precision-sweep: error: {message}\n")
        raise SystemExit(2)


def int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse ``type`` for an integer >= ``minimum`` (``what`` names the range in the error)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < minimum:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}")
        return v

    return parse


positive_int = int_at_least(1, "positive")
nonneg_int = int_at_least(0, "non-negative")


def positive_float(text: str) -> float:
    """An argparse ``type`` for a finite number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v
