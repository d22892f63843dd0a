"""The public entry points over every surrogate solver: ``fit_kernel`` and ``predict``.

:func:`fit_kernel` chooses the algorithm from its arguments: the exact eigendecomposition
(:func:`._krr.fit_kernel_direct`), Nyström features (:func:`._nystrom.fit_nystrom`), the
Nyström-preconditioned CG solve (:func:`._cg.fit_kernel_cg`) or the Walsh expansion
(:func:`._quadratic.fit_kernel_walsh`). :func:`predict` evaluates any registered surrogate type (:mod:`._registry`). Both sit
above the solvers, which never import this module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .. import _checks
from ._cg import kernel_cg
from ._krr import (
    KernelSurrogate,
    LinearSurrogate,
    MultiFidelitySurrogate,
    check_select,
    fit_kernel_direct,
    kernel_spec,
)
from ._nystrom import NystromSurrogate, nystrom
from ._quadratic import QuadraticSurrogate, fit_kernel_walsh
from ._registry import surrogate_ops

__all__ = ["fit_kernel", "predict"]


def fit_kernel(
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
    num_landmarks: int | None = None,
    key: jax.Array | None = None,
    solver: str = "direct",
) -> KernelSurrogate | NystromSurrogate | QuadraticSurrogate:
    """Kernel ridge regression on masks, with closed-form leave-one-out selection of its settings.

    Model: ``g(s) = b + Σ_i α_i k(s, s_i)`` minimising
    ``||y - b·1 - Kα||² + ridge·αᵀKα`` (``b`` unpenalised; ``b = 0`` with
    ``fit_intercept=False``, which is exactly scikit-learn's ``KernelRidge(alpha=ridge)``).

    Kernels (on 0/1 masks):

    * ``"linear+rbf"`` (default): ``mix·<s,s'>/c + (1-mix)·exp(-γ·Hamming(s, s'))`` with ``c``
      the mean number of tasks per training mask (both parts then have unit mean diagonal).
      ``mix = 1`` is ridge regression on the masks — the linear surrogate (datamodels) with
      penalty ``ridge·c·||coef||²`` — and ``mix = 0`` the RBF kernel, so the LOO-CV choice
      over the default ``mix`` grid contains both: on additive data it picks (nearly) the
      linear model, with interactions it adds an RBF part. This is the kernel to use unless you
      know the labels are strongly non-additive.
    * ``"rbf"``: ``exp(-γ·||s-s'||²) = exp(-γ·Hamming(s, s'))``, a product over tasks (what makes
      exact Shapley values possible).
    * ``"polynomial"``: ``(γ<s,s'> + coef0)^degree``; ``"linear"``: ``<s,s'>`` (``gamma``
      ignored).

    Selection: for each ``(gamma, mix)`` pair one symmetric eigendecomposition
    ``K = U diag(e) Uᵀ`` (restricted to ``1^⊥`` with an intercept) gives, for every ridge ``λ``
    at once, ``α = U diag(1/(e+λ)) Uᵀ y`` and the exact leave-one-out residual
    ``r_i = α_i / Σ_j U_ij²/(e_j+λ)`` (``= α_i / [(K+λI)^{-1}]_ii`` without intercept). With an
    intercept this is the exact LOO residual of refitting *both* ``α`` and ``b`` without row
    ``i`` (the model is penalised least squares in a fixed feature space with an unpenalised
    constant column, for which ``r_i = (y_i - ŷ_i)/(1 - H_ii)`` holds exactly). The grid is
    vmapped over the ``(gamma, mix)`` pairs. Criteria (``select``):

    * ``"mse"`` (default): ``cv_error[g, w, r, t]``, the LOO mean squared error divided by the
      variance of target ``t``; minimised averaged over targets, or per target.
    * ``"loo_spearman"``: ``cv_spearman[g, w, r, t]``, the Spearman correlation between the LOO
      predictions ``y_i - r_i`` and ``y_i`` — the held-out rank metric (LDS) estimated on the
      training masks; maximised averaged over the targets with a defined correlation, or per
      target. It costs a rank computation per grid point and target; use it when only ranks
      matter and many masks are available (it is noisier than ``"mse"`` at small ``m``).

    ``per_target=True`` chooses the grid point separately for every target (with either
    criterion); otherwise one point serves all targets (one kernel matrix at prediction time).

    Repeated masks are repeated measurements of one mask: the rows are first collapsed into one
    weighted row per distinct mask (its count and mean label; the fitted model is the same as
    on the duplicated rows), and "leave-one-out" leaves out a distinct mask with all its
    copies (leaving out one copy while the others stay would make every model look perfect).
    Without duplicates this is the ordinary leave-one-out. The collapse sorts the masks, so
    the criterion does not depend on the order of the rows. Grid points whose criteria differ
    by less than their numerical error (the change when every eigenvalue moves by its rounding
    bound, and at least a relative ``sqrt(eps)``) are ties, which go to the largest ridge, then
    the smallest gamma, then the largest mix, so eager, jitted and permuted runs agree
    (:func:`select_grid_point`); ``KernelSurrogate.status`` records when the tie rule, not
    the data, decided (bit 1), and when the chosen ``kernel + ridge·I`` is ill-conditioned for
    the dtype (bit 2). In float32 the smallest ridges of the default grid are often
    ill-conditioned: predictions and attributions then carry rounding error that float64 (or a
    grid starting at a larger ridge) removes. (The Nyström, CG and Walsh paths use the
    ``sqrt(eps)`` tie rule on their own leave-one-row-out criteria.)

    Args:
      masks: ``[m, K]`` 0/1 training masks.
      y: ``[m]`` or ``[m, T]`` labels (1-D is ``T = 1``; predictions are always ``[m', T]``).
      kernel: ``"linear+rbf"`` (default), ``"rbf"``, ``"polynomial"`` or ``"linear"``.
      gamma: ``> 0`` scalar or 1-D grid ``[G]``. Default :func:`default_gamma_grid` (``c/K``).
      ridge: ``>= 0`` scalar or 1-D grid ``[R]``. Default :func:`default_ridge_grid`
        (``1e-4 .. 1e4``). ``0`` is allowed only where the kernel matrix is non-singular.
      mix: ``"linear+rbf"`` only: scalar or 1-D grid ``[W]`` in ``[0, 1]``, the share of the
        linear kernel. Default :func:`default_mix_grid` (``0, 0.5, 0.9, 0.99, 1``).
      degree: polynomial degree (static int).
      coef0: polynomial offset (static float, ``>= 0``).
      select: ``"mse"`` or ``"loo_spearman"`` (static), the LOO criterion.
      per_target: select the grid point separately for each target.
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
      num_landmarks: large ``m``: with ``L = num_landmarks`` (and ``key``) the Nyström path
        :func:`kernattr.fit_nystrom` is taken (``O(m L²)`` time, memory independent of ``m``,
        masks may be sharded; selection by closed-form LOO in the Nyström feature space) and a
        :class:`~kernattr.NystromSurrogate` is returned, which ``predict`` and every
        attribution accept.
      key: typed PRNG key drawing the landmarks (required with ``num_landmarks``).
      solver: ``"direct"`` (default; eigendecomposition, or Nyström with ``num_landmarks``) or
        ``"cg"``: the exact model on all ``m`` masks solved by Nyström-preconditioned
        matrix-free CG at the pair chosen by the Nyström LOO (:func:`kernattr.fit_kernel_cg`;
        needs ``num_landmarks`` and ``key``), or ``"walsh"``: many masks, ``K <= 200``, kernels
        ``"linear+rbf"``, ``"rbf"``, ``"linear"``. On masks every one of them is a sum over
        Walsh functions ``χ_S(s) χ_S(s')`` (``χ = 2s - 1``) with weights falling by degree
        ``|S|``; the degree <= 2 part (``K(K+1)/2`` functions: every task and every pair) is
        kept exactly and the degrees >= 3 by their diagonal value, added to the ridge (between
        distinct masks that part is a mean-zero sum over ``>= C(K, 3)`` functions, small
        against its diagonal at the default bandwidths). The system is then solved in feature
        space: two passes over the masks and one ``d x d`` eigendecomposition per
        ``(gamma, mix)`` pair, exact LOO selection over the same grid, cost linear in ``m``.
        Exact for ``K <= 2``; returns a
        :class:`~kernattr.QuadraticSurrogate` (with ``gamma``, ``mix``, ``ridge`` set), whose
        attributions are exact for the fitted model. The large-``m`` paths select one grid
        point for all targets with ``select="mse"`` and an intercept.

    Returns:
      :class:`KernelSurrogate` (:class:`~kernattr.NystromSurrogate` with ``num_landmarks`` and
      the direct solver; :class:`~kernattr.QuadraticSurrogate` with ``solver="walsh"``).

    >>> import jax, jax.numpy as jnp
    >>> masks = jax.random.bernoulli(jax.random.key(0), 0.5, (64, 6)).astype(jnp.float32)
    >>> y = masks[:, 0] * masks[:, 1] - masks[:, 2]
    >>> s = fit_kernel(masks, y, gamma=jnp.array([0.1, 0.3]), ridge=jnp.array([1e-2, 1.0]))
    >>> s.dual_coef.shape, s.cv_error.shape  # [m, T], [G, W, R, T]
    ((64, 1), (2, 5, 2, 1))
    >>> w = fit_kernel(masks, y, gamma=jnp.array([0.1, 0.3]), ridge=jnp.array([1e-2, 1.0]), solver="walsh")
    >>> w.cv_error.shape, w.pairwise.shape  # same grid; the pairwise coefficients [K, K, T]
    ((2, 5, 2, 1), (6, 6, 1))
    """
    spec = kernel_spec(kernel, degree, coef0, fit_intercept=fit_intercept)
    check_select(select)
    if solver not in ("direct", "cg", "walsh"):
        raise ValueError(f"`solver` must be 'direct', 'cg' or 'walsh', got {solver!r}.")
    grid = dict(gamma=gamma, ridge=ridge, mix=mix, throw=throw)
    if solver == "direct" and num_landmarks is None:
        return fit_kernel_direct(masks, y, spec, select=select, per_target=per_target, **grid)
    if select != "mse" or per_target or not fit_intercept:
        raise ValueError(
            f"with {_ROUTE[solver]} the selection is select='mse', one grid point for all "
            "targets, with an intercept; drop select/per_target/fit_intercept.")
    if solver == "walsh":
        return _fit_walsh(masks, y, spec, num_landmarks=num_landmarks, **grid)
    return _fit_landmarks(masks, y, spec, num_landmarks=num_landmarks, key=key, solver=solver, **grid)


_ROUTE = {"direct": "`num_landmarks`", "cg": "solver='cg'", "walsh": "solver='walsh'"}


def _fit_landmarks(masks, y, spec, *, num_landmarks, key, solver, **grid):
    """The Nyström (``num_landmarks=``) and CG (``solver="cg"``) routes of :func:`fit_kernel`."""
    if num_landmarks is None or key is None:
        raise ValueError(
            "the Nyström and CG paths need `num_landmarks=L` and `key=jax.random.key(seed)` "
            "(the landmarks are drawn with the key)."
        )
    fit = kernel_cg if solver == "cg" else nystrom
    return fit(key, masks, y, spec, num_landmarks=num_landmarks, **grid)


def _fit_walsh(masks, y, spec, *, num_landmarks, **grid):
    """The ``solver="walsh"`` route of :func:`fit_kernel`."""
    if spec.kernel == "polynomial" or num_landmarks is not None:
        raise ValueError("solver='walsh' expands the 'linear+rbf', 'rbf' or 'linear' kernel in Walsh "
                         "functions; it takes no `num_landmarks` and no polynomial kernel.")
    return fit_kernel_walsh(masks, y, spec, **grid)


def predict(
    surrogate: LinearSurrogate | KernelSurrogate | MultiFidelitySurrogate, masks: jax.Array
) -> jax.Array:
    """Surrogate predictions at new masks.

    Args:
      surrogate: a :class:`LinearSurrogate`, :class:`KernelSurrogate`,
        :class:`~kernattr.NystromSurrogate`, :class:`~kernattr.QuadraticSurrogate` or
        :class:`MultiFidelitySurrogate`.
      masks: ``[m', K]`` 0/1 masks (``K`` must match the surrogate).

    Returns:
      ``[m', T]`` predictions (``T = 1`` when the surrogate was fitted on 1-D labels).

    >>> import jax.numpy as jnp
    >>> s = LinearSurrogate(coef=jnp.array([[1.0], [2.0]]), intercept=jnp.array([0.5]))
    >>> predict(s, jnp.array([[1.0, 1.0], [0.0, 1.0]])).tolist()
    [[3.5], [2.5]]
    """
    ops = surrogate_ops(surrogate)
    masks = _checks.check_masks(masks, num_tasks=ops.num_tasks(surrogate))
    masks = masks.astype(jnp.result_type(masks.dtype, ops.dtype(surrogate)))
    return ops.predict(surrogate, masks)
