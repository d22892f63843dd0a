"""Nyström (landmark) kernel ridge regression for many masks, with closed-form LOO selection.

Exact kernel ridge regression (:func:`kernattr.fit_kernel`) builds the ``m x m`` kernel matrix;
it stops at a few thousand masks. The Nyström surrogate keeps ``L`` *landmark* masks
(``L << m``, drawn uniformly without replacement from the training masks with ``key``) and fits
kernel ridge regression in the feature space of the approximate kernel
``k̃(s, s') = k(s, Λ) K_ΛΛ⁺ k(Λ, s')``::

    φ(s) = k(s, Λ) W,    W = U diag(d^{-1/2}) on the numerical range of K_ΛΛ = U diag(d) Uᵀ
    min_{b, w}  ||y - b·1 - Φ w||² + ridge·||w||²

This is the "subset of regressors" model: the predictor is ``g(s) = b + k(s, Λ) β`` with
``β = W w``, a weighted sum of kernel columns at the landmarks. It is returned as a
:class:`~kernattr.KernelSurrogate` whose ``masks`` are the landmarks, so ``predict``,
``loo_scores``, ``shapley_values`` and ``interaction_scores`` are *exact* for it (the product-game
Shapley formula applies term by term). With ``L = m`` landmarks it is exactly
:func:`kernattr.fit_kernel` (same objective, same closed-form LOO).

Hyperparameters at scale: for each bandwidth, one pass over the masks in row blocks accumulates
``ΦᵀΦ``, ``Φᵀy`` (``O(m L²)``), one ``L x L`` eigendecomposition of the centred ``ΦᵀΦ`` gives
every ridge value, and a second pass gives the exact leave-one-out residuals
``r_i = (y_i - ŷ_i) / (1 - H_ii)`` of the ridge regression in feature space (intercept included)
for every ridge at once. Memory is ``O(L² + block·L)``, independent of ``m``.

Choosing ``L``: the fit can only represent functions in the span of the ``L`` landmark columns.
The RBF kernel on 0/1 masks is a product kernel, ``exp(-γ·Hamming) = Π_k (a + b χ_k χ_k')`` with
``χ_k = 2 s_k - 1``, so its feature space is ordered by Walsh degree; a game with pairwise
interactions among ``K`` tasks needs the ``1 + K + K(K-1)/2`` functions of degree <= 2. With ``L``
well below that (``L = 512`` for ``K = 100``: 5,051 functions) the Nyström fit recovers the
first-order part and little of the interactions (a rank limit: ``L`` columns span at most ``L``
of the ~K²/2 nearly equally weighted pair directions, however they are chosen); measured at
m = 5,000, K = 100 (``benchmarks/bench_scale.py``): held-out LDS 0.70 (L = 512), 0.73 (1,024),
0.78 (2,048) against 0.935 for the exact fit. Take ``L`` above that dimension when interactions
matter (at K = 12, L = 128 > 79 matches the exact fit), use the exact CG solve, or
:func:`kernattr.fit_quadratic`, which fits exactly the functions of degree <= 2 (at m = 5,000,
K = 100: LDS 0.956).

Sharding: when the masks carry a ``NamedSharding`` on their leading axis (or ``mesh=`` is given),
each device computes the kernel blocks of its own masks and the ``L x L`` statistics are summed
over the mesh axis (``psum``); everything of size ``L`` is replicated. The result equals the
single-device one up to the order of floating-point sums.

Shapes: ``m`` masks, ``K`` tasks, ``T`` targets, ``L`` landmarks, ``G`` bandwidths, ``R`` ridges.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from . import _checks
from ._sharding import example_mesh
from ._surrogates import (
    KernelSpec,
    KernelSurrogate,
    check_kernel_config,
    hyperparameters_ok,
    kernel_grids,
    mask_linear_scale,
    select_grid_point,
    surrogate_gram,
)
from ._linalg import eigh

__all__ = ["NystromSurrogate", "fit_nystrom"]


class NystromSurrogate(NamedTuple):
    """A Nyström kernel surrogate and its Gaussian-process posterior in feature space.

    ``predict`` / ``loo_scores`` / ``shapley_values`` / ``interaction_scores`` read
    ``surrogate``; :func:`kernattr.posterior_variance` and :func:`kernattr.select_masks` also use
    the posterior fields. Features: ``φ(s) = k(s, landmarks) @ feature_map`` (``[r]``,
    ``r = L``).

    Attributes:
      surrogate: :class:`~kernattr.KernelSurrogate` with ``masks = landmarks [L, K]`` and
        ``dual_coef = β [L, T]``: ``g(s) = intercept + k(s, landmarks) β``.
      feature_map: ``[L, r]`` ``W = K_ΛΛ^{-1/2}`` (columns of numerically null directions are 0).
      feature_mean: ``[r]`` mean feature ``φ̄`` over the training masks.
      eigvecs: ``[r, r]`` eigenvectors ``V`` of the centred Gram ``Σ_i (φ_i-φ̄)(φ_i-φ̄)ᵀ``.
      eigvals: ``[r]`` its eigenvalues ``s`` (clamped at 0).
      noise_var: ``[T]`` noise variance ``σ_n²`` calibrated on the leave-one-out residuals at
        the chosen ridge (``mean_i r_i² (1 - H_ii)``); the prior variance of the weights is
        ``σ_n² / ridge``.
      num_train: scalar, the number of training masks ``m``.
    """

    surrogate: KernelSurrogate
    feature_map: jax.Array
    feature_mean: jax.Array
    eigvecs: jax.Array
    eigvals: jax.Array
    noise_var: jax.Array
    num_train: jax.Array

    @property
    def landmarks(self) -> jax.Array:
        """``[L, K]`` landmark masks."""
        return self.surrogate.masks

    @property
    def gamma(self) -> jax.Array:
        """``[T]`` bandwidth used for each target."""
        return self.surrogate.gamma

    @property
    def ridge(self) -> jax.Array:
        """``[T]`` ridge used for each target."""
        return self.surrogate.ridge

    @property
    def mix(self) -> jax.Array:
        """``[T]`` share of the linear kernel (``"linear+rbf"``)."""
        return self.surrogate.mix

    @property
    def cv_error(self) -> jax.Array:
        """``[G, W, R, T]`` leave-one-out MSE / variance over the grid."""
        return self.surrogate.cv_error


# --------------------------------------------------------------------------------------------
# Row-blocked accumulation, sharded over the mask axis
# --------------------------------------------------------------------------------------------
def mask_mesh(masks: jax.Array, mesh: Any = None, axis: str | None = None):
    """``(mesh, axis)`` over which the rows of ``masks`` are split, or ``None`` (one device)."""
    found = example_mesh(masks, mesh, axis)
    if found is None:
        return None
    mesh_, axis_ = found
    size = int(np.prod([mesh_.shape[a] for a in (axis_ if isinstance(axis_, tuple) else (axis_,))]))
    if size == 1:
        return None
    if masks.shape[0] % size:
        raise ValueError(
            f"`masks` has m={masks.shape[0]} rows, not divisible by the {axis_!r} mesh axis size "
            f"{size}; pad or drop masks."
        )
    return mesh_, axis_


def replicate(x: Any, where) -> Any:
    """``x`` (a pytree) replicated over the mesh of ``where = (mesh, axis)`` (no-op if None)."""
    if where is None:
        return x
    rep = NamedSharding(where[0], PartitionSpec())
    return jax.tree_util.tree_map(lambda a: jax.sharding.reshard(a, rep), x)


def shard_rows(x: Any, where) -> Any:
    """``x`` (a pytree of ``[m, ...]``) split on the mesh axis of ``where`` (no-op if None)."""
    if where is None:
        return x
    sh = NamedSharding(where[0], PartitionSpec(where[1]))
    return jax.tree_util.tree_map(lambda a: jax.sharding.reshard(a, sh), x)


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


# --------------------------------------------------------------------------------------------
# Ridge regression in a feature space: spectrum and leave-one-out sums (shared with _quadratic)
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# Nyström features
# --------------------------------------------------------------------------------------------
def nystrom_map(spec: KernelSpec, landmarks: jax.Array, kp) -> jax.Array:
    """``W [L, L]`` with ``φ(s) = k(s, landmarks) W``: ``K_ΛΛ^{-1/2}`` on its numerical range.

    ``kp = (gamma, mix, linear_scale)``: the kernel's parameters (scalars).
    """
    kll = surrogate_gram(spec, landmarks, landmarks, *kp)
    d, u = eigh(kll)
    # 10·eps·max: a tolerance growing with L (as for a rank decision) would cut the small but
    # informative eigenvalues of a wide kernel (small gamma) in float32.
    tol = 10.0 * jnp.finfo(kll.dtype).eps * jnp.max(jnp.abs(d))
    keep = d > tol
    inv_sqrt = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, d, 1.0)), 0.0)
    return u * inv_sqrt[None, :]


def features(spec: KernelSpec, masks: jax.Array, landmarks: jax.Array, fmap: jax.Array, kp) -> jax.Array:
    """``[m, r]`` Nyström features ``k(masks, landmarks) @ fmap``; ``kp = (gamma, mix, scale)``."""
    return surrogate_gram(spec, masks, landmarks, *kp) @ fmap


def draw_landmarks(key: jax.Array, masks: jax.Array, num_landmarks: int, where=None) -> jax.Array:
    """``[L, K]`` masks drawn uniformly without replacement from the rows of ``masks``."""
    idx = jax.random.choice(key, masks.shape[0], (num_landmarks,), replace=False)
    return jnp.take(replicate(masks, where), idx, axis=0)


# --------------------------------------------------------------------------------------------
# Fit
# --------------------------------------------------------------------------------------------
def fit_nystrom(
    key: jax.Array,
    masks: jax.Array,
    y: jax.Array,
    *,
    num_landmarks: int,
    kernel: str = "linear+rbf",
    gamma: float | jax.Array | None = None,
    ridge: float | jax.Array | None = None,
    mix: float | jax.Array | None = None,
    degree: int = 2,
    coef0: float = 1.0,
    block_size: int = 2048,
    mesh: Any = None,
    axis: str | None = None,
    throw: bool = True,
) -> NystromSurrogate:
    """Nyström kernel ridge regression with closed-form leave-one-out selection of its settings.

    See the module docstring for the model. Kernels and grids as :func:`kernattr.fit_kernel`
    (default ``"linear+rbf"`` with its ``gamma x mix x ridge`` grid); the grid point minimising
    the leave-one-out MSE / variance averaged over targets is chosen (one point for all
    targets; ties as in :func:`kernattr.fit_kernel`). The intercept is unpenalised. Cost
    ``O(P (m L (K + L) + L³ + m L T R))`` time for ``P`` ``(gamma, mix)`` pairs and
    ``O(P L² + block_size·L·R·T)`` memory.

    Args:
      key: typed PRNG key; draws the landmarks.
      masks: ``[m, K]`` 0/1 training masks (may be sharded on their leading axis).
      y: ``[m]`` or ``[m, T]`` labels.
      num_landmarks: ``L``, ``1 <= L <= m`` (Python int).
      kernel: ``"linear+rbf"`` (default), ``"rbf"``, ``"polynomial"`` or ``"linear"``.
      gamma: ``> 0`` scalar or grid ``[G]`` (default ``c/K``, 7 values).
      ridge: ``>= 0`` scalar or grid ``[R]`` (default ``1e-4 .. 1e4``).
      mix: ``"linear+rbf"`` only: share of the linear kernel, scalar or grid ``[W]`` in ``[0, 1]``.
      degree: polynomial degree.
      coef0: polynomial offset.
      block_size: rows per kernel block (memory ``~ block_size·L``).
      mesh: mesh whose ``axis`` splits the masks (default: read from the masks' sharding).
      axis: mesh axis name (default ``"data"`` with ``mesh=``).
      throw: raise when the chosen ``ridge`` is too small for the feature Gram matrix
        (``ridge = 0`` with rank-deficient features) or a traced hyperparameter is invalid;
        with ``False`` such grid points get ``cv_error = inf``.

    Returns:
      :class:`NystromSurrogate` (its ``surrogate.cv_error`` is ``[G, W, R, T]``).

    >>> import jax, jax.numpy as jnp, kernattr as ka
    >>> masks = ka.sample_subsets(jax.random.key(0), num_tasks=6, num_subsets=200, p=0.5)
    >>> y = masks[:, 0] * masks[:, 1] - masks[:, 2]
    >>> s = fit_nystrom(jax.random.key(1), masks, y, num_landmarks=32, gamma=0.3, ridge=jnp.array([0.01, 1.0]))
    >>> s.surrogate.dual_coef.shape, s.cv_error.shape
    ((32, 1), (1, 5, 2, 1))
    """
    _checks.check_key(key)
    check_kernel_config(kernel, degree, coef0)
    masks = _checks.check_masks(masks)
    y, _ = _checks.check_labels(y, masks.shape[0])
    num_landmarks = _checks.check_count(num_landmarks, "num_landmarks")
    block_size = _checks.check_count(block_size, "block_size")
    m, k = masks.shape
    if num_landmarks > m:
        raise ValueError(f"`num_landmarks` must be <= m = {m} (the number of masks), got {num_landmarks}.")
    if m < 2:
        raise ValueError("`masks` needs at least 2 rows to fit a kernel surrogate with an intercept.")
    dtype = jnp.result_type(masks.dtype, y.dtype)
    masks = masks.astype(dtype)
    y = y.astype(dtype)
    t = y.shape[1]
    gamma_grid, mix_grid, ridge_grid = kernel_grids(kernel, k, gamma, mix, ridge, dtype)
    num_g, num_w, num_r = gamma_grid.shape[0], mix_grid.shape[0], ridge_grid.shape[0]
    gamma_ok, ridge_ok = hyperparameters_ok(kernel, gamma, ridge, throw)
    gamma_ok = jnp.broadcast_to(gamma_ok, (num_g,))
    ridge_ok = jnp.broadcast_to(ridge_ok, (num_r,))
    spec = KernelSpec(kernel=kernel, degree=int(degree), coef0=float(coef0), shared_gamma=True, fit_intercept=True)
    where = mask_mesh(masks, mesh, axis)
    linear_scale = mask_linear_scale(kernel, masks)

    landmarks = draw_landmarks(key, masks, num_landmarks, where)
    y_mean = jnp.mean(y, axis=0)
    mf = jnp.asarray(m, dtype)

    def per_pair(args):
        g, w, g_ok = args
        kp = (g, w, linear_scale)
        fmap = nystrom_map(spec, landmarks, kp)  # [L, r]
        # reference shift (mean landmark feature) keeps the f32 accumulation well centred
        ref = jnp.mean(features(spec, landmarks, landmarks, fmap, kp), axis=0)

        fmean, gram_c, phi_yc, yc2 = centred_feature_stats(
            lambda rp, bm: features(spec, bm, *rp), (landmarks, fmap, kp), ref, masks, y, y_mean,
            block_size=block_size, where=where)
        sv, vv, valid, inv = ridge_spectrum(gram_c, ridge_grid, ridge_ok & g_ok, num_landmarks)
        z = vv.T @ phi_yc  # [r, T]

        def loo(rep, blk, v):
            lm, kp_, fm, fmean_, vv_, z_, inv_, ym = rep
            bm, by = blk
            psi = (features(spec, bm, lm, fm, kp_) - fmean_[None, :]) @ vv_  # [B, r]
            return loo_row_sums(psi, by - ym[None, :], inv_, z_, v, mf)

        sq, noise = accumulate_rows(
            loo, (landmarks, kp, fmap, fmean, vv, z, inv, y_mean), (masks, y), block_size=block_size, where=where
        )
        return sq, noise, valid, fmap, fmean, vv, sv, z, yc2

    gg = jnp.repeat(gamma_grid, num_w)  # [C] pairs in (gamma, mix) order
    ww = jnp.tile(mix_grid, num_g)
    gg_ok = jnp.repeat(gamma_ok, num_w)
    sq, noise, valids, fmaps, fmeans, vvs, svs, zs, yc2s = jax.lax.map(per_pair, (gg, ww, gg_ok))
    cv = loo_cv_error(sq, valids, yc2s[0], mf)  # [C, R, T]; Σ (y - ȳ)² is the same for every pair
    num_c = num_g * num_w
    best = select_grid_point(
        jnp.mean(cv, axis=2).reshape(-1, 1), jnp.repeat(gg, num_r), jnp.tile(ridge_grid, num_c), jnp.repeat(ww, num_r)
    )[0]
    ci, ri = best // num_r, best % num_r
    hyper_ok = gg_ok[ci] & ridge_ok[ri]
    if throw:
        _checks.error_if(
            masks,
            hyper_ok & ~valids[ci, ri],
            "`ridge` too small: the Nyström feature Gram matrix is singular at the chosen "
            "(gamma, mix, ridge); pass ridge > 0 or a ridge grid.",
        )
    lam = ridge_grid[ri]
    sv, vv, z, fmap, fmean = svs[ci], vvs[ci], zs[ci], fmaps[ci], fmeans[ci]
    w = vv @ (z / (sv + lam)[:, None])  # [r, T]
    beta = jnp.where(hyper_ok, fmap @ w, jnp.nan)  # [L, T]
    intercept = jnp.where(hyper_ok, y_mean - fmean @ w, jnp.nan)
    surrogate = KernelSurrogate(
        masks=landmarks,
        dual_coef=beta,
        intercept=intercept,
        gamma=jnp.broadcast_to(gg[ci], (t,)),
        ridge=jnp.broadcast_to(lam, (t,)),
        mix=jnp.broadcast_to(ww[ci], (t,)),
        gamma_grid=gamma_grid,
        mix_grid=mix_grid,
        ridge_grid=ridge_grid,
        linear_scale=linear_scale,
        cv_error=cv.reshape(num_g, num_w, num_r, t),
        cv_spearman=jnp.full((num_g, num_w, num_r, t), jnp.nan, dtype),
        spec=spec,
    )
    return NystromSurrogate(
        surrogate=surrogate,
        feature_map=fmap,
        feature_mean=fmean,
        eigvecs=vv,
        eigvals=sv,
        noise_var=noise[ci, ri] / mf,
        num_train=mf,
    )
