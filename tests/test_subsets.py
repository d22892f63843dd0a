"""Tests for kernattr.data._subsets: sample_subsets, leave_one_out_masks, pair_masks."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernattr as ka

K, M = 12, 4000


def test_bernoulli_density_and_independence():
    masks = np.asarray(ka.sample_subsets(jax.random.key(0), num_tasks=K, num_subsets=M, p=0.3))
    assert masks.shape == (M, K) and masks.dtype == np.float32
    assert set(np.unique(masks)) <= {0.0, 1.0}
    # Mean density ~ p (binomial std of the overall mean is sqrt(p(1-p)/(M K)) ~ 0.0038).
    assert abs(masks.mean() - 0.3) < 0.015
    # Each column near p, columns nearly uncorrelated.
    assert np.all(np.abs(masks.mean(0) - 0.3) < 0.04)
    corr = np.corrcoef(masks.T)
    assert np.max(np.abs(corr - np.eye(K))) < 0.08


def test_bernoulli_p_one_is_all_tasks():
    masks = ka.sample_subsets(jax.random.key(1), num_tasks=5, num_subsets=7, p=1.0)
    np.testing.assert_array_equal(masks, np.ones((7, 5)))


def test_fixed_size_exact_and_uniform():
    size = 3
    masks = np.asarray(ka.sample_subsets(jax.random.key(2), num_tasks=6, num_subsets=M, size=size))
    np.testing.assert_array_equal(masks.sum(1), np.full(M, size))
    # Uniform over the C(6,3)=20 subsets: chi-square against equal counts.
    codes = masks @ (2 ** np.arange(6))
    counts = np.array([np.sum(codes == c) for c in np.unique(codes)])
    assert len(counts) == math.comb(6, size)
    expected = M / len(counts)
    chi2 = np.sum((counts - expected) ** 2 / expected)
    assert chi2 < 45.0  # 19 dof: p ~ 1e-3 at 43.8
    # Every task equally likely: size/K.
    assert np.all(np.abs(masks.mean(0) - size / 6) < 0.03)


@pytest.mark.parametrize("kw", [dict(p=0.5), dict(size=4)])
def test_deterministic_from_key(kw):
    a = ka.sample_subsets(jax.random.key(7), num_tasks=K, num_subsets=50, **kw)
    b = ka.sample_subsets(jax.random.key(7), num_tasks=K, num_subsets=50, **kw)
    c = ka.sample_subsets(jax.random.key(8), num_tasks=K, num_subsets=50, **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("kw", [dict(p=0.5), dict(size=4)])
def test_jit_and_vmap_over_keys(kw):
    f = jax.jit(ka.sample_subsets, static_argnames=("num_tasks", "num_subsets", "size"))
    a = f(jax.random.key(3), num_tasks=K, num_subsets=20, **kw)
    b = ka.sample_subsets(jax.random.key(3), num_tasks=K, num_subsets=20, **kw)
    np.testing.assert_array_equal(a, b)
    keys = jax.random.split(jax.random.key(3), 2)
    batch = jax.vmap(lambda k: ka.sample_subsets(k, num_tasks=K, num_subsets=20, **kw))(keys)
    assert batch.shape == (2, 20, K)
    for i in range(2):
        np.testing.assert_array_equal(
            batch[i], ka.sample_subsets(keys[i], num_tasks=K, num_subsets=20, **kw)
        )


def test_traced_p_and_no_retrace():
    traces = []

    def f(key, p):
        traces.append(1)
        return ka.sample_subsets(key, num_tasks=K, num_subsets=500, p=p)

    jf = jax.jit(f)
    a = jf(jax.random.key(0), 0.2)
    b = jf(jax.random.key(1), 0.8)
    assert len(traces) == 1
    assert abs(float(a.mean()) - 0.2) < 0.03 and abs(float(b.mean()) - 0.8) < 0.03


def test_dtype_follows_keyword(x64):
    m = ka.sample_subsets(jax.random.key(0), num_tasks=3, num_subsets=2, p=0.5)
    assert m.dtype == jnp.float64
    m32 = ka.sample_subsets(jax.random.key(0), num_tasks=3, num_subsets=2, p=0.5, dtype=jnp.float32)
    assert m32.dtype == jnp.float32


def test_sample_subsets_bad_input():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="exactly one of `p`"):
        ka.sample_subsets(key, num_tasks=3, num_subsets=2)
    with pytest.raises(ValueError, match="exactly one of `p`"):
        ka.sample_subsets(key, num_tasks=3, num_subsets=2, p=0.5, size=1)
    for bad_p in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="`p`"):
            ka.sample_subsets(key, num_tasks=3, num_subsets=2, p=bad_p)
    with pytest.raises(ValueError, match="`p` must be a scalar"):
        ka.sample_subsets(key, num_tasks=3, num_subsets=2, p=jnp.array([0.5, 0.5]))
    for bad_size in (0, 4):
        with pytest.raises(ValueError, match="`size`"):
            ka.sample_subsets(key, num_tasks=3, num_subsets=2, size=bad_size)
    with pytest.raises(TypeError, match="`size`"):
        ka.sample_subsets(key, num_tasks=3, num_subsets=2, size=1.5)
    with pytest.raises(ValueError, match="`num_tasks`"):
        ka.sample_subsets(key, num_tasks=0, num_subsets=2, p=0.5)
    with pytest.raises(TypeError, match="`num_subsets`"):
        ka.sample_subsets(key, num_tasks=3, num_subsets=2.0, p=0.5)
    with pytest.raises(TypeError, match="`key`"):
        ka.sample_subsets(jax.random.PRNGKey(0), num_tasks=3, num_subsets=2, p=0.5)
    with pytest.raises(ValueError, match="`key`"):
        ka.sample_subsets(jax.random.split(key, 2), num_tasks=3, num_subsets=2, p=0.5)
    with pytest.raises(TypeError, match="`dtype`"):
        ka.sample_subsets(key, num_tasks=3, num_subsets=2, p=0.5, dtype=jnp.int32)


def test_leave_one_out_masks_values():
    masks = ka.leave_one_out_masks(4)
    assert masks.dtype == jnp.float32 and masks.shape == (4, 4)
    expected = np.ones((4, 4)) - np.eye(4)
    np.testing.assert_array_equal(masks, expected)
    for k in range(4):
        assert masks[k, k] == 0 and masks[k].sum() == 3
    np.testing.assert_array_equal(jax.jit(ka.leave_one_out_masks, static_argnums=0)(4), expected)
    assert ka.leave_one_out_masks(2, dtype=jnp.bfloat16).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="`num_tasks`"):
        ka.leave_one_out_masks(0)
    with pytest.raises(TypeError, match="`num_tasks`"):
        ka.leave_one_out_masks(jnp.array(3))


def test_pair_masks_values():
    pm = ka.pair_masks(5)
    assert pm.masks.shape == (10, 5) and pm.pairs.shape == (10, 2)
    assert pm.pairs.dtype == jnp.int32
    expected_pairs = list(itertools.combinations(range(5), 2))
    assert [tuple(p) for p in np.asarray(pm.pairs)] == expected_pairs
    for row, (i, j) in zip(np.asarray(pm.masks), expected_pairs):
        expected = np.ones(5)
        expected[[i, j]] = 0
        np.testing.assert_array_equal(row, expected)
    with pytest.raises(ValueError, match="`num_tasks`"):
        ka.pair_masks(1)
