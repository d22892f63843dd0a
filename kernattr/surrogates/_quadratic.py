"""Pairwise (degree <= 2) surrogate: kernel ridge regression truncated to the Walsh functions of
degree <= 2, solved in feature space, for many masks.

Why. The RBF kernel on 0/1 masks is a product kernel. With ``χ_k = 2 s_k - 1``::

    exp(-γ·Hamming(s, s')) = Π_k (a + b χ_k χ'_k),    a = (1 + e^{-γ})/2,  b = (1 - e^{-γ})/2
                           = Σ_S a^{K-|S|} b^{|S|} χ_S(s) χ_S(s')

(``χ_S = Π_{k∈S} χ_k``): a sum over Walsh functions whose prior weight falls by
``t = b/a = tanh(γ/2)`` per degree. The linear kernel ``<s, s'>`` adds weight to degree 1 only
(its constant part goes into the intercept). Kernel ridge regression at the bandwidths that
matter (``γ`` of order ``1/K``) puts almost all of its prior mass on degrees 0, 1 and 2, and
keeping exactly those gives a model with ``d = K + K(K-1)/2`` features, solvable in feature space
at a cost linear in the number of masks ``m``:

    g(s) = b + Σ_k u_k χ_k(s) + Σ_{j<k} u_jk χ_j(s) χ_k(s)
    min_{b, u}  ||y - g||² + ridge·(Σ_k u_k²/v_1 + Σ_{j<k} u_jk²/v_2)

with prior variances ``v_1 = 1/(K + ratio·P)`` and ``v_2 = ratio/(K + ratio·P)`` for the
``P = K(K-1)/2`` pairs, so that the kernel ``Σ_S v_|S| χ_S(s) χ_S(s')`` has unit diagonal (as the
RBF kernel: the ridge grid means the same as in :func:`kernattr.fit_kernel`). ``ratio`` is the
prior variance of one pairwise coefficient relative to one main effect; the truncated RBF kernel
has ``ratio = tanh(γ/2)``, and ``ratio = 0`` is the linear surrogate (ridge regression on the
masks). Unlike a Nyström fit with ``L`` landmarks (rank at most ``L``), this model represents
every pairwise interaction, the structure most task-attribution labels have; it drops third and
higher orders.

The fitted ``g`` is returned in the mask basis (``χ_k = 2 s_k - 1`` expanded)::

    g(s) = intercept + sᵀ linear + Σ_{j<k} pairwise[j, k] s_j s_k

so every attribution is exact and closed-form: leave-one-out ``linear_k + Σ_j pairwise[k, j]``,
Shapley and Banzhaf ``linear_k + ½ Σ_j pairwise[k, j]``, interactions ``pairwise``.

Hyperparameters: one pass over the masks in row blocks accumulates ``XᵀX`` and ``Xᵀy``
(``O(m d²)``); for each ``ratio`` one ``d x d`` eigendecomposition gives every ridge value, and a
second pass gives the exact leave-one-out residuals ``(y_i - ŷ_i)/(1 - H_ii)`` (intercept
included) for every ridge at once. The grid point with the smallest leave-one-out MSE / variance,
averaged over targets, is chosen (ties as in :func:`kernattr.fit_kernel`). Memory
``O(d² + block·(d + R·T))``, independent of ``m``; masks sharded on their leading axis are accumulated
shard by shard and the ``d x d`` statistics summed over the mesh axis.

With ``ard_steps = n > 0`` the grid's two prior variances (one per degree) are only the start:
``n`` EM steps learn one prior variance per Walsh coefficient, shared by the targets (automatic
relevance determination), from the same centred statistics (or, with ``m <= d``, from the
``[m, d]`` features in an ``m x m`` dual form); see :func:`fit_quadratic`.

Shapes: ``m`` masks, ``K`` tasks, ``T`` targets, ``d = K(K+1)/2`` features, ``Q`` ratios, ``R``
ridges.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import _checks
from .._sharding import mask_mesh, replicate
from ._feature_ridge import (accumulate_rows, centred_feature_stats, loo_cv_error, loo_row_sums,
                             ridge_spectrum)
from ._krr import (KernelSpec, default_ridge_grid, hyperparameters_ok, kernel_grids,
                   mask_linear_scale, select_grid_point)

__all__ = ["QuadraticSurrogate", "fit_quadratic", "default_ratio_grid"]

# d = K(K+1)/2 features; d x d matrices in memory and a d³ eigendecomposition per ratio.
MAX_TASKS = 200


class QuadraticSurrogate(NamedTuple):
    """Pairwise surrogate ``g(s) = intercept + sᵀ linear + Σ_{j<k} pairwise[j, k] s_j s_k``.

    Built by :func:`kernattr.fit_quadratic`; :func:`kernattr.predict`,
    :func:`kernattr.loo_scores`, :func:`kernattr.shapley_values`,
    :func:`kernattr.banzhaf_values` and :func:`kernattr.interaction_scores` accept it (exact).

    Attributes:
      linear: ``[K, T]`` coefficient of each task alone.
      pairwise: ``[K, K, T]`` symmetric, zero diagonal: the coefficient of ``s_j s_k``.
      intercept: ``[T]`` value at the empty mask.
      ratio: ``[T]`` chosen prior variance ratio (pair / main effect), equal for all targets.
      ridge: ``[T]`` chosen ridge, equal for all targets.
      ratio_grid: ``[Q]`` ratios searched.
      ridge_grid: ``[R]`` ridges searched.
      cv_error: ``[Q, R, T]`` exact leave-one-out MSE divided by each target's label variance
        (``inf`` where the regularised system is singular).
      feature_mean: ``[d]`` mean Walsh features ``x̄`` of the training masks (``χ_k`` then
        ``χ_j χ_k``, ``j < k``).
      feature_cov: ``[d, d]`` posterior covariance of the Walsh coefficients divided by
        ``noise_var``: ``D^{1/2} (Φ_cᵀ Φ_c + ridge·I)⁻¹ D^{1/2}`` (``D`` the prior variances,
        ``Φ_c`` the centred scaled features), used by :func:`kernattr.posterior_variance` and
        :func:`kernattr.attribution_intervals`.
      noise_var: ``[T]`` noise variance ``σ_n²`` calibrated on the leave-one-out residuals at the
        chosen grid point (``mean_i r_i² (1 - H_ii)``); the prior variance is ``σ_n² / ridge``.
      num_train: scalar, the number of training masks ``m``.
      gamma: ``[T]`` chosen bandwidth when fitted by ``fit_kernel(..., solver="walsh")`` (then
        ``ratio_grid`` is ``[G·W]``, the ratio of each ``(gamma, mix)`` pair, ``ridge`` and
        ``ridge_grid`` are the kernel's ridge ``λ``, and ``cv_error`` is ``[G, W, R, T]``);
        ``None`` from :func:`kernattr.fit_quadratic`.
      mix: ``[T]`` chosen share of the linear kernel (``solver="walsh"``), else ``None``.
      feature_prior: ``[d]`` with ``fit_quadratic(..., ard_steps=n)``: the learned prior
        variance of each Walsh coefficient in units of the noise variance (shared by the targets;
        ``feature_cov = (Φ_cᵀ Φ_c + diag(1/feature_prior))⁻¹``); else ``None``.
      ard_cv_error: ``[T]`` with ``ard_steps``: exact leave-one-out MSE / label variance of the
        returned (ARD) fit, its prior variances held fixed (optimistic: they were learned on the
        same masks); compare with ``cv_error`` at the grid point. Else ``None``.
    """

    linear: jax.Array
    pairwise: jax.Array
    intercept: jax.Array
    ratio: jax.Array
    ridge: jax.Array
    ratio_grid: jax.Array
    ridge_grid: jax.Array
    cv_error: jax.Array
    feature_mean: jax.Array
    feature_cov: jax.Array
    noise_var: jax.Array
    num_train: jax.Array
    gamma: jax.Array | None = None
    mix: jax.Array | None = None
    feature_prior: jax.Array | None = None
    ard_cv_error: jax.Array | None = None


def default_ratio_grid() -> np.ndarray:
    """Default ``ratio`` grid: 0 (the linear surrogate) and ``1e-4 .. 1`` (5 decades).

    The truncated RBF kernel of :func:`kernattr.fit_kernel`'s default bandwidths ``c/K``
    (``c`` from 0.01 to 10) has ``ratio = tanh(c/(2K))``: ``5e-5 .. 0.05`` at ``K = 100``.

    >>> default_ratio_grid().tolist()
    [0.0, 0.0001, 0.001, 0.01, 0.1, 1.0]
    """
    return np.concatenate([[0.0], np.logspace(-4.0, 0.0, 5)])


def _pair_index(num_tasks: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(num_tasks, 1)


def _walsh_features(masks: jax.Array, iu: np.ndarray, ju: np.ndarray) -> jax.Array:
    """``[B, d]``: ``χ_k`` then ``χ_j χ_k`` (``j < k``) with ``χ = 2 s - 1``."""
    c = 2.0 * masks - 1.0
    return jnp.concatenate([c, c[:, iu] * c[:, ju]], axis=1)


def _prior_scale(ratio: jax.Array, num_tasks: int, num_pairs: int) -> jax.Array:
    """``[d]`` square roots of the prior variances ``(v_1 .. v_1, v_2 .. v_2)``."""
    norm = num_tasks + ratio * num_pairs
    v = jnp.concatenate([jnp.full((num_tasks,), 1.0, ratio.dtype),
                         jnp.full((num_pairs,), 1.0, ratio.dtype) * ratio]) / norm
    return jnp.sqrt(v)


def _checked_inputs(masks, y, block_size, who: str, instead: str):
    """Validated ``(masks [m, K], y [m, T], block_size)`` in one float dtype, for the Walsh fits."""
    masks = _checks.check_masks(masks)
    y, _ = _checks.check_labels(y, masks.shape[0])
    block_size = _checks.check_count(block_size, "block_size")
    m, k = masks.shape
    if k > MAX_TASKS:
        raise ValueError(
            f"`masks` has K={k} tasks: {who} keeps K(K+1)/2 = {k * (k + 1) // 2} "
            f"features (d x d matrices); use at most {MAX_TASKS} tasks, or {instead}.")
    if m < 2:
        raise ValueError("`masks` needs at least 2 rows to fit a surrogate with an intercept.")
    dtype = jnp.result_type(masks.dtype, y.dtype)
    return masks.astype(dtype), y.astype(dtype), block_size


def fit_quadratic(
    masks: jax.Array,
    y: jax.Array,
    *,
    ratio: float | jax.Array | None = None,
    ridge: float | jax.Array | None = None,
    block_size: int = 2048,
    mesh: Any = None,
    axis: str | None = None,
    throw: bool = True,
    ard_steps: int = 0,
) -> QuadraticSurrogate:
    """Pairwise surrogate (kernel ridge regression on the Walsh functions of degree <= 2).

    See the module docstring for the model and how it relates to :func:`kernattr.fit_kernel`'s
    RBF kernel. Cost ``O(m d² (1 + Q) + Q d³)`` time, ``O(d² + block_size·(d + R·T))`` memory with
    ``d = K(K+1)/2``; the cost does not grow with ``m`` beyond the two passes.

    Args:
      masks: ``[m, K]`` 0/1 training masks, ``1 <= K <= 200`` (may be sharded on their leading
        axis).
      y: ``[m]`` or ``[m, T]`` labels.
      ratio: ``>= 0`` scalar or grid ``[Q]``: prior variance of one pairwise coefficient relative
        to one main effect (default :func:`default_ratio_grid`; 0 is the linear surrogate).
      ridge: ``>= 0`` scalar or grid ``[R]`` (default ``1e-4 .. 1e4``).
      block_size: rows per block of the two passes (memory ``~ block_size·d``).
      mesh: mesh whose ``axis`` splits the masks (default: read from the masks' sharding).
      axis: mesh axis name (default ``"data"`` with ``mesh=``).
      throw: raise when the chosen ``ridge`` is too small for the feature Gram matrix (``ridge =
        0`` with fewer masks than features, or ``ratio = 0``) or a traced hyperparameter is
        invalid, or (with ``ard_steps``) the learned prior makes that matrix singular; with
        ``False`` such grid points get ``cv_error = inf``, and an invalid choice or learned prior
        gives NaN coefficients (with ``ard_steps`` also NaN ``noise_var`` and ``feature_prior``).
      ard_steps: Python int ``>= 0``. ``0`` (default): one prior variance per degree, chosen on
        the grid. ``n > 0``: automatic relevance determination, a sparse pairwise model. Starting
        from the grid's choice, ``n`` EM steps learn **one prior variance per Walsh coefficient**,
        shared by the targets (``ρ_j ← mean_t μ_jt²/σ_t² + C_jj``), so pairs that no target
        needs are shrunk to zero and the few that matter are barely shrunk. The noise ``σ_t²``
        is re-estimated at every step from the residual degrees of freedom
        (``||y - ŷ||² / tr((I - H)²)``), never below the grid fit's calibrated noise (with fewer
        masks than features the estimate can otherwise reach 0 by interpolation), and is the
        returned ``noise_var``. It pays when few of
        the ``K(K-1)/2`` pairs matter and masks are scarce (on sparse synthetic games, 150 random
        masks reach the held-out LDS that the grid fit reaches with 400); it can overfit labels
        with many weak interactions: compare ``ard_cv_error`` with the grid's ``cv_error``.
        Each step costs a few ``d x d`` products and one Cholesky factorisation.
        Posterior intervals treat pruned pairs as known to be 0.

    Returns:
      :class:`QuadraticSurrogate` (``linear [K, T]``, ``pairwise [K, K, T]``, ``cv_error
      [Q, R, T]``; ``T = 1`` for 1-D labels; with ``ard_steps`` also ``feature_prior [d]`` and
      ``ard_cv_error [T]``).

    >>> import jax, jax.numpy as jnp, kernattr as ka
    >>> masks = ka.sample_subsets(jax.random.key(0), num_tasks=6, num_subsets=200, p=0.5)
    >>> y = masks[:, 0] * masks[:, 1] - masks[:, 2]
    >>> s = ka.fit_quadratic(masks, y, ridge=jnp.array([1e-3, 1.0]))
    >>> round(float(s.pairwise[0, 1, 0]), 2), round(float(s.linear[2, 0]), 2), s.cv_error.shape
    (1.0, -1.0, (6, 2, 1))
    >>> a = ka.fit_quadratic(masks, y, ard_steps=20)
    >>> round(float(a.pairwise[0, 1, 0]), 2), a.feature_prior.shape, a.ard_cv_error.shape
    (1.0, (21,), (1,))
    """
    masks, y, block_size = _checked_inputs(masks, y, block_size, "fit_quadratic", "fit_nystrom")
    if isinstance(ard_steps, bool) or not isinstance(ard_steps, (int, np.integer)) or ard_steps < 0:
        raise ValueError(f"`ard_steps` must be a Python int >= 0, got {ard_steps!r}.")
    dtype = masks.dtype
    ratio_grid = _checks.check_grid(default_ratio_grid() if ratio is None else ratio, "ratio")
    ridge_grid = _checks.check_grid(default_ridge_grid() if ridge is None else ridge, "ridge")
    ratio_grid, ridge_grid = ratio_grid.astype(dtype), ridge_grid.astype(dtype)
    ratio_ok = (True if ratio is None else
                _checks.check_hyperparameter(ratio, "ratio", allow_zero=True, throw=throw))
    ridge_ok = (True if ridge is None else
                _checks.check_hyperparameter(ridge, "ridge", allow_zero=True, throw=throw))
    num_q, num_r = ratio_grid.shape[0], ridge_grid.shape[0]
    ratio_ok = jnp.broadcast_to(jnp.reshape(jnp.asarray(ratio_ok), (-1,)), (num_q,))
    ridge_ok = jnp.broadcast_to(jnp.reshape(jnp.asarray(ridge_ok), (-1,)), (num_r,))

    ridge_table = jnp.broadcast_to(ridge_grid[None, :], (num_q, num_r))
    ok_table = ratio_ok[:, None] & ridge_ok[None, :]
    return _fit_walsh_grid(
        masks, y, ratio_grid, ridge_grid, ridge_table, ok_table, (ratio_grid, None),
        block_size=block_size, mesh=mesh, axis=axis, throw=throw, ard_steps=int(ard_steps),
        singular_msg="`ridge` too small: the feature Gram matrix of fit_quadratic is singular at the "
                     "chosen (ratio, ridge) (fewer masks than K(K+1)/2 features, or ratio = 0); pass "
                     "ridge > 0 or a ridge grid.").surrogate


class _GridFit(NamedTuple):
    surrogate: QuadraticSurrogate
    index: jax.Array  # flat index q·R + r of the chosen grid point


def _ard_prior(stats, dual, rho: jax.Array, steps: int, cap: jax.Array,
               noise_floor: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-feature prior variances ``[d]`` (noise units) and noise variances ``[T]`` after
    ``steps`` EM steps from ``rho``.

    Model: ``y_t = Φ_c u_t + ε``, ``u_jt ~ N(0, σ_t² ρ_j)``, ``ε ~ N(0, σ_t²)``. Each step computes
    the posterior ``C = (Φ_cᵀΦ_c + diag(1/ρ))⁻¹``, ``μ_t = C Φ_cᵀ y_t``; the noise from the
    residual degrees of freedom, ``σ_t² = ||y_t - ŷ_t||² / tr((I - H)²)`` (unbiased for the
    linear smoother ``H``; it collapses less readily than the marginal-likelihood update with
    fewer masks than features, but can still reach 0 when the labels allow interpolation, hence
    ``noise_floor [T]``); then ``ρ_j = mean_t μ_jt²/σ_t² + C_jj`` (the EM update, capped at
    ``cap [d]``).

    ``stats = (G, Φ_cᵀy, Σ y_c², m)``. With ``dual = None`` (more masks than features) the
    primal form: ``M = I + RGR`` (``R = diag(√ρ)``, ``M ⪰ I``), ``C = R M⁻¹ R`` and
    ``tr((I - H)²) = m - 1 - d + ||M⁻¹||_F²`` (a sum of positive terms). With
    ``dual = (Φ_c [m, d], y_c [m, T])``, the centred features and labels (``m <= d``), the dual
    form: ``B = (I + Φ_c P Φ_cᵀ)⁻¹`` (``P = diag(ρ)``), ``μ = P Φ_cᵀ B y_c``, residuals
    ``B y_c``, ``C_jj = ρ_j - ρ_j² (Φ_cᵀ B Φ_c)_jj`` and ``tr((I - H)²) = ||B||_F² - 1``: no
    difference of large numbers near interpolation, which float32 cannot resolve.
    """
    gram, sy, yc2, mf = stats
    d = gram.shape[0]

    if dual is None:
        eye = jnp.eye(d, dtype=gram.dtype)

        def solve(r2):
            r = jnp.sqrt(r2)
            chol = jnp.linalg.cholesky(eye + r[:, None] * gram * r[None, :])
            minv = jax.scipy.linalg.cho_solve((chol, True), eye)
            mu = r[:, None] * (minv @ (r[:, None] * sy))  # [d, T]
            dof = mf - 1.0 - d + jnp.sum(minv * minv)
            e2 = yc2 - 2.0 * jnp.sum(sy * mu, axis=0) + jnp.sum(mu * (gram @ mu), axis=0)
            return r2 * jnp.diagonal(minv), mu, jnp.maximum(e2, 0.0), dof
    else:
        xc, yc = dual
        eye = jnp.eye(xc.shape[0], dtype=xc.dtype)

        def solve(r2):
            xp = xc * r2[None, :]
            chol = jnp.linalg.cholesky(eye + xp @ xc.T)
            bmat = jax.scipy.linalg.cho_solve((chol, True), eye)
            res = bmat @ yc  # [m, T] residuals
            mu = xp.T @ res
            cdiag = r2 - r2 * jnp.sum(xp * (bmat @ xc), axis=0)
            return cdiag, mu, jnp.sum(res * res, axis=0), jnp.sum(bmat * bmat) - 1.0

    def noise_of(e2, dof):
        return jnp.maximum(e2 / jnp.maximum(dof, 1e-3), noise_floor)

    def step(r2, _):
        cdiag, mu, e2, dof = solve(r2)
        new = jnp.mean(mu * mu / noise_of(e2, dof)[None, :], axis=1) + cdiag
        return jnp.minimum(new, cap), None

    rho = jax.lax.scan(step, rho, None, length=steps)[0]
    _, _, e2, dof = solve(rho)
    return rho, noise_of(e2, dof)


class _WalshStats(NamedTuple):
    """The data of a Walsh fit after its first pass (centred statistics of the features)."""

    masks: jax.Array  # [m, K] (the second passes read them again)
    y: jax.Array  # [m, T]
    y_mean: jax.Array  # [T]
    xmean: jax.Array  # [d] mean Walsh feature
    gram: jax.Array  # [d, d] Σ (x - x̄)(x - x̄)ᵀ
    sy: jax.Array  # [d, T] Σ (x - x̄)(y - ȳ)ᵀ
    yc2: jax.Array  # [T] Σ (y - ȳ)²
    num_train: jax.Array  # scalar m
    iu: np.ndarray  # pair index (static)
    ju: np.ndarray
    block_size: int
    where: Any  # (mesh, axis) or None

    def spectrum(self, sc, ridges, ok):
        """:func:`ridge_spectrum` of the Gram scaled by the prior scales ``sc [d]``."""
        return ridge_spectrum(sc[:, None] * self.gram * sc[None, :], ridges, ok, self.gram.shape[0])

    def loo_sums(self, sc, ridges, ok, spec=None):
        """Leave-one-out sums ``[R, T]`` x2 and validity ``[R]`` at prior scales ``sc``
        (``spec``: their :meth:`spectrum`, if already computed)."""
        _, vv, valid, inv = self.spectrum(sc, ridges, ok) if spec is None else spec
        z = vv.T @ (sc[:, None] * self.sy)  # [d, T]
        iu, ju, mf = self.iu, self.ju, self.num_train

        def loo(rep, blk, v):
            xm, sc_, vv_, z_, inv_, ym = rep
            bm, by = blk
            psi = ((_walsh_features(bm, iu, ju) - xm[None, :]) * sc_[None, :]) @ vv_  # [B, d]
            return loo_row_sums(psi, by - ym[None, :], inv_, z_, v, mf)

        sq, noise = accumulate_rows(loo, (self.xmean, sc, vv, z, inv, self.y_mean), (self.masks, self.y),
                                    block_size=self.block_size, where=self.where)
        return sq, noise, valid


def _walsh_stats(masks, y, *, block_size, mesh, axis) -> _WalshStats:
    """The first pass over the masks: centred Walsh-feature statistics."""
    iu, ju = _pair_index(masks.shape[1])
    where = mask_mesh(masks, mesh, axis)
    y_mean = jnp.mean(y, axis=0)
    # A reference shift (the features of the mean mask, close to the features' mean) keeps the
    # float32 sums centred; a column mean also works on masks sharded over their rows.
    ref = _walsh_features(jnp.mean(masks, axis=0, keepdims=True), iu, ju)[0]
    xmean, gram, sy, yc2 = centred_feature_stats(
        lambda _, bm: _walsh_features(bm, iu, ju), (), ref, masks, y, y_mean,
        block_size=block_size, where=where)
    return _WalshStats(masks, y, y_mean, xmean, gram, sy, yc2, jnp.asarray(masks.shape[0], masks.dtype),
                       iu, ju, block_size, where)


def _fit_walsh_grid(masks, y, ratio_grid, ridge_grid, ridge_table, ok_table, tie_keys, *, block_size,
                    mesh, axis, throw, singular_msg, ard_steps: int = 0) -> _GridFit:
    """The degree <= 2 Walsh model over a ``[Q]`` ratio grid, each ratio with its own ``[R]``
    feature-space ridges ``ridge_table [Q, R]`` (``ok_table [Q, R]``: hyperparameters valid).

    One pass accumulates the centred Gram; per ratio one ``d x d`` eigendecomposition and a second
    pass give the exact leave-one-out residuals of every ridge in its row. The grid point with the
    smallest LOO MSE / label variance averaged over targets is chosen, ties broken by
    :func:`kernattr.select_grid_point` on the reported ridge ``ridge_grid [R]`` and the per-ratio
    keys ``tie_keys = (gamma-like [Q], mix [Q] or None)``. The surrogate reports ``ratio_grid``
    and ``ridge_grid`` and the chosen entries of each. Validated, same-dtype ``masks [m, K]`` and
    ``y [m, T]``. With ``ard_steps > 0`` the chosen point's prior is refined per feature
    (:func:`_ard_refit`) and the returned fit, noise and ``ard_cv_error`` are the ARD model's.
    """
    k = masks.shape[1]
    num_q, num_r = ridge_table.shape
    st = _walsh_stats(masks, y, block_size=block_size, mesh=mesh, axis=axis)
    num_pairs = st.iu.shape[0]

    def per_ratio(args):
        q, ridges, ok = args
        return st.loo_sums(_prior_scale(q, k, num_pairs), ridges, ok)

    sq, noise, valids = jax.lax.map(per_ratio, (ratio_grid, ridge_table, ok_table))  # [Q, R, T] x2, [Q, R]
    cv = loo_cv_error(sq, valids, st.yc2, st.num_train)
    first, mix_key = tie_keys
    best = select_grid_point(
        jnp.mean(cv, axis=2).reshape(-1, 1), jnp.repeat(first, num_r), jnp.tile(ridge_grid, num_q),
        None if mix_key is None else jnp.repeat(mix_key, num_r))[0]
    qi, ri = best // num_r, best % num_r
    hyper_ok = ok_table[qi, ri]
    if throw:
        hyper_ok = _checks.error_if(hyper_ok, hyper_ok & ~valids[qi, ri], singular_msg)
    q, lam = ratio_grid[qi], ridge_table[qi, ri]
    ok = hyper_ok & valids[qi, ri]
    sc = _prior_scale(q, k, num_pairs)
    noise_var = noise[qi, ri] / st.num_train
    if ard_steps:
        ard = _ard_refit(st, sc, lam, ok, noise_var, ard_steps, throw=throw)
        sc, lam, ok, noise_var, final = ard.scale, ard.ridge, ard.ok, ard.noise_var, ard.spectrum
    else:
        final = st.spectrum(sc, lam[None], ok[None])
    surrogate = _walsh_solution(st, sc, final, ok)._replace(
        ratio=jnp.broadcast_to(q, (y.shape[1],)),
        ridge=jnp.broadcast_to(ridge_grid[ri], (y.shape[1],)),
        ratio_grid=ratio_grid,
        ridge_grid=ridge_grid,
        cv_error=cv,
        noise_var=noise_var,
        feature_prior=ard.feature_prior if ard_steps else None,
        ard_cv_error=ard.cv_error if ard_steps else None,
    )
    return _GridFit(surrogate, best)


class _ArdFit(NamedTuple):
    scale: jax.Array  # [d] square roots of the learned prior variances
    ridge: jax.Array  # scalar 1 (the prior carries the scale)
    ok: jax.Array  # scalar bool
    noise_var: jax.Array  # [T]
    spectrum: tuple  # the final system's ridge_spectrum
    feature_prior: jax.Array  # [d]
    cv_error: jax.Array  # [T]


def _ard_refit(st: _WalshStats, sc, lam, ok, noise_var, steps: int, *, throw: bool) -> _ArdFit:
    """``steps`` EM steps from the grid's prior ``sc``/``lam`` (:func:`_ard_prior`), and the
    leave-one-out error of the learned prior (held fixed)."""
    dtype = st.gram.dtype
    mf, yc2 = st.num_train, st.yc2
    # Each prior variance is capped at 0.01/(eps·G_jj): the scaled system stays well
    # conditioned in the working precision, and a capped coefficient is shrunk by at most a
    # relative ~100·eps (noise-free labels would otherwise send ρ to infinity).
    eps, tiny = jnp.finfo(dtype).eps, jnp.finfo(dtype).tiny
    cap = 0.01 / (eps * jnp.maximum(jnp.diagonal(st.gram), tiny))
    # Start from the grid's prior (noise units), every feature kept alive (a ratio-0 choice
    # would otherwise freeze the pairs at 0).
    rho = jnp.minimum(sc * sc / jnp.maximum(lam, tiny), cap)
    rho = jnp.minimum(rho + 0.01 * jnp.mean(rho), cap)
    # The dual form holds the centred features and labels in memory ([m, d], m <= d),
    # replicated on every device when the masks are sharded (m is small here).
    m, d = st.masks.shape[0], st.gram.shape[0]
    dual = (replicate((_walsh_features(st.masks, st.iu, st.ju) - st.xmean[None, :],
                       st.y - st.y_mean[None, :]), st.where)
            if m <= d else None)
    # The noise is never taken below the grid fit's leave-one-out calibrated value: with fewer
    # masks than features the residual-dof estimate can reach 0 when the labels allow
    # interpolation (seen on real fine-tuning labels), and the prior variances follow it up.
    feature_prior, noise_var = _ard_prior((st.gram, st.sy, yc2, mf), dual, rho, steps, cap,
                                          jnp.maximum(noise_var, tiny + eps * yc2 / mf))
    sc, lam = jnp.sqrt(jnp.where(ok, feature_prior, 1.0)), jnp.ones((), dtype)
    final = st.spectrum(sc, lam[None], ok[None])  # also the final solve's
    sq_a, _, valid_a = st.loo_sums(sc, lam[None], ok[None], final)
    ard_cv = loo_cv_error(sq_a[None], valid_a[None], yc2, mf)[0, 0]
    if throw:
        ok = _checks.error_if(ok, ok & ~valid_a[0],
                              "fit_quadratic(ard_steps=...): the learned prior makes the scaled "
                              "Gram matrix singular in the working precision; use float64 or "
                              "fewer ard_steps.")
    ok = ok & valid_a[0]
    return _ArdFit(sc, lam, ok, jnp.where(ok, noise_var, jnp.nan), final,
                   jnp.where(ok, feature_prior, jnp.nan), ard_cv)


def _walsh_solution(st: _WalshStats, sc, spectrum, ok) -> QuadraticSurrogate:
    """The fit at prior scales ``sc`` from its ``spectrum`` (one ridge), in the mask basis;
    NaN where ``ok`` is False. Grid fields are left for the caller (``None``/placeholders)."""
    k, t = st.masks.shape[1], st.y.shape[1]
    _, vv, _, inv = spectrum
    cov = (sc[:, None] * vv) @ (inv[0][:, None] * (vv.T * sc[None, :]))  # [d, d]
    u = cov @ st.sy  # [d, T] Walsh coefficients
    b = st.y_mean - st.xmean @ u
    u = jnp.where(ok, u, jnp.nan)
    b = jnp.where(ok, b, jnp.nan)
    cov = jnp.where(ok, cov, jnp.nan)
    # χ basis -> mask basis: χ_j χ_k = 4 s_j s_k - 2 s_j - 2 s_k + 1, χ_k = 2 s_k - 1.
    u1, u2 = u[:k], u[k:]
    pair = jnp.zeros((k, k, t), u.dtype).at[st.iu, st.ju].set(4.0 * u2).at[st.ju, st.iu].set(4.0 * u2)
    linear = 2.0 * u1 - 0.5 * jnp.sum(pair, axis=1)
    intercept = b - jnp.sum(u1, axis=0) + jnp.sum(u2, axis=0)
    return QuadraticSurrogate(
        linear=linear, pairwise=pair, intercept=intercept, ratio=None, ridge=None, ratio_grid=None,
        ridge_grid=None, cv_error=None, feature_mean=st.xmean, feature_cov=cov, noise_var=None,
        num_train=st.num_train)


def walsh_features(masks: jax.Array) -> jax.Array:
    """``[m, d]`` Walsh features of validated masks (``χ_k``, then ``χ_j χ_k`` for ``j < k``)."""
    iu, ju = _pair_index(masks.shape[1])
    return _walsh_features(masks, iu, ju)


def attribution_functionals(num_tasks: int, kind: str, dtype) -> jax.Array:
    """``[K, d]``: leave-one-out (``kind="loo"``) or Shapley (``"shapley"``) of each Walsh
    feature. ``χ_j(1) - χ_j(1 - e_k) = 2δ_jk`` and the same for a pair containing ``k``; the
    Shapley value of ``χ_j`` for ``k`` is ``2δ_jk`` and that of a pair ``χ_i χ_j`` is 0 (its
    marginal ``±2(2 s_j - 1)`` averages to 0 over orderings)."""
    iu, ju = _pair_index(num_tasks)
    eye = jnp.eye(num_tasks, dtype=dtype)
    pair = eye[:, iu] + eye[:, ju] if kind == "loo" else jnp.zeros((num_tasks, iu.shape[0]), dtype)
    return 2.0 * jnp.concatenate([eye, pair], axis=1)


def quadratic_predict(s: QuadraticSurrogate, masks: jax.Array) -> jax.Array:
    """``[m', T]`` predictions at validated masks (no input checks)."""
    quad = 0.5 * jnp.einsum("mj,jkt,mk->mt", masks, s.pairwise, masks)
    return s.intercept[None, :] + masks @ s.linear + quad


def walsh_kernel_weights(kernel: str, gamma: jax.Array, mix: jax.Array, linear_scale: jax.Array,
                         num_tasks: int):
    """``(v1, v2, tail)``: what :func:`kernattr.fit_kernel`'s kernel puts on one degree-1 Walsh
    function, on one degree-2 one, and on all degrees ``>= 3`` together (their diagonal value).

    In the Walsh basis (intercept unpenalised, so degree 0 does not matter)
    ``exp(-γ·Hamming) = Σ_S a^{K-|S|} b^{|S|} χ_S χ'_S`` with ``a, b = (1 ± e^{-γ})/2``, and
    ``<s, s'>/c`` adds ``1/(4c)`` to degree 1. The tail ``Σ_{j>=3} C(K, j) a^{K-j} b^j`` is summed
    term by term in log space (no cancellation against ``1 - a^K - ...`` in float32).

    >>> v1, v2, tail = walsh_kernel_weights("rbf", jnp.asarray(0.5), jnp.asarray(0.0), jnp.asarray(1.0), 2)
    >>> round(float(v1), 4), round(float(v2), 4), float(tail)   # (1 - e^-.5)(1 + e^-.5)/4, ((1 - e^-.5)/2)²
    (0.158, 0.0387, 0.0)
    """
    if kernel == "linear":
        quarter = jnp.full_like(gamma, 0.25)
        return quarter, jnp.zeros_like(gamma), jnp.zeros_like(gamma)
    k = num_tasks
    log_b = jnp.log(-jnp.expm1(-gamma) / 2.0)
    log_a = jnp.log1p(jnp.expm1(-gamma) / 2.0)
    rbf = 1.0 - mix if kernel == "linear+rbf" else jnp.ones_like(gamma)
    lin = mix / (4.0 * linear_scale) if kernel == "linear+rbf" else jnp.zeros_like(gamma)
    v1 = lin + rbf * jnp.exp((k - 1) * log_a + log_b)
    v2 = rbf * jnp.exp((k - 2) * log_a + 2.0 * log_b)
    j = np.arange(3, k + 1)  # empty for K < 3: no tail
    log_binom = jnp.asarray([math.lgamma(k + 1) - math.lgamma(i + 1) - math.lgamma(k - i + 1)
                             for i in j], gamma.dtype)
    full = log_a.shape + j.shape  # the degrees along a last axis
    jj = jnp.broadcast_to(jnp.asarray(j, gamma.dtype), full)
    terms = jnp.exp(jnp.broadcast_to(log_binom, full) + (k - jj) * log_a[..., None] + jj * log_b[..., None])
    return v1, v2, rbf * jnp.sum(terms, axis=-1)


def fit_kernel_walsh(masks, y, spec: KernelSpec, *, gamma, mix, ridge, block_size=2048, mesh=None,
                     axis=None, throw=True) -> QuadraticSurrogate:
    """``fit_kernel(..., solver="walsh")``: the kernel's degree <= 2 Walsh part exactly, the rest as
    ridge.

    The kernel ``k = k_≤2 + k_≥3`` on masks: ``k_≤2 = v1 Σ_k χ_k χ'_k + v2 Σ_{j<k} χ_j χ_k χ'_j χ'_k``
    (:func:`walsh_kernel_weights`) is kept exactly, and ``k_≥3`` by its diagonal ``tail·I`` (its
    value on equal masks; between distinct masks it is small when ``γ`` is of order ``1/K`` or
    larger, since it is a sum over ``C(K, 3) + ...`` Walsh functions of mean 0). So
    ``K + λI ≈ K_≤2 + (λ + tail)·I``, which is :func:`fit_quadratic`'s model at
    ``ratio = v2/v1`` and feature-space ridge ``(λ + tail)/(K v1 + P v2)``, solved in feature space
    at a cost linear in ``m``. Leave-one-out selection over the same ``(gamma, mix, ridge)`` grid
    as the exact fit, with its tie-breaking. Exact for ``K <= 2``.
    """
    masks, y, block_size = _checked_inputs(masks, y, block_size, "solver='walsh'", "num_landmarks=")
    k, t, dtype = masks.shape[1], y.shape[1], masks.dtype
    kernel = spec.kernel
    gamma_grid, mix_grid, ridge_grid = kernel_grids(kernel, k, gamma, mix, ridge, dtype)
    gamma_ok, ridge_ok = hyperparameters_ok(kernel, gamma, ridge, throw)
    num_g, num_w, num_r = gamma_grid.shape[0], mix_grid.shape[0], ridge_grid.shape[0]
    gamma_ok = jnp.broadcast_to(gamma_ok, (num_g,))
    ridge_ok = jnp.broadcast_to(ridge_ok, (num_r,))
    gg, ww = jnp.repeat(gamma_grid, num_w), jnp.tile(mix_grid, num_g)  # [C] in (gamma, mix) order
    # An invalid (traced) gamma is replaced by 1 so that the weights stay finite; never chosen.
    gg_ok = jnp.repeat(gamma_ok, num_w)
    v1, v2, tail = walsh_kernel_weights(kernel, jnp.where(gg_ok, gg, 1.0), ww,
                                        mask_linear_scale(kernel, masks), k)
    num_pairs = k * (k - 1) // 2
    ratio = v2 / v1  # [C]
    scale = k * v1 + num_pairs * v2
    ridge_table = (ridge_grid[None, :] + tail[:, None]) / scale[:, None]  # [C, R]
    ok_table = gg_ok[:, None] & ridge_ok[None, :]
    fit = _fit_walsh_grid(
        masks, y, ratio, ridge_grid, ridge_table, ok_table, (gg, ww),
        block_size=block_size, mesh=mesh, axis=axis, throw=throw,
        singular_msg="`ridge` too small: the feature Gram matrix of fit_kernel(solver='walsh') is "
                     "singular at the chosen (gamma, mix, ridge) (fewer masks than K(K+1)/2 "
                     "features, or a linear kernel); pass ridge > 0 or a ridge grid.")
    ci = fit.index // num_r
    return fit.surrogate._replace(
        cv_error=fit.surrogate.cv_error.reshape(num_g, num_w, num_r, t),
        gamma=jnp.broadcast_to(gg[ci], (t,)),
        mix=jnp.broadcast_to(ww[ci], (t,)),
    )
