"""How close estimated subset labels F̂ are to real fine-tuning labels F on the same masks."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from .. import _checks
from .._metrics import spearman as _spearman

__all__ = ["Comparison", "EstimatorError", "compare_estimator_to_finetuning", "estimator_error"]


class EstimatorError(NamedTuple):
    """Agreement of estimated labels ``F̂`` with real labels ``F`` (``[m, T]`` each).

    Attributes:
      relative_error: scalar, the headline figure (``results.json`` ``"relative_error"``): mean over
        masks of ``|mean_t F̂[j, t] − mean_t F[j, t]| / |mean_t F[j, t]|`` (the error on the mean
        target metric of each mask).
      no_change_relative_error: scalar, the same quantity for the prediction "fine-tuning changes
        nothing", ``F̂[j, t] = F0[t]`` (the metric at ``W0``): mean over masks of
        ``|mean_t F0 − mean_t F[j]| / |mean_t F[j]|``. ``None`` when ``F0`` is not given.
      relative_error_per_mask: ``[m]`` the per-mask terms averaged in ``relative_error``.
      elementwise_mean: scalar, mean over masks and targets of ``|F̂ − F| / |F|`` (entries with
        ``F = 0`` are excluded; sensitive to targets whose metric is near zero).
      elementwise_median: scalar, median of the same ``[m, T]`` ratios.
      elementwise_p90: scalar, 90th percentile of the same ratios (the spread).
      no_change_elementwise_mean: scalar, ``elementwise_mean`` for ``F̂ = F0``; ``None`` without
        ``F0``.
      spearman: scalar, rank agreement across masks: for each target ``t`` the Spearman correlation
        (ties get average ranks) of ``F̂[:, t]`` and ``F[:, t]`` over the ``m`` masks, averaged
        over targets whose two columns are both non-constant (``NaN`` if none is).
      spearman_per_target: ``[T]`` the per-target correlations (``NaN`` for constant columns).
      change_captured: scalar, ``Σ (F̂ − F0)(F − F0) / Σ (F − F0)²`` over masks and targets: the
        fraction of the real change (from ``W0``) that the estimate reproduces, 1 when exact.
        ``None`` without ``F0``.
    """

    relative_error: jax.Array
    no_change_relative_error: Optional[jax.Array]
    relative_error_per_mask: jax.Array
    elementwise_mean: jax.Array
    elementwise_median: jax.Array
    elementwise_p90: jax.Array
    no_change_elementwise_mean: Optional[jax.Array]
    spearman: jax.Array
    spearman_per_target: jax.Array
    change_captured: Optional[jax.Array]


def _elementwise(F_hat: jax.Array, F: jax.Array) -> tuple[jax.Array, jax.Array]:
    nz = F != 0
    ratio = jnp.abs(F_hat - F) / jnp.where(nz, jnp.abs(F), 1.0)
    return jnp.where(nz, ratio, jnp.nan), nz


def estimator_error(F_hat: Any, F: Any, F0: Any = None) -> EstimatorError:
    """Relative error and rank agreement of estimated labels against real fine-tuning labels.

    See :class:`EstimatorError` for the exact definition of every field. In short:
    ``relative_error`` = mean_j ``|mean_t F̂ − mean_t F| / |mean_t F|`` (on the mean target metric
    per mask), elementwise ``|F̂ − F| / |F|`` statistics over all (mask, target) pairs,
    ``no_change_*`` the same for the baseline ``F̂ = F0`` (nothing changes from ``W0``), and the
    Spearman correlation across masks averaged over targets.

    Args:
      F_hat: ``[m, T]`` (or ``[m]``) estimated labels, e.g. from
        :func:`kernattr.estimate_subset_labels`.
      F: ``[m, T]`` (or ``[m]``) real labels on the same masks, e.g. from
        :func:`evaluate_targets` after :func:`finetune_on_masks`.
      F0: optional ``[T]`` (or scalar) metric of the starting model ``W0`` on the targets.

    Returns:
      An :class:`EstimatorError`.

    Example:
      >>> import jax.numpy as jnp
      >>> from kernattr.groundtruth import estimator_error
      >>> F = jnp.array([[1.0, 2.0], [2.0, 3.0], [3.0, 5.0]])
      >>> err = estimator_error(1.01 * F, F, F0=jnp.array([2.0, 3.0]))
      >>> round(float(err.relative_error), 4), float(err.spearman)
      (0.01, 1.0)
    """
    F_hat = _checks.as_float_array(F_hat, "F_hat")
    F = _checks.as_float_array(F, "F")
    _checks.check_rank(F_hat, (1, 2), "F_hat", "[m, T] or [m]")
    _checks.check_rank(F, (1, 2), "F", "[m, T] or [m]")
    if F_hat.ndim == 1:
        F_hat = F_hat[:, None]
    if F.ndim == 1:
        F = F[:, None]
    if F_hat.shape != F.shape:
        raise ValueError(
            f"`F_hat` has shape {tuple(F_hat.shape)} but `F` has shape {tuple(F.shape)}; "
            "they must hold the same masks (rows) and targets (columns)."
        )
    if F.shape[0] == 0 or F.shape[1] == 0:
        raise ValueError(f"`F` is empty (shape {tuple(F.shape)}).")
    dtype = jnp.result_type(F_hat, F)
    F_hat, F = F_hat.astype(dtype), F.astype(dtype)
    for arr, name in ((F_hat, "F_hat"), (F, "F")):
        _checks.error_if(arr, ~jnp.isfinite(arr), f"`{name}` contains {{count}} non-finite values.")

    mean_hat, mean_true = jnp.mean(F_hat, axis=1), jnp.mean(F, axis=1)
    per_mask = jnp.abs(mean_hat - mean_true) / jnp.abs(mean_true)
    ratio, _ = _elementwise(F_hat, F)
    if F.shape[0] >= 2:
        # [T], NaN where a column is constant (column by column, 1-D calls).
        rho = jax.vmap(_spearman, in_axes=1)(F_hat, F)
    else:
        rho = jnp.full((F.shape[1],), jnp.nan, dtype)

    no_change = no_change_elem = captured = None
    if F0 is not None:
        F0 = _checks.as_float_array(F0, "F0").astype(dtype)
        _checks.check_rank(F0, (0, 1), "F0", "[T] (metric at W0 per target)")
        if F0.ndim == 1 and F0.shape[0] != F.shape[1]:
            raise ValueError(f"`F0` has {F0.shape[0]} targets but `F` has {F.shape[1]} columns.")
        _checks.error_if(F0, ~jnp.isfinite(F0), "`F0` contains {count} non-finite values.")
        F0b = jnp.broadcast_to(F0, F.shape)
        no_change = jnp.mean(jnp.abs(jnp.mean(F0b, axis=1) - mean_true) / jnp.abs(mean_true))
        no_change_elem = jnp.nanmean(_elementwise(F0b, F)[0])
        dF, dF_hat = F - F0b, F_hat - F0b
        captured = jnp.sum(dF_hat * dF) / jnp.sum(dF**2)

    return EstimatorError(
        relative_error=jnp.mean(per_mask),
        no_change_relative_error=no_change,
        relative_error_per_mask=per_mask,
        elementwise_mean=jnp.nanmean(ratio),
        elementwise_median=jnp.nanmedian(ratio),
        elementwise_p90=jnp.nanpercentile(ratio, 90.0),
        no_change_elementwise_mean=no_change_elem,
        spearman=jnp.nanmean(rho),
        spearman_per_target=rho,
        change_captured=captured,
    )


class Comparison(NamedTuple):
    """Estimator vs real fine-tuning on the same masks (a pytree).

    Attributes:
      error: the :class:`EstimatorError` of ``F_hat`` against ``F`` (with ``F0``).
      labels: ``[m, T]`` real labels ``F`` from fine-tuning.
      base: ``[T]`` metric at ``params0`` (``F0``).
    """

    error: EstimatorError
    labels: jax.Array
    base: jax.Array


def compare_estimator_to_finetuning(
    F_hat: Any,
    apply_fn: Any,
    params0: Any,
    inputs: Any,
    labels: Any,
    task_ids: Any,
    masks: Any,
    target_inputs: Any,
    target_labels: Any,
    *,
    loss: str,
    metric: str = "loss",
    **finetune_kwargs: Any,
) -> Comparison:
    """Fine-tunes for real on the masks of ``F_hat`` and measures the estimator against it.

    :func:`finetune_labels` (``F`` and ``F0``) then :func:`estimator_error` ``(F_hat, F, F0)``.
    ``F_hat`` must come from the same masks (rows), targets (columns), loss and metric, e.g.
    ``kernattr.estimate_subset_labels(train, target, masks, loss=loss, metric=metric, ...)``.

    Args:
      F_hat: ``[m, T]`` estimated labels.
      apply_fn: ``apply_fn(params, x) -> scalar or [C]`` for one unbatched example.
      params0: parameter pytree ``W0`` (where the features were computed).
      inputs: training inputs ``[n, ...]``.
      labels: ``[n]`` training labels.
      task_ids: ``[n]`` task ids in ``0..K-1``.
      masks: ``[m, K]`` the masks ``F_hat`` was estimated on.
      target_inputs: target inputs ``[T, ...]``.
      target_labels: ``[T]`` target labels.
      loss: ``"squared"``, ``"logistic"`` or ``"softmax"``.
      metric: ``"loss"``, ``"margin"`` or ``"output"``.
      **finetune_kwargs: keyword arguments of :func:`finetune_on_masks` (``optimizer``,
        ``num_steps``, ...).

    Returns:
      A :class:`Comparison` ``(error, labels, base)``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from kernattr.groundtruth import compare_estimator_to_finetuning
      >>> x = jnp.eye(2); y = jnp.ones(2); t = jnp.array([0, 1]); masks = jnp.eye(2)
      >>> F_hat = jnp.array([[0.0, 0.5], [0.5, 0.0]])
      >>> cmp = compare_estimator_to_finetuning(F_hat, lambda w, xi: xi @ w, jnp.zeros(2), x, y, t,
      ...     masks, x, y, loss="squared", optimizer=optax.sgd(1.0), num_steps=1)
      >>> float(cmp.error.relative_error), float(cmp.error.no_change_relative_error)
      (0.0, 1.0)
    """
    from ._finetune import finetune_labels

    res = finetune_labels(
        apply_fn, params0, inputs, labels, task_ids, masks, target_inputs, target_labels,
        loss=loss, metric=metric, **finetune_kwargs,
    )
    return Comparison(error=estimator_error(F_hat, res.labels, res.base), labels=res.labels, base=res.base)
