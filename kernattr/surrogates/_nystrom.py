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
of the ~K²/2 nearly equally weighted pair directions, however they are chosen; the results
pages show how much that costs). Take ``L`` above that dimension when interactions matter, use
the exact CG solve, or :func:`kernattr.fit_quadratic`, which fits exactly the functions of
degree <= 2.

Sharding: when the masks carry a ``NamedSharding`` on their leading axis (or ``mesh=`` is given),
each device computes the kernel blocks of its own masks and the ``L x L`` statistics are summed
over the mesh axis (``psum``); everything of size ``L`` is replicated. The result equals the
single-device one up to the order of floating-point sums.

Shapes: ``m`` masks, ``K`` tasks, ``T`` targets, ``L`` landmarks, ``G`` bandwidths, ``R`` ridges.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .. import _checks
from .._sharding import mask_mesh, replicate
from ._feature_ridge import (accumulate_rows, centred_feature_stats, loo_cv_error, loo_row_sums,
                             ridge_spectrum)
from ._krr import (
    KernelSpec,
    KernelSurrogate,
    hyperparameters_ok,
    kernel_grids,
    kernel_spec,
    mask_linear_scale,
    select_grid_point,
    surrogate_gram,
)
from .._linalg import eigh

__all__ = ["NystromSurrogate", "fit_nystrom", "nystrom"]


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
    return nystrom(key, masks, y, kernel_spec(kernel, degree, coef0), num_landmarks=num_landmarks,
                   gamma=gamma, ridge=ridge, mix=mix, block_size=block_size, mesh=mesh, axis=axis,
                   throw=throw)


class _Grid(NamedTuple):
    """The ``C = G·W`` ``(gamma, mix)`` pairs (in ``(gamma, mix)`` order) and the ridges."""

    gamma: jax.Array  # [G]
    mix: jax.Array  # [W]
    ridge: jax.Array  # [R]
    pair_gamma: jax.Array  # [C]
    pair_mix: jax.Array  # [C]
    pair_ok: jax.Array  # [C] valid gamma
    ridge_ok: jax.Array  # [R] valid ridge


class _PairFits(NamedTuple):
    """Per ``(gamma, mix)`` pair: the LOO sums and the feature-space solution's pieces."""

    sq: jax.Array  # [C, R, T] Σ r_i²
    noise: jax.Array  # [C, R, T] Σ e_i²/(1 - H_ii)
    valid: jax.Array  # [C, R]
    fmap: jax.Array  # [C, L, r]
    fmean: jax.Array  # [C, r]
    eigvecs: jax.Array  # [C, r, r]
    eigvals: jax.Array  # [C, r]
    z: jax.Array  # [C, r, T]
    yc2: jax.Array  # [C, T]


def _grid(spec: KernelSpec, k: int, gamma, mix, ridge, throw: bool, dtype) -> _Grid:
    gamma_grid, mix_grid, ridge_grid = kernel_grids(spec.kernel, k, gamma, mix, ridge, dtype)
    num_g, num_w = gamma_grid.shape[0], mix_grid.shape[0]
    gamma_ok, ridge_ok = hyperparameters_ok(spec.kernel, gamma, ridge, throw)
    return _Grid(gamma_grid, mix_grid, ridge_grid, jnp.repeat(gamma_grid, num_w),
                 jnp.tile(mix_grid, num_g), jnp.repeat(jnp.broadcast_to(gamma_ok, (num_g,)), num_w),
                 jnp.broadcast_to(ridge_ok, ridge_grid.shape))


def _pair_fits(spec, landmarks, masks, y, grid: _Grid, linear_scale, *, block_size, where) -> _PairFits:
    """Two passes over the masks per ``(gamma, mix)`` pair (``lax.map``): the centred feature
    statistics, one ``L x L`` eigendecomposition, and the leave-one-out sums of every ridge."""
    num_landmarks = landmarks.shape[0]
    y_mean = jnp.mean(y, axis=0)
    mf = jnp.asarray(masks.shape[0], y.dtype)

    def per_pair(args):
        g, w, g_ok = args
        kp = (g, w, linear_scale)
        fmap = nystrom_map(spec, landmarks, kp)  # [L, r]
        # reference shift (mean landmark feature) keeps the f32 accumulation well centred
        ref = jnp.mean(features(spec, landmarks, landmarks, fmap, kp), axis=0)

        fmean, gram_c, phi_yc, yc2 = centred_feature_stats(
            lambda rp, bm: features(spec, bm, *rp), (landmarks, fmap, kp), ref, masks, y, y_mean,
            block_size=block_size, where=where)
        sv, vv, valid, inv = ridge_spectrum(gram_c, grid.ridge, grid.ridge_ok & g_ok, num_landmarks)
        z = vv.T @ phi_yc  # [r, T]

        def loo(rep, blk, v):
            lm, kp_, fm, fmean_, vv_, z_, inv_, ym = rep
            bm, by = blk
            psi = (features(spec, bm, lm, fm, kp_) - fmean_[None, :]) @ vv_  # [B, r]
            return loo_row_sums(psi, by - ym[None, :], inv_, z_, v, mf)

        sq, noise = accumulate_rows(
            loo, (landmarks, kp, fmap, fmean, vv, z, inv, y_mean), (masks, y), block_size=block_size, where=where
        )
        return _PairFits(sq, noise, valid, fmap, fmean, vv, sv, z, yc2)

    return jax.lax.map(per_pair, (grid.pair_gamma, grid.pair_mix, grid.pair_ok))


