"""Task families whose interactions are built in: the interaction suite.

Every family is modular arithmetic on the ``p × p`` grid (:mod:`kernattr.experiments.modular`)
with ``K = 2B`` tasks and one designed pair per block, built to interact on that block's targets
(a target should feel its block's designed pair more than any other pair). In
``"redundancy"`` and ``"antagonism"`` the grid has ``B`` blocks: the first ``B`` tasks are the
blocks (their pairs minus the held-out targets), task ``B + b`` is the *partner* of block ``b``,
and the designed pairs are ``(b, B + b)``.

* ``"redundancy"``: the partner is a copy of block ``b`` (same inputs, same labels). Either copy
  teaches the block, so their effects saturate (``F(both) ≈ F(one)``): a strong interaction at
  the high mask densities where a linear surrogate spends its budget.
* ``"antagonism"``: the partner has the same inputs as block ``b`` with labels from a
  conflicting rule (the answer shifted by ``(p - 1) // 2``). The targets follow the block's
  rule, so the partner hurts them, and hurts most when the block is absent.
* ``"xor"`` (complementarity): no partners; ``K = 2B`` blocks of the ``a(x) ⊕ b(y)`` grid
  (:func:`kernattr.experiments.modular.xor_codes`). A target ``(x, y)`` in block ``(i, j)``
  needs the code ``a(x)``, taught by the blocks of its row band ``i``, and ``b(y)``, taught by
  the blocks of its column band ``j``: one without the other predicts nothing. The designed
  pair of block ``(i, j)`` is ``((i, j + 1), (i + 1, j))`` (a row-mate and a column-mate,
  indices mod the grid), designed to interact on that block's targets.
* ``"additive"`` (control): no partners; ``K = 2B`` blocks of the quadratic grid. The designed
  pair of block ``b`` is ``(b, b + B mod 2B)``: the target's own block and a block half the grid
  away, which teaches nothing about it. (Splitting a block's pairs into two tasks is NOT a control:
  the two halves of one region are near-duplicates, and measured they interact like
  ``"redundancy"``.)

The base rule is ``"quadratic"`` (``x² + xy + y²``) except for ``"xor"``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .modular import ModularData, make_modular_data

FAMILIES = ("redundancy", "antagonism", "xor", "additive")


class FamilyData(NamedTuple):
    """A modular problem with designed task pairs.

    Attributes:
      data: the :class:`~kernattr.experiments.modular.ModularData` (``K = 2B`` tasks; its
        ``target_task_ids`` are block ids ``0..B-1``).
      designed_pairs: ``[P, 2]`` int task pairs whose interaction is built in.
      designed_block: ``[P]`` the block (value of ``data.target_task_ids``) whose targets each
        designed pair is built to affect.
      family: the family's name.
    """

    data: ModularData
    designed_pairs: np.ndarray
    designed_block: np.ndarray
    family: str


def make_family_data(
    family: str,
    *,
    p: int = 17,
    num_blocks: int = 12,
    num_targets: int = 48,
    seed: int = 0,
) -> FamilyData:
    """Build a family's training tasks (blocks and partners), targets and designed pairs.

    Args:
      family: one of ``"redundancy"``, ``"antagonism"``, ``"xor"``, ``"additive"``.
      p: a prime modulus.
      num_blocks: ``B`` grid blocks; the problem has ``K = 2B`` tasks.
      num_targets: ``T`` held-out pairs (they follow the base rule).
      seed: targets and codes follow from it.

    Returns:
      A :class:`FamilyData`.

    >>> fam = make_family_data("redundancy", p=7, num_blocks=4, num_targets=5)
    >>> int(fam.data.task_ids.max()) + 1, fam.designed_pairs.tolist()
    (8, [[0, 4], [1, 5], [2, 6], [3, 7]])
    """
    if family not in FAMILIES:
        raise ValueError(f"`family` must be one of {FAMILIES}, got {family!r}.")
    B = int(num_blocks)
    if family in ("xor", "additive"):
        data = make_modular_data(task="xor" if family == "xor" else "quadratic", p=p,
                                 num_tasks=2 * B, num_targets=num_targets, seed=seed)
        r, c = data.grid
        blocks = np.arange(2 * B)
        if family == "xor":
            i, j = np.divmod(blocks, c)
            pairs = np.stack([i * c + (j + 1) % c, ((i + 1) % r) * c + j], axis=1)
        else:
            pairs = np.stack([blocks, (blocks + B) % (2 * B)], axis=1)
        return FamilyData(data, pairs, blocks, family)
    base = make_modular_data(task="quadratic", p=p, num_tasks=B, num_targets=num_targets,
                             seed=seed)
    x, y = base.train_inputs[:, 0], base.train_inputs[:, 1]
    ids = base.task_ids
    eq = np.full_like(x, p)
    if family == "redundancy":
        px, py, plab, pids = x, y, base.train_labels, ids + B
    elif family == "antagonism":
        plab = ((base.train_labels.astype(np.int64) + (p - 1) // 2) % p).astype(np.int32)
        px, py, pids = x, y, ids + B
    partner = np.stack([px, py, eq, plab], axis=1).astype(np.int32)
    data = base._replace(
        train_inputs=np.concatenate([base.train_inputs, partner]),
        train_labels=np.concatenate([base.train_labels, plab.astype(np.int32)]),
        task_ids=np.concatenate([ids, pids]).astype(np.int32),
    )
    return FamilyData(data, _pairs(B), np.arange(B), family)


def _pairs(num_blocks: int) -> np.ndarray:
    b = np.arange(num_blocks)
    return np.stack([b, b + num_blocks], axis=1)


def pair_drop_masks(num_tasks: int, pairs: np.ndarray) -> np.ndarray:
    """``[P, K]`` masks with both tasks of each pair dropped (all other tasks kept).

    >>> pair_drop_masks(3, np.array([[0, 2]])).tolist()
    [[0.0, 1.0, 0.0]]
    """
    pairs = np.asarray(pairs)
    out = np.ones((len(pairs), num_tasks), np.float32)
    out[np.arange(len(pairs)), pairs[:, 0]] = 0.0
    out[np.arange(len(pairs)), pairs[:, 1]] = 0.0
    return out


def second_differences(F_full: np.ndarray, F_loo: np.ndarray, F_pairs: np.ndarray,
                       pairs: np.ndarray) -> np.ndarray:
    """Measured ``F(1) − F(1 − e_i) − F(1 − e_j) + F(1 − e_i − e_j)`` per pair and target.

    Args:
      F_full: ``[T]`` labels of the all-tasks mask.
      F_loo: ``[K, T]`` labels of the leave-one-out masks (row ``k`` drops task ``k``).
      F_pairs: ``[P, T]`` labels of :func:`pair_drop_masks` for ``pairs``.
      pairs: ``[P, 2]`` task pairs.

    Returns:
      ``[P, T]`` second differences (0 for an additive ``F``).

    >>> F = lambda s: s.sum(-1, keepdims=True) + 3.0 * s[..., :1] * s[..., 1:2]
    >>> K, pairs = 3, np.array([[0, 1], [0, 2]])
    >>> loo = F(1 - np.eye(K)); full = F(np.ones(K)); pm = F(pair_drop_masks(K, pairs))
    >>> second_differences(full, loo, pm, pairs)[:, 0].tolist()
    [3.0, 0.0]
    """
    pairs = np.asarray(pairs)
    return (np.asarray(F_full)[None] - F_loo[pairs[:, 0]] - F_loo[pairs[:, 1]]
            + np.asarray(F_pairs))


def other_pairs(num_tasks: int, designed: np.ndarray, num: int, seed: int = 0) -> np.ndarray:
    """``[num, 2]`` random task pairs that are not designed (deterministic from ``seed``).

    >>> other_pairs(4, np.array([[0, 2], [1, 3]]), 2).shape
    (2, 2)
    """
    designed = {tuple(sorted(map(int, q))) for q in np.asarray(designed)}
    cand = [(i, j) for i in range(num_tasks) for j in range(i + 1, num_tasks)
            if (i, j) not in designed]
    rng = np.random.default_rng([seed, 5])
    pick = rng.permutation(len(cand))[: min(num, len(cand))]
    return np.asarray([cand[i] for i in sorted(pick)], np.int64).reshape(-1, 2)


def interaction_report(sd_designed: np.ndarray, sd_other: np.ndarray, designed_block: np.ndarray,
                       target_blocks: np.ndarray) -> dict:
    """Summary of measured second differences: designed pairs (on their own block's targets)
    vs every other (pair, target) entry.

    Args:
      sd_designed: ``[P, T]`` second differences of the designed pairs.
      sd_other: ``[Q, T]`` second differences of non-designed pairs.
      designed_block: ``[P]`` the block each designed pair is built to affect.
      target_blocks: ``[T]`` block id of each target.

    Returns:
      ``{"designed_mean_abs", "other_mean_abs", "ratio", "designed_mean", "num_designed",
      "num_other"}`` (floats / ints).
    """
    own = np.asarray(designed_block)[:, None] == np.asarray(target_blocks)[None, :]  # [B, T]
    d = np.abs(sd_designed[own])
    o = np.abs(np.concatenate([sd_designed[~own], np.asarray(sd_other).reshape(-1)]))
    dm, om = float(np.mean(d)) if d.size else float("nan"), float(np.mean(o))
    return {"designed_mean_abs": dm, "other_mean_abs": om,
            "ratio": dm / om if om > 0 else float("inf"),
            "designed_mean": float(np.mean(sd_designed[own])) if d.size else float("nan"),
            "num_designed": int(d.size), "num_other": int(o.size)}
