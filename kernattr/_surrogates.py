"""Surrogate models on subset masks: linear (datamodels) and kernel ridge regression.

A surrogate ``g(s) ≈ F(s)`` maps a 0/1 task mask ``s`` (``[K]``) to ``T`` target values.

* :func:`fit_linear` — least squares ``g(s) = intercept + sᵀ coef`` (optionally ridge-penalised,
  intercept never penalised).
* :func:`fit_kernel` — kernel ridge regression ``g(s) = intercept + Σ_i α_i k(s, s_i)`` with an
  RBF (``exp(-γ·Hamming)``), polynomial or linear kernel on masks. Bandwidth ``gamma`` and ridge
  accept 1-D grids; the pair is then chosen by *exact closed-form leave-one-out CV*: one
  eigendecomposition per bandwidth (vmapped over the grid) gives the LOO error of every ridge
  value at once.
* :func:`predict` — ``[m', T]`` predictions of either surrogate.

Shapes: ``m`` masks, ``K`` tasks, ``T`` targets, ``G`` bandwidths, ``R`` ridge values.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _checks

__all__ = [
    "KernelSpec",
    "KernelSurrogate",
    "LinearSurrogate",
    "default_gamma_grid",
    "default_ridge_grid",
    "fit_kernel",
    "fit_linear",
    "kernel_matrix",
    "predict",
    "select_grid_point",
]

KERNELS = ("rbf", "polynomial", "linear")


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
      kernel: ``"rbf"``, ``"polynomial"`` or ``"linear"``.
      degree: polynomial degree (polynomial kernel only).
      coef0: polynomial offset (polynomial kernel only).
      shared_gamma: True when every target uses the same bandwidth (``gamma[0]``), so one kernel
        matrix serves all targets; False after per-target selection over a bandwidth grid.
      fit_intercept: whether an unpenalised intercept was fitted.
    """

    kernel: str = "rbf"
    degree: int = 2
    coef0: float = 1.0
    shared_gamma: bool = True
    fit_intercept: bool = True


class KernelSurrogate(NamedTuple):
    """Kernel ridge surrogate ``g(s) = intercept + Σ_i dual_coef[i] · k_γ(s, masks[i])``.

    Attributes:
      masks: ``[m, K]`` training masks (the kernel centres).
      dual_coef: ``[m, T]`` dual coefficients ``α``.
      intercept: ``[T]`` unpenalised intercept (0 when ``fit_intercept=False``).
      gamma: ``[T]`` bandwidth used for each target (all equal unless selected per target).
      ridge: ``[T]`` ridge used for each target.
      gamma_grid: ``[G]`` bandwidth grid searched (``[1]`` for a scalar).
      ridge_grid: ``[R]`` ridge grid searched (``[1]`` for a scalar).
      cv_error: ``[G, R, T]`` exact leave-one-out mean squared error divided by the variance of
        each target's labels (``inf`` where the regularised kernel matrix is singular).
      spec: static :class:`KernelSpec` (kernel name, degree, coef0, ...; no array leaves).
    """

    masks: jax.Array
    dual_coef: jax.Array
    intercept: jax.Array
    gamma: jax.Array
    ridge: jax.Array
    gamma_grid: jax.Array
    ridge_grid: jax.Array
    cv_error: jax.Array
    spec: KernelSpec


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


def _gram(kernel: str, degree: int, coef0: float, a: jax.Array, b: jax.Array, gamma) -> jax.Array:
    """Kernel matrix ``[m_a, m_b]`` between 0/1 masks ``a [m_a, K]`` and ``b [m_b, K]``."""
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


