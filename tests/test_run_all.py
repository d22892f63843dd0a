"""benchmarks/run_all.py: the completeness check, the Markdown tables and the record ratios
(fast: no benchmark is run here; CI runs them all with ``run_all.py --smoke``)."""

import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run_all():
    return _load("run_all")


def _result(names, ratio=2.0, rc=0):
    rec = dict(name="speed", figure=1.0, unit="s", anchor=2.0, anchor_name="loop", ratio=ratio,
               target=None, sizes={"m": 3}, dtype="float32")
    return dict(created="now", smoke=True, environment=dict(backend="cpu", device_kind="cpu"),
                benchmarks={n: dict(returncode=rc, timed_out=False, seconds=1.0,
                                    records=[rec]) for n in names})


def test_every_benchmark_script_records_a_figure(run_all):
    names = run_all.benchmark_names()
    assert "bench_lds" in names and len(names) >= 10
    for n in names:
        assert "record(" in (BENCH / f"{n}.py").read_text(), f"{n} never calls record()"


def test_check_accepts_a_complete_run_and_names_each_problem(run_all):
    names = ["bench_a", "bench_b"]
    assert run_all.check(_result(names), names) == []
    assert run_all.check(_result(names[:1]), names) == ["bench_b: missing"]
    for bad in (None, float("nan"), float("inf"), "3x"):
        probs = run_all.check(_result(names, ratio=bad), names)
        assert len(probs) == 2 and all("not a number" in p for p in probs)
    assert run_all.check(_result(names, rc=1), names) == [
        "bench_a: exit status 1", "bench_b: exit status 1"]
    hung = _result(names)
    hung["benchmarks"]["bench_a"].update(timed_out=True, returncode=-9)
    assert run_all.check(hung, names)[0].startswith("bench_a: timed out")
    empty = _result(names)
    empty["benchmarks"]["bench_b"]["records"] = []
    assert run_all.check(empty, names) == ["bench_b: no records"]


def test_results_markdown_has_one_row_per_record(run_all):
    md = run_all.results_markdown(_result(["bench_a", "bench_b"], ratio=12.5))
    rows = [line for line in md.splitlines() if line.startswith("| a ") or line.startswith("| b ")]
    assert len(rows) == 4  # one record row + one wall-time row per benchmark
    assert "12.5x" in md and "m=3" in md and "`cpu`" in md


def test_results_markdown_names_the_xla_flags_of_the_run(run_all):
    res = _result(["bench_a"])
    assert "XLA_FLAGS" not in run_all.results_markdown(res)
    res["environment"]["xla_flags"] = "--xla_backend_optimization_level=0"
    assert "`XLA_FLAGS=--xla_backend_optimization_level=0`" in run_all.results_markdown(res)


def test_gpt2_tables_give_the_memory_ratio_and_its_ceiling(run_all):
    jax_side = dict(examples_per_s=2.0, peak_rss_mb=1024.0, floor_rss_mb=512.0, xla_temp_mb=256.0,
                    jl_entry_err=0.1)
    torch_side = dict(examples_per_s=0.5, peak_rss_mb=3072.0, floor_rss_mb=600.0, jl_entry_err=0.1)
    row = dict(size="gpt2", layers=12, d_model=768, D=124e6, kind="sjlt", jax=jax_side,
               torch=torch_side)
    old = dict(row, jax={k: v for k, v in jax_side.items() if "floor" not in k and "temp" not in k})
    speed, memory = run_all.gpt2_markdown([row, old]).split("\n\n")
    assert "| 4.00x |" in speed.splitlines()[2]
    new_mem, old_mem = memory.splitlines()[2:]
    # memory ratio: anchor's peak / kernattr's peak; ceiling: anchor's peak / kernattr's floor
    assert "| 1.00 GB | 0.50 GB | 0.25 GB | 3.00 GB | 0.59 GB | 3.00x | 6.00x |" in new_mem
    assert old_mem.endswith("| 1.00 GB | - | - | 3.00 GB | 0.59 GB | 3.00x | - |")


def test_schedule_starts_the_multi_process_benchmarks_first(run_all):
    names = run_all.benchmark_names()
    order = run_all._schedule(names)
    assert sorted(order) == sorted(names)                     # every benchmark, once
    assert order[: len(run_all.FIRST)] == list(run_all.FIRST)
    rest = [n for n in names if n not in run_all.FIRST]
    assert order[len(run_all.FIRST):] == rest                  # the others keep their order
    assert run_all._schedule(["bench_lds", "bench_gpt2"]) == ["bench_gpt2", "bench_lds"]


def test_record_ratio_is_oriented_so_that_above_one_is_better(tmp_path):
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from _records import record\n"
        "record('t', figure=0.5, unit='s', anchor=2.0, anchor_name='a', higher_is_better=False,"
        " sizes={})\n"
        "record('r', figure=30.0, unit='ex/s', anchor=10.0, anchor_name='a',"
        " higher_is_better=True, sizes={})\n"
        "record('n', figure=1.0, unit='s', anchor=None, anchor_name='a', higher_is_better=False,"
        " sizes={})\n"
    )
    out = tmp_path / "rec.json"
    subprocess.run([sys.executable, "-c", code, str(BENCH)], check=True,
                   env={"KERNATTR_BENCH_RECORDS": str(out), "JAX_PLATFORMS": "cpu",
                        "PATH": "/usr/bin:/bin"})
    recs = json.loads(out.read_text())
    assert [r["ratio"] for r in recs[:2]] == [4.0, 3.0]
    assert recs[2]["ratio"] is None
    assert all(r["backend"] == "cpu" and r["device_kind"] for r in recs)
    assert not math.isnan(recs[0]["figure"])
