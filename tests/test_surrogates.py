"""Tests for kernattr.surrogates (_krr, _dispatch): oracles are scikit-learn, numpy lstsq and brute-force refits."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats as ss
from sklearn.kernel_ridge import KernelRidge
from sklearn.linear_model import Ridge

import kernattr as ka
from kernattr.surrogates._krr import (
    default_gamma_grid,
    default_mix_grid,
    default_ridge_grid,
    kernel_matrix,
)

from _jitted import fit_kernel as _fk
from conftest import tol

_fl = jax.jit(ka.fit_linear)
_pr = jax.jit(ka.predict)



def _data(m=48, k=7, t=3, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    masks = (rng.random((m, k)) < 0.5).astype(dtype)
    w = rng.normal(size=(k, t))
    y = masks @ w + 0.5 * (masks[:, :1] * masks[:, 1:2] - masks[:, 2:3] * masks[:, 3:4])
    y = y + 0.1 * rng.normal(size=(m, t)) + 2.0
    new = (rng.random((15, k)) < 0.5).astype(dtype)
    return masks, y.astype(dtype), new


def _x64_or_not(dtype):
    return jax.enable_x64(dtype == np.float64)


def _np_kernel(a, b, kernel, gamma, degree=2, coef0=1.0, mix=0.0, scale=1.0):
    if kernel in ("rbf", "linear+rbf"):
        d = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        rbf = np.exp(-gamma * d)
        return rbf if kernel == "rbf" else mix / scale * a @ b.T + (1 - mix) * rbf
    if kernel == "polynomial":
        return (gamma * a @ b.T + coef0) ** degree
    return a @ b.T


# ---------------------------------------------------------------------------------------------
# Oracles: scikit-learn
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "kernel,kw",
    [
        ("rbf", dict(gamma=0.3)),
        ("polynomial", dict(gamma=0.2, degree=3, coef0=1.0)),
        ("linear", dict()),
    ],
)
def test_kernel_matches_sklearn_kernel_ridge(dtype, kernel, kw):
    masks, y, new = _data(dtype=dtype)
    with _x64_or_not(dtype):
        fit = jax.jit(
            lambda x, yy: _fk(x, yy, kernel=kernel, ridge=0.7, fit_intercept=False, **kw)
        )
        s = fit(masks, y)
        pred = np.asarray(jax.jit(ka.predict)(s, new))
        assert pred.dtype == dtype
    ref = KernelRidge(alpha=0.7, kernel=kernel, **kw).fit(masks.astype(np.float64), y.astype(np.float64))
    rtol, atol = tol(dtype)
    scale = np.abs(ref.predict(new)).max()
    np.testing.assert_allclose(pred, ref.predict(new), rtol=rtol * 20, atol=atol * 20 * scale)
    # copies of a mask share its dual coefficient equally (only their sum enters the model;
    # sklearn's m-row solution splits it by label): compare the sums per distinct mask
    _, inv = np.unique(masks, axis=0, return_inverse=True)
    onehot = np.eye(inv.max() + 1)[inv.ravel()]  # [m, u]
    np.testing.assert_allclose(
        onehot.T @ np.asarray(s.dual_coef, np.float64), onehot.T @ ref.dual_coef_,
        rtol=rtol * 50, atol=atol * 50 * np.abs(ref.dual_coef_).max()
    )


def test_linear_kernel_with_intercept_equals_sklearn_ridge(x64):
    masks, y, new = _data()
    s = jax.jit(lambda x, yy: _fk(x, yy, kernel="linear", ridge=0.3))(masks, y)
    ref = Ridge(alpha=0.3, fit_intercept=True).fit(masks, y)
    np.testing.assert_allclose(np.asarray(_pr(s, new)), ref.predict(new), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(float(jnp.sum(s.dual_coef)), 0.0, atol=1e-10)


def test_rbf_intercept_equals_krr_with_huge_constant_kernel(x64):
    """An unpenalised intercept is the limit c -> inf of KRR with kernel K + c·11ᵀ."""
    masks, y, new = _data()
    s = _fk(masks, y, kernel="rbf", gamma=0.4, ridge=0.2)
    c = 1e7
    kmat = _np_kernel(masks, masks, "rbf", 0.4) + c
    ref = KernelRidge(alpha=0.2, kernel="precomputed").fit(kmat, y)
    ref_pred = ref.predict(_np_kernel(new, masks, "rbf", 0.4) + c)
    np.testing.assert_allclose(np.asarray(_pr(s, new)), ref_pred, rtol=1e-6, atol=1e-6)


def test_kernel_matrix_matches_numpy(x64):
    masks, _, new = _data()
    for kernel in ("rbf", "polynomial", "linear", "linear+rbf"):
        got = kernel_matrix(new, masks, kernel=kernel, gamma=0.25, degree=3, coef0=0.5, mix=0.3,
                            linear_scale=2.5)
        ref = _np_kernel(new, masks, kernel, 0.25, 3, 0.5, mix=0.3, scale=2.5)
        np.testing.assert_allclose(got, ref, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Closed-form LOO-CV vs brute-force refits
# ---------------------------------------------------------------------------------------------
def _brute_loo(masks, y, kernel, gammas, ridges, fit_intercept, mixes=(0.0,), **kw):
    """LOO error [G, W, R, T] and LOO Spearman [G, W, R, T] by refitting without each row's mask
    (leave-one-distinct-mask-out: a duplicated mask leaves with all its copies)."""
    m, t = y.shape
    out = np.zeros((len(gammas), len(mixes), len(ridges), t))
    rho = np.zeros_like(out)
    yc = y - y.mean(0) if fit_intercept else y
    scale = (yc**2).mean(0)
    if kernel == "linear+rbf":
        kw = dict(kw, scale=masks.sum(1).mean())
    for (gi, g), (wi, w), (ri, r) in itertools.product(enumerate(gammas), enumerate(mixes),
                                                       enumerate(ridges)):
        kw["mix"] = w
        res = np.zeros((m, t))
        for i in range(m):
            keep = ~np.all(masks == masks[i], axis=1)
            xk, yk = masks[keep], y[keep]
            kk = _np_kernel(xk, xk, kernel, g, **kw)
            if fit_intercept:
                # exact intercept + kernel ridge: min ||y - b - Ka||² + r aᵀKa, via numpy lstsq
                # on the stationarity conditions  [[K+rI, 1],[1ᵀK, n]] [a; b] = [y; 1ᵀy].
                n = kk.shape[0]
                top = np.concatenate([kk + r * np.eye(n), np.ones((n, 1))], 1)
                bot = np.concatenate([kk.sum(0, keepdims=True), [[n]]], 1)
                sol = np.linalg.solve(np.concatenate([top, bot], 0), np.concatenate([yk, yk.sum(0, keepdims=True)], 0))
                a, b = sol[:-1], sol[-1]
            else:
                a = np.linalg.solve(kk + r * np.eye(len(kk)), yk)
                b = 0.0
            res[i] = _np_kernel(masks[i : i + 1], xk, kernel, g, **kw) @ a + b - y[i]
        out[gi, wi, ri] = (res**2).mean(0) / scale
        rho[gi, wi, ri] = [ss.spearmanr(y[:, j] + res[:, j], y[:, j])[0] for j in range(t)]
    return out, rho


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("kernel", ["rbf", "polynomial"])
def test_closed_form_loo_equals_brute_force_refits(x64, fit_intercept, kernel):
    masks, y, _ = _data(m=30, k=6, t=2)
    gammas, ridges = [0.1, 0.6], [0.01, 0.3, 3.0]
    s = jax.jit(
        lambda x, yy: _fk(
            x, yy, kernel=kernel, gamma=jnp.array(gammas), ridge=jnp.array(ridges), fit_intercept=fit_intercept
        )
    )(masks, y)
    ref, _ = _brute_loo(masks, y, kernel, gammas, ridges, fit_intercept)
    np.testing.assert_allclose(np.asarray(s.cv_error), ref, rtol=1e-8, atol=1e-10)


def test_grid_selection_picks_brute_force_minimiser_per_target(x64):
    rng = np.random.default_rng(3)
    m, k = 40, 6
    masks = (rng.random((m, k)) < 0.5).astype(np.float64)
    additive = masks @ rng.normal(size=k)
    parity = np.where(masks.sum(1) % 2 == 0, 1.0, -1.0)  # high-order: wants a local kernel
    y = np.stack([additive + 0.05 * rng.normal(size=m), parity], 1)
    gammas, ridges = [0.02, 0.3, 3.0], [1e-3, 1e-1, 10.0]
    ref, _ = _brute_loo(masks, y, "rbf", gammas, ridges, True)
    ref = ref[:, 0]
    s = _fk(masks, y, kernel="rbf", gamma=jnp.array(gammas), ridge=jnp.array(ridges), per_target=True)
    for t in range(2):
        gi, ri = np.unravel_index(np.argmin(ref[:, :, t]), ref.shape[:2])
        assert float(s.gamma[t]) == gammas[gi] and float(s.ridge[t]) == ridges[ri]
        # the per-target surrogate predicts like a scalar refit at the chosen pair
        single = _fk(masks, y[:, t], kernel="rbf", gamma=gammas[gi], ridge=ridges[ri])
        np.testing.assert_allclose(_pr(s, masks)[:, t], _pr(single, masks)[:, 0], rtol=1e-9, atol=1e-9)
    # the test exercises genuinely different picks per target
    assert (float(s.gamma[0]), float(s.ridge[0])) != (float(s.gamma[1]), float(s.ridge[1]))
    shared = _fk(masks, y, kernel="rbf", gamma=jnp.array(gammas), ridge=jnp.array(ridges))
    gi, ri = np.unravel_index(np.argmin(ref.mean(2)), ref.shape[:2])
    assert np.all(np.asarray(shared.gamma) == gammas[gi]) and np.all(np.asarray(shared.ridge) == ridges[ri])


@pytest.mark.parametrize("select", ["mse", "loo_spearman"])
def test_linear_rbf_loo_and_selection_equal_brute_force(x64, select):
    masks, y, _ = _data(m=26, k=6, t=2)
    gammas, mixes, ridges = [0.1, 0.8], [0.0, 0.6, 1.0], [0.03, 1.0]
    ref, rho = _brute_loo(masks, y, "linear+rbf", gammas, ridges, True, mixes=mixes)
    grids = dict(gamma=jnp.array(gammas), mix=jnp.array(mixes), ridge=jnp.array(ridges))
    s = _fk(masks, y, select=select, per_target=True, **grids)
    np.testing.assert_allclose(np.asarray(s.cv_error), ref, rtol=1e-8, atol=1e-10)
    crit = ref if select == "mse" else -rho
    if select == "loo_spearman":
        np.testing.assert_allclose(np.asarray(s.cv_spearman), rho, rtol=1e-9, atol=1e-12)
    for t in range(2):
        gi, wi, ri = np.unravel_index(np.argmin(crit[..., t]), crit.shape[:3])
        got = (float(s.gamma[t]), float(s.mix[t]), float(s.ridge[t]))
        assert got == (gammas[gi], mixes[wi], ridges[ri])
    pooled = _fk(masks, y, select=select, **grids)
    gi, wi, ri = np.unravel_index(np.argmin(crit.mean(-1)), crit.shape[:3])
    assert (float(pooled.gamma[0]), float(pooled.mix[0]), float(pooled.ridge[0])) == (
        gammas[gi], mixes[wi], ridges[ri])


def test_linear_rbf_with_mix_one_is_the_ridge_linear_surrogate(x64):
    """mix = 1: kernel <s,s'>/c, i.e. ridge regression on the masks with penalty ridge·c."""
    masks, y, new = _data()
    s = _fk(masks, y, gamma=0.3, mix=1.0, ridge=0.2)
    c = masks.sum(1).mean()
    np.testing.assert_allclose(float(s.linear_scale), c, rtol=1e-12)
    ref = Ridge(alpha=0.2 * c).fit(masks, y)
    np.testing.assert_allclose(np.asarray(_pr(s, new)), ref.predict(new), rtol=1e-9, atol=1e-9)
    # mix = 0 is the RBF kernel
    s0 = _fk(masks, y, gamma=0.3, mix=0.0, ridge=0.2)
    r0 = _fk(masks, y, kernel="rbf", gamma=0.3, ridge=0.2)
    np.testing.assert_allclose(np.asarray(_pr(s0, new)), np.asarray(_pr(r0, new)), rtol=1e-10)


