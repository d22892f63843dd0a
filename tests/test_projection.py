"""Tests for kernattr.labels._projection: make_projector, project, projector_matrix, Projector."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernattr as ka
from conftest import tol


def tree(dtype=jnp.float32):
    k = jax.random.split(jax.random.key(0), 3)
    return {
        "a": jax.random.normal(k[0], (4, 5), dtype),
        "b": jax.random.normal(k[1], (3,), dtype),
        "c": jax.random.normal(k[2], (2, 2, 3), dtype),
    }


def vec(t, batch=()):
    return jnp.concatenate([x.reshape(batch + (-1,)) for x in jax.tree_util.tree_leaves(t)], -1)


KINDS = [("rademacher", 8, 1), ("gaussian", 8, 1), ("sjlt", 8, 1), ("sjlt", 8, 4), ("identity", None, 1)]


@pytest.mark.parametrize("kind,dim,s", KINDS)
def test_project_equals_explicit_matrix_f32(kind, dim, s):
    t = tree()
    proj = ka.make_projector(jax.random.key(1), t, dim=dim, kind=kind, block_size=6, nonzeros=s)
    P = jax.jit(ka.projector_matrix)(proj)
    assert P.shape == (35, proj.dim) and proj.num_params == 35
    got = jax.jit(ka.project)(proj, t)
    np.testing.assert_allclose(got, vec(t) @ P, rtol=2e-5, atol=2e-5)
    # leading batch dimensions [2, 3]
    tb = jax.tree_util.tree_map(lambda x: jnp.stack([jnp.stack([x * (i + j) for j in range(3)]) for i in range(2)]), t)
    got_b = jax.jit(ka.project)(proj, tb)
    assert got_b.shape == (2, 3, proj.dim)
    np.testing.assert_allclose(got_b, vec(tb, (2, 3)) @ P, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kind,dim,s", [("rademacher", 8, 1), ("sjlt", 8, 2), ("gaussian", 8, 1)])
def test_project_equals_explicit_matrix_f64(kind, dim, s, x64):
    t = tree(jnp.float64)
    proj = ka.make_projector(jax.random.key(2), t, dim=dim, kind=kind, block_size=7, nonzeros=s)
    P = ka.projector_matrix(proj, dtype=jnp.float64)
    got = jax.jit(ka.project)(proj, t)
    assert got.dtype == jnp.float64
    rtol, atol = tol(jnp.float64)
    np.testing.assert_allclose(got, vec(t) @ P, rtol=rtol, atol=atol)


def test_groups_of_leaves_are_consecutive_and_bounded(monkeypatch):
    from kernattr.labels import _projection

    monkeypatch.setattr(_projection, "_GROUP_ROWS", 12)
    assert _projection._groups([4, 1, 2], 6) == [(0, 1), (1, 2), (2, 3)]  # 24 > 12: alone
    monkeypatch.setattr(_projection, "_GROUP_ROWS", 18)
    assert _projection._groups([4, 1, 2], 6) == [(0, 1), (1, 3)]
    assert _projection._groups([1, 1, 1], 6) == [(0, 3)]


@pytest.mark.parametrize("kind,s", [("rademacher", 1), ("gaussian", 1), ("sjlt", 1), ("sjlt", 4)])
def test_large_models_are_projected_group_by_group(monkeypatch, kind, s):
    """Above ``_GROUP_ROWS`` padded rows, the leaves are concatenated and projected one group at a
    time (so a chunk's gradients are never copied whole): still ``vec @ P``, and the same
    projection as one group to float32 rounding (XLA may fuse the gradient's last operations
    into each group's copy differently), in ``project`` and in ``projected_gradients``
    (chunked)."""
    from kernattr.labels import _projection

    t = tree()  # leaves of 20, 3 and 12 parameters: 4, 1 and 2 blocks of 6 rows
    proj = ka.make_projector(jax.random.key(1), t, dim=8, kind=kind, block_size=6, nonzeros=s)
    P = jax.jit(ka.projector_matrix)(proj)
    tb = jax.tree_util.tree_map(lambda x: jax.random.normal(jax.random.key(2), (3,) + x.shape), t)
    X = jax.random.normal(jax.random.key(3), (8, 35))

    def f(p, x):
        return jnp.tanh(vec(p) @ x)

    def both():  # fresh functions, so that each is traced with the current _GROUP_ROWS
        return (
            jax.jit(lambda pr, x: ka.project(pr, x))(proj, tb),
            jax.jit(lambda p, x, pr: ka.projected_gradients(f, p, x, pr, chunk_size=2))(t, X, proj),
        )

    def loops():  # block loops (dense kinds) or scatter-adds (sjlt) in the traced program
        text = str(jax.make_jaxpr(lambda pr, x: ka.project(pr, x))(proj, tb))
        return text.count("scan[") + text.count("scatter-add[")

    one_group, one_loops = both(), loops()
    monkeypatch.setattr(_projection, "_GROUP_ROWS", 18)  # groups: leaf 0 alone, leaves 1-2
    grouped = both()
    assert (one_loops, loops()) == ((s, 2 * s) if kind == "sjlt" else (1, 2))
    jac = jax.vmap(lambda x: jax.grad(lambda v: jnp.tanh(v @ x))(vec(t)))(X)  # [8, 35]
    np.testing.assert_allclose(grouped[0], vec(tb, (3,)) @ P, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(grouped[1], jac @ P, rtol=2e-5, atol=2e-5)
    for a, b in zip(grouped, one_group):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    if s == 1 and kind != "gaussian":  # grouped inside shard_map: examples split over 8 devices
        Xs = ka.shard_examples(X, ka.data_mesh())
        sharded = jax.jit(lambda p, x, pr: ka.projected_gradients(f, p, x, pr, chunk_size=1))(t, Xs, proj)
        np.testing.assert_allclose(sharded, grouped[1], rtol=2e-5, atol=2e-6)  # chunks of 1, not 2


def test_matrix_entries_as_documented():
    params = {"w": jnp.zeros((300, 20)), "b": jnp.zeros(100)}  # D = 6100
    d = 64
    rad = np.asarray(ka.projector_matrix(ka.make_projector(jax.random.key(3), params, dim=d)))
    np.testing.assert_allclose(np.abs(rad), 1 / math.sqrt(d), rtol=1e-6)
    assert abs(np.mean(rad > 0) - 0.5) < 0.01  # 390k signs
    gau = np.asarray(
        ka.projector_matrix(ka.make_projector(jax.random.key(3), params, dim=d, kind="gaussian"))
    )
    assert abs(gau.mean()) < 4 / math.sqrt(gau.size) / math.sqrt(d)
    assert abs(gau.var() * d - 1) < 0.01
    ident = ka.projector_matrix(ka.make_projector(jax.random.key(3), params, dim=None, kind="identity"))
    np.testing.assert_array_equal(ident, np.eye(6100))


@pytest.mark.parametrize("s", [1, 2, 4])
def test_sjlt_sparsity_as_documented(s):
    """Exactly s nonzeros per row (parameter), one in each group of w = d/s columns, ±1/√s."""
    params = {"w": jnp.zeros((50, 40)), "b": jnp.zeros(7)}
    d = 16
    w = d // s
    proj = ka.make_projector(jax.random.key(4), params, dim=d, kind="sjlt", nonzeros=s, block_size=512)
    P = np.asarray(ka.projector_matrix(proj))
    assert P.shape == (2007, d)
    nz = P != 0
    np.testing.assert_array_equal(nz.sum(1), s)
    for g in range(s):
        np.testing.assert_array_equal(nz[:, g * w : (g + 1) * w].sum(1), 1)
    np.testing.assert_allclose(np.abs(P[nz]), 1 / math.sqrt(s), rtol=1e-6)
    # buckets and signs uniform: loose chi-square-style bounds on 2007 rows
    counts = nz.sum(0)
    expected = 2007 / w
    assert np.all(np.abs(counts - expected) < 5 * math.sqrt(expected))
    assert abs(np.mean(P[nz] > 0) - 0.5) < 0.05


def test_blocks_depend_only_on_key_leaf_and_block():
    """Rows of a leaf do not change when other leaves change shape or are filtered out."""
    p1 = {"a": jnp.zeros(10), "b": jnp.zeros(7)}
    p2 = {"a": jnp.zeros(10), "b": jnp.zeros(20)}
    for kind in ["rademacher", "sjlt"]:
        m1 = ka.projector_matrix(ka.make_projector(jax.random.key(5), p1, dim=8, kind=kind, block_size=4))
        m2 = ka.projector_matrix(ka.make_projector(jax.random.key(5), p2, dim=8, kind=kind, block_size=4))
        np.testing.assert_array_equal(m1[:10], m2[:10])
        only_b = ka.make_projector(
            jax.random.key(5), p1, dim=8, kind=kind, block_size=4, filter={"a": False, "b": True}
        )
        assert only_b.num_params == 7
        np.testing.assert_array_equal(ka.projector_matrix(only_b), m1[10:])
        other_key = ka.projector_matrix(ka.make_projector(jax.random.key(6), p1, dim=8, kind=kind, block_size=4))
        assert not np.allclose(other_key, m1)


@pytest.mark.parametrize("kind,s", [("rademacher", 1), ("gaussian", 1), ("sjlt", 1), ("sjlt", 4)])
def test_johnson_lindenstrauss_inner_products(kind, s):
    """n=20 random vectors in D=3000, d=256: every pairwise inner product (normalised) within
    eps = sqrt(8 ln n / d) ≈ 0.31 (JL with a standard constant); and the average over 64 keys is
    unbiased within 4 standard errors."""
    n, d = 20, 256
    params = {"w": jnp.zeros((50, 50)), "b": jnp.zeros(500)}
    U = jax.random.normal(jax.random.key(7), (n, 3000))
    U = U / jnp.linalg.norm(U, axis=1, keepdims=True)
    batch = {"b": U[:, :500], "w": U[:, 500:].reshape(n, 50, 50)}
    exact = U @ U.T
    proj = ka.make_projector(jax.random.key(8), params, dim=d, kind=kind, nonzeros=s)
    Y = jax.jit(ka.project)(proj, batch)
    err = np.abs(np.asarray(Y @ Y.T - exact))
    eps = math.sqrt(8 * math.log(n) / d)
    assert err.max() < eps, err.max()
    # unbiasedness, vmapped over keys (make_projector + project under vmap)
    keys = jax.random.split(jax.random.key(9), 64)
    Ys = jax.jit(jax.vmap(lambda k: ka.project(ka.make_projector(k, params, dim=d, kind=kind, nonzeros=s), batch)))(keys)
    mean_gram = np.asarray(jnp.mean(jnp.einsum("kid,kjd->kij", Ys, Ys), axis=0))
    se = math.sqrt(2 / d) / math.sqrt(64)
    assert np.abs(mean_gram - exact).max() < 4 * se
    # different keys give different projections
    assert not np.allclose(Ys[0], Ys[1])


def test_projector_is_a_pytree_with_static_config():
    t = tree()
    proj = ka.make_projector(jax.random.key(0), t, dim=4, kind="sjlt", nonzeros=2)
    leaves, treedef = jax.tree_util.tree_flatten(proj)
    assert len(leaves) == 1 and jnp.issubdtype(leaves[0].dtype, jax.dtypes.prng_key)
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    assert again == proj or (again.kind, again.dim, again.nonzeros) == ("sjlt", 4, 2)
    traces = []

    def f(pr, t):
        traces.append(1)
        return ka.project(pr, t)

    jf = jax.jit(f)
    outs = [jf(ka.make_projector(jax.random.key(i), t, dim=4, kind="sjlt", nonzeros=2), t) for i in range(3)]
    assert len(traces) == 1
    assert not np.allclose(outs[0], outs[1])


def test_bad_input():
    t = tree()
    mk = ka.make_projector
    with pytest.raises(TypeError, match="key"):
        mk(jax.random.PRNGKey(0), t, dim=4)
    with pytest.raises(ValueError, match="key"):
        mk(jax.random.split(jax.random.key(0), 2), t, dim=4)
    for bad in [0, -3, 2.5, None, True]:
        with pytest.raises(ValueError, match="dim"):
            mk(jax.random.key(0), t, dim=bad)
    with pytest.raises(ValueError, match="kind"):
        mk(jax.random.key(0), t, dim=4, kind="fjlt")
    with pytest.raises(ValueError, match="nonzeros"):
        mk(jax.random.key(0), t, dim=6, kind="sjlt", nonzeros=4)
    with pytest.raises(ValueError, match="nonzeros"):
        mk(jax.random.key(0), t, dim=4, kind="sjlt", nonzeros=0)
    with pytest.raises(ValueError, match="dim"):
        mk(jax.random.key(0), t, dim=3, kind="identity")
    with pytest.raises(ValueError, match="block_size"):
        mk(jax.random.key(0), t, dim=4, block_size=0)
    with pytest.raises(ValueError, match="filter"):
        mk(jax.random.key(0), t, dim=4, filter=lambda p, x: False)
    with pytest.raises(ValueError, match="filter"):
        mk(jax.random.key(0), t, dim=4, filter={"a": True})
    with pytest.raises(TypeError, match="filter"):
        mk(jax.random.key(0), t, dim=4, filter=lambda p, x: jnp.array(True))
    with pytest.raises(TypeError, match="filter"):
        mk(jax.random.key(0), {**t, "step": jnp.array(3)}, dim=4, filter=lambda p, x: True)
    # integer leaves are skipped by the default filter
    assert mk(jax.random.key(0), {**t, "step": jnp.array(3)}, dim=4).num_params == 35
    with pytest.raises(TypeError, match="params"):
        mk(jax.random.key(0), {"a": "weights"}, dim=4)
    with pytest.raises(ValueError, match="params"):
        mk(jax.random.key(0), {}, dim=4)
    proj = mk(jax.random.key(0), t, dim=4)
    with pytest.raises(ValueError, match="tree"):
        ka.project(proj, {"a": t["a"]})
    with pytest.raises(ValueError, match="tree"):
        ka.project(proj, {**t, "b": jnp.zeros(4)})
    with pytest.raises(ValueError, match="tree"):
        ka.project(proj, {**t, "b": jnp.zeros((2, 3))})
