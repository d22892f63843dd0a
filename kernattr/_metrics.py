"""Evaluation metrics, vectorised over targets: Spearman / Pearson per column, LDS, errors.

Columns are targets: ``pred`` and ``actual`` are ``[m]`` (one target) or ``[m, T]`` (``m`` masks,
``T`` targets), and every column statistic is computed for all columns at once on device (no
Python loop over ``T``). A column statistic returns a scalar for ``[m]`` input and ``[T]`` for
``[m, T]`` input.

Constant columns (a constant prediction or a constant ground truth, decided exactly from the
range of the values) have no defined correlation: :func:`spearman` / :func:`pearson` return NaN for them, and :func:`lds` averages over
the remaining targets only (``LDSResult.num_valid`` says how many; the mean is NaN when none is
valid). NaN/inf *inputs* are rejected (``ValueError``; under ``jit`` raised when the compiled
function runs), never silently propagated.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._checks import as_float_array, check_count, check_key, check_rank, error_if

__all__ = [
    "BootstrapInterval",
    "EstimatorError",
    "LDSInterval",
    "LDSResult",
    "PairedLDSInterval",
    "bootstrap_indices",
    "bootstrap_interval",
    "column_spearman",
    "estimator_error",
    "lds",
    "lds_interval",
    "normalized_error",
    "paired_lds_interval",
    "pearson",
    "rank_data",
    "relative_error",
    "spearman",
]


def _check_finite(x: jax.Array, name: str) -> jax.Array:
    return error_if(
        x,
        ~jnp.isfinite(x),
        f"`{name}` contains {{count}} non-finite values (NaN/inf); drop or impute them first.",
    )


def _check_pair(a: Any, b: Any, name_a: str, name_b: str, min_rows: int = 2):
    a = as_float_array(a, name_a)
    b = as_float_array(b, name_b)
    check_rank(a, (1, 2), name_a, "[m] or [m, T]")
    check_rank(b, (1, 2), name_b, "[m] or [m, T]")
    if a.shape != b.shape:
        raise ValueError(
            f"`{name_a}` has shape {tuple(a.shape)} but `{name_b}` has shape {tuple(b.shape)}; "
            "they must match (rows are masks, columns targets)."
        )
    if a.shape[0] < min_rows:
        raise ValueError(
            f"`{name_a}` has {a.shape[0]} rows; at least {min_rows} masks are needed."
        )
    if a.ndim == 2 and a.shape[1] == 0:
        raise ValueError(f"`{name_a}` has no target columns (shape {tuple(a.shape)}).")
    dtype = jnp.promote_types(a.dtype, b.dtype)
    a, b = a.astype(dtype), b.astype(dtype)
    return _check_finite(a, name_a), _check_finite(b, name_b)


def _sort_keys(x: jax.Array) -> jax.Array:
    """Order-preserving unsigned integer keys of floats (``-0.0`` and ``+0.0`` tie)."""
    if x.dtype.itemsize < 4:
        x = x.astype(jnp.float32)
    it, ut = (jnp.int32, jnp.uint32) if x.dtype.itemsize == 4 else (jnp.int64, jnp.uint64)
    x = jnp.where(x == 0, jnp.zeros((), x.dtype), x)
    bits = lax.bitcast_convert_type(x, it)
    bits = jnp.where(bits < 0, bits ^ jnp.array(jnp.iinfo(it).max, it), bits)  # negatives: flip
    return lax.bitcast_convert_type(bits, ut) ^ jnp.array(1 << (8 * x.dtype.itemsize - 1), ut)


def _argsort_rows(u: jax.Array) -> jax.Array:
    """Stable argsort of unsigned keys along the last axis, ``[R, m] -> [R, m]`` int32.

    LSD radix passes, each ONE single-operand integer sort of ``(digit << b) | position``
    (``b = ceil(log2 m)`` bits of position, the rest a digit of the key): ties in a digit keep
    the previous pass's order, so the result is a stable argsort. On XLA:CPU a single-operand
    integer sort is several times faster than the two-operand (keys, iota) sort of
    ``jnp.argsort``; two passes cover 32-bit keys up to m = 2^16.
    """
    ut = u.dtype
    nbits = 8 * ut.itemsize
    m = u.shape[-1]
    b = max(1, math.ceil(math.log2(m)))
    d = nbits - b
    axis = u.ndim - 1
    pos_bits = jnp.broadcast_to(jnp.arange(m, dtype=ut), u.shape)
    low = jnp.array((1 << b) - 1, ut)
    order = None
    shift = 0
    while shift < nbits:
        cur = u if order is None else jnp.take_along_axis(u, order, axis=axis)
        width = min(d, nbits - shift)
        digit = (cur >> jnp.array(shift, ut)) & jnp.array((1 << width) - 1, ut)
        packed = lax.sort((digit << jnp.array(b, ut)) | pos_bits, dimension=axis, is_stable=False)
        pos = (packed & low).astype(jnp.int32)
        order = pos if order is None else jnp.take_along_axis(order, pos, axis=axis)
        shift += d
    return order


class _Ties(NamedTuple):
    """Sort structure of the rows of ``[R, m]`` values: ``order`` (stable argsort), ``inverse``
    (position of each entry in the sorted row), ``start`` / ``end`` (first and last sorted
    position of each sorted entry's tie group), all ``[R, m]`` int32."""

    order: jax.Array
    inverse: jax.Array
    start: jax.Array
    end: jax.Array


def _ties(x: jax.Array) -> _Ties:
    m = x.shape[-1]
    axis = x.ndim - 1
    u = _sort_keys(x)
    order = _argsort_rows(u)
    us = jnp.take_along_axis(u, order, axis=axis)
    j = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), u.shape)
    differs = us[..., 1:] != us[..., :-1]
    ones = jnp.ones(u.shape[:-1] + (1,), bool)
    first = jnp.concatenate([ones, differs], axis=axis)  # starts a tie group
    last = jnp.concatenate([differs, ones], axis=axis)  # ends a tie group
    start = lax.cummax(jnp.where(first, j, 0), axis=axis)
    end = lax.cummin(jnp.where(last, j, m - 1), axis=axis, reverse=True)
    rows = jnp.arange(x.shape[0])[:, None]
    inverse = jnp.zeros_like(order).at[rows, order].set(j, unique_indices=True)
    return _Ties(order, inverse, start, end)