def test_default_grids_and_selection_runs():
    masks, y, new = _data(m=40, k=8, dtype=np.float32)
    s = _fk(masks, y)
    assert s.spec.kernel == "linear+rbf" and s.cv_error.shape == (7, 5, 9, 3)
    np.testing.assert_allclose(s.gamma_grid, default_gamma_grid(8), rtol=1e-6)
    np.testing.assert_allclose(s.ridge_grid, default_ridge_grid(), rtol=1e-6)
    np.testing.assert_allclose(s.mix_grid, default_mix_grid(), rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(_pr(s, new))))
    gi, wi, ri = np.unravel_index(np.argmin(np.asarray(s.cv_error).mean(-1)), (7, 5, 9))
    assert np.all(np.asarray(s.gamma) == np.asarray(s.gamma_grid)[gi])
    assert np.all(np.asarray(s.mix) == np.asarray(s.mix_grid)[wi])
    assert np.all(np.asarray(s.ridge) == np.asarray(s.ridge_grid)[ri])
    assert np.isnan(np.asarray(s.cv_spearman)).all()  # only computed for select="loo_spearman"


# ---------------------------------------------------------------------------------------------
# Linear surrogate
# ---------------------------------------------------------------------------------------------
def test_linear_recovers_additive_game_exactly(x64):
    rng = np.random.default_rng(1)
    masks = (rng.random((60, 9)) < 0.5).astype(np.float64)
    w = rng.normal(size=(9, 4))
    y = 1.5 + masks @ w
    s = jax.jit(ka.fit_linear)(masks, y)
    np.testing.assert_allclose(s.coef, w, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(s.intercept, np.full(4, 1.5), rtol=1e-10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_ridge_matches_sklearn(dtype):
    masks, y, new = _data(dtype=dtype)
    with _x64_or_not(dtype):
        s = jax.jit(lambda x, yy: _fl(x, yy, ridge=2.0))(masks, y)
        pred = np.asarray(_pr(s, new))
    ref = Ridge(alpha=2.0).fit(masks.astype(np.float64), y.astype(np.float64))
    rtol, atol = tol(dtype)
    np.testing.assert_allclose(s.coef, ref.coef_.T, rtol=rtol * 10, atol=atol * 10)
    np.testing.assert_allclose(pred, ref.predict(new), rtol=rtol * 10, atol=atol * 10 * np.abs(pred).max())


def test_linear_rank_deficient_gives_min_norm_solution(x64):
    rng = np.random.default_rng(2)
    masks = (rng.random((30, 5)) < 0.5).astype(np.float64)
    masks[:, 4] = masks[:, 3]  # tasks 3 and 4 always together
    masks[:, 0] = 1.0  # task 0 always present
    y = masks @ np.array([1.0, 2.0, -1.0, 0.5, 0.5]) + rng.normal(size=30) * 0.1
    s = _fl(masks, y)
    xc = masks - masks.mean(0)
    ref = np.linalg.lstsq(xc, y - y.mean(), rcond=None)[0]
    np.testing.assert_allclose(np.asarray(s.coef)[:, 0], ref, rtol=1e-9, atol=1e-9)
    assert float(s.coef[0, 0]) == pytest.approx(0.0, abs=1e-12)
    assert float(s.coef[3, 0]) == pytest.approx(float(s.coef[4, 0]), abs=1e-10)


def test_one_dimensional_labels_give_single_target():
    masks, y, new = _data(dtype=np.float32)
    lin = _fl(masks, y[:, 0])
    ker = _fk(masks, y[:, 0], gamma=0.3, ridge=0.1)
    assert lin.coef.shape == (7, 1) and _pr(lin, new).shape == (15, 1)
    assert ker.dual_coef.shape == (48, 1) and _pr(ker, new).shape == (15, 1)
    ker2 = _fk(masks, y[:, :1], gamma=0.3, ridge=0.1)
    np.testing.assert_allclose(_pr(ker, new), _pr(ker2, new), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# vmap / retrace
# ---------------------------------------------------------------------------------------------
def test_vmap_over_label_sets_matches_loop():
    masks, y, new = _data(dtype=np.float32)
    ys = jnp.stack([y, 2.0 * y - 1.0, y**2])  # [B, m, T]
    fit = jax.jit(jax.vmap(lambda yy: _fk(masks, yy, gamma=0.3, ridge=0.1)))
    batch = fit(ys)
    preds = jax.vmap(ka.predict, in_axes=(0, None))(batch, new)
    lin = jax.vmap(lambda yy: _fl(masks, yy, ridge=0.5))(ys)
    for b in range(3):
        one = _fk(masks, ys[b], gamma=0.3, ridge=0.1)
        np.testing.assert_allclose(preds[b], _pr(one, new), rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(lin.coef[b], _fl(masks, ys[b], ridge=0.5).coef, rtol=2e-5, atol=2e-5)


def test_fit_and_predict_do_not_retrace():
    traces = {"kernel": 0, "linear": 0, "predict": 0}

    def fk(x, yy):
        traces["kernel"] += 1
        return _fk(x, yy, gamma=jnp.array([0.1, 0.5]), ridge=jnp.array([0.1, 1.0]))

    def fl(x, yy):
        traces["linear"] += 1
        return _fl(x, yy)

    def pr(s, x):
        traces["predict"] += 1
        return _pr(s, x)

    fk, fl, pr = jax.jit(fk), jax.jit(fl), jax.jit(pr)
    for seed in range(3):
        masks, y, new = _data(seed=seed, dtype=np.float32)
        s = fk(masks, y)
        fl(masks, y)
        pr(s, new)
    assert traces == {"kernel": 1, "linear": 1, "predict": 1}


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def test_bad_masks_and_labels():
    masks, y, new = _data(dtype=np.float32)
    bad = masks.copy()
    bad[0, 0] = 0.5
    with pytest.raises(ValueError, match="masks"):
        ka.fit_kernel(bad, y, gamma=0.3, ridge=0.1)
    with pytest.raises(ValueError, match="masks"):
        ka.fit_linear(bad, y)
    with pytest.raises(Exception, match="masks"):
        jax.block_until_ready(jax.jit(lambda x: ka.fit_kernel(x, y, gamma=0.3, ridge=0.1).dual_coef)(bad))
    with pytest.raises(ValueError, match="masks"):
        ka.fit_kernel(masks[0], y, gamma=0.3, ridge=0.1)
    with pytest.raises(ValueError, match="`masks` has 48 rows but `y` has 47"):
        ka.fit_kernel(masks, y[:-1], gamma=0.3, ridge=0.1)
    with pytest.raises(ValueError, match="y"):
        ka.fit_linear(masks, y[:, :, None])
    nan_y = y.copy()
    nan_y[3, 1] = np.nan
    with pytest.raises(ValueError, match="y"):
        ka.fit_kernel(masks, nan_y, gamma=0.3, ridge=0.1)
    with pytest.raises(ValueError, match="y"):
        ka.fit_linear(masks, nan_y)


def test_bad_grids_and_config():
    masks, y, _ = _data(dtype=np.float32)
    with pytest.raises(ValueError, match="gamma"):
        ka.fit_kernel(masks, y, gamma=jnp.ones((2, 2)), ridge=0.1)
    with pytest.raises(ValueError, match="ridge"):
        ka.fit_kernel(masks, y, gamma=0.1, ridge=jnp.ones((3, 1)))
    with pytest.raises(ValueError, match="ridge"):
        ka.fit_kernel(masks, y, gamma=0.1, ridge=-1.0)
    with pytest.raises(ValueError, match="ridge"):
        ka.fit_linear(masks, y, ridge=-1.0)
    with pytest.raises(ValueError, match="gamma"):
        ka.fit_kernel(masks, y, gamma=0.0, ridge=0.1)
    with pytest.raises(ValueError, match="kernel"):
        ka.fit_kernel(masks, y, kernel="laplace", gamma=0.1, ridge=0.1)
    with pytest.raises(ValueError, match="degree"):
        ka.fit_kernel(masks, y, kernel="polynomial", gamma=0.1, ridge=0.1, degree=0)
    with pytest.raises(TypeError, match="gamma"):
        ka.fit_kernel(masks, y, gamma="auto", ridge=0.1)
    with pytest.raises(ValueError, match="mix"):
        ka.fit_kernel(masks, y, gamma=0.1, ridge=0.1, mix=1.5)
    with pytest.raises(Exception, match="mix"):  # a traced mix is checked when the program runs
        jax.block_until_ready(jax.jit(lambda w: ka.fit_kernel(masks, y, gamma=0.1, ridge=0.1,
                                                              mix=w).dual_coef)(jnp.array(-0.5)))
    with pytest.raises(ValueError, match="mix"):
        ka.fit_kernel(masks, y, kernel="rbf", gamma=0.1, ridge=0.1, mix=0.5)
    with pytest.raises(ValueError, match="select"):
        ka.fit_kernel(masks, y, gamma=0.1, ridge=0.1, select="r2")


def test_zero_ridge_on_singular_kernel_raises():
    masks, y, _ = _data(dtype=np.float32)
    dup = np.concatenate([masks, masks[:5]], 0)
    ydup = np.concatenate([y, y[:5] + 1.0], 0)
    with pytest.raises(ValueError, match="ridge"):
        ka.fit_kernel(dup, ydup, gamma=0.3, ridge=0.0)
    with pytest.raises(Exception, match="ridge"):
        jax.block_until_ready(_fk(dup, ydup, gamma=0.3, ridge=0.0).dual_coef)
    # the linear kernel on K=7 tasks has rank <= 7 < m
    with pytest.raises(Exception, match="ridge"):
        jax.block_until_ready(_fk(masks, y, kernel="linear", ridge=0.0).dual_coef)
    # a grid containing 0 skips the singular point instead of failing
    s = _fk(dup, ydup, gamma=0.3, ridge=jnp.array([0.0, 0.1]))
    assert np.isinf(np.asarray(s.cv_error)[..., 0, :]).all()
    assert float(s.ridge[0]) == pytest.approx(0.1)
    # throw=False: no error, non-finite grid point flagged
    s = _fk(dup, ydup, gamma=0.3, ridge=0.0, throw=False)
    assert np.isinf(np.asarray(s.cv_error)).all()


def test_zero_ridge_on_distinct_masks_is_fine(x64):
    masks, y, new = _data(m=20, k=8)
    masks = np.unique(masks, axis=0)
    y = y[: len(masks)]
    s = _fk(masks, y, kernel="rbf", gamma=0.5, ridge=0.0, fit_intercept=False)
    np.testing.assert_allclose(np.asarray(_pr(s, masks)), y, rtol=1e-8, atol=1e-8)  # interpolates


def test_predict_bad_input():
    masks, y, new = _data(dtype=np.float32)
    s = _fk(masks, y, gamma=0.3, ridge=0.1)
    lin = _fl(masks, y)
    with pytest.raises(ValueError, match="masks"):
        ka.predict(s, new[:, :-1])
    with pytest.raises(ValueError, match="masks"):
        ka.predict(lin, new[:, :-1])
    with pytest.raises(ValueError, match="masks"):
        ka.predict(s, new * 2.0)
    with pytest.raises(TypeError, match="surrogate"):
        ka.predict({"coef": 1}, new)
