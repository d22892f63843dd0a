"""Command line interface: ``kernattr <subcommand>`` — the one home of every subcommand.

Each subcommand is an ``_add_<name>(sub)`` function that adds its parser and sets
``func`` (``args -> exit code``) with ``set_defaults``; it is registered by one line in
:data:`SUBCOMMANDS`. Experiments behind ``kernattr reproduce <name>`` are registered the same
way, one line each in :data:`REPRODUCE`. Command functions are thin: they parse flags, call the
library or :mod:`kernattr.experiments`, and print. Heavy or optional imports (flax, optax, the
experiment pipelines) happen inside the command functions, never at the top of this module, so
``kernattr --help`` and ``kernattr fit`` stay light.

Errors: a bad flag value is reported by argparse; any error raised by a command (``ValueError``,
``TypeError``, ``OSError``, or a check that fired inside compiled code) becomes ONE line
``kernattr <command>: error: ...`` on stderr, naming the flag where the message names its
argument, with exit code 1 and no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from typing import Callable

from . import __version__
from .experiments.cli_args import nonnegative_int as _nonnegative_int
from .experiments.cli_args import positive_int as _positive_int

BUILTIN = "builtin"


class _Parser(argparse.ArgumentParser):
    """``ArgumentParser`` whose errors are one line (no usage block), exit code 2."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ============================================================================== flag types
def _number(text: str, *, positive: bool) -> float:
    try:
        v = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from e
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise argparse.ArgumentTypeError(
            f"must be finite and {'> 0' if positive else '>= 0'}, got {text.strip()!r}"
        )
    return v


def _number_list(positive: bool, at_most_one: bool = False) -> Callable[[str], list[float]]:
    def parse(text: str) -> list[float]:
        items = text.split(",")
        if any(not v.strip() for v in items):
            raise argparse.ArgumentTypeError(
                f"empty item in {text!r}: give comma-separated numbers, e.g. 0.1,1,10")
        values = [_number(v, positive=positive) for v in items]
        if at_most_one and any(v > 1.0 for v in values):
            raise argparse.ArgumentTypeError(f"each value must be in [0, 1], got {text}")
        return values

    parse.__name__ = "positive numbers" if positive else "non-negative numbers"
    return parse


def _nonnegative(text: str) -> float:
    return _number(text, positive=False)


def _fraction(text: str) -> float:
    v = _number(text, positive=True)
    if not v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {v}")
    return v


