"""Multi-fidelity surrogates: many cheap (estimated) labels corrected by a few real ones.

Model (two-level autoregressive co-kriging, Kennedy & O'Hagan style, in kernel ridge form)::

    F_real(s) ≈ rho · g_cheap(s) + δ(s)

``g_cheap`` is a kernel surrogate fitted on the cheap labels (e.g. gradient-estimator labels of
many masks); ``δ`` a kernel surrogate fitted on the residuals ``real - rho · g_cheap`` at the few
masks with real labels (e.g. 32 retrains). ``rho`` and the residual kernel's settings are chosen
together by exact closed-form leave-one-out CV on the real labels: LOO residuals are linear in
the labels, so for every grid point the LOO residual of ``y - rho·c`` is ``e_y - rho·e_c``
(``c = g_cheap(real masks)``) and the LOO-optimal ``rho = <e_y, e_c> / <e_c, e_c>`` is exact,
per target and grid point, with no search over ``rho``.

Shapes: ``K`` tasks, ``m_c`` cheap masks, ``m`` real masks, ``T`` targets, ``G`` bandwidths,
``W`` mix values, ``R`` ridge values.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .. import _checks
from .._metrics import column_spearman
from ._krr import (
    MultiFidelitySurrogate,
    fit_kernel_direct,
    kernel_grids,
    kernel_predict,
    kernel_spec,
    loo_residual_grid,
    mask_linear_scale,
    select_grid_point,
)

__all__ = ["fit_multifidelity"]

_OPTIONS = ("kernel", "gamma", "ridge", "mix", "degree", "coef0", "select", "per_target")


def fit_multifidelity(
    cheap_masks: jax.Array,
    cheap_y: jax.Array,
    real_masks: jax.Array,
    real_y: jax.Array,
    *,
    rho: float | jax.Array | None = None,
    **kernel_options: Any,
) -> MultiFidelitySurrogate:
    """Surrogate from many cheap labels plus a few real ones: ``rho·g_cheap + g_residual``.

    1. ``g_cheap = fit_kernel(cheap_masks, cheap_y, **kernel_options)``.
    2. ``c = g_cheap(real_masks)``; for every grid point of the residual kernel the exact LOO
       residuals ``e_y`` of ``real_y`` and ``e_c`` of ``c`` (one eigendecomposition per
       ``(gamma, mix)``, as in :func:`kernattr.fit_kernel`) give the LOO-optimal
       ``rho = <e_y, e_c>/<e_c, e_c>`` per target and the LOO error at that ``rho``; the grid
       point is chosen by the ``select`` criterion (pooled over targets, or ``per_target``).
    3. ``g_residual = fit_kernel(real_masks, real_y - rho·c, **kernel_options)``: for
       ``select="mse"`` its own LOO choice is the joint optimum of step 2.

    ``rho = 0`` is a kernel on the real labels alone and ``rho = 1`` a plain residual
    correction; both are inside the search, so the cheap labels are used only as far as they
    help on held-out real labels (compare ``cv_error`` with ``cv_error_real_only``). The cheap
    and real masks may overlap (e.g. the real masks are a subset of the cheap ones).

    Args:
      cheap_masks: ``[m_c, K]`` 0/1 masks with cheap labels.
      cheap_y: ``[m_c]`` or ``[m_c, T]`` cheap labels (e.g. estimated by
        :func:`kernattr.estimate_subset_labels`).
      real_masks: ``[m, K]`` 0/1 masks with real labels (``m >= 3``).
      real_y: ``[m]`` or ``[m, T]`` real labels (same targets as ``cheap_y``).
      rho: ``None`` (default: LOO-CV) or a fixed scale, scalar or ``[T]``.
      **kernel_options: passed to both :func:`kernattr.fit_kernel` calls: ``kernel``,
        ``gamma``, ``ridge``, ``mix``, ``degree``, ``coef0``, ``select``, ``per_target``.

    Returns:
      :class:`kernattr.MultiFidelitySurrogate`; ``ka.predict``, ``ka.loo_scores``,
      ``ka.shapley_values``, ``ka.banzhaf_values`` and ``ka.interaction_scores`` accept it.

    Example:
      >>> import jax, jax.numpy as jnp, kernattr as ka
      >>> game = ka.synthetic_game(jax.random.key(0), num_tasks=6, num_targets=2, noise=0.0)
      >>> cheap = ka.sample_subsets(jax.random.key(1), num_tasks=6, num_subsets=64, p=0.5)
      >>> real = cheap[:16]
      >>> bias = 0.3 * jnp.sum(cheap, axis=1, keepdims=True)  # cheap labels are biased
      >>> fit = jax.jit(lambda *a: ka.fit_multifidelity(*a, gamma=0.3, ridge=jnp.array([1e-3, 1e-1])))
      >>> mf = fit(cheap, game.evaluate(cheap) + bias, real, game.evaluate(real))
      >>> ka.predict(mf, real).shape, ka.shapley_values(mf).shape, mf.rho.shape
      ((16, 2), (6, 2), (2,))
    """
    unknown = sorted(set(kernel_options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"unknown kernel option(s) {unknown}; allowed: {list(_OPTIONS)}.")
    opts = {"select": "mse", "per_target": False, **kernel_options}
    spec = kernel_spec(opts.pop("kernel", "linear+rbf"), opts.pop("degree", 2), opts.pop("coef0", 1.0))
    cheap_masks, cheap_y, real_masks, real_y = _checked_inputs(cheap_masks, cheap_y, real_masks, real_y)
    m, k = real_masks.shape
    t = real_y.shape[1]

    cheap = fit_kernel_direct(cheap_masks, cheap_y, spec, **opts)
    dtype = jnp.result_type(cheap.dual_coef.dtype, real_y.dtype, real_masks.dtype)
    real_masks = real_masks.astype(dtype)
    real_y = real_y.astype(dtype)
    c = kernel_predict(cheap, real_masks).astype(dtype)  # [m, T]

    gamma_grid, mix_grid, ridge_grid = kernel_grids(
        spec.kernel, k, opts.get("gamma"), opts.get("mix"), opts.get("ridge"), dtype)
    num_g, num_w, num_r = gamma_grid.shape[0], mix_grid.shape[0], ridge_grid.shape[0]
    resid, valid = loo_residual_grid(
        real_masks, jnp.concatenate([real_y, c], axis=1), spec, gamma_grid=gamma_grid,
        mix_grid=mix_grid, ridge_grid=ridge_grid,
        linear_scale=mask_linear_scale(spec.kernel, real_masks),
    )  # [C, R, m, 2T]
    e_y, e_c = resid[..., :t], resid[..., t:]
    rho_grid = _rho_grid(e_y, e_c, rho, dtype)
    crit = _criteria(e_y, e_c, rho_grid, valid, real_y, opts["select"])
    # grid points in (gamma, mix, ridge) order; near-ties broken as in fit_kernel
    gam_flat = jnp.repeat(jnp.repeat(gamma_grid, num_w), num_r)
    mix_flat = jnp.repeat(jnp.tile(mix_grid, num_g), num_r)
    rid_flat = jnp.tile(ridge_grid, num_g * num_w)
    if bool(opts["per_target"]):
        best = select_grid_point(crit.loss.reshape(-1, t), gam_flat, rid_flat, mix_flat)  # [T]
        rho_t = rho_grid.reshape(-1, t)[best, jnp.arange(t)]
    else:
        best = select_grid_point(crit.pooled.reshape(-1, 1), gam_flat, rid_flat, mix_flat)[0]
        rho_t = rho_grid.reshape(-1, t)[best]
    residual = fit_kernel_direct(real_masks, real_y - rho_t[None, :] * c, spec, **opts)
    shape = (num_g, num_w, num_r, t)
    return MultiFidelitySurrogate(
        cheap=cheap,
        residual=residual,
        rho=rho_t,
        cv_error=crit.cv.reshape(shape),
        cv_error_real_only=crit.cv_real.reshape(shape),
        cv_rho=rho_grid.reshape(shape),
    )


def _checked_inputs(cheap_masks, cheap_y, real_masks, real_y):
    """Validated masks ``[m_c, K]``, ``[m, K]`` and labels ``[m_c, T]``, ``[m, T]``."""
    cheap_masks = _checks.check_masks(cheap_masks, "cheap_masks")
    real_masks = _checks.check_masks(real_masks, "real_masks", num_tasks=cheap_masks.shape[1])
    cheap_y, _ = _checks.check_labels(cheap_y, cheap_masks.shape[0], "cheap_y")
    real_y, _ = _checks.check_labels(real_y, real_masks.shape[0], "real_y")
    if cheap_y.shape[1] != real_y.shape[1]:
        raise ValueError(
            f"`cheap_y` has {cheap_y.shape[1]} targets but `real_y` has {real_y.shape[1]}; they "
            "must describe the same targets."
        )
    if real_masks.shape[0] < 3:
        raise ValueError(f"`real_masks` has {real_masks.shape[0]} rows; at least 3 real labels are needed.")
    return cheap_masks, cheap_y, real_masks, real_y


def _rho_grid(e_y: jax.Array, e_c: jax.Array, rho, dtype) -> jax.Array:
    """``[C, R, T]`` scale of the cheap surrogate at each grid point: LOO-optimal
    ``<e_y, e_c>/<e_c, e_c>`` from the LOO residuals ``[C, R, m, T]``, or the fixed ``rho``."""
    t = e_y.shape[-1]
    if rho is None:
        ecc = jnp.sum(e_c * e_c, axis=2)  # [C, R, T]
        eyc = jnp.sum(e_y * e_c, axis=2)
        return jnp.where(ecc > 0, eyc / jnp.where(ecc > 0, ecc, 1.0), 0.0)
    fixed = _checks.as_float_array(rho, "rho").astype(dtype)
    if fixed.ndim > 1 or (fixed.ndim == 1 and fixed.shape[0] != t):
        raise ValueError(f"`rho` must be a scalar or [T] = [{t}], got shape {fixed.shape}.")
    fixed = _checks.error_if(fixed, ~jnp.isfinite(fixed),
                             "`rho` contains {count} non-finite values.")
    return jnp.broadcast_to(fixed, e_y.shape[:2] + (t,))


class _Criteria(NamedTuple):
    cv: jax.Array  # [C, R, T] LOO MSE / variance at the grid's rho
    cv_real: jax.Array  # [C, R, T] the same at rho = 0
    loss: jax.Array  # [C, R, T] the per-target selection loss
    pooled: jax.Array  # [C, R] the loss pooled over targets


def _criteria(e_y, e_c, rho_grid, valid, real_y, select: str) -> _Criteria:
    """Leave-one-out criteria of ``real - rho·cheap`` over the grid (``select`` as in
    :func:`kernattr.fit_kernel`)."""
    m, t = real_y.shape
    ycen = real_y - jnp.mean(real_y, axis=0, keepdims=True)
    scale = jnp.mean(ycen * ycen, axis=0)
    scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    e = e_y - rho_grid[:, :, None, :] * e_c  # [C, R, m, T]
    ok = valid[:, :, None]

    def norm_mse(res):
        cv = jnp.mean(res * res, axis=2) / scale[None, None, :]
        return jnp.where(ok & jnp.isfinite(cv), cv, jnp.inf)

    cv = norm_mse(e)
    if select != "loo_spearman":
        return _Criteria(cv, norm_mse(e_y), cv, jnp.mean(cv, axis=2))
    loo_pred = ycen[None, None] - e  # [C, R, m, T]
    flat = jnp.moveaxis(loo_pred, 2, 0).reshape(m, -1)
    ys = jnp.broadcast_to(ycen[:, None, None, :], (m,) + loo_pred.shape[:2] + (t,))
    score = column_spearman(flat, ys.reshape(m, -1)).reshape(cv.shape)
    score = jnp.where(jnp.isfinite(cv), score, jnp.nan)
    loss = jnp.where(jnp.isnan(score), jnp.inf, -score)
    pooled = jnp.where(jnp.all(jnp.isnan(score), axis=2), jnp.inf,
                       -jnp.nanmean(jnp.where(jnp.isnan(score), jnp.nan, score), axis=2))
    return _Criteria(cv, norm_mse(e_y), loss, pooled)
