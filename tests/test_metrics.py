"""Tests for kernattr._metrics: spearman, pearson, rank_data, lds, normalized/relative error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats as ss
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kernattr as ka

# Value tests call the jitted functions (one compilation per shape instead of op-by-op eager
# compiles); test_through_jit_and_no_retrace checks eager == jit.
LDS = jax.jit(ka.lds)
SP = jax.jit(ka.spearman)
RANK = jax.jit(ka.rank_data)
NERR = jax.jit(ka.normalized_error)
M, NT = 40, 6  # shared test shape


def _scipy_spearman_cols(a, b):
    return np.array([ss.spearmanr(a[:, t], b[:, t])[0] for t in range(a.shape[1])])


def _tied(rng, m, t, levels):
    return rng.integers(0, levels, size=(m, t)).astype(np.float64)


def test_rank_data_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    x = _tied(rng, M, NT, 5)
    np.testing.assert_allclose(RANK(x), ss.rankdata(x, axis=0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(RANK(x[:, 0]), ss.rankdata(x[:, 0]), atol=1e-6)


def test_rank_data_edge_values():
    x = np.array([-0.0, 0.0, -1.0, -2.0, np.inf, -np.inf, 3.0, 1e-30, -1e-30, 3.0], np.float32)
    np.testing.assert_array_equal(RANK(x), ss.rankdata(x))
    big = np.random.default_rng(7).integers(-50, 50, size=(300, 2)).astype(np.float32)
    np.testing.assert_array_equal(RANK(big), ss.rankdata(big, axis=0))
    r16 = RANK(jnp.asarray(big[:, 0], jnp.bfloat16))
    assert r16.dtype == jnp.float32  # ranks up to m never rounded to bfloat16
    np.testing.assert_array_equal(r16, ss.rankdata(big[:, 0].astype(jnp.bfloat16).astype(float)))
    with pytest.raises(ValueError, match="`x` contains 1 NaN"):
        ka.rank_data(np.array([1.0, np.nan]))


@pytest.mark.parametrize("levels", [3, 10, 10_000])
def test_spearman_matches_scipy(levels, x64):
    rng = np.random.default_rng(levels)
    a, b = _tied(rng, M, 7, levels), _tied(rng, M, 7, levels)
    b[:, 0] = 2 * a[:, 0] + 1  # perfectly monotone column
    b[:, 1] = -a[:, 1]
    got = SP(a, b)
    assert got.dtype == jnp.float64 and got.shape == (7,)
    np.testing.assert_allclose(got, _scipy_spearman_cols(a, b), rtol=1e-10, atol=1e-12)
    assert abs(float(got[0]) - 1) < 1e-12 and abs(float(got[1]) + 1) < 1e-12
    one = SP(a[:, 2], b[:, 2])
    assert one.shape == ()
    np.testing.assert_allclose(one, ss.spearmanr(a[:, 2], b[:, 2])[0], rtol=1e-10)


_SPEARMAN64 = jax.jit(ka.spearman)


@settings(max_examples=60, deadline=None)
@given(
    data=hnp.arrays(
        np.float64,
        (9, 3, 2),  # one shape: one compilation
        elements=st.sampled_from([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0, 7.25]),
    )
)
def test_spearman_property_vs_scipy(data):
    """Random small tied data: equal to scipy wherever scipy's result is defined."""
    a, b = data[..., 0], data[..., 1]
    with jax.enable_x64(True):
        got = np.asarray(_SPEARMAN64(a, b))
        # Invariance: strictly increasing transforms of either argument change nothing.
        again = np.asarray(_SPEARMAN64(np.exp(a), 3 * b - 1))
    for t in range(a.shape[1]):
        if np.ptp(a[:, t]) == 0 or np.ptp(b[:, t]) == 0:
            assert np.isnan(got[t])
        else:
            np.testing.assert_allclose(got[t], ss.spearmanr(a[:, t], b[:, t])[0], atol=1e-10)
    np.testing.assert_allclose(again, got, atol=1e-10)


def test_pearson_matches_numpy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(M, NT)), rng.normal(size=(M, NT))
    b[:, 0] += 2 * a[:, 0]
    expected = [np.corrcoef(a[:, t], b[:, t])[0, 1] for t in range(NT)]
    np.testing.assert_allclose(ka.pearson(a, b), expected, rtol=2e-5, atol=2e-6)


def test_constant_columns_are_nan_and_lds_ignores_them():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(M, NT)), rng.normal(size=(M, NT))
    a[:, 1] = 3.0  # constant prediction
    b[:, 3] = -1.0  # constant ground truth
    sp = np.asarray(SP(a, b))
    valid = [0, 2, 4, 5]
    assert np.isnan(sp[1]) and np.isnan(sp[3]) and np.all(np.isfinite(sp[valid]))
    res = LDS(a, b)
    assert int(res.num_valid) == 4
    np.testing.assert_allclose(res.mean, np.mean(_scipy_spearman_cols(a, b)[valid]), rtol=1e-5)
    allconst = LDS(np.ones((M, NT)), rng.normal(size=(M, NT)))
    assert np.isnan(float(allconst.mean)) and int(allconst.num_valid) == 0


