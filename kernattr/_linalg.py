"""Symmetric eigendecomposition that never issues a batched LAPACK call on CPU.

Why. jaxlib's CPU LAPACK kernels split a *batched* call (``eigh`` of ``[B, n, n]``, as produced
by ``vmap`` over a hyperparameter grid) across XLA's intra-op thread pool and block the worker
that runs them until the pieces finish. When as many batched calls as there are pool workers
are ready at once (with a two-worker pool, two independent grid searches such as the cheap and
the residual fits of :func:`kernattr.fit_multifidelity`), every worker blocks waiting for pieces
that no free worker can run: the program deadlocks, at 0% CPU with every ``tf_XLAEigen`` thread in
``jax::ParallelBatchMap`` (jaxlib 0.10.2). An unbatched call runs
inline and cannot deadlock this way, so :func:`eigh` keeps ``vmap`` semantics but batches by a
sequential ``lax.map`` over single decompositions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["eigh"]


@jax.custom_jvp
def eigh(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``jnp.linalg.eigh`` of one ``[n, n]`` symmetric matrix: ``(w [n] ascending, v [n, n])``.

    Under ``vmap`` the batch is decomposed one matrix at a time (``lax.map``), never by a
    batched LAPACK call (module docstring). Differentiable (forward and reverse mode) with the
    JVP of ``jnp.linalg.eigh``.

    >>> import jax, jax.numpy as jnp
    >>> a = jnp.array([[[2.0, 1.0], [1.0, 2.0]], [[1.0, 0.0], [0.0, 3.0]]])
    >>> jax.vmap(eigh)(a)[0].tolist()
    [[1.0, 3.0], [1.0, 3.0]]
    """
    return _eigh_unbatched(a)


@eigh.defjvp
def _eigh_jvp(primals, tangents):
    (a,), (da,) = primals, tangents
    w, v = eigh(a)
    da = 0.5 * (da + da.T)  # eigh reads a symmetrised input
    eye = jnp.eye(a.shape[-1], dtype=a.dtype)
    f = 1.0 / (eye + w[None, :] - w[:, None]) - eye
    vdv = v.T @ da @ v
    return (w, v), (jnp.diagonal(vdv), v @ (f * vdv))


@jax.custom_batching.custom_vmap
def _eigh_unbatched(a):
    w, v = jnp.linalg.eigh(a)
    return w, v


@_eigh_unbatched.def_vmap
def _eigh_vmap(axis_size, in_batched, a):
    del axis_size
    (batched,) = in_batched
    if not batched:
        return _eigh_unbatched(a), (False, False)
    return jax.lax.map(_eigh_unbatched, a), (True, True)
