"""Argument types shared by the ``kernattr`` command and the ``reproduce`` parsers.

Standard library only, so that building the command's parsers stays light.
"""

from __future__ import annotations

import argparse


def int_at_least(text: str, minimum: int) -> int:
    """Parse a command-line integer that must be at least ``minimum``.

    Args:
      text: the argument as typed.
      minimum: the smallest value accepted.

    Returns:
      The integer.

    Raises:
      argparse.ArgumentTypeError: ``text`` is not an integer, or is below ``minimum`` (argparse
        turns it into a usage error naming the option).

    >>> int_at_least("3", 1)
    3
    >>> int_at_least("0", 1)
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: must be >= 1, got 0
    """
    try:
        v = int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from e
    if v < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
    return v


def positive_int(text: str) -> int:
    """An integer >= 1 (``type=`` of an ``argparse`` option); see :func:`int_at_least`."""
    return int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (``type=`` of an ``argparse`` option); see :func:`int_at_least`."""
    return int_at_least(text, 0)
