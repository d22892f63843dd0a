"""Run every benchmark, print one table, and write one JSON of all their headline figures.

Each ``benchmarks/bench_*.py`` runs as its own subprocess (clean memory, its own thread pools,
a hung or crashed benchmark cannot take the others down) with the environment variable
``KERNATTR_BENCH_RECORDS`` naming a file; the benchmark writes its headline figures there
(``_records.record``): each figure, its anchor measured in the same run, the ratio (> 1: the
contender is better), the sizes, the dtype, the JAX backend and the device kind. Nothing here
names a device: the benchmarks run on whatever JAX finds (set ``JAX_PLATFORMS`` to choose).

Usage:
  python benchmarks/run_all.py --smoke --json bench.json      # CI: tiny sizes, checked
  python benchmarks/run_all.py --json bench.json              # full sizes (hours on 2 CPU cores)
  python benchmarks/run_all.py --only lds,estimation          # a subset (names without bench_)

Benchmarks run with the caller's environment, ``XLA_FLAGS`` included (recorded in the JSON):
CI's smoke run sets cheap-compile flags, which make its timings meaningless but check every code
path in a fraction of the time; full-size figures come from runs with XLA's defaults.

Exit status 0 only if every benchmark ran, exited 0 within ``--timeout`` seconds and gave at
least one record, and every record's ratio is a finite number (:func:`check`).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = "KERNATTR_BENCH_RECORDS"


def benchmark_names() -> list[str]:
    """Every benchmark script in this folder, as ``bench_<name>`` (sorted)."""
    return sorted(os.path.splitext(os.path.basename(p))[0]
                  for p in glob.glob(os.path.join(HERE, "bench_*.py")))


# Benchmarks that start several worker processes one after another and so take longest; they
# start first so that the slots of ``--jobs`` finish together.
FIRST = ("bench_gpt2", "bench_gradients")


def _schedule(names: list[str]) -> list[str]:
    """Start order for the pool: the long benchmarks of ``FIRST`` ahead, then the rest in order."""
    return [n for n in FIRST if n in names] + [n for n in names if n not in FIRST]


def _stack_dump(pid: int) -> str:
    """Native + Python stacks of a hung process (py-spy if installed, else gdb), for the log."""
    if shutil.which("py-spy"):
        cmd = ["py-spy", "dump", "--native", "--pid", str(pid)]
    elif shutil.which("gdb"):
        cmd = ["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt"]
    else:
        return "(no py-spy or gdb: no stack dump)"
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        return r.stdout + r.stderr
    except (OSError, subprocess.SubprocessError) as e:
        return f"(stack dump failed: {e})"


def run_one(name: str, smoke: bool, timeout: float, extra: list[str], log_dir: str | None) -> dict:
    """Run ``bench_<name>.py`` in a subprocess; returns its status, wall time and records."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        rec_path = f.name
    env = dict(os.environ, **{ENV: rec_path})
    cmd = [sys.executable, os.path.join(HERE, f"{name}.py"), *(["--smoke"] if smoke else []),
           *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    timed_out, dump = False, ""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        dump = _stack_dump(proc.pid)
        proc.kill()
        out, _ = proc.communicate()
    seconds = time.perf_counter() - t0
    records = []
    if os.path.getsize(rec_path):
        with open(rec_path) as f:
            records = json.load(f)
    os.unlink(rec_path)
    if log_dir:
        with open(os.path.join(log_dir, f"{name}.log"), "w") as f:
            f.write(out + (f"\n== TIMED OUT after {timeout:.0f} s; stacks:\n{dump}" if timed_out
                           else ""))
    return dict(command=" ".join(cmd[1:]), returncode=proc.returncode, timed_out=timed_out,
                seconds=seconds, records=records, output_tail=out[-3000:] + dump[-6000:])


def _environment() -> dict:
    import jax

    dev = jax.devices()[0]
    return dict(jax=jax.__version__, backend=jax.default_backend(), device_kind=dev.device_kind,
                device_count=jax.device_count(), machine=platform.machine(),
                python=platform.python_version(), cpus=os.cpu_count(),
                load_1m=os.getloadavg()[0], xla_flags=os.environ.get("XLA_FLAGS", ""))


def check(results: dict, expected: list[str] | None = None) -> list[str]:
    """Problems with a run_all result: a benchmark missing, failed, timed out or without records,
    or a ratio that is not a finite number. Empty when the run is complete."""
    problems = []
    benches = results.get("benchmarks", {})
    for name in expected if expected is not None else benchmark_names():
        if name not in benches:
            problems.append(f"{name}: missing")
            continue
        b = benches[name]
        if b.get("timed_out"):
            problems.append(f"{name}: timed out after {b['seconds']:.0f} s")
        elif b.get("returncode") != 0:
            problems.append(f"{name}: exit status {b.get('returncode')}")
        if not b.get("records"):
            problems.append(f"{name}: no records")
        for r in b.get("records", []):
            ratio = r.get("ratio")
            if not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
                problems.append(f"{name}: {r.get('name')}: ratio {ratio!r} is not a number")
    return problems


def _fmt(x, unit: str = "") -> str:
    if x is None:
        return "-"
    if unit == "s":
        return f"{x * 1e3:.3g} ms" if abs(x) < 1 else f"{x:.3g} s"
    return f"{x:.4g}" + (f" {unit}" if unit else "")


def _records_table(benchmarks: dict) -> list:
    lines = [
        "| benchmark | figure | contender | anchor | ratio (>1: better) | target | sizes | dtype |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, b in benchmarks.items():
        for r in b.get("records", []):
            sizes = ", ".join(f"{k}={v}" for k, v in r.get("sizes", {}).items())
            ratio = r.get("ratio")
            target = r.get("target")
            met = ""
            if ratio is not None and target is not None:
                met = " (met)" if ratio >= target else " (not met)"
            lines.append(
                f"| {name.removeprefix('bench_')} | {r['name']} | {_fmt(r.get('figure'), r['unit'])} "
                f"| {_fmt(r.get('anchor'), r['unit'])} ({r['anchor_name']}) "
                f"| {'-' if ratio is None else f'{ratio:.3g}x'}{met} "
                f"| {'-' if target is None else f'{target:g}x'} | {sizes} | {r.get('dtype', '')} |")
    return lines


def results_markdown(results: dict) -> str:
    """Markdown tables of a run_all result (the JSON written by ``--json``).

    Args:
      results: the dict ``run_all.py --json`` writes (``environment``, ``smoke``,
        ``benchmarks`` -> ``{name: {records, seconds, returncode, ...}}``).

    Returns:
      Markdown: a line on the machine, one table row per record (benchmark, figure, anchor,
      ratio, target, sizes); the same for the optional ``full_size`` runs
      (``{name: {records}}``); the optional ``gpt2`` scaling table (``bench_gpt2.py --json``
      rows); then the benchmark run times.
    """
    env = results.get("environment", {})
    lines = [
        f"Run {results.get('created', '?')} ({'smoke sizes' if results.get('smoke') else 'full sizes'}): "
        f"JAX {env.get('jax', '?')}, backend `{env.get('backend', '?')}`, device "
        f"`{env.get('device_kind', '?')}` x {env.get('device_count', '?')}, {env.get('cpus', '?')} "
        f"CPUs, load {env.get('load_1m', float('nan')):.1f} at the start"
        + (f", `XLA_FLAGS={env['xla_flags']}`." if env.get("xla_flags") else "."),
        "",
    ]
    lines += _records_table(results.get("benchmarks", {}))
    full = results.get("full_size")
    if full:
        lines += ["", "Full-size runs of some benchmarks (separate runs, same machine):", ""]
        lines += _records_table(full)
    gpt2 = results.get("gpt2")
    if gpt2:
        lines += ["", "Per-example projected gradients of GPT-2-shaped models "
                  "(`bench_gpt2.py`, separate run):", "", gpt2_markdown(gpt2)]
    lines += ["", "| benchmark | wall time | exit status |", "|---|---|---|"]
    for name, b in results.get("benchmarks", {}).items():
        status = "timed out" if b.get("timed_out") else str(b.get("returncode"))
        lines.append(f"| {name.removeprefix('bench_')} | {b['seconds']:.1f} s | {status} |")
    return "\n".join(lines) + "\n"


def gpt2_markdown(rows: list) -> str:
    """Scaling tables of ``bench_gpt2.py --json`` rows, per model size and projector kind: speed
    (examples/s and JL error of kernattr and of the torch.func anchor), then memory (peak RSS,
    the floor before any gradient work, XLA's temporary buffers, and the memory ratio with its
    ceiling: the anchor's peak over kernattr's floor). Figures a row lacks print as ``-``."""
    def fig(side, key, spec):  # one side's figure, "-" where the row lacks it
        return format(side[key], spec) if side.get(key) is not None else "-"

    def gb(x):
        return f"{x / 1024:.2f} GB" if x is not None else "-"

    speed = ["| model | D | projector | kernattr ex/s | torch.func ex/s | speed ratio "
             "| JL error kernattr | JL error torch.func |", "|---|---|---|---|---|---|---|---|"]
    memory = ["| model | projector | kernattr peak RSS | kernattr floor | XLA temp "
              "| torch.func peak RSS | torch.func floor | memory ratio | ratio ceiling |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        j, t = r["jax"], r.get("torch") or {}
        model = f"{r['size']} ({r['layers']} x {r['d_model']})"
        ratio = f"{j['examples_per_s'] / t['examples_per_s']:.2f}x" if t else "-"
        speed.append(
            f"| {model} | {r['D'] / 1e6:.1f}M | {r['kind']} | {j['examples_per_s']:.3f} "
            f"| {fig(t, 'examples_per_s', '.3f')} | {ratio} | {j['jl_entry_err']:.4f} "
            f"| {fig(t, 'jl_entry_err', '.4f')} |")
        mem = f"{t['peak_rss_mb'] / j['peak_rss_mb']:.2f}x" if t else "-"
        ceiling = (f"{t['peak_rss_mb'] / j['floor_rss_mb']:.2f}x"
                   if t and j.get("floor_rss_mb") else "-")
        temp = j.get("xla_temp_mb")
        memory.append(
            f"| {model} | {r['kind']} | {gb(j['peak_rss_mb'])} | {gb(j.get('floor_rss_mb'))} "
            f"| {gb(temp)} | {gb(t.get('peak_rss_mb'))} | {gb(t.get('floor_rss_mb'))} | {mem} "
            f"| {ceiling} |")
    return "\n".join(speed + [""] + memory)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--only", default="", help="comma list of benchmark names (without bench_), run in this order")
    p.add_argument("--jobs", type=int, default=1,
                   help="benchmarks run at once (timings of parallel runs share the cores)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds per benchmark before it is killed and reported as hung "
                        "(default 300 with --smoke, none otherwise)")
    p.add_argument("--log-dir", default=None, help="keep each benchmark's full output here")
    p.add_argument("--args", action="append", default=[], metavar="NAME=ARGS",
                   help="extra arguments for one benchmark, e.g. --args 'lds=--seeds 1'")
    a = p.parse_args(argv)
    names = benchmark_names()
    if a.only:
        wanted = {f"bench_{n.removeprefix('bench_')}" for n in a.only.split(",")}
        unknown = wanted - set(names)
        if unknown:
            p.error(f"unknown benchmark(s) {sorted(unknown)}; known: {names}")
        names = [f"bench_{n.removeprefix('bench_')}" for n in a.only.split(",")]  # given order
    extra = {}
    for item in a.args:
        n, _, rest = item.partition("=")
        extra[f"bench_{n.removeprefix('bench_')}"] = rest.split()
    timeout = a.timeout if a.timeout is not None else (300.0 if a.smoke else None)
    if a.log_dir:
        os.makedirs(a.log_dir, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    environment = _environment()
    t0 = time.perf_counter()

    def job(name):
        r = run_one(name, a.smoke, timeout, extra.get(name, []), a.log_dir)
        status = "TIMED OUT" if r["timed_out"] else f"exit {r['returncode']}"
        print(f"== {name}: {status}, {r['seconds']:.1f} s, {len(r['records'])} record(s)",
              flush=True)
        if r["timed_out"] or r["returncode"] != 0:
            print(r["output_tail"], flush=True)
        return name, r

    done = {}

    def snapshot() -> dict:
        """The results so far (benchmarks in ``names`` order); written after every benchmark so
        that an interrupted run keeps what it measured."""
        res = dict(created=started, smoke=a.smoke, command=" ".join([os.path.basename(
            sys.argv[0]), *(argv if argv is not None else sys.argv[1:])]),
            total_seconds=time.perf_counter() - t0, environment=environment,
            benchmarks={n: {k: v for k, v in done[n].items() if k != "output_tail"}
                        for n in names if n in done})
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)
        return res

    lock = threading.Lock()

    def job_and_save(name):
        n, r = job(name)
        with lock:
            done[n] = r
            snapshot()

    with ThreadPoolExecutor(max(1, a.jobs)) as pool:
        list(pool.map(job_and_save, _schedule(names) if a.jobs > 1 else names))
    results = snapshot()
    print()
    print(results_markdown(results))
    problems = check(results, names)
    for prob in problems:
        print(f"run_all: {prob}", file=sys.stderr)
    print(f"run_all: {len(names)} benchmark(s) in {results['total_seconds']:.0f} s; "
          + ("all present, every ratio a number" if not problems else f"{len(problems)} problem(s)"))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