def _out_file(flag: str, path: str | None) -> None:
    """Fail before any work when ``path`` cannot be written (missing folder, a directory)."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a directory; give a file name.")
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {path!r}: folder {folder!r} does not exist; create it first.")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{flag} {path!r}: folder {folder!r} is not writable.")


# ============================================================================== kernattr fit
def _builtin_path() -> str:
    from importlib import resources

    return str(resources.files("kernattr") / "data" / "example_game.json")


def _add_fit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fit",
        help="fit linear and kernel surrogates on subset masks and report held-out LDS",
        description=(
            "Fit a linear surrogate and a kernel surrogate (bandwidth and ridge selected by "
            "closed-form leave-one-out CV) on training masks/scores, evaluate both on held-out "
            "masks (LDS = mean Spearman over targets, normalized error = MSE / variance), and "
            "list the top tasks by the kernel surrogate's leave-one-out and Shapley scores "
            "(averaged over targets)."
        ),
    )
    p.add_argument("--data", default=BUILTIN,
                   help="data file/directory, or 'builtin' (default) for the built-in example: "
                   "a synthetic game with XOR-like and antagonistic task pairs, K=20, T=8")
    p.add_argument("--format", choices=("datamodels", "json", "ids"), default=None,
                   help="file layout (see kernattr.load_subsets); inferred when omitted")
    p.add_argument("--scores", default=None, help="separate scores file (.npy/.json)")
    p.add_argument("--groups", default=None,
                   help=".npy of per-example group (task) ids: sample-level masks are grouped")
    p.add_argument("--group-rule", choices=("exact", "any", "all"), default="exact",
                   help="how a task counts as selected when grouping (see kernattr.group_masks)")
    p.add_argument("--test-fraction", type=_fraction, default=0.2,
                   help="held-out share when the data has no test masks (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    p.add_argument("--kernel", choices=("linear+rbf", "rbf", "polynomial", "linear"),
                   default="linear+rbf",
                   help="kernel (default linear+rbf: a linear plus an RBF part, mixed by LOO-CV, "
                   "so it contains the linear surrogate)")
    p.add_argument("--gamma", type=_number_list(positive=True), default=None,
                   help="comma-separated bandwidth grid, each > 0 (default: scaled to K)")
    p.add_argument("--ridge", type=_number_list(positive=False), default=None,
                   help="comma-separated ridge grid, each >= 0 (default: decades 1e-4..1e4)")
    p.add_argument("--mix", type=_number_list(positive=False, at_most_one=True), default=None,
                   help="comma-separated grid of the linear share, each in [0, 1] (linear+rbf "
                   "only; default 0,0.5,0.9,0.99,1)")
    p.add_argument("--select", choices=("mse", "loo_spearman"), default="mse",
                   help="LOO-CV criterion: normalized squared error (default) or rank "
                   "correlation of the LOO predictions")
    p.add_argument("--linear-ridge", type=_nonnegative, default=0.0,
                   help="ridge of the linear surrogate (default 0: least squares)")
    p.add_argument("--per-target", action="store_true",
                   help="select gamma/ridge per target instead of jointly")
    p.add_argument("--solver", choices=("direct", "walsh"), default="direct",
                   help="kernel fit: exact (default; up to a few thousand masks) or 'walsh' (degree "
                   "<= 2 Walsh part exactly, higher degrees as ridge; cost linear in the number of "
                   "masks, at most 200 tasks, no --per-target / loo_spearman)")
    p.add_argument("--ard-steps", type=_nonnegative_int, default=0, metavar="N",
                   help="also fit the pairwise model with N EM steps of automatic relevance "
                   "determination (one learned prior variance per pair; helps when few pairs "
                   "interact; 50 is a good start; at most 100 tasks, or 200 with fewer masks "
                   "than pair features)")
    p.add_argument("--top", type=_positive_int, default=5, help="number of top tasks listed")
    p.add_argument("--lower-is-better", action="store_true",
                   help="the scores are losses: rank tasks by most negative effect")
    p.add_argument("--x64", action="store_true", help="compute in float64")
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT",
                   help="also write all figures to this JSON file")
    p.set_defaults(func=_run_fit, flags={"gamma": "--gamma", "ridge": "--ridge", "mix": "--mix",
                                         "masks": "--data", "y": "--data"})


def _print_report(rep: dict, source: str, split: str) -> None:
    d = rep["data"]
    print(f"data: {source}")
    print(f"  K={d['num_tasks']} tasks, T={d['num_targets']} targets, "
          f"{d['num_train']} train / {d['num_test']} test masks ({split}), {d['dtype']}")
    k = rep["kernel"]
    gam = sorted(set(round(g, 6) for g in k["gamma"]))
    rid = sorted(set(round(r, 6) for r in k["ridge"]))
    mix = sorted(set(round(w, 6) for w in k["mix"]))
    mix_txt = f" mix={mix}" if k["kernel"] == "linear+rbf" else ""
    print(f"kernel surrogate: {k['kernel']}, gamma={gam}{mix_txt} ridge={rid} "
          f"(from a {len(k['gamma_grid'])}x{len(k['mix_grid'])}x{len(k['ridge_grid'])} grid, "
          f"LOO-CV by {k['select']})")
    if k["at_grid_edge"]:
        print(f"  note: {' and '.join(k['at_grid_edge'])} chosen at the edge of the grid; "
              "consider widening it (--gamma / --ridge)")
    print(f"{'surrogate':<14} {'held-out LDS':>13} {'normalized error':>17}")
    for name, label in (("linear", "linear"), ("kernel", "kernel"), ("quadratic", "quadratic"),
                        ("quadratic_ard", "quadratic+ARD")):
        r = rep.get(name)
        if r is not None:
            print(f"{label:<14} {r['lds']:>13.4f} {r['normalized_error']:>17.4f}")
    print(f"LDS ratio kernel/linear: {rep['lds_ratio_kernel_over_linear']:.3f}")
    if rep.get("quadratic") is not None:
        q = rep["quadratic"]
        print(f"  (quadratic: every pairwise interaction, no higher order; ratio={q['ratio']:.3g} "
              f"ridge={q['ridge']:.3g} by LOO-CV)")
    if rep.get("quadratic_ard") is not None:
        q = rep["quadratic_ard"]
        print(f"  (quadratic+ARD: {q['ard_steps']} EM steps from the grid's choice; LOO error "
              f"{q['cv_error']:.4g} vs the grid's {q['grid_cv_error']:.4g}, optimistic: its prior "
              "variances were learned on the same masks)")
    for name, rows in rep["top_tasks"].items():
        label = {"loo": "leave-one-out", "shapley": "Shapley"}[name]
        print(f"top tasks by {label} score (kernel surrogate, mean over targets):")
        for r in rows:
            print(f"  task {r['task']:>4}  {r['score']:+.4f}")


def _run_fit(args: argparse.Namespace) -> int:
    import jax

    from . import load_subsets
    from .cli_fit import fit_report, json_safe, split_heldout

    _out_file("--json", args.json_out)
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    source = _builtin_path() if args.data == BUILTIN else args.data
    label = "built-in example (synthetic interaction game)" if args.data == BUILTIN else source
    try:
        data = load_subsets(source, format=args.format, scores=args.scores,
                            group_ids=args.groups, rule=args.group_rule)
    except (OSError, ValueError, TypeError) as e:
        raise SystemExit(f"kernattr fit: cannot load --data {args.data!r}: {e}") from e
    try:
        data, split = split_heldout(data, test_fraction=args.test_fraction, seed=args.seed)
    except ValueError as e:
        raise SystemExit(f"kernattr fit: --test-fraction: {e}") from e
    if args.solver == "walsh" and (args.per_target or args.select != "mse" or args.kernel == "polynomial"):
        raise SystemExit("kernattr fit: --solver walsh selects one grid point for all targets by "
                         "LOO MSE, for the linear+rbf, rbf or linear kernel; drop --per-target / "
                         "--select loo_spearman / --kernel polynomial.")
    rep = fit_report(data, kernel=args.kernel, gamma=args.gamma, ridge=args.ridge, mix=args.mix,
                     select=args.select,
                     linear_ridge=args.linear_ridge, per_target=args.per_target, top=args.top,
                     lower_is_better=args.lower_is_better, solver=args.solver,
                     ard_steps=args.ard_steps)
    rep["source"] = label
    rep["split"] = split
    _print_report(rep, label, split)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(json_safe(rep), f, indent=2)
        print(f"wrote {args.json_out}")
    return 0


# ============================================================================== demo / reproduce
def _out_dir(out: str | None) -> str:
    return out or os.path.abspath(time.strftime("kernattr-out-%Y%m%d-%H%M%S"))


def _experiment_flags(p: argparse.ArgumentParser) -> None:
    """Flags every experiment command shares."""
    p.add_argument("--out", default=None,
                   help="output folder for results.json, predictions.npz and plots "
                        "(default: a fresh ./kernattr-out-<timestamp>/)")
    p.add_argument("--cache-dir", default=None,
                   help="ground-truth cache folder (default $KERNATTR_CACHE or ~/.cache/kernattr)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _compilation_cache(cache_dir) -> None:
    """Keep XLA's compiled programs on disk next to the ground truth: a rerun skips compiling."""
    import jax

    from .experiments.pipeline import default_cache_dir

    jax.config.update("jax_compilation_cache_dir",
                      os.path.join(cache_dir or default_cache_dir(), "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)


def _run_modular(cfg, args) -> int:
    from .experiments.pipeline import format_table, run_pipeline

    out = _out_dir(args.out)
    _compilation_cache(args.cache_dir)
    t = time.perf_counter()
    res = run_pipeline(cfg, out=out, cache_dir=args.cache_dir, progress=not args.quiet,
                       plots=not args.no_plots)
    print(f"\n{cfg.family or cfg.task} mod {cfg.p}, K={cfg.num_tasks} tasks, T={res['sizes']['num_targets']} "
          f"targets, {res['sizes']['num_params']} params, regime={cfg.regime}")
    print(format_table(res))
    hit = " (ground truth from cache)" if res["ground_truth"]["cache_hit"] else ""
    print(f"wrote {os.path.join(out, 'results.json')} and plots in "
          f"{time.perf_counter() - t:.1f}s{hit}")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from .experiments.pipeline import headline_config

    return _run_modular(headline_config(seed=args.seed), args)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="end-to-end task attribution on modular arithmetic with antagonistic tasks "
             "(2-10 minutes on 2 CPU cores from a cold start; the upper end on a busy machine)",
        description="Pretrain a small NNX transformer on (x²+xy+y²) mod 17 split into 12 blocks, "
                    "each with an antagonistic partner task (same inputs, a conflicting rule): "
                    "24 tasks. Fine-tune its last layer for real on ~250 task subsets of "
                    "density 0.95 (the ground truth), estimate the same subsets with the "
                    "gradient estimator (gradients projected to 448 dimensions), fit "
                    "kernel/linear surrogates, compare with influence functions, TRAK and "
                    "TracIn; print the table and write results.json and plots. `kernattr "
                    "reproduce modular` runs the same pipeline with every parameter fine-tuned.",
    )
    _experiment_flags(p)
    p.set_defaults(func=_run_demo)


def _run_reproduce_modular(args: argparse.Namespace) -> int:
    from .experiments.pipeline import demo_config, last_layer_config

    kw = dict(task=args.task, p=args.p, num_tasks=args.tasks, num_train_masks=args.masks,
              num_heldout_masks=args.heldout_masks, num_targets=args.targets, seed=args.seed,
              regime=args.regime, proj_dim=args.dim, prox=args.prox, finetune_steps=args.steps)
    kw = {k: v for k, v in kw.items() if v is not None}
    if args.density is not None:
        kw["densities"] = (args.density,)
    if args.family is not None:
        kw.setdefault("num_tasks", 24)
    make = last_layer_config if args.last_layer else demo_config
    return _run_modular(make(family=args.family, grouping="blocks", **kw), args)


def _add_reproduce_modular(psub: argparse._SubParsersAction) -> None:
    m = psub.add_parser("modular", help="modular arithmetic (addition, quadratic, xor); "
                        "3-10 minutes on 2 CPU cores from a cold cache")
    m.add_argument("--task", choices=("addition", "quadratic", "xor"), default="quadratic")
    m.add_argument("--family", choices=("redundancy", "antagonism", "xor", "additive"),
                   default=None, help="a task family with designed interactions (replaces --task)")
    m.add_argument("--p", type=_positive_int, default=None, help="prime modulus (default 17)")
    m.add_argument("--tasks", type=_positive_int, default=None,
                   help="number of tasks K (default 25)")
    m.add_argument("--masks", type=_positive_int, default=None,
                   help="surrogate-training masks with real labels (default 100)")
    m.add_argument("--heldout-masks", type=_positive_int, default=None,
                   help="held-out masks (default 100)")
    m.add_argument("--targets", type=_positive_int, default=None,
                   help="held-out target pairs (default 48)")
    m.add_argument("--regime", choices=("finetune", "scratch"), default=None)
    m.add_argument("--prox", type=_nonnegative, default=None,
                   help="proximal strength = estimator ridge (default 0.03)")
    m.add_argument("--steps", type=_positive_int, default=None,
                   help="fine-tuning steps (default 200)")
    m.add_argument("--dim", type=_positive_int, default=None, help="projection dimension d")
    m.add_argument("--density", type=_fraction, default=None,
                   help="Bernoulli density of every mask, in (0, 1) (default 0.9)")
    m.add_argument("--last-layer", action="store_true",
                   help="fine-tune only the last layer (prox 3e-6, 10000 steps at lr 0.03; the "
                        "estimator unprojected and solved exactly: linearization is exact there)")
    _experiment_flags(m)
    m.set_defaults(func=_run_reproduce_modular, flags={"prox": "--prox", "ridge": "--prox"})


def _run_reproduce_atlas(args: argparse.Namespace) -> int:
    from .experiments.atlas import centre_config, run_atlas

    out = _out_dir(args.out)
    _compilation_cache(args.cache_dir)
    t = time.perf_counter()
    centre = dict(seed=args.seed, prox=args.prox, finetune_steps=args.steps)
    centre = {k: v for k, v in centre.items() if v is not None}
    atlas = run_atlas(centre_config(args.quick, **centre), out=out, quick=args.quick,
                      cache_dir=args.cache_dir, progress=not args.quiet)
    with open(os.path.join(out, "atlas.md"), encoding="utf-8") as f:
        print(f.read())
    print(f"wrote {out}/atlas.json, atlas.md, atlas.png in {time.perf_counter() - t:.1f}s "
          f"({len(atlas['cells'])} cells)")
    return 0


def _add_reproduce_atlas(psub: argparse._SubParsersAction) -> None:
    a = psub.add_parser("atlas", help="regime atlas: one-factor-at-a-time sweep around the demo (about 1-1.5 hours "
                                   "on 2 CPU cores; --quick: minutes)")
    a.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run, ~minutes)")
    a.add_argument("--prox", type=_nonnegative, default=None,
                   help="the centre's proximal pull to W0 (default: the demo's, 0.03)")
    a.add_argument("--steps", type=_positive_int, default=None,
                   help="the centre's fine-tuning steps (default: the demo's, 200)")
    _experiment_flags(a)
    a.set_defaults(func=_run_reproduce_atlas)


