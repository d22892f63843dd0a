"""The Gaussian-process view of a kernel surrogate: posterior variance, attribution intervals,
and the active choice of the next masks to retrain.

Kernel ridge regression is the posterior mean of a Gaussian process: labels
``y = b + f(s) + ε`` with ``f ~ GP(0, σ_f² k)``, noise ``ε ~ N(0, σ_n²)``, ``σ_n² = ridge·σ_f²``
and a flat prior on the intercept ``b``. The posterior covariance of ``g(s) = b + f(s)`` is
(``A = K + ridge·I`` on the training masks)::

    σ_f² [ k(s, s') - k_sᵀ A⁻¹ k_s' + (1 - 1ᵀA⁻¹k_s)(1 - 1ᵀA⁻¹k_s') / 1ᵀA⁻¹1 ]

(the last term is the intercept's uncertainty). For a :class:`~kernattr.NystromSurrogate` the GP
has the Nyström kernel ``k̃ = φᵀφ`` inside the span of the landmarks, plus the residual
``k - k̃`` that the data do not inform (the "DTC" correction); with ``L = m`` it is the exact GP.

The scale ``σ_f²`` is calibrated on the closed-form leave-one-out residuals: the LOO predictive
variance of ``y_i`` is ``σ_f² / P_ii`` (``P`` the inverse of ``A`` restricted to ``1^⊥``) and
``r_i = α_i / P_ii``, so ``σ_f² = mean_i r_i² P_ii`` makes the LOO z-scores have unit mean square;
the noise variance is ``σ_n² = ridge·σ_f²``.

Leave-one-out scores ``g(1) - g(1 - e_k)`` and Shapley values are linear functionals ``ℓ`` of
``g``, so their posterior variance is ``ℓ ⊗ ℓ`` applied to the posterior covariance: the prior
part ``ℓ ⊗ ℓ[k]`` in closed form (for the RBF kernel
``2(1-q) ∫∫ [1 - (1-q)(x + y - 2xy)]^{K-1} dx dy``, ``q = e^{-γ}``, by Gauss–Legendre; for the
linear kernel 1; ``"linear+rbf"`` mixes the two), the data part by applying ``ℓ`` to kernel expansions (the exact Shapley
formulas of :func:`kernattr.shapley_values`).

Shapes: ``m`` training masks, ``m'`` query masks, ``K`` tasks, ``T`` targets.
"""

from __future__ import annotations

import statistics
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import _checks
from ._attribution import loo_scores, shapley_values
from ..surrogates._nystrom import NystromSurrogate
from ..surrogates._quadratic import QuadraticSurrogate, attribution_functionals, walsh_features
from ..surrogates._krr import (KernelSurrogate, group_duplicates, intercept_free_gram, nonsingular,
                               surrogate_gram, weighted_eigh)

__all__ = ["AttributionIntervals", "attribution_intervals", "posterior_variance", "select_masks"]


class AttributionIntervals(NamedTuple):
    """Attributions with posterior intervals.

    Attributes:
      value: ``[K, T]`` posterior mean (the surrogate's scores).
      std: ``[K, T]`` posterior standard deviation (noise-free: the uncertainty of ``g``).
      lower: ``[K, T]`` ``value - z·std``.
      upper: ``[K, T]`` ``value + z·std`` (``z`` the normal quantile of the level).
    """

    value: jax.Array
    std: jax.Array
    lower: jax.Array
    upper: jax.Array


class _Factor(NamedTuple):
    """A ``[n, r]`` factor ``P(x) = const + k(x, centres) @ coefs`` entering with ``sign``."""

    centres: jax.Array
    coefs: jax.Array
    const: jax.Array
    sign: float


class _Posterior(NamedTuple):
    base: KernelSurrogate  # spec, gamma, ridge and the mean
    kp: tuple  # (gamma, mix, linear_scale) scalars of the kernel
    ridge: jax.Array  # scalar
    prior_var: jax.Array  # [T] σ_f²
    noise_var: jax.Array  # [T] σ_n²
    factors: tuple


