"""Tests for kernattr.labels._gradients: linearize, projected_gradients, gradient_features.

Oracle: the explicit per-example Jacobian from ``jax.jacrev`` times the explicit projection
matrix ``projector_matrix`` built from the same key.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernattr as ka
from conftest import tol


def mlp(p, x):
    """One example x [3] -> [C=2] logits."""
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return h @ p["w2"] + p["b2"]


def mlp_scalar(p, x):
    return mlp(p, x)[0] * mlp(p, x)[1]


def make_params(dtype=jnp.float32):
    k = jax.random.split(jax.random.key(0), 4)
    return {
        "w1": jax.random.normal(k[0], (3, 5), dtype),
        "b1": 0.1 * jax.random.normal(k[1], (5,), dtype),
        "w2": jax.random.normal(k[2], (5, 2), dtype),
        "b2": jnp.zeros((2,), dtype),
    }


def make_inputs(n=11, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(1), (n, 3), dtype)


_JAC = {}


def flat_jacobian(apply_fn, dtype=jnp.float32):
    """[n, (C,) L] explicit Jacobian over ALL leaves (flattening order), cached per model/dtype."""
    key = (apply_fn, jnp.dtype(dtype).name)
    if key not in _JAC:
        params, X = make_params(dtype), make_inputs(dtype=dtype)

        @jax.jit
        def jac(params, X):
            J = jax.vmap(jax.jacrev(apply_fn), (None, 0))(params, X)
            out_shape = jnp.shape(apply_fn(params, X[0]))
            return [l.reshape((X.shape[0],) + out_shape + (-1,)) for l in jax.tree_util.tree_leaves(J)]

        _JAC[key] = jac(params, X)
    return _JAC[key]


def jacobian_oracle(apply_fn, projector, dtype=jnp.float32):
    """Explicit Jacobian of the selected leaves @ explicit P [D, d] from the same key."""
    leaves = flat_jacobian(apply_fn, dtype)
    J = jnp.concatenate([leaves[i] for i in projector.selected_indices], axis=-1)
    P = jax.jit(ka.projector_matrix, static_argnames="dtype")(projector, dtype=J.dtype)
    return J @ P


KINDS = [("rademacher", 6), ("gaussian", 6), ("sjlt", 6), ("identity", None)]
# (kind, method, chunk_size, model): full method x chunking grid for the main kinds, the rest
# sampled, to keep the number of compiled programs small.
F32_CASES = [
    (kind, dim, method, chunk, fn)
    for kind, dim in KINDS
    for method in ["vjp", "jvp"]
    for chunk in [None, 4]
    for fn in [mlp]
    if kind in ("rademacher", "sjlt") or (method == "vjp") == (chunk == 4)
] + [("sjlt", 6, "vjp", 4, mlp_scalar), ("rademacher", 6, "jvp", None, mlp_scalar)]


@pytest.mark.parametrize("kind,dim,method,chunk_size,fn", F32_CASES)
def test_matches_jacrev_times_matrix_f32(kind, dim, method, chunk_size, fn):
    params, X = make_params(), make_inputs()
    # block_size 7 forces several blocks per leaf (and a partial last block)
    proj = ka.make_projector(
        jax.random.key(2), params, dim=dim, kind=kind, block_size=7,
        nonzeros=2 if kind == "sjlt" else 1,
    )
    got = jax.jit(
        lambda p, x, pr: ka.projected_gradients(fn, p, x, pr, chunk_size=chunk_size, method=method)
    )(params, X, proj)
    want = jacobian_oracle(fn, proj)
    assert got.dtype == jnp.float32
    assert got.shape == want.shape == ((11, 2) if fn is mlp else (11,)) + (proj.dim,)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kind,dim", KINDS)
@pytest.mark.parametrize("method,chunk_size", [("vjp", 3), ("jvp", None)])
def test_matches_jacrev_times_matrix_f64(kind, dim, method, chunk_size, x64):
    params, X = make_params(jnp.float64), make_inputs(dtype=jnp.float64)
    proj = ka.make_projector(jax.random.key(3), params, dim=dim, kind=kind, block_size=5)
    got = jax.jit(
        lambda p, x, pr: ka.projected_gradients(mlp, p, x, pr, chunk_size=chunk_size, method=method)
    )(params, X, proj)
    want = jacobian_oracle(mlp, proj, jnp.float64)
    assert got.dtype == jnp.float64
    rtol, atol = tol(jnp.float64)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def test_methods_agree_and_chunking_and_order_do_not_matter():
    params, X = make_params(), make_inputs(n=13)
    proj = ka.make_projector(jax.random.key(4), params, dim=16, kind="sjlt", nonzeros=4)
    pg = jax.jit(ka.projected_gradients, static_argnames=("apply_fn", "chunk_size", "method"))
    base = pg(mlp, params, X, proj, method="vjp")
    for method, cs in [("vjp", 1), ("vjp", 5), ("vjp", 64), ("jvp", 2)]:
        got = pg(mlp, params, X, proj, chunk_size=cs, method=method)
        np.testing.assert_allclose(got, base, rtol=2e-5, atol=2e-6)
    perm = np.random.default_rng(0).permutation(13)
    got = pg(mlp, params, X[perm], proj, chunk_size=5)
    np.testing.assert_allclose(got, base[perm], rtol=2e-5, atol=2e-6)


def test_filter_selects_last_layer_only():
    params, X = make_params(), make_inputs()
    last = lambda path, x: jax.tree_util.keystr(path) in ("['w2']", "['b2']")
    proj = ka.make_projector(jax.random.key(5), params, kind="identity", dim=None, filter=last)
    assert proj.num_params == 5 * 2 + 2
    got = ka.projected_gradients(mlp, params, X, proj)
    J = jax.vmap(jax.jacrev(mlp), (None, 0))(params, X)
    want = jnp.concatenate([J["b2"].reshape(11, 2, -1), J["w2"].reshape(11, 2, -1)], -1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # the same with a boolean pytree filter and the jvp route
    flags = {"w1": False, "b1": False, "w2": True, "b2": True}
    proj2 = ka.make_projector(jax.random.key(5), params, kind="identity", dim=None, filter=flags)
    got2 = ka.projected_gradients(mlp, params, X, proj2, method="jvp")
    np.testing.assert_allclose(got2, want, rtol=1e-6, atol=1e-6)


def test_pytree_inputs_with_integer_tokens():
    """inputs may be a pytree (token ids + a float feature), gradients only w.r.t. params."""
    emb = jax.random.normal(jax.random.key(6), (10, 4))
    params = {"emb": emb, "w": jnp.ones(4)}

    def f(p, ex):
        return jnp.tanh(p["emb"][ex["tok"]].sum(0) @ p["w"]) * ex["scale"]

    inputs = {"tok": jnp.array([[1, 2], [3, 3], [0, 9]]), "scale": jnp.array([1.0, 2.0, -1.0])}
    proj = ka.make_projector(jax.random.key(7), params, dim=8, kind="gaussian")
    got = jax.jit(lambda p, i: ka.projected_gradients(f, p, i, proj, chunk_size=2))(params, inputs)
    J = jax.jit(jax.vmap(jax.jacrev(f), (None, 0)))(params, inputs)
    Jf = jnp.concatenate([J["emb"].reshape(3, -1), J["w"].reshape(3, -1)], -1)
    np.testing.assert_allclose(got, Jf @ ka.projector_matrix(proj), rtol=2e-5, atol=2e-5)


def test_vmap_over_parameter_ensemble():
    params, X = make_params(), make_inputs(n=5)
    proj = ka.make_projector(jax.random.key(8), params, dim=4)
    scales = jnp.array([0.5, 1.0, 2.0])
    stacked = jax.tree_util.tree_map(lambda p: scales.reshape((3,) + (1,) * p.ndim) * p[None], params)
    got = jax.jit(jax.vmap(lambda p: ka.projected_gradients(mlp, p, X, proj, chunk_size=2)))(stacked)
    ref = jax.jit(lambda p: ka.projected_gradients(mlp, p, X, proj))
    for i in range(3):
        p_i = jax.tree_util.tree_map(lambda p: p[i], stacked)
        np.testing.assert_allclose(
            got[i], ref(p_i), rtol=2e-5, atol=2e-5
        )


def test_does_not_retrace():
    traces = []

    def fn(p, x, pr):
        traces.append(1)
        return ka.projected_gradients(mlp, p, x, pr, chunk_size=4)

    jfn = jax.jit(fn)
    params = make_params()
    for seed in range(3):
        proj = ka.make_projector(jax.random.key(seed), params, dim=6, kind="rademacher")
        X = make_inputs() + seed
        p = jax.tree_util.tree_map(lambda a: a * (seed + 1), params)
        jfn(p, X, proj).block_until_ready()
    assert len(traces) == 1

    feats_traces = []

    def gf(p, x, y, t, pr):
        feats_traces.append(1)
        return ka.gradient_features(mlp, p, x, y, pr, task_ids=t)

    jgf = jax.jit(gf)
    for seed in range(2):
        proj = ka.make_projector(jax.random.key(seed), params, dim=6)
        jgf(params, make_inputs() * seed, jnp.zeros(11), jnp.arange(11) % 3, proj)
    assert len(feats_traces) == 1


def test_linearize_matches_jvp_oracle_and_is_exact_for_linear_models():
    params = make_params()
    x = make_inputs(n=1)[0]
    delta = jax.tree_util.tree_map(lambda p: 0.01 * jnp.ones_like(p), params)
    moved = jax.tree_util.tree_map(jnp.add, params, delta)
    f_lin = ka.linearize(mlp, params)
    # at W0 the linear model is the model
    np.testing.assert_allclose(jax.jit(f_lin)(params, x), mlp(params, x), rtol=1e-6)
    J = jax.jacrev(mlp)(params, x)
    want = mlp(params, x) + sum(
        jnp.tensordot(J[k], delta[k], axes=delta[k].ndim) for k in params
    )
    np.testing.assert_allclose(jax.jit(f_lin)(moved, x), want, rtol=1e-5, atol=1e-6)
    # a model linear in its parameters is its own linearisation, anywhere
    lin = lambda p, x: x @ p["w1"] @ p["w2"][:, 0] * 0 + x @ p["w1"][:, 0] + p["b2"][1]
    f_lin2 = ka.linearize(lin, params)
    far = jax.tree_util.tree_map(lambda p: p + 3.0, params)
    # x @ w1 @ w2 term has zero weight; the rest is linear in (w1, b2)
    np.testing.assert_allclose(f_lin2(far, x), lin(far, x), rtol=1e-5, atol=1e-5)
    # vmap over examples
    X = make_inputs(n=4)
    np.testing.assert_allclose(
        jax.vmap(f_lin, (None, 0))(moved, X),
        jnp.stack([f_lin(moved, xi) for xi in X]),
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="params"):
        f_lin({"w1": params["w1"]}, x)
    with pytest.raises(TypeError, match="apply_fn"):
        ka.linearize("not a function", params)


def test_gradient_features_values():
    params, X = make_params(), make_inputs()
    proj = ka.make_projector(jax.random.key(9), params, dim=6)
    y = jnp.arange(11) % 2
    t = jnp.arange(11) % 3
    feats = jax.jit(
        lambda p, x, y, t, pr: ka.gradient_features(mlp, p, x, y, pr, task_ids=t, num_tasks=3, chunk_size=4)
    )(params, X, y, t, proj)
    assert isinstance(feats, ka.GradientFeatures)
    np.testing.assert_allclose(feats.outputs, jax.vmap(mlp, (None, 0))(params, X), rtol=1e-5)
    np.testing.assert_allclose(feats.grads, jacobian_oracle(mlp, proj), rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(feats.labels, y)
    np.testing.assert_array_equal(feats.task_ids, t)
    target = ka.gradient_features(mlp, params, X, y, proj, method="jvp")
    assert target.task_ids is None
    np.testing.assert_allclose(target.grads, feats.grads, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(target.outputs, feats.outputs, rtol=1e-5)


def nan_model(p, x):
    """Non-finite output (and gradient) exactly when x[0] > 1."""
    return jnp.where(x[0] > 1.0, jnp.nan, 1.0) * (x @ p["w1"][:, 0])


def test_non_finite_reported_with_count_eager_and_jit():
    params = make_params()
    X = jnp.zeros((6, 3)).at[jnp.array([1, 4]), 0].set(2.0)
    proj = ka.make_projector(jax.random.key(0), params, dim=4)
    with pytest.raises(ValueError, match="2 examples have non-finite"):
        ka.gradient_features(nan_model, params, X, jnp.zeros(6), proj)
    with pytest.raises(Exception, match="2 examples have non-finite"):
        jax.jit(lambda x: ka.gradient_features(nan_model, params, x, jnp.zeros(6), proj))(X).grads.block_until_ready()
    feats = ka.gradient_features(nan_model, params, X, jnp.zeros(6), proj, throw=False)
    assert int(jnp.sum(~jnp.isfinite(feats.outputs))) == 2


def test_bad_input():
    params, X = make_params(), make_inputs()
    proj = ka.make_projector(jax.random.key(0), params, dim=4)
    y = jnp.zeros(11)
    pg = ka.projected_gradients
    with pytest.raises(ValueError, match="chunk_size"):
        pg(mlp, params, X, proj, chunk_size=0)
    with pytest.raises(ValueError, match="method"):
        pg(mlp, params, X, proj, method="fd")
    with pytest.raises(TypeError, match="projector"):
        pg(mlp, params, X, "rademacher")
    with pytest.raises(TypeError, match="apply_fn"):
        pg(None, params, X, proj)
    with pytest.raises(ValueError, match="params"):
        pg(mlp, {"w1": params["w1"]}, X, proj)
    with pytest.raises(ValueError, match="params"):
        pg(mlp, {**params, "b1": jnp.zeros(4)}, X, proj)
    with pytest.raises(ValueError, match="inputs"):
        pg(mlp, params, {"a": X, "b": X[:3]}, proj)
    with pytest.raises(ValueError, match="inputs"):
        pg(mlp, params, X[:0], proj)
    with pytest.raises(ValueError, match="apply_fn"):
        pg(lambda p, x: jnp.outer(mlp(p, x), x), params, X, proj)
    with pytest.raises(TypeError, match="apply_fn"):
        pg(lambda p, x: (mlp(p, x) > 0).astype(jnp.int32), params, X, proj)
    gf = ka.gradient_features
    with pytest.raises(ValueError, match="labels"):
        gf(mlp, params, X, jnp.zeros(10), proj)
    with pytest.raises(ValueError, match="labels"):
        gf(mlp, params, X, jnp.zeros((11, 2)), proj)
    with pytest.raises(TypeError, match="labels"):
        gf(mlp, params, X, "cats", proj)
    with pytest.raises(ValueError, match="labels"):
        gf(mlp, params, X, y.at[3].set(jnp.nan), proj)
    with pytest.raises(TypeError, match="task_ids"):
        gf(mlp, params, X, y, proj, task_ids=jnp.zeros(11))
    with pytest.raises(ValueError, match="task_ids"):
        gf(mlp, params, X, y, proj, task_ids=jnp.zeros(10, jnp.int32))
    with pytest.raises(ValueError, match="1 entries outside 0..2"):
        gf(mlp, params, X, y, proj, task_ids=jnp.arange(11) % 3 + (jnp.arange(11) == 5) * 7, num_tasks=3)
    with pytest.raises(ValueError, match="task_ids.*negative"):
        gf(mlp, params, X, y, proj, task_ids=jnp.arange(11) - 1)
    with pytest.raises(Exception, match="task_ids"):
        jax.jit(lambda t: gf(mlp, params, X, y, proj, task_ids=t, num_tasks=3).grads)(
            jnp.arange(11)
        ).block_until_ready()
    with pytest.raises(ValueError, match="num_tasks"):
        gf(mlp, params, X, y, proj, num_tasks=3)


def test_configured_features_serve_training_and_target_sets():
    """issue 26 row 5: one gradient_features_fn(num_tasks=K) serves the training set (with
    task ids, range-checked against K) and the target set (task_ids=None)."""
    params, X = make_params(), make_inputs()
    proj = ka.make_projector(jax.random.key(2), params, dim=4, kind="rademacher")
    feats = jax.jit(ka.gradient_features_fn(mlp_scalar, proj, num_tasks=3))
    y = jnp.zeros(X.shape[0])
    train = feats(params, X, y, jnp.arange(X.shape[0]) % 3)
    target = feats(params, X, y)  # no task ids: the target set
    assert target.task_ids is None and train.task_ids is not None
    want = ka.gradient_features(mlp_scalar, params, X, y, proj)
    np.testing.assert_allclose(target.grads, want.grads, rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="task_ids"):
        jax.block_until_ready(feats(params, X, y, jnp.arange(X.shape[0]) % 5).grads)