def test_lds_values_per_target_and_float():
    rng = np.random.default_rng(3)
    actual = rng.normal(size=(M, NT))
    pred = actual + rng.normal(size=(M, NT)) * np.linspace(0.1, 3, NT)
    res = LDS(pred, actual)
    expected = _scipy_spearman_cols(pred, actual)
    np.testing.assert_allclose(res.per_target, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.mean, expected.mean(), rtol=1e-5)
    assert float(res) == float(res.mean)
    assert res.per_target.shape == (NT,) and res.mean.shape == ()
    one = LDS(pred[:, 0], actual[:, 0])
    np.testing.assert_allclose(one.mean, expected[0], rtol=1e-5)


def test_normalized_and_relative_error_oracles():
    rng = np.random.default_rng(4)
    actual = rng.normal(size=(M, NT))
    pred = actual + 0.3 * rng.normal(size=(M, NT))
    expected = ((pred - actual) ** 2).mean(0) / actual.var(0)
    np.testing.assert_allclose(NERR(pred, actual), expected, rtol=1e-5)
    mean_pred = np.broadcast_to(actual.mean(0), actual.shape)
    np.testing.assert_allclose(NERR(mean_pred, actual), np.ones(NT), rtol=1e-5)
    c = actual.copy()
    c[:, 1] = 2.0
    assert np.isnan(np.asarray(NERR(pred, c))[1])
    rel = ka.relative_error(pred, actual)
    p32, a32 = pred.astype(np.float32), actual.astype(np.float32)
    np.testing.assert_allclose(rel, np.abs(p32 - a32) / np.abs(a32), rtol=1e-5)
    r0 = np.asarray(ka.relative_error(np.array([0.0, 1.0]), np.array([0.0, 0.0])))
    assert r0[0] == 0 and np.isinf(r0[1])


def test_through_jit_and_no_retrace():
    rng = np.random.default_rng(5)
    a = jnp.asarray(rng.normal(size=(M, NT)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(M, NT)), jnp.float32)
    traces = []

    def f(a, b):
        traces.append(1)
        return ka.lds(a, b), ka.spearman(a, b), ka.normalized_error(a, b), ka.pearson(a, b)

    jf = jax.jit(f)
    res, sp, ne, pe = jf(a, b)
    jf(a + 1.0, b * 2.0)
    assert len(traces) == 1
    eager = f(a, b)
    np.testing.assert_allclose(res.mean, eager[0].mean, rtol=1e-6)
    np.testing.assert_allclose(sp, _scipy_spearman_cols(np.asarray(a), np.asarray(b)), atol=2e-6)
    np.testing.assert_allclose(ne, eager[2], rtol=1e-6)
    np.testing.assert_allclose(pe, eager[3], rtol=1e-6)
    np.testing.assert_allclose(jax.jit(ka.relative_error)(a, b), ka.relative_error(a, b))


def test_vmap_over_label_sets():
    rng = np.random.default_rng(6)
    a = rng.normal(size=(4, M, NT)).astype(np.float32)
    b = rng.normal(size=(4, M, NT)).astype(np.float32)
    res = jax.jit(jax.vmap(ka.lds))(a, b)
    assert res.mean.shape == (4,) and res.per_target.shape == (4, NT)
    for i in range(4):
        np.testing.assert_allclose(res.per_target[i], _scipy_spearman_cols(a[i], b[i]), atol=2e-6)
    sp = jax.jit(jax.vmap(ka.spearman, in_axes=(1, 1)))(a[0], b[0])  # columns as a batch of 1-D inputs
    np.testing.assert_allclose(sp, _scipy_spearman_cols(a[0], b[0]), atol=2e-6)


def test_bad_input():
    good = np.zeros((5, 2))
    with pytest.raises(ValueError, match="`pred` has shape .* but `actual`"):
        ka.lds(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="`a`"):
        ka.spearman(np.zeros((5, 2, 1)), np.zeros((5, 2, 1)))
    with pytest.raises(ValueError, match="at least 2 masks"):
        ka.spearman(np.zeros((1, 2)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="no target columns"):
        ka.lds(np.zeros((5, 0)), np.zeros((5, 0)))
    bad = good.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="`actual` contains 1 non-finite"):
        ka.lds(good, bad)
    with pytest.raises(ValueError, match="`pred` contains 1 non-finite"):
        ka.normalized_error(bad, good)
    with pytest.raises(TypeError, match="`a`"):
        ka.spearman("abc", good)
    with pytest.raises(TypeError, match="`b`"):
        ka.pearson(good, good.astype(np.complex64))
    with pytest.raises(ValueError, match="`x`"):
        ka.rank_data(np.zeros((2, 2, 2)))
    # Under jit the NaN check fires when the compiled function runs.
    with pytest.raises(Exception, match="non-finite"):
        jax.block_until_ready(jax.jit(ka.spearman)(good, jnp.asarray(bad)))
