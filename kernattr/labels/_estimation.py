"""Vectorised subset-label estimation: one small GLM fit per task subset, batched over masks.

For every mask ``s`` (a 0/1 row over the ``K`` tasks) the linearized model
``f(x_i; W0 + P θ) ≈ f0_i + G_i θ`` is trained on the selected tasks,

    θ_s = argmin_θ  Σ_i w_i(s) ℓ(f0_i + G_i θ, y_i) + (ridge / 2) ||θ||²,

with the paper's weighting ``w_i(s) = s[t_i] / (n_{t_i} Σ_k s_k)`` (each selected task's MEAN
loss counts equally, the weights sum to 1; :func:`kernattr.task_weights`). The label of
the mask is then the target metric of every target example at ``f0_t + G_t θ_s``.

Two solvers (``solver=``):

* ``"fast"`` (default): per-task sufficient statistics ``A_k = Σ_{i∈k} G_iᵀ H_i G_i / n_k`` and
  ``b_k = Σ_{i∈k} G_iᵀ ∇ℓ_i / n_k`` at ``θ = 0`` are computed once (``n C d²``); each mask then
  costs ``K d² + d³``: ``θ_s = -(Σ_k c_k A_k + ridge I)⁻¹ Σ_k c_k b_k`` with
  ``c_k = s_k / Σ s``, one Newton step from ``θ = 0`` (exact for the squared loss).
* ``"anchored"``: one exact Newton step per mask from the anchor ``θ̄`` described below, at
  the per-mask cost of ``"fast"`` (plus three passes of statistics over the data): far closer to
  ``"exact"`` than ``"fast"`` when the subsets' solutions lie near the all-tasks one (equal to
  ``"fast"`` for squared loss). Beyond the paper.
* ``"exact"``: the weighted GLM solved to convergence by a line-searched inexact Newton method,
  all masks of a chunk at once as matrix-matrix products. Two Newton steps on the all-tasks mask
  place an *anchor* ``θ̄`` (for that mask the per-task statistics are its exact Hessian); the
  per-task statistics at ``θ̄`` then give every mask its exact Hessian at ``θ̄`` for ``K d²``, so
  each mask starts at ``θ̄`` (or 0, whichever has the lower objective) with a Newton step that
  needs no pass over the data, and that Hessian's Cholesky factor preconditions the conjugate
  gradients (Hessian-vector products, ``2 n C d`` flops per mask) of later steps. Masks stop
  independently (their iterates are frozen), so a mask's result does not depend on which other
  masks share its chunk, beyond floating-point rounding.

The per-mask linear algebra lives in ``_solver_fast.py`` (packed per-task Hessians, Cholesky
factors: ``"fast"``/``"anchored"`` and the preconditioner) and ``_solver_newton.py``
(Newton-CG with line search: ``"exact"``); this module holds the statistics, chunking, sharding
and the public API.

On CPU, jaxlib's Cholesky goes through the BLAS that scipy ships (OpenBLAS); on a machine with
more busy threads than cores its threading thrashes, and ``threadpoolctl.threadpool_limits(1)``
(or ``OPENBLAS_NUM_THREADS=1``) makes the batched factorisations several times faster.

An all-zero mask trains on nothing: its weights are all zero, ``θ = 0`` and the labels are the
target metric at the base model ``W0`` (for any ``ridge``, including 0).
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from .. import _checks
from .._sharding import replicate_if_sharded
from ._features import GradientFeatures
from ._solver_fast import chol_solve, fast_system, pack
from ._solver_newton import (NewtonProblem, NewtonStart, newton_cg, objective, outputs_at,
                             weighted_grad)
from ._losses import (
    check_loss_metric,
    curvature_apply,
    example_metric,
    loss_grad_curvature,
    loss_values,
    per_task_weights,
)

__all__ = ["SubsetEstimates", "estimate_subset_labels", "estimate_subsets"]

SOLVERS = ("fast", "anchored", "exact")
# Elements of the largest per-chunk intermediate that the automatic chunk size aims for.
_CHUNK_BUDGET = 1 << 24
# Elements of one row block (rows x C x d) in the per-task Gram matrix products.
_STATS_BLOCK = 1 << 15
# Newton steps on the all-tasks mask that place the anchor of the "exact" solver.
_ANCHOR_STEPS = 2


class SubsetEstimates(NamedTuple):
    """Estimated subset labels and solver diagnostics (a pytree).

    Attributes:
      labels: ``[m, T]`` target metric of every target example for every mask.
      theta: ``[m, d]`` fitted parameter offset ``θ_s`` of every mask (projected space).
      converged: ``[m]`` bool. ``"fast"``: the Newton system was positive definite and the step
        finite. ``"exact"``: additionally ``θ`` is within ``tol`` (relative) of the optimum, by
        the estimates described under ``tol``.
      num_iterations: ``[m]`` int32 Newton iterations used (1 for ``"fast"``, 0 for an all-zero
        mask under ``"exact"``).
      grad_norm: ``[m]`` Euclidean norm of the gradient of the full weighted objective at
        ``theta`` (for ``"fast"`` it measures how far the one-step solution is from the optimum).
      num_hvps: ``[m]`` int32 Hessian-vector products (conjugate-gradient steps) used by
        ``"exact"`` (0 for ``"fast"``).
    """

    labels: jax.Array
    theta: jax.Array
    converged: jax.Array
    num_iterations: jax.Array
    grad_norm: jax.Array
    num_hvps: jax.Array


# ----------------------------------------------------------------------------- validation


def _check_features(
    feats: Any, name: str, loss: str, *, train: bool
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """Validated ``(grads [n, C, d], outputs [n, C], labels [n], task_ids [n] | None)``."""
    grads, outputs, labels = _feature_arrays(feats, name)
    grads, outputs = _feature_shapes(feats, grads, outputs, name, loss)
    n, c, _ = grads.shape
    _checks.check_rank(labels, 1, f"{name}.labels", "[n] (one label per example)")
    if labels.shape[0] != n:
        raise ValueError(
            f"`{name}.labels` has {labels.shape[0]} entries but `{name}.grads` has {n} examples."
        )
    bad = ~(jnp.all(jnp.isfinite(grads), axis=(1, 2)) & jnp.all(jnp.isfinite(outputs), axis=1))
    grads = _checks.error_if(
        grads,
        bad,
        f"`{name}` has {{count}} examples with non-finite grads or outputs (NaN/inf); "
        "drop them or fix the model before estimating.",
    )
    labels = _check_label_values(labels, name, loss, c)
    task_ids = _check_train_task_ids(feats.task_ids, name, n) if train else feats.task_ids
    return grads, outputs, labels, task_ids


def _feature_arrays(feats: Any, name: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(grads, outputs, labels)`` of a :class:`GradientFeatures` as arrays (replicated when
    sharded over an Explicit mesh axis), with float ``grads``/``outputs`` of one dtype."""
    if not isinstance(feats, GradientFeatures):
        raise TypeError(
            f"`{name}` must be a kernattr.GradientFeatures(grads, outputs, labels, task_ids), "
            f"got {type(feats).__name__}."
        )
    grads, outputs, labels = feats.grads, feats.outputs, feats.labels
    for field, arr in (("grads", grads), ("outputs", outputs)):
        if arr is None or isinstance(arr, (str, bytes)):
            raise TypeError(f"`{name}.{field}` must be an array, got {arr!r}.")
    grads, outputs, labels = (replicate_if_sharded(jnp.asarray(a)) for a in (grads, outputs, labels))
    for field, arr in (("grads", grads), ("outputs", outputs)):
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise TypeError(
                f"`{name}.{field}` must be a floating array, got dtype {arr.dtype}; cast it with "
                ".astype(jnp.float32)."
            )
    if grads.dtype != outputs.dtype:
        raise TypeError(
            f"`{name}.grads` ({grads.dtype}) and `{name}.outputs` ({outputs.dtype}) must share a "
            "dtype; cast one of them."
        )
    if jnp.issubdtype(labels.dtype, jnp.complexfloating):
        raise TypeError(f"`{name}.labels` must be real, got dtype {labels.dtype}.")
    return grads, outputs, labels