def nystrom(key, masks, y, spec: KernelSpec, *, num_landmarks, gamma=None, ridge=None, mix=None,
            block_size=2048, mesh=None, axis=None, throw=True) -> NystromSurrogate:
    """:func:`fit_nystrom` with its kernel settings already built into ``spec``."""
    _checks.check_key(key)
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
    masks, y = masks.astype(dtype), y.astype(dtype)
    spec = dataclasses.replace(spec, shared_gamma=True, fit_intercept=True)
    grid = _grid(spec, k, gamma, mix, ridge, throw, dtype)
    where = mask_mesh(masks, mesh, axis)
    linear_scale = mask_linear_scale(spec.kernel, masks)
    landmarks = draw_landmarks(key, masks, num_landmarks, where)
    fits = _pair_fits(spec, landmarks, masks, y, grid, linear_scale, block_size=block_size, where=where)
    return _solution(spec, landmarks, y, grid, fits, linear_scale, throw=throw)


def _solution(spec, landmarks, y, grid: _Grid, fits: _PairFits, linear_scale, *, throw) -> NystromSurrogate:
    """The grid point of least leave-one-out error (averaged over targets) and its fit."""
    m, t = y.shape
    mf = jnp.asarray(m, y.dtype)
    num_g, num_w, num_r = grid.gamma.shape[0], grid.mix.shape[0], grid.ridge.shape[0]
    num_c = num_g * num_w
    cv = loo_cv_error(fits.sq, fits.valid, fits.yc2[0], mf)  # [C, R, T]; Σ (y - ȳ)² is the same for every pair
    best = select_grid_point(
        jnp.mean(cv, axis=2).reshape(-1, 1), jnp.repeat(grid.pair_gamma, num_r),
        jnp.tile(grid.ridge, num_c), jnp.repeat(grid.pair_mix, num_r)
    )[0]
    ci, ri = best // num_r, best % num_r
    hyper_ok = grid.pair_ok[ci] & grid.ridge_ok[ri]
    if throw:
        hyper_ok = _checks.error_if(
            hyper_ok,
            hyper_ok & ~fits.valid[ci, ri],
            "`ridge` too small: the Nyström feature Gram matrix is singular at the chosen "
            "(gamma, mix, ridge); pass ridge > 0 or a ridge grid.",
        )
    lam = grid.ridge[ri]
    sv, vv, z, fmap, fmean = fits.eigvals[ci], fits.eigvecs[ci], fits.z[ci], fits.fmap[ci], fits.fmean[ci]
    w = vv @ (z / (sv + lam)[:, None])  # [r, T]
    beta = jnp.where(hyper_ok, fmap @ w, jnp.nan)  # [L, T]
    intercept = jnp.where(hyper_ok, jnp.mean(y, axis=0) - fmean @ w, jnp.nan)
    shape = (num_g, num_w, num_r, t)
    surrogate = KernelSurrogate(
        masks=landmarks, dual_coef=beta, intercept=intercept,
        gamma=jnp.broadcast_to(grid.pair_gamma[ci], (t,)), ridge=jnp.broadcast_to(lam, (t,)),
        mix=jnp.broadcast_to(grid.pair_mix[ci], (t,)), gamma_grid=grid.gamma, mix_grid=grid.mix,
        ridge_grid=grid.ridge, linear_scale=linear_scale, cv_error=cv.reshape(shape),
        cv_spearman=jnp.full(shape, jnp.nan, y.dtype), spec=spec,
    )
    return NystromSurrogate(surrogate=surrogate, feature_map=fmap, feature_mean=fmean, eigvecs=vv,
                            eigvals=sv, noise_var=fits.noise[ci, ri] / mf, num_train=mf)