def _check_one_pair(s: KernelSurrogate, name: str) -> None:
    if not s.spec.shared_gamma:
        raise ValueError(
            f"`{name}` needs one bandwidth for all targets (this surrogate selected gamma per "
            "target); fit with per_target=False, or one target at a time."
        )
    same = jnp.all(s.ridge == s.ridge[0]) & jnp.all(s.gamma == s.gamma[0]) & jnp.all(s.mix == s.mix[0])
    _checks.error_if(
        s.ridge, ~same, f"`{name}` needs one (gamma, ridge) for all targets; fit with per_target=False."
    )


def _exact_posterior(s: KernelSurrogate) -> _Posterior:
    """The GP posterior of an exact surrogate, from the eigensystem its fit used.

    Copies of a mask are one distinct mask observed ``c`` times (noise ``ridge/c``), and with an
    intercept the posterior is written with the kernel centred on the training rows
    (``k_c(s, s') = k(s, s') - a_s - a_s' + ā``, ``a_s = Σ_i k(s, x_i)/m``) plus ``ridge/m``
    for the intercept, minus the data term on ``d^⊥`` — the same restricted eigensystem and
    the same singularity rule (:func:`kernattr._surrogates.nonsingular`) as the fit, so every
    surrogate that fitted has a posterior.
    """
    spec = s.spec
    kp, lam = (s.gamma[0], s.mix[0], s.linear_scale), s.ridge[0]
    dtype = s.dual_coef.dtype
    groups = group_duplicates(s.masks, s.dual_coef)
    x, counts = groups.masks, groups.counts
    m = x.shape[0]
    mf = jnp.sum(counts)
    d = jnp.sqrt(counts)
    kmat = surrogate_gram(spec, x, x, *kp)
    e, u, e_max = weighted_eigh(intercept_free_gram(spec, x, *kp), counts, spec.fit_intercept)
    ok = nonsingular(jnp.min(e), e_max, lam, m, slack=0.5) & ((lam > 0) | jnp.all(counts > 0))
    _checks.error_if(
        x, ~ok, "the surrogate's kernel matrix + ridge·I is singular; refit with ridge > 0."
    )
    inv = 1.0 / (e + lam)
    du = d[:, None] * u  # [m, r]
    zero = jnp.zeros((), dtype)
    factors = []
    if spec.fit_intercept:
        w = counts / mf  # a_s = k(s, x) @ w
        abar = w @ kmat @ w
        half = jnp.sqrt(jnp.asarray(0.5, dtype))
        factors += [
            _Factor(x, jnp.zeros((m, 1), dtype), jnp.sqrt(jnp.maximum(abar, 0.0) + lam / mf)[None], 1.0),
            _Factor(x, -half * w[:, None], half[None], 1.0),
            _Factor(x, half * w[:, None], half[None], -1.0),
        ]
        const = -(du.T @ (kmat @ w)) * jnp.sqrt(inv)
    else:
        const = jnp.zeros_like(inv) + zero
    factors.append(_Factor(x, du * jnp.sqrt(inv)[None, :], const, -1.0))
    beta = jnp.where(counts[:, None] > 0, groups.y_mean * counts[:, None] / jnp.where(d > 0, d, 1.0)[:, None], 0.0)
    p_diag = jnp.where(counts > 0, (u * u) @ inv, 1.0)
    num_real = jnp.sum(counts > 0)
    prior_var = jnp.sum(beta * beta / p_diag[:, None], axis=0) / num_real
    return _Posterior(s, kp, lam, prior_var, lam * prior_var, tuple(factors))


