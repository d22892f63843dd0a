"""``kernattr demo`` and ``kernattr reproduce modular``: argparse wiring (flax imported lazily)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _out_dir(out):
    return out or os.path.abspath(time.strftime("kernattr-out-%Y%m%d-%H%M%S"))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None,
                   help="output folder for results.json, predictions.npz and plots "
                        "(default: a fresh ./kernattr-out-<timestamp>/)")
    p.add_argument("--cache-dir", default=None,
                   help="ground-truth cache folder (default $KERNATTR_CACHE or ~/.cache/kernattr)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _run(cfg, args) -> int:
    from .pipeline import format_table, run_pipeline

    out = _out_dir(args.out)
    t = time.perf_counter()
    res = run_pipeline(cfg, out=out, cache_dir=args.cache_dir, progress=not args.quiet,
                       plots=not args.no_plots)
    print(f"\n{cfg.task} mod {cfg.p}, K={cfg.num_tasks} tasks, T={res['sizes']['num_targets']} "
          f"targets, {res['sizes']['num_params']} params, regime={cfg.regime}")
    print(format_table(res))
    hit = " (ground truth from cache)" if res["ground_truth"]["cache_hit"] else ""
    print(f"wrote {os.path.join(out, 'results.json')} and plots in {time.perf_counter() - t:.1f}s{hit}")
    return 0


def _run_demo(args) -> int:
    from .pipeline import demo_config

    return _run(demo_config(seed=args.seed), args)


def _run_atlas(args) -> int:
    from .atlas import centre_config, run_atlas

    out = _out_dir(args.out)
    t = time.perf_counter()
    atlas = run_atlas(centre_config(args.quick, seed=args.seed), out=out, quick=args.quick,
                      cache_dir=args.cache_dir, progress=not args.quiet)
    print(open(os.path.join(out, "atlas.md")).read())
    print(f"wrote {out}/atlas.json, atlas.md, atlas.png in {time.perf_counter() - t:.1f}s "
          f"({len(atlas['cells'])} cells)")
    return 0


def _run_suite(args) -> int:
    from .families import FAMILIES
    from .pipeline import demo_config, format_table, run_pipeline

    out = _out_dir(args.out)
    rows = {}
    for fam in FAMILIES:
        kw = {} if args.regime is None else {"regime": args.regime}
        cfg = demo_config(family=fam, num_tasks=24, grouping="blocks", seed=args.seed, **kw)
        res = run_pipeline(cfg, out=os.path.join(out, fam), cache_dir=args.cache_dir,
                           progress=not args.quiet, plots=not args.no_plots)
        rows[fam] = res
        it = res["interactions"]
        print(f"\n== {fam} ({cfg.regime}): |second difference| designed pairs "
              f"{it['designed_mean_abs']:.4f} vs others {it['other_mean_abs']:.4f} "
              f"(ratio {it['ratio']:.1f})")
        print(format_table(res))
    with open(os.path.join(out, "suite.json"), "w") as fh:
        json.dump({f: {"interactions": r["interactions"], "paired": r["paired"],
                       "noise_ceiling": r["noise_ceiling"],
                       "lds": {n: m["lds"] for n, m in r["methods"].items()}}
                   for f, r in rows.items()}, fh, indent=2)
    return 0


def _run_reproduce(args) -> int:
    from .pipeline import demo_config

    kw = dict(task=args.task, p=args.p, num_tasks=args.tasks, num_train_masks=args.masks,
              num_heldout_masks=args.heldout_masks, num_targets=args.targets, seed=args.seed,
              regime=args.regime, proj_dim=args.dim)
    if args.prox is not None:
        kw["prox"] = args.prox
    kw = {k: v for k, v in kw.items() if v is not None}
    return _run(demo_config(family=None, grouping="blocks", **kw), args)


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="end-to-end task attribution on quadratic modular arithmetic (~minutes on 2 CPUs)",
        description="Pretrain a small NNX transformer on (x²+xy+y²) mod 17 split into 25 tasks, "
                    "fine-tune it for real on ~250 task subsets (the ground truth), estimate the "
                    "same subsets with the gradient estimator, fit kernel/linear surrogates, "
                    "compare with influence functions, TRAK and TracIn; print the table and "
                    "write results.json and plots.",
    )
    _common(p)
    p.set_defaults(func=_run_demo)


def add_reproduce(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="larger experiment configurations")
    psub = p.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    m = psub.add_parser("modular", help="modular arithmetic (addition, quadratic, xor)")
    m.add_argument("--task", choices=("addition", "quadratic", "xor"), default="quadratic")
    m.add_argument("--p", type=int, default=None, help="prime modulus (default 17)")
    m.add_argument("--tasks", type=int, default=None, help="number of tasks K (default 25)")
    m.add_argument("--masks", type=int, default=None,
                   help="surrogate-training masks with real labels (default 100)")
    m.add_argument("--heldout-masks", type=int, default=None, help="held-out masks (default 100)")
    m.add_argument("--targets", type=int, default=None, help="held-out target pairs (default 48)")
    m.add_argument("--regime", choices=("finetune", "scratch"), default=None)
    m.add_argument("--prox", type=float, default=None, help="proximal strength = estimator ridge")
    m.add_argument("--dim", type=int, default=None, help="projection dimension d")
    _common(m)
    m.set_defaults(func=_run_reproduce)
    a = psub.add_parser("atlas", help="regime atlas: one-factor-at-a-time sweep around the demo")
    a.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run, ~minutes)")
    _common(a)
    a.set_defaults(func=_run_atlas)
    s = psub.add_parser("suite", help="interaction suite: redundancy, antagonism, xor, additive")
    s.add_argument("--regime", choices=("finetune", "scratch"), default=None)
    _common(s)
    s.set_defaults(func=_run_suite)


def add_all(sub: argparse._SubParsersAction) -> None:
    """Register ``demo`` and ``reproduce`` on the ``kernattr`` subparsers."""
    add_demo(sub)
    add_reproduce(sub)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0)
