"""Ridge regression in a feature space, streamed over row blocks: the engine under the
Nyström (:mod:`._nystrom`) and Walsh / quadratic (:mod:`._quadratic`) surrogates.

For features ``φ(s)`` of the masks (Nyström columns, Walsh functions) the ridge regression
``min_{b, w} ||y - b·1 - Φ w||² + ridge·||w||²`` is solved without forming ``Φ``: one pass over
row blocks accumulates the centred Gram ``Σ (φ-φ̄)(φ-φ̄)ᵀ`` and ``Σ (φ-φ̄)(y-ȳ)ᵀ``
(:func:`centred_feature_stats`), one eigendecomposition gives every ridge of a grid
(:func:`ridge_spectrum`), and a second pass gives the exact leave-one-out residuals
``r_i = e_i / (1 - H_ii)`` for every ridge at once (:func:`loo_row_sums`,
:func:`loo_cv_error`). Memory is ``O(r² + block·r)``, independent of the number of masks ``m``.

Sharding: with ``where = (mesh, axis)`` (from :func:`kernattr._sharding.mask_mesh`) each device
sums its own rows and the statistics are ``psum``'d over the axis (:func:`accumulate_rows`).

Shapes: ``m`` masks, ``r`` features, ``T`` targets, ``R`` ridges, ``P`` grid points, ``B`` rows
in a block.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from .._linalg import eigh
from .._sharding import replicate, shard_rows

__all__ = ["accumulate_rows", "centred_feature_stats", "loo_cv_error", "loo_row_sums", "ridge_spectrum"]


def accumulate_rows(fn, replicated: Any, rows: Any, *, block_size: int, where=None) -> Any:
    """``Σ_blocks fn(replicated, rows_block, valid_block)`` over row blocks of ``rows``.

    ``rows`` is a pytree of ``[m, ...]`` arrays, cut into blocks of ``block_size`` rows (the
    last block zero-padded; ``valid [block]`` is 1 on real rows, 0 on padding; ``fn`` must
    weight its output by it). With ``where = (mesh, axis)`` each device sums its own rows
    (kernel blocks are computed where the masks live) and the results are ``psum``'d, replicated.
    """

    def local(rep, rws):
        n = jax.tree_util.tree_leaves(rws)[0].shape[0]
        b = max(1, min(block_size, n))
        nb = -(-n // b)
        pad = nb * b - n

        def cut(a):
            a = jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)], axis=0) if pad else a
            return a.reshape((nb, b) + a.shape[1:])

        blocks = jax.tree_util.tree_map(cut, rws)
        dtype = jax.tree_util.tree_leaves(rws)[0].dtype
        valid = (jnp.arange(nb * b) < n).astype(dtype).reshape(nb, b)
        first = jax.tree_util.tree_map(lambda a: a[0], blocks)
        shapes = jax.eval_shape(fn, rep, first, valid[0])
        init = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        if where is not None:
            init = jax.tree_util.tree_map(lambda z: jax.lax.pcast(z, where[1], to="varying"), init)

        def body(acc, xs):
            blk, v = xs
            out = fn(rep, blk, v)
            return jax.tree_util.tree_map(jnp.add, acc, out), None

        acc, _ = jax.lax.scan(body, init, (blocks, valid))
        if where is not None:
            acc = jax.lax.psum(acc, where[1])
        return acc

    if where is None:
        return local(replicated, rows)
    mesh, axis = where
    rows = shard_rows(rows, where)
    replicated = replicate(replicated, where)
    rep_specs = jax.tree_util.tree_map(lambda _: PartitionSpec(), replicated)
    row_specs = jax.tree_util.tree_map(lambda _: PartitionSpec(axis), rows)
    return jax.shard_map(
        local, mesh=mesh, in_specs=(rep_specs, row_specs), out_specs=PartitionSpec()
    )(replicated, rows)


def centred_feature_stats(feats, rep: Any, ref: jax.Array, masks: jax.Array, y: jax.Array,
                          y_mean: jax.Array, *, block_size: int, where=None):
    """One pass over the rows: ``(φ̄ [r], Σ (φ-φ̄)(φ-φ̄)ᵀ [r, r], Σ (φ-φ̄)(y-ȳ)ᵀ [r, T],
    Σ (y-ȳ)² [T])`` for features ``φ = feats(rep, masks_block)``.

    ``ref [r]`` is a reference shift close to the mean feature: the sums are taken of ``φ - ref``
    and centred afterwards, which keeps float32 accumulation well conditioned.
    """
    mf = jnp.asarray(masks.shape[0], y.dtype)

    def stats(rp, blk, v):
        r_, rf, ym = rp
        bm, by = blk
        x = (feats(r_, bm) - rf[None, :]) * v[:, None]
        yc = (by - ym[None, :]) * v[:, None]
        return jnp.sum(x, axis=0), x.T @ x, x.T @ yc, jnp.sum(yc * yc, axis=0)

    s1, s2, sy, yc2 = accumulate_rows(stats, (rep, ref, y_mean), (masks, y), block_size=block_size,
                                      where=where)
    shift = s1 / mf  # φ̄ - ref
    gram = s2 - mf * shift[:, None] * shift[None, :]
    # Σ (φ - φ̄)(y - ȳ) = Σ (φ - ref)(y - ȳ) since Σ (y - ȳ) = 0
    return ref + shift, 0.5 * (gram + gram.T), sy, yc2


def loo_cv_error(sq: jax.Array, valid: jax.Array, yc2: jax.Array, num_train: jax.Array) -> jax.Array:
    """``[P, R, T]`` leave-one-out MSE over each target's label variance from the sums ``sq``
    (:func:`loo_row_sums`); ``inf`` where ``valid [P, R]`` is False or the value is not finite."""
    scale = yc2 / num_train
    scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    cv = sq / num_train / scale[None, None, :]
    return jnp.where(valid[:, :, None] & jnp.isfinite(cv), cv, jnp.inf)


def ridge_spectrum(gram: jax.Array, ridge_grid: jax.Array, ok: jax.Array, zero_ridge_scale: float):
    """Eigendecomposition of a centred feature Gram matrix for every ridge of a grid.

    Returns ``(s [r], V [r, r], valid [R], inv [R, r])``: eigenvalues clamped at 0, their
    vectors, whether ``s + ridge`` is safely non-singular (tolerance ``eps·max|s|``, times
    ``zero_ridge_scale`` for ``ridge = 0``) and ``ok``, and ``1/(s + ridge)`` (0 where invalid).
    """
    eps = jnp.finfo(gram.dtype).eps
    sv, vv = eigh(gram)
    s_max = jnp.max(jnp.abs(sv))
    sv = jnp.maximum(sv, 0.0)
    tol = jnp.where(ridge_grid > 0, 1.0, float(zero_ridge_scale)) * eps * s_max
    valid = (jnp.min(sv) + ridge_grid > tol) & ok  # [R]
    inv = jnp.where(valid[:, None], 1.0 / (sv[None, :] + ridge_grid[:, None]), 0.0)  # [R, r]
    return sv, vv, valid, inv


def loo_row_sums(psi: jax.Array, yc: jax.Array, inv: jax.Array, z: jax.Array, valid_rows: jax.Array,
                 num_train: jax.Array):
    """Leave-one-out sums of ridge regression in a feature space, for one block of rows.

    ``psi [B, r]``: centred features of the rows in the eigenbasis; ``yc [B, T]``: centred labels;
    ``inv [R, r]``: ``1/(s + ridge)``; ``z [r, T]``: ``Vᵀ Φ_cᵀ y_c``; ``valid_rows [B]``: 1 on real
    rows. With the hat diagonal ``H_ii = ψ_iᵀ diag(inv) ψ_i + 1/m`` (intercept included) and the
    in-sample residual ``e_i``, returns ``(Σ r_i², Σ e_i²/(1 - H_ii))``, each ``[R, T]``, with
    ``r_i = e_i/(1 - H_ii)`` the exact leave-one-out residual.
    """
    eps = jnp.finfo(psi.dtype).eps
    h = (psi * psi) @ inv.T + 1.0 / num_train  # [B, R]
    pred = jnp.einsum("br,Rr,rt->Rbt", psi, inv, z)  # [R, B, T]
    e = yc[None, :, :] - pred
    one_minus_h = jnp.maximum(1.0 - h, eps).T[:, :, None]  # [R, B, 1]
    r = e / one_minus_h
    wt = valid_rows[None, :, None]
    return jnp.sum(wt * r * r, axis=1), jnp.sum(wt * e * e / one_minus_h, axis=1)