def _feature_shapes(feats, grads, outputs, name: str, loss: str) -> tuple[jax.Array, jax.Array]:
    """``(grads [n, C, d], outputs [n, C])``: scalar-output losses get ``C = 1``."""
    scalar = loss in ("squared", "logistic")
    if scalar:
        _checks.check_rank(grads, 2, f"{name}.grads", f"[n, d] for loss={loss!r} (scalar outputs)")
        _checks.check_rank(outputs, 1, f"{name}.outputs", f"[n] for loss={loss!r}")
        grads, outputs = grads[:, None, :], outputs[:, None]
    else:
        _checks.check_rank(grads, 3, f"{name}.grads", "[n, C, d] for loss='softmax' (C logits)")
        _checks.check_rank(outputs, 2, f"{name}.outputs", "[n, C] for loss='softmax'")
    n, c, _ = grads.shape
    if n == 0:
        raise ValueError(f"`{name}` has no examples (`{name}.grads` has 0 rows).")
    if outputs.shape != (n, c):
        raise ValueError(
            f"`{name}.outputs` has shape {tuple(feats.outputs.shape)} but `{name}.grads` has shape "
            f"{tuple(feats.grads.shape)}; outputs must be [n]{'' if scalar else ', C'} matching grads."
        )
    return grads, outputs


