"""Exact kernel ridge regression by Nyström-preconditioned conjugate gradients, matrix-free.

Solves ``(K + ridge·I) X = B`` for the full ``m x m`` kernel matrix ``K`` of the masks without
ever storing it: each product ``K V`` is computed in row blocks ``k(masks_block, masks) V``
(``O(block·m)`` memory). The preconditioner is the Nyström approximation
``P = Φ Φᵀ + ridge·I`` (``Φ = k(masks, Λ) K_ΛΛ^{-1/2}``, ``L`` landmarks drawn with ``key``),
applied by the Woodbury identity in ``O(m L)``; it clusters the spectrum of ``P⁻¹(K + ridge·I)``
near 1 when the kernel's spectrum decays fast (Frangella, Tropp & Udell, 2023).

Sharding: with the masks split on a mesh axis, every device holds its rows of ``X``, ``B`` and
``Φ``, computes its own kernel blocks against the gathered masks, and inner products are
``psum``'d; the iterates equal the single-device ones up to the order of sums.

:func:`fit_kernel_cg` is the exact kernel surrogate at scale: hyperparameters chosen by the
Nyström closed-form leave-one-out (:func:`kernattr.fit_nystrom`, same landmarks), then the exact
system (with its unpenalised intercept) solved by CG.

Shapes: ``m`` masks, ``K`` tasks, ``T`` targets, ``c`` right-hand sides, ``L`` landmarks.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from .. import _checks
from .._sharding import mask_mesh, replicate, shard_rows
from ._nystrom import draw_landmarks, features, nystrom, nystrom_map
from ._krr import KernelSpec, KernelSurrogate, kernel_spec, mask_linear_scale, surrogate_gram

__all__ = ["CGResult", "fit_kernel_cg", "kernel_cg", "kernel_cg_solve", "solve_kernel_cg"]


class CGResult(NamedTuple):
    """Result of :func:`solve_kernel_cg`.

    Attributes:
      solution: ``[m, c]`` the solution ``X``.
      num_iter: scalar int, CG iterations run.
      residual: ``[c]`` final relative residual ``||B - (K + ridge I) X|| / ||B||`` per column
        (as tracked by the recurrence).
      converged: scalar bool, every column reached ``tol``.
    """

    solution: jax.Array
    num_iter: jax.Array
    residual: jax.Array
    converged: jax.Array


def _default_tol(dtype) -> float:
    return 1e-8 if jnp.dtype(dtype) == jnp.float64 else 1e-4


def _pad_blocks(a: jax.Array, b: int) -> tuple[jax.Array, int]:
    n = a.shape[0]
    nb = -(-n // b)
    pad = nb * b - n
    if pad:
        a = jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)], axis=0)
    return a.reshape((nb, b) + a.shape[1:]), n


def _cg_local(spec, rows, rep, *, tol, max_iter, block_size, axis):
    """CG on this device's rows; collectives over ``axis`` (None: one device)."""
    masks, rhs = rows
    landmarks, fmap, kp, ridge = rep
    psum = (lambda v: jax.lax.psum(v, axis)) if axis is not None else (lambda v: v)
    gather = (lambda v: jax.lax.all_gather(v, axis, tiled=True)) if axis is not None else (lambda v: v)
    masks_all = gather(masks)
    m_all = masks_all.shape[0]
    b = max(1, min(block_size, masks.shape[0]))
    mblocks, n_loc = _pad_blocks(masks, b)

    def matvec(v):  # (K + ridge I) v on local rows
        v_all = gather(v)

        def one(mb):
            return surrogate_gram(spec, mb, masks_all, *kp) @ v_all

        kv = jax.lax.map(one, mblocks).reshape((-1, v.shape[1]))[:n_loc]
        return kv + ridge * v

    if fmap is None:
        precond = lambda v: v  # noqa: E731
    else:
        phi = features(spec, masks, landmarks, fmap, kp)  # [m_loc, r]
        inner = psum(phi.T @ phi) + ridge * jnp.eye(phi.shape[1], dtype=phi.dtype)
        chol = jnp.linalg.cholesky(inner)

        def precond(v):
            w = jax.scipy.linalg.cho_solve((chol, True), psum(phi.T @ v))
            return (v - phi @ w) / ridge

    def dot(a, c):
        return psum(jnp.sum(a * c, axis=0))

    bnorm = jnp.sqrt(dot(rhs, rhs))
    bnorm = jnp.where(bnorm > 0, bnorm, 1.0)
    x0 = jnp.zeros_like(rhs)
    r0 = rhs
    z0 = precond(r0)
    rz0 = dot(r0, z0)
    del m_all

    def cond(state):
        _, r, _, _, _, it = state
        res = jnp.sqrt(dot(r, r)) / bnorm
        return (it < max_iter) & jnp.any(res > tol)

    def body(state):
        x, r, z, p, rz, it = state
        ap = matvec(p)
        pap = dot(p, ap)
        a = jnp.where(pap > 0, rz / jnp.where(pap > 0, pap, 1.0), 0.0)
        x = x + a[None, :] * p
        r = r - a[None, :] * ap
        z = precond(r)
        rz_new = dot(r, z)
        beta = jnp.where(rz > 0, rz_new / jnp.where(rz > 0, rz, 1.0), 0.0)
        p = z + beta[None, :] * p
        return x, r, z, p, rz_new, it + 1

    it0 = jnp.zeros((), jnp.int32)
    x, r, _, _, _, it = jax.lax.while_loop(cond, body, (x0, r0, z0, z0, rz0, it0))
    res = jnp.sqrt(dot(r, r)) / bnorm
    return x, it, res


