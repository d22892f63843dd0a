"""The ``"fast"`` solver's linear algebra: one Newton step per mask from per-task statistics.

A mask's Newton system is ``Σ_k c_k A_k + ridge I`` with the per-task Hessians ``A_k`` stored as
packed lower triangles (half the ``K d²`` flops per mask); it is factored by Cholesky, with a
singularity flag. The ``"anchored"`` and ``"exact"`` solvers reuse these factors (the latter as
its preconditioner).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["chol_solve", "fast_system", "pack", "packing"]


def packing(d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower-triangle packing of symmetric ``d x d`` matrices (static numpy index arrays).

    Returns ``(rows, cols)`` of the packed entries and ``full [d * d]``, the packed position of
    every entry of the full matrix (both triangles), so ``packed[..., full]`` unpacks.
    """
    rows, cols = np.tril_indices(d)
    full = np.zeros((d, d), np.int32)
    full[rows, cols] = np.arange(rows.size)
    full[cols, rows] = np.arange(rows.size)
    return rows, cols, full.reshape(-1)


def pack(a: jax.Array) -> jax.Array:
    """``[K, d, d]`` symmetric -> ``[K, d (d + 1) / 2]`` lower triangles."""
    rows, cols, _ = packing(a.shape[-1])
    return a[:, rows, cols]


def fast_system(a, b, coef, ridge, empty):
    """Cholesky factors ``[mc, d, d]``, gradients ``[mc, d]`` and a singular flag ``[mc]``.

    ``a [K, d (d + 1) / 2]`` packed per-task Hessians (half the ``K d²`` flops per mask); the
    system of an empty mask is replaced by the identity (its gradient is zero: ``θ = 0``).
    """
    mc = coef.shape[0]
    d = b.shape[1]
    rows, cols, full = packing(d)
    on_diag = jnp.asarray(rows == cols, a.dtype)
    hp = coef @ a + ridge * on_diag[None, :]  # [mc, P]
    hp = jnp.where(empty[:, None], on_diag[None, :], hp)
    h = hp[:, full].reshape(mc, d, d)
    g = coef @ b
    chol = jax.lax.linalg.cholesky(h, symmetrize_input=False)
    diag = jnp.diagonal(chol, axis1=1, axis2=2)
    scale = jnp.max(jnp.diagonal(h, axis1=1, axis2=2), axis=1)
    eps = jnp.finfo(a.dtype).eps
    singular = ~jnp.all(jnp.isfinite(diag), axis=1) | (
        jnp.min(diag, axis=1) ** 2 <= 10.0 * d * eps * scale
    )
    return chol, g, singular


def chol_solve(chol: jax.Array, rhs: jax.Array) -> jax.Array:
    """Solve ``L Lᵀ x = rhs`` per mask; ``chol [mc, d, d]``, ``rhs [d, mc]`` -> ``[d, mc]``."""
    x = jax.scipy.linalg.cho_solve((chol, True), rhs.T[:, :, None])
    return x[:, :, 0].T
