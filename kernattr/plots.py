"""Plots of attributions and surrogate quality (needs matplotlib: ``pip install 'kernattr[plots]'``).

Each function draws on a given matplotlib ``Axes`` (or a new figure's) and returns it, so plots
compose into a user's own figures. matplotlib is imported on the first call, not with
``kernattr``.

- :func:`plot_scores`: per-task scores with their intervals, sorted (bars with error bars).
- :func:`plot_interactions`: the pairwise interaction matrix as a heatmap, diverging colours
  centred at 0.
- :func:`plot_predictions`: surrogate predictions against measured values on held-out masks,
  with the LDS (and its interval) in the title.
- :func:`plot_workflow`: the three panels for a :class:`kernattr.WorkflowResult`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from .surrogates._dispatch import predict

__all__ = ["plot_interactions", "plot_predictions", "plot_scores", "plot_workflow"]


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "kernattr.plots needs matplotlib; install it with pip install 'kernattr[plots]' "
            "(or pip install matplotlib)."
        ) from None
    return plt


def _axes(ax: Any):
    if ax is None:
        return _pyplot().subplots()[1]
    _pyplot()
    if not hasattr(ax, "figure") or not hasattr(ax, "barh"):
        raise TypeError(f"`ax` must be a matplotlib Axes or None, got {type(ax).__name__}.")
    return ax


def _column(values: Any, target: int, name: str, ndim: int) -> np.ndarray:
    """``values`` as ``[K]``/``[K, K]`` for one target (the last axis is the target axis)."""
    a = np.asarray(values, dtype=float)
    if a.ndim == ndim + 1:
        if not isinstance(target, (int, np.integer)) or not -a.shape[-1] <= target < a.shape[-1]:
            raise ValueError(f"`target` must be an int index into the {a.shape[-1]} targets of "
                             f"`{name}`, got {target!r}.")
        a = a[..., target]
    if a.ndim != ndim:
        raise ValueError(f"`{name}` must have {ndim} or {ndim + 1} axes (the last one the "
                         f"targets), got shape {a.shape}.")
    return a


def _names(names: Optional[Sequence[str]], k: int) -> list:
    if names is None:
        return [f"task {i}" for i in range(k)]
    names = [str(n) for n in names]
    if len(names) != k:
        raise ValueError(f"`names` has {len(names)} entries for {k} tasks.")
    return names


def plot_scores(scores: Any, *, target: int = 0, names: Optional[Sequence[str]] = None,
                sort: bool = True, ax: Any = None, title: Optional[str] = None):
    """Per-task scores as horizontal bars with interval error bars, largest on top.

    Args:
      scores: :class:`kernattr.AttributionIntervals` (``value``, ``lower``, ``upper`` ``[K, T]``)
        or an array ``[K]`` / ``[K, T]`` of scores without intervals.
      target: which target (last axis) to show.
      names: ``K`` task names (default ``"task k"``).
      sort: order the bars by score (largest on top); ``False`` keeps task order (task 0 on top).
      ax: matplotlib ``Axes`` to draw on (default: a new figure's).
      title: axes title.

    Returns:
      The ``Axes``: one bar per task (``ax.patches``; bar ``i`` from the top has width = its
      score) and, with intervals, an error-bar line collection from ``lower`` to ``upper``.

    Raises:
      ValueError: bad shapes, ``target`` out of range, ``names`` of the wrong length.
      ImportError: matplotlib is not installed.

    >>> import matplotlib; matplotlib.use("Agg")
    >>> import numpy as np, kernattr.plots as kp
    >>> ax = kp.plot_scores(np.array([0.5, -1.0, 2.0]))
    >>> [t.get_text() for t in ax.get_yticklabels()]
    ['task 1', 'task 0', 'task 2']
    """
    if hasattr(scores, "value") and hasattr(scores, "lower"):
        value = _column(scores.value, target, "scores.value", 1)
        lower = _column(scores.lower, target, "scores.lower", 1)
        upper = _column(scores.upper, target, "scores.upper", 1)
    else:
        value = _column(scores, target, "scores", 1)
        lower = upper = None
    labels = _names(names, value.shape[0])
    order = np.argsort(value, kind="stable") if sort else np.arange(value.shape[0])[::-1]
    ax = _axes(ax)
    rows = np.arange(order.shape[0])
    xerr = None
    if lower is not None:
        xerr = np.stack([value[order] - lower[order], upper[order] - value[order]])
    colors = ["tab:blue" if v >= 0 else "tab:red" for v in value[order]]
    ax.barh(rows, value[order], xerr=xerr, color=colors, capsize=3, ecolor="0.2")
    ax.set_yticks(rows, [labels[i] for i in order])
    ax.axvline(0.0, color="0.3", linewidth=0.8)
    ax.set_xlabel("score" + (" (bars: interval)" if lower is not None else ""))
    if title is not None:
        ax.set_title(title)
    return ax


def plot_interactions(interactions: Any, *, target: int = 0,
                      names: Optional[Sequence[str]] = None, ax: Any = None,
                      title: Optional[str] = None, colorbar: bool = True):
    """The pairwise interaction matrix as a heatmap, diverging colours centred at 0.

    Args:
      interactions: ``[K, K, T]`` (:func:`kernattr.interaction_scores`) or ``[K, K]``; must be
        symmetric (up to rounding).
      target: which target (last axis) to show.
      names: ``K`` task names.
      ax: matplotlib ``Axes`` (default: a new figure's).
      title: axes title.
      colorbar: add a colour bar.

    Returns:
      The ``Axes``; its image (``ax.images[0]``) holds the ``[K, K]`` matrix, with colour limits
      ``(-v, v)``, ``v`` the largest absolute entry (so 0 is the middle colour).

    Raises:
      ValueError: not square, not symmetric, bad ``target`` or ``names``.

    >>> import matplotlib; matplotlib.use("Agg")
    >>> import numpy as np, kernattr.plots as kp
    >>> ax = kp.plot_interactions(np.array([[0.0, -2.0], [-2.0, 0.0]]))
    >>> ax.images[0].get_clim()
    (-2.0, 2.0)
    """
    mat = _column(interactions, target, "interactions", 2)
    k = mat.shape[0]
    if mat.shape != (k, k):
        raise ValueError(f"`interactions` must be square [K, K(, T)], got {mat.shape}.")
    scale = max(float(np.max(np.abs(mat))) if mat.size else 0.0, np.finfo(float).tiny)
    if not np.allclose(mat, mat.T, rtol=1e-5, atol=1e-6 * scale):
        raise ValueError("`interactions` is not symmetric; pass interaction_scores(...) output.")
    labels = _names(names, k)
    ax = _axes(ax)
    image = ax.imshow(mat, cmap="RdBu_r", vmin=-scale, vmax=scale, interpolation="nearest")
    ax.set_xticks(np.arange(k), labels, rotation=90)
    ax.set_yticks(np.arange(k), labels)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label="interaction")
    if title is not None:
        ax.set_title(title)
    return ax


def _lds_text(lds: Any) -> str:
    if lds is None:
        return ""
    if hasattr(lds, "low") and hasattr(lds, "high"):
        return f"LDS {float(lds.mean):.3f} [{float(lds.low):.3f}, {float(lds.high):.3f}]"
    if hasattr(lds, "mean"):
        return f"LDS {float(lds.mean):.3f}"
    return f"LDS {float(lds):.3f}"


def plot_predictions(pred: Any, actual: Any, *, target: Optional[int] = 0, lds: Any = None,
                     ax: Any = None, title: Optional[str] = None):
    """Surrogate predictions against measured values on held-out masks, with a ``y = x`` line.

    Args:
      pred: ``[h]`` or ``[h, T]`` predictions (``kernattr.predict`` on held-out masks).
      actual: same shape, the observed values on those masks.
      target: which target to show; ``None`` shows every target (one colour each).
      lds: optional :class:`kernattr.LDSInterval` (title shows mean and interval),
        :class:`kernattr.LDSResult` or a float.
      ax: matplotlib ``Axes`` (default: a new figure's).
      title: title text placed before the LDS.

    Returns:
      The ``Axes``; ``ax.collections`` holds one scatter per shown target whose offsets are
      the ``(actual, pred)`` points.

    Raises:
      ValueError: shapes differ, bad ``target``.

    >>> import matplotlib; matplotlib.use("Agg")
    >>> import numpy as np, kernattr.plots as kp
    >>> ax = kp.plot_predictions(np.array([1.0, 2.0, 3.5]), np.array([1.2, 1.9, 3.0]), lds=0.9)
    >>> ax.get_title()
    'LDS 0.900'
    """
    p, a = np.asarray(pred, dtype=float), np.asarray(actual, dtype=float)
    if p.shape != a.shape or p.ndim not in (1, 2):
        raise ValueError(f"`pred` {p.shape} and `actual` {a.shape} must have the same shape, "
                         "[h] or [h, T].")
    if p.ndim == 1:
        p, a = p[:, None], a[:, None]
    if target is None:
        cols = list(range(p.shape[1]))
    else:
        _column(p[0], target, "pred", 0)  # checks the index
        cols = [target % p.shape[1]]
    ax = _axes(ax)
    for c in cols:
        ax.scatter(a[:, c], p[:, c], s=14, alpha=0.8, label=f"target {c}")
    lo = float(min(a[:, cols].min(), p[:, cols].min()))
    hi = float(max(a[:, cols].max(), p[:, cols].max()))
    ax.plot([lo, hi], [lo, hi], color="0.4", linewidth=0.8, linestyle="--")
    ax.set_xlabel("measured (held-out masks)")
    ax.set_ylabel("surrogate prediction")
    text = "; ".join(t for t in (title, _lds_text(lds)) if t)
    if text:
        ax.set_title(text)
    return ax


def plot_workflow(result: Any, *, target: int = 0, names: Optional[Sequence[str]] = None):
    """Shapley values with intervals, interactions and (with held-out labels) predictions of one
    target; the title of the predictions panel carries the LDS over all targets.

    Args:
      result: :class:`kernattr.WorkflowResult`.
      target: which target to show.
      names: ``K`` task names.

    Returns:
      A matplotlib ``Figure``: the scores, the heatmap and its colour bar, and (when ``result``
      has held-out real labels) the predictions.

    >>> import matplotlib; matplotlib.use("Agg")
    >>> import types, jax.numpy as jnp, kernattr as ka, kernattr.plots as kp
    >>> v = jnp.array([[0.2], [-0.1]])
    >>> result = types.SimpleNamespace(  # the fields of a WorkflowResult that are drawn
    ...     shapley=ka.AttributionIntervals(v, 0.1 + 0 * v, v - 0.2, v + 0.2),
    ...     interactions=jnp.zeros((2, 2, 1)), heldout_masks=None)
    >>> len(kp.plot_workflow(result).axes)
    3
    """
    plt = _pyplot()
    panels = 3 if result.heldout_masks is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.8 * panels, 4.2), layout="constrained")
    plot_scores(result.shapley, target=target, names=names, ax=axes[0],
                title=f"Shapley values, target {target}")
    plot_interactions(result.interactions, target=target, names=names, ax=axes[1],
                      title="interactions")
    if panels == 3:
        plot_predictions(predict(result.surrogate, result.heldout_masks), result.heldout_labels,
                         target=target, lds=result.lds, ax=axes[2], title="held-out")
    return fig
