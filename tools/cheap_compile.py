"""The XLA:CPU flags that make compiling cheap, in one place for the tests, the documentation
build and CI's benchmark smoke runs.

Those run many small programs once each, so compiling is most of their time. The flags turn on
LLVM's optimisation level 0 without its expensive passes, and XLA:CPU's older elemental
emitters instead of its MLIR fusion emitters. Results stay within the tests' tolerances; the
benchmarks page of the documentation gives the measurements. The library, the ``kernattr``
commands and full-size benchmark runs keep XLA's defaults.

Usage: ``python tools/cheap_compile.py`` prints ``$XLA_FLAGS`` with the flags added.
"""

from __future__ import annotations

import os

FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
    "--xla_cpu_use_fusion_emitters=false",
)


def with_cheap_compile(xla_flags: str) -> str:
    """``xla_flags`` plus each flag of :data:`FLAGS` it does not set already (the caller's wins).

    >>> with_cheap_compile("--xla_cpu_use_fusion_emitters=true").split()  # doctest: +NORMALIZE_WHITESPACE
    ['--xla_cpu_use_fusion_emitters=true', '--xla_backend_optimization_level=0',
     '--xla_llvm_disable_expensive_passes=true']
    """
    for flag in FLAGS:
        if flag.split("=")[0] not in xla_flags:
            xla_flags += " " + flag
    return xla_flags.strip()


if __name__ == "__main__":
    print(with_cheap_compile(os.environ.get("XLA_FLAGS", "")))
