"""Benchmark: the RL pipeline's two hot loops on the JAX point-mass tasks.

1. Environment steps per second: deterministic-policy rollouts of many (policy, task, start)
   triples at once (``jax.vmap`` + ``lax.scan``), against an anchor measured in the same run:
   the same dynamics stepped one environment at a time in a numpy loop.
2. Fine-tuning on task masks: the SAC+BC training step of ``kernattr reproduce rl``, all masks
   in one ``jax.vmap`` against a Python loop over masks of the jitted single-mask trainer
   (compiled once). Both must give the same parameters (the script exits non-zero otherwise).

    python benchmarks/bench_rl.py            # default sizes
    python benchmarks/bench_rl.py --smoke    # tiny (CI)
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from _records import record


def best_time(fn, repeats):
    jax.block_until_ready(fn())
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best


def bench_env(num_envs: int, horizon: int, repeats: int) -> dict:
    from kernattr.experiments.rl_env import (BOUND, STEP, default_tasks, env_step,
                                             expert_preaction, start_states)

    tasks, _ = default_tasks()
    K = tasks.goal.shape[0]
    starts = start_states(jax.random.key(0), num_envs)
    goals = tasks.goal[jnp.arange(num_envs) % K]

    @jax.jit
    def run(starts, goals):
        def body(pos, _):
            a = jnp.tanh(expert_preaction(pos, goals))
            nxt, r = jax.vmap(env_step)(pos, a, goals)
            return nxt, r
        return jax.lax.scan(body, starts, None, length=horizon)[1].sum()

    t = time.perf_counter()
    jax.block_until_ready(run(starts, goals))
    compile_s = time.perf_counter() - t
    sec = best_time(lambda: run(starts, goals), repeats)
    jax_sps = num_envs * horizon / sec
    # anchor: numpy, one environment at a time
    s_np, g_np = np.asarray(starts, np.float64), np.asarray(goals, np.float64)
    n_anchor = min(num_envs, 64)
    t = time.perf_counter()
    total = 0.0
    for i in range(n_anchor):
        pos = s_np[i].copy()
        for _ in range(horizon):
            a = np.tanh(2.0 * (g_np[i] - pos))
            pos = np.clip(pos + STEP * np.clip(a, -1, 1), -BOUND, BOUND)
            total -= np.linalg.norm(pos - g_np[i])
    np_sps = n_anchor * horizon / (time.perf_counter() - t)
    return {"envs": num_envs, "horizon": horizon, "jax_steps_per_s": jax_sps,
            "numpy_loop_steps_per_s": np_sps, "ratio": jax_sps / np_sps, "compile_s": compile_s}


def bench_finetune(num_masks: int, steps: int, hidden: int, repeats: int) -> dict:
    import kernattr as ka
    from kernattr.experiments.sac import make_train_step
    from kernattr.labels._losses import task_weights
    from kernattr.experiments import rl
    from kernattr.experiments._rl_common import sac_batch, sac_optimizers

    cfg = rl.RLConfig(hidden=(hidden, hidden), pretrain_steps=5, finetune_steps=steps)
    prep = rl.prepare(cfg, 0)
    K = prep.tasks.goal.shape[0]
    masks = jnp.asarray(ka.sample_subsets(jax.random.key(1), num_tasks=K, num_subsets=num_masks,
                                          p=0.5))
    init, step = make_train_step(prep.sac, **sac_optimizers(cfg.finetune_lr, steps),
                                 bc_weight=1.0, q_weight=0.1, prox=1.0)
    batch = sac_batch(prep.data)
    W = task_weights(masks, prep.data.task_ids, K)
    key = jax.random.key(2)

    def one(w):
        return jax.lax.fori_loop(0, steps, lambda i, s: step(s, batch, w, jax.random.fold_in(
            key, i))[0], init(prep.params0)).params.actor

    vm = jax.jit(jax.vmap(one))
    single = jax.jit(one)
    t = time.perf_counter()
    jax.block_until_ready((vm(W), single(W[0])))
    compile_s = time.perf_counter() - t
    t_vmap = best_time(lambda: vm(W), repeats)
    t_loop = best_time(lambda: [single(W[i]) for i in range(num_masks)], repeats)
    a, b = vm(W), [single(W[i]) for i in range(num_masks)]
    dev = max(float(jnp.max(jnp.abs(x[i] - y))) for i in range(num_masks)
              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b[i])))
    return {"masks": num_masks, "steps": steps, "examples": int(batch.obs.shape[0]),
            "hidden": hidden, "vmap_s": t_vmap, "loop_s": t_loop, "speedup": t_loop / t_vmap,
            "max_param_deviation": dev, "compile_s": compile_s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    args = ap.parse_args(argv)
    if args.smoke:
        env = dict(num_envs=256, horizon=12, repeats=2)
        ft = dict(num_masks=4, steps=5, hidden=8, repeats=1)
    else:
        env = dict(num_envs=8192, horizon=12, repeats=5)
        ft = dict(num_masks=64, steps=60, hidden=32, repeats=2)
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}, float32")
    e = bench_env(**env)
    print(f"env: {e['envs']} envs x {e['horizon']} steps: {e['jax_steps_per_s']:,.0f} steps/s "
          f"(vmapped rollouts) vs {e['numpy_loop_steps_per_s']:,.0f} steps/s (numpy loop, one env "
          f"at a time): {e['ratio']:.1f}x; compile {e['compile_s']:.1f} s")
    f = bench_finetune(**ft)
    print(f"fine-tuning {f['masks']} masks x {f['steps']} SAC+BC steps ({f['examples']} "
          f"transitions, hidden {f['hidden']}): vmap {f['vmap_s']:.2f} s vs loop {f['loop_s']:.2f} s "
          f"-> {f['speedup']:.2f}x; max parameter deviation {f['max_param_deviation']:.1e}; "
          f"compile {f['compile_s']:.1f} s")
    record("vmapped environment rollouts", figure=e["jax_steps_per_s"], unit="steps/s",
           anchor=e["numpy_loop_steps_per_s"], anchor_name="numpy loop, one env at a time",
           higher_is_better=True, sizes=dict(envs=e["envs"], horizon=e["horizon"]))
    record("vmapped SAC+BC fine-tuning of m masks", figure=f["vmap_s"], unit="s",
           anchor=f["loop_s"], anchor_name="python loop over masks (jitted)",
           higher_is_better=False, sizes=dict(m=f["masks"], steps=f["steps"],
                                              transitions=f["examples"], hidden=f["hidden"]))
    if not f["max_param_deviation"] < 1e-3:
        print("FAIL: vmapped and looped fine-tuning disagree")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
