"""Synthetic task games: known ground truth for tests, benchmarks and examples.

A game maps a subset mask ``s ∈ {0,1}^K`` to ``T`` target values. The games here are quadratic
pseudo-boolean functions::

    F(s)[t] = bias[t] + Σ_k linear[k, t] s_k + Σ_{i<j} quadratic[i, j, t] s_i s_j (+ noise)

``kind="additive"`` has no pairwise term (a linear surrogate is exact). ``kind="interaction"``
gives every target a random sparse set of interacting task pairs, half *XOR-like* (either task
alone helps, both together cancel: ``c (s_i + s_j - 2 s_i s_j)``) and half *antagonistic* (each
helps alone, together they hurt: ``c (s_i + s_j - 3 s_i s_j)``), on top of dense first-order
effects.

Scale (so figures do not depend on arbitrary units): under Bernoulli(1/2) masks, write
``z_k = s_k - 1/2``; then ``F`` has a first-order part ``Σ a_k z_k`` (variance ``Σ a_k²/4``) and a
pure second-order part ``Σ q_ij z_i z_j`` (variance ``Σ q_ij²/16``), which no linear surrogate can
represent. The pair strengths are scaled per target so the second-order part is exactly
``interaction_share`` of the signal variance, and the first-order part the rest, with the total
signal variance 1. ``noise`` is the standard deviation of Gaussian noise added per evaluation,
relative to that (unit) signal standard deviation.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._checks import check_count, check_key, check_masks
from ._subsets import sample_subsets

__all__ = ["GAME_KINDS", "SyntheticGame", "example_data", "synthetic_game"]

GAME_KINDS = ("additive", "interaction")


class SyntheticGame(NamedTuple):
    """A quadratic task game with ``K`` tasks and ``T`` targets (a pytree).

    Attributes:
      bias: ``[T]`` value of the empty subset.
      linear: ``[K, T]`` first-order coefficients (on ``s``, not on ``s - 1/2``).
      quadratic: ``[K, K, T]`` pair coefficients, strictly upper triangular (``i < j``).
      noise: scalar, standard deviation of the Gaussian noise added by :meth:`evaluate` when
        it is given a key.
    """

    bias: jax.Array
    linear: jax.Array
    quadratic: jax.Array
    noise: jax.Array

    def evaluate(self, masks: Any, key: jax.Array | None = None) -> jax.Array:
        """Game values of ``masks``.

        Args:
          masks: ``[m, K]`` 0/1 subset masks.
          key: optional typed key; when given, adds ``N(0, noise²)`` noise per entry.

        Returns:
          ``[m, T]`` values (noise-free without a key).

        Example:
          >>> import jax, kernattr as ka
          >>> game = ka.synthetic_game(jax.random.key(0), num_tasks=4, num_targets=2)
          >>> game.evaluate(ka.leave_one_out_masks(4)).shape
          (4, 2)
        """
        masks = check_masks(masks, "masks", num_tasks=self.linear.shape[0])
        masks = masks.astype(self.linear.dtype)
        values = (
            self.bias[None, :]
            + masks @ self.linear
            + jnp.einsum("mi,ijt,mj->mt", masks, self.quadratic, masks)
        )
        if key is not None:
            check_key(key)
            values = values + self.noise * jax.random.normal(key, values.shape, values.dtype)
        return values


def synthetic_game(
    key: jax.Array,
    *,
    num_tasks: int,
    num_targets: int = 1,
    kind: str = "interaction",
    noise: float = 0.1,
    num_pairs: int = 6,
    interaction_share: float = 0.5,
    dtype: Any = None,
) -> SyntheticGame:
    """Random synthetic task game (see the module docstring for the exact model).

    Args:
      key: typed PRNG key; the game is a deterministic function of it and the arguments.
      num_tasks: ``K`` (Python int >= 2).
      num_targets: ``T`` (Python int >= 1); each target draws its own coefficients and pairs.
      kind: ``"additive"`` (first-order effects only) or ``"interaction"`` (plus XOR-like and
        antagonistic pairs).
      noise: noise standard deviation relative to the unit signal standard deviation (>= 0).
      num_pairs: interacting pairs per target (``"interaction"`` only); half XOR-like, half
        antagonistic (XOR-like gets the odd one). At most ``K (K - 1) / 2``.
      interaction_share: fraction in ``[0, 1)`` of the signal variance (under Bernoulli(1/2)
        masks) carried by the pure pairwise part (``"interaction"`` only).
      dtype: float dtype of the coefficients (default: JAX's default float dtype).

    Returns:
      :class:`SyntheticGame`; call ``game.evaluate(masks, key)``.

    Example:
      >>> import jax, kernattr as ka
      >>> game = ka.synthetic_game(jax.random.key(0), num_tasks=10, num_targets=3, noise=0.0)
      >>> masks = ka.sample_subsets(jax.random.key(1), num_tasks=10, num_subsets=5, p=0.5)
      >>> game.evaluate(masks).shape
      (5, 3)
    """
    check_key(key)
    num_tasks = check_count(num_tasks, "num_tasks", minimum=2)
    num_targets = check_count(num_targets, "num_targets")
    if kind not in GAME_KINDS:
        raise ValueError(f"`kind` must be one of {GAME_KINDS}, got {kind!r}.")
    if not (isinstance(noise, (int, float)) and np.isfinite(noise) and noise >= 0):
        raise ValueError(f"`noise` must be a finite float >= 0, got {noise!r}.")
    if not (isinstance(interaction_share, (int, float)) and 0 <= interaction_share < 1):
        raise ValueError(f"`interaction_share` must be in [0, 1), got {interaction_share!r}.")
    num_pairs = check_count(num_pairs, "num_pairs")
    max_pairs = num_tasks * (num_tasks - 1) // 2
    if num_pairs > max_pairs:
        raise ValueError(f"`num_pairs` must be <= K(K-1)/2 = {max_pairs}, got {num_pairs}.")
    dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
    K, T = num_tasks, num_targets

    k_bias, k_lin, k_pairs, k_str = jax.random.split(key, 4)
    bias = jax.random.normal(k_bias, (T,), dtype)
    lin = jax.random.normal(k_lin, (K, T), dtype)  # first-order, on z = s - 1/2 scale

    share = float(interaction_share) if kind == "interaction" else 0.0
    iu, ju = np.triu_indices(K, k=1)
    if share > 0:
        # Per target: num_pairs distinct pairs, uniformly among all K(K-1)/2.
        scores = jax.random.uniform(k_pairs, (T, max_pairs))
        chosen = jnp.argsort(scores, axis=1)[:, :num_pairs]  # [T, P]
        strength = 0.5 + jax.random.uniform(k_str, (T, num_pairs), dtype)  # in [0.5, 1.5)
        n_xor = (num_pairs + 1) // 2
        is_xor = jnp.arange(num_pairs) < n_xor  # [P]
        # XOR-like: c(s_i + s_j - 2 s_i s_j); antagonistic: c(s_i + s_j - 3 s_i s_j).
        q_pair = -strength * jnp.where(is_xor, 2.0, 3.0).astype(dtype)[None, :]  # [T, P]
        l_pair = strength  # on s_i and on s_j
        pi = jnp.asarray(iu)[chosen]  # [T, P]
        pj = jnp.asarray(ju)[chosen]
        t_idx = jnp.broadcast_to(jnp.arange(T)[:, None], pi.shape)
        quad = jnp.zeros((K, K, T), dtype).at[pi, pj, t_idx].add(q_pair)
        pair_lin = (
            jnp.zeros((K, T), dtype).at[pi, t_idx].add(l_pair).at[pj, t_idx].add(l_pair)
        )
    else:
        quad = jnp.zeros((K, K, T), dtype)
        pair_lin = jnp.zeros((K, T), dtype)

    # Decompose into z = s - 1/2 coordinates: first-order a = lin_s + 0.5 * Σ_j (q_ij + q_ji).
    qsym = quad + jnp.swapaxes(quad, 0, 1)
    pair_first = pair_lin + 0.5 * jnp.sum(qsym, axis=1)  # first-order part of the pair terms
    var_q = jnp.sum(quad**2, axis=(0, 1)) / 16.0  # [T]
    var_lin = jnp.sum(lin**2, axis=0) / 4.0
    # Scale: pure second-order variance = share, first-order part (random + pair-induced) = 1-share.
    if share > 0:
        c = jnp.sqrt(share / var_q)  # scales all pair terms
        pair_first_c = pair_first * c[None, :]
        # Choose b >= 0 so that Σ (b lin + pair_first_c)² / 4 = 1 - share.
        A = var_lin
        B = jnp.sum(lin * pair_first_c, axis=0) / 4.0
        C = jnp.sum(pair_first_c**2, axis=0) / 4.0 - (1.0 - share)
        disc = jnp.maximum(B**2 - A * C, 0.0)
        b = (-B + jnp.sqrt(disc)) / A
        first = b[None, :] * lin + pair_first_c
        quad = quad * c[None, None, :]
    else:
        first = lin / jnp.sqrt(var_lin)[None, :]
    # Back to s-coordinates: linear_s = first - 0.5 Σ_j qsym_ij; bias absorbs constants so that
    # E[F] under Bernoulli(1/2) equals `bias`.
    qsym = quad + jnp.swapaxes(quad, 0, 1)
    linear = first - 0.5 * jnp.sum(qsym, axis=1)
    const = 0.5 * jnp.sum(linear, axis=0) + 0.25 * jnp.sum(quad, axis=(0, 1))
    return SyntheticGame(
        bias=bias - const,
        linear=linear,
        quadratic=quad,
        noise=jnp.asarray(noise, dtype),
    )


def example_data(
    seed: int = 0,
    *,
    num_tasks: int = 20,
    num_targets: int = 8,
    num_train: int = 500,
    num_test: int = 200,
    kind: str = "interaction",
    noise: float = 0.1,
) -> dict:
    """The data behind the built-in example (``kernattr/data/example_game.json``), regenerated.

    Bernoulli(1/2) masks from a :func:`synthetic_game`, as plain Python lists in the JSON layout
    read by :func:`kernattr.load_subsets` (``format="json"``): ``train_w [m, K]``,
    ``train_subset_scores [m, T]``, ``test_w``, ``test_subset_scores``, plus a ``meta`` dict.

    Args:
      seed: integer seed for everything.
      num_tasks, num_targets, num_train, num_test, kind, noise: see :func:`synthetic_game`.

    Returns:
      A JSON-serialisable dict.

    Example:
      >>> from kernattr.data._games import example_data
      >>> d = example_data(num_train=10, num_test=4)
      >>> len(d["train_w"]), len(d["test_subset_scores"][0])
      (10, 8)
    """
    key = jax.random.key(seed)
    k_game, k_tr, k_te, k_ntr, k_nte = jax.random.split(key, 5)
    game = synthetic_game(
        k_game, num_tasks=num_tasks, num_targets=num_targets, kind=kind, noise=noise
    )
    tr = sample_subsets(k_tr, num_tasks=num_tasks, num_subsets=num_train, p=0.5)
    te = sample_subsets(k_te, num_tasks=num_tasks, num_subsets=num_test, p=0.5)
    y_tr = game.evaluate(tr, k_ntr)
    y_te = game.evaluate(te, k_nte)

    def _lst(x, integer=False):
        x = np.asarray(x)
        return x.astype(int).tolist() if integer else np.round(x.astype(float), 6).tolist()

    return {
        "meta": {
            "description": "kernattr built-in example: synthetic task game with XOR-like and "
            "antagonistic task pairs (kernattr._games.synthetic_game), Bernoulli(1/2) masks.",
            "seed": seed,
            "num_tasks": num_tasks,
            "num_targets": num_targets,
            "kind": kind,
            "noise": noise,
            "generator": "python benchmarks/make_example_data.py",
        },
        "train_w": _lst(tr, integer=True),
        "train_subset_scores": _lst(y_tr),
        "test_w": _lst(te, integer=True),
        "test_subset_scores": _lst(y_te),
    }
