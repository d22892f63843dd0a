"""Examples sharded over a ``data`` mesh axis: helpers used by the per-example entry points.

The convention: per-example arrays (inputs, labels, task ids, per-example
results) are split over the leading axis on a mesh axis called ``"data"``; parameters and the
projector are replicated. :func:`shard_examples` places arrays that way. The per-example entry
points (:func:`kernattr.projected_gradients`, :func:`kernattr.gradient_features`) then run one
program per shard through ``jax.shard_map`` — chunking *within* each shard with ``lax.map`` —
and return results sharded the same way, equal to the single-device results.

Which mesh is used: the ``mesh=`` keyword when given; otherwise the mesh of the inputs when it
is visible — concrete arrays with a ``NamedSharding`` whose first dimension is sharded, or, under
``jit``, arrays typed with an Explicit mesh axis (the default of ``jax.make_mesh`` since JAX 0.9).
Under ``jit`` with an *Auto* mesh the sharding is invisible at trace time: pass ``mesh=``.
Parameters: eager calls replicate concrete parameters onto the mesh; under ``jit`` they must be
uncommitted (plain ``jnp`` arrays) or already replicated on the mesh, since JAX refuses
arguments committed to different devices.

Two JAX sharding traps are handled here: ``lax.map(batch_size=...)`` over a sharded axis errors
(Explicit) or silently gathers (Auto), so chunking happens inside ``shard_map``; and gradients
with respect to parameters that enter ``shard_map`` replicated come out summed over devices, so
parameters are ``pcast`` to *varying* before differentiation.

Masks follow the same convention: the large-``m`` surrogates split the rows of ``masks`` over a
mesh axis (:func:`mask_mesh`) and move small pytrees with :func:`replicate` / :func:`shard_rows`,
given ``where = (mesh, axis)`` or ``None`` for one device.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ._checks import is_concrete, num_examples

__all__ = [
    "data_mesh", "shard_examples", "example_mesh", "map_over_examples", "mask_mesh", "replicate",
    "replicate_if_sharded", "shard_rows",
]


def data_mesh(devices: Any = None, *, axis: str = "data") -> jax.sharding.Mesh:
    """A 1-D mesh over ``devices`` (default: all devices, every process) named ``axis``.

    Args:
      devices: sequence of devices (default ``jax.devices()``).
      axis: mesh axis name.

    Returns:
      ``jax.sharding.Mesh`` with Explicit axis type.

    >>> import kernattr as ka
    >>> ka.data_mesh().axis_names
    ('data',)
    """
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh(
        (len(devices),), (axis,), axis_types=(jax.sharding.AxisType.Explicit,), devices=devices
    )


def shard_examples(tree: Any, mesh: jax.sharding.Mesh, *, axis: str = "data") -> Any:
    """Place every leaf of ``tree`` with its leading (example) axis split over ``mesh[axis]``.

    Works across processes: when the mesh spans devices of several processes, every process
    passes the same global array and keeps the rows of its own devices.

    Args:
      tree: pytree of ``[n, ...]`` arrays (``n`` may differ between leaves, e.g. examples and
        masks); each ``n`` must be divisible by the axis size.
      mesh: a ``jax.sharding.Mesh`` with an axis called ``axis``.
      axis: name of the example axis of the mesh.

    Returns:
      The same pytree, each leaf a ``jax.Array`` with ``NamedSharding(mesh, P(axis))``.

    >>> import jax.numpy as jnp, kernattr as ka
    >>> mesh = ka.data_mesh()
    >>> x = ka.shard_examples(jnp.zeros((8, 3)), mesh)
    >>> x.sharding.spec
    P('data',)
    """
    if axis not in mesh.axis_names:
        raise ValueError(f"`mesh` has no axis {axis!r} (axes {mesh.axis_names}); pass `axis=`.")
    size = mesh.shape[axis]
    for x in jax.tree_util.tree_leaves(tree):
        shape = np.shape(x)
        if len(shape) == 0:
            raise ValueError("`tree` leaves must have a leading example axis [n, ...], got a scalar.")
        if shape[0] % size:
            raise ValueError(
                f"the leading axis n={shape[0]} must be divisible by the '{axis}' axis size "
                f"{size}; pad or drop examples."
            )
    sharding = NamedSharding(mesh, PartitionSpec(axis))

    def put(x):
        if sharding.is_fully_addressable:
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree_util.tree_map(put, tree)


def example_mesh(tree: Any, mesh: Any = None, axis: str | None = None):
    """``(mesh, axis)`` over which the examples of ``tree`` are split, or ``None``.

    ``mesh`` given: that mesh and ``axis`` (default ``"data"``). Otherwise read from the first
    leaf: the ``NamedSharding`` of a concrete array, or the Explicit-mode type under ``jit``.
    """
    if mesh is not None:
        axis = "data" if axis is None else axis
        if axis not in mesh.axis_names:
            raise ValueError(f"`mesh` has no axis {axis!r} (axes {mesh.axis_names}); pass `axis=`.")
        return mesh, axis
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return None
    x = leaves[0]
    if is_concrete(x):
        sh = getattr(x, "sharding", None)
    else:
        sh = getattr(jax.typeof(x), "sharding", None)
    if not isinstance(sh, NamedSharding) or len(sh.spec) == 0 or sh.spec[0] is None:
        return None
    first = sh.spec[0]
    if axis is not None and first != axis:
        return None
    return sh.mesh, first


def gather_rows(x: jax.Array) -> jax.Array:
    """``x`` replicated when its leading axis is split over a mesh (a no-op otherwise).

    For the solvers that need every row on every device (eigendecompositions, SVDs of
    ``[m, ...]`` arrays): sharded inputs then give the single-device result. Works eagerly and
    under ``jit`` (Explicit mesh axes).
    """
    found = example_mesh(x)
    if found is None:
        return x
    return jax.sharding.reshard(x, NamedSharding(found[0], PartitionSpec()))


def _axis_size(mesh, axis) -> int:
    names = axis if isinstance(axis, tuple) else (axis,)
    return int(np.prod([mesh.shape[a] for a in names]))


def map_over_examples(
    fn: Callable, mesh: Any, axis: Any, replicated: Any, examples: Any, name: str = "inputs"
) -> Any:
    """Run ``fn(replicated, examples)`` once per shard of the examples; results sharded on ``axis``.

    ``replicated`` (parameters, projector) enters every shard whole and is pcast to *varying*
    so that derivatives with respect to it stay per-shard (not psum'd). Every leaf of the result
    must have a leading per-example axis.
    """
    n = num_examples(examples, name, allow_empty=True)
    size = _axis_size(mesh, axis)
    if n % size:
        raise ValueError(
            f"`{name}` has n={n} examples, not divisible by the {axis!r} mesh axis size {size}; "
            "pad or drop examples."
        )
    names = axis if isinstance(axis, tuple) else (axis,)

    def body(rep, ex):
        rep = jax.tree_util.tree_map(
            lambda p: jax.lax.pcast(p, names, to="varying")
            if jax.numpy.issubdtype(p.dtype, jax.numpy.inexact)
            else p,
            rep,
        )
        return fn(rep, ex)

    if isinstance(mesh, jax.sharding.Mesh):
        # eager convenience: replicate concrete parameters committed elsewhere (e.g. device 0)
        rep = NamedSharding(mesh, PartitionSpec())
        if rep.is_fully_addressable:
            replicated = jax.tree_util.tree_map(
                lambda a: jax.device_put(a, rep) if isinstance(a, jax.Array) and is_concrete(a) else a,
                replicated,
            )
    spec = PartitionSpec(axis)
    rep_specs = jax.tree_util.tree_map(lambda _: PartitionSpec(), replicated)
    ex_specs = jax.tree_util.tree_map(lambda _: spec, examples)
    return jax.shard_map(body, mesh=mesh, in_specs=(rep_specs, ex_specs), out_specs=spec)(
        replicated, examples
    )


# --------------------------------------------------------------------------------------------
# Rows (masks) split over a mesh axis: the mesh, replication and resharding
# --------------------------------------------------------------------------------------------
def mask_mesh(masks: jax.Array, mesh: Any = None, axis: str | None = None):
    """``(mesh, axis)`` over which the rows of ``masks`` are split, or ``None`` (one device)."""
    found = example_mesh(masks, mesh, axis)
    if found is None:
        return None
    mesh_, axis_ = found
    size = int(np.prod([mesh_.shape[a] for a in (axis_ if isinstance(axis_, tuple) else (axis_,))]))
    if size == 1:
        return None
    if masks.shape[0] % size:
        raise ValueError(
            f"`masks` has m={masks.shape[0]} rows, not divisible by the {axis_!r} mesh axis size "
            f"{size}; pad or drop masks."
        )
    return mesh_, axis_


def replicate(x: Any, where) -> Any:
    """``x`` (a pytree) replicated over the mesh of ``where = (mesh, axis)`` (no-op if None)."""
    if where is None:
        return x
    rep = NamedSharding(where[0], PartitionSpec())
    return jax.tree_util.tree_map(lambda a: jax.sharding.reshard(a, rep), x)


def shard_rows(x: Any, where) -> Any:
    """``x`` (a pytree of ``[m, ...]``) split on the mesh axis of ``where`` (no-op if None)."""
    if where is None:
        return x
    sh = NamedSharding(where[0], PartitionSpec(where[1]))
    return jax.tree_util.tree_map(lambda a: jax.sharding.reshard(a, sh), x)


def replicate_if_sharded(x: jax.Array) -> jax.Array:
    """``x`` replicated when it is sharded over an Explicit mesh axis (e.g. examples on a
    ``data`` axis), else ``x``: for computations that need every row on every device (the
    estimator needs every example on every mask shard)."""
    sharding = jax.typeof(x).sharding
    if isinstance(sharding, NamedSharding) and any(e is not None for e in sharding.spec):
        if any(t == jax.sharding.AxisType.Explicit for t in sharding.mesh.axis_types):
            return jax.sharding.reshard(x, NamedSharding(sharding.mesh, PartitionSpec()))
    return x
