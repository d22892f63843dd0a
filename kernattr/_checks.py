"""Input validation shared by every public function.

Two kinds of checks:

* Static facts (rank, shapes, dtype kind, configuration ranges) raise ``ValueError`` /
  ``TypeError`` at trace time, naming the argument and the fix.
* Facts about values (masks not 0/1, NaN labels, non-finite gradients, a singular system) are
  checked eagerly when the array is concrete (a plain call outside ``jit``). Under ``jit`` the
  value is unknown at trace time; :func:`error_if` then inserts a host callback that raises when
  the compiled function runs, so bad input never yields a silent wrong number. ``throw=False``
  at a public boundary turns these into a returned status instead.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "as_float_array",
    "check_count",
    "check_grid",
    "check_hyperparameter",
    "check_key",
    "check_labels",
    "check_masks",
    "check_rank",
    "check_same_rows",
    "check_task_ids",
    "error_if",
    "is_concrete",
    "num_examples",
]


def is_concrete(x: Any) -> bool:
    """True when ``x`` has known values (not a tracer inside ``jit``/``vmap``/``grad``)."""
    return not isinstance(x, jax.core.Tracer)


def as_float_array(x: Any, name: str) -> jax.Array:
    """``x`` as a floating JAX array (bool/int promoted to the default float dtype)."""
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"`{name}` must be an array, got {type(x).__name__}.")
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise TypeError(f"`{name}` must be real, got dtype {x.dtype}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


def check_rank(x: jax.Array, ranks: int | tuple[int, ...], name: str, shape_doc: str) -> None:
    """Raise ``ValueError`` unless ``x.ndim`` is one of ``ranks``."""
    ranks = (ranks,) if isinstance(ranks, int) else tuple(ranks)
    if x.ndim not in ranks:
        raise ValueError(
            f"`{name}` must have shape {shape_doc} (rank {' or '.join(map(str, ranks))}), "
            f"got shape {tuple(x.shape)}."
        )


def error_if(x: Any, pred: jax.Array, msg: str, exc: type[Exception] = ValueError) -> Any:
    """``x`` unchanged, raising ``exc(msg)`` when ``pred`` (a boolean array) has a true entry.

    Eagerly when ``pred`` is concrete; under ``jit`` through a host callback that raises when the
    compiled program runs (the error then surfaces wrapped in a ``JaxRuntimeError`` whose text
    contains ``msg``). ``msg`` may contain ``{count}``, filled with the number of true entries of
    ``pred`` before it is reduced (pass a non-scalar ``pred`` to report a count).

    Like ``equinox.error_if`` it returns the value it guards: callers go on with the returned
    value, so the check stays attached to the data it is about.

    Args:
      x: the array (or pytree) the check is about; returned unchanged.
      pred: boolean array; any true entry is an error.
      msg: the message; ``{count}`` is replaced by the number of true entries.
      exc: the exception type raised (default ``ValueError``).

    Returns:
      ``x``.

    >>> import jax, jax.numpy as jnp, kernattr as ka
    >>> ridge = jnp.array([0.5, 1.0])
    >>> ka.error_if(ridge, ridge < 0, "`ridge` has {count} negative entries").tolist()
    [0.5, 1.0]
    >>> ka.error_if(-ridge, -ridge < 0, "`ridge` has {count} negative entries")
    Traceback (most recent call last):
    ValueError: `ridge` has 2 negative entries
    """
    pred = jnp.asarray(pred)
    count = jnp.sum(pred)
    if is_concrete(count):
        c = int(count)
        if c > 0:
            raise exc(msg.format(count=c))
        return x

    def _raise(c):
        c = int(np.asarray(c))
        if c > 0:
            err = exc(msg.format(count=c))
            err._kernattr_check = True  # raised on purpose: JAX need not log it (see below)
            raise err

    jax.debug.callback(_raise, count)
    return x


class _DropCheckErrors(logging.Filter):
    """Drop JAX's "jax.debug.callback failed" log record (with its traceback) when the failing
    callback is one of :func:`error_if`'s checks: the error itself reaches the caller as one
    clean exception. Failures of other callbacks are logged as before."""

    def filter(self, record: logging.LogRecord) -> bool:
        info = record.exc_info
        return not (info and getattr(info[1], "_kernattr_check", False))


# The logger JAX reports failing debug callbacks on (named, so no JAX internals are imported).
logging.getLogger("jax._src.debugging").addFilter(_DropCheckErrors())


def check_masks(masks: Any, name: str = "masks", num_tasks: int | None = None) -> jax.Array:
    """Validate subset masks: rank 2 ``[m, K]``, values 0/1. Returns a float array.

    Bool and integer masks are accepted and converted to the default float dtype.
    """
    masks = as_float_array(masks, name)
    check_rank(masks, 2, name, "[m, K] (one row per subset, one column per task)")
    if masks.shape[0] == 0:
        raise ValueError(f"`{name}` has no rows: at least one subset mask is needed.")
    if masks.shape[1] == 0:
        raise ValueError(f"`{name}` has no columns: at least one task is needed.")
    if num_tasks is not None and masks.shape[1] != num_tasks:
        raise ValueError(
            f"`{name}` has {masks.shape[1]} task columns but the surrogate/data has {num_tasks} tasks."
        )
    bad = (masks != 0) & (masks != 1)
    error_if(
        masks,
        bad,
        f"`{name}` must contain only 0 and 1 ({{count}} entries are neither); "
        "pass a 0/1 (or bool) array, one row per subset.",
    )
    return masks


def check_labels(y: Any, num_rows: int, name: str = "y") -> tuple[jax.Array, bool]:
    """Validate labels ``[m]`` or ``[m, T]``; returns (``[m, T]`` float array, was_1d)."""
    y = as_float_array(y, name)
    check_rank(y, (1, 2), name, "[m] or [m, T]")
    was_1d = y.ndim == 1
    if was_1d:
        y = y[:, None]
    check_same_rows(num_rows, y.shape[0], "masks", name)
    if y.shape[1] == 0:
        raise ValueError(
            f"`{name}` has shape {tuple(y.shape)}: no target columns; pass labels [m] or [m, T] "
            "with T >= 1."
        )
    error_if(
        y,
        ~jnp.isfinite(y),
        f"`{name}` contains {{count}} non-finite values (NaN/inf); drop or impute those subsets.",
    )
    return y, was_1d


def check_example_labels(labels: Any, n: int, name: str = "labels", *, vector: bool = True,
                         shape_doc: str = "[n] (one label per example)") -> jax.Array:
    """Per-example labels (one per training example), checked eagerly and under ``jit``.

    Static: an array (not a string or ``None``) of a real numeric or bool dtype whose leading
    axis has ``n`` entries, and 1-D when ``vector`` (``shape_doc`` says which shape). Values:
    finite when floating (a ``{count}`` error from the compiled program under ``jit``).
    Integer class ids pass unchanged; returns the labels as an array.
    """
    if isinstance(labels, (str, bytes)) or labels is None:
        raise TypeError(f"`{name}` must be an array [n], got {type(labels).__name__}.")
    labels = jnp.asarray(labels)
    if not (jnp.issubdtype(labels.dtype, jnp.number) or labels.dtype == jnp.bool_):
        raise TypeError(f"`{name}` must be numeric, got dtype {labels.dtype}.")
    if jnp.issubdtype(labels.dtype, jnp.complexfloating):
        raise TypeError(f"`{name}` must be real, got dtype {labels.dtype}.")
    if vector:
        check_rank(labels, 1, name, shape_doc)
    elif labels.ndim == 0:
        raise ValueError(f"`{name}` must have a leading example axis [n], got a scalar.")
    if labels.shape[0] != n:
        raise ValueError(f"`{name}` has {labels.shape[0]} entries but `inputs` has n={n} examples.")
    if jnp.issubdtype(labels.dtype, jnp.floating):
        labels = error_if(
            labels,
            ~jnp.isfinite(labels),
            f"`{name}` contains {{count}} non-finite values (NaN/inf); drop or fix those examples.",
        )
    return labels


def check_same_rows(n_a: int, n_b: int, name_a: str, name_b: str) -> None:
    if n_a != n_b:
        raise ValueError(
            f"`{name_a}` has {n_a} rows but `{name_b}` has {n_b}; they must describe the same subsets."
        )


def check_grid(value: Any, name: str) -> jax.Array:
    """A scalar or 1-D grid of positive floats, returned as a 1-D float array."""
    if isinstance(value, (str, bytes)) or value is None:
        raise TypeError(f"`{name}` must be a float or a 1-D array of floats, got {value!r}.")
    arr = as_float_array(value, name)
    if arr.ndim == 0:
        arr = arr[None]
    if arr.ndim != 1:
        raise ValueError(f"`{name}` must be a scalar or a 1-D grid, got shape {tuple(arr.shape)}.")
    if arr.shape[0] == 0:
        raise ValueError(f"`{name}` grid is empty.")
    if is_concrete(arr) and not np.all(np.isfinite(np.asarray(arr))):
        # numpy, not jnp: inside a jit trace jnp ops on a constant produce tracers.
        raise ValueError(f"`{name}` must be finite, got {np.asarray(arr)}.")
    return arr


def check_hyperparameter(
    value: Any, name: str, *, allow_zero: bool = False, throw: bool = True
) -> jax.Array:
    """Check that a hyperparameter (scalar or grid) is finite and ``> 0`` (``>= 0`` with
    ``allow_zero``), eagerly *and* under ``jit``/``vmap``.

    * Concrete ``value`` (a Python/numpy number or an array outside a trace): ``ValueError``
      naming ``name`` at once, whatever ``throw`` says (the value is known at trace time).
    * Traced ``value`` with ``throw=True``: :func:`error_if` raises the same message when the
      compiled program runs.
    * Traced ``value`` with ``throw=False``: no error; the caller reports the returned ``ok``
      in its status fields.

    Returns:
      Boolean array of ``value``'s shape: True where the entry is valid.
    """
    if isinstance(value, (str, bytes)) or value is None:
        raise TypeError(f"`{name}` must be a float or an array of floats, got {value!r}.")
    rel = ">= 0" if allow_zero else "> 0"
    msg = f"`{name}` must be finite and {rel}"
    if is_concrete(value):
        # numpy, not jnp: inside a jit trace jnp ops on a constant produce tracers.
        arr = np.asarray(value)
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"`{name}` must be real numbers, got dtype {arr.dtype}.")
        arr = arr.astype(float)
        ok = np.isfinite(arr) & ((arr >= 0) if allow_zero else (arr > 0))
        if not np.all(ok):
            raise ValueError(f"{msg}, got {arr}.")
        return jnp.asarray(ok)
    arr = jnp.asarray(value)
    ok = jnp.isfinite(arr) & ((arr >= 0) if allow_zero else (arr > 0))
    if throw:
        bad = "negative, NaN or inf" if allow_zero else "negative, zero, NaN or inf"
        error_if(arr, ~ok, msg + f", got {{count}} invalid value(s) ({bad}).")
    return ok


def check_task_ids(
    task_ids: Any,
    *,
    num_tasks: int | None = None,
    num_examples: int | None = None,
    nonempty: bool = False,
    name: str = "task_ids",
) -> tuple[jax.Array, jax.Array | None]:
    """Integer task ids ``[n]`` (the task of every example), checked eagerly and under ``jit``.

    Static: an integer 1-D array of ``num_examples`` entries (when given). Values: in
    ``0..num_tasks-1`` (only ``>= 0`` without ``num_tasks``) and, with ``nonempty``, every task
    has at least one example.

    Returns:
      ``(task_ids, counts)``: ``counts [K]`` int32 examples per task (``None`` without
      ``num_tasks``).
    """
    if isinstance(task_ids, (str, bytes)) or task_ids is None:
        raise TypeError(f"`{name}` must be an integer array [n], got {task_ids!r}.")
    task_ids = jnp.asarray(task_ids)
    if not jnp.issubdtype(task_ids.dtype, jnp.integer):
        raise TypeError(
            f"`{name}` must have an integer dtype (task index of each example, in 0..K-1), "
            f"got {task_ids.dtype}."
        )
    check_rank(task_ids, 1, name, "[n] (one task id per example)")
    if num_examples is not None and task_ids.shape[0] != num_examples:
        raise ValueError(
            f"`{name}` has {task_ids.shape[0]} entries but there are {num_examples} examples."
        )
    if num_tasks is None:
        error_if(
            task_ids,
            task_ids < 0,
            f"`{name}` has {{count}} negative entries; task ids must be in 0..K-1.",
        )
        return task_ids, None
    error_if(
        task_ids,
        (task_ids < 0) | (task_ids >= num_tasks),
        f"`{name}` has {{count}} entries outside 0..{num_tasks - 1} (out of range for the "
        f"K={num_tasks} mask columns); ids must index the mask columns.",
    )
    counts = task_counts(task_ids, num_tasks)
    if nonempty:
        error_if(
            counts,
            counts == 0,
            f"{{count}} of the K={num_tasks} tasks have no examples in `{name}`; every mask "
            "column needs at least one training example (drop the empty tasks from the masks).",
        )
    return task_ids, counts


def task_counts(task_ids: jax.Array, num_tasks: int, dtype: Any = jnp.int32) -> jax.Array:
    """Examples per task ``[K]`` from task ids ``[n]`` (ids outside ``0..K-1`` are not counted).

    A comparison reduced over the example axis rather than a scatter-add: the scatter fails
    under ``jit`` when ``task_ids`` is sharded over a mesh axis (jax 0.10), while the reduction
    stays local to each shard and XLA fuses it (no ``[n, K]`` array is materialized).
    """
    hits = task_ids[:, None] == jnp.arange(num_tasks, dtype=task_ids.dtype)[None, :]
    return jnp.sum(hits, axis=0, dtype=dtype)


def num_examples(tree: Any, name: str = "inputs", allow_empty: bool = False) -> int:
    """The shared leading (example) axis ``n`` of every leaf of a pytree of arrays.

    Raises ``ValueError`` when the tree has no leaves, a leaf is a scalar, the leaves disagree
    on ``n``, or ``n == 0`` (unless ``allow_empty``).
    """
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        raise ValueError(
            f"`{name}` has no array leaves; pass arrays with a leading example axis [n, ...]."
        )
    sizes = set()
    for leaf in leaves:
        shape = np.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"`{name}` leaves must have a leading example axis [n, ...], got a scalar leaf."
            )
        sizes.add(shape[0])
    if len(sizes) != 1:
        raise ValueError(
            f"`{name}` leaves must share the leading example axis n, got sizes {sorted(sizes)}."
        )
    (n,) = sizes
    if n == 0 and not allow_empty:
        raise ValueError(f"`{name}` has no examples (leading axis of size 0).")
    return int(n)


def check_count(value: Any, name: str, minimum: int = 1) -> int:
    """A Python int ``>= minimum`` (a static size or count), else ``TypeError``/``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be a Python int, got {type(value).__name__} ({value!r}).")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
    return int(value)


def check_key(key: Any, name: str = "key") -> jax.Array:
    """A single typed PRNG key (``jax.random.key(seed)``), else ``TypeError``/``ValueError``."""
    if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
        raise TypeError(
            f"`{name}` must be a typed PRNG key from `jax.random.key(seed)` "
            f"(got {type(key).__name__} with dtype {getattr(key, 'dtype', None)})."
        )
    if key.shape != ():
        raise ValueError(
            f"`{name}` must be a single key (shape ()), got shape {key.shape}; "
            "vmap over a batch of keys instead."
        )
    return key
