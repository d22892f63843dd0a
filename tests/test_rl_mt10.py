"""Meta-World MT10 on the real simulator (needs the `rl` extra: metaworld, mujoco)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("metaworld")

from kernattr.experiments import rl  # noqa: E402
from kernattr.experiments.rl_mt10 import MT10Config, MT10Run  # noqa: E402


def test_mt10_collect_attribute_rollout_two_tasks():
    cfg = MT10Config(tasks=("reach-v3", "drawer-close-v3"), targets=("reach-v3",), episodes=1,
                     horizon=25, hidden=(16,), pretrain_steps=20, finetune_steps=5,
                     proj_dim=64, eval_episodes=1)
    run = MT10Run(cfg)  # scripted experts with noise, SAC+BC W0
    d = run.data
    assert d.obs.shape == (50, 39) and d.task.shape == (50, 2)
    np.testing.assert_array_equal(np.bincount(np.asarray(d.task_ids)), [25, 25])
    assert np.all(np.abs(np.asarray(d.action)) <= 0.95) and np.all(np.isfinite(d.reward))
    # one attribution step: the gradient estimator on two masks; the empty mask is W0's loss
    masks = np.array([[0.0, 0.0], [1.0, 1.0]], np.float32)
    Fh = rl.estimated_labels(cfg, run.features(), masks)
    assert Fh.shape == (2, 1) and np.all(np.isfinite(Fh))
    assert Fh[1, 0] > Fh[0, 0]  # fitting the target's own data lowers its BC loss
    R, S = run.real_labels(masks, jax.random.key(0))  # fine-tune + MuJoCo rollouts
    assert R.shape == S.shape == (2, 1) and np.all(np.isfinite(R)) and np.all((S == 0) | (S == 1))
