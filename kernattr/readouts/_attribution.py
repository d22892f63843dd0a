"""Attributions read off a surrogate ``g``: leave-one-out, exact Shapley / Banzhaf, interactions.

All scores are *of the surrogate* (exact for ``g``, no sampling); how well they reflect real
retraining depends on how well ``g`` fits.

Exactness for kernel surrogates. ``g(s) = b + Σ_i α_i k(s, s_i)`` and Shapley / Banzhaf values
are linear in the game, so it suffices to treat one kernel term ``v_i(s) = k(s, s_i)``:

* RBF: ``k(s, s_i) = Π_k φ_ik(s_k)`` with ``φ_ik(1) = a_ik``, ``φ_ik(0) = b_ik`` equal to
  ``(1, q)`` where ``s_ik = 1`` and ``(q, 1)`` where ``s_ik = 0``, ``q = exp(-γ)``: a product
  game. Its Shapley value is ``(a_j - b_j) ∫_0^1 Π_{k≠j} (b_k + (a_k - b_k) x) dx`` (the
  Shapley weights ``|S|!(K-|S|-1)!/K!`` are Beta integrals), a polynomial of degree ``K-1``
  integrated *exactly* by ``⌊K/2⌋+1`` Gauss–Legendre nodes; only the number of tasks in
  ``s_i`` other than ``j`` matters, so one table of ``K`` values per bandwidth serves all terms
  (``O(K²)`` per bandwidth, ``O(m K T)`` overall). Banzhaf:
  ``(a_j - b_j) Π_{k≠j} (a_k + b_k)/2 = ±(1-q)((1+q)/2)^{K-1}``.
* linear+rbf: ``mix/c·<s, s_i>`` is additive (task ``j`` gets ``mix/c·s_ij``: the linear
  surrogate's coefficient ``mix/c·masksᵀα``, no interactions) and the RBF part is the above
  with dual coefficients ``(1 - mix)·α`` (``split_linear_part``).
* polynomial / linear: ``k(s, s_i) = f(|s ∩ s_i|)`` depends only on how many tasks of ``s_i``
  are present, so tasks outside ``s_i`` are null players and (symmetry + efficiency) each task
  of ``s_i`` gets ``(f(n_i) - f(0)) / n_i`` Shapley value; the Banzhaf value is
  ``E_B[f(B+1) - f(B)]``, ``B ~ Binomial(n_i - 1, 1/2)``.

Pairwise surrogates ``g(s) = c + sᵀa + Σ_{j<k} B_jk s_j s_k`` (:func:`kernattr.fit_quadratic`):
leave-one-out ``a_k + Σ_j B_kj``, Shapley and Banzhaf ``a_k + ½ Σ_j B_kj`` (each pair's term is
shared equally), interactions ``B``.

Multi-fidelity surrogates ``rho·g_cheap + g_residual`` (:func:`kernattr.fit_multifidelity`):
every score is linear in the game, so it is ``rho`` times the cheap surrogate's plus the
residual surrogate's.

Each surrogate type declares once which of these forms it is made of (its attribution form,
:mod:`kernattr.surrogates._registry`); the functions here read the forms, never the type.

Shapes: ``K`` tasks, ``m`` training masks, ``T`` targets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..surrogates._krr import KernelSurrogate, LinearSurrogate, MultiFidelitySurrogate, kernel_predict
from ..surrogates._protocol import read_form
from ..surrogates._registry import surrogate_ops

__all__ = ["banzhaf_values", "interaction_scores", "loo_scores", "shapley_values"]


def _read(surrogate, kernel_fn, linear_fn, pair_weight=None) -> jax.Array:
    """A read-out of any registered surrogate type, from its attribution form
    (:mod:`kernattr.surrogates._protocol`): ``linear_fn(coef)`` on a linear part,
    ``kernel_fn(kernel_surrogate)`` on a single-kernel part, and on a pairwise part
    ``sᵀa + Σ_{j<k} B_jk s_j s_k`` either ``linear_fn(a + pair_weight·Σ_j B_kj)`` (each score
    credits task ``k`` with that share of its pair terms) or ``B`` for interactions
    (``pair_weight=None``); parts summed with their weights."""
    if pair_weight is None:
        pairwise = lambda a, b: b  # noqa: E731
    else:
        pairwise = lambda a, b: linear_fn(a + pair_weight * jnp.sum(b, axis=1))  # noqa: E731
    form = surrogate_ops(surrogate).attribution_form(surrogate)
    return read_form(form, linear=linear_fn, kernel=kernel_fn, pairwise=pairwise)


def _num_tasks(s: KernelSurrogate) -> int:
    return s.masks.shape[1]


def _no_interactions(coef: jax.Array) -> jax.Array:
    k, t = coef.shape
    return jnp.zeros((k, k, t), coef.dtype)


def loo_scores(
    surrogate: LinearSurrogate | KernelSurrogate | MultiFidelitySurrogate,
) -> jax.Array:
    """Predicted leave-one-task-out effect ``g(1) - g(1 - e_k)`` for every task ``k``.

    Positive: including task ``k`` (with all others present) raises the target value.

    Args:
      surrogate: a :class:`LinearSurrogate`, :class:`KernelSurrogate` (or
        :class:`~kernattr.NystromSurrogate`), :class:`~kernattr.QuadraticSurrogate` or
        :class:`MultiFidelitySurrogate`.

    Returns:
      ``[K, T]`` scores.

    >>> import jax.numpy as jnp
    >>> from kernattr import LinearSurrogate
    >>> loo_scores(LinearSurrogate(jnp.array([[1.0], [-2.0]]), jnp.array([0.0]))).tolist()
    [[1.0], [-2.0]]
    """
    return _read(surrogate, _loo_kernel, lambda coef: coef, pair_weight=1.0)


def _loo_kernel(s: KernelSurrogate) -> jax.Array:
    k = _num_tasks(s)
    dtype = s.dual_coef.dtype
    full = jnp.ones((1, k), dtype)
    drop = 1.0 - jnp.eye(k, dtype=dtype)
    preds = kernel_predict(s, jnp.concatenate([full, drop], axis=0))
    return preds[:1] - preds[1:]


def _gauss_legendre01(num_tasks: int, dtype) -> tuple[jax.Array, jax.Array]:
    """Nodes/weights on [0, 1] exact for polynomials of degree <= num_tasks - 1."""
    n = num_tasks // 2 + 1
    x, w = np.polynomial.legendre.leggauss(n)
    return jnp.asarray((x + 1.0) / 2.0, dtype), jnp.asarray(w / 2.0, dtype)


def _rbf_shapley_table(q: jax.Array, num_tasks: int) -> jax.Array:
    """``H[p, t] = ∫_0^1 (q+(1-q)x)^p (1-(1-q)x)^(K-1-p) dx`` for ``p = 0..K-1``; ``q [T]``."""
    x, w = _gauss_legendre01(num_tasks, q.dtype)
    p = jnp.arange(num_tasks, dtype=q.dtype)  # [K]
    one_minus_q = 1.0 - q  # [T]
    up = q[None, :] + one_minus_q[None, :] * x[:, None]  # [N, T] factor of a task in s_i
    down = 1.0 - one_minus_q[None, :] * x[:, None]  # [N, T] factor of a task not in s_i
    log_up = jnp.log(up)
    log_down = jnp.log(down)
    # [N, K, T]: p tasks "up", K-1-p tasks "down"
    vals = jnp.exp(
        p[None, :, None] * log_up[:, None, :] + (num_tasks - 1 - p)[None, :, None] * log_down[:, None, :]
    )
    return jnp.einsum("n,npt->pt", w, vals)


def _poly_f(s: KernelSurrogate, n: jax.Array) -> jax.Array:
    """``f_t(n)`` for the polynomial / linear kernel; ``n`` any shape, result ``n.shape + [T]``."""
    spec = s.spec
    if spec.kernel == "linear":
        return jnp.broadcast_to(n[..., None], n.shape + s.gamma.shape)
    gamma = s.gamma.reshape((1,) * n.ndim + s.gamma.shape)
    return (gamma * n[..., None] + spec.coef0) ** spec.degree


def shapley_values(
    surrogate: LinearSurrogate | KernelSurrogate | MultiFidelitySurrogate,
) -> jax.Array:
    """Exact Shapley values of the surrogate game ``v(S) = g(1_S)`` (no sampling).

    ``φ_k = Σ_{S ⊆ N\\{k}} |S|!(K-|S|-1)!/K! · (g(S ∪ {k}) - g(S))``; they sum to
    ``g(1) - g(0)`` (efficiency). Linear: ``coef``. RBF, polynomial and linear kernels: exact
    closed forms (module docstring), ``O(m K T + K² T)`` time.

    Args:
      surrogate: a :class:`LinearSurrogate`, :class:`KernelSurrogate` (or
        :class:`~kernattr.NystromSurrogate`), :class:`~kernattr.QuadraticSurrogate` or
        :class:`MultiFidelitySurrogate`.

    Returns:
      ``[K, T]`` Shapley values.

    >>> import jax, jax.numpy as jnp
    >>> from kernattr import fit_kernel
    >>> masks = jax.random.bernoulli(jax.random.key(0), 0.5, (32, 5)).astype(jnp.float32)
    >>> s = fit_kernel(masks, masks[:, 0] * masks[:, 1], gamma=0.2, ridge=0.1)
    >>> shapley_values(s).shape
    (5, 1)
    """
    return _read(surrogate, _shapley_kernel, lambda coef: coef, pair_weight=0.5)


def _shapley_kernel(s: KernelSurrogate) -> jax.Array:
    k = _num_tasks(s)
    masks, alpha = s.masks, s.dual_coef
    n1 = jnp.sum(masks, axis=1)  # [m]
    if s.spec.kernel == "rbf":
        q = jnp.exp(-s.gamma)  # [T]
        table = _rbf_shapley_table(q, k)  # [K, T]
        # For s_ij = 1 the other "up" tasks number n1-1; for s_ij = 0 they number n1.
        idx1 = jnp.clip(n1 - 1, 0, k - 1).astype(jnp.int32)
        idx0 = jnp.clip(n1, 0, k - 1).astype(jnp.int32)
        a1 = alpha * table[idx1]  # [m, T]
        a0 = alpha * table[idx0]  # [m, T]
        # φ_jt = (1-q_t) Σ_i α_it [s_ij H(n1_i-1) - (1-s_ij) H(n1_i)]
        return (1.0 - q)[None, :] * (masks.T @ (a1 + a0) - jnp.sum(a0, axis=0)[None, :])
    f_n = _poly_f(s, n1)  # [m, T]
    f_0 = _poly_f(s, jnp.zeros((), n1.dtype))  # [T]
    per_task = (f_n - f_0[None, :]) / jnp.maximum(n1, 1.0)[:, None]
    return masks.T @ (alpha * per_task)


def banzhaf_values(
    surrogate: LinearSurrogate | KernelSurrogate | MultiFidelitySurrogate,
) -> jax.Array:
    """Exact Banzhaf values ``β_k = 2^{-(K-1)} Σ_{S ⊆ N\\{k}} (g(S ∪ {k}) - g(S))``.

    Linear: ``coef``. RBF: ``(1-q)((1+q)/2)^{K-1} Σ_i α_i (2 s_ik - 1)`` with ``q = e^{-γ}``.
    Polynomial / linear kernels: exact binomial expectation (module docstring).

    Args:
      surrogate: a :class:`LinearSurrogate`, :class:`KernelSurrogate` (or
        :class:`~kernattr.NystromSurrogate`), :class:`~kernattr.QuadraticSurrogate` or
        :class:`MultiFidelitySurrogate`.

    Returns:
      ``[K, T]`` Banzhaf values.

    >>> import jax, jax.numpy as jnp
    >>> from kernattr import fit_kernel
    >>> masks = jax.random.bernoulli(jax.random.key(0), 0.5, (32, 5)).astype(jnp.float32)
    >>> banzhaf_values(fit_kernel(masks, masks[:, 0], gamma=0.2, ridge=0.1)).shape
    (5, 1)
    """
    return _read(surrogate, _banzhaf_kernel, lambda coef: coef, pair_weight=0.5)


def _banzhaf_kernel(s: KernelSurrogate) -> jax.Array:
    k = _num_tasks(s)
    masks, alpha = s.masks, s.dual_coef
    if s.spec.kernel == "rbf":
        q = jnp.exp(-s.gamma)
        c = (1.0 - q) * ((1.0 + q) / 2.0) ** (k - 1)  # [T]
        return c[None, :] * ((2.0 * masks - 1.0).T @ alpha)
    dtype = masks.dtype
    n1 = jnp.sum(masks, axis=1)  # [m]
    # table over n = 1..K of E_B[f(B+1) - f(B)], B ~ Bin(n-1, 1/2); row 0 unused (n=0 -> 0).
    n = jnp.arange(k + 1, dtype=dtype)  # [K+1]
    b = jnp.arange(k, dtype=dtype)  # [K]
    nm1 = jnp.maximum(n - 1.0, 0.0)
    logpmf = (
        jax.scipy.special.gammaln(nm1[:, None] + 1.0)
        - jax.scipy.special.gammaln(b[None, :] + 1.0)
        - jax.scipy.special.gammaln(jnp.maximum(nm1[:, None] - b[None, :], 0.0) + 1.0)
        - nm1[:, None] * np.log(2.0)
    )
    pmf = jnp.where(b[None, :] <= nm1[:, None], jnp.exp(logpmf), 0.0)  # [K+1, K]
    pmf = jnp.where((n >= 1.0)[:, None], pmf, 0.0)
    diff = _poly_f(s, b + 1.0) - _poly_f(s, b)  # [K, T]
    table = pmf @ diff  # [K+1, T]
    per_term = table[n1.astype(jnp.int32)]  # [m, T]
    return masks.T @ (alpha * per_term)


def interaction_scores(
    surrogate: LinearSurrogate | KernelSurrogate | MultiFidelitySurrogate,
) -> jax.Array:
    """Pairwise interactions at the all-tasks anchor.

    ``I[i, j] = g(1) - g(1 - e_i) - g(1 - e_j) + g(1 - e_i - e_j)`` for ``i ≠ j``: the part of
    the joint effect of removing both tasks that is not the sum of removing each (positive:
    the pair is synergistic for the target value; negative: redundant / antagonistic). The
    diagonal is defined as 0. Symmetric. Linear surrogates have no interactions (all 0).
    RBF: exact factorised form ``(1-q)² Σ_l α_l e^{-γ(z_l - z_li - z_lj)} σ_li σ_lj`` (``z_l``
    the number of tasks absent from ``s_l``, ``σ = 2s - 1``) via four ``[K, m] x [m, K]``
    products per target; polynomial / linear kernels: evaluated at the ``K²`` pair masks.

    Args:
      surrogate: a :class:`LinearSurrogate`, :class:`KernelSurrogate` (or
        :class:`~kernattr.NystromSurrogate`), :class:`~kernattr.QuadraticSurrogate` or
        :class:`MultiFidelitySurrogate`.

    Returns:
      ``[K, K, T]`` interaction scores.

    >>> import jax.numpy as jnp
    >>> from kernattr import LinearSurrogate
    >>> interaction_scores(LinearSurrogate(jnp.ones((3, 2)), jnp.zeros(2))).shape
    (3, 3, 2)
    """
    return _read(surrogate, _interactions_kernel, _no_interactions)


def _interactions_kernel(s: KernelSurrogate) -> jax.Array:
    k = _num_tasks(s)
    masks, alpha = s.masks, s.dual_coef
    dtype = alpha.dtype
    off_diag = (1.0 - jnp.eye(k, dtype=dtype))[:, :, None]
    if s.spec.kernel == "rbf":
        z = 1.0 - masks  # [m, K] absent tasks
        nz = jnp.sum(z, axis=1)  # [m]
        g = s.gamma  # [T]
        q = jnp.exp(-g)

        def c(shift):  # [m, T] e^{-γ (z_l - shift)}, clipped: rows with z_l < shift never pair
            return alpha * jnp.exp(-g[None, :] * jnp.maximum(nz - shift, 0.0)[:, None])

        c0, c1, c2 = c(0.0), c(1.0), c(2.0)
        out = (
            jnp.einsum("li,lt,lj->ijt", masks, c0, masks)
            - jnp.einsum("li,lt,lj->ijt", masks, c1, z)
            - jnp.einsum("li,lt,lj->ijt", z, c1, masks)
            + jnp.einsum("li,lt,lj->ijt", z, c2, z)
        )
        return ((1.0 - q) ** 2)[None, None, :] * out * off_diag
    eye = jnp.eye(k, dtype=dtype)
    full = jnp.ones((1, k), dtype)
    singles = 1.0 - eye  # [K, K]
    pairs = jnp.clip(1.0 - eye[:, None, :] - eye[None, :, :], 0.0, 1.0).reshape(k * k, k)
    p1 = kernel_predict(s, full)[0]  # [T]
    ps = kernel_predict(s, singles)  # [K, T]
    pp = kernel_predict(s, pairs).reshape(k, k, -1)  # [K, K, T]
    out = p1[None, None, :] - ps[:, None, :] - ps[None, :, :] + pp
    return out * off_diag
