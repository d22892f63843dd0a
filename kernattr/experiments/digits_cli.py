"""``kernattr reproduce digits``: argparse wiring (light: jax/flax/sklearn are imported when it
runs)."""

from __future__ import annotations

import argparse
import os
import time

from .cli_args import positive_int as _positive_int


def _run(args: argparse.Namespace) -> int:
    import dataclasses

    from .digits import DigitsConfig, results_markdown, run_digits, tiny_config

    cfg = tiny_config(seed=args.seed) if args.smoke else DigitsConfig(seed=args.seed)
    if args.masks:
        cfg = dataclasses.replace(cfg, mask_counts=tuple(args.masks))
    if args.no_modular:
        cfg = dataclasses.replace(cfg, modular=None)
    out = args.out or os.path.abspath(time.strftime("kernattr-digits-%Y%m%d-%H%M%S"))
    t = time.perf_counter()
    res = run_digits(cfg, out=out, cache_dir=args.cache_dir, progress=not args.quiet,
                     plots=not args.no_plots, curvature=not args.no_curvature)
    g = res["ground_truth"]
    how = "loaded from the cache" if g["cache_hit"] else "computed"
    print(f"\ndigits: K={res['num_tasks']} classes, {res['num_subsets_retrained']} subsets "
          f"fine-tuned for real ({how}; {g['seconds']:.0f}s of computing from cold)")
    print(results_markdown(res))
    print(f"wrote {os.path.join(out, 'results.json')} and plots in {time.perf_counter() - t:.1f}s")
    return 0


def add_digits(psub: argparse._SubParsersAction) -> None:
    """Register ``digits`` on the ``kernattr reproduce`` subparsers.

    >>> p = argparse.ArgumentParser(); add_digits(p.add_subparsers())
    >>> p.parse_args(["digits", "--masks", "50", "100"]).masks
    [50, 100]
    """
    p = psub.add_parser(
        "digits", help="real images, every task subset retrained: exact Shapley ground truth "
                       "and the curvature study (minutes with the ground truth cached)",
        description="Train a small NNX CNN on scikit-learn's digits (tasks = the 10 classes, "
                    "targets = held-out images), fine-tune it for real on all 1,024 subsets of "
                    "classes (cached), compute exact LOO / Shapley / Banzhaf values and "
                    "interactions, score kernel / linear / quadratic surrogates, influence "
                    "functions, TRAK and TracIn against them, and run the curvature study "
                    "(W0 trained plain / SAM / noise-stability) on this model and on the "
                    "modular-arithmetic transformer; print the tables and write results.json "
                    "and plots. Needs scikit-learn (the `digits` extra).")
    p.add_argument("--out", default=None, help="output folder (default ./kernattr-digits-<time>/)")
    p.add_argument("--cache-dir", default=None,
                   help="ground-truth cache folder (default $KERNATTR_CACHE or ~/.cache/kernattr)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--masks", type=_positive_int, nargs="+", default=None,
                   help="numbers m of masks the surrogates are fitted on (default 50 100 200)")
    p.add_argument("--no-curvature", action="store_true", help="skip the curvature study")
    p.add_argument("--no-modular", action="store_true",
                   help="curvature study on the digits model only")
    p.add_argument("--smoke", action="store_true", help="tiny configuration (seconds)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_run)