def _rank_rows(x: jax.Array) -> jax.Array:
    """Average (1-based) ranks along the last axis of ``[R, m]``; ties share their mean rank."""
    t = _ties(x)
    avg = (t.start + t.end).astype(jnp.promote_types(x.dtype, jnp.float32)) / 2 + 1
    return jnp.take_along_axis(avg, t.inverse, axis=-1)


def _resampled_ranks(t: _Ties, counts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Average ranks ``[R, m]`` of each original entry within a resample of the rows, and
    ``[R]`` whether the row of values is constant in the resample.

    ``counts [m]`` says how often each row was drawn. A row drawn ``c`` times is ``c`` tied
    copies, and its rank in the resample is the number of drawn entries strictly below its tie
    group plus half the group's drawn size (plus 1/2): prefix sums of the counts in sorted order,
    no new sort. Rows drawn zero times get a rank too; callers weight them by their count (0).
    The values are constant exactly when one tie group holds every draw (integer counts: exact,
    unlike a variance computed in floating point).
    """
    cs = counts[t.order]  # [R, m] counts in sorted order
    cum = jnp.cumsum(cs, axis=-1)
    below = jnp.take_along_axis(cum - cs, t.start, axis=-1)
    size = jnp.take_along_axis(cum, t.end, axis=-1) - below
    constant = jnp.max(size, axis=-1) == cum[..., -1]
    return jnp.take_along_axis(below + (size + 1) / 2, t.inverse, axis=-1), constant


def _weighted_pearson_rows(a: jax.Array, b: jax.Array, w: jax.Array,
                           constant: jax.Array) -> jax.Array:
    """Pearson correlation per row of ``[R, m]`` with row weights ``w [m]`` (copies drawn);
    NaN where a row of either side is ``constant [R]`` or has zero weighted variance."""
    n = jnp.sum(w)
    a = a - (a @ w)[:, None] / n
    b = b - (b @ w)[:, None] / n
    saa, sbb, sab = (a * a) @ w, (b * b) @ w, (a * b) @ w
    ok = (saa > 0) & (sbb > 0) & ~constant
    r = jnp.where(ok, sab / jnp.sqrt(jnp.where(ok, saa * sbb, 1.0)), jnp.nan)
    return jnp.clip(r, -1.0, 1.0)


def _ranks(x: jax.Array) -> jax.Array:
    """Column ranks of ``[m]`` or ``[m, T]``."""
    if x.ndim == 1:
        return _rank_rows(x[None, :])[0]
    return _rank_rows(x.T).T


def rank_data(x: Any) -> jax.Array:
    """Tie-aware ranks per column (like ``scipy.stats.rankdata(x, axis=0)``, method "average").

    Args:
      x: ``[m]`` or ``[m, T]`` real values.

    Returns:
      Float ranks in ``1..m`` (at least float32), same shape as ``x``; tied values share their
      average rank; ``-0.0`` ties with ``0.0``; ``±inf`` rank last/first.

    Example:
      >>> import kernattr as ka
      >>> ka.rank_data([3.0, 1.0, 3.0, 2.0]).tolist()
      [3.5, 1.0, 3.5, 2.0]
    """
    x = as_float_array(x, "x")
    check_rank(x, (1, 2), "x", "[m] or [m, T]")
    if x.shape[0] == 0:
        raise ValueError("`x` has no rows.")
    x = error_if(x, jnp.isnan(x), "`x` contains {count} NaN values; ranks are undefined.")
    return _ranks(x)


def is_constant(x: jax.Array) -> jax.Array:
    """Per column of ``[m]`` / ``[m, T]``: True where every value is the same.

    Decided from the range of the values (exact), not from a variance computed after an inexact
    mean (which leaves ~eps-sized noise for a constant float32 column).
    """
    return jnp.max(x, axis=0) == jnp.min(x, axis=0)


def _pearson_cols(a: jax.Array, b: jax.Array) -> jax.Array:
    const = is_constant(a) | is_constant(b)
    a = a - jnp.mean(a, axis=0, keepdims=True)
    b = b - jnp.mean(b, axis=0, keepdims=True)
    saa = jnp.sum(a * a, axis=0)
    sbb = jnp.sum(b * b, axis=0)
    sab = jnp.sum(a * b, axis=0)
    ok = (saa > 0) & (sbb > 0) & ~const
    denom = jnp.sqrt(jnp.where(ok, saa * sbb, 1.0))
    r = jnp.where(ok, sab / denom, jnp.nan)
    return jnp.clip(r, -1.0, 1.0)


def pearson(a: Any, b: Any) -> jax.Array:
    """Pearson correlation of ``a`` and ``b``, column by column.

    Args:
      a: ``[m]`` or ``[m, T]`` values (``m >= 2``).
      b: same shape as ``a``.

    Returns:
      Scalar (``[m]`` inputs) or ``[T]``; NaN for a column where ``a`` or ``b`` is constant.

    Example:
      >>> import kernattr as ka
      >>> round(float(ka.pearson([1.0, 2.0, 3.0], [2.0, 4.0, 7.0])), 4)
      0.9934
    """
    a, b = _check_pair(a, b, "a", "b")
    return _pearson_cols(a, b)


def spearman(a: Any, b: Any) -> jax.Array:
    """Spearman rank correlation of ``a`` and ``b``, column by column, tie-aware.

    Ties get average ranks, as in ``scipy.stats.spearmanr``; the correlation is then the Pearson
    correlation of the ranks. Computed on device for all columns at once (no Python loop):
    floats are mapped to order-preserving integer keys and argsorted by two single-operand
    integer sorts (radix passes), ties are averaged with cumulative max/min.

    Args:
      a: ``[m]`` or ``[m, T]`` values (``m >= 2``), e.g. surrogate predictions.
      b: same shape as ``a``, e.g. measured metrics.

    Returns:
      Scalar (``[m]`` inputs) or ``[T]``; NaN for a column where ``a`` or ``b`` is constant.

    Example:
      >>> import kernattr as ka
      >>> float(ka.spearman([1.0, 2.0, 3.0, 4.0], [1.0, 5.0, 9.0, 20.0]))
      1.0
    """
    a, b = _check_pair(a, b, "a", "b")
    return _pearson_cols(_ranks(a), _ranks(b))


class LDSResult(NamedTuple):
    """Linear datamodeling score (a pytree).

    ``float(result)`` gives ``result.mean`` (handy for printing); use ``result.mean`` in array
    code.

    Attributes:
      mean: scalar, mean Spearman correlation over the targets with a defined correlation (NaN if
        there is none).
      per_target: ``[T]`` Spearman correlation per target (scalar for ``[m]`` inputs); NaN where
        the prediction or the ground truth is constant across masks.
      num_valid: scalar int32, number of targets that entered the mean.
    """

    mean: jax.Array
    per_target: jax.Array
    num_valid: jax.Array

    def __float__(self) -> float:
        return float(self.mean)


def lds(pred: Any, actual: Any) -> LDSResult:
    """Linear datamodeling score: Spearman correlation across masks, averaged over targets.

    For each target ``t``, the Spearman correlation over the ``m`` held-out masks between the
    surrogate's predictions ``pred[:, t]`` and the measured metric ``actual[:, t]`` (of models
    really trained on those masks); then the mean over targets. Targets whose prediction or
    ground truth is constant have no correlation (NaN in ``per_target``) and are left out of the
    mean (see ``num_valid``).

    Args:
      pred: ``[m]`` or ``[m, T]`` predicted metric per held-out mask and target.
      actual: same shape, measured metric.

    Returns:
      :class:`LDSResult` ``(mean, per_target, num_valid)``.

    Example:
      >>> import kernattr as ka
      >>> res = ka.lds([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]], [[1.0, 1.0], [2.0, 3.0], [4.0, 2.0]])
      >>> res.per_target.tolist(), float(res.mean)
      ([1.0, -0.5], 0.25)
    """
    pred, actual = _check_pair(pred, actual, "pred", "actual")
    per_target = spearman(pred, actual)
    valid = ~jnp.isnan(per_target)
    num_valid = jnp.sum(valid, dtype=jnp.int32)
    total = jnp.sum(jnp.where(valid, per_target, 0.0))
    mean = jnp.where(num_valid > 0, total / jnp.maximum(num_valid, 1), jnp.nan)
    return LDSResult(mean=mean, per_target=per_target, num_valid=num_valid)


def normalized_error(pred: Any, actual: Any) -> jax.Array:
    """Mean squared error divided by the variance of the ground truth, per target.

    ``mean_i (pred[i,t] - actual[i,t])² / var_i(actual[:, t])`` (population variance). 0 is
    perfect; 1 is what predicting the mean of ``actual`` achieves (``1 - R²``).

    Args:
      pred: ``[m]`` or ``[m, T]`` predictions.
      actual: same shape, ground truth.

    Returns:
      Scalar (``[m]`` inputs) or ``[T]``; NaN for a target whose ground truth is constant.

    Example:
      >>> import kernattr as ka
      >>> round(float(ka.normalized_error([1.0, 2.0, 3.0], [1.0, 2.0, 4.0])), 4)
      0.2143
    """
    pred, actual = _check_pair(pred, actual, "pred", "actual")
    mse = jnp.mean((pred - actual) ** 2, axis=0)
    var = jnp.var(actual, axis=0)
    ok = (var > 0) & ~is_constant(actual)
    return jnp.where(ok, mse / jnp.where(ok, var, 1.0), jnp.nan)


def relative_error(pred: Any, actual: Any) -> jax.Array:
    """Element-wise relative error ``|pred - actual| / |actual|``.

    Used to compare the gradient estimator with real fine-tuning on the same masks; average it
    yourself (e.g. ``jnp.mean``) over the axes you need. :func:`estimator_error` is the summary
    built on it (the error of each mask's mean over targets, entries with ``actual == 0`` dropped,
    plus Spearman and the "nothing changes" baseline).

    Args:
      pred: ``[m]`` or ``[m, T]`` estimates.
      actual: same shape, reference values (e.g. metrics of really fine-tuned models).

    Returns:
      Same shape as the inputs; ``inf`` where ``actual == 0`` and ``pred != 0``, 0 where both are 0.

    Example:
      >>> import kernattr as ka
      >>> [round(float(v), 3) for v in ka.relative_error([1.1, 1.8], [1.0, 2.0])]
      [0.1, 0.1]
    """
    pred, actual = _check_pair(pred, actual, "pred", "actual", min_rows=1)
    diff = jnp.abs(pred - actual)
    denom = jnp.abs(actual)
    return jnp.where(diff == 0, 0.0, diff / denom).astype(pred.dtype)


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


def _elementwise(F_hat: jax.Array, F: jax.Array) -> jax.Array:
    """:func:`relative_error` with the entries where ``F == 0`` left out (NaN)."""
    return jnp.where(F != 0, relative_error(F_hat, F), jnp.nan)


def estimator_error(F_hat: Any, F: Any, F0: Any = None) -> EstimatorError:
    """Relative error and rank agreement of estimated labels against real fine-tuning labels.

    How it differs from :func:`relative_error`: that one is element-wise (``[m, T]`` in, ``[m, T]``
    out, no averaging). This one summarises: its headline ``relative_error`` first averages the
    targets of each mask and then takes the relative error of that mean (per-target errors of
    opposite sign can cancel), and its element-wise statistics drop the entries whose real value
    is 0 (where :func:`relative_error` gives ``inf``). Both use the same formula
    ``|F̂ − F| / |F|`` (:func:`relative_error` computes every ratio here).

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
      >>> import kernattr as ka
      >>> F = jnp.array([[1.0, 2.0], [2.0, 3.0], [3.0, 5.0]])
      >>> err = ka.estimator_error(1.01 * F, F, F0=jnp.array([2.0, 3.0]))
      >>> round(float(err.relative_error), 4), float(err.spearman)
      (0.01, 1.0)
    """
    F_hat = as_float_array(F_hat, "F_hat")
    F = as_float_array(F, "F")
    check_rank(F_hat, (1, 2), "F_hat", "[m, T] or [m]")
    check_rank(F, (1, 2), "F", "[m, T] or [m]")
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
    F_hat = error_if(F_hat, ~jnp.isfinite(F_hat), "`F_hat` contains {count} non-finite values.")
    F = error_if(F, ~jnp.isfinite(F), "`F` contains {count} non-finite values.")

    mean_hat, mean_true = jnp.mean(F_hat, axis=1), jnp.mean(F, axis=1)
    per_mask = relative_error(mean_hat, mean_true)
    ratio = _elementwise(F_hat, F)
    if F.shape[0] >= 2:
        # [T], NaN where a column is constant (column by column, 1-D calls).
        rho = jax.vmap(spearman, in_axes=1)(F_hat, F)
    else:
        rho = jnp.full((F.shape[1],), jnp.nan, dtype)

    no_change = no_change_elem = captured = None
    if F0 is not None:
        F0 = as_float_array(F0, "F0").astype(dtype)
        check_rank(F0, (0, 1), "F0", "[T] (metric at W0 per target)")
        if F0.ndim == 1 and F0.shape[0] != F.shape[1]:
            raise ValueError(f"`F0` has {F0.shape[0]} targets but `F` has {F.shape[1]} columns.")
        F0 = error_if(F0, ~jnp.isfinite(F0), "`F0` contains {count} non-finite values.")
        F0b = jnp.broadcast_to(F0, F.shape)
        no_change = jnp.mean(relative_error(jnp.mean(F0b, axis=1), mean_true))
        no_change_elem = jnp.nanmean(_elementwise(F0b, F))
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


# --------------------------------------------------------------------------------------------
# Bootstrap intervals over held-out masks
# --------------------------------------------------------------------------------------------
# Every interval below resamples the ROWS (masks) of its inputs with replacement, jointly across
# all columns (targets) and, for paired intervals, jointly across the two methods: the same
# resampled masks enter both LDS values of a replicate. Replicate ``r`` uses the rows
# ``bootstrap_indices(key, m, num_resamples)[r]``; the interval is the percentile interval of
# the replicates (``numpy.nanquantile``'s default linear interpolation).


class BootstrapInterval(NamedTuple):
    """Percentile bootstrap interval of a mean over rows (a pytree).

    Attributes:
      mean: scalar (``[m]`` input) or ``[T]``, the statistic on the full data.
      low: same shape, lower end of the interval (``(1 - level)/2`` quantile of the replicates).
      high: same shape, upper end (``(1 + level)/2`` quantile).
      std: same shape, standard deviation of the replicates (the bootstrap standard error).
      samples: ``[B]`` or ``[B, T]`` replicates (``B = num_resamples``).
    """

    mean: jax.Array
    low: jax.Array
    high: jax.Array
    std: jax.Array
    samples: jax.Array


class LDSInterval(NamedTuple):
    """LDS with a percentile bootstrap interval over held-out masks (a pytree).

    Attributes:
      mean: scalar, :func:`lds` on all held-out masks (the point estimate).
      low: scalar, lower end of the interval.
      high: scalar, upper end of the interval.
      std: scalar, standard deviation of the replicates (the bootstrap standard error).
      samples: ``[B]`` LDS of each resample; NaN for a resample where no target has a defined
        correlation (left out of ``low``/``high``/``std``).
      num_valid: scalar int32, number of targets in the point estimate (as :func:`lds`).
      num_resamples_valid: scalar int32, number of resamples with a defined LDS; when fewer
        than half are, ``low``, ``high`` and ``std`` are NaN (the bootstrap distribution is
        then mostly degenerate resamples, and its quantiles mean nothing).
    """

    mean: jax.Array
    low: jax.Array
    high: jax.Array
    std: jax.Array
    samples: jax.Array
    num_valid: jax.Array
    num_resamples_valid: jax.Array | None = None

    def __float__(self) -> float:
        return float(self.mean)


class PairedLDSInterval(NamedTuple):
    """Interval of ``LDS(a) - LDS(b)`` from the same resamples, and each method's own interval.

    ``low > 0`` means that ``a`` beats ``b`` at the chosen level; ``high < 0`` that ``b`` beats
    ``a``; otherwise the data cannot tell them apart.

    Attributes:
      mean: scalar, ``lds(pred_a, actual).mean - lds(pred_b, actual).mean``.
      low: scalar, lower end of the interval of the difference.
      high: scalar, upper end of the interval of the difference.
      std: scalar, standard deviation of the replicate differences.
      samples: ``[B]`` replicate differences (NaN where either LDS is undefined).
      a: :class:`LDSInterval` of ``pred_a`` (same resamples).
      b: :class:`LDSInterval` of ``pred_b`` (same resamples).
      num_resamples_valid: scalar int32, number of resamples where the difference is defined
        (``low``, ``high``, ``std`` are NaN when fewer than half are).
    """

    mean: jax.Array
    low: jax.Array
    high: jax.Array
    std: jax.Array
    samples: jax.Array
    a: LDSInterval
    b: LDSInterval
    num_resamples_valid: jax.Array | None = None


def _check_interval_config(num_resamples: Any, level: Any, batch_size: Any) -> None:
    check_count(num_resamples, "num_resamples", minimum=2)
    if isinstance(level, bool) or not isinstance(level, (int, float, np.floating)):
        raise TypeError(f"`level` must be a Python float in (0, 1), got {level!r}.")
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"`level` must be in (0, 1) (e.g. 0.95), got {level}.")
    if batch_size is not None:
        check_count(batch_size, "batch_size", minimum=1)


def bootstrap_indices(key: jax.Array, num_rows: int, num_resamples: int) -> jax.Array:
    """Row indices of the bootstrap resamples used by every interval in kernattr.

    ``jax.random.randint(key, (num_resamples, num_rows), 0, num_rows)``: resample ``r`` draws
    ``num_rows`` rows with replacement. Use it to compute other statistics on exactly the
    resamples that :func:`lds_interval` / :func:`paired_lds_interval` /
    :func:`bootstrap_interval` use with the same key.

    Args:
      key: typed PRNG key (``jax.random.key(seed)``).
      num_rows: ``m``, number of rows (held-out masks) to resample.
      num_resamples: ``B``, number of resamples.

    Returns:
      ``[B, m]`` int32 row indices.

    Example:
      >>> import jax, kernattr as ka
      >>> ka.bootstrap_indices(jax.random.key(0), 5, 3).shape
      (3, 5)
    """
    check_key(key)
    check_count(num_rows, "num_rows", minimum=1)
    check_count(num_resamples, "num_resamples", minimum=1)
    return jax.random.randint(key, (num_resamples, num_rows), 0, num_rows, dtype=jnp.int32)


def column_spearman(a: jax.Array, b: jax.Array) -> jax.Array:
    """Spearman correlation per column of ``[m, T]`` arrays, WITHOUT input checks.

    The computation of :func:`spearman` for callers inside the library that have validated
    their inputs already (e.g. model selection by leave-one-out rank correlation): ``[T]``,
    NaN for a constant column.

    >>> import jax.numpy as jnp
    >>> column_spearman(jnp.array([[1.0], [2.0], [3.0]]), jnp.array([[3.0], [2.0], [1.0]])).tolist()
    [-1.0]
    """
    return _pearson_cols(_ranks(a), _ranks(b))


def _lds_cols(pred: jax.Array, actual: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Unchecked LDS of ``[m, T]`` inputs: ``(mean over defined targets, num_valid)``."""
    return _mean_defined(column_spearman(pred, actual))


