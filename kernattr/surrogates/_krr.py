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
from .._sharding import gather_rows

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
    "kernel_spec",
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
      dual_coef: ``[m, T]`` dual coefficients ``α`` (copies of a mask share its coefficient
        equally; only the sum over the copies enters the model).
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
      status: ``[T]`` int32 bit flags of the exact path's selection (``None`` from the Nyström
        and CG paths and on surrogates built by hand):
        ``1`` the chosen grid point was decided by the tie rule, not by the data (its
        leave-one-out criterion is within numerical error of a better one); ``2`` the chosen
        system ``kernel + ridge·I`` is ill-conditioned for the dtype (condition number times
        ``eps`` above ``1e-3``: rounding may move predictions and attributions by more than
        0.1%; use float64 or a larger ridge); ``4`` the chosen point is singular or its
        hyperparameters invalid (``throw=False``; coefficients not finite). 0: none of these.
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
    status: jax.Array | None = None


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
def kernel_spec(kernel: Any = "linear+rbf", degree: Any = 2, coef0: Any = 1.0, *,
                fit_intercept: bool = True) -> KernelSpec:
    """The validated :class:`KernelSpec` of a fit: every public entry builds it once, from its
    ``kernel``, ``degree`` and ``coef0`` arguments, and passes it down whole.

    Raises ``ValueError`` for an unknown kernel, a degree that is not an integer ``>= 1`` or a
    negative ``coef0``; ``TypeError`` for a ``coef0`` that is not a finite number.

    >>> kernel_spec("polynomial", 3, 0.5)
    KernelSpec(kernel='polynomial', degree=3, coef0=0.5, shared_gamma=True, fit_intercept=True)
    """
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
    return KernelSpec(kernel=kernel, degree=int(degree), coef0=float(coef0),
                      fit_intercept=bool(fit_intercept))


def _base_kernel(kernel: str) -> str:
    """The non-linear part of a kernel name (``"linear+rbf"`` -> ``"rbf"``)."""
    return "rbf" if kernel == "linear+rbf" else kernel


def _gram(spec: KernelSpec, a: jax.Array, b: jax.Array, gamma, minus_one: bool = False) -> jax.Array:
    """Matrix ``[m_a, m_b]`` of the single (non-linear) kernel of ``spec`` between 0/1 masks
    ``a [m_a, K]`` and ``b [m_b, K]`` (for ``"linear+rbf"``: its RBF part).

    ``minus_one``: the RBF kernel minus the constant 1, as ``expm1`` (accurate when the
    bandwidth is small and the kernel is nearly constant)."""
    kernel = _base_kernel(spec.kernel)
    inner = a @ b.T
    if kernel == "rbf":
        # On 0/1 masks ||a-b||² is the Hamming distance, an integer: exact from the inner products.
        na = jnp.sum(a, axis=1)
        nb = jnp.sum(b, axis=1)
        dist = jnp.maximum(na[:, None] + nb[None, :] - 2.0 * inner, 0.0)
        return jnp.expm1(-gamma * dist) if minus_one else jnp.exp(-gamma * dist)
    if kernel == "polynomial":
        return (gamma * inner + spec.coef0) ** spec.degree
    return inner


def _mixed_gram(spec: KernelSpec, a, b, gamma, mix, linear_scale, minus_one=False) -> jax.Array:
    """``mix·<a,b>/linear_scale + (1-mix)·rbf`` for ``"linear+rbf"``, else the single kernel
    (``minus_one``: the RBF part minus its constant 1, see :func:`_gram`)."""
    base = _gram(spec, a, b, gamma, minus_one)
    if spec.kernel != "linear+rbf":
        return base
    return (mix / linear_scale) * (a @ b.T) + (1.0 - mix) * base


