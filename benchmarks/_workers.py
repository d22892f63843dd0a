"""The environment of a benchmark worker process that must run on one thread.

Imported as ``from _workers import one_thread_xla_flags`` (the benchmarks run as scripts, so this
folder is on ``sys.path``). Standard library only: the drivers that start workers do not import
JAX themselves.
"""

from __future__ import annotations

import os

# XLA:CPU on one thread: no multi-threaded Eigen kernels, one intra-op thread.
ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def one_thread_xla_flags() -> str:
    """The caller's ``XLA_FLAGS`` (CI sets cheap-compile flags for smoke runs) plus
    :data:`ONE_THREAD`, for a worker's environment."""
    return (os.environ.get("XLA_FLAGS", "") + " " + ONE_THREAD).strip()
