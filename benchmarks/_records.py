"""Machine-readable benchmark figures, collected by ``benchmarks/run_all.py``.

A benchmark calls :func:`record` once per headline figure (next to where it prints it). When the
environment variable ``KERNATTR_BENCH_RECORDS`` names a file, the records are written there as a
JSON list when the process exits; otherwise :func:`record` only keeps them in memory, so a
benchmark run by hand behaves exactly as before.

Imported as ``from _records import record`` (the benchmarks run as scripts, so this folder is on
``sys.path``).
"""

from __future__ import annotations

import atexit
import json
import math
import os
import sys
from typing import Any

ENV = "KERNATTR_BENCH_RECORDS"
RECORDS: list[dict] = []


def _device() -> dict:
    """JAX backend and device kind of this process (whatever JAX found)."""
    import jax

    dev = jax.devices()[0]
    return dict(backend=jax.default_backend(), device_kind=dev.device_kind,
                device_count=jax.device_count())


def _number(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def record(name: str, *, figure: float, unit: str, anchor: float | None, anchor_name: str,
           higher_is_better: bool, sizes: dict, dtype: str = "float32",
           target: float | None = None, note: str = "") -> dict:
    """Keep one headline figure of the running benchmark.

    Args:
      name: what is measured, e.g. ``"lds speed"``.
      figure: the contender's figure (seconds, examples/s, an error, ...), in ``unit``.
      unit: unit of ``figure`` and ``anchor``.
      anchor: the same figure for the anchor measured in the same run (``None`` if the
        benchmark has no anchor at this size; the ratio is then missing and the run_all check
        fails).
      anchor_name: what the anchor is.
      higher_is_better: direction of ``figure``; the ratio is oriented so that > 1 means the
        contender is better (``anchor / figure`` for times, ``figure / anchor`` for rates).
      sizes: problem sizes (ints / strings).
      dtype: floating dtype of the computation.
      target: the ratio the project aims for, if any.
      note: a short remark (extrapolation, threads, ...).
    """
    fig, anc = _number(figure), _number(anchor)
    ratio = None
    if fig is not None and anc is not None and fig != 0 and anc != 0:
        ratio = fig / anc if higher_is_better else anc / fig
    rec = dict(benchmark=os.path.splitext(os.path.basename(sys.argv[0]))[0], name=name,
               figure=fig, unit=unit, anchor=anc, anchor_name=anchor_name, ratio=ratio,
               higher_is_better=higher_is_better, target=target, sizes=dict(sizes), dtype=dtype,
               note=note, **_device())
    RECORDS.append(rec)
    return rec


@atexit.register
def _write() -> None:
    path = os.environ.get(ENV)
    if path:
        with open(path, "w") as f:
            json.dump(RECORDS, f, indent=1)