def _mean_defined(per_target: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(mean of the non-NaN entries, their number)`` of per-target correlations; the mean is
    NaN when none is defined."""
    valid = ~jnp.isnan(per_target)
    num_valid = jnp.sum(valid, dtype=jnp.int32)
    total = jnp.sum(jnp.where(valid, per_target, 0.0))
    return jnp.where(num_valid > 0, total / jnp.maximum(num_valid, 1), jnp.nan), num_valid


def _default_batch(num_resamples: int, cells: int) -> int:
    """Resamples per ``lax.map`` step: about 2^22 gathered entries per step (bounded memory)."""
    return max(1, min(num_resamples, (1 << 22) // max(1, cells)))


def _quantiles(samples: jax.Array, level: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    q = jnp.asarray([(1.0 - level) / 2.0, (1.0 + level) / 2.0], samples.dtype)
    lo_hi = jnp.nanquantile(samples, q, axis=0)
    return lo_hi[0], lo_hi[1], jnp.nanstd(samples, axis=0)


def _valid_quantiles(samples: jax.Array, level: float):
    """``(low, high, std, count)`` of the defined replicates; NaN when fewer than half are."""
    count = jnp.sum(~jnp.isnan(samples), axis=0).astype(jnp.int32)
    enough = 2 * count >= samples.shape[0]
    low, high, std = (jnp.where(enough, v, jnp.nan) for v in _quantiles(samples, level))
    return low, high, std, count


def _check_interval_rows(m: int) -> None:
    if m < 3:
        raise ValueError(
            f"a bootstrap interval of the LDS needs at least 3 held-out masks (rows), got {m}: "
            "the rank correlation of 2 points is +1 or -1 by construction."
        )


def _lds_replicates(
    key: jax.Array, preds: tuple[jax.Array, ...], actual: jax.Array, num_resamples: int,
    batch_size: int | None,
) -> jax.Array:
    """``[B, P]`` LDS of each prediction in ``preds`` on each resample of the rows.

    Every column is sorted once; a resample's tie-aware ranks then follow from how often each row
    was drawn (:func:`_resampled_ranks`), and its Spearman correlations are count-weighted
    Pearson correlations of those ranks. This equals re-ranking each resample (a row drawn twice
    is a tie) without sorting ``B`` times.
    """
    m = actual.shape[0]
    idx = bootstrap_indices(key, m, num_resamples)
    cells = m * actual.shape[1] * (len(preds) + 1)
    bs = _default_batch(num_resamples, cells) if batch_size is None else batch_size
    dtype = jnp.promote_types(actual.dtype, jnp.float32)
    ties_a = _ties(actual.T)
    ties_p = [_ties(p.T) for p in preds]

    def one(rows):
        counts = jnp.zeros((m,), dtype).at[rows].add(1.0)
        ra, const_a = _resampled_ranks(ties_a, counts)
        out = []
        for t in ties_p:
            rp, const_p = _resampled_ranks(t, counts)
            out.append(_mean_defined(_weighted_pearson_rows(rp, ra, counts, const_a | const_p))[0])
        return jnp.stack(out)

    return lax.map(one, idx, batch_size=bs)


def _lds_interval_from(point, num_valid, samples, level) -> LDSInterval:
    low, high, std, count = _valid_quantiles(samples, level)
    return LDSInterval(mean=point, low=low, high=high, std=std, samples=samples,
                       num_valid=num_valid, num_resamples_valid=count)


def _as_2d(x: jax.Array) -> jax.Array:
    return x[:, None] if x.ndim == 1 else x


def lds_interval(
    key: jax.Array,
    pred: Any,
    actual: Any,
    *,
    num_resamples: int = 1000,
    level: float = 0.95,
    batch_size: int | None = None,
) -> LDSInterval:
    """LDS with a percentile bootstrap interval over the held-out masks.

    Each replicate resamples the ``m`` held-out masks (rows of ``pred`` and ``actual``, all
    targets together) with replacement (:func:`bootstrap_indices`) and recomputes :func:`lds`
    on them: per-target Spearman correlations (tie-aware; a mask drawn twice is a tie), averaged
    over the targets whose correlation is defined in that replicate. The interval is the
    ``(1 ± level)/2`` quantile pair of the replicates. Replicates run ``batch_size`` at a time
    (``jax.lax.map``), so memory stays bounded for many targets.

    Args:
      key: typed PRNG key (``jax.random.key(seed)``).
      pred: ``[m]`` or ``[m, T]`` surrogate predictions on held-out masks.
      actual: same shape, measured metric of models really trained on those masks.
      num_resamples: ``B >= 2``, number of bootstrap replicates (static).
      level: coverage of the interval in (0, 1) (static).
      batch_size: replicates per step (static); default keeps about 4M gathered entries per
        step.

    Returns:
      :class:`LDSInterval` ``(mean, low, high, std, samples, num_valid,
      num_resamples_valid)``.

    Example:
      >>> import jax, jax.numpy as jnp, kernattr as ka
      >>> actual = jax.random.normal(jax.random.key(1), (50, 3))
      >>> pred = actual + 0.5 * jax.random.normal(jax.random.key(2), (50, 3))
      >>> ci = ka.lds_interval(jax.random.key(0), pred, actual, num_resamples=200)
      >>> bool(ci.low <= ci.mean <= ci.high), ci.samples.shape
      (True, (200,))
    """
    check_key(key)
    _check_interval_config(num_resamples, level, batch_size)
    pred, actual = _check_pair(pred, actual, "pred", "actual")
    pred, actual = _as_2d(pred), _as_2d(actual)
    _check_interval_rows(pred.shape[0])
    point, num_valid = _lds_cols(pred, actual)
    samples = _lds_replicates(key, (pred,), actual, num_resamples, batch_size)[:, 0]
    return _lds_interval_from(point, num_valid, samples, float(level))


def paired_lds_interval(
    key: jax.Array,
    pred_a: Any,
    pred_b: Any,
    actual: Any,
    *,
    num_resamples: int = 1000,
    level: float = 0.95,
    batch_size: int | None = None,
) -> PairedLDSInterval:
    """Bootstrap interval of ``LDS(pred_a) - LDS(pred_b)``, both on the same resampled masks.

    Pairing matters: the two methods are scored on the same held-out masks, so most of the
    sampling noise of the masks cancels in the difference, and the paired interval is much
    narrower than what two separate intervals suggest. A claim "a beats b" needs ``low > 0``.
    Each method's own interval (same resamples) comes along in ``a`` and ``b``; with the same
    key, ``a`` equals ``lds_interval(key, pred_a, actual)``.

    Args:
      key: typed PRNG key (``jax.random.key(seed)``).
      pred_a: ``[m]`` or ``[m, T]`` predictions of method a on held-out masks.
      pred_b: same shape, predictions of method b on the same masks.
      actual: same shape, measured metric.
      num_resamples: ``B >= 2``, number of bootstrap replicates (static).
      level: coverage of the interval in (0, 1) (static).
      batch_size: replicates per step (static); default keeps about 4M gathered entries per
        step.

    Returns:
      :class:`PairedLDSInterval` ``(mean, low, high, std, samples, a, b, num_resamples_valid)``.

    Example:
      >>> import jax, jax.numpy as jnp, kernattr as ka
      >>> actual = jax.random.normal(jax.random.key(1), (60, 2))
      >>> good = actual + 0.3 * jax.random.normal(jax.random.key(2), (60, 2))
      >>> bad = actual + 3.0 * jax.random.normal(jax.random.key(3), (60, 2))
      >>> d = ka.paired_lds_interval(jax.random.key(0), good, bad, actual, num_resamples=200)
      >>> bool(d.low > 0), bool(d.a.mean > d.b.mean)
      (True, True)
    """
    check_key(key)
    _check_interval_config(num_resamples, level, batch_size)
    pred_a, actual = _check_pair(pred_a, actual, "pred_a", "actual")
    pred_b, actual = _check_pair(pred_b, actual, "pred_b", "actual")
    dtype = jnp.promote_types(pred_a.dtype, pred_b.dtype)
    pred_a, pred_b, actual = (_as_2d(x.astype(dtype)) for x in (pred_a, pred_b, actual))
    _check_interval_rows(actual.shape[0])
    point_a, valid_a = _lds_cols(pred_a, actual)
    point_b, valid_b = _lds_cols(pred_b, actual)
    reps = _lds_replicates(key, (pred_a, pred_b), actual, num_resamples, batch_size)
    level = float(level)
    ia = _lds_interval_from(point_a, valid_a, reps[:, 0], level)
    ib = _lds_interval_from(point_b, valid_b, reps[:, 1], level)
    diff = reps[:, 0] - reps[:, 1]
    low, high, std, count = _valid_quantiles(diff, level)
    return PairedLDSInterval(mean=point_a - point_b, low=low, high=high, std=std, samples=diff,
                             a=ia, b=ib, num_resamples_valid=count)


def bootstrap_interval(
    key: jax.Array,
    values: Any,
    *,
    num_resamples: int = 1000,
    level: float = 0.95,
) -> BootstrapInterval:
    """Percentile bootstrap interval of a mean over rows, column by column.

    For per-mask (or per-example) quantities whose summary is a mean over rows: relative
    errors of the estimator, selection losses, per-mask gains. Rows are resampled with
    :func:`bootstrap_indices` (the same resamples as :func:`lds_interval` for the same key and
    ``m``). For a paired comparison of two methods on the same rows pass the per-row
    difference ``values_a - values_b``.

    Args:
      key: typed PRNG key (``jax.random.key(seed)``).
      values: ``[m]`` or ``[m, T]`` finite values, one row per mask (columns summarised apart).
      num_resamples: ``B >= 2``, number of bootstrap replicates (static).
      level: coverage of the interval in (0, 1) (static).

    Returns:
      :class:`BootstrapInterval` ``(mean, low, high, std, samples)``; scalar fields for ``[m]``
      input, ``[T]`` for ``[m, T]``.

    Example:
      >>> import jax, jax.numpy as jnp, kernattr as ka
      >>> err = 1.0 + 0.1 * jax.random.normal(jax.random.key(1), (100,))
      >>> ci = ka.bootstrap_interval(jax.random.key(0), err, num_resamples=500)
      >>> bool(ci.low < 1.0 < ci.high), ci.samples.shape
      (True, (500,))
    """
    check_key(key)
    _check_interval_config(num_resamples, level, None)
    values = as_float_array(values, "values")
    check_rank(values, (1, 2), "values", "[m] or [m, T]")
    if values.shape[0] < 1 or (values.ndim == 2 and values.shape[1] == 0):
        raise ValueError(f"`values` is empty (shape {tuple(values.shape)}).")
    values = _check_finite(values, "values")
    m = values.shape[0]
    idx = bootstrap_indices(key, m, num_resamples)
    # The mean of a resample is a weighted mean: counts [B, m] @ values, no gather of B·m rows.
    counts = jnp.zeros((num_resamples, m), values.dtype).at[
        jnp.arange(num_resamples)[:, None], idx].add(1.0)
    samples = counts @ values / m
    low, high, std = _quantiles(samples, float(level))
    return BootstrapInterval(mean=jnp.mean(values, axis=0), low=low, high=high, std=std,
                             samples=samples)
