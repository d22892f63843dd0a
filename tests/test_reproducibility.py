"""The same answer whatever the row order, eager vs jit and the precision.

* Grid selection on duplicated masks (leave-one-distinct-mask-out, ties within the criterion's
  own numerical error broken by a fixed rule): the float32 case of 10 distinct masks x 20
  copies chooses one grid point eagerly, under jit and with reversed rows; 20 random problems
  with duplicates choose the same point under random permutations.
* The weighted fit on distinct masks equals the fit on the duplicated rows (numpy float64
  oracle), and its leave-one-distinct-mask-out error equals brute-force refits.
* Property: permuting the rows of masks and labels leaves every fitted surrogate's predictions
  and attributions unchanged (each ``fit_*`` and each ``solver=``): an eager fit against a
  jitted one in float64, the same compiled program on both row orders in float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernattr as ka
from _jitted import fit_kernel as _fk


def _dup_problem(seed, distinct, copies, k, t, dtype=np.float32):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2, (distinct, k)).astype(np.float64)
    masks = np.repeat(base, copies, axis=0)
    w, pw = rng.normal(size=(k, t)), rng.normal(size=(k, t))
    y = masks @ w + np.sin(masks @ pw) + 0.3 * rng.normal(size=(len(masks), t))
    return masks.astype(dtype), y.astype(dtype)


def _point(s):
    return (float(s.gamma[0]), float(s.mix[0]), float(s.ridge[0]))


def test_row1_float32_duplicates_same_point_eager_jit_reversed():
    masks, y = _dup_problem(0, distinct=10, copies=20, k=25, t=4)
    eager = ka.fit_kernel(masks, y)
    jitted = jax.jit(ka.fit_kernel)(masks, y)
    rev = ka.fit_kernel(masks[::-1], y[::-1])
    assert _point(eager) == _point(jitted) == _point(rev)
    # predictions and Shapley values agree to float32 rounding (one compiled readout for all three)
    readout = jax.jit(lambda s: (ka.predict(s, masks), ka.shapley_values(s)))
    want = readout(eager)
    for s in (jitted, rev):
        for got, ref, rtol in zip(readout(s), want, (1e-4, 1e-3)):
            np.testing.assert_allclose(got, ref, rtol=rtol, atol=1e-4)
    assert eager.status.shape == (4,) and eager.status.dtype == jnp.int32


def test_random_duplicate_problems_choose_the_same_point_under_permutation():
    rng = np.random.default_rng(1)
    for seed in range(20):
        distinct = int(rng.integers(5, 12))
        copies = int(rng.integers(1, 4))
        masks, y = _dup_problem(100 + seed, distinct=distinct, copies=copies, k=6, t=2)
        masks = np.concatenate([masks, masks[: 24 - len(masks)]])[:24]  # fixed m = 24: one compile
        y = np.concatenate([y, y[: 24 - len(y)] + 0.1])[:24]
        ref = _fk(masks, y)
        for _ in range(2):
            perm = rng.permutation(len(masks))
            s = _fk(masks[perm], y[perm])
            assert _point(s) == _point(ref), seed
            np.testing.assert_allclose(ka.predict(s, masks), ka.predict(ref, masks), rtol=1e-4, atol=1e-4)


def _np_krr(x, y, kfun, ridge):
    """KRR with an unpenalised intercept on all rows (bordered system), float64."""
    m = len(x)
    a = np.zeros((m + 1, m + 1))
    a[:m, :m] = kfun(x, x) + ridge * np.eye(m)
    a[:m, m] = a[m, :m] = 1.0
    sol = np.linalg.solve(a, np.concatenate([y, np.zeros((1, y.shape[1]))]))
    return sol[:m], sol[m]


def test_weighted_fit_equals_duplicated_rows_and_grouped_loo_equals_refits(x64):
    masks, y = _dup_problem(3, distinct=9, copies=3, k=5, t=2, dtype=np.float64)
    masks = np.concatenate([masks, masks[:4]])  # unequal counts
    y = np.concatenate([y, y[:4] + 0.5])
    g, r = 0.3, np.array([0.01, 0.3, 3.0])

    def kfun(a, b):
        return np.exp(-g * ((a[:, None] - b[None]) ** 2).sum(-1))

    uniq, inv = np.unique(masks, axis=0, return_inverse=True)

    @jax.jit
    def fit(masks, y):
        s = ka.fit_kernel(masks, y, kernel="rbf", gamma=g, ridge=r)
        return s, ka.predict(s, uniq)

    s, pred = fit(masks, y)
    lam = float(s.ridge[0])
    alpha, b = _np_krr(masks, y, kfun, lam)
    onehot = np.eye(len(uniq))[inv.ravel()]  # [m, u]
    # the model on the duplicated rows: same function, same coefficient sum per distinct mask
    np.testing.assert_allclose(onehot.T @ np.asarray(s.dual_coef), onehot.T @ alpha, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(s.intercept, b, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(pred, kfun(uniq, masks) @ alpha + b, rtol=1e-8, atol=1e-9)
    # leave-one-distinct-mask-out error at every ridge, by brute force
    yc = y - y.mean(0)
    for j, lam_j in enumerate(r):
        sq = np.zeros(y.shape[1])
        for gi in range(len(uniq)):
            out = inv.ravel() == gi
            a_, b_ = _np_krr(masks[~out], y[~out], kfun, lam_j)
            pred = kfun(uniq[gi:gi + 1], masks[~out]) @ a_ + b_
            sq += ((y[out] - pred) ** 2).sum(0)
        want = sq / len(y) / (yc**2).mean(0)
        np.testing.assert_allclose(np.asarray(s.cv_error)[0, 0, j], want, rtol=1e-8)


def test_status_flags_ill_conditioned_float32():
    masks = ka.sample_subsets(jax.random.key(0), num_tasks=8, num_subsets=120, p=0.5)
    y = masks @ jnp.arange(8.0) + jnp.sin(masks @ jnp.ones(8))
    s = _fk(masks, y, gamma=0.01, ridge=1e-6, kernel="rbf")  # near-constant kernel, tiny ridge
    assert int(s.status[0]) & 2  # bit 2: ill-conditioned for the dtype (KernelSurrogate.status)
    s = _fk(masks, y, gamma=0.3, ridge=1.0, kernel="rbf")
    assert int(s.status[0]) == 0
    # vmap over label sets: one status per problem
    ys = jnp.stack([y, 2.0 * y])
    st = jax.jit(jax.vmap(lambda v: ka.fit_kernel(masks, v, kernel="rbf", gamma=0.3, ridge=1.0).status))(ys)
    assert st.shape == (2, 1)


# ------------------------------------------------------------------------- property over fits
K, M, T = 5, 24, 2


def _fits(dtype):
    """(name, fit(masks, y) -> surrogate) for each fit function and solver."""
    g = jnp.asarray([0.2, 0.5], dtype)
    r = jnp.asarray([1e-2, 1e-1, 1.0], dtype)
    key = jax.random.key(0)
    return [
        ("linear", lambda m, y: ka.fit_linear(m, y, ridge=0.1)),
        ("kernel", lambda m, y: ka.fit_kernel(m, y)),
        ("kernel_per_target_spearman",
         lambda m, y: ka.fit_kernel(m, y, gamma=g, ridge=r, per_target=True, select="loo_spearman")),
        ("kernel_nystrom_all_landmarks", lambda m, y: ka.fit_kernel(m, y, gamma=g, ridge=r,
                                                                    num_landmarks=M, key=key)),
        ("kernel_cg", lambda m, y: ka.fit_kernel(m, y, gamma=g, ridge=r, num_landmarks=M, key=key,
                                                 solver="cg")),
        ("kernel_walsh", lambda m, y: ka.fit_kernel(m, y, gamma=g, ridge=r, solver="walsh")),
        ("quadratic", lambda m, y: ka.fit_quadratic(m, y)),
        ("multifidelity", lambda m, y: ka.fit_multifidelity(m, y + 0.1 * jnp.sin(3.0 * y), m, y,
                                                            gamma=g, ridge=r)),
    ]


def _readouts(s, probe):
    return [ka.predict(s, probe), ka.loo_scores(s), ka.shapley_values(s)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_permutation_leaves_every_fit_unchanged(dtype):
    with jax.enable_x64(dtype == np.float64):
        rng = np.random.default_rng(7)
        masks = rng.integers(0, 2, (M, K)).astype(dtype)
        masks[-4:] = masks[:4]  # a few duplicated masks
        y = (masks @ rng.normal(size=(K, T)) + masks[:, :1] * masks[:, 1:2]
             + 0.1 * rng.normal(size=(M, T))).astype(dtype)
        perm = rng.permutation(M)
        probe = jnp.asarray(ka.leave_one_out_masks(K), dtype)
        tol = 2e-3 if dtype == np.float32 else 1e-7
        readouts = jax.jit(_readouts)  # one compile per fit serves both surrogates
        for name, fit in _fits(dtype):
            jitted = jax.jit(fit)  # one compile serves both row orders
            # float64: fitted eagerly in the original order; float32: the same compiled program
            first = fit if dtype == np.float64 else jitted
            ref = readouts(first(jnp.asarray(masks), jnp.asarray(y)), probe)
            got = readouts(jitted(masks[perm], y[perm]), probe)  # jit, permuted
            for a, b in zip(got, ref):
                scale = float(jnp.max(jnp.abs(b))) + 1e-12
                np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(b) / scale,
                                           atol=tol, err_msg=name)
