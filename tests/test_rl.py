"""The JAX point-mass tasks and the RL attribution pipeline's pieces (kernattr.experiments.rl)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernattr as ka
from kernattr.experiments import rl
from kernattr.experiments.rl_env import (
    collect, default_tasks, env_step, expert_preaction, rollout_returns, start_states,
)


def test_env_step_and_expert():
    pos, r = jax.jit(env_step)(jnp.array([1.45, 0.0]), jnp.array([1.0, -0.5]), jnp.zeros(2))
    np.testing.assert_allclose(pos, [1.5, -0.1], atol=1e-6)  # clipped to the box
    np.testing.assert_allclose(r, -np.hypot(1.5, 0.1), rtol=1e-6)
    tasks, targets = default_tasks()
    starts = start_states(jax.random.key(0), 8)
    expert = lambda p, o, c: jnp.tanh(expert_preaction(o, p[None]))  # noqa: E731  (p: goal)
    still = lambda p, o, c: jnp.zeros_like(o)  # noqa: E731
    ret = jax.jit(jax.vmap(lambda g, c: rollout_returns(expert, g, c, g, starts, horizon=12)))(
        tasks.goal, tasks.descriptor)
    ret0 = jax.vmap(lambda g, c: rollout_returns(still, g, c, g, starts, horizon=12))(
        tasks.goal, tasks.descriptor)
    assert np.all(np.asarray(ret) > np.asarray(ret0) + 0.3)
    # the design: mirror tasks share a target's cue region but have the opposite goal
    d, g = np.asarray(tasks.descriptor), np.asarray(tasks.goal)
    for name, tgt in (("t0 mirror", "t0"), ("t1 mirror", "t1")):
        i, t = tasks.names.index(name), tasks.names.index(tgt)
        assert np.linalg.norm(d[i] - d[t]) < 0.2 and np.linalg.norm(g[i] - g[t]) > 1.4
    assert len(targets) == 3


def test_collect_layout():
    tasks, _ = default_tasks()
    data = jax.jit(lambda k: collect(k, tasks, episodes=2, horizon=5))(jax.random.key(0))
    K = tasks.descriptor.shape[0]
    assert data.obs.shape == (K * 10, 2)
    np.testing.assert_array_equal(np.bincount(np.asarray(data.task_ids)), np.full(K, 10))
    np.testing.assert_allclose(data.task, tasks.descriptor[data.task_ids])
    # transitions chain within an episode and rewards match the env
    np.testing.assert_allclose(data.next_obs[:4], data.obs[1:5], atol=1e-6)
    _, r = jax.vmap(env_step)(data.obs, data.action, tasks.goal[data.task_ids])
    np.testing.assert_allclose(r, data.reward, atol=1e-5)


def test_mask_enumeration_and_selection():
    m = rl.all_masks_with(2, 4)
    assert m.shape == (8, 4) and np.all(m[:, 2] == 1) and len({tuple(r) for r in m}) == 8
    pred = lambda mm: jnp.asarray(mm) @ jnp.array([[1.0], [-1.0], [0.0], [2.0]])  # noqa: E731
    np.testing.assert_array_equal(rl.select(pred, 0, 2, 4), [1, 0, 1, 1])
    np.testing.assert_array_equal(rl.select_additive(np.array([[1.0], [-1.0], [-2.0], [0.5]]), 0, 2),
                                  [1, 0, 1, 1])


def test_estimator_tracks_real_finetuning_tiny():
    """Gradient estimator on the actor-mean adapter vs real SAC+BC fine-tuning, same masks."""
    cfg = rl.RLConfig(seeds=(0,), episodes=2, horizon=6, hidden=(8,), pretrain_steps=30,
                      finetune_steps=30, prox=2.0, q_weight=0.0, proj_dim=None, eval_starts=2,
                      mask_chunk=8)
    prep = rl.prepare(cfg, 0)
    K = prep.tasks.descriptor.shape[0]
    masks = np.asarray(ka.sample_subsets(jax.random.key(3), num_tasks=K, num_subsets=7, p=0.5))
    masks = np.concatenate([np.zeros((1, K), np.float32), masks]).astype(np.float32)
    R, BC = rl.run_masks(rl.make_finetune_eval(cfg, prep), masks, jax.random.key(1), 8)
    assert R.shape == BC.shape == (8, 3) and np.all(np.isfinite(R))
    Fh = -rl.estimated_labels(cfg, rl.features(cfg, prep, 0), masks)
    np.testing.assert_allclose(Fh[0], BC[0], rtol=1e-3)  # empty mask: both are W0's loss
    err = np.abs(Fh[1:] - BC[1:]).mean()
    no_change = np.abs(BC[0][None] - BC[1:]).mean()
    assert err < 0.5 * no_change
