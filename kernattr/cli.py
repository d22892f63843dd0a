"""Command line interface: ``kernattr <subcommand>``.

Subcommands are registered by small ``_add_<name>(subparsers)`` functions listed in
:data:`SUBCOMMANDS`; each sets ``func`` (``args -> exit code``) with ``set_defaults``. Heavy or
optional imports (flax, optax, ``kernattr.experiments``) happen inside the command functions, never
at the top of this module, so ``kernattr --help`` and ``kernattr fit`` stay light.

``kernattr fit``: fit linear and kernel surrogates (grid-tuned by closed-form LOO-CV) on subset
masks with measured scores, and report held-out LDS / normalized error and the top tasks.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from typing import Any, Callable

BUILTIN = "builtin"


# ============================================================================== kernattr fit
def _builtin_path() -> str:
    from importlib import resources

    return str(resources.files("kernattr") / "data" / "example_game.json")


def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _fraction(text: str) -> float:
    v = float(text)
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {v}")
    return v


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


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
    p.add_argument("--kernel", choices=("rbf", "polynomial", "linear"), default="rbf")
    p.add_argument("--gamma", type=_float_list, default=None,
                   help="comma-separated bandwidth grid (default: scaled to K)")
    p.add_argument("--ridge", type=_float_list, default=None,
                   help="comma-separated ridge grid (default: decades 1e-4..1e4)")
    p.add_argument("--linear-ridge", type=float, default=0.0,
                   help="ridge of the linear surrogate (default 0: least squares)")
    p.add_argument("--per-target", action="store_true",
                   help="select gamma/ridge per target instead of jointly")
    p.add_argument("--top", type=_positive_int, default=5, help="number of top tasks listed")
    p.add_argument("--lower-is-better", action="store_true",
                   help="the scores are losses: rank tasks by most negative effect")
    p.add_argument("--x64", action="store_true", help="compute in float64")
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT",
                   help="also write all figures to this JSON file")
    p.set_defaults(func=_run_fit)


def _split(data, test_fraction: float, seed: int):
    """Random train/test split of the rows when the file has no held-out part."""
    import numpy as np

    from ._loaders import SubsetData

    if data.test_masks is not None:
        return data, "file"
    m = data.train_masks.shape[0]
    n_test = int(round(test_fraction * m))
    if n_test < 2 or m - n_test < 2:
        raise SystemExit(
            f"kernattr fit: {m} subsets are too few to hold out {test_fraction:.0%} "
            "(need >= 2 train and >= 2 test); provide test masks or change --test-fraction."
        )
    perm = np.random.default_rng(seed).permutation(m)
    te, tr = perm[:n_test], perm[n_test:]
    return (
        SubsetData(data.train_masks[tr], data.train_labels[tr],
                   data.train_masks[te], data.train_labels[te]),
        f"random {test_fraction:.0%} split (seed {seed})",
    )


def _nanmean(x) -> float:
    import numpy as np

    x = np.asarray(x, dtype=float)
    return float(np.nanmean(x)) if np.any(np.isfinite(x)) else float("nan")


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


@functools.lru_cache(maxsize=16)
def _compiled(kernel, per_target, gamma, ridge, linear_ridge):
    """Jitted (fit, evaluate, attribute) for one configuration, cached across calls."""
    import jax
    import numpy as np

    from . import _attribution, _metrics, _surrogates

    grids = {k: v for k, v in (("gamma", gamma), ("ridge", ridge)) if v is not None}

    def fit(masks, y):
        # Grids as numpy constants in the masks' dtype (concrete at trace time).
        kw = {k: np.asarray(v, masks.dtype) for k, v in grids.items()}
        return (_surrogates.fit_linear(masks, y, ridge=linear_ridge),
                _surrogates.fit_kernel(masks, y, kernel=kernel, per_target=per_target, **kw))

    def evaluate(sur, masks, y):
        pred = _surrogates.predict(sur, masks)
        return _metrics.lds(pred, y), _metrics.normalized_error(pred, y)

    def attribute(ker):
        return {"loo": _attribution.loo_scores(ker), "shapley": _attribution.shapley_values(ker)}

    return jax.jit(fit), jax.jit(evaluate), jax.jit(attribute)


def fit_report(data, *, kernel: str = "rbf", gamma=None, ridge=None, linear_ridge: float = 0.0,
               per_target: bool = False, top: int = 5, lower_is_better: bool = False) -> dict:
    """All figures of ``kernattr fit`` for a :class:`kernattr.SubsetData` with a test part.

    Fits ``fit_linear`` and ``fit_kernel`` (jit-compiled here, as a driver) on the training rows
    and evaluates on the test rows. Task scores are averaged over targets before ranking.
    """
    import jax.numpy as jnp
    import numpy as np

    tr_m, tr_y = data.train_masks, data.train_labels
    te_m, te_y = data.test_masks, data.test_labels
    if te_m is None:
        raise ValueError("`data` has no test masks; split it first.")
    fit, evaluate, attribute = _compiled(
        kernel, per_target,
        None if gamma is None else tuple(float(g) for g in np.ravel(gamma)),
        None if ridge is None else tuple(float(r) for r in np.ravel(ridge)),
        float(linear_ridge),
    )
    lin, ker = fit(tr_m, tr_y)

    out: dict = {
        "data": {
            "num_tasks": int(tr_m.shape[1]),
            "num_targets": int(tr_y.shape[1]),
            "num_train": int(tr_m.shape[0]),
            "num_test": int(te_m.shape[0]),
            "dtype": str(tr_m.dtype),
        }
    }
    for name, sur in (("linear", lin), ("kernel", ker)):
        res, nerr = evaluate(sur, te_m, te_y)
        out[name] = {
            "lds": float(res.mean),
            "lds_per_target": np.asarray(res.per_target, float).tolist(),
            "normalized_error": _nanmean(nerr),
            "normalized_error_per_target": np.asarray(nerr, float).tolist(),
        }
    out["kernel"].update(
        kernel=kernel,
        gamma=np.asarray(ker.gamma, float).tolist(),
        ridge=np.asarray(ker.ridge, float).tolist(),
        gamma_grid=np.asarray(ker.gamma_grid, float).tolist(),
        ridge_grid=np.asarray(ker.ridge_grid, float).tolist(),
        cv_error=float(jnp.min(jnp.mean(ker.cv_error, axis=-1))),
    )
    edges = []
    for name, grid, chosen in (("gamma", ker.gamma_grid, ker.gamma), ("ridge", ker.ridge_grid,
                                                                        ker.ridge)):
        g, c = np.asarray(grid), np.asarray(chosen)
        if g.size > 1 and np.any(np.isin(c, [g.min(), g.max()])):
            edges.append(name)
    out["kernel"]["at_grid_edge"] = edges
    lin_lds, ker_lds = out["linear"]["lds"], out["kernel"]["lds"]
    out["lds_ratio_kernel_over_linear"] = ker_lds / lin_lds if lin_lds != 0 else float("nan")

    scores = attribute(ker)
    sign = -1.0 if lower_is_better else 1.0
    out["task_scores"] = {}
    out["top_tasks"] = {}
    for name, s in scores.items():
        mean_s = np.asarray(jnp.mean(s, axis=1), float)  # [K], averaged over targets
        order = np.argsort(-sign * mean_s, kind="stable")[:top]
        out["task_scores"][name] = mean_s.tolist()
        out["top_tasks"][name] = [{"task": int(k), "score": float(mean_s[k])} for k in order]
    return out


def _print_report(rep: dict, source: str, split: str) -> None:
    d = rep["data"]
    print(f"data: {source}")
    print(f"  K={d['num_tasks']} tasks, T={d['num_targets']} targets, "
          f"{d['num_train']} train / {d['num_test']} test masks ({split}), {d['dtype']}")
    k = rep["kernel"]
    gam = sorted(set(round(g, 6) for g in k["gamma"]))
    rid = sorted(set(round(r, 6) for r in k["ridge"]))
    print(f"kernel surrogate: {k['kernel']}, gamma={gam} ridge={rid} "
          f"(from a {len(k['gamma_grid'])}x{len(k['ridge_grid'])} grid, LOO-CV)")
    if k["at_grid_edge"]:
        print(f"  note: {' and '.join(k['at_grid_edge'])} chosen at the edge of the grid; "
              "consider widening it (--gamma / --ridge)")
    print(f"{'surrogate':<10} {'held-out LDS':>13} {'normalized error':>17}")
    for name in ("linear", "kernel"):
        r = rep[name]
        print(f"{name:<10} {r['lds']:>13.4f} {r['normalized_error']:>17.4f}")
    print(f"LDS ratio kernel/linear: {rep['lds_ratio_kernel_over_linear']:.3f}")
    for name, rows in rep["top_tasks"].items():
        label = {"loo": "leave-one-out", "shapley": "Shapley"}[name]
        print(f"top tasks by {label} score (kernel surrogate, mean over targets):")
        for r in rows:
            print(f"  task {r['task']:>4}  {r['score']:+.4f}")


def _run_fit(args: argparse.Namespace) -> int:
    import jax

    if args.x64:
        jax.config.update("jax_enable_x64", True)
    from ._loaders import load_subsets

    source = _builtin_path() if args.data == BUILTIN else args.data
    label = "built-in example (synthetic interaction game)" if args.data == BUILTIN else source
    try:
        data = load_subsets(source, format=args.format, scores=args.scores,
                            group_ids=args.groups, rule=args.group_rule)
    except (OSError, ValueError, TypeError) as e:
        raise SystemExit(f"kernattr fit: cannot load --data {args.data!r}: {e}") from e
    data, split = _split(data, args.test_fraction, args.seed)
    rep = fit_report(data, kernel=args.kernel, gamma=args.gamma, ridge=args.ridge,
                     linear_ridge=args.linear_ridge, per_target=args.per_target, top=args.top,
                     lower_is_better=args.lower_is_better)
    rep["source"] = label
    rep["split"] = split
    _print_report(rep, label, split)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(_clean(rep), f, indent=2)
        print(f"wrote {args.json_out}")
    return 0


# ============================================================================== registry
# Each entry adds one subcommand. To add one (e.g. `demo`, `reproduce` calling
# `kernattr.experiments`), write `_add_<name>(sub)` that calls `sub.add_parser(...)` and
# `set_defaults(func=_run_<name>)`, import `kernattr.experiments` inside `_run_<name>` (not at
# module top: flax/optax stay optional), and append it here.
def _add_experiments(sub: argparse._SubParsersAction) -> None:
    from .experiments._cli import add_all  # light: flax is imported inside the commands

    add_all(sub)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_fit, _add_experiments]


def build_parser() -> argparse.ArgumentParser:
    """The ``kernattr`` argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="kernattr",
        description="Task attribution with kernel surrogate models (JAX).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kernattr`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