def _check_label_values(labels: jax.Array, name: str, loss: str, c: int) -> jax.Array:
    """Labels a loss can take (eagerly and under ``jit``): 0/1 for logistic, class ids in
    ``0..C-1`` for softmax, finite floats for squared."""
    if loss == "logistic":
        return _checks.error_if(
            labels,
            (labels != 0) & (labels != 1),
            f"`{name}.labels` must be 0/1 for loss='logistic' ({{count}} entries are not).",
        )
    if loss == "softmax":
        if jnp.issubdtype(labels.dtype, jnp.floating):
            notint = (labels != jnp.round(labels)) | ~jnp.isfinite(labels)
        else:
            notint = jnp.zeros(labels.shape, bool)
        return _checks.error_if(
            labels,
            notint | (labels < 0) | (labels >= c),
            f"`{name}.labels` must be class ids in 0..{c - 1} for loss='softmax' "
            f"({{count}} entries are not).",
        )
    labels = _checks.as_float_array(labels, f"{name}.labels")
    return _checks.error_if(
        labels,
        ~jnp.isfinite(labels),
        f"`{name}.labels` contains {{count}} non-finite values (NaN/inf).",
    )


def _check_train_task_ids(task_ids: Any, name: str, n: int) -> jax.Array:
    """Integer ``[n]`` task ids of the training features (replicated when sharded)."""
    if task_ids is None:
        raise ValueError(
            f"`{name}.task_ids` is None: the training features need the task of every example."
        )
    task_ids = replicate_if_sharded(jnp.asarray(task_ids))
    if not jnp.issubdtype(task_ids.dtype, jnp.integer):
        raise TypeError(
            f"`{name}.task_ids` must be an integer array, got dtype {task_ids.dtype}."
        )
    _checks.check_rank(task_ids, 1, f"{name}.task_ids", "[n] (task of each example)")
    if task_ids.shape[0] != n:
        raise ValueError(
            f"`{name}.task_ids` has {task_ids.shape[0]} entries but `{name}.grads` has {n} "
            "examples."
        )
    return task_ids


def check_feature_pair(train: Any, target: Any, loss: str):
    """Validated ``(g, f0, y, t)`` of ``train`` and ``(gt, ft, yt)`` of ``target``, which must come
    from the same projector (same per-example shape ``[C, d]``) and share a dtype."""
    g, f0, y, t = _check_features(train, "train", loss, train=True)
    gt, ft, yt, _ = _check_features(target, "target", loss, train=False)
    if gt.shape[1:] != g.shape[1:]:
        raise ValueError(
            f"`target.grads` has shape {tuple(target.grads.shape)} but `train.grads` has shape "
            f"{tuple(train.grads.shape)}; they must share the projected dimension d"
            f"{'' if loss != 'softmax' else ' and the number of outputs C'} (same projector)."
        )
    if gt.dtype != g.dtype:
        raise TypeError(
            f"`target.grads` ({gt.dtype}) and `train.grads` ({g.dtype}) must share a dtype."
        )
    return (g, f0, y, t), (gt, ft, yt)


# ----------------------------------------------------------------------------- statistics


