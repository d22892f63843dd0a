"""Configured-once factories: gradient_features_fn and finetune_fn (pure functions of arrays)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kernattr as ka
from kernattr.groundtruth import finetune_fn, finetune_on_masks


def mlp(p, x):
    return jnp.tanh(x @ p["w1"]) @ p["w2"]


def setup(n=12):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {"w1": jax.random.normal(k1, (3, 4)), "w2": jax.random.normal(k2, (4, 2))}
    return params, jax.random.normal(k3, (n, 3))


def test_gradient_features_fn_equals_gradient_features_under_jit():
    params, X = setup()
    y = jnp.arange(12) % 2
    t = jnp.arange(12) % 3
    proj = ka.make_projector(jax.random.key(1), params, dim=5)
    features = jax.jit(ka.gradient_features_fn(mlp, proj, num_tasks=3, chunk_size=4))
    got = features(params, X, y, t)
    ref = jax.jit(lambda p, x, y, t: ka.gradient_features(mlp, p, x, y, proj, task_ids=t,
                                                          num_tasks=3))(params, X, y, t)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # reused for other parameters without retracing; values follow the parameters
    p2 = jax.tree.map(lambda a: 2.0 * a, params)
    np.testing.assert_allclose(features(p2, X, y, t).outputs,
                               jax.vmap(lambda x: mlp(p2, x))(X), rtol=1e-5, atol=1e-6)
    assert features._cache_size() == 1


def test_gradient_features_fn_bad_configuration_is_eager_and_bad_arrays_raise_under_jit():
    params, X = setup()
    proj = ka.make_projector(jax.random.key(1), params, dim=5)
    with pytest.raises(TypeError, match="apply_fn"):
        ka.gradient_features_fn("not a function", proj)
    with pytest.raises(TypeError, match="Projector"):
        ka.gradient_features_fn(mlp, params)
    with pytest.raises(ValueError, match="method"):
        ka.gradient_features_fn(mlp, proj, method="fd")
    with pytest.raises(ValueError, match="chunk_size"):
        ka.gradient_features_fn(mlp, proj, chunk_size=0)
    with pytest.raises(ValueError, match="num_tasks"):
        ka.gradient_features_fn(mlp, proj, num_tasks=0)
    features = jax.jit(ka.gradient_features_fn(mlp, proj, num_tasks=3))
    y = jnp.zeros(12)
    with pytest.raises(Exception, match="outside 0..2"):
        jax.block_until_ready(features(params, X, y, jnp.arange(12) % 4))
    with pytest.raises(Exception, match="non-finite"):
        jax.block_until_ready(features(params, X.at[3, 0].set(jnp.nan), y, jnp.arange(12) % 3))


def test_finetune_fn_reaches_weighted_least_squares_and_equals_finetune_on_masks():
    """Squared loss, linear model, full batch, many GD steps: the per-mask optimum is the
    task-weighted least-squares solution (each selected task's mean loss counts equally)."""
    rng = np.random.default_rng(0)
    n, D, K = 24, 3, 3
    X = jnp.asarray(rng.normal(size=(n, D)), jnp.float32)
    y = jnp.asarray(rng.normal(size=n), jnp.float32)
    t = jnp.arange(n) % K
    masks = jnp.array([[1, 1, 1], [1, 0, 1], [0, 1, 1]], jnp.float32)
    train = jax.jit(finetune_fn(lambda w, x: x @ w, loss="squared", optimizer=optax.sgd(0.5),
                                num_steps=2000))
    W = train(jnp.zeros(D), X, y, t, masks)
    for j, s in enumerate(np.asarray(masks)):
        w = s[np.asarray(t)] / (np.bincount(np.asarray(t), minlength=K)[np.asarray(t)] * s.sum())
        Xn, yn = np.asarray(X, np.float64), np.asarray(y, np.float64)
        ref = np.linalg.solve(Xn.T @ (w[:, None] * Xn), Xn.T @ (w * yn))
        np.testing.assert_allclose(W[j], ref, rtol=1e-3, atol=1e-4)
    direct = finetune_on_masks(lambda w, x: x @ w, jnp.zeros(D), X, y, t, masks, loss="squared",
                               optimizer=optax.sgd(0.5), num_steps=2000)
    np.testing.assert_allclose(W, direct, rtol=1e-5, atol=1e-6)


def test_finetune_fn_bad_configuration_is_eager_and_bad_masks_raise():
    f = lambda w, x: x @ w  # noqa: E731
    with pytest.raises(ValueError, match="loss"):
        finetune_fn(f, loss="hinge", optimizer=optax.sgd(0.1), num_steps=3)
    with pytest.raises(TypeError, match="optimizer"):
        finetune_fn(f, loss="squared", optimizer="adam", num_steps=3)
    with pytest.raises(ValueError, match="num_steps"):
        finetune_fn(f, loss="squared", optimizer=optax.sgd(0.1), num_steps=-1)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="prox"):
            finetune_fn(f, loss="squared", optimizer=optax.sgd(0.1), num_steps=3, prox=bad)
    with pytest.raises(TypeError, match="apply_fn"):
        finetune_fn(None, loss="squared", optimizer=optax.sgd(0.1), num_steps=3)
    train = finetune_fn(f, loss="squared", optimizer=optax.sgd(0.1), num_steps=3)
    x, y, t = jnp.ones((4, 2)), jnp.arange(4.0), jnp.array([0, 0, 1, 1])
    with pytest.raises(ValueError, match="0/1"):
        train(jnp.zeros(2), x, y, t, jnp.array([[0.5, 1.0]]))