def _nystrom_posterior(n: NystromSurrogate) -> _Posterior:
    s = n.surrogate
    kp, lam = (s.gamma[0], s.mix[0], s.linear_scale), s.ridge[0]
    _checks.error_if(lam, ~(lam > 0), "the Nyström posterior needs ridge > 0 (refit with a positive ridge).")
    lm = s.masks
    dtype = s.dual_coef.dtype
    r = n.feature_map.shape[1]
    scale = jnp.sqrt(lam / (n.eigvals + lam))  # [r]
    psi_coefs = (n.feature_map @ n.eigvecs) * scale[None, :]
    psi_const = -(n.feature_mean @ n.eigvecs) * scale
    factors = (
        _Factor(lm, n.feature_map, jnp.zeros((r,), dtype), -1.0),
        _Factor(lm, jnp.zeros((lm.shape[0], 1), dtype), jnp.sqrt(lam / n.num_train)[None], 1.0),
        _Factor(lm, psi_coefs, psi_const, 1.0),
    )
    safe = jnp.where(lam > 0, lam, 1.0)
    return _Posterior(s, kp, lam, n.noise_var / safe, n.noise_var, factors)


def _posterior(surrogate: Any, name: str = "surrogate") -> _Posterior:
    if isinstance(surrogate, NystromSurrogate):
        _check_one_pair(surrogate.surrogate, name)
        return _nystrom_posterior(surrogate)
    if isinstance(surrogate, KernelSurrogate):
        _check_one_pair(surrogate, name)
        return _exact_posterior(surrogate)
    raise TypeError(
        f"`{name}` must be a KernelSurrogate (fit_kernel) or NystromSurrogate (fit_nystrom), "
        f"got {type(surrogate).__name__}."
    )


def _factor_values(post: _Posterior, f: _Factor, x: jax.Array) -> jax.Array:
    return f.const[None, :] + surrogate_gram(post.base.spec, x, f.centres, *post.kp) @ f.coefs


def _covariance(post: _Posterior, x: jax.Array) -> jax.Array:
    """``[n, n]`` unscaled posterior covariance (multiply by ``σ_f²``)."""
    cov = surrogate_gram(post.base.spec, x, x, *post.kp)
    for f in post.factors:
        p = _factor_values(post, f, x)
        cov = cov + f.sign * (p @ p.T)
    return cov


def _variance(post: _Posterior, x: jax.Array) -> jax.Array:
    """``[n]`` unscaled posterior variance, without forming ``[n, n]``."""
    kdiag = jax.vmap(lambda a: surrogate_gram(post.base.spec, a[None], a[None], *post.kp)[0, 0])(x)
    out = kdiag
    for f in post.factors:
        p = _factor_values(post, f, x)
        out = out + f.sign * jnp.sum(p * p, axis=1)
    return jnp.maximum(out, 0.0)


def _query(masks, post: _Posterior) -> jax.Array:
    k = post.base.masks.shape[1]
    masks = _checks.check_masks(masks, num_tasks=k)
    return masks.astype(jnp.result_type(masks.dtype, post.base.dual_coef.dtype))


