"""``kernattr reproduce lora``: argparse wiring (light: jax/flax are imported when it runs)."""

from __future__ import annotations

import argparse
import json
import os
import time


def _run(args: argparse.Namespace) -> int:
    from .lora import LoraConfig, results_markdown, run_lora, tiny_config
    from .lora_pretrain import check_checkpoint

    cfg = tiny_config(args.seed) if args.smoke else LoraConfig(seed=args.seed)
    log = None if args.quiet else (lambda s: print(s, flush=True))
    if args.check:
        res = check_checkpoint(cfg.pretrain, cache_dir=args.cache_dir, log=log)
        print(json.dumps({"ok": res.ok, "eval_loss": res.eval_loss, "threshold": res.threshold,
                          "config_digest": res.digest}, indent=1))
        return 0 if res.ok else 1
    out = args.out or os.path.abspath(time.strftime("kernattr-lora-%Y%m%d-%H%M%S"))
    t = time.perf_counter()
    kw = {"shipped": None} if args.smoke else {}
    res = run_lora(cfg, out=out, cache_dir=args.cache_dir,
                   compute_ground_truth=args.compute_ground_truth or args.smoke,
                   plots=not args.no_plots, log=log, **kw)
    print(results_markdown(res))
    print(f"wrote {os.path.join(out, 'results.json')} in {time.perf_counter() - t:.1f}s")
    return 0


def add_lora(psub: argparse._SubParsersAction) -> None:
    """Register ``lora`` on the ``kernattr reproduce`` subparsers.

    >>> p = argparse.ArgumentParser(); add_lora(p.add_subparsers())
    >>> p.parse_args(["lora", "--check"]).check
    True
    """
    p = psub.add_parser(
        "lora", help="LoRA fine-tuning of a pretrained multi-task transformer: estimator "
                     "accuracy and cost (minutes with the shipped labels)",
        description="Load (or pretrain: 3-20 min on 2 CPU cores, by load) a 1M-parameter NNX "
                    "transformer on 16 synthetic sequence tasks; LoRA on its attention and MLP kernels; real "
                    "LoRA fine-tuning labels (shipped, or recomputed with "
                    "--compute-ground-truth, ~30 min); the estimators linearized in the LoRA B "
                    "factors (the fine-tuning's AdamW on the linear model; the GLM); their "
                    "error and cost against real fine-tuning from the same run; LDS of kernel/linear/datamodels/multi-fidelity/influence/TRAK/TracIn; "
                    "write results.json and plots.")
    p.add_argument("--out", default=None, help="output folder (default ./kernattr-lora-<time>/)")
    p.add_argument("--cache-dir", default=None,
                   help="cache folder (default $KERNATTR_CACHE or ~/.cache/kernattr)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true",
                   help="only verify the pretrained checkpoint (config hash, eval loss below "
                        "its threshold), regenerating it when missing; exit 1 on failure")
    p.add_argument("--compute-ground-truth", action="store_true",
                   help="fine-tune for real on every mask missing from the cache (long)")
    p.add_argument("--smoke", action="store_true", help="tiny configuration (minutes)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_run)
