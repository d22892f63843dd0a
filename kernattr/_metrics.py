"""Evaluation metrics, vectorised over targets: Spearman / Pearson per column, LDS, errors.

Columns are targets: ``pred`` and ``actual`` are ``[m]`` (one target) or ``[m, T]`` (``m`` masks,
``T`` targets), and every column statistic is computed for all columns at once on device (no
Python loop over ``T``). A column statistic returns a scalar for ``[m]`` input and ``[T]`` for
``[m, T]`` input.

Zero-variance columns (a constant prediction or a constant ground truth) have no defined
correlation: :func:`spearman` / :func:`pearson` return NaN for them, and :func:`lds` averages over
the remaining targets only (``LDSResult.num_valid`` says how many; the mean is NaN when none is
valid). NaN/inf *inputs* are rejected (``ValueError``; under ``jit`` raised when the compiled
function runs), never silently propagated.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ._checks import as_float_array, check_rank, error_if

__all__ = [
    "LDSResult",
    "lds",
    "normalized_error",
    "pearson",
    "rank_data",
    "relative_error",
    "spearman",
]


def _check_finite(x: jax.Array, name: str) -> None:
    error_if(
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
    _check_finite(a, name_a)
    _check_finite(b, name_b)
    return a, b


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


def _rank_rows(x: jax.Array) -> jax.Array:
    """Average (1-based) ranks along the last axis of ``[R, m]``; ties share their mean rank."""
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
    avg = (start + end).astype(jnp.promote_types(x.dtype, jnp.float32)) / 2 + 1
    rows = jnp.arange(x.shape[0])[:, None]
    return jnp.zeros_like(avg).at[rows, order].set(avg, unique_indices=True)


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
    error_if(x, jnp.isnan(x), "`x` contains {count} NaN values; ranks are undefined.")
    return _ranks(x)


def _pearson_cols(a: jax.Array, b: jax.Array) -> jax.Array:
    a = a - jnp.mean(a, axis=0, keepdims=True)
    b = b - jnp.mean(b, axis=0, keepdims=True)
    saa = jnp.sum(a * a, axis=0)
    sbb = jnp.sum(b * b, axis=0)
    sab = jnp.sum(a * b, axis=0)
    ok = (saa > 0) & (sbb > 0)
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
    return jnp.where(var > 0, mse / jnp.where(var > 0, var, 1.0), jnp.nan)


def relative_error(pred: Any, actual: Any) -> jax.Array:
    """Element-wise relative error ``|pred - actual| / |actual|``.

    Used to compare the gradient estimator with real fine-tuning on the same masks; average it
    yourself (e.g. ``jnp.mean``) over the axes you need.

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
