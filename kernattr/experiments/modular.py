"""Modular-arithmetic data grouped into tasks: the paper's main experiment.

Every pair ``(x, y)`` of ``Z_p × Z_p`` is one example, labelled by one of three rules:

* ``"addition"``:  ``(x + y) mod p`` (``C = p`` classes);
* ``"quadratic"``: ``(x² + xy + y²) mod p`` (``C = p``);
* ``"xor"``:       ``a(x) ⊕ b(y)``, the bitwise XOR of two secret codes ``a, b: Z_p -> {0..2^B-1}``
  (injective, drawn from the seed; ``C = 2^B ≥ p``). Knowing ``a(x)`` alone says nothing about
  the answer (every value of ``b(y)`` is as likely), so a pair is only predictable when both the
  code of ``x`` (learned from examples sharing ``x``) and the code of ``y`` are learned: two
  groups of data only help *together*. Its defining identity,
  ``c(x,y) ⊕ c(x',y) ⊕ c(x,y') ⊕ c(x',y') = 0``, holds for all pairs.

The ``p × p`` grid is cut into ``r × c = K`` blocks (rows of ``x``, columns of ``y``); block
``(i, j)`` is task ``i·c + j``. A random set of ``T`` pairs is held out as the targets; of the
rest, a ``train_fraction`` is the training set (each training pair carries its block's task id).
An example is ``[x, y, EQ, label]`` (``EQ = p`` is the "=" token), as consumed by
:func:`kernattr.adapters.answer_fn`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

TASKS = ("addition", "quadratic", "xor")


class ModularData(NamedTuple):
    """A modular-arithmetic attribution problem (numpy arrays).

    Attributes:
      train_inputs: ``[n, 4]`` int32 examples ``[x, y, EQ, label]`` of the training set.
      train_labels: ``[n]`` int32 answer classes.
      task_ids: ``[n]`` int32 task (grid block) of each training example, ``0..K-1``.
      target_inputs: ``[T, 4]`` held-out examples (the targets).
      target_labels: ``[T]`` their classes.
      target_task_ids: ``[T]`` the block each target lies in (for plots; targets are not trained on).
      num_classes: ``C``.
      vocab_size: number of input token ids (``p + 1``).
      grid: ``(r, c)`` blocks along ``x`` and ``y`` (``r·c = K``).
    """

    train_inputs: np.ndarray
    train_labels: np.ndarray
    task_ids: np.ndarray
    target_inputs: np.ndarray
    target_labels: np.ndarray
    target_task_ids: np.ndarray
    num_classes: int
    vocab_size: int
    grid: tuple


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % q for q in range(2, int(math.isqrt(p)) + 1))


def grid_shape(num_tasks: int) -> tuple[int, int]:
    """The most square ``(r, c)`` with ``r·c = K`` and ``r <= c``."""
    r = int(math.isqrt(num_tasks))
    while num_tasks % r:
        r -= 1
    return r, num_tasks // r


def xor_codes(p: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Two injective codes ``a, b: Z_p -> {0..C-1}`` with ``C = 2^ceil(log2 p)``."""
    num_classes = 1 << max(1, math.ceil(math.log2(p)))
    rng = np.random.default_rng([seed, 7919])
    a = rng.permutation(num_classes)[:p]
    b = rng.permutation(num_classes)[:p]
    return a.astype(np.int64), b.astype(np.int64), num_classes


def modular_labels(task: str, p: int, x: np.ndarray, y: np.ndarray, *, seed: int = 0):
    """Answer classes of pairs ``(x, y)`` under ``task``; returns ``(labels, num_classes)``.

    >>> modular_labels("quadratic", 7, np.array([2]), np.array([3]))[0]
    array([5])
    """
    x = np.asarray(x, np.int64)
    y = np.asarray(y, np.int64)
    if task == "addition":
        return (x + y) % p, p
    if task == "quadratic":
        return (x * x + x * y + y * y) % p, p
    if task == "xor":
        a, b, c = xor_codes(p, seed)
        return a[x] ^ b[y], c
    raise ValueError(f"`task` must be one of {TASKS}, got {task!r}.")


def make_modular_data(
    *,
    task: str = "quadratic",
    p: int = 23,
    num_tasks: int = 25,
    num_targets: int = 64,
    train_fraction: float = 1.0,
    seed: int = 0,
) -> ModularData:
    """Build the grid, its labels, the ``K`` block tasks, and ``T`` held-out target pairs.

    Args:
      task: ``"addition"``, ``"quadratic"`` or ``"xor"`` (see the module docstring).
      p: a prime modulus.
      num_tasks: ``K`` blocks of the grid (``r × c`` with ``r·c = K``, as square as possible).
      num_targets: ``T`` pairs held out as targets.
      train_fraction: fraction of the remaining pairs used for training (in ``(0, 1]``).
      seed: everything random (targets, training subset, XOR codes) follows from it.

    Returns:
      A :class:`ModularData`.

    >>> data = make_modular_data(task="addition", p=7, num_tasks=4, num_targets=5)
    >>> data.train_inputs.shape, data.target_inputs.shape, int(data.task_ids.max()) + 1
    ((44, 4), (5, 4), 4)
    """
    if task not in TASKS:
        raise ValueError(f"`task` must be one of {TASKS}, got {task!r}.")
    if not _is_prime(int(p)):
        raise ValueError(f"`p` must be a prime, got {p}.")
    r, c = grid_shape(int(num_tasks))
    if r > p or c > p:
        raise ValueError(f"`num_tasks`={num_tasks} needs a {r}x{c} grid of blocks, more than p={p}.")
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"`train_fraction` must be in (0, 1], got {train_fraction}.")
    n_all = p * p
    if not 0 < num_targets < n_all:
        raise ValueError(f"`num_targets` must be in 1..{n_all - 1}, got {num_targets}.")
    xs, ys = np.divmod(np.arange(n_all), p)
    labels, num_classes = modular_labels(task, p, xs, ys, seed=seed)
    tasks = (xs * r // p) * c + (ys * c // p)
    rng = np.random.default_rng([seed, 104729])
    order = rng.permutation(n_all)
    target_idx = np.sort(order[:num_targets])
    rest = order[num_targets:]
    n_train = max(1, int(round(train_fraction * rest.size)))
    train_idx = np.sort(rest[:n_train])
    missing = np.setdiff1d(np.arange(num_tasks), tasks[train_idx])
    if missing.size:
        raise ValueError(
            f"tasks {missing.tolist()} have no training examples; lower `num_targets`/`num_tasks` "
            "or raise `train_fraction`."
        )
    eq = np.full(n_all, p)
    examples = np.stack([xs, ys, eq, labels], axis=1).astype(np.int32)
    return ModularData(
        train_inputs=examples[train_idx],
        train_labels=labels[train_idx].astype(np.int32),
        task_ids=tasks[train_idx].astype(np.int32),
        target_inputs=examples[target_idx],
        target_labels=labels[target_idx].astype(np.int32),
        target_task_ids=tasks[target_idx].astype(np.int32),
        num_classes=int(num_classes),
        vocab_size=int(p) + 1,
        grid=(r, c),
    )