def _run_reproduce_suite(args: argparse.Namespace) -> int:
    from .experiments.families import FAMILIES
    from .experiments.pipeline import demo_config, format_table, run_pipeline

    out = _out_dir(args.out)
    _compilation_cache(args.cache_dir)
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
    with open(os.path.join(out, "suite.json"), "w", encoding="utf-8") as fh:
        json.dump({f: {"interactions": r["interactions"], "paired": r["paired"],
                       "noise_ceiling": r["noise_ceiling"],
                       "lds": {n: m["lds"] for n, m in r["methods"].items()}}
                   for f, r in rows.items()}, fh, indent=2)
    return 0


def _add_reproduce_suite(psub: argparse._SubParsersAction) -> None:
    s = psub.add_parser("suite", help="interaction suite: redundancy, antagonism, xor, additive")
    s.add_argument("--regime", choices=("finetune", "scratch"), default=None)
    _experiment_flags(s)
    s.set_defaults(func=_run_reproduce_suite)


def _add_reproduce_rl(psub: argparse._SubParsersAction) -> None:
    from .experiments.rl_cli import add_mt10, add_rl  # light: argparse only

    add_rl(psub), add_mt10(psub)


def _add_reproduce_icl(psub: argparse._SubParsersAction) -> None:
    from .experiments.icl_cli import add_icl  # light: argparse only

    add_icl(psub)


