"""Soft actor-critic training as pure functions: what trains the agents of the RL experiments.

Built on the SAC models of :mod:`kernattr.adapters` (:func:`~kernattr.adapters.make_sac`):
soft TD targets (:func:`td_targets`), the weighted SAC(+BC) losses (:func:`sac_losses`) and a
pure train step (:func:`make_train_step`). Every function is ``jit``/``vmap``-compatible:
vmapping the step over per-example ``weights`` trains one agent per task subset at once (the
ground truth of task attribution in :mod:`kernattr.experiments.rl`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kernattr.adapters import SAC, Batch, SACParams, actor_mean_labels, make_sac, squash

__all__ = ["TrainState", "make_train_step", "sac_losses", "td_targets"]


class TrainState(NamedTuple):
    """SAC training state (a pytree; vmap it over masks).

    Attributes:
      params: current :class:`SACParams`.
      anchor: :class:`SACParams` the proximal term pulls toward (``W0``; unused when prox=0).
      opt_state: ``(actor, critic, alpha)`` optax states.
      step: ``[]`` int32 steps taken.
    """

    params: SACParams
    anchor: SACParams
    opt_state: Any
    step: jax.Array


def _sqdist(a, b) -> jax.Array:
    return sum(jnp.sum((x - y) ** 2) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def td_targets(sac: SAC, params: SACParams, batch: Batch, key: jax.Array, *,
               gamma: float = 0.9) -> jax.Array:
    """Soft TD targets ``r + γ (1 − done)(min_j Q̄_j(s', a') − α log π(a'|s'))``, ``a' ~ π``.

    Args:
      sac, params: the agent; ``Q̄`` is ``params.target_critic``.
      batch: :class:`Batch` of ``B`` transitions.
      key: typed key for ``a'``.
      gamma: discount in ``[0, 1)``.

    Returns:
      ``[B]`` targets (no gradient flows through them).

    >>> sac, p = make_sac(jax.random.key(0), obs_dim=2, task_dim=1, act_dim=1, hidden=(4,))
    >>> b = Batch(jnp.ones((3, 2)), jnp.ones((3, 1)), jnp.zeros((3, 1)), jnp.ones(3),
    ...           jnp.ones((3, 2)), jnp.zeros(3))
    >>> td_targets(sac, p, b, jax.random.key(1)).shape
    (3,)
    """
    sac.check_batch(batch)
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"`gamma` must be in [0, 1), got {gamma!r}.")
    a2, lp2 = sac.sample(params.actor, key, batch.next_obs, batch.task)
    q2 = jnp.min(sac.q(params.target_critic, batch.next_obs, batch.task, a2), axis=-1)
    soft = q2 - jnp.exp(params.log_alpha) * lp2
    return jax.lax.stop_gradient(batch.reward + gamma * (1.0 - batch.done) * soft)


def sac_losses(sac: SAC, params: SACParams, batch: Batch, weights: jax.Array, key: jax.Array, *,
               gamma: float = 0.9, bc_weight: float = 0.0, q_weight: float = 1.0,
               target_entropy: float | None = None) -> dict:
    """Weighted SAC(+BC) losses of one batch: ``{"critic", "actor", "alpha", "bc"}`` scalars.

    ``critic = Σ_i w_i · ½ Σ_j (Q_j(s_i, a_i) − y_i)²`` with :func:`td_targets` ``y``;
    ``actor = q_weight · Σ_i w_i (α log π(ã_i|s_i) − min_j Q_j(s_i, ã_i)) + bc_weight · bc``
    with ``bc = Σ_i w_i · ½ ||mean(s_i) − atanh(a_i)||²`` (behaviour cloning of the pre-tanh
    mean: the squared loss that :func:`sac_output_fn` ``"actor_mean"`` linearizes);
    ``alpha = −log α · Σ_i w_i (log π(ã_i|s_i) + target_entropy)``.

    Args:
      sac, params: the agent.
      batch: :class:`Batch` of ``B`` transitions.
      weights: ``[B]`` non-negative example weights (e.g. a task mask; they need not sum to 1).
      key: typed key (next actions, reparameterised actions).
      gamma: discount; bc_weight, q_weight: ``>= 0`` weights of the actor's two terms;
      target_entropy: default ``−A``.

    Returns:
      dict of scalar losses (each differentiable in the corresponding parameters).

    >>> sac, p = make_sac(jax.random.key(0), obs_dim=2, task_dim=1, act_dim=1, hidden=(4,))
    >>> b = Batch(jnp.ones((3, 2)), jnp.ones((3, 1)), jnp.zeros((3, 1)), jnp.ones(3),
    ...           jnp.ones((3, 2)), jnp.zeros(3))
    >>> sorted(sac_losses(sac, p, b, jnp.ones(3) / 3, jax.random.key(1)))
    ['actor', 'alpha', 'bc', 'critic']
    """
    B = sac.check_batch(batch)
    weights = sac.check_weights(weights, B)
    for name, v in (("bc_weight", bc_weight), ("q_weight", q_weight)):
        if not (np.isfinite(v) and v >= 0):
            raise ValueError(f"`{name}` must be a finite float >= 0, got {v!r}.")
    target_entropy = -float(sac.act_dim) if target_entropy is None else float(target_entropy)
    k_td, k_pi = jax.random.split(key)
    y = td_targets(sac, params, batch, k_td, gamma=gamma)
    critic = _critic_loss(sac, params.critic, batch, y, weights)
    eps = jax.random.normal(k_pi, batch.action.shape, batch.action.dtype)
    actor, (lp, bc) = _actor_loss(sac, params.actor, params.critic, params.log_alpha, batch,
                                  weights, eps, bc_weight, q_weight)
    alpha_loss = -params.log_alpha * jnp.sum(weights * jax.lax.stop_gradient(lp + target_entropy))
    return {"critic": critic, "actor": actor, "alpha": alpha_loss, "bc": bc}


def _critic_loss(sac, critic_params, batch, y, weights):
    q = sac.q(critic_params, batch.obs, batch.task, batch.action)
    return jnp.sum(weights * 0.5 * jnp.sum((q - y[:, None]) ** 2, axis=-1))


def _actor_loss(sac, actor_params, critic_params, log_alpha, batch, weights, eps, bc_weight,
                q_weight):
    """Weighted actor loss and ``(log π(ã|s) [B], bc)``; the critic and α are held fixed."""
    mean, log_std = sac.actor(actor_params, batch.obs, batch.task)
    u_data = actor_mean_labels(batch).reshape(batch.action.shape)  # atanh of the clipped action
    bc = jnp.sum(weights * 0.5 * jnp.sum((mean - u_data) ** 2, axis=-1))
    loss = bc_weight * bc
    a_pi, lp = squash(mean, log_std, eps)
    if q_weight:
        q_pi = jnp.min(sac.q(jax.lax.stop_gradient(critic_params), batch.obs, batch.task, a_pi),
                       axis=-1)
        alpha = jnp.exp(jax.lax.stop_gradient(log_alpha))
        loss = loss + q_weight * jnp.sum(weights * (alpha * lp - q_pi))
    return loss, (lp, bc)


def make_train_step(sac: SAC, *, actor_optimizer: optax.GradientTransformation,
                    critic_optimizer: optax.GradientTransformation,
                    alpha_optimizer: optax.GradientTransformation | None = None,
                    gamma: float = 0.9, tau: float = 0.02, bc_weight: float = 0.0,
                    q_weight: float = 1.0, prox: float = 0.0,
                    target_entropy: float | None = None) -> tuple[Callable, Callable]:
    """Pure SAC(+BC) training: ``init(params) -> TrainState`` and
    ``step(state, batch, weights, key) -> (state, losses)``.

    One step updates the critic (weighted TD loss), the actor (weighted SAC + BC loss, see
    :func:`sac_losses`), the temperature (when ``alpha_optimizer`` is given), each with the
    proximal term ``prox/2 ||W − W_anchor||²``, then moves the target critic by Polyak
    averaging with rate ``tau``. Negative or non-finite ``weights`` raise eagerly; under
    ``jit`` they make the step's losses and parameters NaN (no per-step host callback).
    ``step`` closes over no arrays: ``jax.jit(step)`` and
    ``jax.vmap(step, in_axes=(0, None, 0, None))`` (one agent per weight vector) both work.

    Args:
      sac: the agent's :class:`SAC`.
      actor_optimizer, critic_optimizer, alpha_optimizer: optax transformations
        (``alpha_optimizer=None`` keeps the temperature fixed).
      gamma: discount in ``[0, 1)``; tau: Polyak rate in ``[0, 1]``.
      bc_weight, q_weight: actor loss weights (``>= 0``); prox: ``>= 0`` proximal strength.
      target_entropy: default ``−A``.

    Returns:
      ``(init, step)``.

    >>> import optax
    >>> sac, p = make_sac(jax.random.key(0), obs_dim=2, task_dim=1, act_dim=1, hidden=(4,))
    >>> init, step = make_train_step(sac, actor_optimizer=optax.adam(1e-3),
    ...                              critic_optimizer=optax.adam(1e-3))
    >>> b = Batch(jnp.ones((3, 2)), jnp.ones((3, 1)), jnp.zeros((3, 1)), jnp.ones(3),
    ...           jnp.ones((3, 2)), jnp.zeros(3))
    >>> state, losses = jax.jit(step)(init(p), b, jnp.ones(3) / 3, jax.random.key(1))
    >>> int(state.step)
    1
    """
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"`gamma` must be in [0, 1), got {gamma!r}.")
    if not (np.isfinite(tau) and 0.0 <= tau <= 1.0):
        raise ValueError(f"`tau` must be in [0, 1], got {tau!r}.")
    for name, v in (("bc_weight", bc_weight), ("q_weight", q_weight), ("prox", prox)):
        if not (np.isfinite(v) and v >= 0):
            raise ValueError(f"`{name}` must be a finite float >= 0, got {v!r}.")
    alpha_opt = alpha_optimizer if alpha_optimizer is not None else optax.set_to_zero()
    target_entropy_ = -float(sac.act_dim) if target_entropy is None else float(target_entropy)

    def init(params: SACParams) -> TrainState:
        opt = (actor_optimizer.init(params.actor), critic_optimizer.init(params.critic),
               alpha_opt.init(params.log_alpha))
        return TrainState(params, params, opt, jnp.zeros((), jnp.int32))

    def step(state: TrainState, batch: Batch, weights: jax.Array, key: jax.Array):
        B = sac.check_batch(batch)
        weights = sac.check_weights(weights, B, poison=True)
        params, anchor = state.params, state.anchor
        k_td, k_pi = jax.random.split(key)
        y = td_targets(sac, params, batch, k_td, gamma=gamma)
        eps = jax.random.normal(k_pi, batch.action.shape, batch.action.dtype)

        def critic_obj(c):
            loss = _critic_loss(sac, c, batch, y, weights)
            return loss + 0.5 * prox * _sqdist(c, anchor.critic), loss

        def actor_obj(a):
            loss, aux = _actor_loss(sac, a, params.critic, params.log_alpha, batch, weights, eps,
                                    bc_weight, q_weight)
            return loss + 0.5 * prox * _sqdist(a, anchor.actor), (loss, aux)

        (_, c_loss), gc = jax.value_and_grad(critic_obj, has_aux=True)(params.critic)
        (_, (a_loss, (lp, bc))), ga = jax.value_and_grad(actor_obj, has_aux=True)(params.actor)
        # d/d log α of  −log α · Σ_i w_i (log π_i + H̄)
        g_alpha = -jnp.sum(weights * jax.lax.stop_gradient(lp + target_entropy_))
        o_a, o_c, o_t = state.opt_state
        ua, o_a = actor_optimizer.update(ga, o_a, params.actor)
        uc, o_c = critic_optimizer.update(gc, o_c, params.critic)
        ut, o_t = alpha_opt.update(g_alpha, o_t, params.log_alpha)
        actor = optax.apply_updates(params.actor, ua)
        critic = optax.apply_updates(params.critic, uc)
        log_alpha = optax.apply_updates(params.log_alpha, ut)
        target = jax.tree.map(lambda t, c: (1.0 - tau) * t + tau * c, params.target_critic, critic)
        new = SACParams(actor, critic, target, log_alpha)
        losses = {"critic": c_loss, "actor": a_loss, "bc": bc,
                  "alpha": jnp.exp(params.log_alpha)}
        return TrainState(new, anchor, (o_a, o_c, o_t), state.step + 1), losses

    return init, step
