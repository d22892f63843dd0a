"""Pairwise (degree <= 2 Walsh) surrogate: oracles are a numpy ridge regression on the explicit
features with brute-force leave-one-out refits, the exact RBF kernel fit at K = 2 (where degree
<= 2 is the whole Walsh basis), enumeration of all 2^K masks for the attributions, and the
single-device fit for the sharded one (8 fake CPU devices)."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernattr as ka
from _select_oracle import greedy_refit_picks

_fit = jax.jit(ka.fit_quadratic, static_argnames=("block_size", "throw", "ard_steps"))


def _data(m=40, k=5, t=2, seed=0):
    rng = np.random.default_rng(seed)
    masks = (rng.random((m, k)) < 0.5).astype(np.float64)
    w = rng.normal(size=(k, t))
    y = masks @ w + 2.0 * masks[:, :1] * masks[:, 1:2] + 0.1 * rng.normal(size=(m, t))
    if k >= 4:
        y = y - masks[:, 2:3] * masks[:, 3:4]
    return jnp.asarray(masks), jnp.asarray(y)


def _features(masks, ratio):
    """numpy Walsh features scaled by the prior standard deviations."""
    masks = np.asarray(masks, np.float64)
    k = masks.shape[1]
    c = 2.0 * masks - 1.0
    iu, ju = np.triu_indices(k, 1)
    x = np.concatenate([c, c[:, iu] * c[:, ju]], axis=1)
    p = len(iu)
    v = np.concatenate([np.ones(k), ratio * np.ones(p)]) / (k + ratio * p)
    return x * np.sqrt(v)


def _ridge(x, y, lam):
    """Ridge with an unpenalised intercept: (b, w)."""
    xm, ym = x.mean(0), y.mean(0)
    xc = x - xm
    w = np.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ (y - ym))
    return ym - xm @ w, w


def test_matches_numpy_ridge_and_brute_force_loo(x64):
    masks, y = _data()
    ratios, ridges = jnp.array([0.0, 0.05, 0.5]), jnp.array([1e-2, 0.3])
    s = _fit(masks, y, ratio=ratios, ridge=ridges, block_size=7)  # several blocks, a padded one
    m = masks.shape[0]
    yn = np.asarray(y)
    # leave-one-out MSE / variance at every grid point, by m refits each
    for qi, q in enumerate(np.asarray(ratios)):
        x = _features(masks, q)
        for ri, lam in enumerate(np.asarray(ridges)):
            err = np.zeros(yn.shape[1])
            for i in range(m):
                keep = np.arange(m) != i
                b, w = _ridge(x[keep], yn[keep], lam)
                err += (yn[i] - b - x[i] @ w) ** 2
            want = err / m / yn.var(0)
            np.testing.assert_allclose(s.cv_error[qi, ri], want, rtol=1e-7)
    # the chosen point's fit, evaluated on fresh masks through ka.predict
    q, lam = float(s.ratio[0]), float(s.ridge[0])
    assert q in np.asarray(ratios).tolist() and lam in np.asarray(ridges).tolist()
    best = np.unravel_index(np.argmin(np.asarray(s.cv_error).mean(-1)), s.cv_error.shape[:2])
    assert (ratios[best[0]], ridges[best[1]]) == (q, lam)
    b, w = _ridge(_features(masks, q), yn, lam)
    new = np.asarray(list(itertools.product([0.0, 1.0], repeat=5)))
    np.testing.assert_allclose(ka.predict(s, new), b + _features(new, q) @ w, rtol=1e-8, atol=1e-9)


def test_equals_exact_rbf_kernel_fit_when_degree_two_is_everything(x64):
    """At K = 2 the Walsh functions of degree <= 2 are all of them: the truncated kernel is the
    RBF kernel without its constant (absorbed by the intercept), rescaled to unit diagonal."""
    masks, y = _data(m=30, k=2, t=3, seed=4)
    gamma, lam = 0.7, 0.2
    a = (1.0 + math.exp(-gamma)) / 2.0
    grid = jnp.asarray(list(itertools.product([0.0, 1.0], repeat=2)))
    readouts = (ka.loo_scores, ka.shapley_values, ka.banzhaf_values, ka.interaction_scores)

    @jax.jit
    def both(masks, y):
        quad = ka.fit_quadratic(masks, y, ratio=math.tanh(gamma / 2.0), ridge=lam)
        kern = ka.fit_kernel(masks, y, kernel="rbf", gamma=gamma, ridge=lam * (1.0 - a * a))
        return [[ka.predict(s, grid)] + [fn(s) for fn in readouts] for s in (quad, kern)]

    quad, kern = both(masks, y)
    for got, want in zip(quad, kern):  # predictions on every mask, then each attribution
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-9)


def _enumerate(s, k):
    """Attributions of the surrogate game by enumerating all 2^K masks (numpy)."""
    grid = np.asarray(list(itertools.product([0, 1], repeat=k)), np.float64)
    val = {tuple(r.astype(int)): v for r, v in zip(grid, np.asarray(ka.predict(s, grid)))}
    full = (1,) * k

    def drop(*ks):
        return tuple(0 if i in ks else 1 for i in range(k))

    loo = np.stack([val[full] - val[drop(j)] for j in range(k)])
    shap, banz = np.zeros_like(loo), np.zeros_like(loo)
    for j in range(k):
        for r in grid:
            if r[j]:
                continue
            n = int(r.sum())
            without = tuple(r.astype(int))
            with_j = tuple(int(v) if i != j else 1 for i, v in enumerate(without))
            gain = val[with_j] - val[without]
            shap[j] += math.factorial(n) * math.factorial(k - n - 1) / math.factorial(k) * gain
            banz[j] += gain / 2 ** (k - 1)
    inter = np.zeros((k, k) + loo.shape[1:])
    for i in range(k):
        for j in range(k):
            if i != j:
                inter[i, j] = val[full] - val[drop(i)] - val[drop(j)] + val[drop(i, j)]
    return loo, shap, banz, inter


def test_attributions_equal_enumeration_and_run_under_jit(x64):
    masks, y = _data(m=60, k=5, t=2, seed=2)
    s = ka.fit_quadratic(masks, y, ratio=0.3, ridge=0.05)
    loo, shap, banz, inter = _enumerate(s, 5)
    for fn, want in ((ka.loo_scores, loo), (ka.shapley_values, shap), (ka.banzhaf_values, banz),
                     (ka.interaction_scores, inter)):
        np.testing.assert_allclose(fn(s), want, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(jax.jit(fn)(s), want, rtol=1e-9, atol=1e-10)
    # efficiency: Shapley values sum to g(1) - g(0)
    ends = ka.predict(s, jnp.stack([jnp.ones(5), jnp.zeros(5)]))
    np.testing.assert_allclose(shap.sum(0), ends[0] - ends[1], rtol=1e-9)
    # the designed interaction is found: task 0 x 1 synergy, 2 x 3 antagonism
    assert float(s.pairwise[0, 1, 0]) > 1.0 and float(s.pairwise[2, 3, 0]) < -0.5


def test_jit_equals_eager_and_recovers_a_pairwise_game():
    game = ka.synthetic_game(jax.random.key(3), num_tasks=10, num_targets=2, kind="interaction", noise=0.0)
    tr = ka.sample_subsets(jax.random.key(4), num_tasks=10, num_subsets=400, p=0.5)
    te = ka.sample_subsets(jax.random.key(5), num_tasks=10, num_subsets=200, p=0.5)
    y_tr, y_te = game.evaluate(tr, jax.random.key(6)), game.evaluate(te, jax.random.key(7))
    eager = ka.fit_quadratic(tr, y_tr)
    jitted = jax.jit(ka.fit_quadratic)(tr, y_tr)
    for name in ("linear", "pairwise", "intercept", "ratio", "ridge", "cv_error", "noise_var"):
        np.testing.assert_allclose(getattr(eager, name), getattr(jitted, name), rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(ka.posterior_variance(eager, te[:20]),
                               jax.jit(ka.posterior_variance)(jitted, te[:20]), rtol=1e-3, atol=1e-9)
    quad = float(ka.lds(ka.predict(eager, te), y_te).mean)
    lin = float(ka.lds(ka.predict(ka.fit_linear(tr, y_tr), te), y_te).mean)
    assert float(eager.ratio[0]) > 0 and quad > lin + 0.05, (quad, lin)


def test_sharded_equals_single_device(x64):
    masks, y = _data(m=64, k=6, t=2, seed=7)
    kw = dict(ratio=jnp.array([0.0, 0.1, 1.0]), ridge=jnp.array([1e-2, 1.0]), block_size=3)
    ref = _fit(masks, y, **kw)
    ms, ys = ka.shard_examples((masks, y), ka.data_mesh())
    got = _fit(ms, ys, **kw)
    assert ms.sharding.spec[0] == "data" and len(ms.addressable_shards) == 8
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-9)


def test_bad_input():
    masks, y = _data(m=20, k=5, t=1)
    masks, y = masks.astype(jnp.float32), y.astype(jnp.float32)
    with pytest.raises(ValueError, match="ratio"):
        ka.fit_quadratic(masks, y, ratio=-0.1)
    with pytest.raises(ValueError, match="ridge"):
        ka.fit_quadratic(masks, y, ridge=jnp.array([0.1, jnp.inf]))
    with pytest.raises(ValueError, match="0 and 1"):
        ka.fit_quadratic(masks.at[0, 0].set(0.5), y)
    with pytest.raises(ValueError, match="rows"):
        ka.fit_quadratic(masks, y[:-1])
    with pytest.raises(ValueError, match="non-finite"):
        ka.fit_quadratic(masks, y.at[3, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="at most 200 tasks"):
        ka.fit_quadratic(jnp.zeros((4, 201)), jnp.zeros(4))
    # 20 masks, 15 features, ratio 0 leaves the pair block without prior: ridge 0 is singular
    with pytest.raises(ValueError, match="ridge` too small"):
        ka.fit_quadratic(masks, y, ratio=0.0, ridge=0.0)
    s = ka.fit_quadratic(masks, y, ratio=0.0, ridge=0.0, throw=False)
    assert np.isinf(s.cv_error).all() and np.isnan(s.linear).all()
    with pytest.raises(TypeError, match="QuadraticSurrogate"):
        ka.shapley_values(object())
    s = ka.fit_quadratic(masks, y, ridge=1.0)
    with pytest.raises(ValueError, match="5"):
        ka.predict(s, jnp.ones((2, 4)))
    # traced bad values are errors under jit too, never numbers
    f = jax.jit(lambda x, yy, q, r: ka.fit_quadratic(x, yy, ratio=q, ridge=r))
    with pytest.raises(Exception, match="ratio"):
        jax.block_until_ready(f(masks, y, -0.5, 0.1))
    with pytest.raises(Exception, match="ridge"):
        jax.block_until_ready(f(masks, y, 0.5, jnp.nan))
    with pytest.raises(Exception, match="non-finite"):
        jax.block_until_ready(f(masks, y.at[0, 0].set(jnp.nan), 0.5, 0.1))
    with pytest.raises(Exception, match="ratio"):
        jax.block_until_ready(jax.vmap(lambda q: f(masks, y, q, 0.1).linear)(jnp.array([0.1, -1.0])))


def test_posterior_equals_bayesian_linear_regression_and_loo_calibration(x64):
    """Posterior variance and attribution intervals against a numpy Bayesian linear regression
    on [1, scaled Walsh features] with a (nearly) flat prior on the intercept; the noise variance
    against brute-force leave-one-out residuals."""
    masks, y = _data(m=50, k=5, t=2, seed=9)
    q, lam = 0.2, 0.05
    s = ka.fit_quadratic(masks, y, ratio=q, ridge=lam)
    x = _features(masks, q)
    z = np.concatenate([np.ones((len(x), 1)), x], axis=1)
    prec = z.T @ z + np.diag(np.r_[1e-10, lam * np.ones(x.shape[1])])
    cov = np.linalg.inv(prec)  # times sigma_n^2
    # noise variance: mean_i r_i^2 (1 - H_ii) with brute-force LOO residuals r_i
    yn, m = np.asarray(y), len(x)
    hat = np.einsum("id,de,ie->i", z, cov, z)
    r = np.stack([yn[i] - (lambda bw: bw[0] + x[i] @ bw[1])(_ridge(np.delete(x, i, 0), np.delete(yn, i, 0), lam))
                  for i in range(m)])
    noise = np.mean(r ** 2 * (1.0 - hat)[:, None], axis=0)
    np.testing.assert_allclose(s.noise_var, noise, rtol=1e-6)
    grid = np.asarray(list(itertools.product([0.0, 1.0], repeat=5)))
    zq = np.concatenate([np.ones((len(grid), 1)), _features(grid, q)], axis=1)
    want = np.einsum("id,de,ie->i", zq, cov, zq)[:, None] * noise[None, :]
    np.testing.assert_allclose(ka.posterior_variance(s, grid), want, rtol=1e-6)
    np.testing.assert_allclose(ka.posterior_variance(s, grid, include_noise=True), want + noise, rtol=1e-6)
    # attribution intervals: the functional applied to the rows of all 2^K masks
    rows = {tuple(g.astype(int)): zq[i] for i, g in enumerate(grid)}
    full = (1,) * 5
    for kind in ("loo", "shapley"):
        ell = np.zeros((5, zq.shape[1]))
        for k in range(5):
            if kind == "loo":
                ell[k] = rows[full] - rows[tuple(0 if i == k else 1 for i in range(5))]
                continue
            for g in grid:
                if g[k]:
                    continue
                n = int(g.sum())
                w = math.factorial(n) * math.factorial(4 - n) / math.factorial(5)
                with_k = tuple(1 if i == k else int(v) for i, v in enumerate(g))
                ell[k] += w * (rows[with_k] - rows[tuple(g.astype(int))])
        std = np.sqrt(np.einsum("kd,de,ke->k", ell, cov, ell)[:, None] * noise[None, :])
        iv = ka.attribution_intervals(s, kind=kind, level=0.9)
        ivj = jax.jit(lambda s_: ka.attribution_intervals(s_, kind=kind, level=0.9))(s)
        np.testing.assert_allclose(iv.std, std, rtol=1e-6)
        np.testing.assert_allclose(ivj.std, std, rtol=1e-6)
        zq90 = 1.6448536269514722
        np.testing.assert_allclose(iv.upper - iv.value, zq90 * std, rtol=1e-6)


def test_interval_coverage_on_a_pairwise_game():
    """95% predictive intervals (include_noise) cover about 95% of fresh noisy labels."""
    game = ka.synthetic_game(jax.random.key(21), num_tasks=12, num_targets=4, kind="interaction", noise=0.3)
    tr = ka.sample_subsets(jax.random.key(22), num_tasks=12, num_subsets=300, p=0.5)
    te = ka.sample_subsets(jax.random.key(23), num_tasks=12, num_subsets=400, p=0.5)
    y_te = game.evaluate(te, jax.random.key(25))

    @jax.jit
    def zscore(tr, y_tr, te, y_te):
        s = ka.fit_quadratic(tr, y_tr)
        return (y_te - ka.predict(s, te)) / jnp.sqrt(ka.posterior_variance(s, te, include_noise=True))

    z = zscore(tr, game.evaluate(tr, jax.random.key(24)), te, y_te)
    cover = float(jnp.mean(jnp.abs(z) <= 1.96))
    assert 0.90 <= cover <= 0.99, cover


def _bayes_ridge_cov(pool, ratio=0.3, ridge=0.5):
    """Pool covariance (noise units) of the Bayesian ridge model refitted on given masks."""

    def cov(cur):
        phi = _features(cur, ratio)
        mu = phi.mean(0)
        a = (phi - mu).T @ (phi - mu) + ridge * np.eye(phi.shape[1])
        pc = _features(pool, ratio) - mu
        return pc @ np.linalg.solve(a, pc.T) + 1.0 / len(cur)

    return cov


def test_select_masks_equals_greedy_refits(x64):
    """select_masks on a QuadraticSurrogate: each fantasised update equals refitting the
    Bayesian ridge model (numpy) with the picked mask added, for both criteria; jit equals
    eager."""
    masks, y = _data(m=30, k=5, t=2, seed=4)
    rng = np.random.default_rng(1)
    pool = (rng.random((25, 5)) < 0.5).astype(np.float64)
    s = ka.fit_quadratic(masks, y, ratio=0.3, ridge=0.5)
    for criterion in ("variance", "integrated"):
        picked = np.asarray(jax.jit(lambda s_, c: ka.select_masks(
            jax.random.key(0), s_, 4, candidates=c, criterion=criterion))(s, pool))
        eager = np.asarray(ka.select_masks(jax.random.key(0), s, 4, candidates=pool, criterion=criterion))
        np.testing.assert_array_equal(picked, eager)
        np.testing.assert_array_equal(picked, greedy_refit_picks(_bayes_ridge_cov(pool), masks, pool, 4,
                                                                 criterion, 1.0))
    drawn = np.asarray(ka.select_masks(jax.random.key(3), s, 6, num_candidates=40))
    assert drawn.shape == (6, 5) and set(np.unique(drawn)) <= {0.0, 1.0}


# --------------------------------------------------------------------------------------------
# fit_kernel(solver="walsh"): the kernel's degree <= 2 Walsh part exactly, degree >= 3 as ridge
# --------------------------------------------------------------------------------------------
def _walsh_weights_by_projection(gamma, mix, k, scale):
    """numpy: project k(s, s') = mix·<s,s'>/scale + (1-mix)·exp(-γ·Hamming) on χ_S(s) χ_S(s')
    over all 2^K x 2^K mask pairs, summed by degree |S|."""
    grid = np.asarray(list(itertools.product([0.0, 1.0], repeat=k)))
    kern = (mix * grid @ grid.T / scale
            + (1 - mix) * np.exp(-gamma * np.abs(grid[:, None, :] - grid[None, :, :]).sum(-1)))
    c = 2.0 * grid - 1.0
    by_degree = np.zeros(k + 1)
    for size in range(1, k + 1):
        for subset in itertools.combinations(range(k), size):
            chi = np.prod(c[:, list(subset)], axis=1)
            by_degree[size] += chi @ kern @ chi / 4.0 ** k  # the weight of χ_S χ'_S
    return by_degree


def test_walsh_kernel_weights_equal_the_projection(x64):
    from kernattr.surrogates._quadratic import walsh_kernel_weights
    k, scale = 6, 2.7
    for gamma, mix in ((0.05, 0.0), (0.4, 0.3), (2.0, 0.9)):
        want = _walsh_weights_by_projection(gamma, mix, k, scale)
        v1, v2, tail = walsh_kernel_weights("linear+rbf", jnp.asarray(gamma), jnp.asarray(mix),
                                            jnp.asarray(scale), k)
        np.testing.assert_allclose([v1 * k, v2 * k * (k - 1) / 2, tail],
                                   [want[1], want[2], want[3:].sum()], rtol=1e-10)


def test_walsh_solver_equals_exact_kernel_fit_at_two_tasks(x64):
    """At K = 2 there is no degree >= 3: solver='walsh' is the exact fit at every grid point.

    The grid criteria differ by design at K = 2, where every mask repeats: the exact fit leaves out
    a distinct mask with all its copies, the Walsh solver leaves out one row. So the values are
    compared at each grid point, fitted alone.
    """
    masks, y = _data(m=30, k=2, t=3, seed=4)
    grid = jnp.asarray(list(itertools.product([0.0, 1.0], repeat=2)))
    walsh = jax.jit(lambda x, yy, g, mx, r: ka.fit_kernel(x, yy, solver="walsh", gamma=g, mix=mx,
                                                          ridge=r))
    exact = jax.jit(lambda x, yy, g, mx, r: ka.fit_kernel(x, yy, gamma=g, mix=mx, ridge=r))
    for g, mx, r in [(0.2, 0.0, 1e-2), (0.2, 0.5, 3.0), (1.5, 1.0, 1e-2), (1.5, 0.5, 0.3)]:
        ex = exact(masks, y, g, mx, r)
        wa = walsh(masks, y, g, mx, r)
        assert isinstance(wa, ka.QuadraticSurrogate)
        np.testing.assert_allclose(ka.predict(wa, grid), ka.predict(ex, grid), rtol=1e-9, atol=1e-10)
        for fn in (ka.loo_scores, ka.shapley_values, ka.interaction_scores):
            np.testing.assert_allclose(fn(wa), fn(ex), rtol=1e-8, atol=1e-9)


def test_walsh_solver_tracks_the_exact_fit_on_a_pairwise_game():
    """K = 30: the degree >= 3 part is folded into the ridge, so the fit is approximate; it picks
    the exact fit's grid point and its predictions differ by a few percent of their spread
    (measured 3.4% at these sizes in float64)."""
    game = ka.synthetic_game(jax.random.key(1), num_tasks=30, num_targets=4, noise=0.1)
    tr = ka.sample_subsets(jax.random.key(2), num_tasks=30, num_subsets=600, p=0.5)
    te = ka.sample_subsets(jax.random.key(4), num_tasks=30, num_subsets=400, p=0.5)
    y_tr, y_te = game.evaluate(tr, jax.random.key(3)), game.evaluate(te, jax.random.key(5))
    kw = dict(gamma=jnp.array([0.1, 1.0, 3.0]) / 30, mix=jnp.array([0.0, 0.5, 1.0]),
              ridge=jnp.logspace(-3.0, 1.0, 5))

    @jax.jit
    def run(tr, y_tr, te, y_te):
        ex = ka.fit_kernel(tr, y_tr, **kw)
        wa = ka.fit_kernel(tr, y_tr, solver="walsh", **kw)
        pe, pw = ka.predict(ex, te), ka.predict(wa, te)
        ends = ka.predict(wa, jnp.stack([jnp.ones(30), jnp.zeros(30)]))
        return (ex, wa, pe, pw, ka.lds(pe, y_te).mean, ka.lds(pw, y_te).mean,
                ka.posterior_variance(wa, te[:5]), ka.shapley_values(wa), ends)

    ex, wa, pe, pw, lds_e, lds_w, var, phi, ends = run(tr, y_tr, te, y_te)
    for name in ("gamma", "mix", "ridge"):
        np.testing.assert_array_equal(getattr(wa, name), getattr(ex, name))
    rel = float(jnp.linalg.norm(pw - pe) / jnp.linalg.norm(pe - pe.mean(0, keepdims=True)))
    assert rel < 0.06, rel
    assert abs(float(lds_w) - float(lds_e)) < 0.005
    # the posterior and the attributions take it like any QuadraticSurrogate
    assert isinstance(wa, ka.QuadraticSurrogate)
    assert var.shape == (5, 4) and bool(jnp.all(var > 0))
    np.testing.assert_allclose(phi.sum(0), ends[0] - ends[1], rtol=1e-4, atol=1e-4)


def test_walsh_solver_sharded_equals_single_device(x64):
    masks, y = _data(m=64, k=6, t=2, seed=7)
    kw = dict(gamma=jnp.array([0.1, 1.0]), ridge=jnp.array([1e-2, 1.0]), solver="walsh")
    ref = ka.fit_kernel(masks, y, **kw)
    ms, ys = ka.shard_examples((masks, y), ka.data_mesh())
    got = jax.jit(lambda x, yy: ka.fit_kernel(x, yy, **kw))(ms, ys)
    assert len(ms.addressable_shards) == 8
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-9)


def test_walsh_solver_bad_input():
    masks, y = _data(m=20, k=5, t=1)
    masks, y = masks.astype(jnp.float32), y.astype(jnp.float32)
    for bad, match in ((dict(kernel="polynomial"), "polynomial"), (dict(per_target=True), "per_target"),
                       (dict(fit_intercept=False), "intercept"), (dict(select="loo_spearman"), "select"),
                       (dict(num_landmarks=4, key=jax.random.key(0)), "num_landmarks"),
                       (dict(gamma=-1.0), "gamma"), (dict(ridge=jnp.array([0.1, jnp.nan])), "ridge"),
                       (dict(mix=1.5), "mix")):
        with pytest.raises(ValueError, match=match):
            ka.fit_kernel(masks, y, solver="walsh", **bad)
    with pytest.raises(ValueError, match="solver"):
        ka.fit_kernel(masks, y, solver="walshh")
    with pytest.raises(ValueError, match="0 and 1"):
        ka.fit_kernel(masks.at[0, 0].set(0.5), y, solver="walsh")
    # the linear kernel alone, ridge 0, 20 masks: rank 5 + intercept is fine; 15 features with
    # ratio 0 leave the pair block without prior, so ridge 0 is singular
    with pytest.raises(ValueError, match="ridge` too small"):
        ka.fit_kernel(masks, y, kernel="linear", ridge=0.0, solver="walsh")
    f = jax.jit(lambda x, yy, g, r: ka.fit_kernel(x, yy, gamma=g, ridge=r, solver="walsh"))
    with pytest.raises(Exception, match="gamma"):
        jax.block_until_ready(f(masks, y, -0.5, 0.1))
    with pytest.raises(Exception, match="non-finite"):
        jax.block_until_ready(f(masks, y.at[0, 0].set(jnp.nan), 0.5, 0.1))
    with pytest.raises(Exception, match="ridge"):
        jax.block_until_ready(jax.vmap(lambda r: f(masks, y, 0.5, r).linear)(jnp.array([0.1, -1.0])))


def _ard_oracle(masks, y, rho, steps, floor):
    """numpy EM for the shared per-feature prior, with explicit m x m hat matrices (noise not
    below ``floor [T]``)."""
    masks, y = np.asarray(masks, np.float64), np.asarray(y, np.float64)
    m, k = masks.shape
    x = _features(masks, 1.0) * np.sqrt(k + (k * (k - 1) // 2))  # unscaled Walsh features
    xc, yc = x - x.mean(0), y - y.mean(0)

    def solve(rho):
        c = np.linalg.inv(xc.T @ xc + np.diag(1.0 / rho))
        mu = c @ xc.T @ yc
        h = np.full((m, m), 1.0 / m) + xc @ c @ xc.T
        i_h = np.eye(m) - h
        noise = np.maximum(np.sum((yc - xc @ mu) ** 2, axis=0) / np.trace(i_h @ i_h), floor)
        return c, mu, noise

    for _ in range(steps):
        c, mu, noise = solve(rho)
        rho = np.mean(mu**2 / noise, axis=1) + np.diag(c)
    c, mu, noise = solve(rho)
    # leave-one-out with the prior held fixed, by m refits
    err = np.zeros(y.shape[1])
    for i in range(m):
        keep = np.arange(m) != i
        xk, yk = x[keep], y[keep]
        ck = np.linalg.inv((xk - xk.mean(0)).T @ (xk - xk.mean(0)) + np.diag(1.0 / rho))
        uk = ck @ (xk - xk.mean(0)).T @ (yk - yk.mean(0))
        err += (y[i] - yk.mean(0) - (x[i] - xk.mean(0)) @ uk) ** 2
    return rho, noise, c, y.mean(0) - x.mean(0) @ mu, mu, err / m / y.var(0)


@pytest.mark.parametrize("m", [36, 16])  # d = 21 features: the primal and the dual form
def test_ard_equals_numpy_em_oracle(x64, m):
    masks, y = _data(m=m, k=6, t=3, seed=11)
    s0 = _fit(masks, y, ratio=jnp.array([0.1, 1.0]), ridge=jnp.array([0.1, 1.0]))
    s = _fit(masks, y, ratio=jnp.array([0.1, 1.0]), ridge=jnp.array([0.1, 1.0]), ard_steps=15,
             block_size=5)
    # the grid part is the plain fit's
    np.testing.assert_allclose(s.cv_error, s0.cv_error, rtol=1e-10)
    assert float(s.ratio[0]) == float(s0.ratio[0]) and float(s.ridge[0]) == float(s0.ridge[0])
    k, pairs = 6, 15
    v = np.concatenate([np.ones(k), float(s.ratio[0]) * np.ones(pairs)]) / (k + float(s.ratio[0]) * pairs)
    rho0 = v / float(s.ridge[0])
    rho0 = rho0 + 0.01 * rho0.mean()
    rho, noise, c, b, mu, cv = _ard_oracle(masks, y, rho0, 15, np.asarray(s0.noise_var))
    np.testing.assert_allclose(s.feature_prior, rho, rtol=1e-7)
    np.testing.assert_allclose(s.noise_var, noise, rtol=1e-7)
    np.testing.assert_allclose(s.feature_cov, c, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(s.ard_cv_error, cv, rtol=1e-7)
    # predictions on all 64 masks against the oracle's Walsh coefficients
    new = np.asarray(list(itertools.product([0.0, 1.0], repeat=k)))
    xn = _features(new, 1.0) * np.sqrt(k + pairs)
    np.testing.assert_allclose(ka.predict(s, jnp.asarray(new)), b + xn @ mu, rtol=1e-8, atol=1e-9)
    # the prior moved: a few features are kept, many are pruned (the grid start here: spread below 10)
    assert rho.max() / rho.min() > 300
    # eager equals jit
    e = ka.fit_quadratic(masks, y, ratio=jnp.array([0.1, 1.0]), ridge=jnp.array([0.1, 1.0]), ard_steps=15)
    np.testing.assert_allclose(e.pairwise, s.pairwise, rtol=1e-8, atol=1e-10)


def test_ard_finds_a_sparse_game_with_few_masks():
    """K = 16 (136 features), 100 noisy masks, 3 pairs per target: ARD's held-out LDS is far
    above the grid fit's, its noise estimate near the truth; posterior and selection accept it."""
    game = ka.synthetic_game(jax.random.key(3), num_tasks=16, num_targets=4, noise=0.1, num_pairs=3)
    train = ka.sample_subsets(jax.random.key(4), num_tasks=16, num_subsets=100, p=0.5)
    test = ka.sample_subsets(jax.random.key(5), num_tasks=16, num_subsets=500, p=0.5)
    y, y_test = game.evaluate(train, jax.random.key(6)), game.evaluate(test, jax.random.key(7))
    grid = _fit(train, y)
    ard = _fit(train, y, ard_steps=50)

    @jax.jit
    def readouts(grid, ard, test, y_test):
        pa = ka.predict(ard, test)
        z = (y_test - pa) / jnp.sqrt(ka.posterior_variance(ard, test, include_noise=True))
        return ka.lds(ka.predict(grid, test), y_test).mean, ka.lds(pa, y_test).mean, z

    lg, la, z = readouts(grid, ard, test, y_test)
    lg, la = float(lg), float(la)
    assert la > lg + 0.05 and la > 0.9, (lg, la)
    assert float(jnp.mean(ard.ard_cv_error)) < float(jnp.min(jnp.mean(grid.cv_error, -1)))
    np.testing.assert_allclose(jnp.mean(ard.noise_var), 0.01, rtol=0.5)
    assert 0.9 < float(jnp.mean(jnp.abs(z) < 1.96)) < 0.99  # measured 0.97
    picked = jax.jit(lambda s: ka.select_masks(jax.random.key(8), s, 5, num_candidates=64))(ard)
    assert picked.shape == (5, 16) and bool(jnp.all((picked == 0) | (picked == 1)))


@pytest.mark.parametrize("m", [64, 16])  # d = 21: the primal and the dual form
def test_ard_sharded_equals_single_device(x64, m):
    masks, y = _data(m=m, k=6, t=2, seed=7)
    kw = dict(ratio=jnp.array([0.1, 1.0]), ridge=jnp.array([1e-2, 1.0]), block_size=3, ard_steps=10)
    ref = _fit(masks, y, **kw)
    assert np.isfinite(ref.pairwise).all() and np.isfinite(ref.ard_cv_error).all()
    ms, ys = ka.shard_examples((masks, y), ka.data_mesh())
    got = _fit(ms, ys, **kw)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-9)


def test_ard_bad_input():
    masks, y = _data(m=20, k=5, t=1)
    for bad in (-1, 2.0, True, None):
        with pytest.raises(ValueError, match="ard_steps"):
            ka.fit_quadratic(masks, y, ard_steps=bad)
    f = jax.jit(lambda x, yy: ka.fit_quadratic(x, yy, ard_steps=5))
    with pytest.raises(Exception, match="non-finite"):
        jax.block_until_ready(f(masks, y.at[0, 0].set(jnp.nan)))
    # a singular grid choice raises before the EM; with throw=False everything is NaN / inf
    with pytest.raises(ValueError, match="ridge` too small"):
        ka.fit_quadratic(masks, y, ratio=0.0, ridge=0.0, ard_steps=5)
    s = ka.fit_quadratic(masks, y, ratio=0.0, ridge=0.0, ard_steps=5, throw=False)
    assert np.isnan(s.linear).all() and np.isnan(s.feature_prior).all()
    # noise-free labels: the prior cap keeps float32 finite and exact enough
    masks80 = ka.sample_subsets(jax.random.key(0), num_tasks=5, num_subsets=80, p=0.5)
    s = ka.fit_quadratic(masks80, masks80[:, 0] * masks80[:, 1] - masks80[:, 2], ard_steps=20)
    assert np.isfinite(s.ard_cv_error).all()
    np.testing.assert_allclose(s.pairwise[0, 1, 0], 1.0, atol=1e-3)
    np.testing.assert_allclose(s.linear[:, 0], [0, 0, -1, 0, 0], atol=1e-3)


def test_ard_invalid_learned_prior_raises_or_gives_nan(monkeypatch):
    """The final solve at the learned prior is checked like the grid's: a prior that makes the
    scaled Gram singular in float32 (forced here: one variance 1e30, the rest 1e-30; no real labels
    reached this) raises, eagerly and under jit, or gives NaN everywhere with throw=False."""
    from kernattr.surrogates import _quadratic

    learned = _quadratic._ard_prior

    def corrupt(*args):
        rho, noise = learned(*args)
        return jnp.full_like(rho, 1e-30).at[0].set(1e30), noise

    monkeypatch.setattr(_quadratic, "_ard_prior", corrupt)
    masks, y = _data(m=40, k=6, t=2)
    f = jax.jit(lambda x, yy: ka.fit_quadratic(x, yy, ard_steps=3))
    for fit in (lambda x, yy: ka.fit_quadratic(x, yy, ard_steps=3), f):
        with pytest.raises(Exception, match="learned prior makes the scaled Gram"):
            jax.block_until_ready(fit(masks, y))
    s = ka.fit_quadratic(masks, y, ard_steps=3, throw=False)
    iu, ju = np.triu_indices(6, 1)  # the diagonal of `pairwise` is 0 by construction
    for field in (s.linear, s.pairwise[iu, ju], s.intercept, s.feature_cov, s.noise_var, s.feature_prior):
        assert np.isnan(field).all()
    assert np.isnan(ka.predict(s, masks)).all()
