"""Per-example losses and target metrics shared by the estimator and real fine-tuning.

The ``example_*`` functions are written for ONE example and vmapped by callers (the maths
stays readable and ``vmap`` batches it). ``out`` is the
model output of that example: a scalar for ``"squared"``/``"logistic"`` (a logit), ``[C]``
logits for ``"softmax"``. ``label`` is a float target (squared), 0/1 (logistic) or an integer
class id stored in any dtype (softmax).

The batched :func:`loss_values`, :func:`loss_grad_curvature` and :func:`curvature_apply` are
each loss's value, output gradient and output-Hessian product on outputs ``[n, C, ...]``
(trailing mask axes allowed), used by the estimator's solvers and the baselines: adding a loss
means editing this file.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from .._checks import task_counts

LossName = Literal["squared", "logistic", "softmax"]
MetricName = Literal["loss", "margin", "output"]
LOSSES = ("squared", "logistic", "softmax")
METRICS = ("loss", "margin", "output")


def check_loss_metric(loss: str, metric: str | None = None) -> None:
    if loss not in LOSSES:
        raise ValueError(f"`loss` must be one of {LOSSES}, got {loss!r}.")
    if metric is not None and metric not in METRICS:
        raise ValueError(f"`metric` must be one of {METRICS}, got {metric!r}.")


def example_loss(out: jax.Array, label: jax.Array, loss: str) -> jax.Array:
    """Loss of one example: 0.5*(out-y)² | log(1+e^{-z·out}) with z=2y-1 | -log softmax(out)[y]."""
    if loss == "squared":
        return 0.5 * jnp.sum((out - label) ** 2)
    if loss == "logistic":
        z = 2.0 * label - 1.0
        return jnp.sum(jax.nn.softplus(-z * out))
    if loss == "softmax":
        y = label.astype(jnp.int32)
        return -jax.nn.log_softmax(out)[y]
    raise ValueError(f"`loss` must be one of {LOSSES}, got {loss!r}.")


def example_margin(out: jax.Array, label: jax.Array, loss: str) -> jax.Array:
    """Margin of one example: -|out-y| | z·out | logit[y] - max_{c≠y} logit[c]."""
    if loss == "squared":
        return -jnp.sum(jnp.abs(out - label))
    if loss == "logistic":
        z = 2.0 * label - 1.0
        return jnp.sum(z * out)
    if loss == "softmax":
        y = label.astype(jnp.int32)
        correct = out[y]
        others = jnp.where(jnp.arange(out.shape[-1]) == y, -jnp.inf, out)
        return correct - jnp.max(others)
    raise ValueError(f"`loss` must be one of {LOSSES}, got {loss!r}.")


def example_output(out: jax.Array, label: jax.Array, loss: str) -> jax.Array:
    """Raw output: the scalar output, or the logit of the labelled class for softmax."""
    if loss == "softmax":
        return out[label.astype(jnp.int32)]
    return jnp.sum(out)


def example_metric(out: jax.Array, label: jax.Array, loss: str, metric: str) -> jax.Array:
    """Target metric of one example (``metric`` in ``"loss"``, ``"margin"``, ``"output"``)."""
    if metric == "loss":
        return example_loss(out, label, loss)
    if metric == "margin":
        return example_margin(out, label, loss)
    if metric == "output":
        return example_output(out, label, loss)
    raise ValueError(f"`metric` must be one of {METRICS}, got {metric!r}.")


def per_task_weights(coef: jax.Array, counts: jax.Array, task_ids: jax.Array) -> jax.Array:
    """Per-example weights ``[m, n]`` from per-task coefficients ``coef [m, K]``.

    ``w[j, i] = coef[j, t_i] / n_{t_i}``: task ``k`` has total weight ``coef[j, k]``, spread evenly
    over its ``n_k = counts[k]`` examples (an empty task counts as one example, so its weight is 0
    rather than NaN). The one home of this formula: fine-tuning, the estimator and the baselines
    all weight examples through it.
    """
    counts = jnp.maximum(counts, 1).astype(coef.dtype)
    return (coef / counts[None, :])[:, task_ids]


def task_weights(masks: jax.Array, task_ids: jax.Array, num_tasks: int) -> jax.Array:
    """Per-example weights ``[m, n]`` of the training objective of each mask: every selected
    task's MEAN loss counts equally.

    ``w[j, i] = s_j[t_i] / (n_{t_i} · Σ_k s_j[k])``; an all-zero mask gives all-zero weights
    (no training: the model stays at ``W0``). Rows sum to 1 otherwise. These are the weights
    under the estimator (:func:`kernattr.estimate_subset_labels`) and real fine-tuning
    (:mod:`kernattr.groundtruth`), so code that trains its own models on masks uses them to
    train on the same objective.

    Args:
      masks: ``[m, K]`` 0/1 masks.
      task_ids: ``[n]`` integer task of every example, in ``0..K-1``.
      num_tasks: ``K`` (static int).

    Returns:
      ``[m, n]`` weights, in the masks' float dtype.

    Raises:
      ValueError / TypeError: masks not ``[m, K]`` with ``K = num_tasks``, or ``task_ids`` not
      an integer vector.

    >>> import jax.numpy as jnp, kernattr as ka
    >>> ka.task_weights(jnp.array([[1.0, 0.0], [1.0, 1.0]]), jnp.array([0, 0, 1]), 2).tolist()
    [[0.5, 0.5, 0.0], [0.25, 0.25, 0.5]]
    """
    masks, task_ids = jnp.asarray(masks), jnp.asarray(task_ids)
    if masks.ndim != 2 or masks.shape[1] != num_tasks:
        raise ValueError(f"`masks` must be [m, K] with K = num_tasks = {num_tasks}, "
                         f"got shape {tuple(masks.shape)}.")
    if task_ids.ndim != 1 or not jnp.issubdtype(task_ids.dtype, jnp.integer):
        raise TypeError(f"`task_ids` must be an integer vector [n], got {task_ids.dtype}"
                        f"{tuple(task_ids.shape)}.")
    total = jnp.sum(masks, axis=1, keepdims=True)  # [m, 1]
    per_example = per_task_weights(masks, task_counts(task_ids, num_tasks), task_ids)
    return per_example / jnp.maximum(total, 1.0)


def _expand(x: jax.Array, ndim: int) -> jax.Array:
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def loss_values(z: jax.Array, y: jax.Array, loss: str) -> jax.Array:
    """Per-example loss ``[n, ...]`` of outputs ``z [n, C, ...]`` and labels ``y [n]``
    (the batched :func:`example_loss`)."""
    if loss == "squared":
        return 0.5 * jnp.sum((z - _expand(y, z.ndim)) ** 2, axis=1)
    if loss == "logistic":
        sign = _expand(2.0 * y - 1.0, z.ndim)
        return jnp.sum(jax.nn.softplus(-sign * z), axis=1)
    onehot = _expand(jax.nn.one_hot(y.astype(jnp.int32), z.shape[1], dtype=z.dtype), z.ndim)
    return jax.nn.logsumexp(z, axis=1) - jnp.sum(onehot * z, axis=1)


def loss_grad_curvature(z: jax.Array, y: jax.Array, loss: str) -> tuple[jax.Array, jax.Array]:
    """Output-space gradient ``[n, C, ...]`` of the loss and its curvature state (what
    :func:`curvature_apply` needs: ones, ``p (1 - p)`` or the softmax ``p``)."""
    if loss == "squared":
        return z - _expand(y, z.ndim), jnp.ones_like(z)
    if loss == "logistic":
        p = jax.nn.sigmoid(z)
        return p - _expand(y, z.ndim), p * (1.0 - p)
    p = jax.nn.softmax(z, axis=1)
    onehot = _expand(jax.nn.one_hot(y.astype(jnp.int32), z.shape[1], dtype=z.dtype), z.ndim)
    return p - onehot, p


def curvature_apply(state: jax.Array, u: jax.Array, loss: str) -> jax.Array:
    """Per-example output Hessian times ``u [n, C, ...]`` (more trailing axes allowed), from the
    ``state`` of :func:`loss_grad_curvature`; softmax: ``H = diag(p) - p pᵀ``."""
    state = _expand(state, u.ndim)
    if loss == "softmax":
        return state * u - state * jnp.sum(state * u, axis=1, keepdims=True)
    return state * u
