"""A multi-task point-mass environment in pure JAX, with tasks that interact by design.

A point at ``pos ∈ [-1.5, 1.5]²`` moves by ``0.2 · a`` per step (``a ∈ (-1, 1)²``); task ``k``
rewards ``-||pos' − goal_k||``. The policy does not see the goal: it sees the task's
*descriptor* ``c_k`` (a 2-D cue). For most tasks the cue is the goal, so a task-conditioned
policy generalises between tasks whose cues are close:

* nearby goals transfer (neighbouring cues, neighbouring goals);
* opposed objectives conflict (a "mirror" task whose cue is near a target's cue but whose goal
  is the opposite point teaches the wrong direction there);
* one task helps a target only together with another (two neighbours on either side of the
  target's cue: each alone drags the policy toward its own goal, the pair interpolates).

Expert data: the scripted expert's pre-tanh action is ``2 (goal − pos)``; noisy experts add
Gaussian noise of task-specific scale in pre-tanh space. Everything is vmappable: many
policies, tasks and start states roll out in one ``jax.vmap``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

STEP = 0.2
BOUND = 1.5
EXPERT_GAIN = 2.0


class TaskSet(NamedTuple):
    """``K`` tasks of the point-mass environment (a pytree).

    Attributes:
      descriptor: ``[K, 2]`` cue the policy is conditioned on.
      goal: ``[K, 2]`` where the reward is.
      noise: ``[K]`` pre-tanh noise scale of the task's data-collecting expert.
      names: tuple of ``K`` strings (static description).
    """

    descriptor: jax.Array
    goal: jax.Array
    noise: jax.Array
    names: tuple = ()


def default_tasks() -> tuple[TaskSet, tuple[int, ...]]:
    """The 10-task layout of ``kernattr reproduce rl`` and its three target tasks.

    Three targets (``t0``, ``t1``, ``t2``) with poor own data (noise 1.5). Each has two flanking
    neighbours at ±40° on the same circle (clean data; each alone biases the policy toward its
    own goal, together they interpolate), and ``t0`` and ``t1`` each have a mirror task (cue 12°
    away, goal opposite).

    >>> tasks, targets = default_tasks()
    >>> tasks.descriptor.shape, targets
    ((10, 2), (0, 4, 7))
    """
    r = 0.8
    spec = [  # name, cue angle (deg), goal angle or None (= cue), noise
        ("t0", 0, None, 1.5), ("t0+", 40, None, 0.3), ("t0-", -40, None, 0.3),
        ("t0 mirror", 12, 192, 0.3),
        ("t1", 120, None, 1.5), ("t1+", 160, None, 0.3), ("t1 mirror", 108, 288, 0.3),
        ("t2", 240, None, 1.5), ("t2+", 280, None, 0.3), ("t2-", 200, None, 0.3),
    ]
    def unit(deg):
        return [r * np.cos(np.deg2rad(deg)), r * np.sin(np.deg2rad(deg))]
    desc = np.array([unit(a) for _, a, _, _ in spec], np.float32)
    goal = np.array([unit(a if g is None else g) for _, a, g, _ in spec], np.float32)
    noise = np.array([s for *_, s in spec], np.float32)
    return TaskSet(jnp.asarray(desc), jnp.asarray(goal), jnp.asarray(noise),
                   tuple(n for n, *_ in spec)), (0, 4, 7)


def env_step(pos: jax.Array, action: jax.Array, goal: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One step for one agent: ``(next_pos [2], reward [])``.

    >>> p, r = env_step(jnp.zeros(2), jnp.array([1.0, 0.0]), jnp.array([0.2, 1.0]))
    >>> [round(v, 3) for v in p.tolist()], round(float(r), 3)
    ([0.2, 0.0], -1.0)
    """
    nxt = jnp.clip(pos + STEP * jnp.clip(action, -1.0, 1.0), -BOUND, BOUND)
    return nxt, -jnp.linalg.norm(nxt - goal)


def expert_preaction(pos: jax.Array, goal: jax.Array) -> jax.Array:
    """Pre-tanh action of the scripted expert, ``2 (goal − pos)``; the action is its tanh."""
    return EXPERT_GAIN * (goal - pos)


def start_states(key: jax.Array, num: int) -> jax.Array:
    """``[num, 2]`` start positions, uniform in ``[-0.3, 0.3]²``."""
    return jax.random.uniform(key, (num, 2), minval=-0.3, maxval=0.3)


class Transitions(NamedTuple):
    """Flat offline data ``[n, ...]``: obs (position), cue, action, reward, next_obs, done, task id."""

    obs: jax.Array
    task: jax.Array
    action: jax.Array
    reward: jax.Array
    next_obs: jax.Array
    done: jax.Array
    task_ids: jax.Array


def collect(key: jax.Array, tasks: TaskSet, *, episodes: int, horizon: int) -> Transitions:
    """Noisy-expert data: ``episodes`` episodes of ``horizon`` steps per task, ``n = K·E·H``.

    >>> tasks, _ = default_tasks()
    >>> collect(jax.random.key(0), tasks, episodes=2, horizon=3).obs.shape
    (60, 2)
    """
    K = tasks.descriptor.shape[0]

    def episode(k, key, cue, goal, noise):
        k0, k1 = jax.random.split(key)
        pos0 = start_states(k0, 1)[0]

        def body(pos, eps):
            a = jnp.tanh(expert_preaction(pos, goal) + noise * eps)
            nxt, r = env_step(pos, a, goal)
            return nxt, (pos, a, r, nxt)

        _, (obs, act, rew, nxt) = jax.lax.scan(body, pos0, jax.random.normal(k1, (horizon, 2)))
        done = (jnp.arange(horizon) == horizon - 1).astype(obs.dtype)
        return obs, jnp.broadcast_to(cue, obs.shape), act, rew, nxt, done, jnp.full(horizon, k)

    keys = jax.random.split(key, K * episodes).reshape(K, episodes)
    per_task = jax.vmap(jax.vmap(episode, in_axes=(None, 0, None, None, None)))
    out = per_task(jnp.arange(K), keys, tasks.descriptor, tasks.goal, tasks.noise)
    flat = [x.reshape((-1,) + x.shape[3:]) for x in out]
    # "done" marks the time limit; SAC treats truncation as non-terminal, so it is not used
    # to stop bootstrapping (kept for the record).
    return Transitions(*flat[:5], jnp.zeros_like(flat[5]), flat[6].astype(jnp.int32))


def rollout_returns(act_fn: Callable, params, cue: jax.Array, goal: jax.Array,
                    starts: jax.Array, *, horizon: int) -> jax.Array:
    """Mean per-step reward of the deterministic policy from each start, averaged: ``[]``.

    ``act_fn(params, obs [N, 2], cue [N, Z]) -> actions [N, 2]``; vmap over ``params`` for many
    policies and over ``cue``/``goal`` for many tasks.

    >>> tasks, _ = default_tasks()
    >>> expert = lambda p, o, c: jnp.tanh(expert_preaction(o, c))
    >>> r = rollout_returns(expert, None, tasks.descriptor[0], tasks.goal[0],
    ...                     start_states(jax.random.key(0), 4), horizon=10)
    >>> bool(r > -0.3)
    True
    """
    N = starts.shape[0]
    cues = jnp.broadcast_to(cue, (N, cue.shape[-1]))

    def body(pos, _):
        a = act_fn(params, pos, cues)
        nxt, r = jax.vmap(env_step, in_axes=(0, 0, None))(pos, a, goal)
        return nxt, r

    _, rewards = jax.lax.scan(body, starts, None, length=horizon)
    return jnp.mean(rewards)
