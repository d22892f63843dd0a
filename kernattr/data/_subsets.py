"""Subset masks: random sampling, leave-one-out and leave-two-out masks.

A subset of the ``K`` tasks is a float 0/1 vector (a *mask*); ``m`` of them stack into ``[m, K]``.
Everything here is pure; the sizes (``num_tasks``, ``num_subsets``, ``size``) are Python ints
(they fix output shapes), so ``jax.jit`` needs them static, e.g.
``jax.jit(sample_subsets, static_argnames=("num_tasks", "num_subsets", "size"))``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._checks import check_count, check_key, is_concrete

__all__ = ["PairMasks", "leave_one_out_masks", "pair_masks", "sample_subsets"]


def sample_subsets(
    key: jax.Array,
    *,
    num_tasks: int,
    num_subsets: int,
    p: float | jax.Array | None = None,
    size: int | None = None,
    dtype: Any = None,
) -> jax.Array:
    """Random subset masks: Bernoulli(``p``) per task, or exactly ``size`` tasks per mask.

    With ``p``, each task is kept independently with probability ``p`` (masks may be empty when
    ``p < 1``). With ``size``, every mask keeps exactly ``size`` tasks, uniformly over all
    ``C(K, size)`` subsets of that size (the kept tasks are those of smallest rank under an
    independent uniform random permutation per row). Exactly one of ``p`` / ``size`` is given.
    The result depends only on ``key`` and the arguments.

    Args:
      key: typed PRNG key (``jax.random.key(seed)``).
      num_tasks: ``K``, number of tasks (Python int >= 1).
      num_subsets: ``m``, number of masks (Python int >= 1).
      p: keep probability in ``(0, 1]`` (float, or a scalar array, which may be traced).
      size: number of tasks per mask, ``0 < size <= K`` (Python int).
      dtype: float dtype of the masks (default: JAX's default float dtype).

    Returns:
      ``[m, K]`` float array of 0/1.

    Example:
      >>> import jax, kernattr as ka
      >>> masks = ka.sample_subsets(jax.random.key(0), num_tasks=5, num_subsets=3, size=2)
      >>> masks.shape, masks.sum(axis=1).tolist()
      ((3, 5), [2.0, 2.0, 2.0])
    """
    check_key(key)
    num_tasks = check_count(num_tasks, "num_tasks")
    num_subsets = check_count(num_subsets, "num_subsets")
    dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"`dtype` must be a floating dtype, got {dtype}.")
    if (p is None) == (size is None):
        raise ValueError("Give exactly one of `p` (keep probability) and `size` (tasks per mask).")
    shape = (num_subsets, num_tasks)
    if p is not None:
        if isinstance(p, (str, bytes)):
            raise TypeError(f"`p` must be a float in (0, 1], got {p!r}.")
        p_arr = jnp.asarray(p)
        if p_arr.ndim != 0:
            raise ValueError(f"`p` must be a scalar, got shape {p_arr.shape}.")
        if is_concrete(p_arr):
            pv = float(p_arr)
            if not (0.0 < pv <= 1.0):
                raise ValueError(f"`p` must be in (0, 1], got {pv}.")
        return jax.random.bernoulli(key, p_arr, shape).astype(dtype)
    size = check_count(size, "size")
    if size > num_tasks:
        raise ValueError(f"`size` must be <= num_tasks={num_tasks}, got {size}.")
    u = jax.random.uniform(key, shape)
    ranks = jnp.argsort(jnp.argsort(u, axis=1), axis=1)
    return (ranks < size).astype(dtype)


def leave_one_out_masks(num_tasks: int, *, dtype: Any = None) -> jax.Array:
    """Masks that drop one task each: ``1 - I``.

    Args:
      num_tasks: ``K`` (Python int >= 1).
      dtype: float dtype (default: JAX's default float dtype, float32 unless x64 is enabled).

    Returns:
      ``[K, K]`` float 0/1 array; row ``k`` has a 0 at column ``k`` and 1 elsewhere.

    Example:
      >>> import kernattr as ka
      >>> ka.leave_one_out_masks(3).tolist()
      [[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]]
    """
    num_tasks = check_count(num_tasks, "num_tasks")
    dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
    return jnp.ones((num_tasks, num_tasks), dtype) - jnp.eye(num_tasks, dtype=dtype)


class PairMasks(NamedTuple):
    """Leave-two-out masks.

    Attributes:
      masks: ``[P, K]`` float 0/1, ``P = K (K - 1) / 2``; row ``r`` drops tasks ``pairs[r]``.
      pairs: ``[P, 2]`` int32 task indices ``(i, j)`` with ``i < j``, in lexicographic order.
    """

    masks: jax.Array
    pairs: jax.Array


def pair_masks(num_tasks: int, *, dtype: Any = None) -> PairMasks:
    """All masks that drop exactly two tasks (for pairwise-interaction ground truth).

    Args:
      num_tasks: ``K`` (Python int >= 2).
      dtype: float dtype of the masks (default: JAX's default float dtype).

    Returns:
      :class:`PairMasks` with ``masks [K(K-1)/2, K]`` and ``pairs [K(K-1)/2, 2]``.

    Example:
      >>> import kernattr as ka
      >>> pm = ka.pair_masks(3)
      >>> pm.pairs.tolist(), pm.masks.tolist()
      ([[0, 1], [0, 2], [1, 2]], [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    """
    num_tasks = check_count(num_tasks, "num_tasks", minimum=2)
    dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
    i, j = np.triu_indices(num_tasks, k=1)
    masks = np.ones((i.shape[0], num_tasks))
    rows = np.arange(i.shape[0])
    masks[rows, i] = 0.0
    masks[rows, j] = 0.0
    pairs = np.stack([i, j], axis=1).astype(np.int32)
    return PairMasks(masks=jnp.asarray(masks, dtype), pairs=jnp.asarray(pairs))
