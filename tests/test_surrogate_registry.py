"""The surrogate registry (kernattr.surrogates._protocol): a test-only surrogate type, declared in
one place, gets predict, attributions and the posterior read-outs; oracles are numpy formulas,
brute-force enumeration of all 2^K masks and Bayesian linear regression with an explicit
intercept column."""

import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernattr as ka
from kernattr.surrogates._protocol import (FeaturePosterior, LinearForm, PairwiseForm, SumForm,
                                           SurrogateOps, register_surrogate)

K, T, M, LAM = 4, 2, 24, 0.3
IU, JU = np.triu_indices(K, 1)
ALL = np.array(list(itertools.product([0.0, 1.0], repeat=K)))  # [2^K, K]


class TinyInteractions(NamedTuple):
    """TEST ONLY: ``g(s) = intercept + sᵀ main + Σ_{j<k} upper[j, k] s_j s_k``, a Bayesian ridge
    fit on the features ``[s_k, s_j s_k]`` (posterior covariance ``cov·noise_var``)."""

    intercept: jax.Array  # [T]
    main: jax.Array  # [K, T]
    upper: jax.Array  # [K, K, T], strictly upper triangular
    mean: jax.Array  # [d]
    cov: jax.Array  # [d, d]
    noise_var: jax.Array  # [T]
    num_train: jax.Array  # scalar


def _features(masks):
    return jnp.concatenate([masks, masks[:, IU] * masks[:, JU]], axis=1)


def _functionals(kind, dtype):
    """Leave-one-out / Shapley value of each feature for each task: ``s_k`` gives 1 to ``k``;
    ``s_i s_j`` gives 1 (LOO) or 1/2 (Shapley) to each of ``i``, ``j``."""
    eye = jnp.eye(K, dtype=dtype)
    share = 1.0 if kind == "loo" else 0.5
    return jnp.concatenate([eye, share * (eye[:, IU] + eye[:, JU])], axis=1)


# --- the one place where the test-only type is declared -----------------------------------
register_surrogate(TinyInteractions, SurrogateOps(
    num_tasks=lambda s: s.main.shape[0],
    dtype=lambda s: s.main.dtype,
    predict=lambda s, x: (s.intercept[None, :] + x @ s.main
                          + jnp.einsum("mj,jkt,mk->mt", x, s.upper, x)),
    attribution_form=lambda s: SumForm(
        (LinearForm(s.main), PairwiseForm(jnp.zeros_like(s.main), s.upper + s.upper.swapaxes(0, 1))),
        (None, None)),
    posterior=lambda s: FeaturePosterior(_features, lambda kind: _functionals(kind, s.cov.dtype),
                                         s.mean, s.cov, s.noise_var, s.num_train),
))


def _fit(seed=0):
    """numpy: ridge on the centred features, unpenalised intercept."""
    rng = np.random.default_rng(seed)
    masks = (rng.random((M, K)) < 0.5).astype(np.float64)
    phi = np.asarray(_features(jnp.asarray(masks)))
    y = phi @ rng.normal(size=(phi.shape[1], T)) + 0.1 * rng.normal(size=(M, T))
    mean = phi.mean(axis=0)
    pc, yc = phi - mean, y - y.mean(axis=0)
    cov = np.linalg.inv(pc.T @ pc + LAM * np.eye(phi.shape[1]))
    u = cov @ pc.T @ yc
    upper = np.zeros((K, K, T))
    upper[IU, JU] = u[K:]
    s = TinyInteractions(jnp.asarray(y.mean(axis=0) - mean @ u), jnp.asarray(u[:K]),
                         jnp.asarray(upper), jnp.asarray(mean), jnp.asarray(cov),
                         jnp.asarray([0.1, 0.4]), jnp.asarray(float(M)))
    return s, masks, phi


def _np_predict(s, x):
    s = jax.tree_util.tree_map(np.asarray, s)
    return s.intercept + x @ s.main + np.einsum("mj,jkt,mk->mt", x, s.upper, x)


def _shapley_matrix():
    """``[K, 2^K]``: Shapley values as a linear map of the game's values on ALL."""
    idx = {tuple(r): i for i, r in enumerate(ALL)}
    a = np.zeros((K, len(ALL)))
    for k in range(K):
        for r in ALL:
            if r[k]:
                continue
            n = int(r.sum())
            w = math.factorial(n) * math.factorial(K - n - 1) / math.factorial(K)
            with_k = r.copy()
            with_k[k] = 1.0
            a[k, idx[tuple(with_k)]] += w
            a[k, idx[tuple(r)]] -= w
    return a


def test_registered_type_gets_every_read_out_by_value(x64):
    s, masks, phi = _fit()
    g_all = _np_predict(s, ALL)  # [2^K, T]
    a = _shapley_matrix()
    full = np.ones((1, K))
    drop = 1.0 - np.eye(K)
    loo = _np_predict(s, full) - _np_predict(s, drop)
    # Bayesian linear regression with an explicit (flat-prior) intercept column
    z = np.concatenate([np.ones((M, 1)), phi], axis=1)
    prec = z.T @ z + np.diag(np.r_[0.0, LAM * np.ones(phi.shape[1])])
    z_all = np.concatenate([np.ones((len(ALL), 1)), np.asarray(_features(jnp.asarray(ALL)))], axis=1)
    unit_cov = z_all @ np.linalg.solve(prec, z_all.T)  # [2^K, 2^K] over noise_var
    noise = np.asarray(s.noise_var)
    q = ALL[[0, 3, 9, 15]]

    for wrap in (lambda f: f, jax.jit):
        np.testing.assert_allclose(wrap(ka.predict)(s, jnp.asarray(q)), _np_predict(s, q), rtol=1e-10)
        np.testing.assert_allclose(wrap(ka.loo_scores)(s), loo, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(wrap(ka.shapley_values)(s), a @ g_all, rtol=1e-10, atol=1e-12)
        pv = wrap(ka.posterior_variance)(s, jnp.asarray(q))
        np.testing.assert_allclose(pv, np.diagonal(unit_cov)[[0, 3, 9, 15], None] * noise[None, :],
                                   rtol=1e-9)
        ints = wrap(lambda s_: ka.attribution_intervals(s_, kind="shapley"))(s)
        np.testing.assert_allclose(ints.std ** 2, np.diagonal(a @ unit_cov @ a.T)[:, None] * noise[None, :],
                                   rtol=1e-9, atol=1e-14)
    # Shapley values sum to g(1) - g(0) (efficiency): the pairwise part is read with weight 1/2
    np.testing.assert_allclose(np.sum(ka.shapley_values(s), axis=0), g_all[-1] - g_all[0], rtol=1e-10)


def test_unknown_type_and_missing_posterior_raise_type_error():
    class Unregistered(NamedTuple):
        coef: jax.Array

    u = Unregistered(jnp.ones((3, 1)))
    for fn in (ka.loo_scores, ka.shapley_values):
        with pytest.raises(TypeError, match="Unregistered.*register_surrogate"):
            fn(u)
    with pytest.raises(TypeError, match="Unregistered.*register_surrogate"):
        ka.predict(u, jnp.ones((2, 3)))
    lin = ka.LinearSurrogate(jnp.ones((3, 1)), jnp.zeros(1))
    with pytest.raises(TypeError, match="no posterior.*LinearSurrogate"):
        ka.posterior_variance(lin, jnp.ones((2, 3)))
    with pytest.raises(TypeError, match="SurrogateOps"):
        register_surrogate(Unregistered, {"predict": None})
