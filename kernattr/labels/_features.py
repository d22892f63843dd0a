"""The per-example first-order features that the estimator consumes."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax


class GradientFeatures(NamedTuple):
    """Projected first-order features of a set of examples (a pytree).

    ``train`` and ``target`` arguments of :func:`kernattr.estimate_subset_labels` are both
    ``GradientFeatures``; the target set has ``task_ids=None``.

    Attributes:
      grads: ``[n, d]`` (scalar output) or ``[n, C, d]`` (``C`` outputs, e.g. logits) projected
        output gradients ``g_i = Pᵀ ∇_W f(x_i; W0)``.
      outputs: ``[n]`` or ``[n, C]`` base outputs ``f(x_i; W0)`` (the offset of the linear model).
      labels: ``[n]`` regression targets (squared loss), 0/1 (logistic) or integer class ids
        (softmax).
      task_ids: ``[n]`` integer task of each example in ``0..K-1`` (training set), or ``None``.
    """

    grads: jax.Array
    outputs: jax.Array
    labels: jax.Array
    task_ids: Optional[jax.Array] = None
