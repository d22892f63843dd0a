"""Estimated vs real labels for 4-shot prompts: interaction estimator against forward passes.

Both on the same 10,000 random 4-subsets of K=50 candidates (T=16 queries), one target rule, in
one run. Real labels: one forward pass of the NNX transformer per prompt (all T queries packed,
vmapped over prompts in chunks), as :func:`query_losses` computes them; also with only the
``p`` distinct query inputs packed (a cheaper forward a careful user could write). Estimated
labels (default estimator): the exact logits of every distinct 0-, 1- and 2-shot prompt
(``est.distinct_prompts``: at most ``1 + K + K(K-1)/2 = 1276`` short forward passes, fewer when
candidates share tokens; counted in full, the numpy planning included), then per subset a gather
of 4 main effects and 6 pair interactions and an exact softmax. The forward anchors: all T
queries packed; the distinct query inputs packed; and also identical 4-shot prompts run once
(numpy deduplication timed with it). The gradient Taylor estimator (its
Hessian counted in full) is timed alongside for comparison. Compile time is reported apart.

    python benchmarks/bench_icl.py            # 10,000 subsets, the experiment's model
    python benchmarks/bench_icl.py --smoke    # tiny model, 1,000 subsets (seconds; no Taylor)
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

import kernattr as ka
from kernattr.experiments import icl, icl_estimator as est
from kernattr.experiments.icl_model import cached_icl_model, make_icl_problem, query_losses
from _records import record
from _timing import best_time, time_compiled


def timed(fn, *args, repeats=3):
    """``(output, best seconds, compile seconds)`` of ``jax.jit(fn)`` (:func:`time_compiled`)."""
    t = time_compiled(jax.jit(fn), *args, repeats=repeats)
    return t.output, t.best_s, t.compile_s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--subsets", type=int, default=None)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--no-taylor", action="store_true", help="skip the Taylor comparison")
    args = ap.parse_args(argv)
    cfg = icl.tiny_config() if args.smoke else icl.ICLExperimentConfig()
    if args.smoke:  # a briefly trained model: the timings do not depend on its quality
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, steps=30))
    m = args.subsets or (1000 if args.smoke else 10_000)
    trained = cached_icl_model(cfg.model, cache_dir=args.cache_dir, progress=not args.smoke)
    apply_fn, params = trained.apply_fn, trained.params
    p, K, k = cfg.model.p, cfg.num_candidates, cfg.subset_size
    prob = make_icl_problem(jax.random.key(5), p=p, num_candidates=K,
                            num_queries=cfg.num_queries, num_frequent=cfg.num_frequent,
                            num_correct=cfg.num_correct, num_noisy=cfg.num_noisy,
                            num_other_rules=cfg.num_other_rules)
    masks = ka.sample_subsets(jax.random.key(6), num_tasks=K, num_subsets=m, size=k)
    c, q, a, qx = (jnp.asarray(v) for v in (prob.candidates, prob.queries, prob.answers,
                                             prob.query_x))
    allq = p * p + jnp.arange(p)

    def real(masks):
        return query_losses(apply_fn, params, c, q, a, masks, size=k, chunk_size=256)

    def real_distinct(masks):  # the p distinct queries packed, then expanded to the T queries
        ans = (prob.rule[0] * jnp.arange(p) + prob.rule[1]) % p
        return query_losses(apply_fn, params, c, allq, ans, masks, size=k,
                            chunk_size=256)[:, qx]

    def interactions_all(c):  # every one of the 1 + K + K(K-1)/2 short prompts
        return est.prompt_interactions(apply_fn, params, c, allq)

    def interactions(c, plan):  # identical short prompts once
        return est.prompt_interactions(apply_fn, params, c, allq, plan=plan)

    # The strongest forward anchor: identical 4-shot prompts (same tokens in the same order) run
    # once, distinct queries packed; the deduplication is timed with it.
    def dedupe_masks():
        idx = np.asarray(est.subset_indices(masks, k))  # the kept candidates, in order
        _, rep, inv = np.unique(np.asarray(c)[idx], axis=0, return_index=True, return_inverse=True)
        return rep, inv.reshape(-1)

    def forms(inter, masks):
        return est.interaction_query_losses(inter, masks, qx, a, size=k)

    F, t_real, c_real = timed(real, masks)
    F2, t_real2, c_real2 = timed(real_distinct, masks)
    dd = best_time(dedupe_masks, warmup=False)
    (rep, inv), t_dedupe = dd.output, dd.best_s
    u_masks = masks[jnp.asarray(rep)]
    F3u, t_real3, c_real3 = timed(real_distinct, u_masks)
    t_real3 = t_real3 + t_dedupe
    F3 = F3u[jnp.asarray(inv)]
    _, t_int_all, _ = timed(interactions_all, c)
    pl = best_time(lambda: est.distinct_prompts(np.asarray(c)), warmup=False)
    plan, t_plan = pl.output, pl.best_s
    inter, t_int, c_int = timed(interactions, c, plan)
    t_int = t_int + t_plan
    Fh, t_form, c_form = timed(forms, inter, masks)
    t_est = t_int + t_form
    n_all = math.comb(K, k)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    n_short = 1 + K + K * (K - 1) // 2
    n_plan = 1 + plan.single_tokens.shape[0] + plan.pair_first.shape[0]

    def accuracy(Fh):
        return float(ka.lds(Fh, F).mean), float(jnp.mean(jnp.abs(Fh - F) / jnp.abs(F)))

    sp, rel = accuracy(Fh)
    print(f"ICL estimator benchmark: {m} random {k}-subsets of K={K} candidates, "
          f"T={cfg.num_queries} queries ({p} distinct), p={p}, float32, {jax.device_count()} x "
          f"{jax.devices()[0].platform}, params={num_params}")
    print(f"  forward passes, T={cfg.num_queries} queries packed (real labels): {t_real:8.3f} s "
          f"({1e6 * t_real / m:7.1f} us/subset; compile {c_real:.1f} s)")
    print(f"  forward passes, {p} distinct queries packed:       {t_real2:8.3f} s "
          f"({1e6 * t_real2 / m:7.1f} us/subset; compile {c_real2:.1f} s; max |diff| "
          f"{float(jnp.max(jnp.abs(F2 - F))):.1e})")
    print(f"  forward passes, {len(rep)} distinct prompts x {p} distinct queries: {t_real3:8.3f} s "
          f"(dedupe {1e3 * t_dedupe:.1f} ms included; compile {c_real3:.1f} s; max |diff| "
          f"{float(jnp.max(jnp.abs(F3 - F))):.1e})")
    print(f"  estimated labels (interactions): {t_est:8.3f} s ({1e6 * t_est / m:7.1f} us/subset; "
          f"compile {c_int + c_form:.1f} s)")
    print(f"     of which {n_plan} distinct short prompts (0-2 shots; {n_short} before deduplication, "
          f"{t_int_all:.3f} s): {t_int:.3f} s (plan {1e3 * t_plan:.2f} ms included); gathers + "
          f"softmax: {t_form:.3f} s ({1e6 * t_form / m:.2f} us/subset)")
    for name, t_ref in (("T-query forward", t_real), ("distinct-query forward", t_real2),
                        ("distinct-prompt, distinct-query forward", t_real3)):
        r = t_ref / t_est
        record(f"estimated subset labels vs {name}", figure=t_est, unit="s", anchor=t_ref,
               anchor_name=name, higher_is_better=False, target=10.0,
               sizes=dict(m=m, subset_size=k, K=K, T=cfg.num_queries, params=int(num_params)))
        print(f"  speed-up vs {name}: {r:.1f}x (target >= 10x: "
              f"{'met' if r >= 10 else 'NOT met'})")
    amort = (t_real / m * n_all) / (t_int + t_form / m * n_all)
    print(f"  without deduplicating the short prompts: {t_int_all + t_form:.3f} s, "
          f"{t_real2 / (t_int_all + t_form):.1f}x vs distinct-query forward")
    print(f"  extrapolated to all C({K},{k}) = {n_all} subsets vs T-query forward: {amort:.1f}x")
    print(f"  accuracy on these subsets (interactions): Spearman (per query, mean) {sp:.3f}, "
          f"mean relative error {rel:.3f}")
    if not (args.no_taylor or args.smoke):
        def taylor(anchor):
            fn = est.soft_prompt_logits(apply_fn, params, c, allq)
            return est.prompt_taylor(fn, anchor, order=cfg.taylor_order)

        anchor = jnp.full((K,), cfg.anchor_mass / K)
        tay, t_tay, _ = timed(taylor, anchor, repeats=1)
        Fh_t, t_quad, _ = timed(lambda tay, m: est.estimate_query_losses(
            tay, m, qx, a, num_classes=p, order=cfg.taylor_order,
            diagonal=cfg.taylor_diagonal), tay, masks)
        sp_t, rel_t = accuracy(Fh_t)
        print(f"  for comparison, Taylor at the soft anchor (mass {cfg.anchor_mass:g}): "
              f"Hessian {t_tay:.3f} s + forms {t_quad:.3f} s = {t_real / (t_tay + t_quad):.1f}x "
              f"vs T-query forward; Spearman {sp_t:.3f}, relative error {rel_t:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
