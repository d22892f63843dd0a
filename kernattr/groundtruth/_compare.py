"""Fine-tune for real on the estimator's masks and measure it (:func:`kernattr.estimator_error`,
the optax-free metric, is re-exported here)."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from .._metrics import EstimatorError, estimator_error

__all__ = ["Comparison", "EstimatorError", "compare_estimator_to_finetuning", "estimator_error"]


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