def solve_kernel_cg(
    key: jax.Array,
    masks: jax.Array,
    rhs: jax.Array,
    *,
    gamma: float | jax.Array,
    ridge: float | jax.Array,
    kernel: str = "rbf",
    mix: float | jax.Array = 0.0,
    degree: int = 2,
    coef0: float = 1.0,
    num_landmarks: int | None = 256,
    tol: float | None = None,
    max_iter: int = 500,
    block_size: int | None = None,
    mesh: Any = None,
    axis: str | None = None,
    throw: bool = True,
) -> CGResult:
    """Solve ``(K + ridge·I) X = rhs`` matrix-free with Nyström-preconditioned CG.

    Args:
      key: typed PRNG key (draws the preconditioner's landmarks).
      masks: ``[m, K]`` 0/1 masks defining ``K = k(masks, masks)`` (may be sharded on rows).
      rhs: ``[m]`` or ``[m, c]`` right-hand sides.
      gamma: scalar bandwidth ``> 0``.
      ridge: scalar ``> 0``.
      kernel: ``"rbf"`` (default), ``"linear+rbf"``, ``"polynomial"`` or ``"linear"``.
      mix: scalar share of the linear kernel (``"linear+rbf"`` only; its ``<s,s'>`` is divided
        by the mean number of tasks per mask, as in :func:`kernattr.fit_kernel`).
      degree: polynomial degree.
      coef0: polynomial offset.
      num_landmarks: landmarks of the preconditioner (``None``: no preconditioner).
      tol: relative residual to reach (default ``1e-4`` in float32, ``1e-8`` in float64).
      max_iter: iteration cap (Python int).
      block_size: kernel rows per block (default: about ``2**22 / m``).
      mesh: mesh whose ``axis`` splits the masks (default: read from the masks' sharding).
      axis: mesh axis name.
      throw: raise (eagerly or from the compiled program) when CG did not reach ``tol`` or the
        inputs are invalid (``gamma``/``ridge`` not finite and positive); with ``False`` read
        ``converged``.

    Returns:
      :class:`CGResult` (``solution`` ``[m, c]``; ``[m, 1]`` for 1-D ``rhs``).

    >>> import jax, jax.numpy as jnp, kernattr as ka
    >>> masks = ka.sample_subsets(jax.random.key(0), num_tasks=8, num_subsets=64, p=0.5)
    >>> res = solve_kernel_cg(jax.random.key(1), masks, jnp.ones(64), gamma=0.2, ridge=0.1, num_landmarks=16)
    >>> res.solution.shape, bool(res.converged)
    ((64, 1), True)
    """
    return kernel_cg_solve(key, masks, rhs, kernel_spec(kernel, degree, coef0), gamma=gamma,
                           ridge=ridge, mix=mix, num_landmarks=num_landmarks, tol=tol,
                           max_iter=max_iter, block_size=block_size, mesh=mesh, axis=axis,
                           throw=throw)