def kernel_matrix(
    a: jax.Array,
    b: jax.Array,
    *,
    kernel: str = "rbf",
    gamma: float | jax.Array = 1.0,
    degree: int = 2,
    coef0: float = 1.0,
) -> jax.Array:
    """Kernel matrix between two sets of masks.

    ``rbf``: ``exp(-gamma·||a-b||²)`` (= ``exp(-gamma·Hamming)`` on 0/1 masks, matching
    scikit-learn's ``rbf_kernel``); ``polynomial``: ``(gamma·<a,b> + coef0)^degree``; ``linear``:
    ``<a,b>`` (``gamma`` ignored).

    Args:
      a: ``[m_a, K]`` 0/1 masks.
      b: ``[m_b, K]`` 0/1 masks.
      kernel: kernel name.
      gamma: scalar bandwidth / scale.
      degree: polynomial degree.
      coef0: polynomial offset.

    Returns:
      ``[m_a, m_b]`` kernel matrix.

    >>> import jax.numpy as jnp
    >>> kernel_matrix(jnp.eye(2), jnp.ones((1, 2)), gamma=1.0).shape
    (2, 1)
    """
    _check_kernel_config(kernel, degree, coef0)
    a = _checks.check_masks(a, "a")
    b = _checks.check_masks(b, "b", num_tasks=a.shape[1])
    return _gram(kernel, degree, coef0, a, b, gamma)


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
        return jnp.linalg.eigh(kmat)
    m = kmat.shape[0]
    v, c = _householder_complement(m, kmat.dtype)
    kv = kmat @ v
    vkv = v @ kv
    hkh = (
        kmat
        - (2.0 / c) * (v[:, None] * kv[None, :] + kv[:, None] * v[None, :])
        + (4.0 * vkv / (c * c)) * (v[:, None] * v[None, :])
    )
    e, w = jnp.linalg.eigh(hkh[1:, 1:])
    w_pad = jnp.concatenate([jnp.zeros((1, m - 1), w.dtype), w], axis=0)
    u = w_pad - (2.0 / c) * v[:, None] * (v @ w_pad)[None, :]
    return e, u


