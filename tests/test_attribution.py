"""Tests for kernattr.readouts._attribution against brute-force enumeration of all 2^K masks (numpy)."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernattr as ka

from _jitted import fit_kernel as _fk
from conftest import tol

_ATTR = {
    "loo": jax.jit(ka.loo_scores),
    "shapley": jax.jit(ka.shapley_values),
    "banzhaf": jax.jit(ka.banzhaf_values),
    "interaction": jax.jit(ka.interaction_scores),
}


def _np_surrogate_values(s, masks):
    """g(masks) [n, T] evaluated in numpy from the surrogate's fields (independent of predict)."""
    if isinstance(s, ka.LinearSurrogate):
        return masks @ np.asarray(s.coef) + np.asarray(s.intercept)
    tr = np.asarray(s.masks, np.float64)
    alpha = np.asarray(s.dual_coef, np.float64)
    out = np.zeros((masks.shape[0], alpha.shape[1]))
    for t in range(alpha.shape[1]):
        g = float(s.gamma[t])
        if s.spec.kernel in ("rbf", "linear+rbf"):
            kmat = np.exp(-g * ((masks[:, None, :] - tr[None]) ** 2).sum(-1))
            if s.spec.kernel == "linear+rbf":
                w, c = float(s.mix[t]), float(s.linear_scale)
                kmat = w / c * masks @ tr.T + (1.0 - w) * kmat
        elif s.spec.kernel == "polynomial":
            kmat = (g * masks @ tr.T + s.spec.coef0) ** s.spec.degree
        else:
            kmat = masks @ tr.T
        out[:, t] = kmat @ alpha[:, t] + float(s.intercept[t])
    return out


def _brute_force(s, k):
    """Shapley, Banzhaf, LOO and interactions by enumerating all 2^K masks."""
    allm = np.array(list(itertools.product([0, 1], repeat=k)), np.float64)
    v = _np_surrogate_values(s, allm)
    t = v.shape[1]
    index = {tuple(r): i for i, r in enumerate(allm.astype(int))}
    val = lambda r: v[index[tuple(r)]]  # noqa: E731
    shap = np.zeros((k, t))
    banz = np.zeros((k, t))
    for r in allm.astype(int):
        size = r.sum()
        for j in np.flatnonzero(r == 0):
            r2 = r.copy()
            r2[j] = 1
            d = val(r2) - val(r)
            shap[j] += math.factorial(size) * math.factorial(k - size - 1) / math.factorial(k) * d
            banz[j] += d / 2 ** (k - 1)
    one = np.ones(k, int)
    loo = np.stack([val(one) - val(one - np.eye(k, dtype=int)[j]) for j in range(k)])
    inter = np.zeros((k, k, t))
    for i in range(k):
        for j in range(k):
            if i != j:
                ei, ej = np.eye(k, dtype=int)[i], np.eye(k, dtype=int)[j]
                inter[i, j] = val(one) - val(one - ei) - val(one - ej) + val(one - ei - ej)
    return dict(shapley=shap, banzhaf=banz, loo=loo, interaction=inter, full=val(one), empty=val(0 * one))


