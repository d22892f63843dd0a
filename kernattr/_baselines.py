"""Task-level attribution baselines in projected gradient space: influence, TRAK, TracIn.

All three read the same :class:`kernattr.GradientFeatures` as the estimator (train with
``task_ids``, target without) and return ``[K, T]`` scores with the sign convention of
:func:`kernattr.loo_scores`:

    ``score[k, t] ≈ F_t(all tasks) − F_t(all tasks but k)``

so for ``metric="loss"`` a task that helps target ``t`` gets a NEGATIVE score, and for
``"margin"``/``"output"`` a positive one.

Notation (projected space, ``θ = 0`` is the checkpoint ``W0``): the linearized output of example
``i`` is ``f0_i + G_i θ`` (``G_i`` is ``[C, d]``); ``g_i = G_iᵀ ∇_f ℓ(f0_i, y_i)`` is the loss
gradient; ``φ_t = G_tᵀ ∇_f metric(f0_t, y_t)`` the target-metric gradient; ``h_i`` the ``[C, C]``
output Hessian of the loss (Gauss-Newton curvature); ``n_k`` the size of task ``k``;
``ḡ_k = (1/n_k) Σ_{i∈k} g_i`` the mean gradient of task ``k``; ``ḡ = (1/K) Σ_k ḡ_k`` the
gradient of the all-tasks objective with the paper's weighting ``w_i = 1/(K n_{t_i})``
(:func:`kernattr.task_weights` of the all-ones mask).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import _checks
from .labels._estimation import check_feature_pair
from .labels._features import GradientFeatures
from .labels._losses import (
    check_loss_metric,
    curvature_apply,
    example_loss,
    example_metric,
    loss_grad_curvature,
    per_task_weights,
)
from ._linalg import eigh

__all__ = ["influence_scores", "trak_scores", "tracin_scores"]

WEIGHTINGS = ("sum", "task")


# ----------------------------------------------------------------------------- shared pieces


def _num_tasks(task_ids: jax.Array, num_tasks: Optional[int]) -> int:
    if num_tasks is None:
        if not _checks.is_concrete(task_ids):
            raise ValueError(
                "`num_tasks` is required under jit/vmap (the task ids are traced); pass num_tasks=K."
            )
        return int(jnp.max(task_ids)) + 1
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, (int, np.integer)) or num_tasks < 1:
        raise ValueError(f"`num_tasks` must be a positive int, got {num_tasks!r}.")
    return int(num_tasks)


def _prepare(train: Any, target: Any, loss: str, metric: str, num_tasks: Optional[int]):
    """Validated features; returns (G [n,C,d], f0 [n,C], y [n], tid [n], counts [K], Gt, ft, yt, K)."""
    check_loss_metric(loss, metric)
    (G, f0, y, tid), (Gt, ft, yt) = check_feature_pair(train, target, loss)
    K = _num_tasks(tid, num_tasks)
    counts = _checks.check_task_ids(tid, num_tasks=K, nonempty=True, name="train.task_ids")[1]
    counts = counts.astype(G.dtype)
    return G, f0, y, tid, counts, Gt, ft, yt, K


def _out_grads(f: jax.Array, y: jax.Array, fn) -> jax.Array:
    """``∇_f fn(f_i, y_i)`` for every example: ``[n, C]``."""
    return jax.vmap(jax.grad(fn))(f, y)


def loss_grads(G, f0, y, loss):
    """``∇_θ loss(f_i, y_i) = r_iᵀ G_i`` for every example: ``[n, d]``."""
    r = _out_grads(f0, y, lambda o, t: example_loss(o, t, loss))  # [n, C]
    return jnp.einsum("nc,ncd->nd", r, G)


def _metric_grads(Gt, ft, yt, loss, metric):
    r = _out_grads(ft, yt, lambda o, t: example_metric(o, t, loss, metric))  # [T, C]
    return jnp.einsum("tc,tcd->td", r, Gt)


def _curvature_times(G, f0, y, loss):
    """``h_i G_i`` for every example (``[n, C, d]``): the loss's output Hessian times ``G_i``."""
    _, state = loss_grad_curvature(f0, y, loss)
    return curvature_apply(state, G, loss)


def _task_sum(values: jax.Array, tid: jax.Array, K: int) -> jax.Array:
    """``[K, d]`` sums of ``values [n, d]`` per task."""
    return jax.ops.segment_sum(values, tid, num_segments=K)