def intercept_free_gram(spec: KernelSpec, a: jax.Array, gamma, mix, linear_scale) -> jax.Array:
    """The kernel between training masks ``a`` as the fit's eigendecomposition needs it.

    With an unpenalised intercept a constant added to the kernel changes nothing (the dual
    coefficients are orthogonal to the constant), so the RBF part enters as ``exp(-γ·d) - 1``
    computed by ``expm1``: at small bandwidths the kernel is nearly constant and subtracting
    the constant after rounding would lose most of the digits that the fit depends on.
    """
    minus_one = spec.fit_intercept and _base_kernel(spec.kernel) == "rbf"
    return _mixed_gram(spec, a, a, gamma, mix, linear_scale, minus_one)


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
    return _mixed_gram(spec, a, b, gamma, mix, linear_scale)


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
    spec = kernel_spec(kernel, degree, coef0)
    a = _checks.check_masks(a, "a")
    b = _checks.check_masks(b, "b", num_tasks=a.shape[1])
    return _mixed_gram(spec, a, b, gamma, mix, linear_scale)


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
    masks = gather_rows(_checks.check_masks(masks))  # sharded rows: gathered for the SVD
    y, _ = _checks.check_labels(gather_rows(y), masks.shape[0])
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
    cv: jax.Array,
    gamma: jax.Array,
    ridge: jax.Array,
    mix: jax.Array | None = None,
    *,
    tol: jax.Array | None = None,
) -> jax.Array:
    """Index of the best grid point per column, with deterministic tie-breaking.

    Grid points whose criteria cannot be told apart numerically are ties, so that the choice
    does not depend on rounding (eager vs ``jit``, row order, precision). Without ``tol`` a
    point ties with the column's minimum when it is within a relative ``sqrt(eps)`` of it. With
    ``tol`` (the criterion's own numerical error at every point) each point stands for the
    interval ``cv ± tol``, and every point whose interval reaches below the lowest upper end
    ``min(cv + tol)`` is a tie. Among ties the largest ridge wins, then the smallest gamma (the
    smoothest model), then the largest ``mix`` (the most linear model), then the lowest index.

    Args:
      cv: ``[P, T]`` CV errors of ``P`` grid points (``inf`` where invalid).
      gamma: ``[P]`` bandwidth of each grid point.
      ridge: ``[P]`` ridge of each grid point.
      mix: optional ``[P]`` linear share of each grid point (``"linear+rbf"``).
      tol: optional ``[P, T]`` absolute numerical error of ``cv`` (``>= 0``).

    Returns:
      ``[T]`` int indices into ``P``.

    >>> import jax.numpy as jnp
    >>> cv = jnp.array([[1.0], [1.0 + 1e-9], [2.0]])
    >>> select_grid_point(cv, jnp.array([1.0, 1.0, 1.0]), jnp.array([0.1, 1.0, 10.0])).tolist()
    [1]
    """
    return _select_with_ties(cv, gamma, ridge, mix, tol)[0]


def _select_with_ties(cv, gamma, ridge, mix=None, tol=None):
    """``(index [T], tied [T])`` of :func:`select_grid_point`; ``tied`` is True where the
    tie rule, not the data, decided: the chosen point's criterion is above the minimum."""
    if tol is None:
        rtol = float(np.sqrt(jnp.finfo(cv.dtype).eps))
        best = jnp.min(cv, axis=0, keepdims=True)  # [1, T]
        cand = cv <= best + rtol * jnp.abs(best)  # all True when every point is inf
    else:
        tol = jnp.where(jnp.isfinite(cv) & jnp.isfinite(tol), tol, 0.0)
        best_upper = jnp.min(cv + tol, axis=0, keepdims=True)
        cand = cv - tol <= best_upper  # all True when every point is inf
    rmax = jnp.max(jnp.where(cand, ridge[:, None], -jnp.inf), axis=0, keepdims=True)
    cand = cand & (ridge[:, None] == rmax)
    gmin = jnp.min(jnp.where(cand, gamma[:, None], jnp.inf), axis=0, keepdims=True)
    cand = cand & (gamma[:, None] == gmin)
    if mix is not None:
        wmax = jnp.max(jnp.where(cand, mix[:, None], -jnp.inf), axis=0, keepdims=True)
        cand = cand & (mix[:, None] == wmax)
    idx = jnp.argmax(cand, axis=0)
    chosen = jnp.take_along_axis(cv, idx[None, :], axis=0)[0]
    return idx, chosen > jnp.min(cv, axis=0)


# --------------------------------------------------------------------------------------------
# Duplicated masks: one weighted row per distinct mask
# --------------------------------------------------------------------------------------------
STATUS_TIE = 1
STATUS_ILL_CONDITIONED = 2
STATUS_SINGULAR = 4


