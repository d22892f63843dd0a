"""GP posterior of kernel surrogates: oracles are scikit-learn's GaussianProcessRegressor, a numpy
formula (intercept included), enumeration of all 2^K masks for the attribution intervals, refits
for the fantasised updates of select_masks; calibration on synthetic games."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import RBF

import kernattr as ka
from _jitted import fit_kernel as _fk
from _select_oracle import greedy_refit_picks

K = 6
ALL = np.array(list(itertools.product([0, 1], repeat=K)), np.float64)
_pv = jax.jit(ka.posterior_variance, static_argnames=("include_noise",))
_fn = jax.jit(ka.fit_nystrom, static_argnames=("num_landmarks", "kernel", "block_size"))
_ai = jax.jit(ka.attribution_intervals, static_argnames=("kind", "level"))


def _data(m=32, t=2, seed=0):
    """m distinct masks of K tasks (fixed shapes, so the jitted functions compile once)."""
    rng = np.random.default_rng(seed)
    masks = ALL[rng.choice(len(ALL), m, replace=False)]
    y = masks @ rng.normal(size=(K, t)) + masks[:, :1] * masks[:, 1:2] + 0.1 * rng.normal(size=(m, t))
    return jnp.asarray(masks), jnp.asarray(y)


def _np_kernel(a, b, g, mix=0.0, c=1.0):
    """rbf, or mix·<a,b>/c + (1-mix)·rbf ("linear+rbf")."""
    a, b = np.asarray(a), np.asarray(b)
    return mix / c * (a @ b.T) + (1 - mix) * np.exp(-g * ((a[:, None] - b[None]) ** 2).sum(-1))


def test_variance_matches_sklearn_gp_without_intercept(x64):
    masks, y = _data()
    s = _fk(masks, y, kernel="rbf", gamma=0.3, ridge=0.1, fit_intercept=False)
    gp = GaussianProcessRegressor(RBF(length_scale=np.sqrt(1 / (2 * 0.3))), alpha=0.1, optimizer=None).fit(masks, y)
    _, std = gp.predict(ALL, return_std=True)
    var = np.asarray(_pv(s, jnp.asarray(ALL)))
    # same shape over masks; the scale σ_f² (per target) is calibrated on the LOO residuals
    np.testing.assert_allclose(var / var[:1], (std**2) / (std[:1] ** 2), rtol=1e-9)
    X, Y = np.asarray(masks), np.asarray(y)
    Ai = np.linalg.inv(_np_kernel(X, X, 0.3) + 0.1 * np.eye(len(X)))
    alpha = Ai @ Y
    sf2 = (alpha**2 / np.diag(Ai)[:, None]).mean(0)
    np.testing.assert_allclose(var, std**2 * sf2[None, :], rtol=1e-9)
    noisy = np.asarray(_pv(s, jnp.asarray(ALL), include_noise=True))
    np.testing.assert_allclose(noisy - var, np.broadcast_to(0.1 * sf2, var.shape), rtol=1e-9)


def test_variance_with_intercept_matches_numpy_and_nystrom_at_all_landmarks(x64):
    masks, y = _data(seed=1)
    X, Y, m = np.asarray(masks), np.asarray(y), masks.shape[0]
    s = _fk(masks, y, kernel="rbf", gamma=0.3, ridge=0.1)
    Ai = np.linalg.inv(_np_kernel(X, X, 0.3) + 0.1 * np.eye(m))
    one = np.ones(m)
    c = one @ Ai @ one
    ks = _np_kernel(ALL, X, 0.3)
    shape = 1 - np.einsum("ij,jk,ik->i", ks, Ai, ks) + (1 - ks @ Ai @ one) ** 2 / c
    P = Ai - np.outer(Ai @ one, Ai @ one) / c
    alpha = P @ Y
    sf2 = (alpha**2 / np.diag(P)[:, None]).mean(0)
    var = np.asarray(_pv(s, jnp.asarray(ALL)))
    np.testing.assert_allclose(var, shape[:, None] * sf2[None, :], rtol=1e-9)
    ny = _fn(jax.random.key(0), masks, y, num_landmarks=m, kernel="rbf", gamma=0.3, ridge=0.1)
    np.testing.assert_allclose(_pv(ny, jnp.asarray(ALL), include_noise=True), _pv(s, jnp.asarray(ALL), include_noise=True), rtol=1e-8)


def _functional_weights(kind):
    """[K, 2^K] weights of LOO or Shapley as linear functionals of the game values."""
    index = {tuple(r): i for i, r in enumerate(ALL.astype(int))}
    w = np.zeros((K, len(ALL)))
    for r in ALL.astype(int):
        if kind == "loo":
            break
        for j in np.flatnonzero(r == 0):
            r2 = r.copy()
            r2[j] = 1
            c = math.factorial(r.sum()) * math.factorial(K - r.sum() - 1) / math.factorial(K)
            w[j, index[tuple(r2)]] += c
            w[j, index[tuple(r)]] -= c
    if kind == "loo":
        for j in range(K):
            r = np.ones(K, int)
            r[j] = 0
            w[j, index[(1,) * K]] += 1
            w[j, index[tuple(r)]] -= 1
    return w


@pytest.mark.parametrize("kind,kernel", [("shapley", "rbf"), ("loo", "rbf"), ("shapley", "linear+rbf")])
def test_attribution_intervals_equal_enumerated_posterior(x64, kind, kernel):
    """std² = wᵀ Cov w over all 2^K masks, with the posterior covariance Cov built in numpy
    (exact GP with intercept; Nyström feature model plus the residual kernel)."""
    masks, y = _data(seed=2)
    w = _functional_weights(kind)
    kw = dict(kernel=kernel, gamma=0.3, ridge=0.1, mix=0.5 if kernel == "linear+rbf" else None)
    ex = _fk(masks, y, **kw)
    ny = _fn(jax.random.key(1), masks, y, num_landmarks=12, **kw)
    for s in (ex, ny):
        got = _ai(s, kind=kind)
        cov = _np_posterior_cov(s, ALL)
        sf2 = np.asarray(_pv(s, jnp.asarray(ALL[:1])))[0] / cov[0, 0]
        ref = np.sqrt(np.einsum("ja,ab,jb->j", w, cov, w)[:, None] * sf2[None, :])
        np.testing.assert_allclose(got.std, ref, rtol=1e-7, atol=1e-12)
        np.testing.assert_allclose(got.upper - got.value, 1.959963984540054 * ref, rtol=1e-7, atol=1e-12)


def _np_posterior_cov(s, Q):
    """Unscaled posterior covariance of g over masks Q, in numpy."""
    base = s.surrogate if isinstance(s, ka.NystromSurrogate) else s
    g, lam = float(base.gamma[0]), float(base.ridge[0])
    kw = dict(mix=float(base.mix[0]), c=float(base.linear_scale))
    if isinstance(s, ka.NystromSurrogate):
        lm = np.asarray(s.landmarks)
        phi = _np_kernel(Q, lm, g, **kw) @ np.asarray(s.feature_map)
        psi = (phi - np.asarray(s.feature_mean)) @ np.asarray(s.eigvecs)
        d = np.asarray(s.eigvals)
        resid = _np_kernel(Q, Q, g, **kw) - phi @ phi.T
        return resid + lam / float(s.num_train) + lam * (psi / (d + lam)) @ psi.T
    X = np.asarray(s.masks)
    Ai = np.linalg.inv(_np_kernel(X, X, g, **kw) + lam * np.eye(len(X)))
    one = np.ones(len(X))
    ks = _np_kernel(Q, X, g, **kw)
    u = 1 - ks @ Ai @ one
    return _np_kernel(Q, Q, g, **kw) - ks @ Ai @ ks.T + np.outer(u, u) / (one @ Ai @ one)


def _coverage(key):
    """Fraction of held-out noisy labels inside the 95% predictive intervals (exact, Nyström)."""
    kg, km, kt, ky, kyt, kl = jax.random.split(key, 6)
    game = ka.synthetic_game(kg, num_tasks=12, num_targets=4, noise=0.2)
    masks = ka.sample_subsets(km, num_tasks=12, num_subsets=200, p=0.5)
    test = ka.sample_subsets(kt, num_tasks=12, num_subsets=400, p=0.5)
    y, yt = game.evaluate(masks, ky), game.evaluate(test, kyt)
    out = []
    for s in (ka.fit_kernel(masks, y), ka.fit_nystrom(kl, masks, y, num_landmarks=120)):
        z = (yt - ka.predict(s, test)) / jnp.sqrt(ka.posterior_variance(s, test, include_noise=True))
        out.append(jnp.mean(jnp.abs(z) <= 1.96))
    return jnp.stack(out)


def test_calibration_on_synthetic_games():
    """Held-out z-scores of noisy labels cover at about the stated 95% (LOO-calibrated scale)."""
    cover = np.asarray(jax.jit(_coverage)(jax.random.key(0)))
    assert np.all((cover >= 0.90) & (cover <= 0.99)), cover


def test_select_masks_equals_refits_and_vmaps(x64):
    """Fantasised updates equal the variance after really adding the picked masks (numpy refits)."""
    masks, y = _data(seed=3)
    rng = np.random.default_rng(0)
    pool = (rng.random((30, K)) < 0.5).astype(np.float64)
    s = _fk(masks, y, kernel="rbf", gamma=0.3, ridge=0.1)
    for criterion in ("variance", "integrated"):
        picked = np.asarray(
            jax.jit(lambda s_, c: ka.select_masks(jax.random.key(0), s_, 3, candidates=c, criterion=criterion))(s, pool)
        )
        ref = greedy_refit_picks(lambda cur: _np_gp_cov(cur, pool, 0.3, 0.1), masks, pool, 3, criterion, 0.1)
        np.testing.assert_array_equal(picked, ref)
    keys = jax.random.split(jax.random.key(2), 2)
    sel = jax.jit(jax.vmap(lambda k: ka.select_masks(k, s, 4, num_candidates=32)))
    batch = np.asarray(sel(keys))
    assert batch.shape == (2, 4, K) and set(np.unique(batch)) <= {0.0, 1.0}
    single = jax.jit(lambda k: ka.select_masks(k, s, 4, num_candidates=32))(keys[1])
    np.testing.assert_array_equal(batch[1], single)


def _np_gp_cov(X, Q, g, lam):
    """Unscaled exact-GP posterior covariance over Q given training masks X (intercept)."""
    Ai = np.linalg.inv(_np_kernel(X, X, g) + lam * np.eye(len(X)))
    one = np.ones(len(X))
    ks = _np_kernel(Q, X, g)
    u = 1 - ks @ Ai @ one
    return _np_kernel(Q, Q, g) - ks @ Ai @ ks.T + np.outer(u, u) / (one @ Ai @ one)


def test_bad_input():
    masks, y = _data()
    s = _fk(masks, y, gamma=0.3, ridge=0.1)
    with pytest.raises(TypeError, match="surrogate"):
        ka.posterior_variance(ka.LinearSurrogate(jnp.zeros((K, 2)), jnp.zeros(2)), masks)
    with pytest.raises(ValueError, match="task columns"):
        ka.posterior_variance(s, masks[:, :3])
    with pytest.raises(ValueError, match="kind"):
        ka.attribution_intervals(s, kind="banzhaf")
    with pytest.raises(ValueError, match="level"):
        ka.attribution_intervals(s, level=1.5)
    with pytest.raises(ValueError, match="Shapley intervals"):
        ka.attribution_intervals(s._replace(spec=s.spec.__class__(kernel="polynomial")))
    with pytest.raises(ValueError, match="one bandwidth"):
        ka.posterior_variance(s._replace(spec=s.spec.__class__(shared_gamma=False)), masks)
    with pytest.raises(ValueError, match="exceeds"):
        ka.select_masks(jax.random.key(0), s, 10, candidates=masks[:5])
    with pytest.raises(ValueError, match="criterion"):
        ka.select_masks(jax.random.key(0), s, 1, criterion="entropy")
    with pytest.raises(TypeError, match="key"):
        ka.select_masks(0, s, 1)
    # traced bad values are errors under jit too: masks not 0/1, per-target ridges
    with pytest.raises(Exception, match="0 and 1"):
        jax.block_until_ready(_pv(s, masks.at[0, 0].set(0.5)))
    with pytest.raises(Exception, match="one \\(gamma, ridge\\)"):
        jax.block_until_ready(_pv(s._replace(ridge=jnp.array([0.1, 0.2])), masks))


def test_what_fits_has_a_posterior_float32_linear_kernel():
    """issue 26 row 2: one singularity rule for the fit and the posterior. The linear kernel on
    K=30 tasks has rank 30 << m = 2000; ridge 1e-3 fits in float32, so the posterior exists."""
    masks = ka.sample_subsets(jax.random.key(0), num_tasks=30, num_subsets=2000, p=0.5)
    y = masks @ jnp.linspace(-1.0, 1.0, 30) + 0.1 * jax.random.normal(jax.random.key(1), (2000,))
    s = jax.jit(lambda a, b: ka.fit_kernel(a, b, kernel="linear", ridge=1e-3))(masks, y)
    probe = ka.leave_one_out_masks(30)
    var = jax.jit(ka.posterior_variance)(s, probe)
    assert bool(jnp.all(jnp.isfinite(var)) & jnp.all(var >= 0))
    iv = ka.attribution_intervals(s, kind="shapley")
    assert bool(jnp.all(jnp.isfinite(iv.std)))
    # the linear surrogate's Shapley values are its coefficients; the interval is narrow
    np.testing.assert_allclose(iv.value[:, 0], np.linspace(-1.0, 1.0, 30), atol=0.05)
    picks = ka.select_masks(jax.random.key(2), s, 3, num_candidates=64)
    assert picks.shape == (3, 30)