def posterior_variance(surrogate: Any, masks: jax.Array, *, include_noise: bool = False) -> jax.Array:
    """Posterior variance of the surrogate's prediction at new masks (the GP view).

    By default the variance of ``g(s) = b + f(s)`` (the model's uncertainty about the
    noise-free metric, intercept uncertainty included); ``include_noise=True`` adds the noise
    variance ``σ_n²`` (the predictive variance of a new real retrain's label). See the module
    docstring for the model and the leave-one-out calibration of the scale. Exact surrogates
    cost one ``m x m`` eigendecomposition; Nyström surrogates ``O(m' L²)``.

    Args:
      surrogate: :class:`~kernattr.KernelSurrogate` (one ``(gamma, ridge)`` for all targets),
        :class:`~kernattr.NystromSurrogate` or :class:`~kernattr.QuadraticSurrogate` (the
        Bayesian linear model on its Walsh features: ``σ_n² ((x - x̄)ᵀ C (x - x̄) + 1/m)`` with
        ``C`` its ``feature_cov``).
      masks: ``[m', K]`` 0/1 query masks.
      include_noise: add ``σ_n²``.

    Returns:
      ``[m', T]`` variances.

    >>> import jax, kernattr as ka
    >>> masks = ka.sample_subsets(jax.random.key(0), num_tasks=6, num_subsets=40, p=0.5)
    >>> s = ka.fit_kernel(masks, masks[:, 0] * masks[:, 1], kernel="rbf", gamma=0.3, ridge=0.1)
    >>> posterior_variance(s, ka.leave_one_out_masks(6)).shape
    (6, 1)
    """
    if isinstance(surrogate, QuadraticSurrogate):
        q = surrogate
        masks = _checks.check_masks(masks, num_tasks=q.linear.shape[0])
        x = walsh_features(masks.astype(jnp.result_type(masks.dtype, q.linear.dtype)))
        xc = x - q.feature_mean[None, :]
        unit = jnp.einsum("md,de,me->m", xc, q.feature_cov, xc) + 1.0 / q.num_train  # [m']
        var = unit[:, None] * q.noise_var[None, :]
        return var + q.noise_var[None, :] if include_noise else var
    post = _posterior(surrogate)
    x = _query(masks, post)
    var = _variance(post, x)[:, None] * post.prior_var[None, :]
    if include_noise:
        var = var + post.noise_var[None, :]
    return var


def _rbf_double_shapley(q: jax.Array, num_tasks: int) -> jax.Array:
    """``ℓ_j ⊗ ℓ_j [k]`` for Shapley ``ℓ_j`` and the RBF kernel (same for every task ``j``)."""
    n = num_tasks // 2 + 1
    x, w = np.polynomial.legendre.leggauss(n)
    x = jnp.asarray((x + 1.0) / 2.0, q.dtype)
    w = jnp.asarray(w / 2.0, q.dtype)
    base = 1.0 - (1.0 - q) * (x[:, None] + x[None, :] - 2.0 * x[:, None] * x[None, :])
    vals = jnp.exp((num_tasks - 1) * jnp.log(base))
    return 2.0 * (1.0 - q) * jnp.einsum("a,b,ab->", w, w, vals)


def _functional(kind: str, s: KernelSurrogate) -> jax.Array:
    return shapley_values(s) if kind == "shapley" else loo_scores(s)