def _check_damping(damping: Any, dtype) -> jax.Array:
    if isinstance(damping, (str, bytes)) or damping is None:
        raise TypeError(f"`damping` must be a float >= 0, got {damping!r}.")
    damping = jnp.asarray(damping)
    if damping.ndim != 0:
        raise ValueError(f"`damping` must be a scalar, got shape {tuple(damping.shape)}.")
    _checks.check_hyperparameter(damping, "damping", allow_zero=True)
    return damping.astype(dtype)


def _psd_solve(M: jax.Array, rhs: jax.Array, damping: jax.Array) -> jax.Array:
    """``(M + damping I)⁺ rhs`` for symmetric PSD ``M`` via eigh; tiny eigenvalues are dropped."""
    evals, evecs = eigh(M)
    shifted = evals + damping
    cutoff = jnp.finfo(M.dtype).eps * M.shape[0] * 10 * jnp.max(jnp.abs(shifted))
    inv = jnp.where(shifted > cutoff, 1.0 / jnp.where(shifted > cutoff, shifted, 1.0), 0.0)
    return evecs @ (inv[:, None] * (evecs.T @ rhs))


def _check_weighting(weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"`weighting` must be one of {WEIGHTINGS}, got {weighting!r}.")


def _example_weights(tid, counts, K, weighting, dtype):
    if weighting == "sum":
        return jnp.ones(tid.shape, dtype)
    return per_task_weights(jnp.full((1, K), 1.0 / K, dtype), counts, tid)[0]


# ----------------------------------------------------------------------------- influence


def influence_scores(
    train: GradientFeatures,
    target: GradientFeatures,
    *,
    loss: str,
    metric: str = "loss",
    damping: float | jax.Array,
    num_tasks: Optional[int] = None,
) -> jax.Array:
    """Task-level influence functions with a damped Gauss-Newton Hessian in projected space.

    The all-tasks objective around the checkpoint is ``Σ_i w_i ℓ(f0_i + G_i θ, y_i)`` with
    ``w_i = 1/(K n_{t_i})`` and Hessian (Gauss-Newton, at ``θ = 0``)

    ``H = Σ_i w_i G_iᵀ h_i G_i + damping · I``.

    Removing task ``k`` changes the weights to ``w'_i = 1/((K−1) n_{t_i})`` for ``t_i ≠ k`` and 0
    for task ``k`` — the remaining tasks' means are re-weighted, as in the estimator. With the
    Hessian held at ``H`` (one Newton step from ``θ = 0`` for both subsets), the parameter change
    is ``Δθ_k = −H⁻¹ Σ_i (w'_i − w_i) g_i = −H⁻¹ (ḡ − ḡ_k)/(K−1)``, and the first-order effect on
    the target metric gives

    ``score[k, t] = F_t(all) − F_t(all − k) ≈ φ_tᵀ H⁻¹ (ḡ − ḡ_k) / (K − 1)``

    (for ``K = 1``: ``−φ_tᵀ H⁻¹ ḡ_1``, the change from training on nothing). The ``ḡ`` term vanishes
    when ``W0`` is a stationary point of the all-tasks objective; it adds the same amount to every
    task's score for a target. With ``damping`` equal to the estimator's ``ridge`` this is the
    first-order expansion in the mask of :func:`kernattr.estimate_subset_labels` (``"fast"``).

    Args:
      train: training :class:`kernattr.GradientFeatures` (``grads [n, d]`` or ``[n, C, d]``,
        ``outputs``, ``labels``, ``task_ids [n]``).
      target: target features (``T`` examples, ``task_ids`` unused).
      loss: ``"squared"``, ``"logistic"`` or ``"softmax"``.
      metric: target metric ``"loss"``, ``"margin"`` or ``"output"``.
      damping: ``>= 0`` added to the Hessian's diagonal (absolute, in the units of the weighted
        objective, whose weights sum to 1). ``0`` uses a pseudo-inverse.
      num_tasks: ``K``; inferred from ``max(task_ids) + 1`` outside ``jit``, required under it.

    Returns:
      ``[K, T]`` scores.

    Example:
      >>> import jax.numpy as jnp, kernattr as ka
      >>> G = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
      >>> tr = ka.GradientFeatures(G, jnp.zeros(3), jnp.ones(3), jnp.array([0, 1, 1]))
      >>> tg = ka.GradientFeatures(G[:1], jnp.zeros(1), jnp.ones(1))
      >>> ka.influence_scores(tr, tg, loss="squared", damping=0.1).shape
      (2, 1)
    """
    G, f0, y, tid, counts, Gt, ft, yt, K = _prepare(train, target, loss, metric, num_tasks)
    damping = _check_damping(damping, G.dtype)
    w = _example_weights(tid, counts, K, "task", G.dtype)  # [n]
    hG = _curvature_times(G, f0, y, loss)
    H = jnp.einsum("ncd,nce->de", w[:, None, None] * G, hG)
    g = loss_grads(G, f0, y, loss)  # [n, d]
    gbar_k = _task_sum(g, tid, K) / counts[:, None]  # [K, d]
    gbar = jnp.mean(gbar_k, axis=0)
    if K == 1:
        delta = -gbar_k
    else:
        delta = (gbar[None, :] - gbar_k) / (K - 1)  # Σ_i Δw_i g_i per task, [K, d]
    phi = _metric_grads(Gt, ft, yt, loss, metric)  # [T, d]
    solved = _psd_solve(H, delta.T, damping)  # [d, K]
    return solved.T @ phi.T


