"""Two processes x two CPU devices (jax.distributed, gloo over loopback) give the
single-process projected gradients, features, subset labels, Nyström and pairwise fits and CG
solve."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import _multiprocess_worker as worker

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 120  # hard limit per run so CI never hangs


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_match_single_process(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}  # XLA_FLAGS: worker
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([HERE, env.get("PYTHONPATH", "")])
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.join(HERE, "_multiprocess_worker.py"), str(i), "2", str(port), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT_S)
            logs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"multi-process run exceeded {TIMEOUT_S}s (killed)")
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed:\n{logs[i][-4000:]}"

    # single-process reference (one device)
    apply_fn, params, X, y, task_ids, Xt, yt, proj, masks = worker.problem()
    grads, outputs, labels = worker.compute(apply_fn, params, X, y, task_ids, Xt, yt, proj, masks)
    assert grads.shape == (worker.N, worker.DIM) and labels.shape == (worker.M, 4)
    for i in range(2):
        r = np.load(tmp_path / f"process_{i}.npz")
        assert int(r["num_devices"]) == 4
        # each process held 2 of the 4 shards of 4 examples, sharded on `data`
        assert list(r["local_rows"]) == [worker.N // 4] * 2
        assert all(s.startswith("P('data'") for s in r["specs"]), r["specs"]
        np.testing.assert_allclose(r["grads"], grads, rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(r["outputs"], outputs, rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(r["labels"], labels, rtol=1e-4, atol=1e-5)
    # surrogates on masks sharded over the two processes == one device
    ny_coef, ny_cv, cg_sol, quad = worker.surrogate_compute(*worker.surrogate_problem())
    assert all(np.isfinite(np.asarray(a)).all() for a in quad)
    for i in range(2):
        r = np.load(tmp_path / f"process_{i}.npz")
        assert bool(r["ny_replicated"]) and str(r["cg_spec"]).startswith("P('data'")
        np.testing.assert_allclose(r["ny_cv"], ny_cv, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(r["ny_coef"], ny_coef, rtol=2e-3, atol=2e-3 * np.abs(ny_coef).max())
        np.testing.assert_allclose(r["cg_sol"], cg_sol, rtol=1e-3, atol=1e-3 * np.abs(cg_sol).max())
        assert bool(r["quad_replicated"])
        np.testing.assert_allclose(r["quad_cv"], quad[1], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(r["quad_pairwise"], quad[0], rtol=1e-3, atol=1e-4 * np.abs(quad[0]).max())
        np.testing.assert_allclose(r["quad_noise"], quad[2], rtol=1e-4)
        np.testing.assert_allclose(r["walsh_cv"], quad[4], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(r["walsh_pairwise"], quad[3], rtol=1e-3, atol=1e-4 * np.abs(quad[3]).max())
        np.testing.assert_allclose(r["ard_pairwise"], quad[5], rtol=1e-3, atol=1e-3 * np.abs(quad[5]).max())
        np.testing.assert_allclose(r["ard_noise"], quad[6], rtol=1e-3)
        np.testing.assert_allclose(r["ard16_pairwise"], quad[7], rtol=1e-3, atol=1e-3 * np.abs(quad[7]).max())
    assert jax.device_count() == 8  # the parent process was left alone