def attribution_intervals(surrogate: Any, *, kind: str = "shapley", level: float = 0.95) -> AttributionIntervals:
    """Leave-one-out scores or Shapley values with posterior intervals from the same GP.

    The attribution is a linear functional of ``g``; its posterior is normal with the mean the
    surrogate's score and the variance ``ℓ ⊗ ℓ`` of the posterior covariance (noise-free; module
    docstring). Shapley intervals need the ``"linear+rbf"``, ``"rbf"`` or ``"linear"`` kernel (the
    prior term has no closed form here for the polynomial kernel).

    Args:
      surrogate: :class:`~kernattr.KernelSurrogate` (one ``(gamma, ridge)`` for all targets),
        :class:`~kernattr.NystromSurrogate` or :class:`~kernattr.QuadraticSurrogate` (exact
        functionals of its Walsh features; pair features have Shapley value 0).
      kind: ``"shapley"`` or ``"loo"``.
      level: coverage of the interval, in ``(0, 1)``.

    Returns:
      :class:`AttributionIntervals` (``[K, T]`` each).

    >>> import jax, kernattr as ka
    >>> masks = ka.sample_subsets(jax.random.key(0), num_tasks=6, num_subsets=40, p=0.5)
    >>> s = ka.fit_kernel(masks, masks[:, 0] - masks[:, 1], kernel="rbf", gamma=0.3, ridge=0.1)
    >>> attribution_intervals(s, kind="loo").std.shape
    (6, 1)
    """
    if kind not in ("shapley", "loo"):
        raise ValueError(f"`kind` must be 'shapley' or 'loo', got {kind!r}.")
    if not (isinstance(level, (float, int)) and 0 < level < 1):
        raise ValueError(f"`level` must be a float in (0, 1), got {level!r}.")
    z = statistics.NormalDist().inv_cdf(0.5 + level / 2.0)
    if isinstance(surrogate, QuadraticSurrogate):
        q = surrogate
        ell = attribution_functionals(q.linear.shape[0], kind, q.linear.dtype)  # [K, d]
        unit = jnp.maximum(jnp.einsum("kd,de,ke->k", ell, q.feature_cov, ell), 0.0)
        std = jnp.sqrt(unit[:, None] * q.noise_var[None, :])
        value = _functional(kind, q)
        return AttributionIntervals(value=value, std=std, lower=value - z * std, upper=value + z * std)
    post = _posterior(surrogate)
    spec = post.base.spec
    k = post.base.masks.shape[1]
    dtype = post.base.dual_coef.dtype
    if kind == "loo":
        pts = jnp.concatenate([jnp.ones((1, k), dtype), 1.0 - jnp.eye(k, dtype=dtype)], axis=0)
        kk = surrogate_gram(spec, pts, pts, *post.kp)
        prior = kk[0, 0] - 2.0 * kk[0, 1:] + jnp.diagonal(kk)[1:]  # [K]
    elif spec.kernel in ("rbf", "linear+rbf"):
        gamma, mix, lin_scale = post.kp
        rbf = _rbf_double_shapley(jnp.exp(-gamma), k)
        if spec.kernel == "linear+rbf":  # <s,s'>/c has ℓ_j ⊗ ℓ_j = 1/c
            rbf = mix / lin_scale + (1.0 - mix) * rbf
        prior = jnp.broadcast_to(rbf, (k,))
    elif spec.kernel == "linear":
        prior = jnp.ones((k,), dtype)
    else:
        raise ValueError(
            "Shapley intervals are available for the 'linear+rbf', 'rbf' and 'linear' kernels, "
            f"not {spec.kernel!r}; use kind='loo'."
        )
    var = prior
    base = post.base
    for f in post.factors:
        r = f.coefs.shape[1]
        fs = KernelSurrogate(
            masks=f.centres,
            dual_coef=f.coefs,
            intercept=f.const,
            gamma=jnp.broadcast_to(post.kp[0], (r,)),
            ridge=jnp.broadcast_to(post.ridge, (r,)),
            mix=jnp.broadcast_to(post.kp[1], (r,)),
            gamma_grid=base.gamma_grid,
            mix_grid=base.mix_grid,
            ridge_grid=base.ridge_grid,
            linear_scale=base.linear_scale,
            cv_error=jnp.zeros((1, 1, 1, r), dtype),
            cv_spearman=jnp.zeros((1, 1, 1, r), dtype),
            spec=spec,
        )
        lp = _functional(kind, fs)  # [K, r]
        var = var + f.sign * jnp.sum(lp * lp, axis=1)
    var = jnp.maximum(var, 0.0)
    std = jnp.sqrt(var[:, None] * post.prior_var[None, :])
    value = _functional(kind, base)
    return AttributionIntervals(value=value, std=std, lower=value - z * std, upper=value + z * std)


