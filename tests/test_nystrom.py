"""Nyström kernel surrogate: oracles are the exact fit (L = m), brute-force leave-one-out refits
in the Nyström feature space (numpy), enumeration of all 2^K masks, and the single-device fit
for the sharded one (8 fake CPU devices)."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernattr as ka

_ny = jax.jit(ka.fit_nystrom, static_argnames=("num_landmarks", "kernel", "degree", "coef0", "block_size", "throw"))
G = jnp.array([0.1, 0.5])
R = jnp.array([1e-2, 0.3, 3.0])
W = jnp.array([0.0, 0.5])  # linear share of the default "linear+rbf" kernel


def _data(m=48, k=7, t=2, seed=0, unique=True):
    """numpy masks (distinct rows unless ``unique=False``) and labels with pair interactions."""
    rng = np.random.default_rng(seed)
    masks = (rng.random((m, k)) < 0.5).astype(np.float64)
    if unique:
        masks = np.unique(masks, axis=0)
    w = rng.normal(size=(k, t))
    y = masks @ w + masks[:, :1] * masks[:, 1:2] - masks[:, 2:3] * masks[:, 3:4] + 0.1 * rng.normal(size=(len(masks), t))
    return jnp.asarray(masks), jnp.asarray(y)  # float64 under the x64 fixture, else float32


def test_all_landmarks_equals_exact_fit(x64):
    masks, y = _data()
    m = masks.shape[0]
    ex = jax.jit(lambda x, yy: ka.fit_kernel(x, yy, gamma=G, ridge=R, mix=W))(masks, y)
    ny = _ny(jax.random.key(3), masks, y, num_landmarks=m, gamma=G, ridge=R, mix=W, block_size=5)
    assert ny.cv_error.shape == (2, 2, 3, 2)
    np.testing.assert_allclose(ny.cv_error, ex.cv_error, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(ny.gamma, ex.gamma)
    np.testing.assert_array_equal(ny.ridge, ex.ridge)
    np.testing.assert_array_equal(ny.mix, ex.mix)
    new = ka.sample_subsets(jax.random.key(9), num_tasks=7, num_subsets=20, p=0.5)
    pr = jax.jit(ka.predict)
    np.testing.assert_allclose(pr(ny, new), pr(ex, new), rtol=1e-9, atol=1e-9)
    for fn in (ka.shapley_values, ka.interaction_scores):
        np.testing.assert_allclose(jax.jit(fn)(ny), jax.jit(fn)(ex), rtol=1e-8, atol=1e-9)


def test_closed_form_loo_equals_brute_force_refits(x64):
    """L < m: the LOO residuals are those of refitting the feature-space ridge without row i."""
    masks, y = _data(m=40, k=6, t=2, seed=4)
    m, L = masks.shape[0], 12
    ny = _ny(jax.random.key(5), masks, y, num_landmarks=L, kernel="rbf", gamma=G, ridge=R, block_size=7)
    lm = np.asarray(ny.landmarks)
    X, Y = np.asarray(masks), np.asarray(y)
    # the landmarks are rows of the masks
    assert all(any((r == x).all() for x in X) for r in lm)
    out = np.zeros((2, 3, 2))
    for gi, g in enumerate(np.asarray(G)):
        kf = lambda a, b: np.exp(-g * ((a[:, None] - b[None]) ** 2).sum(-1))  # noqa: B023, E731
        d, u = np.linalg.eigh(kf(lm, lm))
        phi = kf(X, lm) @ (u / np.sqrt(d))
        for ri, r in enumerate(np.asarray(R)):
            res = np.zeros_like(Y)
            for i in range(m):
                keep = np.arange(m) != i
                A = np.concatenate([np.ones((m - 1, 1)), phi[keep]], 1)
                pen = np.diag([0.0] + [r] * L)
                coef = np.linalg.solve(A.T @ A + pen, A.T @ Y[keep])
                res[i] = np.concatenate([[1.0], phi[i]]) @ coef - Y[i]
            out[gi, ri] = (res**2).mean(0) / Y.var(0)
    np.testing.assert_allclose(ny.cv_error[:, 0], out, rtol=1e-7)
    best = np.unravel_index(np.argmin(out.mean(2)), out.shape[:2])
    assert float(ny.gamma[0]) == float(G[best[0]]) and float(ny.ridge[0]) == float(R[best[1]])


def test_attributions_exact_for_the_nystrom_surrogate(x64):
    masks, y = _data(m=40, k=6, t=1, seed=7)
    ny = _ny(jax.random.key(1), masks, y, num_landmarks=10, gamma=0.4, ridge=0.1)
    allm = jnp.asarray(np.array(list(itertools.product([0, 1], repeat=6)), float))
    v = np.asarray(jax.jit(ka.predict)(ny, allm))[:, 0]
    index = {tuple(r): i for i, r in enumerate(np.asarray(allm).astype(int))}
    shap = np.zeros(6)
    for r in np.asarray(allm).astype(int):
        for j in np.flatnonzero(r == 0):
            r2 = r.copy()
            r2[j] = 1
            w = math.factorial(r.sum()) * math.factorial(6 - r.sum() - 1) / math.factorial(6)
            shap[j] += w * (v[index[tuple(r2)]] - v[index[tuple(r)]])
    np.testing.assert_allclose(np.asarray(jax.jit(ka.shapley_values)(ny))[:, 0], shap, rtol=1e-9, atol=1e-12)


def test_sharded_equals_single_device(x64):
    masks, y = _data(m=64, k=8, t=3, seed=11, unique=False)
    kw = dict(num_landmarks=24, gamma=G, ridge=R, mix=W, block_size=3)
    ref = _ny(jax.random.key(2), masks, y, **kw)
    mesh = ka.data_mesh()
    ms, ys = ka.shard_examples((masks, y), mesh)
    got = _ny(jax.random.key(2), ms, ys, **kw)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-9)
    # the statistics really were computed on 8 devices (input stayed sharded), output replicated
    assert ms.sharding.spec[0] == "data" and len(ms.addressable_shards) == 8
    assert got.surrogate.dual_coef.sharding.is_fully_replicated


def test_vmap_over_label_sets_and_no_retrace():
    masks, y = _data(m=32, k=6, t=1, seed=2)
    traces = []

    def fit(key, x, yy):
        traces.append(1)
        return ka.fit_nystrom(key, x, yy, num_landmarks=8, gamma=0.3, ridge=0.1).surrogate.dual_coef

    f = jax.jit(fit)
    ys = jnp.stack([y[:, 0], 2.0 * y[:, 0], -y[:, 0]])
    batched = jax.vmap(f, in_axes=(None, None, 0))(jax.random.key(0), masks, ys)
    for i in range(3):
        np.testing.assert_allclose(batched[i], f(jax.random.key(0), masks, ys[i]), rtol=1e-4, atol=1e-5)
    n = len(traces)
    f(jax.random.key(1), masks + 0.0, ys[1])
    assert len(traces) == n


def test_bad_input():
    masks, y = _data(m=20, k=5, t=1)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="num_landmarks"):
        ka.fit_nystrom(key, masks, y, num_landmarks=masks.shape[0] + 1)
    with pytest.raises(TypeError, match="num_landmarks"):
        ka.fit_nystrom(key, masks, y, num_landmarks=4.0)
    with pytest.raises(TypeError, match="key"):
        ka.fit_nystrom(0, masks, y, num_landmarks=4)
    with pytest.raises(ValueError, match="gamma"):
        ka.fit_nystrom(key, masks, y, num_landmarks=4, gamma=-1.0)
    with pytest.raises(ValueError, match="0 and 1"):
        ka.fit_nystrom(key, masks.at[0, 0].set(0.5), y, num_landmarks=4)
    with pytest.raises(ValueError, match="rows"):
        ka.fit_nystrom(key, masks, y[:-1], num_landmarks=4)
    # traced bad values are errors under jit too, never numbers
    f = jax.jit(lambda x, yy, g, r: ka.fit_nystrom(key, x, yy, num_landmarks=4, gamma=g, ridge=r))
    with pytest.raises(Exception, match="gamma"):
        jax.block_until_ready(f(masks, y, -0.5, 0.1))
    with pytest.raises(Exception, match="ridge"):
        jax.block_until_ready(f(masks, y, 0.5, jnp.nan))
    with pytest.raises(Exception, match="non-finite"):
        jax.block_until_ready(f(masks, y.at[0, 0].set(jnp.nan), 0.5, 0.1))


def test_fit_kernel_dispatches_to_nystrom_and_cg(x64):
    masks, y = _data(m=40, k=6, t=1, seed=8)
    key = jax.random.key(4)
    kw = dict(kernel="rbf", gamma=0.4, ridge=0.1)
    via = jax.jit(lambda x, yy: ka.fit_kernel(x, yy, num_landmarks=10, key=key, **kw))(masks, y)
    direct = _ny(key, masks, y, num_landmarks=10, **kw)
    assert isinstance(via, ka.NystromSurrogate)
    np.testing.assert_allclose(via.surrogate.dual_coef, direct.surrogate.dual_coef, rtol=1e-10, atol=1e-12)
    cg = jax.jit(lambda x, yy: ka.fit_kernel(x, yy, num_landmarks=10, key=key, solver="cg", **kw))(masks, y)
    exact = jax.jit(lambda x, yy: ka.fit_kernel(x, yy, **kw))(masks, y)
    assert isinstance(cg, ka.KernelSurrogate)
    np.testing.assert_allclose(cg.dual_coef, exact.dual_coef, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="key"):
        ka.fit_kernel(masks, y, num_landmarks=10)
    with pytest.raises(ValueError, match="per_target"):
        ka.fit_kernel(masks, y, num_landmarks=10, key=key, per_target=True)
    with pytest.raises(ValueError, match="solver"):
        ka.fit_kernel(masks, y, solver="lu")
