"""Helpers shared by the RL drivers (:mod:`kernattr.experiments.rl` and ``rl_mt10``)."""

from __future__ import annotations

import jax.numpy as jnp


def sac_batch(data):
    """The SAC ``Batch`` of an offline data set (fields obs, task, action, reward, next_obs, done)."""
    from kernattr.adapters import Batch

    return Batch(data.obs, data.task, data.action, data.reward, data.next_obs, data.done)


def sac_optimizers(lr: float, steps: int) -> dict:
    """Adam with a cosine-decay schedule for the actor, the critic and the temperature."""
    import optax

    sched = optax.cosine_decay_schedule(lr, steps)
    return dict(actor_optimizer=optax.adam(sched), critic_optimizer=optax.adam(sched),
                alpha_optimizer=optax.adam(sched))


def lds_summary(key, pred, actual) -> dict:
    """LDS mean and 95% bootstrap interval (1000 resamples) as a JSON-ready dict."""
    import kernattr as ka

    ci = ka.lds_interval(key, jnp.asarray(pred), jnp.asarray(actual), num_resamples=1000)
    return {"lds": float(ci.mean), "lds_ci": [float(ci.low), float(ci.high)]}


def paired_summary(key, a, b, actual) -> list:
    """``[mean, low, high]`` of the paired LDS difference ``a - b`` (1000 resamples)."""
    import kernattr as ka

    ci = ka.paired_lds_interval(key, jnp.asarray(a), jnp.asarray(b), jnp.asarray(actual),
                                num_resamples=1000)
    return [float(ci.mean), float(ci.low), float(ci.high)]