class DuplicateGroups(NamedTuple):
    """Rows of ``(masks, y)`` grouped by distinct mask, in an order that does not depend on the
    order of the input rows (masks sorted, then the first label).

    Attributes:
      order: ``[m]`` input row of each row in the canonical order.
      group: ``[m]`` distinct-mask index (``0..u-1``, non-decreasing) of each canonical row.
      masks: ``[m, K]`` the ``u`` distinct masks in rows ``0..u-1``; zero rows after them.
      counts: ``[m]`` copies of each distinct mask (0 for the padding rows ``u..m-1``).
      y_mean: ``[m, T]`` mean label of each distinct mask (0 for padding).
      within: ``[T]`` sum over rows of the squared deviation from their mask's mean label.
    """

    order: jax.Array
    group: jax.Array
    masks: jax.Array
    counts: jax.Array
    y_mean: jax.Array
    within: jax.Array


def group_duplicates(masks: jax.Array, y: jax.Array) -> DuplicateGroups:
    """Collapse repeated masks into one row each (their count and mean label), under ``jit``.

    The shapes stay ``[m, ...]`` (the number ``u`` of distinct masks is a value, not a shape):
    rows ``u..m-1`` are padding with count 0. Sums run in a canonical order (masks, then the
    first label), so the result is the same for any order of the input rows.

    Args:
      masks: ``[m, K]`` validated 0/1 masks.
      y: ``[m, T]`` validated labels.

    Returns:
      :class:`DuplicateGroups`.

    >>> import jax.numpy as jnp
    >>> g = group_duplicates(jnp.array([[1., 0.], [0., 1.], [1., 0.]]), jnp.array([[1.], [5.], [3.]]))
    >>> g.counts.tolist(), g.y_mean[:, 0].tolist()
    ([2.0, 1.0, 0.0], [2.0, 5.0, 0.0])
    """
    m, k = masks.shape
    nw = -(-k // 30)  # 30 mask bits per int32 sort key
    bits = jnp.pad(masks, ((0, 0), (0, nw * 30 - k))).astype(jnp.int32).reshape(m, nw, 30)
    words = jnp.sum(bits << jnp.arange(30, dtype=jnp.int32)[None, None, :], axis=2)  # [m, nw]
    order = jnp.lexsort((y[:, 0],) + tuple(words[:, j] for j in range(nw - 1, -1, -1)))
    ws, ms, ys = words[order], masks[order], y[order]
    new = jnp.concatenate([jnp.ones((1,), bool), jnp.any(ws[1:] != ws[:-1], axis=1)])
    group = jnp.cumsum(new.astype(jnp.int32)) - 1
    seg = functools.partial(jax.ops.segment_sum, segment_ids=group, num_segments=m,
                            indices_are_sorted=True)
    counts = seg(jnp.ones((m,), y.dtype))
    y_mean = seg(ys) / jnp.maximum(counts, 1.0)[:, None]
    distinct = jax.ops.segment_max(ms, group, num_segments=m, indices_are_sorted=True)
    distinct = jnp.where(counts[:, None] > 0, distinct, 0.0)
    dev = ys - y_mean[group]
    return DuplicateGroups(order, group, distinct, counts, y_mean, jnp.sum(dev * dev, axis=0))


def nonsingular(e_min: jax.Array, e_max: jax.Array, ridge: jax.Array, num_rows: int,
                slack: float = 1.0) -> jax.Array:
    """The one rule deciding whether ``kernel + ridge·I`` is numerically non-singular.

    ``e_min``/``e_max``: smallest (clamped at 0) and largest eigenvalue of the kernel on the
    space the dual coefficients live in. ``ridge > 0``: singular only when the ridge drowns in
    rounding (``ridge + e_min <= eps·e_max``); ``ridge = 0``: the kernel itself must have
    ``e_min > m·eps·e_max``. ``slack < 1`` loosens the rule for a second eigendecomposition
    of a system already accepted (the posterior), so that rounding differences between the
    two never reject what the fit accepted.
    """
    eps = float(jnp.finfo(e_max.dtype).eps)
    tol = jnp.where(ridge > 0, 1.0, float(num_rows)) * eps * slack * e_max
    return e_min + ridge > tol


def weighted_eigh(kmat: jax.Array, counts: jax.Array, fit_intercept: bool):
    """Eigenpairs of ``D K D`` (``D = diag(sqrt(counts))``) on the space of the dual coefficients.

    This is kernel ridge on distinct masks with ``counts`` copies each: with an unpenalised
    intercept the transformed coefficients are orthogonal to ``d = sqrt(counts)``, so the
    operator is restricted to ``d^⊥`` through a Householder reflection (``v = d/|d| + e_1``,
    stable since ``d_1 > 0``). Padding rows (count 0) get the mean of the other eigenvalues, so
    they neither set the range of the spectrum nor enter the fit (the labels are 0 there).

    Returns:
      ``(e [r], U [m, r], e_max)``: eigenvalues clamped at 0 (computed negative ones are
      rounding noise of the PSD kernel), eigenvectors mapped back to ``[m, r]`` (``r = m - 1``
      with an intercept, else ``m``), and the largest absolute eigenvalue before clamping.
    """
    m = kmat.shape[0]
    d = jnp.sqrt(counts)
    real = counts > 0
    kt = d[:, None] * kmat * d[None, :]
    if fit_intercept:
        v = d / jnp.sqrt(jnp.sum(counts)) + (jnp.arange(m) == 0).astype(kmat.dtype)  # + e_1
        c = v @ v
        kv = kt @ v
        vkv = v @ kv
        hkh = (kt - (2.0 / c) * (v[:, None] * kv[None, :] + kv[:, None] * v[None, :])
               + (4.0 * vkv / (c * c)) * (v[:, None] * v[None, :]))
        sub, pad = hkh[1:, 1:], ~real[1:]
    else:
        sub, pad = kt, ~real
    n_eff = jnp.sum(~pad)
    fill = jnp.sum(jnp.where(pad, 0.0, jnp.diagonal(sub))) / jnp.maximum(n_eff, 1)
    e, w = eigh(sub + jnp.diag(jnp.where(pad, fill, 0.0)))
    if fit_intercept:
        w = jnp.concatenate([jnp.zeros((1, m - 1), w.dtype), w], axis=0)
        w = w - (2.0 / c) * v[:, None] * (v @ w)[None, :]
    e_max = jnp.max(jnp.abs(e))
    return jnp.maximum(e, 0.0), w, e_max


def _weighted_resid(u, e, z, d, ridge_grid, valid):
    """``[R, m, T]`` leave-one-distinct-mask-out residuals of the mean labels (0 on padding)."""
    inv = 1.0 / (e[None, :] + ridge_grid[:, None])  # [R, r]
    inv = jnp.where(valid[:, None], inv, 0.0)
    beta = jnp.einsum("ir,Rr,rt->Rit", u, inv, z)  # [R, m, T]
    diag = (u * u) @ inv.T  # [m, R]
    diag = jnp.where(valid[None, :] & (d[:, None] > 0), diag, 1.0)
    safe_d = jnp.where(d > 0, d, 1.0)
    return jnp.where(d[None, :, None] > 0, beta / (diag.T * safe_d[None, :])[:, :, None], 0.0)


class GroupedLoo(NamedTuple):
    """Result of :func:`grouped_loo` (``R`` ridges, ``r`` eigenpairs)."""

    resid: jax.Array  # [R, m, T] residual of each distinct mask's mean label (0 on padding)
    resid_hi: jax.Array  # [R, m, T] the same with every eigenvalue raised by its rounding bound
    resid_lo: jax.Array  # [R, m, T] ... and lowered (clamped at 0)
    valid: jax.Array  # [R] non-singular ridges
    kappa: jax.Array  # [R] condition number of D K D + ridge·I on the fitted space
    e: jax.Array  # [r]
    u: jax.Array  # [m, r]
    z: jax.Array  # [r, T]


def grouped_loo(kmat: jax.Array, groups: DuplicateGroups, yc: jax.Array, ridge_grid: jax.Array,
                fit_intercept: bool) -> GroupedLoo:
    """Exact leave-one-distinct-mask-out residuals for every ridge, from ONE eigendecomposition.

    Leaving out a distinct mask removes all its copies (repeated measurements of one mask are
    not independent evidence about it). ``kmat [m, m]`` is the kernel between
    ``groups.masks``; ``yc [m, T]`` the (centred) mean label of each distinct mask. The fit is
    kernel ridge with weights ``counts``; in the transformed system ``r̃_g = β_g / P_gg`` is the
    exact LOO residual (penalised least squares in a fixed feature space), and ``r̃_g / d_g``
    that of the mean label. ``valid``: :func:`nonsingular`, and ``ridge = 0`` also needs every
    mask distinct (the kernel on the ``m`` rows is singular otherwise). ``resid_hi/lo``
    repeat the residuals with every eigenvalue moved by ``eps·||D K D||_F``, a bound
    on what rounding the kernel entries and the eigendecomposition can move it by: their
    spread is the numerical error of a criterion computed from ``resid``. The final fit is
    ``β = U diag(1/(e + λ)) z``.
    """
    m = kmat.shape[0]
    e, u, e_max = weighted_eigh(kmat, groups.counts, fit_intercept)
    d = jnp.sqrt(groups.counts)
    all_distinct = jnp.all(groups.counts > 0)
    valid = nonsingular(jnp.min(e), e_max, ridge_grid, m) & ((ridge_grid > 0) | all_distinct)
    kappa = (e_max + ridge_grid) / jnp.maximum(jnp.min(e) + ridge_grid, jnp.finfo(e.dtype).tiny)
    z = u.T @ (d[:, None] * yc)  # [r, T]
    shift = float(jnp.finfo(e.dtype).eps) * jnp.sqrt(jnp.sum((d[:, None] * kmat * d[None, :]) ** 2))
    resid = _weighted_resid(u, e, z, d, ridge_grid, valid)
    hi = _weighted_resid(u, e + shift, z, d, ridge_grid, valid)
    lo = _weighted_resid(u, jnp.maximum(e - shift, 0.0), z, d, ridge_grid, valid)
    return GroupedLoo(resid, hi, lo, valid, kappa, e, u, z)


def ill_conditioned(kappa: jax.Array, dtype) -> jax.Array:
    """True where ``kappa·eps > 1e-3``: rounding may move predictions by more than 0.1%."""
    return kappa * float(jnp.finfo(dtype).eps) > 1e-3


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
    valid = nonsingular(jnp.min(e), e_max, ridge_grid, m)  # [R]
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
    spec: KernelSpec,
    *,
    gamma_grid: jax.Array,
    mix_grid: jax.Array,
    ridge_grid: jax.Array,
    linear_scale: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Exact LOO residuals of kernel ridge on validated inputs, over a whole grid.

    The machinery of :func:`fit_kernel` (one eigendecomposition per ``(gamma, mix)`` pair,
    vmapped; pairs in ``(gamma, mix)`` order) for callers that combine residuals of several
    label sets, e.g. :func:`kernattr.fit_multifidelity` (LOO is linear in the labels).

    Args:
      masks: ``[m, K]`` validated 0/1 masks.
      y: ``[m, T]`` validated labels (centred inside when ``spec.fit_intercept``).
      spec: the :class:`KernelSpec` (:func:`kernel_spec`).
      gamma_grid, mix_grid, ridge_grid: ``[G]``, ``[W]``, ``[R]`` validated grids.
      linear_scale: scalar ``c`` of ``"linear+rbf"`` (ignored otherwise).

    Returns:
      ``(resid [G*W, R, m, T], valid [G*W, R])``.

    >>> import jax.numpy as jnp
    >>> masks = jnp.array([[0., 1.], [1., 0.], [1., 1.], [0., 0.]])
    >>> r, ok = loo_residual_grid(masks, masks[:, :1], kernel_spec("rbf"), gamma_grid=jnp.ones(1),
    ...                           mix_grid=jnp.zeros(1), ridge_grid=jnp.ones(2),
    ...                           linear_scale=jnp.ones(()))
    >>> r.shape, ok.shape
    ((1, 2, 4, 1), (1, 2))
    """
    yc = y - jnp.mean(y, axis=0, keepdims=True) if spec.fit_intercept else y
    num_w = mix_grid.shape[0]

    def per_pair(g, w):
        kmat = _mixed_gram(spec, masks, masks, g, w, linear_scale)
        resid, valid, *_ = _loo_pair(kmat, yc, ridge_grid, spec.fit_intercept)
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
    mix_grid = _checks.error_if(
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
    spec: KernelSpec,
    *,
    gamma: float | jax.Array | None = None,
    ridge: float | jax.Array | None = None,
    mix: float | jax.Array | None = None,
    select: str = "mse",
    per_target: bool = False,
    throw: bool = True,
) -> KernelSurrogate:
    """Exact kernel ridge regression on masks: the ``solver="direct"`` path of ``fit_kernel``.

    One eigendecomposition per ``(gamma, mix)`` pair of the ``m x m`` kernel matrix gives the
    fit and its closed-form leave-one-out selection for every ridge. ``spec`` (from
    :func:`kernel_spec`) carries the kernel and ``fit_intercept``; the other arguments,
    selection rule and failure modes are those of :func:`kernattr.fit_kernel`.

    Returns:
      :class:`KernelSurrogate`.

    >>> import jax, jax.numpy as jnp
    >>> masks = jax.random.bernoulli(jax.random.key(0), 0.5, (32, 4)).astype(jnp.float32)
    >>> fit_kernel_direct(masks, masks[:, 0], kernel_spec(), gamma=0.3, ridge=0.1).dual_coef.shape
    (32, 1)
    """
    check_select(select)
    masks = gather_rows(_checks.check_masks(masks))
    y, _ = _checks.check_labels(gather_rows(y), masks.shape[0])
    dtype = jnp.result_type(masks.dtype, y.dtype)
    masks = masks.astype(dtype)
    y = y.astype(dtype)
    m, k = masks.shape
    if spec.fit_intercept and m < 2:
        raise ValueError("`masks` needs at least 2 rows to fit a kernel surrogate with an intercept.")
    gamma_grid, mix_grid, ridge_grid = kernel_grids(spec.kernel, k, gamma, mix, ridge, dtype)
    gamma_ok, ridge_ok = hyperparameters_ok(spec.kernel, gamma, ridge, throw)
    shared_gamma = (not per_target) or gamma_grid.shape[0] * mix_grid.shape[0] == 1
    spec = dataclasses.replace(spec, shared_gamma=shared_gamma)
    grid = _DirectGrid(gamma_grid, mix_grid, ridge_grid,
                       jnp.broadcast_to(gamma_ok, gamma_grid.shape),
                       jnp.broadcast_to(ridge_ok, ridge_grid.shape))
    return _fit_direct(masks, y, spec, grid, select=select, per_target=per_target, throw=throw)


class _DirectGrid(NamedTuple):
    gamma: jax.Array  # [G]
    mix: jax.Array  # [W]
    ridge: jax.Array  # [R]
    gamma_ok: jax.Array  # [G] valid hyperparameter values
    ridge_ok: jax.Array  # [R]


class _PairLoo(NamedTuple):
    """Leave-one-distinct-mask-out results of the ``C = G·W`` (gamma, mix) pairs."""

    cv: jax.Array  # [C, R, T] normalised LOO mean squared error (inf where invalid)
    rho: jax.Array  # [C, R, T] LOO Spearman (NaN unless select="loo_spearman")
    err: jax.Array  # [C, R, T] numerical error of cv (0 where invalid)
    kappa: jax.Array  # [C, R] condition number
    valid: jax.Array  # [C, R]
    e: jax.Array  # [C, r]
    u: jax.Array  # [C, m, r]
    z: jax.Array  # [C, r, T]
    colmean: jax.Array  # [C, m] Σ_i k(x_i, x_g) / m over the training rows, per distinct mask


def _pair_loo(spec: KernelSpec, groups: DuplicateGroups, yc_u: jax.Array, rows_yc: jax.Array,
              scale: jax.Array, grid: _DirectGrid, linear_scale: jax.Array,
              want_rho: bool) -> _PairLoo:
    """Closed-form leave-one-distinct-mask-out criteria over the whole grid (vmapped pairs).

    ``yc_u [m, T]``: centred mean label per distinct mask; ``rows_yc [m, T]``: the centred
    labels of the rows in the canonical order (for the rank criterion)."""
    m, t = yc_u.shape
    num_r = grid.ridge.shape[0]
    num_w = grid.mix.shape[0]
    mf = jnp.sum(groups.counts)

    def per_pair(g, w, g_ok):
        kmat = surrogate_gram(spec, groups.masks, groups.masks, g, w, linear_scale)
        gl = grouped_loo(intercept_free_gram(spec, groups.masks, g, w, linear_scale), groups,
                         yc_u, grid.ridge, spec.fit_intercept)
        resid, kappa, e, u, z = gl.resid, gl.kappa, gl.e, gl.u, gl.z
        valid = gl.valid & grid.ridge_ok & g_ok  # [R]; invalid hyperparameters: never chosen

        def crit(r):
            sq = jnp.einsum("g,Rgt->Rt", groups.counts, r * r) + groups.within[None, :]
            return sq / mf / scale[None, :]  # [R, T]

        cv = crit(resid)
        err = jnp.maximum(jnp.abs(crit(gl.resid_hi) - cv), jnp.abs(crit(gl.resid_lo) - cv))
        err = err + float(np.sqrt(jnp.finfo(cv.dtype).eps)) * cv  # reductions over rows
        cv = jnp.where(valid[:, None] & jnp.isfinite(cv), cv, jnp.inf)
        if want_rho:
            loo_pred = yc_u[None, :, :] - resid  # [R, m, T] per distinct mask
            flat = jnp.transpose(loo_pred[:, groups.group], (1, 0, 2)).reshape(m, num_r * t)
            ys_flat = jnp.tile(rows_yc, (1, num_r))
            rho = column_spearman(flat, ys_flat).reshape(num_r, t)
            rho = jnp.where(valid[:, None] & jnp.isfinite(cv), rho, jnp.nan)
        else:
            rho = jnp.full((num_r, t), jnp.nan, yc_u.dtype)
        colmean = (kmat @ groups.counts) / mf  # [m]
        return cv, rho, jnp.where(jnp.isfinite(cv), err, 0.0), kappa, valid, e, u, z, colmean

    gg = jnp.repeat(grid.gamma, num_w)  # [C] pairs in (gamma, mix) order
    ww = jnp.tile(grid.mix, grid.gamma.shape[0])
    gg_ok = jnp.repeat(grid.gamma_ok, num_w)
    return _PairLoo(*jax.vmap(per_pair)(gg, ww, gg_ok))


def _choose_point(loo: _PairLoo, grid: _DirectGrid, select: str, per_target: bool):
    """``(pair index [T], ridge index [T], tied [T])`` by the LOO criterion and the tie rule."""
    num_c, num_r, t = loo.cv.shape
    num_w = grid.mix.shape[0]
    if select == "loo_spearman":
        # maximise the correlation; undefined (constant / singular) counts as worst
        loss = jnp.where(jnp.isnan(loo.rho), jnp.inf, -loo.rho)
        # a relative error of the residuals moves the rank correlation by about as much
        rel = loo.err / jnp.where(jnp.isfinite(loo.cv) & (loo.cv > 0), loo.cv, 1.0)
        tol = rel
        if not per_target:
            ok = ~jnp.isnan(loo.rho)
            cnt = jnp.sum(ok, axis=2)
            mean_rho = jnp.sum(jnp.where(ok, loo.rho, 0.0), axis=2) / jnp.maximum(cnt, 1)
            loss = jnp.where(cnt > 0, -mean_rho, jnp.inf)[:, :, None]
            tol = jnp.max(rel, axis=2, keepdims=True)
    else:
        tol = loo.err
        loss = loo.cv
        if not per_target:
            loss = jnp.mean(loo.cv, axis=2, keepdims=True)
            tol = jnp.mean(tol, axis=2, keepdims=True)
    cols = loss.shape[2]
    gg = jnp.repeat(grid.gamma, num_w)
    ww = jnp.tile(grid.mix, grid.gamma.shape[0])
    best, tied = _select_with_ties(
        loss.reshape(num_c * num_r, cols), jnp.repeat(gg, num_r), jnp.tile(grid.ridge, num_c),
        jnp.repeat(ww, num_r), tol.reshape(num_c * num_r, cols))
    best, tied = jnp.broadcast_to(best, (t,)), jnp.broadcast_to(tied, (t,))
    return best // num_r, best % num_r, tied


def _fit_direct(masks, y, spec: KernelSpec, grid: _DirectGrid, *, select, per_target, throw):
    """The eigendecomposition path of :func:`fit_kernel` on validated, gathered inputs."""
    dtype = y.dtype
    m, t = y.shape
    groups = group_duplicates(masks, y)
    linear_scale = mask_linear_scale(spec.kernel, masks)
    mf = jnp.sum(groups.counts)
    y_mean = jnp.einsum("g,gt->t", groups.counts, groups.y_mean) / mf
    yc_u = groups.y_mean - y_mean[None, :] if spec.fit_intercept else groups.y_mean
    yc_u = jnp.where(groups.counts[:, None] > 0, yc_u, 0.0)
    scale = (jnp.einsum("g,gt->t", groups.counts, yc_u * yc_u) + groups.within) / mf
    scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    rows_yc = y[groups.order] - y_mean[None, :] if spec.fit_intercept else y[groups.order]
    loo = _pair_loo(spec, groups, yc_u, rows_yc, scale, grid, linear_scale,
                    select == "loo_spearman")
    c_idx, r_idx, tied = _choose_point(loo, grid, select, per_target)
    num_c, num_r = loo.valid.shape
    num_w = grid.mix.shape[0]
    gg = jnp.repeat(grid.gamma, num_w)
    ww = jnp.tile(grid.mix, grid.gamma.shape[0])
    ridge_t = grid.ridge[r_idx]
    chosen_ok = loo.valid[c_idx, r_idx]  # [T]
    hyper_ok = jnp.repeat(grid.gamma_ok, num_w)[c_idx] & grid.ridge_ok[r_idx]  # [T]
    if throw:
        hyper_ok = _checks.error_if(
            hyper_ok,
            hyper_ok & ~chosen_ok,
            "`ridge` too small: the kernel matrix is singular at the chosen (gamma, mix, ridge) "
            "for {count} target(s) (e.g. ridge=0 with duplicated masks or a low-rank kernel); "
            "pass ridge > 0 or a ridge grid.",
        )
    onehot = jnp.arange(num_c)[:, None] == c_idx[None, :]  # [C, T]
    denom = loo.e[:, :, None] + ridge_t[None, None, :]  # [C, r, T]
    w = jnp.where(onehot[:, None, :], loo.z / jnp.where(onehot[:, None, :], denom, 1.0), 0.0)
    beta = jnp.einsum("gir,grt->it", loo.u, w)  # [m, T] transformed, per distinct mask
    d = jnp.sqrt(groups.counts)
    alpha_u = d[:, None] * beta  # dual coefficient of each distinct mask (all its copies)
    if spec.fit_intercept:
        intercept = y_mean - jnp.einsum("gi,gt,it->t", loo.colmean, onehot.astype(dtype), alpha_u)
    else:
        intercept = jnp.zeros((t,), dtype)
    # copies of a mask share its coefficient equally. (The m-row solution adds
    # (y_i - mean label of the mask) / ridge to each copy; those terms sum to 0 over the copies,
    # so predictions, attributions and the posterior are the same, and leaving them out keeps
    # the float32 sums free of their cancellation at small ridges.)
    per_row = (alpha_u / jnp.maximum(groups.counts, 1.0)[:, None])[groups.group]
    alpha = per_row[jnp.argsort(groups.order)]  # back to the input row order
    alpha = jnp.where(hyper_ok[None, :], alpha, jnp.nan)
    intercept = jnp.where(hyper_ok, intercept, jnp.nan)
    status = (jnp.where(tied, STATUS_TIE, 0)
              | jnp.where(ill_conditioned(loo.kappa[c_idx, r_idx], dtype), STATUS_ILL_CONDITIONED, 0)
              | jnp.where(chosen_ok & hyper_ok, 0, STATUS_SINGULAR)).astype(jnp.int32)
    num_g = grid.gamma.shape[0]
    return KernelSurrogate(
        masks=masks,
        dual_coef=alpha,
        intercept=intercept,
        gamma=gg[c_idx],
        ridge=ridge_t,
        mix=ww[c_idx],
        gamma_grid=grid.gamma,
        mix_grid=grid.mix,
        ridge_grid=grid.ridge,
        linear_scale=linear_scale,
        cv_error=loo.cv.reshape(num_g, num_w, num_r, t),
        cv_spearman=loo.rho.reshape(num_g, num_w, num_r, t),
        spec=spec,
        status=status,
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
    >>> coef, rest = split_linear_part(fit_kernel_direct(masks, masks[:, 0], kernel_spec(), gamma=0.3, ridge=0.1))
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
