"""kernattr._linalg.eigh: jnp.linalg.eigh semantics, but vmap never emits a batched LAPACK call
(batched CPU LAPACK calls can deadlock XLA's intra-op pool when several are ready at once)."""

import jax
import jax.numpy as jnp
import numpy as np

import kernattr as ka
from kernattr._linalg import eigh


def _sym(key, shape):
    x = jax.random.normal(key, shape)
    return x + jnp.swapaxes(x, -1, -2)


def test_values_grads_and_nested_vmap_match_jnp_eigh():
    a = _sym(jax.random.key(0), (2, 3, 5, 5))
    w, v = jax.jit(jax.vmap(jax.vmap(eigh)))(a)
    w_ref, _ = jnp.linalg.eigh(a)
    np.testing.assert_allclose(w, w_ref, rtol=1e-5, atol=1e-5)
    recon = jnp.einsum("...ij,...j,...kj->...ik", v, w, v)
    np.testing.assert_allclose(recon, a, rtol=1e-4, atol=1e-4)

    def loss(fn, x):
        w_, v_ = jax.vmap(fn)(x)
        return jnp.sum(jnp.sin(w_)) + jnp.sum(v_[..., 0] ** 2 * jnp.arange(5.0)[None, :])

    b = a[0]
    g = jax.jit(jax.grad(lambda x: loss(eigh, x)))(b)
    g_ref = jax.grad(lambda x: loss(jnp.linalg.eigh, x))(b)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)


def _batch_dims(text):
    return [line.split('num_batch_dims = "')[1][0] for line in text.splitlines() if "syevd" in line]


def test_vmap_and_grid_fits_emit_only_unbatched_lapack_calls():
    a = _sym(jax.random.key(1), (3, 4, 4))
    assert _batch_dims(jax.jit(jax.vmap(jnp.linalg.eigh)).lower(a).as_text()) == ["1"]  # the hazard
    assert _batch_dims(jax.jit(jax.vmap(eigh)).lower(a).as_text()) == ["0"]
    masks = ka.sample_subsets(jax.random.key(2), num_tasks=6, num_subsets=30, p=0.5)
    y = masks[:, :2] @ jnp.array([[1.0, 0.5], [-1.0, 2.0]])
    # the cheap and the residual grid searches of fit_multifidelity: two independent grids
    text = jax.jit(lambda m, yy: ka.fit_multifidelity(m, yy, m[:12], yy[:12])).lower(masks, y).as_text()
    dims = _batch_dims(text)
    assert dims and set(dims) == {"0"}, dims
