"""Surrogate models on subset masks: linear (datamodels) and kernel ridge regression.

A surrogate ``g(s) ≈ F(s)`` maps a 0/1 task mask ``s`` (``[K]``) to ``T`` target values.

* :func:`fit_linear` — least squares ``g(s) = intercept + sᵀ coef`` (optionally ridge-penalised,
  intercept never penalised).
* :func:`fit_kernel_direct` — exact kernel ridge regression
  ``g(s) = intercept + Σ_i α_i k(s, s_i)`` on masks. Default kernel ``"linear+rbf"``:
  ``mix·<s,s'>/c + (1-mix)·exp(-γ·Hamming)``, which contains the linear surrogate
  (``mix = 1``) and the RBF kernel (``mix = 0``); also ``"rbf"``,
  ``"polynomial"``, ``"linear"``. Bandwidth ``gamma``, ``mix`` and ridge accept 1-D grids; they
  are then chosen by *exact closed-form leave-one-out CV*: one eigendecomposition per
  ``(gamma, mix)`` pair (vmapped over the grid) gives the LOO residuals of every ridge value at
  once, scored by LOO mean squared error or LOO rank correlation (``select=``).
* :func:`kernel_predict` — ``[m', T]`` predictions of a kernel surrogate.

:func:`kernattr.fit_kernel` (which also reaches the large-``m`` solvers built on this module) and
:func:`kernattr.predict` (for every surrogate type) sit above, in :mod:`._dispatch`.

Shapes: ``m`` masks, ``K`` tasks, ``T`` targets, ``G`` bandwidths, ``W`` mix values, ``R`` ridge
values.

Structure of a :class:`KernelSurrogate` (what prediction and attribution rely on): the kernel
between a new mask ``s`` and a training mask ``s_i`` is ``gram(spec, s, s_i, gamma_t, mix_t,
linear_scale)`` (:func:`surrogate_gram`), the prediction is ``gram @ dual_coef + intercept``,
and :func:`split_linear_part` rewrites a ``"linear+rbf"`` surrogate exactly as a linear part
(``coef [K, T]``) plus a pure-RBF surrogate. Code that adds solvers (e.g. low-rank) should
produce the same fields.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import _checks
from .._linalg import eigh
from .._metrics import column_spearman

__all__ = [
    "KernelSpec",
    "KernelSurrogate",
    "LinearSurrogate",
    "MultiFidelitySurrogate",
    "default_gamma_grid",
    "default_mix_grid",
    "default_ridge_grid",
    "check_select",
    "fit_kernel_direct",
    "fit_linear",
    "kernel_matrix",
    "hyperparameters_ok",
    "kernel_grids",
    "kernel_predict",
    "loo_residual_grid",
    "mask_linear_scale",
    "select_grid_point",
    "split_linear_part",
    "surrogate_gram",
]

KERNELS = ("linear+rbf", "rbf", "polynomial", "linear")
SELECTIONS = ("mse", "loo_spearman")


# --------------------------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------------------------
class LinearSurrogate(NamedTuple):
    """Linear surrogate ``g(s) = intercept + sᵀ coef``.

    Attributes:
      coef: ``[K, T]`` per-task coefficients (the additive effect of including task ``k``).
      intercept: ``[T]`` value at the empty mask.
    """

    coef: jax.Array
    intercept: jax.Array


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=[],
    meta_fields=["kernel", "degree", "coef0", "shared_gamma", "fit_intercept"],
)
@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """Static (hashable, leaf-free) description of a kernel surrogate.

    Attributes:
      kernel: ``"linear+rbf"``, ``"rbf"``, ``"polynomial"`` or ``"linear"``.
      degree: polynomial degree (polynomial kernel only).
      coef0: polynomial offset (polynomial kernel only).
      shared_gamma: True when every target uses the same kernel (bandwidth ``gamma[0]`` and mix
        ``mix[0]``), so one kernel matrix serves all targets; False after per-target selection
        over a grid with more than one ``(gamma, mix)`` pair.
      fit_intercept: whether an unpenalised intercept was fitted.
    """

    kernel: str = "linear+rbf"
    degree: int = 2
    coef0: float = 1.0
    shared_gamma: bool = True
    fit_intercept: bool = True


class KernelSurrogate(NamedTuple):
    """Kernel ridge surrogate ``g(s) = intercept + Σ_i dual_coef[i] · k(s, masks[i])``.

    For target ``t`` the kernel is (:func:`surrogate_gram`)
    ``k(s, s') = mix[t]·<s, s'>/linear_scale + (1 - mix[t])·base_γ(s, s')`` for
    ``"linear+rbf"`` (``base`` = RBF) and ``base_γ(s, s')`` for the single kernels.

    Attributes:
      masks: ``[m, K]`` training masks (the kernel centres).
      dual_coef: ``[m, T]`` dual coefficients ``α``.
      intercept: ``[T]`` unpenalised intercept (0 when ``fit_intercept=False``).
      gamma: ``[T]`` bandwidth used for each target (all equal unless selected per target).
      ridge: ``[T]`` ridge used for each target.
      mix: ``[T]`` share of the linear kernel in ``"linear+rbf"`` (0 for the single kernels).
      gamma_grid: ``[G]`` bandwidth grid searched (``[1]`` for a scalar).
      mix_grid: ``[W]`` mix grid searched (``[1]``; ``[0.]`` for the single kernels).
      ridge_grid: ``[R]`` ridge grid searched (``[1]`` for a scalar).
      linear_scale: scalar ``c``, the mean number of tasks per training mask (the mean diagonal
        of ``<s, s'>``), so that both parts of ``"linear+rbf"`` have unit mean diagonal (1 for
        the single kernels).
      cv_error: ``[G, W, R, T]`` exact leave-one-out mean squared error divided by the variance
        of each target's labels (``inf`` where the regularised kernel matrix is singular).
      cv_spearman: ``[G, W, R, T]`` Spearman correlation between the exact leave-one-out
        predictions and the labels (``select="loo_spearman"``; NaN-filled otherwise, and NaN
        for a constant column or a singular grid point).
      spec: static :class:`KernelSpec` (kernel name, degree, coef0, ...; no array leaves).
    """

    masks: jax.Array
    dual_coef: jax.Array
    intercept: jax.Array
    gamma: jax.Array
    ridge: jax.Array
    mix: jax.Array
    gamma_grid: jax.Array
    mix_grid: jax.Array
    ridge_grid: jax.Array
    linear_scale: jax.Array
    cv_error: jax.Array
    cv_spearman: jax.Array
    spec: KernelSpec


class MultiFidelitySurrogate(NamedTuple):
    """``g(s) = rho · g_cheap(s) + g_residual(s)``: many cheap labels, corrected by a few real ones.

    Built by :func:`kernattr.fit_multifidelity`. Prediction and every attribution (LOO,
    Shapley, Banzhaf, interactions) are linear in the surrogate, so each is
    ``rho · (that of cheap) + (that of residual)``, exactly.

    Attributes:
      cheap: :class:`KernelSurrogate` fitted on the cheap (estimated) labels.
      residual: :class:`KernelSurrogate` fitted on ``real - rho · cheap(real masks)``.
      rho: ``[T]`` scale of the cheap surrogate per target (chosen by LOO-CV on the real
        labels, or given).
      cv_error: ``[G, W, R, T]`` leave-one-out mean squared error on the real labels, divided by
        their variance, at each grid point's best ``rho`` (the criterion ``rho`` came from).
      cv_error_real_only: ``[G, W, R, T]`` the same with ``rho = 0``: a kernel on the real
        labels alone. ``min cv_error < min cv_error_real_only`` says the cheap labels help.
      cv_rho: ``[G, W, R, T]`` the LOO-optimal ``rho`` at each grid point.
    """

    cheap: KernelSurrogate
    residual: KernelSurrogate
    rho: jax.Array
    cv_error: jax.Array
    cv_error_real_only: jax.Array
    cv_rho: jax.Array


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
def _check_kernel_config(kernel: Any, degree: Any, coef0: Any) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"`kernel` must be one of {KERNELS}, got {kernel!r}.")
    if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)) or degree < 1:
        raise ValueError(f"`degree` must be an integer >= 1, got {degree!r}.")
    if not isinstance(coef0, (int, float, np.floating, np.integer)) or not np.isfinite(coef0):
        raise TypeError(f"`coef0` must be a finite Python float, got {coef0!r}.")
    if coef0 < 0:
        raise ValueError(
            f"`coef0` must be >= 0 so that the polynomial kernel is positive semi-definite, got {coef0}."
        )


def _base_kernel(kernel: str) -> str:
    """The non-linear part of a kernel name (``"linear+rbf"`` -> ``"rbf"``)."""
    return "rbf" if kernel == "linear+rbf" else kernel


def _gram(kernel: str, degree: int, coef0: float, a: jax.Array, b: jax.Array, gamma) -> jax.Array:
    """Single-kernel matrix ``[m_a, m_b]`` between 0/1 masks ``a [m_a, K]`` and ``b [m_b, K]``."""
    inner = a @ b.T
    if kernel == "rbf":
        # On 0/1 masks ||a-b||² is the Hamming distance, an integer: exact from the inner products.
        na = jnp.sum(a, axis=1)
        nb = jnp.sum(b, axis=1)
        dist = jnp.maximum(na[:, None] + nb[None, :] - 2.0 * inner, 0.0)
        return jnp.exp(-gamma * dist)
    if kernel == "polynomial":
        return (gamma * inner + coef0) ** degree
    return inner


def _mixed_gram(kernel, degree, coef0, a, b, gamma, mix, linear_scale) -> jax.Array:
    """``mix·<a,b>/linear_scale + (1-mix)·rbf`` for ``"linear+rbf"``, else the single kernel."""
    base = _gram(_base_kernel(kernel), degree, coef0, a, b, gamma)
    if kernel != "linear+rbf":
        return base
    return (mix / linear_scale) * (a @ b.T) + (1.0 - mix) * base


# Named (non-underscore) for the Nyström / CG modules that share it.
check_kernel_config = _check_kernel_config


def surrogate_gram(
    spec: KernelSpec, a: jax.Array, b: jax.Array, gamma: jax.Array, mix: jax.Array,
    linear_scale: jax.Array,
) -> jax.Array:
    """Kernel matrix ``[m_a, m_b]`` of a fitted surrogate's kernel for ONE target's parameters.

    ``gamma``, ``mix``: scalars (one entry of :attr:`KernelSurrogate.gamma` / ``.mix``);
    ``linear_scale``: :attr:`KernelSurrogate.linear_scale`. Masks are assumed validated.

    >>> import jax.numpy as jnp
    >>> g = surrogate_gram(KernelSpec(), jnp.eye(2), jnp.eye(2), 1.0, 0.5, 1.0)
    >>> [round(v, 4) for v in g[0].tolist()]
    [1.0, 0.0677]
    """
    return _mixed_gram(spec.kernel, spec.degree, spec.coef0, a, b, gamma, mix, linear_scale)


def kernel_matrix(
    a: jax.Array,
    b: jax.Array,
    *,
    kernel: str = "rbf",
    gamma: float | jax.Array = 1.0,
    degree: int = 2,
    coef0: float = 1.0,
    mix: float | jax.Array = 0.5,
    linear_scale: float | jax.Array = 1.0,
) -> jax.Array:
    """Kernel matrix between two sets of masks.

    ``rbf``: ``exp(-gamma·||a-b||²)`` (= ``exp(-gamma·Hamming)`` on 0/1 masks, matching
    scikit-learn's ``rbf_kernel``); ``polynomial``: ``(gamma·<a,b> + coef0)^degree``; ``linear``:
    ``<a,b>`` (``gamma`` ignored); ``linear+rbf``:
    ``mix·<a,b>/linear_scale + (1-mix)·exp(-gamma·||a-b||²)``.

    Args:
      a: ``[m_a, K]`` 0/1 masks.
      b: ``[m_b, K]`` 0/1 masks.
      kernel: kernel name.
      gamma: scalar bandwidth / scale.
      degree: polynomial degree.
      coef0: polynomial offset.
      mix: scalar in ``[0, 1]``, share of the linear kernel (``linear+rbf`` only).
      linear_scale: scalar ``> 0`` dividing ``<a,b>`` (``linear+rbf`` only).

    Returns:
      ``[m_a, m_b]`` kernel matrix.

    >>> import jax.numpy as jnp
    >>> kernel_matrix(jnp.eye(2), jnp.ones((1, 2)), gamma=1.0).shape
    (2, 1)
    """
    _check_kernel_config(kernel, degree, coef0)
    a = _checks.check_masks(a, "a")
    b = _checks.check_masks(b, "b", num_tasks=a.shape[1])
    return _mixed_gram(kernel, degree, coef0, a, b, gamma, mix, linear_scale)


def default_mix_grid(kernel: str = "linear+rbf") -> np.ndarray:
    """Default mix grid: the share of the linear kernel in ``"linear+rbf"``.

    ``[0, 0.5, 0.9, 0.99, 1]``: from pure RBF to pure linear (ridge regression on the masks,
    i.e. the linear surrogate), with the ratio ``σ_rbf²/σ_lin²`` spanning ``∞, 1, 0.11, 0.01,
    0``. The single kernels get ``[0.]`` (no linear part).

    >>> default_mix_grid().tolist()
    [0.0, 0.5, 0.9, 0.99, 1.0]
    """
    if kernel != "linear+rbf":
        return np.zeros((1,))
    return np.array([0.0, 0.5, 0.9, 0.99, 1.0])


def default_gamma_grid(num_tasks: int, kernel: str = "rbf") -> np.ndarray:
    """Default bandwidth grid: ``c / K`` for 7 values of ``c`` from 0.01 to 10 (log-spaced).

    With masks drawn at p=0.5, the typical Hamming distance is ``K/2``, so ``c`` spans kernels
    from nearly constant (``c=0.01``) to nearly local (``c=10``). The linear kernel ignores
    ``gamma`` and gets ``[1.0]``.

    >>> default_gamma_grid(10).shape
    (7,)
    """
    if kernel == "linear":
        return np.ones((1,))
    return np.logspace(-2.0, 1.0, 7) / float(num_tasks)


def default_ridge_grid() -> np.ndarray:
    """Default ridge grid: 9 decades ``1e-4 .. 1e4`` (absolute; for the RBF kernel the kernel
    diagonal is 1, so this is also relative to ``trace(K)/m``).

    >>> float(default_ridge_grid()[0])
    0.0001
    """
    return np.logspace(-4.0, 4.0, 9)


# --------------------------------------------------------------------------------------------
# Linear surrogate
# --------------------------------------------------------------------------------------------
def fit_linear(
    masks: jax.Array, y: jax.Array, *, ridge: float = 0.0, throw: bool = True
) -> LinearSurrogate:
    """Least-squares linear surrogate with an unpenalised intercept (datamodels).

    Minimises ``||y - intercept - masks @ coef||² + ridge·||coef||²`` per target. With
    ``ridge=0`` and rank-deficient (centred) masks — e.g. a task always present, or two tasks
    always together — the minimum-norm ``coef`` is returned (singular values below
    ``max(m, K)·eps·σ_max`` are treated as zero, as in ``numpy.linalg.lstsq``).

    Args:
      masks: ``[m, K]`` 0/1 masks.
      y: ``[m]`` or ``[m, T]`` labels. 1-D labels are treated as ``T = 1``.
      ridge: ``>= 0`` penalty on ``coef`` (not on the intercept); may be traced.
      throw: a traced ``ridge`` that is negative, NaN or inf raises ``ValueError`` from the
        compiled program (a concrete one raises at once). With ``throw=False`` the result is
        NaN instead (``coef`` and ``intercept`` all NaN).

    Returns:
      :class:`LinearSurrogate` with ``coef [K, T]`` and ``intercept [T]``.

    >>> import jax, jax.numpy as jnp
    >>> masks = jax.random.bernoulli(jax.random.key(0), 0.5, (40, 3)).astype(jnp.float32)
    >>> s = fit_linear(masks, 1.0 + masks @ jnp.array([1.0, -2.0, 0.5]))
    >>> s.coef.shape, s.intercept.shape
    ((3, 1), (1,))
    """
    masks = _checks.check_masks(masks)
    y, _ = _checks.check_labels(y, masks.shape[0])
    if not isinstance(ridge, (str, bytes)) and ridge is not None and jnp.ndim(ridge) != 0:
        raise ValueError(f"`ridge` must be a scalar, got shape {jnp.shape(ridge)}.")
    ridge_ok = _checks.check_hyperparameter(ridge, "ridge", allow_zero=True, throw=throw)
    dtype = jnp.result_type(masks.dtype, y.dtype)
    masks = masks.astype(dtype)
    y = y.astype(dtype)
    m, k = masks.shape
    x_mean = jnp.mean(masks, axis=0)
    y_mean = jnp.mean(y, axis=0)
    xc = masks - x_mean[None, :]
    yc = y - y_mean[None, :]
    u, sv, vt = jnp.linalg.svd(xc, full_matrices=False)
    ridge = jnp.asarray(ridge, dtype)
    cutoff = max(m, k) * jnp.finfo(dtype).eps * jnp.max(sv)
    keep = sv > cutoff
    safe_sv = jnp.where(keep, sv, 1.0)
    shrink = jnp.where(keep, safe_sv / (safe_sv**2 + ridge), 0.0)
    coef = vt.T @ (shrink[:, None] * (u.T @ yc))
    intercept = y_mean - x_mean @ coef
    coef = jnp.where(ridge_ok, coef, jnp.nan)
    intercept = jnp.where(ridge_ok, intercept, jnp.nan)
    return LinearSurrogate(coef=coef, intercept=intercept)


# --------------------------------------------------------------------------------------------
# Kernel surrogate
# --------------------------------------------------------------------------------------------
def _householder_complement(m: int, dtype) -> tuple[jax.Array, jax.Array]:
    """``v, c`` of the reflection ``H = I - 2 v vᵀ / c`` with ``H e_1 = 1/√m``.

    Columns ``2..m`` of ``H`` are an orthonormal basis of the complement of the constant vector.
    """
    v = jnp.full((m,), 1.0 / np.sqrt(m), dtype).at[0].add(-1.0)
    c = jnp.sum(v * v)
    return v, c


def _restricted_eigh(kmat: jax.Array, fit_intercept: bool) -> tuple[jax.Array, jax.Array]:
    """Eigenpairs of the kernel on the space the dual coefficients live in.

    Without intercept: ``eigh(K)``. With an unpenalised intercept the dual coefficients are
    orthogonal to the constant vector, so the relevant operator is ``QᵀKQ`` with ``Q`` an
    orthonormal basis of ``1^⊥`` (a Householder reflection); its eigenvectors are mapped back to
    ``[m, m-1]``. Returns ``(e [r], U [m, r])`` with ``r = m`` or ``m - 1``.
    """
    if not fit_intercept:
        return eigh(kmat)
    m = kmat.shape[0]
    v, c = _householder_complement(m, kmat.dtype)
    kv = kmat @ v
    vkv = v @ kv
    hkh = (
        kmat
        - (2.0 / c) * (v[:, None] * kv[None, :] + kv[:, None] * v[None, :])
        + (4.0 * vkv / (c * c)) * (v[:, None] * v[None, :])
    )
    e, w = eigh(hkh[1:, 1:])
    w_pad = jnp.concatenate([jnp.zeros((1, m - 1), w.dtype), w], axis=0)
    u = w_pad - (2.0 / c) * v[:, None] * (v @ w_pad)[None, :]
    return e, u


def select_grid_point(
    cv: jax.Array, gamma: jax.Array, ridge: jax.Array, mix: jax.Array | None = None
) -> jax.Array:
    """Index of the best grid point per column, with deterministic tie-breaking.

    Grid points whose CV error is within a relative ``sqrt(eps)`` of the column's minimum are
    ties (float32 rounding differs between eager and jitted runs, so an exact ``argmin`` could
    pick differently); among ties the largest ridge wins, then the smallest gamma (the smoothest
    model), then the largest ``mix`` (the most linear model), then the lowest index.

    Args:
      cv: ``[P, T]`` CV errors of ``P`` grid points (``inf`` where invalid).
      gamma: ``[P]`` bandwidth of each grid point.
      ridge: ``[P]`` ridge of each grid point.
      mix: optional ``[P]`` linear share of each grid point (``"linear+rbf"``).

    Returns:
      ``[T]`` int indices into ``P``.

    >>> import jax.numpy as jnp
    >>> cv = jnp.array([[1.0], [1.0 + 1e-9], [2.0]])
    >>> select_grid_point(cv, jnp.array([1.0, 1.0, 1.0]), jnp.array([0.1, 1.0, 10.0])).tolist()
    [1]
    """
    rtol = float(np.sqrt(jnp.finfo(cv.dtype).eps))
    best = jnp.min(cv, axis=0, keepdims=True)  # [1, T]
    cand = cv <= best + rtol * jnp.abs(best)  # all True when every point is inf
    rmax = jnp.max(jnp.where(cand, ridge[:, None], -jnp.inf), axis=0, keepdims=True)
    cand = cand & (ridge[:, None] == rmax)
    gmin = jnp.min(jnp.where(cand, gamma[:, None], jnp.inf), axis=0, keepdims=True)
    cand = cand & (gamma[:, None] == gmin)
    if mix is not None:
        wmax = jnp.max(jnp.where(cand, mix[:, None], -jnp.inf), axis=0, keepdims=True)
        cand = cand & (mix[:, None] == wmax)
    return jnp.argmax(cand, axis=0)


def _loo_pair(kmat: jax.Array, yc: jax.Array, ridge_grid: jax.Array, fit_intercept: bool):
    """Exact LOO residuals for every ridge of one kernel matrix, from ONE eigendecomposition.

    Returns ``(resid [R, m, T], valid [R], e [r], u [m, r], z [r, T])``: ``resid[r, i]`` is
    ``y_i`` minus the prediction at mask ``i`` of the model refitted without row ``i``
    (``yc`` centred when ``fit_intercept``); ``valid`` flags ridges where ``K + λI`` is
    numerically non-singular (invalid ridges get residual ``α`` with unit leverage and must be
    ignored); ``e, u, z = Uᵀ yc`` are what the final fit needs.
    """
    m = kmat.shape[0]
    eps = jnp.finfo(kmat.dtype).eps
    e, u = _restricted_eigh(kmat, fit_intercept)
    # The kernel is PSD: computed negative eigenvalues are rounding noise (|err| ~ eps·||K||).
    e_max = jnp.max(jnp.abs(e))
    e = jnp.maximum(e, 0.0)
    # ridge > 0: K + λI is PD by construction; flagged only if λ drowns in rounding.
    # ridge = 0: the kernel itself must be numerically non-singular (rank tolerance m·eps).
    tol = jnp.where(ridge_grid > 0, 1.0, float(m)) * eps * e_max  # [R]
    valid = jnp.min(e) + ridge_grid > tol  # [R]
    z = u.T @ yc  # [r, T]
    inv = 1.0 / (e[None, :] + ridge_grid[:, None])  # [R, r]
    inv = jnp.where(valid[:, None], inv, 0.0)
    alphas = jnp.einsum("ir,Rr,rt->Rit", u, inv, z)  # [R, m, T]
    diag = (u * u) @ inv.T  # [m, R]
    diag = jnp.where(valid[None, :], diag, 1.0)
    return alphas / diag.T[:, :, None], valid, e, u, z


def loo_residual_grid(
    masks: jax.Array,
    y: jax.Array,
    *,
    kernel: str,
    gamma_grid: jax.Array,
    mix_grid: jax.Array,
    ridge_grid: jax.Array,
    linear_scale: jax.Array,
    degree: int = 2,
    coef0: float = 1.0,
    fit_intercept: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Exact LOO residuals of kernel ridge on validated inputs, over a whole grid.

    The machinery of :func:`fit_kernel` (one eigendecomposition per ``(gamma, mix)`` pair,
    vmapped; pairs in ``(gamma, mix)`` order) for callers that combine residuals of several
    label sets, e.g. :func:`kernattr.fit_multifidelity` (LOO is linear in the labels).

    Args:
      masks: ``[m, K]`` validated 0/1 masks.
      y: ``[m, T]`` validated labels (centred inside when ``fit_intercept``).
      kernel, degree, coef0, fit_intercept: as in :func:`fit_kernel`.
      gamma_grid, mix_grid, ridge_grid: ``[G]``, ``[W]``, ``[R]`` validated grids.
      linear_scale: scalar ``c`` of ``"linear+rbf"`` (ignored otherwise).

    Returns:
      ``(resid [G*W, R, m, T], valid [G*W, R])``.

    >>> import jax.numpy as jnp
    >>> masks = jnp.array([[0., 1.], [1., 0.], [1., 1.], [0., 0.]])
    >>> r, ok = loo_residual_grid(masks, masks[:, :1], kernel="rbf", gamma_grid=jnp.ones(1),
    ...                           mix_grid=jnp.zeros(1), ridge_grid=jnp.ones(2),
    ...                           linear_scale=jnp.ones(()))
    >>> r.shape, ok.shape
    ((1, 2, 4, 1), (1, 2))
    """
    yc = y - jnp.mean(y, axis=0, keepdims=True) if fit_intercept else y
    num_w = mix_grid.shape[0]

    def per_pair(g, w):
        kmat = _mixed_gram(kernel, degree, coef0, masks, masks, g, w, linear_scale)
        resid, valid, *_ = _loo_pair(kmat, yc, ridge_grid, fit_intercept)
        return resid, valid

    return jax.vmap(per_pair)(jnp.repeat(gamma_grid, num_w), jnp.tile(mix_grid, gamma_grid.shape[0]))


def kernel_grids(kernel: str, num_tasks: int, gamma: Any, mix: Any, ridge: Any, dtype):
    """Validated ``(gamma_grid [G], mix_grid [W], ridge_grid [R])`` of :func:`fit_kernel`.

    ``None`` gives the default grid; scalars become 1-element grids. Static problems raise
    ``ValueError``/``TypeError``; a ``mix`` outside ``[0, 1]`` raises (when traced: when the
    compiled program runs). Values of ``gamma``/``ridge`` are checked by
    :func:`hyperparameters_ok`.

    >>> [g.shape[0] for g in kernel_grids("linear+rbf", 10, None, None, None, "float32")]
    [7, 5, 9]
    """
    if kernel == "linear" and gamma is None:
        gamma = 1.0
    if kernel != "linear+rbf" and mix is not None:
        raise ValueError(f"`mix` applies to kernel='linear+rbf' only, got kernel={kernel!r}.")
    gamma_grid = _checks.check_grid(
        default_gamma_grid(num_tasks, kernel) if gamma is None else gamma, "gamma"
    ).astype(dtype)
    ridge_grid = _checks.check_grid(default_ridge_grid() if ridge is None else ridge, "ridge").astype(
        dtype
    )
    mix_grid = _checks.check_grid(default_mix_grid(kernel) if mix is None else mix, "mix").astype(
        dtype
    )
    _checks.error_if(
        mix_grid,
        ~((mix_grid >= 0) & (mix_grid <= 1)),
        "`mix` must lie in [0, 1] (the share of the linear kernel); {count} values do not.",
    )
    return gamma_grid, mix_grid, ridge_grid


def hyperparameters_ok(kernel: str, gamma: Any, ridge: Any, throw: bool):
    """``(gamma_ok [G], ridge_ok [R])``: finite and positive (ridge: >= 0) entries, checked
    eagerly and under ``jit`` (:func:`kernattr._checks.check_hyperparameter`); ``None`` means
    the (valid) default grid."""
    if kernel == "linear" and gamma is None:
        gamma = 1.0
    gamma_ok = (True if gamma is None else
                _checks.check_hyperparameter(gamma, "gamma", throw=throw))
    ridge_ok = (True if ridge is None else
                _checks.check_hyperparameter(ridge, "ridge", allow_zero=True, throw=throw))
    return jnp.reshape(jnp.asarray(gamma_ok), (-1,)), jnp.reshape(jnp.asarray(ridge_ok), (-1,))


def mask_linear_scale(kernel: str, masks: jax.Array) -> jax.Array:
    """``c`` of ``"linear+rbf"``: mean tasks per mask (1 if all masks are empty; 1 otherwise).

    >>> float(mask_linear_scale("linear+rbf", jnp.array([[1.0, 1.0], [1.0, 0.0]])))
    1.5
    """
    if kernel != "linear+rbf":
        return jnp.ones((), masks.dtype)
    c = jnp.mean(jnp.sum(masks, axis=1))
    return jnp.where(c > 0, c, jnp.ones_like(c))


def check_select(select: Any) -> None:
    if select not in SELECTIONS:
        raise ValueError(f"`select` must be one of {SELECTIONS}, got {select!r}.")


def fit_kernel_direct(
    masks: jax.Array,
    y: jax.Array,
    *,
    kernel: str = "linear+rbf",
    gamma: float | jax.Array | None = None,
    ridge: float | jax.Array | None = None,
    mix: float | jax.Array | None = None,
    degree: int = 2,
    coef0: float = 1.0,
    select: str = "mse",
    per_target: bool = False,
    fit_intercept: bool = True,
    throw: bool = True,
) -> KernelSurrogate:
    """Exact kernel ridge regression on masks: the ``solver="direct"`` path of ``fit_kernel``.

    One eigendecomposition per ``(gamma, mix)`` pair of the ``m x m`` kernel matrix gives the
    fit and its closed-form leave-one-out selection for every ridge. Arguments, selection rule
    and failure modes are those of :func:`kernattr.fit_kernel` (without ``num_landmarks``,
    ``key`` and ``solver``).

    Returns:
      :class:`KernelSurrogate`.

    >>> import jax, jax.numpy as jnp
    >>> masks = jax.random.bernoulli(jax.random.key(0), 0.5, (32, 4)).astype(jnp.float32)
    >>> fit_kernel_direct(masks, masks[:, 0], gamma=0.3, ridge=0.1).dual_coef.shape
    (32, 1)
    """
    _check_kernel_config(kernel, degree, coef0)
    check_select(select)
    masks = _checks.check_masks(masks)
    y, _ = _checks.check_labels(y, masks.shape[0])
    dtype = jnp.result_type(masks.dtype, y.dtype)
    masks = masks.astype(dtype)
    y = y.astype(dtype)
    m, k = masks.shape
    t = y.shape[1]
    if fit_intercept and m < 2:
        raise ValueError("`masks` needs at least 2 rows to fit a kernel surrogate with an intercept.")
    gamma_grid, mix_grid, ridge_grid = kernel_grids(kernel, k, gamma, mix, ridge, dtype)
    num_g, num_w, num_r = gamma_grid.shape[0], mix_grid.shape[0], ridge_grid.shape[0]
    gamma_ok, ridge_ok = hyperparameters_ok(kernel, gamma, ridge, throw)
    gamma_ok = jnp.broadcast_to(gamma_ok, (num_g,))
    ridge_ok = jnp.broadcast_to(ridge_ok, (num_r,))
    shared_gamma = (not per_target) or num_g * num_w == 1
    spec = KernelSpec(
        kernel=kernel,
        degree=int(degree),
        coef0=float(coef0),
        shared_gamma=shared_gamma,
        fit_intercept=bool(fit_intercept),
    )
    linear_scale = mask_linear_scale(kernel, masks)

    y_mean = jnp.mean(y, axis=0)
    yc = y - y_mean[None, :] if fit_intercept else y
    scale = jnp.mean(yc * yc, axis=0)
    scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    want_rho = select == "loo_spearman"

    def per_pair(g, w, g_ok):
        kmat = _mixed_gram(kernel, degree, coef0, masks, masks, g, w, linear_scale)
        resid, nonsingular, e, u, z = _loo_pair(kmat, yc, ridge_grid, fit_intercept)
        valid = nonsingular & ridge_ok & g_ok  # [R]; invalid hyperparameters: never chosen
        cv = jnp.mean(resid * resid, axis=1) / scale[None, :]  # [R, T]
        cv = jnp.where(valid[:, None] & jnp.isfinite(cv), cv, jnp.inf)
        if want_rho:
            loo_pred = yc[None, :, :] - resid  # [R, m, T]
            flat = jnp.transpose(loo_pred, (1, 0, 2)).reshape(m, num_r * t)
            rho = column_spearman(flat, jnp.tile(yc, (1, num_r))).reshape(num_r, t)
            rho = jnp.where(valid[:, None] & jnp.isfinite(cv), rho, jnp.nan)
        else:
            rho = jnp.full((num_r, t), jnp.nan, dtype)
        colmean = jnp.mean(kmat, axis=0)  # [m]
        return cv, rho, e, u, z, valid, colmean

    gg = jnp.repeat(gamma_grid, num_w)  # [C] pairs in (gamma, mix) order
    ww = jnp.tile(mix_grid, num_g)
    gg_ok = jnp.repeat(gamma_ok, num_w)
    cv, rho, es, us, zs, valids, colmeans = jax.vmap(per_pair)(gg, ww, gg_ok)  # cv, rho: [C, R, T]
    num_c = num_g * num_w
    if want_rho:
        # maximise the correlation; undefined (constant / singular) counts as worst
        loss = jnp.where(jnp.isnan(rho), jnp.inf, -rho)
        if not per_target:
            ok = ~jnp.isnan(rho)
            cnt = jnp.sum(ok, axis=2)
            mean_rho = jnp.sum(jnp.where(ok, rho, 0.0), axis=2) / jnp.maximum(cnt, 1)
            pooled = jnp.where(cnt > 0, -mean_rho, jnp.inf)
    else:
        loss = cv
        if not per_target:
            pooled = jnp.mean(cv, axis=2)
    gam_flat = jnp.repeat(gg, num_r)  # [C*R], index c*R + r
    mix_flat = jnp.repeat(ww, num_r)
    rid_flat = jnp.tile(ridge_grid, num_c)
    if per_target:
        best = select_grid_point(loss.reshape(num_c * num_r, t), gam_flat, rid_flat, mix_flat)
    else:
        best = jnp.broadcast_to(
            select_grid_point(pooled.reshape(-1, 1), gam_flat, rid_flat, mix_flat), (t,))
    c_idx = best // num_r
    r_idx = best % num_r
    gamma_t = gg[c_idx]
    mix_t = ww[c_idx]
    ridge_t = ridge_grid[r_idx]
    chosen_ok = valids[c_idx, r_idx]  # [T]
    hyper_ok = gg_ok[c_idx] & ridge_ok[r_idx]  # [T]
    if throw:
        _checks.error_if(
            masks,
            hyper_ok & ~chosen_ok,
            "`ridge` too small: the kernel matrix is singular at the chosen (gamma, mix, ridge) "
            "for {count} target(s) (e.g. ridge=0 with duplicated masks or a low-rank kernel); "
            "pass ridge > 0 or a ridge grid.",
        )
    onehot = jnp.arange(num_c)[:, None] == c_idx[None, :]  # [C, T]
    denom = es[:, :, None] + ridge_t[None, None, :]  # [C, r, T]
    w = jnp.where(onehot[:, None, :], zs / jnp.where(onehot[:, None, :], denom, 1.0), 0.0)
    alpha = jnp.einsum("gir,grt->it", us, w)  # [m, T]
    if fit_intercept:
        intercept = y_mean - jnp.einsum("gi,gt,it->t", colmeans, onehot.astype(dtype), alpha)
    else:
        intercept = jnp.zeros((t,), dtype)
    alpha = jnp.where(hyper_ok[None, :], alpha, jnp.nan)
    intercept = jnp.where(hyper_ok, intercept, jnp.nan)
    return KernelSurrogate(
        masks=masks,
        dual_coef=alpha,
        intercept=intercept,
        gamma=gamma_t,
        ridge=ridge_t,
        mix=mix_t,
        gamma_grid=gamma_grid,
        mix_grid=mix_grid,
        ridge_grid=ridge_grid,
        linear_scale=linear_scale,
        cv_error=cv.reshape(num_g, num_w, num_r, t),
        cv_spearman=rho.reshape(num_g, num_w, num_r, t),
        spec=spec,
    )


# --------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------
def kernel_predict(s: KernelSurrogate, masks: jax.Array) -> jax.Array:
    """``[m', T]`` predictions of a kernel surrogate at validated masks (no input checks)."""
    spec = s.spec
    if spec.shared_gamma:
        kmat = surrogate_gram(spec, masks, s.masks, s.gamma[0], s.mix[0], s.linear_scale)
        return kmat @ s.dual_coef + s.intercept[None, :]

    def one_target(args):
        g, w, a = args
        return surrogate_gram(spec, masks, s.masks, g, w, s.linear_scale) @ a

    cols = jax.lax.map(one_target, (s.gamma, s.mix, s.dual_coef.T), batch_size=8)  # [T, m']
    return cols.T + s.intercept[None, :]


def split_linear_part(s: KernelSurrogate) -> tuple[jax.Array, KernelSurrogate]:
    """Exact split ``g = sᵀ coef + g_rest`` of a kernel surrogate into a linear part and the rest.

    For ``"linear+rbf"``: ``Σ_i α_i mix/c <s, s_i> = sᵀ (mix/c · masksᵀ α)``, and ``g_rest`` is
    the same surrogate with kernel ``"rbf"`` and dual coefficients ``(1 - mix)·α`` (intercept
    kept). Every attribution that is linear in the game (LOO, Shapley, Banzhaf, interactions)
    is then the linear part's (its coefficient; no interactions) plus ``g_rest``'s. For the
    single kernels ``coef`` is 0 and ``g_rest`` is ``s``.

    Args:
      s: a :class:`KernelSurrogate`.

    Returns:
      ``(coef [K, T], rest)``.

    >>> import jax, jax.numpy as jnp
    >>> masks = jax.random.bernoulli(jax.random.key(0), 0.5, (16, 4)).astype(jnp.float32)
    >>> coef, rest = split_linear_part(fit_kernel_direct(masks, masks[:, 0], gamma=0.3, ridge=0.1))
    >>> coef.shape, rest.spec.kernel
    ((4, 1), 'rbf')
    """
    k = s.masks.shape[1]
    if s.spec.kernel != "linear+rbf":
        return jnp.zeros((k, s.dual_coef.shape[1]), s.dual_coef.dtype), s
    lin_w = s.mix / s.linear_scale  # [T]
    coef = s.masks.T @ (s.dual_coef * lin_w[None, :])
    rest = s._replace(
        dual_coef=s.dual_coef * (1.0 - s.mix)[None, :],
        mix=jnp.zeros_like(s.mix),
        spec=dataclasses.replace(s.spec, kernel="rbf"),
    )
    return coef, rest
