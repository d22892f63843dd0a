"""Test configuration, set before JAX starts: 8 fake CPU devices, strict rank promotion, a
cheaper XLA CPU backend, programs executed inline (no asynchronous CPU dispatch), a persistent
compilation cache shared by the test processes, and JAX's in-memory program caches dropped after
each test file.

Most of the suite's time is JAX lowering and XLA compiling small programs that then run for
milliseconds. The XLA flags of ``tools/cheap_compile.py`` make that compile cheaper and leave the
results within the tests' tolerances: LLVM's optimisation level 0 without its expensive passes,
and XLA:CPU's older elemental emitters instead of its MLIR fusion emitters (the results pages of
the documentation give the measurements). They only apply to the tests (and the processes they spawn); the
library, the benchmarks and the ``kernattr`` commands compile with XLA's defaults. A flag you set
in ``XLA_FLAGS`` yourself wins.

Many tests compile the same small programs (a fresh ``jax.jit`` of the same function in each
test, the same program in both xdist workers, the doctests). JAX's persistent compilation cache
in ``.jax_cache/`` at the repository root (git-ignored) lets each be compiled once: every
executable is written, however short its compile time or small its size, and the processes the
tests spawn (CLI, notebooks) use the same cache through the environment.

Eviction is off (no size limit). With a size limit, JAX takes a file lock around every cache
read and write, and every write lists, stats and reads the access time of every entry to decide
what to evict: the cost of a write grows with the cache, the suite's thousands of writes grow
quadratically, and the other worker waits on the lock meanwhile. Without eviction there is no
lock; a worker that reads an entry another one is still writing gets a truncated zlib stream,
which JAX reports as a warning and answers by compiling (the result is the same). The folder
only grows: delete ``.jax_cache/`` to reclaim the space.
``JAX_COMPILATION_CACHE_DIR`` set to another folder wins; set it to an empty string to switch
the cache off.
"""

import gc
import importlib.util
import os
import pathlib


def _load_cheap_compile():
    """``tools/cheap_compile.py``: the compile flags the tests share with the docs build and CI."""
    path = pathlib.Path(__file__).resolve().parent.parent / "tools" / "cheap_compile.py"
    spec = importlib.util.spec_from_file_location("cheap_compile", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ["XLA_FLAGS"] = _load_cheap_compile().with_cheap_compile(os.environ["XLA_FLAGS"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"))
if os.environ["JAX_COMPILATION_CACHE_DIR"]:
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", "-1")  # no eviction: see above

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
# kernattr's compiled programs carry host callbacks (its input checks, some inside loops); with
# JAX's asynchronous CPU dispatch such programs can hang (jax-ml/jax#25861): run them inline, as
# the `kernattr` command does.
jax.config.update("jax_cpu_enable_async_dispatch", False)


class _ReleaseCompiledPrograms:
    """Drop JAX's in-memory caches of traced, lowered and compiled programs after each test file.

    Every live compiled program makes each later lowering slower (in MLIR's type and attribute
    uniquing), so a test process that kept the programs of hundreds of tests would compile its
    later tests far slower than a fresh process does. Programs are reused within a file
    (module fixtures, the same shapes), rarely across files, and the persistent cache above still
    serves a program that a later file compiles again. A plugin rather than a fixture, so that it
    also covers the doctests under ``kernattr/``.
    """

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_teardown(self, item, nextitem):
        if nextitem is None or nextitem.path != item.path:
            jax.clear_caches()
            gc.collect()


def pytest_configure(config):
    config.pluginmanager.register(_ReleaseCompiledPrograms(), "kernattr-release-compiled")


@pytest.fixture
def x64():
    """Run a test with float64 enabled, restored afterwards."""
    with jax.enable_x64(True):
        yield


def tol(dtype):
    """(rtol, atol) appropriate for a dtype."""
    import numpy as np

    return (1e-10, 1e-10) if np.dtype(dtype) == np.float64 else (2e-5, 2e-5)