def select_masks(
    key: jax.Array,
    surrogate: Any,
    num: int,
    *,
    num_candidates: int = 2048,
    p: float = 0.5,
    candidates: jax.Array | None = None,
    criterion: str = "integrated",
) -> jax.Array:
    """Choose the next ``num`` masks to retrain, greedily, with fantasised GP updates.

    A candidate pool (``num_candidates`` Bernoulli(``p``) masks drawn with ``key``, or
    ``candidates``) stands for the masks the surrogate will be asked about. Each step picks one
    candidate and updates the posterior covariance of the pool as if its label had been
    observed (the update does not need the label: ``C ← C - C[:, j] C[j, :] / (C[j, j] + ridge)``
    in units of ``σ_f²``). ``criterion="integrated"`` picks the candidate that most reduces the
    total posterior variance over the pool (``Σ_i C[i, j]² / (C[j, j] + ridge)``, an integrated
    variance / I-optimal design); ``"variance"`` the one of largest current variance. A picked
    candidate is not picked again. Targets share the covariance up to scale, so one set serves
    all targets. ``O(num · n²)`` time and ``O(n²)`` memory for ``n`` candidates.

    Args:
      key: typed PRNG key (draws the candidate pool).
      surrogate: :class:`~kernattr.KernelSurrogate`, :class:`~kernattr.NystromSurrogate` or
        :class:`~kernattr.QuadraticSurrogate` (its Bayesian linear model on the Walsh features;
        covariance ``x_cᵀ C x_c' + 1/m`` in units of the noise variance, noise 1).
      num: number of masks to return (Python int ``<= n``).
      num_candidates: pool size ``n`` when ``candidates`` is not given.
      p: Bernoulli probability of the pool.
      candidates: optional ``[n, K]`` 0/1 pool (then ``key`` is unused).
      criterion: ``"integrated"`` (default) or ``"variance"``.

    Returns:
      ``[num, K]`` 0/1 masks, in the order chosen.

    >>> import jax, kernattr as ka
    >>> masks = ka.sample_subsets(jax.random.key(0), num_tasks=6, num_subsets=40, p=0.5)
    >>> s = ka.fit_kernel(masks, masks[:, 0] * masks[:, 1], kernel="rbf", gamma=0.3, ridge=0.1)
    >>> select_masks(jax.random.key(1), s, 5, num_candidates=64).shape
    (5, 6)
    """
    _checks.check_key(key)
    if criterion not in ("integrated", "variance"):
        raise ValueError(f"`criterion` must be 'integrated' or 'variance', got {criterion!r}.")
    num = _checks.check_count(num, "num")
    quad = isinstance(surrogate, QuadraticSurrogate)
    post = None if quad else _posterior(surrogate)
    k = surrogate.linear.shape[0] if quad else post.base.masks.shape[1]
    dtype = surrogate.linear.dtype if quad else post.base.dual_coef.dtype
    if candidates is None:
        num_candidates = _checks.check_count(num_candidates, "num_candidates")
        if not (isinstance(p, (float, int)) and 0 < p <= 1):
            raise ValueError(f"`p` must be a float in (0, 1], got {p!r}.")
        cand = jax.random.bernoulli(key, p, (num_candidates, k)).astype(dtype)
    else:
        cand = _checks.check_masks(candidates, num_tasks=k)
        cand = cand.astype(jnp.result_type(cand.dtype, dtype))
    n = cand.shape[0]
    if num > n:
        raise ValueError(f"`num` = {num} exceeds the {n} candidates; pass more candidates.")
    if quad:
        # Bayesian linear model on the Walsh features, in units of σ_n²: prior-data covariance
        # ``x_cᵀ C x_c' + 1/m`` (intercept), observation noise 1.
        xc = walsh_features(cand) - surrogate.feature_mean[None, :]
        cov = xc @ surrogate.feature_cov @ xc.T + 1.0 / surrogate.num_train
        noise = jnp.ones((), cov.dtype)
    else:
        cov = _covariance(post, cand)
        noise = jnp.maximum(post.ridge, jnp.finfo(dtype).tiny)

    def step(state, _):
        c, taken = state
        diag = jnp.diagonal(c)
        if criterion == "variance":
            score = diag
        else:
            score = jnp.sum(c * c, axis=0) / (diag + noise)
        score = jnp.where(taken, -jnp.inf, score)
        j = jnp.argmax(score)
        col = c[:, j]
        c = c - col[:, None] * col[None, :] / (col[j] + noise)
        return (c, taken.at[j].set(True)), j

    (_, _), picked = jax.lax.scan(step, (cov, jnp.zeros((n,), bool)), None, length=num)
    return cand[picked]