# ----------------------------------------------------------------------------- TRAK


def trak_features(G, f0, y, loss):
    """TRAK's per-example output-function gradients ``φ_i`` and weights ``Q_i`` with
    ``Q_i φ_i = −g_i``: log-odds of the correct label and ``1 − p`` (logistic/softmax), the output
    and the residual ``y − f`` (squared)."""
    if loss == "squared":
        return G[:, 0, :], y - f0[:, 0]
    if loss == "logistic":
        z = 2.0 * y - 1.0
        margin = z * f0[:, 0]
        return z[:, None] * G[:, 0, :], jax.nn.sigmoid(-margin)
    p = jax.nn.softmax(f0, axis=1)
    onehot = jax.nn.one_hot(y.astype(jnp.int32), f0.shape[1], dtype=f0.dtype)
    py = jnp.sum(p * onehot, axis=1)
    q = 1.0 - py
    # ∇_f log(p_y / (1 − p_y)) = (e_y − p) / (1 − p_y)
    direction = (onehot - p) / jnp.where(q > 0, q, 1.0)[:, None]
    return jnp.einsum("nc,ncd->nd", direction, G), q


def trak_scores(
    train: GradientFeatures,
    target: GradientFeatures,
    *,
    loss: str,
    metric: str = "loss",
    damping: float | jax.Array = 0.0,
    weighting: Literal["sum", "task"] = "sum",
    num_tasks: Optional[int] = None,
) -> jax.Array:
    """TRAK-style task scores from one checkpoint's projected gradients.

    TRAK (Park et al., 2023) replaces the Hessian by the feature Gram matrix ``ΦᵀΦ`` of the
    output-function gradients ``φ_i`` — the gradient of the log-odds of the correct label
    (``z_i f_i`` for logistic, ``log(p_y/(1−p_y))`` for softmax; the output itself for squared
    loss) — and weights each training example by ``Q_i`` = ``1 − p_i`` (probability of the
    correct label; the residual ``y_i − f_i`` for squared loss), so that ``Q_i φ_i = −g_i``:

    ``score[k, t] = ψ_tᵀ (ΦᵀΦ + n · damping · I)⁺ Σ_{i∈k} ω_i Q_i φ_i``

    where ``ψ_t`` is the gradient of the requested target metric (so the score has the units and
    sign of :func:`kernattr.loo_scores`; TRAK itself uses the target's log-odds) and ``ω_i = 1``
    (``weighting="sum"``, TRAK's sum over the group's examples) or ``ω_i = 1/(K n_{t_i})``
    (``"task"``, the paper's task weighting). ``(·)⁺`` is a pseudo-inverse via ``eigh`` (eigenvalues
    below ``10 d eps · max`` are dropped). A single checkpoint, no ensembling.

    Args:
      train: training :class:`kernattr.GradientFeatures` with ``task_ids``.
      target: target features.
      loss: ``"squared"``, ``"logistic"`` or ``"softmax"``.
      metric: target metric ``"loss"``, ``"margin"`` or ``"output"``.
      damping: ``>= 0`` added to the diagonal of the MEAN Gram matrix ``ΦᵀΦ / n`` (so ``n ·
        damping`` is added to ``ΦᵀΦ``): on the same per-example scale as the ``damping`` of
        :func:`influence_scores` and the estimator's ``ridge``, whose objectives average losses.
      weighting: ``"sum"`` or ``"task"`` (see above).
      num_tasks: ``K``; inferred outside ``jit``, required under it.

    Returns:
      ``[K, T]`` scores.

    Example:
      >>> import jax.numpy as jnp, kernattr as ka
      >>> G = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
      >>> tr = ka.GradientFeatures(G, jnp.zeros(3), jnp.array([1.0, 0.0, 1.0]), jnp.array([0, 1, 1]))
      >>> tg = ka.GradientFeatures(G[:1], jnp.zeros(1), jnp.ones(1))
      >>> ka.trak_scores(tr, tg, loss="logistic").shape
      (2, 1)
    """
    _check_weighting(weighting)
    G, f0, y, tid, counts, Gt, ft, yt, K = _prepare(train, target, loss, metric, num_tasks)
    damping = _check_damping(damping, G.dtype)
    phi, q = trak_features(G, f0, y, loss)
    omega = _example_weights(tid, counts, K, weighting, G.dtype)
    per_task = _task_sum((omega * q)[:, None] * phi, tid, K)  # [K, d]
    psi = _metric_grads(Gt, ft, yt, loss, metric)  # [T, d]
    solved = _psd_solve(phi.T @ phi, per_task.T, G.shape[0] * damping)  # [d, K]
    return solved.T @ psi.T


