"""Benchmark: subset-label estimation (issue 3, benchmark 2).

m masks over K tasks, n training examples, d projected dims, logistic loss, zero offsets. Anchor:
a Python loop of scikit-learn ``LogisticRegression`` (lbfgs, ``fit_intercept=False``, tight
``tol``), one fit per mask on the same objective: the task weights of the mask go in
``sample_weight`` and ``C = 1 / ridge`` (sklearn minimises ``C Σ sw_i ℓ_i + ||w||²/2``, ours
``Σ w_i ℓ_i + ridge ||θ||²/2``, the same minimiser). When the full loop would take too long it is
timed on the first ``--sk-masks`` masks and extrapolated linearly (printed as such).

Prints: sizes, dtype, device count, compile times apart, wall times, the RATIOS against the
sklearn loop measured in the same run, label agreement of "exact" with sklearn (relative), and
the deviation of "fast" from "exact" at several ridges. Exits non-zero if a check fails.

    .venv/bin/python benchmarks/bench_estimation.py            # full sizes (minutes on 2 cores)
    .venv/bin/python benchmarks/bench_estimation.py --smoke    # tiny, < 30 s
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from threadpoolctl import threadpool_limits

import kernattr as ka
from _records import record
from _timing import time_compiled
from kernattr.labels._losses import task_weights


def make_problem(seed, n, num_tasks, d, num_targets, num_masks):
    """Logistic data with task-specific true parameters; zero base outputs."""
    rng = np.random.default_rng(seed)
    task_ids = np.arange(n) % num_tasks
    rng.shuffle(task_ids)
    grads = rng.normal(size=(n, d)).astype(np.float32) / np.sqrt(d)
    shared = rng.normal(size=d) * 3.0
    per_task = shared[None, :] + rng.normal(size=(num_tasks, d)) * 2.0
    logits = np.einsum("nd,nd->n", grads, per_task[task_ids])
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    tgrads = rng.normal(size=(num_targets, d)).astype(np.float32) / np.sqrt(d)
    tlabels = (rng.random(num_targets) < 1.0 / (1.0 + np.exp(-tgrads @ shared))).astype(np.float32)
    masks = (rng.random((num_masks, num_tasks)) < 0.5).astype(np.float32)
    masks[masks.sum(1) == 0, 0] = 1.0
    train = ka.GradientFeatures(
        jnp.asarray(grads), jnp.zeros((n,), jnp.float32), jnp.asarray(labels), jnp.asarray(task_ids)
    )
    target = ka.GradientFeatures(
        jnp.asarray(tgrads), jnp.zeros((num_targets,), jnp.float32), jnp.asarray(tlabels)
    )
    return train, target, jnp.asarray(masks)


def target_loss(theta, target):
    """Logistic loss of every target example at ``theta [m, d]`` -> ``[m, T]`` (numpy, f64)."""
    z = np.asarray(theta, np.float64) @ np.asarray(target.grads, np.float64).T
    sign = 2.0 * np.asarray(target.labels, np.float64) - 1.0
    return np.logaddexp(0.0, -sign[None, :] * z)


def sklearn_loop(train, masks, ridge, num_masks, tol):
    from sklearn.linear_model import LogisticRegression

    grads = np.asarray(train.grads, np.float64)
    labels = np.asarray(train.labels)
    weights = np.asarray(task_weights(masks[:num_masks], train.task_ids, masks.shape[1]))
    thetas = []
    start = time.perf_counter()
    for w in weights:
        sel = w > 0
        model = LogisticRegression(C=1.0 / ridge, fit_intercept=False, tol=tol, max_iter=10_000)
        model.fit(grads[sel], labels[sel], sample_weight=w[sel])
        thetas.append(model.coef_[0])
    return np.stack(thetas), time.perf_counter() - start


def time_solver(train, target, masks, ridge, solver, chunk, repeats, labels_only):
    """Times the main API (labels only; diagnostics then come from a separate, untimed call),
    or ``estimate_subset_labels(..., diagnostics=True)`` (``labels_only=False``: one compile less)."""
    kw = dict(loss="logistic", solver=solver, mask_chunk_size=chunk)
    diag = jax.jit(lambda tr, tg, mk, r: ka.estimate_subset_labels(tr, tg, mk, ridge=r,
                                                                   diagnostics=True, **kw))
    fn = diag
    if labels_only:
        fn = jax.jit(lambda tr, tg, mk, r: ka.estimate_subset_labels(tr, tg, mk, ridge=r, **kw))
    args = (train, target, masks, jnp.float32(ridge))
    compile_s, best_s, _ = time_compiled(fn, *args, repeats=repeats)
    return diag(*args), compile_s, best_s, diag


def rel_dev(a, b):
    """(max, median) of |a - b| / |b| over all entries."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    r = np.abs(a - b) / np.maximum(np.abs(b), 1e-12)
    return float(r.max()), float(np.median(r))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, < 30 s")
    p.add_argument("--m", type=int, default=1024)
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--K", type=int, default=100)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--T", type=int, default=256)
    p.add_argument("--ridge", type=float, default=1e-2, help="ridge of the timed comparison")
    p.add_argument("--dev-ridges", type=str, default="1e-3,1e-2,1e-1",
                   help="ridges at which fast-vs-exact deviation is reported")  # fmt: skip
    p.add_argument("--sk-masks", type=int, default=64, help="masks fitted by sklearn (extrapolated)")
    p.add_argument("--sk-tol", type=float, default=1e-10)
    p.add_argument("--chunk", type=int, default=None, help="mask_chunk_size (default automatic)")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    if args.smoke:
        args.m, args.n, args.K, args.d, args.T = 32, 600, 8, 16, 16
        args.sk_masks, args.repeats, args.dev_ridges = 32, 1, "1e-2"

    train, target, masks = make_problem(0, args.n, args.K, args.d, args.T, args.m)
    print(
        f"sizes: m={args.m} masks, n={args.n} examples, K={args.K} tasks, d={args.d}, "
        f"T={args.T} targets, loss=logistic, ridge={args.ridge}, dtype=float32, "
        f"devices={jax.device_count()} ({jax.default_backend()}); machine shared with other "
        "engineers: compare the ratios, not the absolute times"
    )
    ok = True

    sk_masks = min(args.sk_masks, args.m)
    # The anchor gets its faster BLAS threading (OpenBLAS threads thrash on a loaded machine).
    sk_theta, sk_default = sklearn_loop(train, masks, args.ridge, sk_masks, args.sk_tol)
    with threadpool_limits(1):
        _, sk_one = sklearn_loop(train, masks, args.ridge, sk_masks, args.sk_tol)
    sk_s = min(sk_default, sk_one)
    print(f"sklearn loop on {sk_masks} masks: {sk_default:.2f} s with default BLAS threads, "
          f"{sk_one:.2f} s with 1 thread; using the faster")  # fmt: skip
    sk_total = sk_s * args.m / sk_masks
    note = "measured" if sk_masks == args.m else f"extrapolated from {sk_masks} masks"
    print(f"sklearn LogisticRegression loop: {sk_s:.2f} s for {sk_masks} masks -> "
          f"{sk_total:.2f} s for {args.m} ({note}); {sk_total / args.m * 1e3:.1f} ms/mask")  # fmt: skip
    sk_labels = target_loss(sk_theta, target)

    compiled, timings = {}, {}
    # jaxlib's CPU Cholesky calls scipy's OpenBLAS LAPACK: pin it to one thread (see above).
    blas_one = threadpool_limits(1)
    for solver in ("exact", "fast", "anchored"):
        est, comp, wall, compiled[solver] = time_solver(
            train, target, masks, args.ridge, solver, args.chunk, args.repeats, not args.smoke
        )
        timings[solver] = wall
        conv = int(np.sum(np.asarray(est.converged)))
        iters = np.asarray(est.num_iterations)
        print(f"{solver:>5}: compile {comp:.2f} s, run {wall:.3f} s ({wall / args.m * 1e3:.2f} "
              f"ms/mask), converged {conv}/{args.m}, Newton iterations mean {iters.mean():.1f} "
              f"max {iters.max()}, RATIO vs sklearn {sk_total / wall:.1f}x")  # fmt: skip
        record(f"{solver} subset labels", figure=wall, unit="s", anchor=sk_total,
               anchor_name="sklearn LogisticRegression loop" + ("" if sk_masks == args.m else
                                                                " (extrapolated)"),
               higher_is_better=False, target={"exact": 10.0, "fast": 100.0}.get(solver),
               sizes=dict(m=args.m, n=args.n, K=args.K, d=args.d, T=args.T))
        if solver == "exact":
            target_x = 10.0
            mx, med = rel_dev(est.labels[:sk_masks], sk_labels)
            print(f"exact vs sklearn labels (first {sk_masks} masks): relative deviation max "
                  f"{mx:.2e}, median {med:.2e} (target <= 1e-3)")  # fmt: skip
            ok &= mx <= 1e-3 and conv == args.m
        elif solver == "fast":
            target_x = 100.0
        else:
            continue  # "anchored" (beyond the issue): no target, ratio printed above
        speed = sk_total / wall
        print(f"       target >= {target_x:.0f}x: {'MET' if speed >= target_x else 'NOT MET'}")
        # Speed targets are reported, not asserted: the machine is shared.

    # Floor of the "fast" solver: per mask it assembles sum_k c_k A_k from packed per-task
    # Hessians ([m, K] @ [K, d(d+1)/2]), unpacks it to [m, d, d] and factors it (Cholesky);
    # the same three operations on random data of the same shapes, jitted alone, bound its time
    # from below on this backend (the per-task statistics, solves and target losses are left out).
    P = args.d * (args.d + 1) // 2
    rows, cols = np.tril_indices(args.d)
    full = np.zeros((args.d, args.d), np.int32)
    full[rows, cols] = full[cols, rows] = np.arange(P)
    a_pk = jnp.asarray(np.random.default_rng(1).normal(size=(args.K, P)).astype(np.float32))
    eye_pk = jnp.asarray((rows == cols).astype(np.float32) * args.K)

    def floor_ops(mk):
        h = (mk @ (a_pk * 1e-3) + eye_pk)[:, full].reshape(-1, args.d, args.d)
        return jax.lax.linalg.cholesky(h, symmetrize_input=False)

    _, floor_s, _ = time_compiled(jax.jit(floor_ops), masks, repeats=args.repeats)
    mm = jax.jit(lambda mk: mk @ a_pk)
    _, mm_s, _ = time_compiled(mm, masks, repeats=args.repeats)
    fast_s = timings["fast"]
    print(f"floor of fast: assembly matmul + unpack + batched Cholesky alone {floor_s:.3f} s "
          f"({floor_s / fast_s:.0%} of fast), of which the [m, K] @ [K, d(d+1)/2] matmul "
          f"{mm_s:.3f} s ({2 * args.m * args.K * P / mm_s / 1e9:.1f} GFLOP/s); ratio if "
          f"everything else were free {sk_total / floor_s:.1f}x")
    record("floor: fast solver's assembly + Cholesky alone", figure=floor_s, unit="s",
           anchor=sk_total, anchor_name="sklearn LogisticRegression loop", higher_is_better=False,
           sizes=dict(m=args.m, n=args.n, K=args.K, d=args.d, T=args.T),
           note=f"the ratio fast would reach if all but these were free; they are "
                f"{floor_s / fast_s:.0%} of fast; the matmul alone {mm_s:.3f} s")

    for r in [float(x) for x in args.dev_ridges.split(",")]:
        fx = compiled["exact"](train, target, masks, jnp.float32(r))
        for name in ("fast", "anchored"):
            fn = compiled[name]
            ff = fn(train, target, masks, jnp.float32(r))
            mx, med = rel_dev(ff.labels, fx.labels)
            mean_rel = float(np.mean(
                np.abs(np.mean(ff.labels, 1) - np.mean(fx.labels, 1)) / np.mean(fx.labels, 1)))
            print(f"{name} vs exact at ridge={r:g}: label relative deviation max {mx:.2e}, "
                  f"median {med:.2e}; mean-target-loss relative deviation {mean_rel:.2e}")
            ok &= bool(np.all(np.isfinite(np.asarray(ff.labels)))) and bool(np.all(fx.converged))
    blas_one.restore_original_limits()
    if not ok:
        print("FAILED")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
