"""Estimated vs real labels for 4-shot prompts: Taylor estimator against forward passes.

Both on the same 10,000 random 4-subsets of K=50 candidates (T=16 queries), one target rule, in
one run. Real labels: one forward pass of the NNX transformer per prompt (all queries packed,
vmapped over prompts in chunks). Estimated labels: the second-order Taylor expansion of the query
logits in the demonstrations' inclusion weights (one Hessian at the anchor), then one quadratic
form per prompt. Compile time is reported apart; the anchor is timed including its Hessian.

    python benchmarks/bench_icl.py            # 10,000 subsets, the experiment's model
    python benchmarks/bench_icl.py --smoke    # tiny model, 1,000 subsets (seconds)
"""

from __future__ import annotations

import argparse
import math
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

import kernattr as ka
from kernattr.experiments import icl, icl_estimator as est
from kernattr.experiments.icl_model import cached_icl_model, make_icl_problem, query_losses


def timed(fn, *args, repeats=3):
    t = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t
    jax.block_until_ready(compiled(*args))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - t)
    return out, best, compile_s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--subsets", type=int, default=None)
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args(argv)
    cfg = icl.tiny_config() if args.smoke else icl.ICLExperimentConfig()
    if args.smoke:  # a briefly trained model: the timings do not depend on its quality
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, steps=30))
    m = args.subsets or (1000 if args.smoke else 10_000)
    trained = cached_icl_model(cfg.model, cache_dir=args.cache_dir, progress=not args.smoke)
    p, K, k = cfg.model.p, cfg.num_candidates, cfg.subset_size
    prob = make_icl_problem(jax.random.key(5), p=p, num_candidates=K,
                            num_queries=cfg.num_queries, num_frequent=cfg.num_frequent,
                            num_correct=cfg.num_correct, num_noisy=cfg.num_noisy,
                            num_other_rules=cfg.num_other_rules)
    masks = ka.sample_subsets(jax.random.key(6), num_tasks=K, num_subsets=m, size=k)
    c, q, a, qx = (jnp.asarray(v) for v in (prob.candidates, prob.queries, prob.answers,
                                             prob.query_x))
    anchor = jnp.full((K,), cfg.anchor_mass / K)

    def real(masks):
        return query_losses(trained.apply_fn, trained.params, c, q, a, masks, size=k,
                            chunk_size=256)

    def taylor_only(anchor):
        fn = est.soft_prompt_logits(trained.apply_fn, trained.params, c, p * p + jnp.arange(p))
        return est.prompt_taylor(fn, anchor, order=cfg.taylor_order)

    F, t_real, c_real = timed(real, masks)
    tay, t_tay, c_tay = timed(taylor_only, anchor)
    quad = lambda tay, m: est.estimate_query_losses(  # noqa: E731
        tay, m, qx, a, num_classes=p, order=cfg.taylor_order, diagonal=cfg.taylor_diagonal)
    Fh, t_quad, c_quad = timed(quad, tay, masks)
    t_est, c_est = t_tay + t_quad, c_tay + c_quad
    n_all = math.comb(K, k)
    spearman = float(ka.lds(Fh, F).mean)
    num_params = sum(x.size for x in jax.tree.leaves(trained.params))
    rel = float(jnp.mean(jnp.abs(Fh - F) / jnp.abs(F)))
    print(f"ICL estimator benchmark: {m} random {k}-subsets of K={K} candidates, "
          f"T={cfg.num_queries} queries, p={p}, float32, {jax.device_count()} x "
          f"{jax.devices()[0].platform}, params={num_params}")
    print(f"  forward passes (real labels):      {t_real:8.3f} s  "
          f"({1e6 * t_real / m:8.1f} us/subset; compile {c_real:.1f} s)")
    print(f"  estimated labels (Hessian + forms): {t_est:8.3f} s  "
          f"({1e6 * t_est / m:8.1f} us/subset; compile {c_est:.1f} s)")
    print(f"     of which Hessian at the anchor: {t_tay:8.3f} s; quadratic forms: {t_quad:.3f} s "
          f"({1e6 * t_quad / m:.1f} us/subset)")
    print(f"  speed-up estimated vs real: {t_real / t_est:.1f}x (target >= 10x: "
          f"{'met' if t_real / t_est >= 10 else 'NOT met'}); forms only: {t_real / t_quad:.1f}x")
    amort = (t_real / m * n_all) / (t_tay + t_quad / m * n_all)
    print(f"  extrapolated to all C({K},{k}) = {n_all} subsets (Hessian once): {amort:.1f}x")
    print(f"  accuracy on these subsets: Spearman (per query, mean) {spearman:.3f}, "
          f"mean relative error {rel:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
