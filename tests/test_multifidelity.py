"""Tests for kernattr.surrogates._multifidelity: brute-force LOO refits for rho, 2^K enumeration for the
attributions, and the headline (biased cheap labels + 32 real ones beat either alone)."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernattr as ka

_mf = jax.jit(ka.fit_multifidelity, static_argnames=("kernel", "select", "per_target"))


def _np_gram(a, b, gamma, mix, scale):
    d = ((a[:, None, :] - b[None]) ** 2).sum(-1)
    return mix / scale * a @ b.T + (1 - mix) * np.exp(-gamma * d)


def _loo_resid(masks, y, gamma, mix, ridge):
    """LOO residuals (prediction - label) by refitting kernel ridge + intercept without each row."""
    m = len(masks)
    scale = masks.sum(1).mean()
    out = np.zeros_like(y)
    for i in range(m):
        keep = np.arange(m) != i
        x, yy = masks[keep], y[keep]
        kk = _np_gram(x, x, gamma, mix, scale)
        n = len(x)
        top = np.concatenate([kk + ridge * np.eye(n), np.ones((n, 1))], 1)
        bot = np.concatenate([kk.sum(0, keepdims=True), [[n]]], 1)
        sol = np.linalg.solve(np.concatenate([top, bot]), np.concatenate([yy, yy.sum(0, keepdims=True)]))
        out[i] = _np_gram(masks[i:i + 1], x, gamma, mix, scale) @ sol[:-1] + sol[-1] - y[i]
    return out


def _small(seed=0, k=6, m_cheap=40, m_real=14):
    game = ka.synthetic_game(jax.random.key(seed), num_tasks=k, num_targets=2, noise=0.0)
    cheap = np.asarray(ka.sample_subsets(jax.random.key(seed + 1), num_tasks=k, num_subsets=m_cheap,
                                         p=0.5), np.float64)
    real = np.asarray(ka.sample_subsets(jax.random.key(seed + 2), num_tasks=k, num_subsets=m_real,
                                        p=0.5), np.float64)
    bias = 0.4 * cheap @ np.linspace(-1, 1, k)[:, None] + 0.2 * cheap.sum(1, keepdims=True) ** 2 / k
    y_cheap = np.asarray(game.evaluate(cheap), np.float64) + bias
    y_real = np.asarray(game.evaluate(real), np.float64)
    return cheap, y_cheap, real, y_real


def test_rho_and_loo_error_equal_brute_force_refits(x64):
    cheap, y_cheap, real, y_real = _small()
    opts = dict(gamma=0.4, mix=0.5, ridge=0.05)
    mf = _mf(cheap, y_cheap, real, y_real, **opts)
    pr = jax.jit(ka.predict)
    c = np.asarray(pr(mf.cheap, real))
    e_y = _loo_resid(real, y_real, 0.4, 0.5, 0.05)
    e_c = _loo_resid(real, c, 0.4, 0.5, 0.05)
    rho = (e_y * e_c).sum(0) / (e_c * e_c).sum(0)
    np.testing.assert_allclose(np.asarray(mf.rho), rho, rtol=1e-8)
    var = ((y_real - y_real.mean(0)) ** 2).mean(0)
    cv = ((e_y - rho * e_c) ** 2).mean(0) / var
    np.testing.assert_allclose(np.asarray(mf.cv_error)[0, 0, 0], cv, rtol=1e-8)
    np.testing.assert_allclose(np.asarray(mf.cv_error_real_only)[0, 0, 0], (e_y**2).mean(0) / var,
                               rtol=1e-8)
    # the residual surrogate is kernel ridge on real - rho * cheap; prediction is the sum
    res = jax.jit(lambda x, yy: ka.fit_kernel(x, yy, **opts))(real, y_real - rho * c)
    new = real[::-1].copy()
    want = rho * np.asarray(pr(mf.cheap, new)) + np.asarray(pr(res, new))
    np.testing.assert_allclose(np.asarray(pr(mf, new)), want, rtol=1e-9, atol=1e-9)


def test_attributions_equal_enumeration(x64):
    k = 6
    cheap, y_cheap, real, y_real = _small(k=k)
    mf = _mf(cheap, y_cheap, real, y_real, gamma=jnp.array([0.2, 1.0]), ridge=jnp.array([1e-2, 1.0]),
             per_target=True, rho=jnp.array([0.7, 1.2]))
    np.testing.assert_array_equal(np.asarray(mf.rho), [0.7, 1.2])  # a given rho is used as is
    allm = np.array(list(itertools.product([0, 1], repeat=k)), np.float64)
    v = np.asarray(jax.jit(ka.predict)(mf, allm))
    idx = {tuple(r): i for i, r in enumerate(allm.astype(int))}
    shap = np.zeros((k, 2))
    banz = np.zeros((k, 2))
    for r in allm.astype(int):
        for j in np.flatnonzero(r == 0):
            r2 = r.copy()
            r2[j] = 1
            d = v[idx[tuple(r2)]] - v[idx[tuple(r)]]
            n = r.sum()
            shap[j] += math.factorial(n) * math.factorial(k - n - 1) / math.factorial(k) * d
            banz[j] += d / 2 ** (k - 1)
    one = np.ones(k, int)
    eye = np.eye(k, dtype=int)
    loo = np.stack([v[idx[tuple(one)]] - v[idx[tuple(one - eye[j])]] for j in range(k)])
    inter = np.zeros((k, k, 2))
    for i, j in itertools.permutations(range(k), 2):
        inter[i, j] = (v[idx[tuple(one)]] - v[idx[tuple(one - eye[i])]] - v[idx[tuple(one - eye[j])]]
                       + v[idx[tuple(one - eye[i] - eye[j])]])
    for fn, ref in ((ka.shapley_values, shap), (ka.banzhaf_values, banz), (ka.loo_scores, loo),
                    (ka.interaction_scores, inter)):
        np.testing.assert_allclose(np.asarray(jax.jit(fn)(mf)), ref, rtol=1e-8, atol=1e-9,
                                   err_msg=fn.__name__)


def test_multifidelity_beats_real_only_and_cheap_only():
    """Cheap labels = truth + a smooth bias (200 masks); 32 real labels; 200 held-out masks."""
    k, t = 12, 6
    keys = jax.random.split(jax.random.key(0), 6)
    game = ka.synthetic_game(keys[0], num_tasks=k, num_targets=t, kind="interaction", noise=0.05)
    cheap = ka.sample_subsets(keys[1], num_tasks=k, num_subsets=200, p=0.5)
    test = ka.sample_subsets(keys[2], num_tasks=k, num_subsets=200, p=0.5)
    grids = dict(gamma=np.array([0.02, 0.1, 0.5]), ridge=np.logspace(-3, 1, 5))  # small: fast
    w_bias = jax.random.normal(keys[3], (k, t))

    @jax.jit
    def run(cheap, test, key):
        bias = 0.7 * cheap @ w_bias / jnp.sqrt(k) + 0.3 * jnp.sum(cheap, 1, keepdims=True) ** 2 / k
        y_cheap = game.evaluate(cheap, keys[4]) + bias
        real, y_real = cheap[:32], game.evaluate(cheap[:32], keys[5])
        y_test = game.evaluate(test)
        mf = ka.fit_multifidelity(cheap, y_cheap, real, y_real, **grids)
        preds = [ka.predict(s, test) for s in (mf, ka.fit_kernel(real, y_real, **grids),
                                                ka.fit_kernel(cheap, y_cheap, **grids))]
        vs_real = ka.paired_lds_interval(key, preds[0], preds[1], y_test, num_resamples=200)
        vs_cheap = ka.paired_lds_interval(key, preds[0], preds[2], y_test, num_resamples=200)
        return vs_real, vs_cheap, mf.rho

    vs_real, vs_cheap, rho = run(cheap, test, jax.random.key(7))
    print(f"LDS multifidelity {float(vs_real.a.mean):.3f}, kernel on 32 real "
          f"{float(vs_real.b.mean):.3f} (diff [{float(vs_real.low):+.3f}, {float(vs_real.high):+.3f}]),"
          f" kernel on cheap {float(vs_cheap.b.mean):.3f} (diff [{float(vs_cheap.low):+.3f}, "
          f"{float(vs_cheap.high):+.3f}]); rho {np.round(np.asarray(rho), 2)}")
    assert float(vs_real.low) > 0 and float(vs_cheap.low) > 0


def test_bad_input():
    cheap, y_cheap, real, y_real = _small()
    with pytest.raises(ValueError, match="targets"):
        ka.fit_multifidelity(cheap, y_cheap, real, y_real[:, :1], gamma=0.3, ridge=0.1)
    with pytest.raises(ValueError, match="real_masks"):
        ka.fit_multifidelity(cheap, y_cheap, real[:, :-1], y_real, gamma=0.3, ridge=0.1)
    with pytest.raises(ValueError, match="at least 3"):
        ka.fit_multifidelity(cheap, y_cheap, real[:2], y_real[:2], gamma=0.3, ridge=0.1)
    with pytest.raises(TypeError, match="unknown kernel option"):
        ka.fit_multifidelity(cheap, y_cheap, real, y_real, gama=0.3)
    bad = y_real.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="real_y"):
        ka.fit_multifidelity(cheap, y_cheap, real, bad, gamma=0.3, ridge=0.1)
