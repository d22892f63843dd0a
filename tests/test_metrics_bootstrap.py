"""Tests for the bootstrap intervals of kernattr._metrics: lds_interval, paired_lds_interval,
bootstrap_interval, bootstrap_indices (numpy/scipy bootstrap oracle on the same resamples)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats as ss

import kernattr as ka

B, M, NT = 40, 24, 4
LDS_CI = jax.jit(ka.lds_interval, static_argnames=("num_resamples", "level", "batch_size"))
PAIRED = jax.jit(ka.paired_lds_interval, static_argnames=("num_resamples", "level", "batch_size"))


def _oracle_lds(pred, actual, rows):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant resampled columns: scipy warns, gives NaN
        rho = np.array([ss.spearmanr(pred[rows, t], actual[rows, t])[0]
                        for t in range(actual.shape[1])], float)
    return np.nan if np.all(np.isnan(rho)) else float(np.nanmean(rho))


def _data(seed=0):
    rng = np.random.default_rng(seed)
    actual = rng.normal(size=(M, NT))
    actual[:, 0] = rng.integers(0, 3, size=M)  # heavy ties
    actual[:3, 1] = 5.0  # a column that is constant on some resamples? no: but tied block
    pred_a = actual + 0.7 * rng.normal(size=(M, NT))
    pred_b = actual + 2.0 * rng.normal(size=(M, NT))
    pred_b[:, 3] = 1.0  # constant prediction: target 3 undefined for b everywhere
    return pred_a, pred_b, actual


def test_lds_interval_matches_numpy_bootstrap_oracle(x64):
    pred_a, _, actual = _data()
    key = jax.random.key(3)
    ci = LDS_CI(key, pred_a, actual, num_resamples=B, level=0.9, batch_size=7)
    idx = np.asarray(ka.bootstrap_indices(key, M, B))
    assert idx.shape == (B, M) and idx.min() >= 0 and idx.max() < M
    ref = np.array([_oracle_lds(pred_a, actual, r) for r in idx])
    np.testing.assert_allclose(ci.samples, ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ci.mean, _oracle_lds(pred_a, actual, np.arange(M)), atol=1e-12)
    assert float(ci.mean) == float(ka.lds(pred_a, actual).mean)
    lo, hi = np.nanquantile(ref, [0.05, 0.95])
    np.testing.assert_allclose([ci.low, ci.high], [lo, hi], rtol=1e-10)
    np.testing.assert_allclose(ci.std, np.nanstd(ref), rtol=1e-10)
    assert int(ci.num_valid) == NT and float(ci) == float(ci.mean)


def test_paired_interval_same_resamples_and_oracle(x64):
    pred_a, pred_b, actual = _data(1)
    key = jax.random.key(5)
    d = PAIRED(key, pred_a, pred_b, actual, num_resamples=B, level=0.9)
    idx = np.asarray(ka.bootstrap_indices(key, M, B))
    ra = np.array([_oracle_lds(pred_a, actual, r) for r in idx])
    rb = np.array([_oracle_lds(pred_b, actual, r) for r in idx])
    np.testing.assert_allclose(d.a.samples, ra, atol=1e-12)
    np.testing.assert_allclose(d.b.samples, rb, atol=1e-12)
    np.testing.assert_allclose(d.samples, ra - rb, atol=1e-12)
    np.testing.assert_allclose([d.low, d.high], np.nanquantile(ra - rb, [0.05, 0.95]),
                               atol=1e-12)
    assert int(d.b.num_valid) == NT - 1  # the constant prediction is left out, as in lds
    np.testing.assert_allclose(d.mean, d.a.mean - d.b.mean, atol=1e-15)
    # same key, same resamples as lds_interval (other batch size: the result does not depend on it)
    single = LDS_CI(key, pred_a, actual, num_resamples=B, level=0.9, batch_size=7)
    np.testing.assert_allclose(single.samples, d.a.samples, atol=1e-12)
    assert float(d.low) <= float(d.mean) <= float(d.high)


def test_bootstrap_interval_oracle_and_shapes(x64):
    rng = np.random.default_rng(2)
    vals = rng.exponential(size=(M, 3))
    key = jax.random.key(9)
    f = jax.jit(ka.bootstrap_interval, static_argnames=("num_resamples", "level"))
    ci = f(key, vals, num_resamples=B)
    idx = np.asarray(ka.bootstrap_indices(key, M, B))
    ref = vals[idx].mean(axis=1)  # [B, 3]
    np.testing.assert_allclose(ci.samples, ref, rtol=1e-12)
    np.testing.assert_allclose(ci.low, np.quantile(ref, 0.025, axis=0), rtol=1e-12)
    np.testing.assert_allclose(ci.high, np.quantile(ref, 0.975, axis=0), rtol=1e-12)
    np.testing.assert_allclose(ci.mean, vals.mean(0), rtol=1e-12)
    one = f(key, vals[:, 0], num_resamples=B)
    assert one.mean.shape == () and one.samples.shape == (B,)
    np.testing.assert_allclose(one.samples, ref[:, 0], rtol=1e-12)


def test_vmap_over_keys_and_no_retrace():
    pred_a, pred_b, actual = (jnp.asarray(x, jnp.float32) for x in _data(3))
    keys = jax.random.split(jax.random.key(0), 3)
    traces = []

    def f(k, a, b, y):
        traces.append(1)
        return ka.paired_lds_interval(k, a, b, y, num_resamples=16).low

    jf = jax.jit(jax.vmap(f, in_axes=(0, None, None, None)))
    lows = jf(keys, pred_a, pred_b, actual)
    assert lows.shape == (3,) and len(set(np.asarray(lows).tolist())) > 1  # keys differ
    jf(keys, pred_a + 1.0, pred_b, actual)
    assert len(traces) == 1
    ref = jax.jit(f)(keys[1], pred_a, pred_b, actual)
    np.testing.assert_allclose(lows[1], ref, rtol=1e-6)


def test_bad_input():
    pred, _, actual = _data()
    key = jax.random.key(0)
    with pytest.raises(TypeError, match="typed PRNG key"):
        ka.lds_interval(0, pred, actual)
    with pytest.raises(ValueError, match="level"):
        ka.lds_interval(key, pred, actual, level=1.5)
    with pytest.raises(ValueError, match="num_resamples"):
        ka.lds_interval(key, pred, actual, num_resamples=1)
    with pytest.raises(ValueError, match="shape"):
        ka.paired_lds_interval(key, pred, pred[:, :2], actual)
    with pytest.raises(ValueError, match="values"):
        ka.bootstrap_interval(key, np.zeros((0,)))
    bad = np.array(pred)
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        ka.lds_interval(key, bad, actual)
    with pytest.raises(ValueError, match="non-finite"):
        ka.paired_lds_interval(key, pred, bad, actual)
    with pytest.raises(Exception, match="non-finite"):  # under jit: raised by the compiled call
        f = jax.jit(ka.bootstrap_interval, static_argnames="num_resamples")
        jax.block_until_ready(f(key, jnp.asarray(bad), num_resamples=4))


def test_constant_column_is_undefined_at_large_m_in_float32():
    """A column constant in every resample is left out exactly (by its tie groups), also where
    float32 sums of ranks no longer cancel exactly (m(m+1)/2 > 2^24)."""
    rng = np.random.default_rng(0)
    m = 20_000
    actual = rng.normal(size=(m, 2)).astype(np.float32)
    pred = (actual + rng.normal(size=(m, 2))).astype(np.float32)
    pred[:, 1] = 0.37  # target 1 undefined: the LDS is target 0's Spearman alone
    key = jax.random.key(0)
    both = LDS_CI(key, pred, actual, num_resamples=4)
    alone = LDS_CI(key, pred[:, :1], actual[:, :1], num_resamples=4)
    np.testing.assert_allclose(both.samples, alone.samples, rtol=1e-5)
    assert int(both.num_valid) == 1
