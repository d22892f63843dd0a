"""``kernattr reproduce rl`` and ``kernattr reproduce mt10``: argparse wiring (light imports)."""

from __future__ import annotations

import argparse
import os
import time

from .cli_args import positive_int as _positive_int


def _seeds(text: str) -> tuple:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from e
    if not seeds:
        raise argparse.ArgumentTypeError("expected at least one seed")
    return seeds


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None,
                   help="output folder for results.json, predictions.npz and plots "
                        "(default: a fresh ./kernattr-out-<timestamp>/)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_rl(args) -> int:
    from .rl import RLConfig, format_table, run_rl

    kw = {}
    if args.seeds is not None:
        kw["seeds"] = args.seeds
    if args.masks is not None:
        kw["num_train_masks"] = args.masks
    if args.heldout_masks is not None:
        kw["num_heldout_masks"] = args.heldout_masks
    if args.kernel is not None:
        kw["kernel"] = args.kernel
    return _run_and_report(run_rl, format_table, RLConfig(**kw), args)


def _run_and_report(run, format_fn, cfg, args) -> int:
    """Runs ``run(cfg, out=...)``, prints its table and where ``results.json`` went."""
    out = args.out or os.path.abspath(time.strftime("kernattr-out-%Y%m%d-%H%M%S"))
    t = time.perf_counter()
    res = run(cfg, out=out, progress=not args.quiet, plots=not args.no_plots)
    print(format_fn(res))
    print(f"wrote {os.path.join(out, 'results.json')} in {time.perf_counter() - t:.1f}s")
    return 0


def add_rl(psub: argparse._SubParsersAction) -> None:
    """Register ``reproduce rl`` on the ``reproduce`` subparsers."""
    p = psub.add_parser(
        "rl", help="multi-task SAC on a JAX point-mass environment (roughly 8-20 min on 2 CPU "
                   "cores; the upper end on a busy machine)",
        description="Train multi-task SAC+BC offline on 10 point-mass tasks (W0), fine-tune it for "
                    "real on task subsets (ground truth: target returns by rollouts), estimate the "
                    "subsets with the gradient estimator, compare kernel/linear surrogates, "
                    "datamodels, influence and TracIn (LDS with bootstrap intervals, LOO "
                    "correlation), and select companion tasks for 3 targets by each method.")
    p.add_argument("--seeds", type=_seeds, default=None, help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--masks", type=_positive_int, default=None,
                   help="masks with real labels for kernel_real/datamodels (default 64)")
    p.add_argument("--heldout-masks", type=_positive_int, default=None,
                   help="held-out masks for LDS (default 64)")
    p.add_argument("--kernel", choices=("rbf", "linear+rbf", "polynomial", "linear"), default=None,
                   help="kernel of the kernel surrogates (default linear+rbf)")
    _common(p)
    p.set_defaults(func=_run_rl)


def _run_mt10(args) -> int:
    try:
        import metaworld  # noqa: F401
    except ImportError:
        raise SystemExit("kernattr reproduce mt10: needs the optional extra: "
                         "pip install 'kernattr[rl]' (metaworld, mujoco)") from None
    from .rl_mt10 import MT10Config, format_mt10, run_mt10

    cfg = MT10Config.quick(seed=args.seed) if args.quick else MT10Config(seed=args.seed)
    return _run_and_report(run_mt10, format_mt10, cfg, args)


def add_mt10(psub: argparse._SubParsersAction) -> None:
    """Register ``reproduce mt10`` (needs ``kernattr[rl]``)."""
    p = psub.add_parser(
        "mt10", help="Meta-World MT10 with SAC (needs kernattr[rl]; --quick: 5-15 min on 2 CPU "
                     "cores, the upper end on a busy machine)",
        description="Noisy scripted-expert data on the 10 MT10 tasks, multi-task SAC+BC W0, real "
                    "fine-tuning on task subsets with MuJoCo rollouts (return, success), the "
                    "gradient estimator, surrogates and baselines, companion selection.")
    p.add_argument("--quick", action="store_true", help="smaller configuration (<= 15 min)")
    p.add_argument("--seed", type=int, default=0)
    _common(p)
    p.set_defaults(func=_run_mt10)
