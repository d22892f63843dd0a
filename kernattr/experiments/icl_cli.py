"""``kernattr reproduce icl``: argparse wiring (light: jax/flax are imported when it runs)."""

from __future__ import annotations

import argparse
import os
import time

from .cli_args import positive_int as _positive_int


def _run(args: argparse.Namespace) -> int:
    import dataclasses

    from .icl import ICLExperimentConfig, format_table, run_icl, tiny_config

    cfg = tiny_config(args.seed) if args.smoke else ICLExperimentConfig(seed=args.seed)
    kw = {"num_rules": args.rules, "num_train_masks": args.masks,
          "num_heldout_masks": args.heldout_masks, "num_oracle": args.oracle}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in kw.items() if v is not None})
    out = args.out or os.path.abspath(time.strftime("kernattr-icl-%Y%m%d-%H%M%S"))
    t = time.perf_counter()
    res = run_icl(cfg, out=out, cache_dir=args.cache_dir, progress=not args.quiet,
                  plots=not args.no_plots)
    m = res["model"]
    how = "loaded from the cache" if m["cache_hit"] else f"trained in {m['train_seconds']:.0f}s"
    print(f"\nICL: affine rules mod {cfg.model.p}, K={cfg.num_candidates} candidates, "
          f"T={cfg.num_queries} queries, {cfg.subset_size}-shot prompts, "
          f"{res['num_target_rules']} target rules; model {m['num_params']} params ({how})")
    print("ICL curve (loss vs correct demonstrations): "
          + " ".join(f"{v:.2f}" for v in res["icl_curve"]))
    print(format_table(res))
    print(f"wrote {os.path.join(out, 'results.json')} and plots in {time.perf_counter() - t:.1f}s")
    return 0


def add_icl(psub: argparse._SubParsersAction) -> None:
    """Register ``icl`` on the ``kernattr reproduce`` subparsers.

    >>> p = argparse.ArgumentParser(); add_icl(p.add_subparsers())
    >>> p.parse_args(["icl", "--rules", "3"]).rules
    3
    """
    p = psub.add_parser(
        "icl", help="in-context demonstration attribution and selection (2-10 min on 2 CPU "
                    "cores; the upper end on a busy machine or when the model is trained)",
        description="Train (or load from the cache) a small NNX transformer that learns affine "
                    "rules mod p in context; for each target rule attribute 50 candidate "
                    "demonstrations over 4-shot prompts (real labels = forward passes, estimated "
                    "labels = second-order interaction expansion from every 0/1/2-shot prompt), "
                    "fit "
                    "kernel/linear surrogates, compare with gradient alignment, select 4 "
                    "demonstrations by each method; print the table and write results.json "
                    "and plots.")
    p.add_argument("--out", default=None, help="output folder (default ./kernattr-icl-<time>/)")
    p.add_argument("--cache-dir", default=None,
                   help="model cache folder (default $KERNATTR_CACHE or ~/.cache/kernattr)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rules", type=_positive_int, default=None,
                   help="number of target rules (default 10)")
    p.add_argument("--masks", type=_positive_int, default=None,
                   help="surrogate-training 4-shot prompts (default 500)")
    p.add_argument("--heldout-masks", type=_positive_int, default=None,
                   help="held-out prompts for LDS (default 200)")
    p.add_argument("--oracle", type=_positive_int, default=None,
                   help="random prompts scored for the oracle (default 4000)")
    p.add_argument("--smoke", action="store_true", help="tiny configuration (seconds)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)
