"""Minimal reproduction attempt: a jitted program with a host callback inside a loop, run many
times on the XLA CPU backend with asynchronous dispatch (JAX's default) and without it.

kernattr's jitted checks (``error_if``) put ``jax.debug.callback`` host callbacks into compiled
programs, often inside ``lax.while_loop``/``lax.map`` bodies; ``bench_lds.py --smoke`` compiles
several such programs. JAX issue jax-ml/jax#25861 (open) reports that such programs can hang on
the CPU backend with asynchronous dispatch on and run through with
``jax_cpu_enable_async_dispatch=False``; openxla/xla#33048 reports that XLA:CPU's while loop may
block in async mode. This script runs that pattern ``--iters`` times with a watchdog: when the
process's CPU time stops advancing for ``--stall`` seconds it prints every thread's stack
(py-spy or gdb when installed, Python's faulthandler always) and exits 3.

Usage:
  python benchmarks/xla_hang_repro.py --iters 20000            # JAX's default (async dispatch)
  python benchmarks/xla_hang_repro.py --iters 20000 --no-async # jax_cpu_enable_async_dispatch=False
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import shutil
import subprocess
import sys
import threading
import time


def _watchdog(progress: list, stall: float) -> None:
    def cpu():
        t = os.times()
        return t.user + t.system

    prev, flat = cpu(), 0.0
    while True:
        time.sleep(1.0)
        c = cpu()
        flat = flat + 1.0 if c - prev < 0.005 else 0.0
        prev = c
        if flat >= stall:
            print(f"HUNG at iteration {progress[0]}: CPU time flat for {flat:.0f} s", flush=True)
            faulthandler.dump_traceback(all_threads=True)
            tool = shutil.which("py-spy")
            cmd = ([tool, "dump", "--native", "--pid", str(os.getpid())] if tool else
                   ["gdb", "-p", str(os.getpid()), "-batch", "-ex", "thread apply all bt"])
            if shutil.which(cmd[0]):
                print(subprocess.run(cmd, capture_output=True, text=True).stdout, flush=True)
            os._exit(3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=5000)
    p.add_argument("--steps", type=int, default=50, help="while-loop trips per call")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--branches", type=int, default=4, help="independent loops per program")
    p.add_argument("--stall", type=float, default=30.0)
    p.add_argument("--no-async", action="store_true", help="jax_cpu_enable_async_dispatch=False")
    a = p.parse_args(argv)
    import jax
    import jax.numpy as jnp

    if a.no_async:
        jax.config.update("jax_cpu_enable_async_dispatch", False)

    seen = [0]

    def on_host(count):  # like kernattr's error_if: a no-op unless something is wrong
        seen[0] += int(count) > 10**9

    def body(carry):
        i, x = carry
        jax.debug.callback(on_host, jnp.sum(x > 1e30))
        x = jnp.tanh(x @ x.T / a.size) + 0.01 * i
        return i + 1, x

    @jax.jit
    def f(x):
        # --branches independent loops: XLA:CPU may run them (and their callbacks) concurrently
        outs = []
        for b in range(a.branches):
            _, xb = jax.lax.while_loop(lambda c: c[0] < a.steps, body, (0, x + b))
            jax.debug.callback(on_host, jnp.sum(jnp.isnan(xb)))
            outs.append(xb)
        x = sum(outs)
        return jnp.sum(x), x[0]

    x = jnp.ones((a.size, a.size), jnp.float32) / a.size
    progress = [0]
    threading.Thread(target=_watchdog, args=(progress, a.stall), daemon=True).start()
    t0 = time.perf_counter()
    for it in range(a.iters):
        progress[0] = it
        s, row = f(x)
        float(s), float(row[0])  # read on the main thread, as the benchmarks do
    print(f"OK: {a.iters} calls in {time.perf_counter() - t0:.1f} s, async dispatch "
          f"{'off' if a.no_async else 'on'}, jax {jax.__version__}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