def select_grid_point(cv: jax.Array, gamma: jax.Array, ridge: jax.Array) -> jax.Array:
    """Index of the best grid point per column, with deterministic tie-breaking.

    Grid points whose CV error is within a relative ``sqrt(eps)`` of the column's minimum are
    ties (float32 rounding differs between eager and jitted runs, so an exact ``argmin`` could
    pick differently); among ties the largest ridge wins, then the smallest gamma (the smoothest
    model), then the lowest index.

    Args:
      cv: ``[P, T]`` CV errors of ``P`` grid points (``inf`` where invalid).
      gamma: ``[P]`` bandwidth of each grid point.
      ridge: ``[P]`` ridge of each grid point.

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
    return jnp.argmax(cand, axis=0)


def fit_kernel(
    masks: jax.Array,
    y: jax.Array,
    *,
    kernel: str = "rbf",
    gamma: float | jax.Array | None = None,
    ridge: float | jax.Array | None = None,
    degree: int = 2,
    coef0: float = 1.0,
    per_target: bool = False,
    fit_intercept: bool = True,
    throw: bool = True,
) -> KernelSurrogate:
    """Kernel ridge regression on masks, with closed-form leave-one-out selection of gamma/ridge.

    Model: ``g(s) = b + Σ_i α_i k_γ(s, s_i)`` minimising
    ``||y - b·1 - Kα||² + ridge·αᵀKα`` (``b`` unpenalised; ``b = 0`` with
    ``fit_intercept=False``, which is exactly scikit-learn's ``KernelRidge(alpha=ridge)``).

    Kernels (on 0/1 masks): ``"rbf"`` ``exp(-γ·||s-s'||²) = exp(-γ·Hamming(s, s'))`` = a product
    over tasks (what makes exact Shapley values possible); ``"polynomial"``
    ``(γ<s,s'> + coef0)^degree``; ``"linear"`` ``<s,s'>`` (``gamma`` ignored).

    Selection: for each bandwidth one symmetric eigendecomposition ``K = U diag(e) Uᵀ``
    (restricted to ``1^⊥`` with an intercept) gives, for every ridge ``λ`` at once,
    ``α = U diag(1/(e+λ)) Uᵀ y`` and the exact leave-one-out residual
    ``r_i = α_i / Σ_j U_ij²/(e_j+λ)`` (``= α_i / [(K+λI)^{-1}]_ii`` without intercept). With an
    intercept this is the exact LOO residual of refitting *both* ``α`` and ``b`` without row
    ``i`` (the model is penalised least squares in a fixed feature space with an unpenalised
    constant column, for which ``r_i = (y_i - ŷ_i)/(1 - H_ii)`` holds exactly). The grid is
    vmapped over bandwidths. ``cv_error[g, r, t]`` is the LOO mean squared error divided by the
    variance of target ``t``; the chosen pair minimises it per target (``per_target=True``) or
    averaged over targets (default). Near-ties (within a relative ``sqrt(eps)`` of the minimum)
    go to the largest ridge, then the smallest gamma, so eager and jitted runs agree
    (:func:`select_grid_point`).

    Args:
      masks: ``[m, K]`` 0/1 training masks.
      y: ``[m]`` or ``[m, T]`` labels (1-D is ``T = 1``; predictions are always ``[m', T]``).
      kernel: ``"rbf"`` (default), ``"polynomial"`` or ``"linear"``.
      gamma: ``> 0`` scalar or 1-D grid ``[G]``. Default :func:`default_gamma_grid` (``c/K``).
      ridge: ``>= 0`` scalar or 1-D grid ``[R]``. Default :func:`default_ridge_grid`
        (``1e-4 .. 1e4``). ``0`` is allowed only where the kernel matrix is non-singular.
      degree: polynomial degree (static int).
      coef0: polynomial offset (static float, ``>= 0``).
      per_target: select ``(gamma, ridge)`` separately for each target.
      fit_intercept: fit an unpenalised intercept (default True).
      throw: raise ``ValueError`` (eagerly, or from the compiled program under ``jit``) when the
        chosen ``kernel + ridge·I`` is numerically singular: ``ridge = 0`` with smallest kernel
        eigenvalue ``<= m·eps·max eigenvalue`` (e.g. duplicated masks, or a low-rank
        polynomial/linear kernel), or ``0 < ridge <= eps·max eigenvalue``. (Computed negative
        eigenvalues of the PSD kernel are rounding noise and are clamped to 0.) With
        ``throw=False`` singular grid points still get ``cv_error = inf`` and are never
        chosen unless all are; the returned coefficients may then be non-finite.
        The same switch covers traced hyperparameters: a negative, NaN or inf ``gamma`` or
        ``ridge`` raises from the compiled program (a concrete one raises at once); with
        ``throw=False`` such grid points get ``cv_error = inf`` and, if nothing valid is left,
        ``dual_coef`` and ``intercept`` are NaN.

    Returns:
      :class:`KernelSurrogate`.

    >>> import jax, jax.numpy as jnp
    >>> masks = jax.random.bernoulli(jax.random.key(0), 0.5, (64, 6)).astype(jnp.float32)
    >>> y = masks[:, 0] * masks[:, 1] - masks[:, 2]
    >>> s = fit_kernel(masks, y, gamma=jnp.array([0.1, 0.3]), ridge=jnp.array([1e-2, 1.0]))
    >>> s.dual_coef.shape, s.cv_error.shape
    ((64, 1), (2, 2, 1))
    """
    _check_kernel_config(kernel, degree, coef0)
    masks = _checks.check_masks(masks)
    y, _ = _checks.check_labels(y, masks.shape[0])
    dtype = jnp.result_type(masks.dtype, y.dtype)
    masks = masks.astype(dtype)
    y = y.astype(dtype)
    m, k = masks.shape
    t = y.shape[1]
    if fit_intercept and m < 2:
        raise ValueError("`masks` needs at least 2 rows to fit a kernel surrogate with an intercept.")
    if kernel == "linear" and gamma is None:
        gamma = 1.0
    gamma = default_gamma_grid(k, kernel) if gamma is None else gamma
    ridge = default_ridge_grid() if ridge is None else ridge
    gamma_grid = _checks.check_grid(gamma, "gamma").astype(dtype)
    ridge_grid = _checks.check_grid(ridge, "ridge").astype(dtype)
    gamma_ok = jnp.reshape(_checks.check_hyperparameter(gamma, "gamma", throw=throw), (-1,))
    ridge_ok = jnp.reshape(
        _checks.check_hyperparameter(ridge, "ridge", allow_zero=True, throw=throw), (-1,)
    )
    num_g = gamma_grid.shape[0]
    shared_gamma = (not per_target) or num_g == 1
    spec = KernelSpec(
        kernel=kernel,
        degree=int(degree),
        coef0=float(coef0),
        shared_gamma=shared_gamma,
        fit_intercept=bool(fit_intercept),
    )

    y_mean = jnp.mean(y, axis=0)
    yc = y - y_mean[None, :] if fit_intercept else y
    scale = jnp.mean(yc * yc, axis=0)
    scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    eps = jnp.finfo(dtype).eps

    def per_gamma(g, g_ok):
        kmat = _gram(kernel, degree, coef0, masks, masks, g)
        e, u = _restricted_eigh(kmat, fit_intercept)
        # The kernel is PSD: computed negative eigenvalues are rounding noise (|err| ~ eps·||K||).
        e_max = jnp.max(jnp.abs(e))
        e = jnp.maximum(e, 0.0)
        # ridge > 0: K + λI is PD by construction; flagged only if λ drowns in rounding.
        # ridge = 0: the kernel itself must be numerically non-singular (rank tolerance m·eps).
        tol = jnp.where(ridge_grid > 0, 1.0, float(m)) * eps * e_max  # [R]
        nonsingular = jnp.min(e) + ridge_grid > tol  # [R]
        valid = nonsingular & ridge_ok & g_ok  # [R]; invalid hyperparameters: never chosen
        z = u.T @ yc  # [r, T]
        inv = 1.0 / (e[None, :] + ridge_grid[:, None])  # [R, r]
        inv = jnp.where(valid[:, None], inv, 0.0)
        alphas = jnp.einsum("ir,Rr,rt->Rit", u, inv, z)  # [R, m, T]
        diag = (u * u) @ inv.T  # [m, R]
        diag = jnp.where(valid[None, :], diag, 1.0)
        resid = alphas / diag.T[:, :, None]
        cv = jnp.mean(resid * resid, axis=1) / scale[None, :]  # [R, T]
        cv = jnp.where(valid[:, None] & jnp.isfinite(cv), cv, jnp.inf)
        colmean = jnp.mean(kmat, axis=0)  # [m]
        return cv, e, u, z, valid, colmean

    cv, es, us, zs, valids, colmeans = jax.vmap(per_gamma)(gamma_grid, gamma_ok)
    num_r = ridge_grid.shape[0]
    gam_flat = jnp.repeat(gamma_grid, num_r)  # [G*R], index g*R + r
    rid_flat = jnp.tile(ridge_grid, num_g)
    if per_target:
        best = select_grid_point(cv.reshape(num_g * num_r, t), gam_flat, rid_flat)  # [T]
    else:
        score = jnp.mean(cv, axis=2).reshape(-1, 1)
        best = jnp.broadcast_to(select_grid_point(score, gam_flat, rid_flat), (t,))
    g_idx = best // num_r
    r_idx = best % num_r
    gamma_t = gamma_grid[g_idx]
    ridge_t = ridge_grid[r_idx]
    chosen_ok = valids[g_idx, r_idx]  # [T]
    hyper_ok = gamma_ok[g_idx] & ridge_ok[r_idx]  # [T]
    if throw:
        _checks.error_if(
            masks,
            hyper_ok & ~chosen_ok,
            "`ridge` too small: the kernel matrix is singular at the chosen (gamma, ridge) for "
            "{count} target(s) (e.g. ridge=0 with duplicated masks or a low-rank kernel); pass "
            "ridge > 0 or a ridge grid.",
        )
    onehot = jnp.arange(num_g)[:, None] == g_idx[None, :]  # [G, T]
    denom = es[:, :, None] + ridge_t[None, None, :]  # [G, r, T]
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
        gamma_grid=gamma_grid,
        ridge_grid=ridge_grid,
        cv_error=cv,
        spec=spec,
    )


# --------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------
def _predict_kernel(s: KernelSurrogate, masks: jax.Array) -> jax.Array:
    spec = s.spec
    if spec.shared_gamma:
        kmat = _gram(spec.kernel, spec.degree, spec.coef0, masks, s.masks, s.gamma[0])
        return kmat @ s.dual_coef + s.intercept[None, :]

    def one_target(args):
        g, a = args
        return _gram(spec.kernel, spec.degree, spec.coef0, masks, s.masks, g) @ a

    cols = jax.lax.map(one_target, (s.gamma, s.dual_coef.T), batch_size=8)  # [T, m']
    return cols.T + s.intercept[None, :]


def predict(surrogate: LinearSurrogate | KernelSurrogate, masks: jax.Array) -> jax.Array:
    """Surrogate predictions at new masks.

    Args:
      surrogate: a :class:`LinearSurrogate` or :class:`KernelSurrogate`.
      masks: ``[m', K]`` 0/1 masks (``K`` must match the surrogate).

    Returns:
      ``[m', T]`` predictions (``T = 1`` when the surrogate was fitted on 1-D labels).

    >>> import jax.numpy as jnp
    >>> s = LinearSurrogate(coef=jnp.array([[1.0], [2.0]]), intercept=jnp.array([0.5]))
    >>> predict(s, jnp.array([[1.0, 1.0], [0.0, 1.0]])).tolist()
    [[3.5], [2.5]]
    """
    if isinstance(surrogate, LinearSurrogate):
        masks = _checks.check_masks(masks, num_tasks=surrogate.coef.shape[0])
        masks = masks.astype(jnp.result_type(masks.dtype, surrogate.coef.dtype))
        return masks @ surrogate.coef + surrogate.intercept[None, :]
    if isinstance(surrogate, KernelSurrogate):
        masks = _checks.check_masks(masks, num_tasks=surrogate.masks.shape[1])
        masks = masks.astype(jnp.result_type(masks.dtype, surrogate.dual_coef.dtype))
        return _predict_kernel(surrogate, masks)
    raise TypeError(
        f"`surrogate` must be a LinearSurrogate or KernelSurrogate, got {type(surrogate).__name__}."
    )
