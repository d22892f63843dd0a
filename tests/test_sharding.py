"""Sharding: with 8 fake CPU devices, examples split on a ``data`` mesh axis give the
single-device results and stay sharded on ``data``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import kernattr as ka


def mlp(p, x):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return h @ p["w2"]


def setup(n=16):
    k = jax.random.split(jax.random.key(0), 4)
    params = {
        "w1": jax.random.normal(k[0], (3, 5)),
        "b1": jax.random.normal(k[1], (5,)),
        "w2": jax.random.normal(k[2], (5, 2)),
    }
    X = jax.random.normal(k[3], (n, 3))
    return params, X


def assert_on_data(x, mesh):
    assert isinstance(x.sharding, NamedSharding)
    assert x.sharding.mesh.shape == mesh.shape
    assert x.sharding.spec[0] == "data"
    assert len(x.addressable_shards) == 8
    assert {s.data.shape[0] for s in x.addressable_shards} == {x.shape[0] // 8}


def test_mesh_helpers():
    assert jax.device_count() == 8
    mesh = ka.data_mesh()
    assert mesh.axis_names == ("data",) and mesh.shape["data"] == 8
    assert mesh.axis_types == (AxisType.Explicit,)
    X = ka.shard_examples({"x": jnp.arange(16.0).reshape(8, 2), "t": jnp.arange(8)}, mesh)
    assert_on_data(X["x"], mesh)
    assert_on_data(X["t"], mesh)
    np.testing.assert_array_equal(X["x"], np.arange(16.0).reshape(8, 2))
    with pytest.raises(ValueError, match="divisible"):
        ka.shard_examples(jnp.zeros((12, 2)), mesh)
    with pytest.raises(ValueError, match="axis"):
        ka.shard_examples(jnp.zeros((8, 2)), mesh, axis="batch")


@pytest.mark.parametrize("kind", ["sjlt", "rademacher"])
@pytest.mark.parametrize("method", ["vjp", "jvp"])
def test_projected_gradients_sharded_equals_single_device(kind, method):
    params, X = setup()
    proj = ka.make_projector(jax.random.key(1), params, dim=8, kind=kind, block_size=8)
    fn = jax.jit(lambda p, x, pr: ka.projected_gradients(mlp, p, x, pr, chunk_size=1, method=method))
    ref = fn(params, X, proj)
    mesh = ka.data_mesh()
    Xs = ka.shard_examples(X, mesh)
    got = fn(params, Xs, proj)  # mesh read from the Explicit-typed inputs
    assert_on_data(got, mesh)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-6)
    # per-example, not summed over the devices of a shard: every row differs
    assert len({tuple(np.round(np.asarray(r).ravel(), 5)) for r in got}) == 16


def test_eager_and_auto_mesh():
    params, X = setup()
    proj = ka.make_projector(jax.random.key(2), params, dim=6, kind="sjlt")
    ref = jax.jit(lambda p, x: ka.projected_gradients(mlp, p, x, proj))(params, X)
    mesh = ka.data_mesh()
    committed = jax.device_put(params, jax.devices()[0])  # eager calls replicate it on the mesh
    got = ka.projected_gradients(mlp, committed, ka.shard_examples(X, mesh), proj, chunk_size=1)
    assert_on_data(got, mesh)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-6)
    # Auto mesh: the sharding is invisible under jit, so it is passed as mesh=
    auto = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    Xa = jax.device_put(X, NamedSharding(auto, PartitionSpec("data")))
    got = jax.jit(lambda p, x: ka.projected_gradients(mlp, p, x, proj, chunk_size=2, mesh=auto))(params, Xa)
    assert_on_data(got, auto)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-6)


def test_gradient_features_sharded():
    params, X = setup()
    y = jnp.arange(16.0)
    t = jnp.arange(16) % 4
    proj = ka.make_projector(jax.random.key(3), params, dim=8)
    fn = jax.jit(lambda p, x, y, t: ka.gradient_features(mlp, p, x, y, proj, task_ids=t, num_tasks=4, chunk_size=1))
    ref = fn(params, X, y, t)
    mesh = ka.data_mesh()
    Xs, ys, ts = ka.shard_examples((X, y, t), mesh)
    got = fn(params, Xs, ys, ts)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    assert_on_data(got.grads, mesh)
    assert_on_data(got.outputs, mesh)
    assert_on_data(got.labels, mesh)
    # a non-finite example on some shard is still reported with the global count
    Xbad = ka.shard_examples(X.at[jnp.array([0, 9, 15]), 0].set(jnp.nan), mesh)
    with pytest.raises(ValueError, match="3 examples have non-finite"):
        ka.gradient_features(mlp, params, Xbad, ys, proj)


def test_bad_sharded_input():
    params, X = setup(n=12)
    proj = ka.make_projector(jax.random.key(4), params, dim=4)
    mesh = ka.data_mesh()
    with pytest.raises(ValueError, match="divisible"):
        ka.projected_gradients(mlp, params, X, proj, mesh=mesh)
    with pytest.raises(ValueError, match="axis"):
        ka.projected_gradients(mlp, params, X, proj, mesh=jax.make_mesh((8,), ("batch",)))


def test_sharded_masks_and_labels_into_fit_kernel_and_fit_linear():
    """issue 26 row 3: rows sharded with shard_examples give the single-device fits (the
    direct solvers gather them), eagerly and under jit."""
    mesh = ka.data_mesh()
    masks = ka.sample_subsets(jax.random.key(0), num_tasks=5, num_subsets=32, p=0.5)
    y = jnp.stack([masks[:, 0] * masks[:, 1], masks[:, 2] - masks[:, 3]], 1)
    sm, sy = ka.shard_examples((masks, y), mesh)
    assert sm.sharding.spec == PartitionSpec("data")
    grids = dict(gamma=jnp.array([0.1, 0.5]), ridge=jnp.array([0.01, 1.0]))
    for fit in (lambda a, b: ka.fit_kernel(a, b, **grids), lambda a, b: ka.fit_linear(a, b)):
        ref = fit(masks, y)
        for got in (fit(sm, sy), jax.jit(fit)(sm, sy)):
            for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
