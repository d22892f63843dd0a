"""Soft actor-critic models in Flax NNX, as pure functions, and their attribution adapters.

Models: a task-conditioned tanh-Gaussian :class:`Actor` and :class:`TwinCritic` (two Q heads).
:func:`make_sac` splits them into graph definitions (:class:`SAC`, static) and a parameter
pytree (:class:`SACParams`: actor, critic, target critic, log temperature), so every function
of them is pure and ``jit``/``vmap``-compatible. The training algorithm built on them (TD
targets, losses, the vmappable train step) is an experiment's: :mod:`kernattr.experiments.sac`.

Adapters (:func:`sac_output_fn`): one scalar per example as ``apply_fn(params, example)`` over
a chosen subset of parameters (``filter``), ready for :func:`kernattr.gradient_features`:
``"q"`` (twin-Q mean), ``"log_prob"`` (actor log-probability of an action), ``"actor_mean"``
(pre-tanh mean along one action dimension), ``"critic_loss"`` and ``"actor_loss"`` (per
transition). An example is one flat vector laid out by :func:`pack_examples`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import _checks

LOG_STD_MIN = -5.0
LOG_STD_MAX = 1.0
OUTPUTS = ("q", "log_prob", "actor_mean", "critic_loss", "actor_loss")
FILTERS = ("all", "actor", "critic", "last")
_EPS = 1e-6


# ----------------------------------------------------------------------------- modules


def _mlp(sizes: Sequence[int], rngs: nnx.Rngs) -> nnx.List:
    return nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])


class Actor(nnx.Module):
    """Task-conditioned tanh-Gaussian policy ``π(a | s, task)``.

    Input ``concat(obs, task)`` through ``relu`` hidden layers; two heads give the pre-tanh mean
    and the log standard deviation (squashed into ``[LOG_STD_MIN, LOG_STD_MAX]``).

    Call: ``obs [B, O]``, ``task [B, Z]`` -> ``(mean [B, A], log_std [B, A])``.

    >>> actor = Actor(3, 2, 1, hidden=(8,), rngs=nnx.Rngs(0))
    >>> [x.shape for x in actor(jnp.ones((4, 3)), jnp.ones((4, 2)))]
    [(4, 1), (4, 1)]
    """

    def __init__(self, obs_dim: int, task_dim: int, act_dim: int, *,
                 hidden: Sequence[int] = (64, 64), rngs: nnx.Rngs):
        self.hidden = _mlp((obs_dim + task_dim, *hidden), rngs)
        self.mean_head = nnx.Linear(hidden[-1], act_dim, rngs=rngs)
        self.log_std_head = nnx.Linear(hidden[-1], act_dim, rngs=rngs)

    def __call__(self, obs: jax.Array, task: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = jnp.concatenate([obs, task], axis=-1)
        for layer in self.hidden:
            h = jax.nn.relu(layer(h))
        log_std = jnp.tanh(self.log_std_head(h))
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (log_std + 1.0)
        return self.mean_head(h), log_std


class TwinCritic(nnx.Module):
    """Two independent Q networks ``Q_j(s, task, a)``, ``j = 1, 2`` (clipped double Q).

    Call: ``obs [B, O]``, ``task [B, Z]``, ``action [B, A]`` -> ``[B, 2]``.

    >>> critic = TwinCritic(3, 2, 1, hidden=(8,), rngs=nnx.Rngs(0))
    >>> critic(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.ones((4, 1))).shape
    (4, 2)
    """

    def __init__(self, obs_dim: int, task_dim: int, act_dim: int, *,
                 hidden: Sequence[int] = (64, 64), rngs: nnx.Rngs):
        sizes = (obs_dim + task_dim + act_dim, *hidden)
        self.q1 = _mlp(sizes, rngs)
        self.q1_out = nnx.Linear(hidden[-1], 1, rngs=rngs)
        self.q2 = _mlp(sizes, rngs)
        self.q2_out = nnx.Linear(hidden[-1], 1, rngs=rngs)

    def __call__(self, obs: jax.Array, task: jax.Array, action: jax.Array) -> jax.Array:
        x = jnp.concatenate([obs, task, action], axis=-1)
        outs = []
        for layers, head in ((self.q1, self.q1_out), (self.q2, self.q2_out)):
            h = x
            for layer in layers:
                h = jax.nn.relu(layer(h))
            outs.append(head(h))
        return jnp.concatenate(outs, axis=-1)


# ----------------------------------------------------------------------------- pure SAC


class SACParams(NamedTuple):
    """All trainable state of a SAC agent (a pytree).

    Attributes:
      actor: actor parameters (``nnx.State``).
      critic: twin-critic parameters (``nnx.State``).
      target_critic: Polyak-averaged copy of ``critic`` (``nnx.State``).
      log_alpha: ``[]`` log of the entropy temperature.
    """

    actor: Any
    critic: Any
    target_critic: Any
    log_alpha: jax.Array


class Batch(NamedTuple):
    """A batch of ``B`` transitions (a pytree).

    Attributes:
      obs: ``[B, O]`` observations. task: ``[B, Z]`` task encodings (one-hot or descriptors).
      action: ``[B, A]`` actions in ``(-1, 1)``. reward: ``[B]``. next_obs: ``[B, O]``.
      done: ``[B]`` 1.0 where the episode terminated (no bootstrap), else 0.0.
    """

    obs: jax.Array
    task: jax.Array
    action: jax.Array
    reward: jax.Array
    next_obs: jax.Array
    done: jax.Array


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class SAC:
    """Static graph definitions and sizes of a SAC agent; methods are pure functions of params.

    Build with :func:`make_sac`. Hashable, so it can be closed over or passed to ``jit``.
    """

    actor_def: Any
    critic_def: Any
    obs_dim: int
    task_dim: int
    act_dim: int

    def actor(self, actor_params, obs: jax.Array, task: jax.Array):
        """``(mean [B, A], log_std [B, A])`` of the pre-tanh Gaussian."""
        return nnx.merge(self.actor_def, actor_params, copy=True)(obs, task)

    def q(self, critic_params, obs: jax.Array, task: jax.Array, action: jax.Array) -> jax.Array:
        """``[B, 2]`` twin Q-values."""
        return nnx.merge(self.critic_def, critic_params, copy=True)(obs, task, action)

    def sample(self, actor_params, key: jax.Array, obs, task) -> tuple[jax.Array, jax.Array]:
        """Reparameterised ``(action [B, A], log_prob [B])``."""
        mean, log_std = self.actor(actor_params, obs, task)
        eps = jax.random.normal(key, mean.shape, mean.dtype)
        return squash(mean, log_std, eps)

    def act(self, actor_params, obs, task) -> jax.Array:
        """Deterministic action ``tanh(mean)`` ``[B, A]`` (evaluation)."""
        return jnp.tanh(self.actor(actor_params, obs, task)[0])

    def check_batch(self, batch: "Batch") -> int:
        """The number ``B`` of transitions in ``batch``, after checking its fields' shapes
        against this agent (``TypeError`` / ``ValueError`` naming the field otherwise)."""
        if not isinstance(batch, Batch):
            raise TypeError(f"`batch` must be a kernattr.adapters.Batch, got {type(batch).__name__}.")
        B = _checks.num_examples(batch, "batch")
        for name, width in (("obs", self.obs_dim), ("task", self.task_dim), ("action", self.act_dim),
                            ("next_obs", self.obs_dim)):
            x = getattr(batch, name)
            if x.ndim != 2 or x.shape[1] != width:
                raise ValueError(f"`batch.{name}` must have shape [B, {width}], got {tuple(x.shape)}.")
        for name in ("reward", "done"):
            if getattr(batch, name).ndim != 1:
                raise ValueError(f"`batch.{name}` must have shape [B], got {getattr(batch, name).shape}.")
        return B

    @staticmethod
    def check_weights(weights: jax.Array, num_transitions: int, *, poison: bool = False) -> jax.Array:
        """``[B]`` float transition weights, checked: the shape at trace time; negative or
        non-finite values raise eagerly, and under ``jit`` either raise when the program runs (a
        host callback) or, with ``poison`` (training loops, where a callback per step is costly),
        make every weight NaN, so that every loss and parameter of the step becomes NaN (never a
        silent number)."""
        weights = _checks.as_float_array(weights, "weights")
        if weights.shape != (num_transitions,):
            raise ValueError(f"`weights` must have shape [B]=({num_transitions},), "
                             f"got {tuple(weights.shape)}.")
        bad = ~jnp.isfinite(weights) | (weights < 0)
        if poison and not _checks.is_concrete(weights):
            return jnp.where(jnp.any(bad), jnp.nan, weights)
        return _checks.error_if(weights, bad, "`weights` has {count} negative or non-finite entries.")


def make_sac(key: jax.Array, *, obs_dim: int, task_dim: int, act_dim: int,
             hidden: Sequence[int] = (64, 64), init_alpha: float = 0.1) -> tuple[SAC, SACParams]:
    """Initialise a task-conditioned SAC agent: static :class:`SAC` and :class:`SACParams`.

    Args:
      key: typed PRNG key.
      obs_dim: ``O``; task_dim: ``Z``; act_dim: ``A``.
      hidden: widths of the hidden layers (actor and each Q network).
      init_alpha: initial entropy temperature (``> 0``).

    Returns:
      ``(sac, params)``; the target critic starts equal to the critic.

    >>> sac, params = make_sac(jax.random.key(0), obs_dim=3, task_dim=2, act_dim=1, hidden=(8,))
    >>> sac.q(params.critic, jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.ones((4, 1))).shape
    (4, 2)
    """
    _checks.check_key(key)
    for name, v in (("obs_dim", obs_dim), ("task_dim", task_dim), ("act_dim", act_dim)):
        _checks.check_count(v, name, minimum=0 if name == "task_dim" else 1)
    if not hidden or any(int(h) < 1 for h in hidden):
        raise ValueError(f"`hidden` must be a non-empty sequence of positive widths, got {hidden!r}.")
    if not (np.isfinite(init_alpha) and init_alpha > 0):
        raise ValueError(f"`init_alpha` must be a finite float > 0, got {init_alpha!r}.")
    ka, kc = jax.random.split(key)
    actor = Actor(obs_dim, task_dim, act_dim, hidden=tuple(hidden),
                  rngs=nnx.Rngs(params=ka))
    critic = TwinCritic(obs_dim, task_dim, act_dim, hidden=tuple(hidden),
                        rngs=nnx.Rngs(params=kc))
    actor_def, actor_params = nnx.split(actor, nnx.Param)
    critic_def, critic_params = nnx.split(critic, nnx.Param)
    sac = SAC(actor_def, critic_def, int(obs_dim), int(task_dim), int(act_dim))
    params = SACParams(actor_params, critic_params, jax.tree.map(jnp.array, critic_params),
                       jnp.asarray(np.log(init_alpha), jnp.float32))
    return sac, params


def squash(mean: jax.Array, log_std: jax.Array, eps: jax.Array) -> tuple[jax.Array, jax.Array]:
    """tanh-Gaussian sample ``a = tanh(mean + σ eps)`` and its log-density ``[...]``.

    ``log π(a) = Σ_j [log N(u_j; mean_j, σ_j) − log(1 − tanh(u_j)²)]`` with
    ``u = mean + σ eps``; the Jacobian term is written as ``2(log 2 − u − softplus(−2u))``
    (stable for large ``|u|``).

    >>> a, lp = squash(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2))
    >>> a.tolist(), round(float(lp), 4)
    ([0.0, 0.0], -1.8379)
    """
    u = mean + jnp.exp(log_std) * eps
    return jnp.tanh(u), _tanh_gaussian_logpdf(u, mean, log_std)


def _tanh_gaussian_logpdf(u, mean, log_std):
    z = (u - mean) * jnp.exp(-log_std)
    normal = -0.5 * z**2 - log_std - 0.5 * np.log(2 * np.pi)
    jac = 2.0 * (np.log(2.0) - u - jax.nn.softplus(-2.0 * u))
    return jnp.sum(normal - jac, axis=-1)


def tanh_gaussian_log_prob(mean: jax.Array, log_std: jax.Array, action: jax.Array) -> jax.Array:
    """Log-density of ``action`` (in ``(-1, 1)``, clipped to ``±(1 − 1e-6)``) under tanh-Gaussian.

    Args:
      mean, log_std, action: ``[..., A]``.

    Returns:
      ``[...]`` log-probabilities (sum over the action dimensions).

    >>> round(float(tanh_gaussian_log_prob(jnp.zeros(1), jnp.zeros(1), jnp.zeros(1))), 4)
    -0.9189
    """
    a = jnp.clip(action, -1.0 + _EPS, 1.0 - _EPS)
    return _tanh_gaussian_logpdf(jnp.arctanh(a), mean, log_std)


# ----------------------------------------------------------------------------- adapters


def pack_examples(batch: Batch, *, output: str, td_target: jax.Array | None = None,
                  noise: jax.Array | None = None) -> jax.Array:
    """Flat per-example inputs ``[n, E]`` for the adapters of :func:`sac_output_fn`.

    Layouts (``O``, ``Z``, ``A`` = obs, task, action widths):
    ``"q"``, ``"log_prob"``: ``[obs, task, action]``;
    ``"actor_mean"``: ``[obs, task, e_j]`` with one row per transition AND action dimension
    ``j`` (``n = B·A``, transition-major), ``e_j`` the one-hot of ``j``;
    ``"critic_loss"``: ``[obs, task, action, y]`` (``td_target [B]`` required);
    ``"actor_loss"``: ``[obs, task, eps]`` (``noise [B, A]`` required, the reparameterisation).

    >>> b = Batch(jnp.ones((3, 2)), jnp.ones((3, 1)), jnp.zeros((3, 2)), jnp.ones(3),
    ...           jnp.ones((3, 2)), jnp.zeros(3))
    >>> pack_examples(b, output="actor_mean").shape
    (6, 5)
    """
    if output not in OUTPUTS:
        raise ValueError(f"`output` must be one of {OUTPUTS}, got {output!r}.")
    base = jnp.concatenate([batch.obs, batch.task], axis=-1)
    if output in ("q", "log_prob"):
        return jnp.concatenate([base, batch.action], axis=-1)
    if output == "actor_mean":
        B, A = batch.action.shape
        onehot = jnp.tile(jnp.eye(A, dtype=base.dtype), (B, 1))
        return jnp.concatenate([jnp.repeat(base, A, axis=0), onehot], axis=-1)
    if output == "critic_loss":
        if td_target is None:
            raise ValueError("`td_target` [B] is required for output='critic_loss' (td_targets).")
        return jnp.concatenate([base, batch.action, jnp.asarray(td_target)[:, None]], axis=-1)
    if noise is None:
        raise ValueError("`noise` [B, A] is required for output='actor_loss'.")
    return jnp.concatenate([base, noise], axis=-1)


def actor_mean_labels(batch: Batch) -> jax.Array:
    """``[B·A]`` regression labels ``atanh(a_j)`` matching ``pack_examples(output="actor_mean")``.

    >>> b = Batch(jnp.ones((1, 2)), jnp.ones((1, 1)), jnp.zeros((1, 2)), jnp.ones(1),
    ...           jnp.ones((1, 2)), jnp.zeros(1))
    >>> actor_mean_labels(b).tolist()
    [0.0, 0.0]
    """
    return jnp.arctanh(jnp.clip(batch.action, -1.0 + _EPS, 1.0 - _EPS)).reshape(-1)


def _selected(path: str, filter: str) -> bool:
    if filter == "all":
        return not path.startswith(".target_critic") and not path.startswith(".log_alpha")
    if filter == "actor":
        return path.startswith(".actor")
    if filter == "critic":
        return path.startswith(".critic")
    return ("mean_head" in path or "log_std_head" in path or "q1_out" in path
            or "q2_out" in path) and not path.startswith(".target_critic")


def sac_output_fn(sac: SAC, params: SACParams, *, output: str, filter: str = "all",
                  alpha: float | None = None) -> tuple[Callable, dict]:
    """One scalar output of a SAC agent per example, over a filtered set of parameters.

    Args:
      sac, params: the agent at the checkpoint ``W0``.
      output: ``"q"`` (mean of the twin Q-values), ``"log_prob"`` (actor log-probability of the
        example's action), ``"actor_mean"`` (pre-tanh mean along the example's action dimension),
        ``"critic_loss"`` (``½ Σ_j (Q_j − y)²``), ``"actor_loss"``
        (``α log π(ã|s) − min_j Q_j(s, ã)`` with the example's noise); layouts in
        :func:`pack_examples`.
      filter: which parameters are differentiated: ``"all"`` (actor and critic), ``"actor"``,
        ``"critic"`` or ``"last"`` (the output layers of both). Outputs that do not depend on a
        selected parameter get zero gradients from it.
      alpha: temperature for ``"actor_loss"`` (default ``exp(params.log_alpha)``).

    Returns:
      ``(apply_fn, selected)``: ``apply_fn(selected, example [E]) -> []`` and ``selected`` a flat
      dict (path -> array) of the chosen parameters at ``W0``; the rest is held fixed.

    >>> sac, p = make_sac(jax.random.key(0), obs_dim=2, task_dim=1, act_dim=1, hidden=(4,))
    >>> f, sel = sac_output_fn(sac, p, output="q", filter="critic")
    >>> f(sel, jnp.ones(4)).shape
    ()
    """
    if output not in OUTPUTS:
        raise ValueError(f"`output` must be one of {OUTPUTS}, got {output!r}.")
    if filter not in FILTERS:
        raise ValueError(f"`filter` must be one of {FILTERS}, got {filter!r}.")
    if not isinstance(params, SACParams):
        raise TypeError(f"`params` must be SACParams, got {type(params).__name__}.")
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [jax.tree_util.keystr(p) for p, _ in flat]
    leaves = [leaf for _, leaf in flat]
    chosen = [i for i, p in enumerate(paths) if _selected(p, filter)]
    selected = {paths[i]: leaves[i] for i in chosen}
    if not selected:
        raise ValueError(f"`filter={filter!r}` selects no parameters.")
    O, Z, A = sac.obs_dim, sac.task_dim, sac.act_dim
    width = {"q": O + Z + A, "log_prob": O + Z + A, "actor_mean": O + Z + A,
             "critic_loss": O + Z + A + 1, "actor_loss": O + Z + A}[output]
    fixed_alpha = None if alpha is None else float(alpha)

    def apply_fn(sel: dict, example: jax.Array) -> jax.Array:
        example = jnp.asarray(example)
        if example.ndim != 1 or example.shape[0] != width:
            raise ValueError(f"`example` must be one flat example [{width}] for output={output!r} "
                             f"(see pack_examples), got shape {tuple(example.shape)}.")
        full = list(leaves)
        for i in chosen:
            full[i] = sel[paths[i]]
        p = jax.tree_util.tree_unflatten(treedef, full)
        obs, task = example[None, :O], example[None, O:O + Z]
        rest = example[None, O + Z:]
        if output == "q":
            return jnp.mean(sac.q(p.critic, obs, task, rest[:, :A]))
        if output == "critic_loss":
            q = sac.q(p.critic, obs, task, rest[:, :A])[0]
            return 0.5 * jnp.sum((q - rest[0, A]) ** 2)
        mean, log_std = sac.actor(p.actor, obs, task)
        if output == "log_prob":
            return tanh_gaussian_log_prob(mean, log_std, rest)[0]
        if output == "actor_mean":
            return jnp.sum(mean[0] * rest[0])
        a, lp = squash(mean, log_std, rest)
        al = jnp.exp(p.log_alpha) if fixed_alpha is None else fixed_alpha
        return (al * lp - jnp.min(sac.q(p.critic, obs, task, a), axis=-1))[0]

    return apply_fn, selected