# ----------------------------------------------------------------------------- TracIn


def tracin_scores(
    train: GradientFeatures,
    target: GradientFeatures,
    *,
    loss: str,
    metric: str = "loss",
    learning_rate: float | jax.Array = 1.0,
    weighting: Literal["sum", "task"] = "task",
    num_tasks: Optional[int] = None,
) -> jax.Array:
    """TracIn / gradient dot-product task scores at one checkpoint.

    One gradient step of size ``learning_rate`` on task ``k``'s share of the objective changes the
    target metric by ``−lr · ψ_tᵀ Σ_{i∈k} ω_i g_i`` to first order, so

    ``score[k, t] = −learning_rate · ψ_tᵀ Σ_{i∈k} ω_i g_i``

    with ``ψ_t`` the target-metric gradient, ``g_i`` the loss gradient (both projected) and
    ``ω_i = 1/(K n_{t_i})`` (``weighting="task"``, default: the task-weighted objective's gradient)
    or ``1`` (``"sum"``, classic TracIn). The learning rate only scales the scores (rank
    correlations do not depend on it). TracIn over several checkpoints is the sum of this function
    over their features, each with its learning rate (``vmap`` over stacked features and sum).

    Args:
      train: training :class:`kernattr.GradientFeatures` with ``task_ids``.
      target: target features.
      loss: ``"squared"``, ``"logistic"`` or ``"softmax"``.
      metric: target metric ``"loss"``, ``"margin"`` or ``"output"``.
      learning_rate: step size scaling the scores (scalar, may be traced).
      weighting: ``"task"`` or ``"sum"``.
      num_tasks: ``K``; inferred outside ``jit``, required under it.

    Returns:
      ``[K, T]`` scores.

    Example:
      >>> import jax.numpy as jnp, kernattr as ka
      >>> G = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
      >>> tr = ka.GradientFeatures(G, jnp.zeros(3), jnp.ones(3), jnp.array([0, 1, 1]))
      >>> tg = ka.GradientFeatures(G[:1], jnp.zeros(1), jnp.ones(1))
      >>> ka.tracin_scores(tr, tg, loss="squared").tolist()  # task 0 helps target 0 most
      [[-0.5], [-0.25]]
    """
    _check_weighting(weighting)
    G, f0, y, tid, counts, Gt, ft, yt, K = _prepare(train, target, loss, metric, num_tasks)
    if isinstance(learning_rate, (str, bytes)) or learning_rate is None:
        raise TypeError(f"`learning_rate` must be a float, got {learning_rate!r}.")
    lr = jnp.asarray(learning_rate)
    if lr.ndim != 0:
        raise ValueError(f"`learning_rate` must be a scalar, got shape {tuple(lr.shape)}.")
    lr = lr.astype(G.dtype)
    g = loss_grads(G, f0, y, loss)
    omega = _example_weights(tid, counts, K, weighting, G.dtype)
    per_task = _task_sum(omega[:, None] * g, tid, K)  # [K, d]
    psi = _metric_grads(Gt, ft, yt, loss, metric)
    return -lr * (per_task @ psi.T)