class _SolveSettings(NamedTuple):
    """Validated static settings of a CG solve."""

    num_landmarks: int | None
    tol: float
    max_iter: int
    block_size: int


def _solve_settings(m: int, dtype, num_landmarks, tol, max_iter, block_size) -> _SolveSettings:
    max_iter = _checks.check_count(max_iter, "max_iter")
    if num_landmarks is not None:
        num_landmarks = min(_checks.check_count(num_landmarks, "num_landmarks"), m)
    if block_size is None:
        block_size = max(1, (1 << 22) // m)
    block_size = _checks.check_count(block_size, "block_size")
    tol = _default_tol(dtype) if tol is None else float(tol)
    if not tol > 0:
        raise ValueError(f"`tol` must be > 0, got {tol}.")
    return _SolveSettings(num_landmarks, tol, max_iter, block_size)


def _scalar_hyperparameter(v, name: str, dtype) -> jax.Array:
    arr = _checks.as_float_array(v, name)
    if arr.ndim != 0:
        raise ValueError(f"`{name}` must be a scalar for the CG solve, got shape {tuple(arr.shape)}.")
    _checks.check_hyperparameter(arr, name)
    return jnp.asarray(v, dtype)


def kernel_cg_solve(key, masks, rhs, spec: KernelSpec, *, gamma, ridge, mix=0.0, num_landmarks=256,
                    tol=None, max_iter=500, block_size=None, mesh=None, axis=None,
                    throw=True) -> CGResult:
    """:func:`solve_kernel_cg` with its kernel settings already built into ``spec``."""
    _checks.check_key(key)
    masks = _checks.check_masks(masks)
    rhs, _ = _checks.check_labels(rhs, masks.shape[0], name="rhs")
    dtype = jnp.result_type(masks.dtype, rhs.dtype)
    masks, rhs = masks.astype(dtype), rhs.astype(dtype)
    opts = _solve_settings(masks.shape[0], dtype, num_landmarks, tol, max_iter, block_size)
    gamma = _scalar_hyperparameter(gamma, "gamma", dtype)
    ridge = _scalar_hyperparameter(ridge, "ridge", dtype)
    where = mask_mesh(masks, mesh, axis)
    kp = (gamma, jnp.asarray(mix, dtype), mask_linear_scale(spec.kernel, masks))
    if opts.num_landmarks is None:
        landmarks = fmap = None
    else:
        landmarks = draw_landmarks(key, masks, opts.num_landmarks, where)
        fmap = nystrom_map(spec, landmarks, kp)
    rep = (landmarks, fmap, kp, ridge)

    def local(rows, rep_):
        return _cg_local(spec, rows, rep_, tol=opts.tol, max_iter=opts.max_iter,
                         block_size=opts.block_size, axis=None if where is None else where[1])

    if where is None:
        x, it, res = local((masks, rhs), rep)
    else:
        mesh_, axis_ = where
        rep = replicate(rep, where)
        masks, rhs = shard_rows((masks, rhs), where)
        row = PartitionSpec(axis_)
        rep_specs = jax.tree_util.tree_map(lambda _: PartitionSpec(), rep)
        x, it, res = jax.shard_map(
            local, mesh=mesh_, in_specs=((row, row), rep_specs), out_specs=(row, PartitionSpec(), PartitionSpec())
        )((masks, rhs), rep)
    converged = jnp.all(res <= opts.tol)
    if throw:
        converged = _checks.error_if(
            converged,
            ~converged,
            f"CG did not reach tol={opts.tol:g} within max_iter={opts.max_iter} iterations; raise "
            "`max_iter`, `ridge` or `num_landmarks` (a better preconditioner), or use float64.",
        )
    return CGResult(solution=x, num_iter=it, residual=res, converged=converged)


def fit_kernel_cg(
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
    tol: float | None = None,
    max_iter: int = 500,
    block_size: int | None = None,
    mesh: Any = None,
    axis: str | None = None,
    throw: bool = True,
) -> KernelSurrogate:
    """Exact kernel ridge surrogate on all ``m`` masks, solved by preconditioned CG.

    ``(gamma, ridge)`` is chosen from the grids by the Nyström closed-form leave-one-out
    (:func:`kernattr.fit_nystrom` with ``num_landmarks`` landmarks drawn with ``key``; its
    ``cv_error`` is reported). Then, at that pair, the exact model of
    :func:`kernattr.fit_kernel` (``g(s) = b + Σ_i α_i k(s, s_i)``, unpenalised ``b``,
    ``1ᵀα = 0``) is solved from ``(K + ridge I)[u, v] = [y - ȳ, 1]``:
    ``b = ȳ + 1ᵀu / 1ᵀv`` and ``α = u - (1ᵀu / 1ᵀv) v``. The selected ``ridge`` must be ``> 0``.

    Args:
      key: typed PRNG key (landmarks for the selection and the preconditioner).
      masks: ``[m, K]`` 0/1 masks (may be sharded on rows).
      y: ``[m]`` or ``[m, T]`` labels.
      num_landmarks: ``L`` landmarks (Python int).
      kernel, gamma, ridge, mix, degree, coef0: as :func:`kernattr.fit_kernel`.
      tol, max_iter, block_size, mesh, axis, throw: as :func:`solve_kernel_cg`.

    Returns:
      :class:`~kernattr.KernelSurrogate` on all ``m`` masks (``masks`` and ``dual_coef``
      replicated when the input was sharded).

    >>> import jax, kernattr as ka
    >>> masks = ka.sample_subsets(jax.random.key(0), num_tasks=8, num_subsets=64, p=0.5)
    >>> s = fit_kernel_cg(jax.random.key(1), masks, masks[:, 0] - masks[:, 1], num_landmarks=16, kernel="rbf", gamma=0.2, ridge=0.1)
    >>> s.dual_coef.shape
    (64, 1)
    """
    return kernel_cg(key, masks, y, kernel_spec(kernel, degree, coef0), num_landmarks=num_landmarks,
                     gamma=gamma, ridge=ridge, mix=mix, tol=tol, max_iter=max_iter,
                     block_size=block_size, mesh=mesh, axis=axis, throw=throw)


def kernel_cg(key, masks, y, spec: KernelSpec, *, num_landmarks, gamma=None, ridge=None, mix=None,
              tol=None, max_iter=500, block_size=None, mesh=None, axis=None,
              throw=True) -> KernelSurrogate:
    """:func:`fit_kernel_cg` with its kernel settings already built into ``spec``."""
    sel = nystrom(key, masks, y, spec, num_landmarks=num_landmarks, gamma=gamma, ridge=ridge,
                  mix=mix, mesh=mesh, axis=axis, throw=throw).surrogate
    masks = _checks.check_masks(masks)
    y, _ = _checks.check_labels(y, masks.shape[0])
    dtype = jnp.result_type(masks.dtype, y.dtype)
    masks, y = masks.astype(dtype), y.astype(dtype)
    m, t = y.shape
    y_mean = jnp.mean(y, axis=0)
    where = mask_mesh(masks, mesh, axis)
    y = replicate(y, where)
    rhs = jnp.concatenate([y - y_mean[None, :], jnp.ones((m, 1), dtype)], axis=1)
    res = kernel_cg_solve(
        key, masks, rhs, sel.spec, gamma=sel.gamma[0], ridge=sel.ridge[0], mix=sel.mix[0],
        num_landmarks=num_landmarks, tol=tol, max_iter=max_iter, block_size=block_size, mesh=mesh,
        axis=axis, throw=throw,
    )
    sol = replicate(res.solution, where)
    u, v = sol[:, :t], sol[:, t]
    shift = jnp.sum(u, axis=0) / jnp.sum(v)  # [T]
    # the exact model at the Nyström selection: every field but the fit is the selection's
    return sel._replace(masks=replicate(masks, where), dual_coef=u - v[:, None] * shift[None, :],
                        intercept=y_mean + shift, status=None)