def _task_statistics(
    grads: jax.Array,
    outputs: jax.Array,
    labels: jax.Array,
    task_ids: jax.Array,
    counts: jax.Array,
    *,
    loss: str,
    num_tasks: int,
) -> tuple[jax.Array, jax.Array]:
    """Per-task mean Hessian ``A [K, d, d]`` and gradient ``b [K, d]`` at outputs ``[n, C]``.

    Examples are sorted by task; each task's Gram matrix ``Σ_{i∈k} G_iᵀ (H_i G_i) / n_k`` is
    accumulated over blocks of consecutive rows as ``(B C x d)ᵀ (B C x d)`` matrix products:
    ``n C d²`` flops in all, no ``[n, d, d]`` intermediate.
    """
    n, c, d = grads.shape
    r, state = loss_grad_curvature(outputs, labels, loss)  # [n, C]
    inv = per_task_weights(jnp.ones((1, num_tasks), grads.dtype), counts, task_ids)[0]  # [n]
    b = jax.ops.segment_sum(
        jnp.einsum("nc,ncd->nd", r * inv[:, None], grads), task_ids, num_segments=num_tasks
    )
    hg = curvature_apply(state, grads, loss) * inv[:, None, None]  # [n, C, d]
    rows = max(8, min(256, _STATS_BLOCK // max(1, c * d)))
    order = jnp.argsort(task_ids, stable=True)
    pad = ((0, rows), (0, 0), (0, 0))
    xs = jnp.pad(grads[order], pad)
    ys = jnp.pad(hg[order], pad)
    starts = jnp.cumsum(counts) - counts

    def per_task(k):
        start, count = starts[k], counts[k]

        def block(j, acc):
            offset = (start + j * rows).astype(jnp.int32)
            zero = jnp.zeros((), jnp.int32)
            x = jax.lax.dynamic_slice(xs, (offset, zero, zero), (rows, c, d)).reshape(rows * c, d)
            y = jax.lax.dynamic_slice(ys, (offset, zero, zero), (rows, c, d))
            valid = (j * rows + jnp.arange(rows)) < count
            y = jnp.where(valid[:, None, None], y, 0.0).reshape(rows * c, d)
            return acc + x.T @ y

        return jax.lax.fori_loop(0, (count + rows - 1) // rows, block, jnp.zeros((d, d), grads.dtype))

    a = jax.lax.map(per_task, jnp.arange(num_tasks))
    return 0.5 * (a + jnp.swapaxes(a, 1, 2)), b


# ----------------------------------------------------------------------------- per chunk


class _Data(NamedTuple):
    """Everything a chunk of masks needs (replicated across mask shards)."""

    grads: jax.Array  # [n, C, d]
    outputs: jax.Array  # [n, C]
    labels: jax.Array  # [n]
    task_ids: jax.Array  # [n]
    counts: jax.Array  # [K]
    a0: jax.Array  # [K, d (d + 1) / 2] per-task mean Hessian at θ = 0 (packed lower triangle)
    b0: jax.Array  # [K, d] per-task mean gradient at θ = 0
    # "exact" only (zeros / a0 otherwise): the anchor θ̄ (all-tasks solution) and statistics there.
    a_pre: jax.Array  # [K, d (d + 1) / 2] per-task mean Hessian at θ̄: the preconditioner
    theta_bar: jax.Array  # [d]
    z_bar: jax.Array  # [n, C] outputs at θ̄
    b_bar: jax.Array  # [K, d] per-task mean gradient at θ̄
    loss_bar: jax.Array  # [n] per-example loss at θ̄
    loss_zero: jax.Array  # [n] per-example loss at θ = 0


def _solve_chunk(data: _Data, masks, ridge, *, loss, solver, max_iter, tol, diagnostics):
    """Solve every mask of a chunk ``[mc, K]``; returns ``theta [d, mc]`` and diagnostics."""
    dtype = data.grads.dtype
    mc = masks.shape[0]
    total = jnp.sum(masks, axis=1)
    empty = total == 0
    coef = masks / jnp.maximum(total, 1.0)[:, None]  # [mc, K]
    if solver in ("fast", "anchored"):
        if solver == "fast":  # one Newton step from θ = 0
            chol, g0, singular = fast_system(data.a0, data.b0, coef, ridge, empty)
            theta = -chol_solve(chol, g0.T)
        else:  # one exact Newton step from the anchor θ̄ (its statistics are exact there)
            chol, g_bar, singular = fast_system(data.a_pre, data.b_bar, coef, ridge, empty)
            theta_bar = data.theta_bar[:, None]
            theta = theta_bar - chol_solve(chol, g_bar.T + ridge * theta_bar)
            theta = jnp.where(empty[None, :], 0.0, theta)
        ok = ~singular & jnp.all(jnp.isfinite(theta), axis=0)
        iters, hvps = jnp.ones((mc,), jnp.int32), jnp.zeros((mc,), jnp.int32)
        if not diagnostics:
            return theta, ok, iters, jnp.zeros((mc,), dtype), hvps
        weights = per_task_weights(coef, data.counts, data.task_ids).T
        z = outputs_at(data.grads, data.outputs, theta)
        r, _ = loss_grad_curvature(z, data.labels, loss)
        grad = weighted_grad(data.grads, weights, r) + ridge * theta
        return theta, ok, iters, jnp.linalg.norm(grad, axis=0), hvps
    chol, _, singular = fast_system(data.a_pre, data.b0, coef, ridge, empty)
    weights = per_task_weights(coef, data.counts, data.task_ids).T
    g0 = (coef @ data.b0).T  # [d, mc] gradient at θ = 0
    # Start from the anchor θ̄ when it beats θ = 0 (the same for every mask: no matmul needed).
    sq = jnp.sum(data.theta_bar**2)
    f_bar = data.loss_bar @ weights + 0.5 * ridge * sq
    f_zero = data.loss_zero @ weights
    use = (f_bar < f_zero) & ~empty & jnp.all(jnp.isfinite(data.theta_bar))
    theta = jnp.where(use[None, :], data.theta_bar[:, None], 0.0)
    z = jnp.where(use[None, None, :], data.z_bar[:, :, None], data.outputs[:, :, None])
    grad = jnp.where(use[None, :], (coef @ data.b_bar).T + ridge * theta, g0)
    problem = NewtonProblem(data.grads, data.labels, weights, ridge, chol, singular)
    start = NewtonStart(theta, z, grad, jnp.linalg.norm(g0, axis=0))
    return newton_cg(problem, start, loss=loss, max_iter=max_iter, tol=tol)


def _prepare(g, f0, y, t, counts, ridge, *, loss, num_tasks, anchor_steps) -> _Data:
    """Per-task statistics at ``θ = 0`` and, after ``anchor_steps`` Newton steps on the
    all-tasks mask, at the anchor ``θ̄`` (preconditioner and warm start of ``"exact"``).

    For the all-tasks mask the per-task statistics at ``θ`` give the exact full gradient and
    Hessian, so these are plain Newton steps. One traced copy of the statistics serves all
    steps (a loop), which keeps compile time down. The anchor need not be accurate: it only
    shapes the convergence path of ``"exact"``, never its answer.
    """
    n, c, d = g.shape
    dtype = g.dtype
    eye = jnp.eye(d, dtype=dtype)

    def stats_at(theta):
        z = f0 + jnp.einsum("ncd,d->nc", g, theta)
        a, b = _task_statistics(g, z, y, t, counts, loss=loss, num_tasks=num_tasks)
        return z, a, b

    z0, a0, b0 = stats_at(jnp.zeros((d,), dtype))
    if anchor_steps == 0:
        zero_loss = loss_values(f0, y, loss)
        a0 = pack(a0)
        return _Data(g, f0, y, t, counts, a0, b0, a0, jnp.zeros((d,), dtype), f0, b0, zero_loss,
                     zero_loss)  # fmt: skip

    def newton(theta, a, b):
        h = jnp.mean(a, axis=0) + ridge * eye
        step = jnp.linalg.solve(h, jnp.mean(b, axis=0) + ridge * theta)
        new = theta - step
        return jnp.where(jnp.all(jnp.isfinite(new)), new, theta)

    def body(_, carry):
        theta, _, a, b = carry
        theta = newton(theta, a, b)
        z, a, b = stats_at(theta)
        return theta, z, a, b

    theta, z_bar, a_bar, b_bar = jax.lax.fori_loop(
        0, anchor_steps, body, (jnp.zeros((d,), dtype), z0, a0, b0)
    )
    return _Data(
        g, f0, y, t, counts, pack(a0), b0, pack(a_bar), theta, z_bar, b_bar,
        loss_values(z_bar, y, loss), loss_values(f0, y, loss),
    )  # fmt: skip


def _labels_chunk(target, theta, loss, metric):
    """Target metric ``[mc, T]`` at ``theta [d, mc]``."""
    grads, outputs, labels = target
    z = outputs_at(grads, outputs, theta)  # [T, C, mc]
    per = jax.vmap(
        jax.vmap(partial(example_metric, loss=loss, metric=metric), in_axes=(0, 0)),
        in_axes=(2, None),
    )
    return per(z, labels)


def _run_masks(data, target, masks, ridge, *, loss, metric, solver, chunk, max_iter, tol, diag):
    """All masks ``[m, K]`` on one device, ``chunk`` masks at a time."""
    m, k = masks.shape

    def one(mk):
        theta, ok, iters, gnorm, hvps = _solve_chunk(
            data, mk, ridge, loss=loss, solver=solver, max_iter=max_iter, tol=tol,
            diagnostics=diag,
        )  # fmt: skip
        lab = _labels_chunk(target, theta, loss, metric)
        return lab, theta.T, ok, iters, gnorm, hvps

    if chunk >= m:
        return one(masks)
    num = -(-m // chunk)
    padded = jnp.pad(masks, ((0, num * chunk - m), (0, 0)))
    outs = jax.lax.map(one, padded.reshape(num, chunk, k))
    return tuple(o.reshape((num * chunk,) + o.shape[2:])[:m] for o in outs)


def _mask_axis(masks: jax.Array):
    """``(mesh, spec_entry)`` when the masks are sharded along their first axis, else ``None``."""
    sharding = getattr(masks, "sharding", None) if _checks.is_concrete(masks) else None
    if sharding is None:
        try:
            sharding = jax.typeof(masks).sharding
        except Exception:  # pragma: no cover - abstract values without a sharding
            return None
    if not isinstance(sharding, NamedSharding):
        return None
    spec = tuple(sharding.spec) + (None,) * 2
    if spec[0] is None or sharding.mesh.empty:
        return None
    names = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    size = int(np.prod([sharding.mesh.shape[a] for a in names]))
    if size <= 1 or masks.shape[0] % size:
        return None
    return sharding.mesh, spec[0], size


# ----------------------------------------------------------------------------- public API


def estimate_subsets(
    train: GradientFeatures,
    target: GradientFeatures,
    masks: jax.Array,
    *,
    loss: str,
    metric: str = "loss",
    ridge: float | jax.Array,
    solver: str = "fast",
    mask_chunk_size: int | None = None,
    max_iter: int = 50,
    tol: float | None = None,
    throw: bool = True,
) -> SubsetEstimates:
    """Deprecated: use ``estimate_subset_labels(..., diagnostics=True)``, which this calls.

    Warns ``DeprecationWarning`` (one name per concept: the estimator is
    :func:`estimate_subset_labels`; its diagnostics are a keyword away).

    >>> import warnings, jax, jax.numpy as jnp, kernattr as ka
    >>> G = jax.random.normal(jax.random.key(0), (4, 3))
    >>> tr = ka.GradientFeatures(G, jnp.zeros(4), jnp.arange(4.0), jnp.array([0, 0, 1, 1]))
    >>> tg = ka.GradientFeatures(G[:1], jnp.zeros(1), jnp.zeros(1))
    >>> with warnings.catch_warnings(record=True) as w:
    ...     warnings.simplefilter("always")
    ...     est = estimate_subsets(tr, tg, jnp.array([[1.0, 0.0]]), loss="squared", ridge=1.0)
    >>> est.labels.shape, w[0].category.__name__
    ((1, 1), 'DeprecationWarning')
    """
    warnings.warn("kernattr.estimate_subsets is deprecated; use "
                  "kernattr.estimate_subset_labels(..., diagnostics=True).", DeprecationWarning,
                  stacklevel=2)
    return estimate_subset_labels(
        train, target, masks, loss=loss, metric=metric, ridge=ridge, solver=solver,
        mask_chunk_size=mask_chunk_size, max_iter=max_iter, tol=tol, throw=throw, diagnostics=True,
    )  # fmt: skip


def estimate_subset_labels(
    train: GradientFeatures,
    target: GradientFeatures,
    masks: jax.Array,
    *,
    loss: str,
    metric: str = "loss",
    ridge: float | jax.Array,
    solver: str = "fast",
    mask_chunk_size: int | None = None,
    max_iter: int = 50,
    tol: float | None = None,
    throw: bool = True,
    diagnostics: bool = False,
) -> jax.Array | SubsetEstimates:
    """Target metric of the linearized model trained on each subset of tasks, ``[m, T]``.

    For each mask ``s`` fits ``θ_s = argmin Σ_i w_i(s) ℓ(f0_i + G_i θ, y_i) + (ridge/2)||θ||²``
    with ``w_i(s) = s[t_i] / (n_{t_i} Σ_k s_k)`` (each selected task's mean loss counts
    equally; weights sum to 1) and returns the target metric at ``f0_t + G_t θ_s``. An all-zero
    mask trains on nothing: ``θ = 0`` and its labels are the metric of the base model.

    Args:
      train: training :class:`~kernattr.GradientFeatures`: ``grads [n, d]`` (squared/logistic)
        or ``[n, C, d]`` (softmax), ``outputs [n]`` / ``[n, C]``, ``labels [n]`` and
        ``task_ids [n]`` with values in ``0..K-1``, every task non-empty.
      target: target features (``T`` examples, same ``d`` and ``C``); ``task_ids`` is ignored.
      masks: ``[m, K]`` 0/1 subsets. Masks sharded on their first axis (``NamedSharding``) are
        solved per shard; the output keeps that sharding on its first axis.
      loss: ``"squared"``, ``"logistic"`` or ``"softmax"``.
      metric: ``"loss"``, ``"margin"`` or ``"output"`` (:func:`kernattr.labels._losses.example_metric`).
      ridge: ``>= 0`` ridge on ``θ`` (scalar, may be traced).
      solver: ``"fast"``: per-task statistics ``A_k``, ``b_k`` at ``θ = 0`` computed once, then
        one Newton step per mask (``K d² + d³`` per mask; exact for squared loss, a first-order
        approximation otherwise). ``"anchored"``: the same cost per mask, one exact Newton
        step from the all-tasks solution ``θ̄`` (two Newton steps from 0; closer to ``"exact"``
        when the subsets' solutions lie near it). ``"exact"``: line-searched Newton-CG to
        convergence, batched over masks as matrix products (``n C d`` per mask and
        Hessian-vector product).
      mask_chunk_size: masks solved at once per device (bounds memory); ``None``: automatic.
      max_iter: Newton iterations for ``"exact"``.
      tol: relative accuracy of ``θ`` for ``"exact"`` (default 1e-4 in float32, 1e-10 in
        float64).
      throw: raise on singular systems, non-finite results or non-convergence; with ``False``
        read the diagnostics instead (``diagnostics=True``).
      diagnostics: return the solver's diagnostics with the labels (static).

    Returns:
      ``[m, T]`` estimated labels (dtype of ``train.grads``); with ``diagnostics=True`` a
      :class:`~kernattr.SubsetEstimates` (``labels``, ``theta [m, d]``, ``converged [m]``,
      ``num_iterations``, ``grad_norm``, ``num_hvps``).

    >>> import jax, jax.numpy as jnp, kernattr as ka
    >>> G = jax.random.normal(jax.random.key(0), (6, 3))
    >>> tr = ka.GradientFeatures(G, jnp.zeros(6), jnp.arange(6.0), jnp.array([0, 0, 1, 1, 2, 2]))
    >>> tg = ka.GradientFeatures(G[:2], jnp.zeros(2), jnp.zeros(2))
    >>> masks = jnp.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    >>> estimate_subset_labels(tr, tg, masks, loss="squared", ridge=0.1).shape
    (2, 2)
    """
    est = _estimate(
        train, target, masks, loss=loss, metric=metric, ridge=ridge, solver=solver,
        mask_chunk_size=mask_chunk_size, max_iter=max_iter, tol=tol, throw=throw,
        diag=bool(diagnostics),
    )  # fmt: skip
    return est if diagnostics else est.labels


def _check_solver_config(solver: str, mask_chunk_size: Any, max_iter: Any) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"`solver` must be one of {SOLVERS}, got {solver!r}.")
    if mask_chunk_size is not None and (
        not isinstance(mask_chunk_size, (int, np.integer)) or mask_chunk_size < 1
    ):
        raise ValueError(f"`mask_chunk_size` must be a positive int or None, got {mask_chunk_size!r}.")
    if not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"`max_iter` must be a positive int, got {max_iter!r}.")


def _unsolved_message(solver: str, max_iter: int, tol: float) -> str:
    """The error for masks the solver could not solve (``{count}`` of them), with the fix."""
    if solver == "exact":
        return (
            f"estimate_subset_labels: {{count}} masks did not converge within "
            f"max_iter={max_iter} to tol={tol:g} (or their Newton system is singular / the "
            "result not finite): raise max_iter or tol, use `ridge` > 0, or pass throw=False "
            "and inspect estimate_subset_labels(..., diagnostics=True).converged."
        )
    return (
        "estimate_subset_labels: {count} masks could not be solved: the Newton system is "
        "singular or the result not finite. Use `ridge` > 0 (rank-deficient statistics "
        "at ridge=0), or pass throw=False and inspect "
        "estimate_subset_labels(..., diagnostics=True).converged."
    )


def _estimate(
    train, target, masks, *, loss, metric, ridge, solver, mask_chunk_size, max_iter, tol, throw, diag
) -> SubsetEstimates:
    check_loss_metric(loss, metric)
    _check_solver_config(solver, mask_chunk_size, max_iter)
    (g, f0, y, t), (gt, ft, yt) = check_feature_pair(train, target, loss)
    dtype = g.dtype
    masks = _checks.check_masks(masks, "masks")
    num_tasks = masks.shape[1]
    masks = masks.astype(dtype)
    if isinstance(ridge, (str, bytes)) or ridge is None:
        raise TypeError(f"`ridge` must be a non-negative float, got {ridge!r}.")
    ridge = jnp.asarray(ridge)
    if ridge.ndim != 0:
        raise ValueError(
            f"`ridge` must be a scalar, got shape {tuple(ridge.shape)}; vmap over a grid instead."
        )
    ridge_ok = _checks.check_hyperparameter(ridge, "ridge", allow_zero=True, throw=throw)
    ridge = ridge.astype(dtype)
    if tol is None:
        tol = 1e-10 if dtype == jnp.float64 else 1e-4
    if not float(tol) > 0:
        raise ValueError(f"`tol` must be > 0, got {tol!r}.")
    _, counts = _checks.check_task_ids(t, num_tasks=num_tasks, nonempty=True, name="train.task_ids")

    n, c, d = g.shape
    # squared loss: the Hessian is constant, the statistics at 0 are exact everywhere.
    steps = _ANCHOR_STEPS if (solver != "fast" and loss != "squared") else 0
    data = _prepare(g, f0, y, t, counts, ridge, loss=loss, num_tasks=num_tasks, anchor_steps=steps)
    tgt = (gt, ft, yt)

    per_mask = max(n * c * 6, 3 * d * d) if solver == "exact" else max(2 * d * d, n * c if diag else 1)
    m = masks.shape[0]
    sharded = _mask_axis(masks)
    if not sharded:
        masks = replicate_if_sharded(masks)
    local_m = m // sharded[2] if sharded else m
    if mask_chunk_size is None:
        chunk = max(1, _CHUNK_BUDGET // per_mask)
        chunk = -(-local_m // -(-local_m // chunk))  # equal chunks, least padding
    else:
        chunk = min(mask_chunk_size, local_m)
    run = partial(
        _run_masks, loss=loss, metric=metric, solver=solver, chunk=chunk, max_iter=max_iter,
        tol=tol, diag=diag,
    )  # fmt: skip
    if sharded:
        mesh, axis, _ = sharded
        rep, row = PartitionSpec(), PartitionSpec(axis)
        fn = jax.shard_map(
            lambda dt, tg, mk, r: run(dt, tg, mk, r),
            mesh=mesh,
            in_specs=(rep, rep, row, rep),
            out_specs=row,
            check_vma=False,
        )
        labels, theta, ok, iters, gnorm, hvps = fn(data, tgt, masks, ridge)
    else:
        labels, theta, ok, iters, gnorm, hvps = run(data, tgt, masks, ridge)
    if throw:
        ok = _checks.error_if(ok, ridge_ok & ~ok, _unsolved_message(solver, max_iter, tol))
    ok = ok & ridge_ok
    labels = jnp.where(ridge_ok, labels, jnp.nan)
    return SubsetEstimates(labels, theta, ok, iters, gnorm, hvps)