def _add_reproduce_lora(psub: argparse._SubParsersAction) -> None:
    from .experiments.lora_cli import add_lora  # light: argparse only

    add_lora(psub)


def _add_reproduce_digits(psub: argparse._SubParsersAction) -> None:
    from .experiments.digits_cli import add_digits  # light: argparse only

    add_digits(psub)


# `kernattr reproduce <name>`: one line per experiment. An entry is `_add_reproduce_<name>(psub)`
# that calls `psub.add_parser("<name>", ...)`, adds its flags (plus `_experiment_flags`) and
# `set_defaults(func=_run_reproduce_<name>)`; the run function imports its experiment module
# inside (flax/optax stay optional) and returns an exit code.
REPRODUCE: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_reproduce_modular,
    _add_reproduce_atlas,
    _add_reproduce_suite,
    _add_reproduce_rl,
    _add_reproduce_icl,
    _add_reproduce_lora,
    _add_reproduce_digits,
]


def _add_reproduce(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="the experiments behind the README's figures")
    psub = p.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    for add in REPRODUCE:
        add(psub)


# ============================================================================== registry
# `kernattr <name>`: one line per subcommand (see the module docstring).
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_fit,
    _add_demo,
    _add_reproduce,
]


def build_parser() -> argparse.ArgumentParser:
    """The ``kernattr`` argument parser with every registered subcommand."""
    parser = _Parser(
        prog="kernattr",
        description="Task attribution with kernel surrogate models (JAX).",
    )
    parser.add_argument("--version", action="version", version=f"kernattr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


_ERROR_LINE = re.compile(r"^(?:\w+\.)*(?:ValueError|TypeError|FileNotFoundError|OSError): (.+)$",
                         re.MULTILINE)


def error_line(exc: BaseException, flags: dict[str, str] | None = None) -> str:
    """One line for ``exc``: its message (the innermost one when a check fired inside compiled
    code, whose error text carries a callback traceback), with `name` of an argument followed by
    the flag it came from (``flags`` maps argument names to flags).

    >>> error_line(ValueError("`ridge` must be finite and >= 0, got -1.0."), {"ridge": "--ridge"})
    '--ridge: `ridge` must be finite and >= 0, got -1.0.'
    """
    text = str(exc)
    found = _ERROR_LINE.findall(text)
    line = found[-1] if found else (text.strip().splitlines() or [type(exc).__name__])[0]
    for name, flag in (flags or {}).items():
        if f"`{name}`" in line:
            return f"{flag}: {line}"
    return line


def _reportable(exc: BaseException) -> bool:
    """Errors that describe bad input (ours, or a check that fired inside compiled code)."""
    if isinstance(exc, (ValueError, TypeError, OSError)):
        return True
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(exc, jax.errors.JaxRuntimeError)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kernattr`` console script; returns the exit code.

    Errors raised by a command end the program with one line on stderr (exit code 1).
    """
    args = build_parser().parse_args(argv)
    # Compiled kernattr programs carry host callbacks (the input checks, some inside loops); with
    # JAX's asynchronous CPU dispatch such programs can hang (jax-ml/jax#25861): run them inline.
    # A driver may set this; the library itself never does.
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)
    # A check that fires inside compiled code is re-raised below as one line; keep JAX from
    # also logging the callback's traceback.
    logging.getLogger("jax._src.debugging").setLevel(logging.CRITICAL)
    try:
        return int(args.func(args))
    except Exception as e:
        if not _reportable(e):
            raise
        where = " ".join(x for x in (args.command, getattr(args, "experiment", None)) if x)
        raise SystemExit(
            f"kernattr {where}: error: {error_line(e, getattr(args, 'flags', None))}"
        ) from None


if __name__ == "__main__":
    sys.exit(main())
