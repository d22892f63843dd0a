"""Matrix-free Nyström-preconditioned CG: oracles are a direct numpy solve and the exact
fit_kernel; the sharded solve (8 fake CPU devices) equals the single-device one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernattr as ka

_STATIC = ("kernel", "degree", "coef0", "num_landmarks", "tol", "max_iter", "block_size", "throw")
_cg = jax.jit(ka.solve_kernel_cg, static_argnames=_STATIC)


def _data(m=96, k=8, t=2, seed=0):
    rng = np.random.default_rng(seed)
    masks = (rng.random((m, k)) < 0.5).astype(np.float64)
    y = masks @ rng.normal(size=(k, t)) + masks[:, :1] * masks[:, 1:2] + 0.1 * rng.normal(size=(m, t))
    return jnp.asarray(masks), jnp.asarray(y)


def _np_kernel(a, b, g):
    return np.exp(-g * ((np.asarray(a)[:, None] - np.asarray(b)[None]) ** 2).sum(-1))


def test_cg_equals_direct_solve_and_preconditioner_helps(x64):
    masks, y = _data()
    ref = np.linalg.solve(_np_kernel(masks, masks, 0.2) + 0.01 * np.eye(96), np.asarray(y))
    plain = _cg(jax.random.key(1), masks, y, gamma=0.2, ridge=0.01, num_landmarks=None, block_size=10, max_iter=1000)
    pre = _cg(jax.random.key(1), masks, y, gamma=0.2, ridge=0.01, num_landmarks=32, block_size=10, max_iter=1000)
    for r in (plain, pre):
        assert bool(r.converged) and np.all(np.asarray(r.residual) <= 1e-8)
        np.testing.assert_allclose(r.solution, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    assert int(pre.num_iter) < int(plain.num_iter)


def test_fit_kernel_cg_equals_exact_fit(x64):
    masks, y = _data(seed=3)
    new = jnp.asarray((np.random.default_rng(9).random((12, 8)) < 0.5).astype(np.float64))
    kw = dict(kernel="linear+rbf", gamma=0.3, ridge=0.05, mix=0.5)
    ex = jax.jit(lambda x, yy: ka.fit_kernel(x, yy, **kw))(masks, y)
    cg = jax.jit(lambda k, x, yy: ka.fit_kernel_cg(k, x, yy, num_landmarks=24, **kw))(
        jax.random.key(0), masks, y
    )
    # Copies of a mask share its coefficient in the exact fit (only their sum enters any
    # prediction); CG solves the row system, so compare the sums per distinct mask.
    _, inv = np.unique(np.asarray(masks), axis=0, return_inverse=True)
    onehot = np.eye(int(inv.max()) + 1)[inv.ravel()]  # [m, u]
    np.testing.assert_allclose(onehot.T @ np.asarray(cg.dual_coef), onehot.T @ np.asarray(ex.dual_coef),
                               rtol=1e-5, atol=1e-6)
    pr = jax.jit(ka.predict)
    np.testing.assert_allclose(pr(cg, new), pr(ex, new), rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(float(jnp.sum(cg.dual_coef)), 0.0, atol=1e-8)


def test_sharded_equals_single_device(x64):
    masks, y = _data(m=64, seed=5)
    kw = dict(gamma=0.2, ridge=0.01, num_landmarks=16, block_size=3)
    ref = _cg(jax.random.key(2), masks, y, **kw)
    ms, ys = ka.shard_examples((masks, y), ka.data_mesh())
    got = _cg(jax.random.key(2), ms, ys, **kw)
    assert got.solution.sharding.spec[0] == "data" and len(got.solution.addressable_shards) == 8
    assert abs(int(got.num_iter) - int(ref.num_iter)) <= 1  # the stopping test sits on rounding
    np.testing.assert_allclose(got.solution, ref.solution, rtol=1e-6, atol=1e-7)


def test_not_converged_and_bad_input():
    masks, y = _data(m=32, seed=1)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="did not reach"):
        ka.solve_kernel_cg(key, masks, y, gamma=0.2, ridge=1e-3, num_landmarks=None, max_iter=1)
    r = _cg(key, masks, y, gamma=0.2, ridge=1e-3, num_landmarks=None, max_iter=1, throw=False)
    assert not bool(r.converged) and int(r.num_iter) == 1
    with pytest.raises(Exception, match="did not reach"):
        jax.block_until_ready(_cg(key, masks, y, gamma=0.2, ridge=1e-3, num_landmarks=None, max_iter=1))
    with pytest.raises(ValueError, match="ridge"):
        ka.solve_kernel_cg(key, masks, y, gamma=0.2, ridge=0.0)
    with pytest.raises(ValueError, match="scalar"):
        ka.solve_kernel_cg(key, masks, y, gamma=jnp.array([0.1, 0.2]), ridge=0.1)
    with pytest.raises(Exception, match="gamma"):
        jax.block_until_ready(_cg(key, masks, y, gamma=-0.2, ridge=0.1, num_landmarks=None, max_iter=1, throw=False))
    with pytest.raises(ValueError, match="rows"):
        ka.solve_kernel_cg(key, masks, y[:-1], gamma=0.2, ridge=0.1)
