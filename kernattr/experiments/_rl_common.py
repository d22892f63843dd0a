"""Helpers shared by the RL drivers (:mod:`kernattr.experiments.rl` and ``rl_mt10``)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SACAttributionConfig:
    """The fields every SAC+BC task-attribution run shares (JSON-serialisable); the drivers'
    configs (``rl.RLConfig``, ``rl_mt10.MT10Config``) add their own and change defaults.

    Data: ``episodes`` per task of ``horizon`` steps. Agent: ``hidden`` widths. ``W0``:
    ``pretrain_steps`` of full-batch SAC+BC (``pretrain_lr``). Ground truth: ``finetune_steps``
    (Adam, cosine decay from ``finetune_lr``), ``prox`` (pull to ``W0``), ``bc_weight``,
    ``q_weight``, discount ``gamma``. Masks: ``num_train_masks`` (real labels),
    ``num_cheap_masks`` (estimated labels only), ``num_heldout_masks``, drawn from a mixture of
    ``densities`` with ``mask_seed``. Estimator: ``proj_dim`` (``None``: no projection).
    Selection: ``num_random`` random companion sets per target. ``kernel``: the surrogates'
    kernel (``ka.fit_kernel``'s ``kernel=``).

    >>> SACAttributionConfig(prox=0.5).to_dict()["densities"]
    [0.3, 0.5, 0.7]
    """

    episodes: int = 8
    horizon: int = 12
    hidden: tuple = (32, 32)
    pretrain_steps: int = 300
    pretrain_lr: float = 3e-3
    finetune_steps: int = 60
    finetune_lr: float = 3e-3
    prox: float = 1.0
    bc_weight: float = 1.0
    q_weight: float = 0.1
    gamma: float = 0.9
    num_train_masks: int = 64
    num_cheap_masks: int = 512
    num_heldout_masks: int = 64
    densities: tuple = (0.3, 0.5, 0.7)
    proj_dim: Optional[int] = 512
    num_random: int = 4
    mask_seed: int = 1234
    kernel: str = "linear+rbf"

    def to_dict(self) -> dict:
        """Fields as a JSON-ready dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


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
