"""Benchmark: active mask selection on real fine-tuning (the ``kernattr demo`` experiment).

The modular-arithmetic transformer of ``kernattr demo`` (K = 25 tasks, T = 48 targets, fine-tuning
from ``W0`` with prox 0.03 for 200 steps, masks of density 0.9). A "retrain" is a real vmapped
fine-tuning run. Random arm: the demo's training masks (real labels from the ground-truth cache)
in a random order, prefixes of ``--start``, ``--start + --batch``, ... ``--budget`` masks.
Active arm: the same first ``--start`` masks, then rounds of ``--batch`` masks chosen by
``ka.select_masks`` (integrated variance over a ``--candidates`` pool of Bernoulli(0.9) masks,
fantasised updates) from the current surrogate, each really fine-tuned, then refitted. Both arms
fit ``ka.fit_kernel`` (default kernel and grids), ``ka.fit_quadratic`` or
``ka.fit_quadratic(..., ard_steps=--ard-steps)`` (``--surrogate kernel|quadratic|ard``; with
``ard`` the random arm of ``fit_quadratic`` without ARD is printed too) and are scored on the
demo's 100 held-out masks (``--keep-kernel``: the active arm keeps the kernel's
``(gamma, mix)`` chosen on the random start): held-out LDS with a 95% bootstrap interval, and the
paired interval of active - random at every size. Printed per seed and averaged over seeds, with
the retrains at which active reaches random's LDS at ``--budget`` (target ratio <= 0.7).

    python benchmarks/bench_active_modular.py --plot active_modular.png     # ~5 min with a warm cache
    python benchmarks/bench_active_modular.py --smoke                       # tiny model, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from _records import record
from _active import plot_curves, print_mean_curves, report_model_saving, report_reach, surrogate_fit


def describe(s) -> str:
    """The chosen hyperparameters of a fitted surrogate, in one short string."""
    if getattr(s, "gamma", None) is not None:
        return f"gamma {float(s.gamma[0]):.3g} mix {float(s.mix[0]):.2f} ridge {float(s.ridge[0]):.3g}"
    out = f"ratio {float(s.ratio[0]):.3g} ridge {float(s.ridge[0]):.3g}"
    if getattr(s, "feature_prior", None) is not None:
        fp = np.asarray(s.feature_prior)
        out += f" ARD: {int(np.sum(fp > 1e-3 * fp.max()))}/{fp.size} features kept"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--start", type=int, default=20)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--budget", type=int, default=100)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--candidates", type=int, default=2048)
    p.add_argument("--surrogate", default="kernel", choices=["kernel", "quadratic", "ard"])
    p.add_argument("--ard-steps", type=int, default=50)
    p.add_argument("--keep-kernel", action="store_true",
                   help="active arm: keep the kernel (gamma, mix) chosen on the random start; ridge by LOO")
    p.add_argument("--pool", default="bernoulli", choices=["bernoulli", "fixed-size"],
                   help="candidates: Bernoulli(density) masks, or masks of exactly round(density*K) tasks")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--plot", default=None)
    a = p.parse_args(argv)

    import kernattr as ka
    from kernattr.experiments import pipeline as pl

    cfg = pl.demo_config()
    if a.smoke:
        cfg = dataclasses.replace(cfg, num_tasks=6, num_train_masks=24, num_heldout_masks=24,
                                  pretrain_steps=20, finetune_steps=5, noise_ceiling=False,
                                  d_model=16, d_mlp=32)
        a.start, a.batch, a.budget, a.seeds, a.candidates = 8, 8, 24, 1, 64
    t0 = time.perf_counter()
    prep = pl.prepare_stage(cfg)
    masks = pl.masks_stage(cfg, prep)
    gt = pl.ground_truth_stage(cfg, prep, masks, cache_dir=a.cache_dir, progress=not a.smoke)
    runner = pl.make_runner(cfg, prep.data, prep.apply_fn, prep.init_fn)
    print(f"sizes: K={cfg.num_tasks} T={gt.train.shape[1]} prox={cfg.prox} steps={cfg.finetune_steps} "
          f"density={cfg.densities} start={a.start} batch={a.batch} budget={a.budget} seeds={a.seeds} "
          f"pool={a.candidates} ({a.pool}) surrogate={a.surrogate} held-out={len(masks.heldout)} "
          f"cpus={os.cpu_count()} load(1m)={os.getloadavg()[0]:.1f} "
          f"(ground truth {'cached' if gt.cache_hit else 'computed'}, {time.perf_counter() - t0:.0f} s)")
    if a.budget > len(masks.train):
        raise SystemExit(f"--budget {a.budget} exceeds the {len(masks.train)} cached training masks")

    def real(m):
        return pl.real_labels(cfg, prep.data, prep.apply_fn, prep.params0, prep.init_fn, m,
                              runner=runner)[0]

    fit = surrogate_fit(ka, a.surrogate, a.ard_steps)
    fit_grid = jax.jit(ka.fit_quadratic)
    fit_kept = jax.jit(lambda x, yy, g, w: ka.fit_kernel(x, yy, gamma=g, mix=w))
    density = float(cfg.densities[0]) if len(cfg.densities) == 1 else 0.5
    if a.pool == "bernoulli":
        select = jax.jit(lambda k, s: ka.select_masks(k, s, a.batch, num_candidates=a.candidates,
                                                      p=density))
    else:
        size = int(round(density * cfg.num_tasks))
        select = jax.jit(lambda k, s: ka.select_masks(k, s, a.batch, candidates=ka.sample_subsets(
            k, num_tasks=cfg.num_tasks, num_subsets=a.candidates, size=size)))
    held, y_held = jnp.asarray(masks.heldout), jnp.asarray(gt.heldout)
    sizes = list(range(a.start, a.budget + 1, a.batch))
    rand, act = np.zeros((a.seeds, len(sizes))), np.zeros((a.seeds, len(sizes)))
    grid = np.zeros((a.seeds, len(sizes)))
    paired = []
    n_real, t_real = 0, 0.0
    for seed in range(a.seeds):
        order = np.random.default_rng(seed).permutation(len(masks.train))
        pool, y_pool = masks.train[order], gt.train[order]
        preds_r = []
        for i, n in enumerate(sizes):
            pr = ka.predict(fit(jnp.asarray(pool[:n]), jnp.asarray(y_pool[:n])), held)
            rand[seed, i] = float(ka.lds(pr, y_held).mean)
            preds_r.append(pr)
            if a.surrogate == "ard":
                pg = ka.predict(fit_grid(jnp.asarray(pool[:n]), jnp.asarray(y_pool[:n])), held)
                grid[seed, i] = float(ka.lds(pg, y_held).mean)
        x, yy = pool[: a.start], y_pool[: a.start]
        row, hyper = [], []
        for i, n in enumerate(sizes):
            if a.keep_kernel and i > 0 and a.surrogate == "kernel":
                s = fit_kept(jnp.asarray(x), jnp.asarray(yy), s0.gamma[0], s0.mix[0])
            else:
                s = s0 = fit(jnp.asarray(x), jnp.asarray(yy))
            hyper.append(describe(s) + f" density {float(np.mean(x[-a.batch:])):.2f}")
            pa = ka.predict(s, held)
            act[seed, i] = float(ka.lds(pa, y_held).mean)
            ci = ka.paired_lds_interval(jax.random.key(100 + i), pa, preds_r[i], y_held)
            row.append((float(ci.mean), float(ci.low), float(ci.high)))
            if n < a.budget:
                new = np.asarray(select(jax.random.key(1000 * seed + i), s))
                t = time.perf_counter()
                y_new = real(new)
                t_real += time.perf_counter() - t
                n_real += len(new)
                x, yy = np.concatenate([x, new]), np.concatenate([yy, y_new])
        paired.append(row)
        print(f"seed {seed} active fits (chosen hyperparameters; mean density of the last {a.batch} masks): "
              + "; ".join(f"{n}: {h}" for n, h in zip(sizes, hyper)))
        print(f"seed {seed}: random {np.round(rand[seed], 4).tolist()}  active {np.round(act[seed], 4).tolist()}")
        print("  active - random, paired 95% bootstrap over held-out masks: "
              + ", ".join(f"{n}: {m:+.3f} [{lo:+.3f}, {hi:+.3f}]" for n, (m, lo, hi) in zip(sizes, row)))
    r, ac = rand.mean(0), act.mean(0)
    print_mean_curves(sizes, rand, act, unit="order")
    ci = ka.lds_interval(jax.random.key(7), preds_r[-1], y_held)
    print(f"random at {a.budget} (last seed): LDS {float(ci.mean):.3f} [{float(ci.low):.3f}, {float(ci.high):.3f}]")
    if gt.heldout_repeat is not None:
        nc = ka.lds_interval(jax.random.key(8), jnp.asarray(gt.heldout_repeat), y_held)
        print(f"noise ceiling (another W0): {float(nc.mean):.3f} [{float(nc.low):.3f}, {float(nc.high):.3f}]")
    record("held-out LDS at the budget, active vs random masks", figure=ac[-1], unit="LDS",
           anchor=r[-1], anchor_name="random masks (the demo's training masks)",
           higher_is_better=True,
           sizes=dict(K=cfg.num_tasks, T=int(gt.train.shape[1]), budget=a.budget, seeds=a.seeds,
                      surrogate=a.surrogate),
           note=f"last order's paired difference {row[-1][0]:+.3f} [{row[-1][1]:+.3f}, "
                f"{row[-1][2]:+.3f}]")
    report_reach(sizes, rand, act, a.budget, unit="order")
    if a.surrogate == "ard":
        report_model_saving(sizes, grid, rand, a.budget, unit="order")
    print(f"real fine-tuning of the chosen masks: {n_real} masks in {t_real:.0f} s; total {time.perf_counter() - t0:.0f} s")
    if a.plot:
        plot_curves(a.plot, sizes, r, ac, random_label="random (demo's training masks)",
                    active_label=f"select_masks (integrated, {a.surrogate})",
                    xlabel="real fine-tunings (masks)",
                    title=f"kernattr demo task, K={cfg.num_tasks}, {a.seeds} orders")
    return 0 if np.all(np.isfinite(ac)) else 1


if __name__ == "__main__":
    sys.exit(main())
