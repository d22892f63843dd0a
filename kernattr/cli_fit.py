"""The engine of ``kernattr fit``: surrogates on masks and scores you already have.

:func:`fit_report` fits a linear surrogate (datamodels) and a kernel surrogate (bandwidth and
ridge chosen by closed-form leave-one-out CV) on the training rows of a
:class:`kernattr.SubsetData`, evaluates both on its held-out rows, and ranks tasks by the kernel
surrogate's leave-one-out and Shapley scores. :func:`split_heldout` makes a held-out part when
the data has none. :func:`results_markdown` renders its JSON report as Markdown tables. Sits
beside the CLI (:mod:`kernattr.cli` parses the flags and prints); imports neither flax nor optax.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._metrics import lds, normalized_error
from .data._loaders import SubsetData
from .readouts._attribution import loo_scores, shapley_values
from .surrogates._dispatch import fit_kernel, predict
from .surrogates._krr import fit_linear, kernel_grids
from .surrogates._quadratic import MAX_TASKS, fit_quadratic

__all__ = ["Split", "fit_report", "json_safe", "split_heldout"]


class Split(NamedTuple):
    """Data with a held-out part, and how it was obtained.

    Attributes:
      data: :class:`kernattr.SubsetData` whose ``test_masks`` / ``test_labels`` are set.
      how: ``"file"`` or ``"random 20% split (seed 0)"``.
    """

    data: SubsetData
    how: str


def split_heldout(data: SubsetData, *, test_fraction: float, seed: int) -> Split:
    """Random train/test split of the rows when ``data`` has no held-out part.

    Args:
      data: masks ``[m, K]`` and labels ``[m, T]``, with or without a test part.
      test_fraction: share of the ``m`` rows held out, in ``(0, 1)``.
      seed: seed of the permutation (numpy).

    Returns:
      :class:`Split`; ``data`` unchanged when it already has test masks.

    Raises:
      ValueError: fewer than 2 rows would be left on either side.

    >>> import numpy as np, kernattr as ka
    >>> d = ka.SubsetData(np.eye(10, 3), np.arange(10.0)[:, None])
    >>> s = split_heldout(d, test_fraction=0.2, seed=0)
    >>> s.data.test_masks.shape, s.how
    ((2, 3), 'random 20% split (seed 0)')
    """
    if data.test_masks is not None:
        return Split(data, "file")
    m = data.train_masks.shape[0]
    n_test = int(round(test_fraction * m))
    if n_test < 2 or m - n_test < 2:
        raise ValueError(
            f"{m} subsets are too few to hold out {test_fraction:.0%} (need >= 2 train and "
            ">= 2 test); provide test masks or change the test fraction."
        )
    perm = np.random.default_rng(seed).permutation(m)
    te, tr = perm[:n_test], perm[n_test:]
    return Split(
        SubsetData(data.train_masks[tr], data.train_labels[tr],
                   data.train_masks[te], data.train_labels[te]),
        f"random {test_fraction:.0%} split (seed {seed})",
    )


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats replaced by ``None`` (nested dicts/lists).

    >>> json_safe({"a": [1.0, float("nan")]})
    {'a': [1.0, None]}
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _nanmean(x) -> float:
    x = np.asarray(x, dtype=float)
    return float(np.nanmean(x)) if np.any(np.isfinite(x)) else float("nan")


# ARD with more masks than pair features runs a d x d Cholesky per EM step (d = K(K+1)/2), whose
# cost grows as K^6: the default limit keeps a step short (see the scale results page).
ARD_MAX_TASKS = 100


@functools.lru_cache(maxsize=16)
def _compiled(kernel, per_target, gamma, ridge, linear_ridge, mix=None, select="mse", solver="direct",
              ard_steps=0):
    """Jitted (fit, evaluate, attribute) for one configuration, cached across calls."""
    grids = {k: v for k, v in (("gamma", gamma), ("ridge", ridge), ("mix", mix)) if v is not None}

    def fit(masks, y):
        # Grids as numpy constants in the masks' dtype (concrete at trace time).
        kw = {k: np.asarray(v, masks.dtype) for k, v in grids.items()}
        quad = fit_quadratic(masks, y) if masks.shape[1] <= MAX_TASKS else None
        ard = fit_quadratic(masks, y, ard_steps=ard_steps) if ard_steps else None
        return (fit_linear(masks, y, ridge=linear_ridge),
                fit_kernel(masks, y, kernel=kernel, per_target=per_target, select=select, solver=solver,
                           **kw),
                quad, ard)

    def evaluate(sur, masks, y):
        pred = predict(sur, masks)
        return lds(pred, y), normalized_error(pred, y)

    def attribute(ker):
        return {"loo": loo_scores(ker), "shapley": shapley_values(ker)}

    return jax.jit(fit), jax.jit(evaluate), jax.jit(attribute)


def fit_report(data: SubsetData, *, kernel: str = "linear+rbf", gamma=None, ridge=None,
               mix=None, select: str = "mse", linear_ridge: float = 0.0,
               per_target: bool = False, top: int = 5, lower_is_better: bool = False,
               solver: str = "direct", ard_steps: int = 0) -> dict:
    """All figures of ``kernattr fit`` for a :class:`kernattr.SubsetData` with a test part.

    Fits :func:`kernattr.fit_linear`, :func:`kernattr.fit_kernel` and, for ``K <= 200`` tasks,
    :func:`kernattr.fit_quadratic` (every pairwise interaction, no higher order; its default grid)
    (jit-compiled here, as a driver) on the training rows and evaluates on the test rows. Task
    scores come from the kernel surrogate, averaged over targets before ranking.

    Args:
      data: ``train_masks [m, K]``, ``train_labels [m, T]``, ``test_masks [m', K]``,
        ``test_labels [m', T]``.
      kernel: ``"linear+rbf"`` (default), ``"rbf"``, ``"polynomial"`` or ``"linear"``.
      gamma: bandwidth grid (sequence of floats) or ``None`` for the default.
      ridge: ridge grid or ``None`` for the default.
      mix: grid of the linear share (``"linear+rbf"``) or ``None`` for the default.
      select: LOO-CV criterion, ``"mse"`` or ``"loo_spearman"``.
      linear_ridge: ridge of the linear surrogate.
      per_target: select ``(gamma, mix, ridge)`` per target.
      top: number of top tasks listed.
      lower_is_better: the scores are losses: rank tasks by most negative effect.
      solver: ``"direct"`` (exact kernel ridge regression, ``m x m`` matrices: up to a few
        thousand training masks) or ``"walsh"`` (the kernel's degree <= 2 Walsh part exactly,
        higher degrees as ridge; cost linear in ``m``, ``K <= 200``; see
        :func:`kernattr.fit_kernel`).
      ard_steps: ``n > 0`` also fits ``fit_quadratic(..., ard_steps=n)`` (one learned prior
        variance per pair, for sparse interactions), reported as ``quadratic_ard``. At most
        ``ARD_MAX_TASKS = 100`` tasks, or 200 when there are no more training masks than the
        ``K(K+1)/2`` pair features (then each EM step is ``m x m``).

    Returns:
      A JSON-ready dict: ``data``, ``linear``, ``kernel``, ``quadratic`` and ``quadratic_ard``
      (``lds``, ``lds_per_target``, ``normalized_error``, ...; ``quadratic`` is ``None`` above 200
      tasks, ``quadratic_ard`` without ``ard_steps``; both carry their LOO ``cv_error``),
      ``lds_ratio_kernel_over_linear``, ``task_scores`` and ``top_tasks`` (``loo``,
      ``shapley``).

    >>> import jax, kernattr as ka
    >>> m = ka.sample_subsets(jax.random.key(0), num_tasks=4, num_subsets=40, p=0.5)
    >>> y = m[:, :1] * m[:, 1:2] + m[:, 2:3]
    >>> d = ka.SubsetData(m[:30], y[:30], m[30:], y[30:])
    >>> rep = fit_report(d, gamma=[0.3], ridge=[0.01], top=2)
    >>> sorted(rep["top_tasks"]), len(rep["top_tasks"]["loo"])
    (['loo', 'shapley'], 2)
    """
    tr_m, tr_y = data.train_masks, data.train_labels
    te_m, te_y = data.test_masks, data.test_labels
    _check_fit_args(data, ard_steps)
    fit, evaluate, attribute = _compiled(
        kernel, per_target,
        None if gamma is None else tuple(float(g) for g in np.ravel(gamma)),
        None if ridge is None else tuple(float(r) for r in np.ravel(ridge)),
        float(linear_ridge),
        None if mix is None else tuple(float(w) for w in np.ravel(mix)),
        select,
        solver,
        int(ard_steps),
    )
    lin, ker, quad, ard = fit(tr_m, tr_y)

    out: dict = {
        "data": {
            "num_tasks": int(tr_m.shape[1]),
            "num_targets": int(tr_y.shape[1]),
            "num_train": int(tr_m.shape[0]),
            "num_test": int(te_m.shape[0]),
            "dtype": str(tr_m.dtype),
        }
    }
    out["quadratic"] = out["quadratic_ard"] = None
    for name, sur in (("linear", lin), ("kernel", ker), ("quadratic", quad), ("quadratic_ard", ard)):
        if sur is not None:
            out[name] = _heldout_figures(evaluate, sur, te_m, te_y)
    if solver == "walsh":  # a QuadraticSurrogate: the searched grids are fit_kernel's
        grids = kernel_grids(kernel, int(tr_m.shape[1]), gamma, mix, ridge, tr_m.dtype)[:2]
    else:
        grids = ker.gamma_grid, ker.mix_grid
    out["kernel"].update(_kernel_settings(ker, *grids, kernel=kernel, solver=solver, select=select))
    if quad is not None:
        out["quadratic"].update(
            ratio=float(quad.ratio[0]), ridge=float(quad.ridge[0]),
            ratio_grid=np.asarray(quad.ratio_grid, float).tolist(),
            ridge_grid=np.asarray(quad.ridge_grid, float).tolist(),
            cv_error=float(jnp.min(jnp.mean(quad.cv_error, axis=-1))))
    if ard is not None:
        out["quadratic_ard"].update(
            ard_steps=int(ard_steps), cv_error=_nanmean(ard.ard_cv_error),
            grid_cv_error=float(jnp.min(jnp.mean(ard.cv_error, axis=-1))))
    lin_lds, ker_lds = out["linear"]["lds"], out["kernel"]["lds"]
    out["lds_ratio_kernel_over_linear"] = ker_lds / lin_lds if lin_lds != 0 else float("nan")
    out["task_scores"], out["top_tasks"] = _top_tasks(attribute(ker), top, lower_is_better)
    return out


def _check_fit_args(data: SubsetData, ard_steps: Any) -> None:
    """The test part and ``ard_steps`` of :func:`fit_report` (``ValueError`` naming the fix)."""
    if data.test_masks is None:
        raise ValueError("`data` has no test masks; split it first (split_heldout).")
    if isinstance(ard_steps, bool) or not isinstance(ard_steps, (int, np.integer)) or ard_steps < 0:
        raise ValueError(f"`ard_steps` must be a Python int >= 0, got {ard_steps!r}.")
    k, m = int(data.train_masks.shape[1]), int(data.train_masks.shape[0])
    if ard_steps and (k > MAX_TASKS or (k > ARD_MAX_TASKS and m > k * (k + 1) // 2)):
        raise ValueError(f"`ard_steps` with K = {k} tasks and {m} training masks: at most "
                         f"{ARD_MAX_TASKS} tasks, or at most {MAX_TASKS} with no more masks than the "
                         f"{k * (k + 1) // 2} pair features (each EM step is a Cholesky of the "
                         "smaller of the two).")


def _heldout_figures(evaluate, surrogate, masks, labels) -> dict:
    """Held-out LDS and normalized error of one surrogate (overall and per target)."""
    res, nerr = evaluate(surrogate, masks, labels)
    return {
        "lds": float(res.mean),
        "lds_per_target": np.asarray(res.per_target, float).tolist(),
        "normalized_error": _nanmean(nerr),
        "normalized_error_per_target": np.asarray(nerr, float).tolist(),
    }


def _kernel_settings(ker, gamma_grid, mix_grid, *, kernel: str, solver: str, select: str) -> dict:
    """The kernel surrogate's chosen settings, its grids, LOO error and which choices sit at an
    edge of their grid."""
    out = dict(
        kernel=kernel,
        solver=solver,
        gamma=np.asarray(ker.gamma, float).tolist(),
        ridge=np.asarray(ker.ridge, float).tolist(),
        mix=np.asarray(ker.mix, float).tolist(),
        select=select,
        gamma_grid=np.asarray(gamma_grid, float).tolist(),
        ridge_grid=np.asarray(ker.ridge_grid, float).tolist(),
        mix_grid=np.asarray(mix_grid, float).tolist(),
        cv_error=float(jnp.min(jnp.mean(ker.cv_error, axis=-1))),
    )
    edges = []
    for name, grid, chosen in (("gamma", gamma_grid, ker.gamma),
                               ("ridge", ker.ridge_grid, ker.ridge)):
        g, c = np.asarray(grid), np.asarray(chosen)
        if g.size > 1 and np.any(np.isin(c, [g.min(), g.max()])):
            edges.append(name)
    out["at_grid_edge"] = edges
    return out


def _top_tasks(scores: dict, top: int, lower_is_better: bool) -> tuple[dict, dict]:
    """``(task_scores, top_tasks)``: each score averaged over targets ``[K]``, and the ``top``
    tasks by it (most negative first for losses)."""
    sign = -1.0 if lower_is_better else 1.0
    task_scores, top_tasks = {}, {}
    for name, s in scores.items():
        mean_s = np.asarray(jnp.mean(s, axis=1), float)  # [K], averaged over targets
        order = np.argsort(-sign * mean_s, kind="stable")[:top]
        task_scores[name] = mean_s.tolist()
        top_tasks[name] = [{"task": int(k), "score": float(mean_s[k])} for k in order]
    return task_scores, top_tasks


def results_markdown(results: dict) -> str:
    """Markdown table of a ``kernattr fit --json`` report (for the docs site).

    Pure function of the dict written by :func:`fit_report`: each fitted surrogate's held-out LDS
    and normalized error, and the kernel's selected settings.

    Args:
      results: the dict of :func:`fit_report` (keys ``data``, ``linear``, ``kernel``; optionally
        ``quadratic``, ``quadratic_ard``).

    Returns:
      Markdown text ending with a newline.

    Raises:
      KeyError: when ``data``, ``linear`` or ``kernel`` is missing.

    >>> r = {"data": {"num_tasks": 4, "num_targets": 1, "num_train": 30, "num_test": 10},
    ...      "linear": {"lds": 0.5, "normalized_error": 0.4},
    ...      "kernel": {"lds": 0.9, "normalized_error": 0.1}}
    >>> print(results_markdown(r).splitlines()[5])
    | kernel | 0.900 | 0.100 |
    """
    d = results["data"]
    lines = [f"K = {d['num_tasks']} tasks, T = {d['num_targets']} targets, "
             f"{d['num_train']} training / {d['num_test']} held-out masks.", "",
             "| surrogate | held-out LDS | normalized error |", "|---|---|---|"]
    for name in ("linear", "kernel", "quadratic", "quadratic_ard"):
        r = results.get(name)
        if r:
            lines.append(f"| {name} | {r['lds']:.3f} | {r['normalized_error']:.3f} |")
    k = results["kernel"]

    def setting(v):
        vals = sorted({float(x) for x in (v if isinstance(v, list) else [v])})
        return " / ".join(f"{x:.3g}" for x in vals)

    if k.get("gamma") is not None:
        lines += ["", f"Kernel ({k.get('kernel', 'linear+rbf')}) settings chosen by leave-one-out "
                  f"CV: gamma {setting(k['gamma'])}, mix {setting(k.get('mix', 0.0))}, "
                  f"ridge {setting(k.get('ridge', 0.0))}."]
    return "\n".join(lines) + "\n"
