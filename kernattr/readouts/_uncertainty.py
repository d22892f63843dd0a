"""The Gaussian-process view of a kernel surrogate: posterior variance, attribution intervals,
and the active choice of the next masks to retrain.

Each surrogate type declares its posterior once (:mod:`kernattr.surrogates._registry`): a
Gaussian process for the kernel surrogates (below), a Bayesian linear model on the Walsh
features for the pairwise surrogate; this module reads either form and never branches on the
surrogate's type.

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
from ..surrogates._krr import KernelSurrogate, surrogate_gram
from ..surrogates._protocol import read_posterior
from ..surrogates._registry import surrogate_ops

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


def _posterior(surrogate: Any):
    """The registered posterior of ``surrogate`` (:mod:`kernattr.surrogates._registry`): a
    Gaussian process (kernel surrogates) or a Bayesian linear model on features (pairwise)."""
    ops = surrogate_ops(surrogate, need_posterior=True)
    return ops, ops.posterior(surrogate)


def _query(masks, surrogate, ops) -> jax.Array:
    masks = _checks.check_masks(masks, num_tasks=ops.num_tasks(surrogate))
    return masks.astype(jnp.result_type(masks.dtype, ops.dtype(surrogate)))


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
    ops, post = _posterior(surrogate)
    x = _query(masks, surrogate, ops)
    var = post.variance(x)[:, None] * post.prior_var[None, :]
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


def _feature_functional_variance(post, kind: str) -> jax.Array:
    """``[K]`` unit variance of the attribution functionals of a Bayesian linear model."""
    ell = post.functionals(kind)  # [K, d]
    return jnp.maximum(jnp.einsum("kd,de,ke->k", ell, post.cov, ell), 0.0)


def _gp_functional_variance(post, kind: str) -> jax.Array:
    """``[K]`` unit variance ``ℓ ⊗ ℓ`` of the attribution functionals under a GP posterior: the
    prior part in closed form, the factors' part by the exact attribution of kernel expansions."""
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
    return jnp.maximum(var, 0.0)


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
    _, post = _posterior(surrogate)
    unit = read_posterior(post, gp=lambda g: _gp_functional_variance(g, kind),
                          features=lambda f: _feature_functional_variance(f, kind))
    std = jnp.sqrt(unit[:, None] * post.prior_var[None, :])
    value = _functional(kind, surrogate)
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
    ops, post = _posterior(surrogate)
    k, dtype = ops.num_tasks(surrogate), ops.dtype(surrogate)
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
    # in units of the posterior scale: for the pairwise surrogate's Bayesian linear model the
    # noise variance (``x_cᵀ C x_c' + 1/m``, observation noise 1), for a GP ``σ_f²`` (noise: ridge)
    cov = post.covariance(cand)
    noise = post.unit_noise
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
