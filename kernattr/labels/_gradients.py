"""Linearised models and projected per-example output gradients.

``apply_fn(params, x)`` maps parameters and ONE unbatched example ``x`` to a scalar or to ``[C]``
outputs. The functions here vmap it over examples themselves (in chunks of ``chunk_size`` with
``lax.map``), differentiate only the leaves selected by the projector's filter, and project each
gradient with the projector (:mod:`kernattr._projection`) as soon as it is formed.

Two implementations (``method=``), tested against each other:

* ``"vjp"`` (default, fastest for ``d`` larger than a few): reverse mode per example (``C`` vjps
  for ``C`` outputs) over a chunk, then ``Pᵀ g``. Memory: ``chunk_size * C * D`` for the chunk's
  gradients, a zero-padded copy of one group of leaves at a time (at most ``2**24`` rows or the
  largest selected leaf, per gradient), and one projection block; for ``"sjlt"`` also the hash
  (``s`` buckets and signs per parameter), built once per call.
* ``"jvp"``: forward mode, ``d`` Jacobian-vector products ``J_i p_j`` against the columns of
  ``P``, vmapped over a block of ``t`` columns (``t`` = the largest divisor of ``d`` up to 64),
  so no per-example gradient is ever formed. Memory: ``D * t`` for a block of columns of ``P``
  (regenerated block by block, never stored whole) plus the chunk's forward passes. Costs ``d``
  forward passes per example (and ``d / t`` regenerations of ``P``): for small ``d`` or very
  wide outputs.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

from .. import _checks, _sharding
from ._features import GradientFeatures
from ._projection import Projector, apply_flat, check_tree, columns, make_plan

__all__ = ["linearize", "projected_gradients", "gradient_features"]

METHODS = ("vjp", "jvp")
_JVP_COLUMNS = 64


def linearize(apply_fn: Callable, params0: Any) -> Callable:
    """First-order model of ``apply_fn`` around ``params0``.

    ``f_lin(params, x) = f(x; W0) + J(x) (params - W0)``, computed with one ``jax.jvp`` (no
    Jacobian is formed).

    Args:
      apply_fn: ``apply_fn(params, x)`` -> scalar or ``[C]`` for one example ``x``.
      params0: expansion point ``W0`` (pytree of float arrays).

    Returns:
      ``f_lin(params, x)`` with the output shape of ``apply_fn``; ``params`` has the structure of
      ``params0``.

    >>> import jax.numpy as jnp, kernattr as ka
    >>> f = lambda p, x: jnp.tanh(p["w"] @ x)
    >>> f_lin = ka.linearize(f, {"w": jnp.zeros(2)})
    >>> float(f_lin({"w": jnp.ones(2)}, jnp.array([1.0, 2.0])))
    3.0
    """
    if not callable(apply_fn):
        raise TypeError(f"`apply_fn` must be callable, got {type(apply_fn).__name__}.")
    treedef0 = jax.tree_util.tree_structure(params0)

    def f_lin(params, x):
        if jax.tree_util.tree_structure(params) != treedef0:
            raise ValueError(
                "`params` must have the tree structure of `params0` "
                f"({treedef0}), got {jax.tree_util.tree_structure(params)}."
            )
        delta = jax.tree_util.tree_map(lambda p, p0: jnp.asarray(p - p0, jnp.result_type(p0)), params, params0)
        out, tangent = jax.jvp(lambda p: apply_fn(p, x), (params0,), (delta,))
        return out + tangent

    return f_lin


def _check_config(projector, chunk_size, method):
    if not isinstance(projector, Projector):
        raise TypeError(f"`projector` must be a Projector (make_projector), got {type(projector).__name__}.")
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size <= 0
    ):
        raise ValueError(f"`chunk_size` must be None or a positive int, got {chunk_size!r}.")


def _check_params(projector: Projector, params: Any) -> list:
    leaves = check_tree(projector, params, "params")
    for i, (x, shape) in enumerate(zip(leaves, projector.leaf_shapes)):
        if tuple(np.shape(x)) != shape:
            raise ValueError(
                f"`params` leaf {projector.leaf_paths[i]} has shape {tuple(np.shape(x))} but the "
                f"projector was built for {shape}."
            )
        if projector.selected[i] and not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise TypeError(f"`params` leaf {projector.leaf_paths[i]} must be floating, got {jnp.result_type(x)}.")
    return leaves


def _check_output(out: Any) -> jax.Array:
    out = jnp.asarray(out)
    if out.ndim > 1:
        raise ValueError(
            f"`apply_fn` must return a scalar or a [C] vector for ONE example, got shape {out.shape}; "
            "it is vmapped over examples internally."
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"`apply_fn` must return floating outputs, got {out.dtype}.")
    return out


def _chunked(fn, xs, chunk_size):
    if chunk_size is None:
        return jax.vmap(fn)(xs)
    return jax.lax.map(fn, xs, batch_size=chunk_size)


def _local(apply_fn, projector, chunk_size, method, params, inputs):
    """(outputs [n] / [n, C], grads [n, d] / [n, C, d]) on arrays of one device/shard."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    idx = projector.selected_indices
    sel = [leaves[i] for i in idx]
    dtype = jnp.result_type(*sel)
    d = projector.dim

    def f_sel(sel_leaves, x):
        full = list(leaves)
        for i, v in zip(idx, sel_leaves):
            full[i] = v
        return apply_fn(jax.tree_util.tree_unflatten(treedef, full), x)

    if method == "vjp":
        plan = make_plan(projector, dtype)

        def one(x):
            out, vjp_fn = jax.vjp(lambda s: f_sel(s, x), sel)
            out = _check_output(out)
            if out.ndim == 0:
                (g,) = vjp_fn(jnp.ones_like(out))
                flat = [gi.reshape(1, -1) for gi in g]
            else:
                # ones_like(out) gives the basis the type of `out` (e.g. varying inside shard_map)
                basis = jnp.eye(out.shape[0], dtype=out.dtype) * jnp.ones_like(out)[None, :]
                (g,) = jax.vmap(vjp_fn)(basis)
                flat = [gi.reshape(out.shape[0], -1) for gi in g]
            G = apply_flat(projector, plan, flat, dtype)
            return out, G.reshape(out.shape + (d,))

        return _chunked(one, inputs, chunk_size)

    # method == "jvp": column blocks of P outside, examples (chunked) inside.
    t = max(c for c in range(1, min(d, _JVP_COLUMNS) + 1) if d % c == 0)

    def column_block(j):
        tangents = [
            cols.T.reshape((t,) + tuple(np.shape(leaf))).astype(jnp.result_type(leaf))
            for cols, leaf in zip(columns(projector, j * t, t, dtype), sel)  # [D_l, t] each
        ]

        def one(x):
            def jvp_col(tan):
                return jax.jvp(lambda s: f_sel(s, x), (sel,), (tan,))[1]

            return jax.vmap(jvp_col, out_axes=-1)(tangents)  # [t] or [C, t]

        return _chunked(one, inputs, chunk_size)  # [n, t] or [n, C, t]

    blocks = jax.lax.map(column_block, jnp.arange(d // t))  # [d/t, n, (C,) t]
    G = jnp.moveaxis(blocks, 0, -2)  # [n, (C,) d/t, t]
    G = G.reshape(G.shape[:-2] + (d,)).astype(dtype)
    outputs = _chunked(lambda x: _check_output(f_sel(sel, x)), inputs, chunk_size)
    return outputs, G


def _compute(apply_fn, params, inputs, projector, chunk_size, method, mesh):
    if not callable(apply_fn):
        raise TypeError(f"`apply_fn` must be callable, got {type(apply_fn).__name__}.")
    _check_config(projector, chunk_size, method)
    _check_params(projector, params)
    _checks.num_examples(inputs, "inputs")
    where = _sharding.example_mesh(inputs, mesh)
    if where is None:
        return _local(apply_fn, projector, chunk_size, method, params, inputs)
    mesh_, axis = where

    def fn(rep, ex):
        p, proj = rep
        return _local(apply_fn, proj, chunk_size, method, p, ex)

    return _sharding.map_over_examples(fn, mesh_, axis, (params, projector), inputs)


def projected_gradients(
    apply_fn: Callable,
    params: Any,
    inputs: Any,
    projector: Projector,
    *,
    chunk_size: int | None = None,
    method: Literal["vjp", "jvp"] = "vjp",
    mesh: Any = None,
) -> jax.Array:
    """Projected per-example output gradients ``G_i = Pᵀ ∇_W f(x_i; W)``.

    Only the leaves selected by the projector's filter are differentiated (the others are held
    fixed). The result does not depend on ``chunk_size``, on the order of the examples or on how
    they are sharded.

    Args:
      apply_fn: ``apply_fn(params, x)`` -> scalar or ``[C]`` for ONE unbatched example ``x``.
      params: parameter pytree ``W`` (structure and shapes of the projector's).
      inputs: pytree of ``[n, ...]`` arrays, one row per example.
      projector: a :class:`kernattr.Projector` (``D x d``) from :func:`kernattr.make_projector`.
      chunk_size: examples processed at once (``lax.map`` batches; per shard when sharded);
        ``None`` vmaps over all examples at once. Bounds memory, never changes the result.
      method: ``"vjp"`` (reverse mode then project; default) or ``"jvp"`` (``d`` forward-mode
        products with the columns of ``P``; no per-example gradient is formed). See the module
        docstring for the trade-off.
      mesh: a mesh whose ``"data"`` axis splits the examples. Default: taken from the sharding
        of ``inputs`` when visible (see :mod:`kernattr._sharding`); single program otherwise.

    Returns:
      ``[n, d]`` (scalar outputs) or ``[n, C, d]``, in the parameters' dtype; sharded on the
      example axis like ``inputs`` when sharded.

    >>> import jax, jax.numpy as jnp, kernattr as ka
    >>> f = lambda p, x: jnp.tanh(x @ p["w"])
    >>> params = {"w": jnp.ones(3)}
    >>> proj = ka.make_projector(jax.random.key(0), params, dim=2)
    >>> ka.projected_gradients(f, params, jnp.ones((5, 3)), proj, chunk_size=2).shape
    (5, 2)
    """
    return _compute(apply_fn, params, inputs, projector, chunk_size, method, mesh)[1]


def gradient_features(
    apply_fn: Callable,
    params: Any,
    inputs: Any,
    labels: Any,
    projector: Projector,
    *,
    task_ids: Any = None,
    num_tasks: int | None = None,
    chunk_size: int | None = None,
    method: Literal["vjp", "jvp"] = "vjp",
    mesh: Any = None,
    throw: bool = True,
) -> GradientFeatures:
    """Base outputs and projected gradients of a set of examples, as :class:`GradientFeatures`.

    Args:
      apply_fn: ``apply_fn(params, x)`` -> scalar or ``[C]`` for ONE example (the trained model
        ``W0`` is ``params``).
      params: parameter pytree ``W0``.
      inputs: pytree of ``[n, ...]`` arrays.
      labels: ``[n]`` targets (squared loss), 0/1 (logistic) or class ids (softmax).
      projector: a :class:`kernattr.Projector`.
      task_ids: ``[n]`` integer task of each example (training set) or ``None`` (target set).
      num_tasks: ``K``; when given, task ids must lie in ``0..K-1``.
      chunk_size: examples per ``lax.map`` batch (see :func:`projected_gradients`).
      method: ``"vjp"`` or ``"jvp"`` (see :func:`projected_gradients`).
      mesh: mesh whose ``"data"`` axis splits the examples (default: from ``inputs``).
      throw: raise ``ValueError`` (under ``jit``: a runtime error carrying the same message) when
        outputs or gradients are non-finite, with the count of offending examples. With
        ``False`` the values are returned unchecked (test ``jnp.isfinite`` yourself).

    Returns:
      ``GradientFeatures(grads [n, d] | [n, C, d], outputs [n] | [n, C], labels [n],
      task_ids [n] | None)``.

    >>> import jax, jax.numpy as jnp, kernattr as ka
    >>> f = lambda p, x: x @ p["w"]
    >>> params = {"w": jnp.ones(3)}
    >>> proj = ka.make_projector(jax.random.key(0), params, kind="identity", dim=None)
    >>> feats = ka.gradient_features(f, params, jnp.eye(3), jnp.zeros(3), proj)
    >>> feats.grads.shape, feats.outputs.shape
    ((3, 3), (3,))
    """
    n = _checks.num_examples(inputs, "inputs")
    labels = _checks.check_example_labels(labels, n)
    if task_ids is not None:
        task_ids, _ = _checks.check_task_ids(task_ids, num_tasks=num_tasks, num_examples=n)
    elif num_tasks is not None:
        raise ValueError("`num_tasks` was given without `task_ids`.")
    outputs, grads = _compute(apply_fn, params, inputs, projector, chunk_size, method, mesh)
    if throw:
        bad = ~(
            jnp.all(jnp.isfinite(grads.reshape(n, -1)), axis=1)
            & jnp.all(jnp.isfinite(outputs.reshape(n, -1)), axis=1)
        )
        grads = _checks.error_if(
            grads,
            bad,
            "{count} examples have non-finite (NaN/inf) outputs or gradients at `params`; "
            "check the model/inputs of those examples or pass throw=False.",
        )
    return GradientFeatures(grads=grads, outputs=outputs, labels=labels, task_ids=task_ids)


def gradient_features_fn(
    apply_fn: Callable,
    projector: Projector,
    *,
    num_tasks: int | None = None,
    chunk_size: int | None = None,
    method: Literal["vjp", "jvp"] = "vjp",
    mesh: Any = None,
    throw: bool = True,
) -> Callable[..., GradientFeatures]:
    """Configure :func:`gradient_features` once; returns a pure function of arrays only.

    The configuration (model, projector, chunking, method) is checked here, eagerly, so the
    returned ``features(params, inputs, labels, task_ids=None) -> GradientFeatures`` can be
    passed to ``jax.jit`` directly (no ``functools.partial``) and reused for many parameter
    values; its array arguments are checked on every call, eagerly and under ``jit``, exactly
    as in :func:`gradient_features`.

    Args:
      apply_fn: ``apply_fn(params, x)`` -> scalar or ``[C]`` for ONE example.
      projector: a :class:`kernattr.Projector` (:func:`kernattr.make_projector`).
      num_tasks, chunk_size, method, mesh, throw: as in :func:`gradient_features`;
        ``num_tasks`` checks the ids of calls with ``task_ids`` (the training set), so one
        configured function also serves the target set (``task_ids=None``).

    Returns:
      ``features(params, inputs [n, ...], labels [n], task_ids [n] | None)`` ->
      ``GradientFeatures(grads [n, d] | [n, C, d], outputs [n] | [n, C], labels [n], task_ids)``.

    >>> import jax, jax.numpy as jnp, kernattr as ka
    >>> f = lambda p, x: x @ p["w"]
    >>> params = {"w": jnp.ones(3)}
    >>> proj = ka.make_projector(jax.random.key(0), params, kind="identity", dim=None)
    >>> features = jax.jit(ka.gradient_features_fn(f, proj))
    >>> features(params, jnp.eye(3), jnp.zeros(3)).grads.shape
    (3, 3)
    """
    if not callable(apply_fn):
        raise TypeError(f"`apply_fn` must be callable apply_fn(params, x), got {apply_fn!r}.")
    _check_config(projector, chunk_size, method)
    if num_tasks is not None:
        num_tasks = _checks.check_count(num_tasks, "num_tasks")

    def features(params: Any, inputs: Any, labels: Any, task_ids: Any = None) -> GradientFeatures:
        # num_tasks checks the training set's ids; a target set (task_ids=None) has none
        return gradient_features(apply_fn, params, inputs, labels, projector, task_ids=task_ids,
                                 num_tasks=None if task_ids is None else num_tasks,
                                 chunk_size=chunk_size, method=method, mesh=mesh, throw=throw)

    return features
