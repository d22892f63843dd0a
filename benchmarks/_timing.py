"""Shared timing for the benchmarks: compile apart, warm up, best of ``repeats`` timed calls.

Imported as ``from _timing import time_compiled, best_time`` (the benchmarks run as scripts,
so this folder is on ``sys.path``).
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple

import jax


class Timing(NamedTuple):
    """compile_s: lowering + compilation seconds (0 for :func:`best_time`); best_s: fastest
    timed call; output: the last call's result (blocked until ready)."""

    compile_s: float
    best_s: float
    output: Any


def best_time(fn: Callable, *args, repeats: int = 3, warmup: bool = True) -> Timing:
    """Best wall time of ``fn(*args)`` over ``repeats`` calls, each ended with
    ``block_until_ready``, after one untimed warm-up call."""
    out = jax.block_until_ready(fn(*args)) if warmup else None
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return Timing(0.0, best, out)


def time_compiled(jitted: Callable, *args, repeats: int = 3) -> Timing:
    """Compile ``jitted`` (a ``jax.jit`` function) for ``args`` and time it apart from the calls:
    ``jitted.lower(*args).compile()`` is timed, then :func:`best_time` of the compiled program."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    _, best, out = best_time(compiled, *args, repeats=repeats)
    return Timing(compile_s, best, out)