def _game(m=40, k=8, t=3, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    masks = (rng.random((m, k)) < 0.5).astype(dtype)
    xor = (masks[:, 0] != masks[:, 1]).astype(dtype)
    anti = masks[:, 2] * masks[:, 3]
    y = np.stack(
        [masks @ rng.normal(size=k) + xor, -anti + 0.3 * masks[:, 4], np.where(masks.sum(1) % 2 == 0, 1.0, -1.0)][:t],
        1,
    )
    return masks, (y + 0.05 * rng.normal(size=y.shape)).astype(dtype)


CASES = {
    "rbf": dict(kernel="rbf", gamma=0.4, ridge=0.05),
    "rbf_per_target": dict(kernel="rbf", gamma=jnp.array([0.05, 0.5, 2.0]), ridge=0.05, per_target=True),
    "linear+rbf": dict(kernel="linear+rbf", gamma=0.4, ridge=0.05, mix=0.7),
    "linear+rbf_per_target": dict(kernel="linear+rbf", gamma=jnp.array([0.05, 0.5, 2.0]), ridge=0.05,
                                  mix=jnp.array([0.0, 0.5, 0.99]), per_target=True),
    "polynomial": dict(kernel="polynomial", gamma=0.3, ridge=0.05, degree=3, coef0=1.0),
    "linear_kernel": dict(kernel="linear", ridge=0.05),
}


@pytest.mark.parametrize("case", list(CASES) + ["linear_surrogate"])
def test_attributions_equal_brute_force_enumeration(x64, case):
    k = 8
    masks, y = _game(k=k)
    if case == "linear_surrogate":
        s = jax.jit(ka.fit_linear)(masks, y)
    else:
        s = _fk(masks, y, **CASES[case])
    if case == "rbf_per_target":
        assert len(set(np.asarray(s.gamma).tolist())) > 1  # genuinely different bandwidths
    if case == "linear+rbf_per_target":
        assert len(set(np.asarray(s.mix).tolist())) > 1  # genuinely different mixes
        assert float(np.max(s.mix)) > 0  # the linear part is exercised
    ref = _brute_force(s, k)
    for name, fn in _ATTR.items():
        got = np.asarray(fn(s))
        scale = max(1.0, np.abs(ref[name]).max())
        np.testing.assert_allclose(got, ref[name], rtol=1e-9, atol=1e-9 * scale, err_msg=name)
    # efficiency axiom of Shapley values
    np.testing.assert_allclose(np.asarray(_ATTR["shapley"](s)).sum(0), ref["full"] - ref["empty"], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rbf_attributions_dtype_and_tolerance(dtype):
    k = 7
    masks, y = _game(k=k, dtype=dtype)
    with jax.enable_x64(dtype == np.float64):
        s = _fk(masks, y, gamma=0.3, ridge=0.1)
        got = {name: np.asarray(fn(s)) for name, fn in _ATTR.items()}
        assert all(v.dtype == dtype for v in got.values())
    ref = _brute_force(s, k)
    rtol, atol = tol(dtype)
    for name in _ATTR:
        scale = max(1.0, np.abs(ref[name]).max())
        np.testing.assert_allclose(got[name], ref[name], rtol=rtol * 20, atol=atol * 20 * scale, err_msg=name)


def test_shapley_efficiency_at_larger_k(x64):
    """K = 40: no enumeration, but the efficiency axiom must hold to rounding."""
    rng = np.random.default_rng(4)
    k = 40
    masks = (rng.random((120, k)) < 0.5).astype(np.float64)
    y = masks @ rng.normal(size=k) + 2.0 * masks[:, 0] * masks[:, 1]
    for kw in (dict(gamma=0.05, ridge=0.1), dict(kernel="polynomial", gamma=0.05, ridge=0.1, degree=2)):
        s = _fk(masks, y, **kw)
        ends = np.asarray(jax.jit(ka.predict)(s, np.stack([np.ones(k), np.zeros(k)])))
        gap = ends[0] - ends[1]
        np.testing.assert_allclose(np.asarray(_ATTR["shapley"](s)).sum(0), gap, rtol=1e-9, atol=1e-9)


def test_linear_surrogate_of_additive_game():
    rng = np.random.default_rng(5)
    masks = (rng.random((50, 6)) < 0.5).astype(np.float32)
    w = rng.normal(size=(6, 2)).astype(np.float32)
    s = ka.fit_linear(masks, masks @ w + 1.0)
    for name in ("loo", "shapley", "banzhaf"):
        np.testing.assert_allclose(np.asarray(_ATTR[name](s)), w, rtol=1e-4, atol=1e-4)
    assert not np.any(np.asarray(_ATTR["interaction"](s)))


def test_kernel_surrogate_detects_synergy_and_antagonism(x64):
    """Pure AND game on tasks 0,1 minus AND on 2,3: interaction signs follow, others ~0."""
    k = 6
    masks = np.array(list(itertools.product([0, 1], repeat=k)), np.float64)
    y = masks[:, 0] * masks[:, 1] - masks[:, 2] * masks[:, 3]
    s = _fk(masks, y, gamma=1.0, ridge=1e-8)
    inter = np.asarray(_ATTR["interaction"](s))[:, :, 0]
    assert inter[0, 1] == pytest.approx(1.0, abs=1e-4) and inter[2, 3] == pytest.approx(-1.0, abs=1e-4)
    assert np.abs(inter[4:, :]).max() < 1e-4 and np.allclose(inter, inter.T, atol=1e-12)
    np.testing.assert_allclose(np.diag(inter), 0.0)
    shap = np.asarray(_ATTR["shapley"](s))[:, 0]
    np.testing.assert_allclose(shap, [0.5, 0.5, -0.5, -0.5, 0.0, 0.0], atol=1e-4)


def test_vmap_over_batch_of_surrogates():
    masks, y = _game(k=6, dtype=np.float32)
    ys = jnp.stack([y, -y, y**2])
    batch = jax.jit(jax.vmap(lambda yy: ka.fit_kernel(masks, yy, gamma=0.3, ridge=0.1)))(ys)
    singles = [_fk(masks, ys[b], gamma=0.3, ridge=0.1) for b in range(3)]
    for name, fn in _ATTR.items():
        got = jax.jit(jax.vmap(fn))(batch)
        for b in range(3):
            single = fn(singles[b])
            np.testing.assert_allclose(got[b], single, rtol=2e-4, atol=2e-5, err_msg=name)


def test_attributions_do_not_retrace():
    counts = {name: 0 for name in _ATTR}

    def counted(name, fn):
        def wrapped(s):
            counts[name] += 1
            return fn(s)

        return jax.jit(wrapped)

    fns = {name: counted(name, fn) for name, fn in
           [("loo", ka.loo_scores), ("shapley", ka.shapley_values),
            ("banzhaf", ka.banzhaf_values), ("interaction", ka.interaction_scores)]}
    for seed in range(3):
        masks, y = _game(k=6, seed=seed, dtype=np.float32)
        s = _fk(masks, y, gamma=0.2 + 0.1 * seed, ridge=0.1)
        for fn in fns.values():
            fn(s)
    assert counts == {name: 1 for name in _ATTR}


def test_bad_surrogate_argument():
    for fn in (ka.loo_scores, ka.shapley_values, ka.banzhaf_values, ka.interaction_scores):
        with pytest.raises(TypeError, match="surrogate"):
            fn(jnp.ones((3, 2)))
