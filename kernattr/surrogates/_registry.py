"""The built-in surrogate types, each declared once (:func:`._protocol.register_surrogate`).

For every type: its predictions, its attribution form (linear / kernel / pairwise parts) and its
posterior, which :func:`kernattr.predict`, the attributions and the uncertainty read-outs use.

Posteriors. Kernel ridge regression is the posterior mean of a Gaussian process (see
:mod:`kernattr.readouts._uncertainty` for the model and the leave-one-out calibration of its
scale); :func:`exact_posterior` writes it for an exact surrogate with the eigensystem of its fit,
:func:`nystrom_posterior` for a Nyström surrogate in its feature space (the "DTC" correction),
and the pairwise surrogate is a Bayesian linear model on its Walsh features.
"""

from __future__ import annotations

import jax.numpy as jnp

from .. import _checks
from ._krr import (KernelSurrogate, LinearSurrogate, MultiFidelitySurrogate, group_duplicates,
                   intercept_free_gram, kernel_predict, nonsingular, surrogate_gram, weighted_eigh)
from ._nystrom import NystromSurrogate
from ._protocol import (FeaturePosterior, GPPosterior, LinearForm, PairwiseForm, PosteriorFactor,
                        SumForm, SurrogateOps, kernel_form, register_surrogate, surrogate_ops)
from ._quadratic import (QuadraticSurrogate, attribution_functionals, quadratic_predict,
                         walsh_features)

__all__ = ["exact_posterior", "nystrom_posterior", "surrogate_ops"]


def _check_one_pair(s: KernelSurrogate) -> KernelSurrogate:
    """``s`` with its ridge guarded by the check that all targets share one grid point."""
    if not s.spec.shared_gamma:
        raise ValueError(
            "`surrogate` needs one bandwidth for all targets (this surrogate selected gamma per "
            "target); fit with per_target=False, or one target at a time."
        )
    same = jnp.all(s.ridge == s.ridge[0]) & jnp.all(s.gamma == s.gamma[0]) & jnp.all(s.mix == s.mix[0])
    return s._replace(ridge=_checks.error_if(
        s.ridge, ~same, "`surrogate` needs one (gamma, ridge) for all targets; fit with per_target=False."
    ))


def exact_posterior(s: KernelSurrogate) -> GPPosterior:
    """The GP posterior of an exact surrogate, from the eigensystem its fit used.

    Copies of a mask are one distinct mask observed ``c`` times (noise ``ridge/c``), and with an
    intercept the posterior is written with the kernel centred on the training rows
    (``k_c(s, s') = k(s, s') - a_s - a_s' + ā``, ``a_s = Σ_i k(s, x_i)/m``) plus ``ridge/m``
    for the intercept, minus the data term on ``d^⊥`` — the same restricted eigensystem and
    the same singularity rule (:func:`._krr.nonsingular`) as the fit, so every surrogate that
    fitted has a posterior.
    """
    s = _check_one_pair(s)
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
    e = _checks.error_if(
        e, ~ok, "the surrogate's kernel matrix + ridge·I is singular; refit with ridge > 0."
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
            PosteriorFactor(x, jnp.zeros((m, 1), dtype), jnp.sqrt(jnp.maximum(abar, 0.0) + lam / mf)[None], 1.0),
            PosteriorFactor(x, -half * w[:, None], half[None], 1.0),
            PosteriorFactor(x, half * w[:, None], half[None], -1.0),
        ]
        const = -(du.T @ (kmat @ w)) * jnp.sqrt(inv)
    else:
        const = jnp.zeros_like(inv) + zero
    factors.append(PosteriorFactor(x, du * jnp.sqrt(inv)[None, :], const, -1.0))
    beta = jnp.where(counts[:, None] > 0, groups.y_mean * counts[:, None] / jnp.where(d > 0, d, 1.0)[:, None], 0.0)
    p_diag = jnp.where(counts > 0, (u * u) @ inv, 1.0)
    num_real = jnp.sum(counts > 0)
    prior_var = jnp.sum(beta * beta / p_diag[:, None], axis=0) / num_real
    return GPPosterior(s, kp, lam, prior_var, lam * prior_var, tuple(factors))


def nystrom_posterior(n: NystromSurrogate) -> GPPosterior:
    """The GP posterior of a Nyström surrogate: the Nyström kernel inside the span of the
    landmarks plus the residual ``k - k̃`` that the data do not inform."""
    s = _check_one_pair(n.surrogate)
    kp, lam = (s.gamma[0], s.mix[0], s.linear_scale), s.ridge[0]
    lam = _checks.error_if(lam, ~(lam > 0),
                           "the Nyström posterior needs ridge > 0 (refit with a positive ridge).")
    lm = s.masks
    dtype = s.dual_coef.dtype
    r = n.feature_map.shape[1]
    scale = jnp.sqrt(lam / (n.eigvals + lam))  # [r]
    psi_coefs = (n.feature_map @ n.eigvecs) * scale[None, :]
    psi_const = -(n.feature_mean @ n.eigvecs) * scale
    factors = (
        PosteriorFactor(lm, n.feature_map, jnp.zeros((r,), dtype), -1.0),
        PosteriorFactor(lm, jnp.zeros((lm.shape[0], 1), dtype), jnp.sqrt(lam / n.num_train)[None], 1.0),
        PosteriorFactor(lm, psi_coefs, psi_const, 1.0),
    )
    safe = jnp.where(lam > 0, lam, 1.0)
    return GPPosterior(s, kp, lam, n.noise_var / safe, n.noise_var, factors)


def _quadratic_posterior(q: QuadraticSurrogate) -> FeaturePosterior:
    k, dtype = q.linear.shape[0], q.linear.dtype
    return FeaturePosterior(walsh_features, lambda kind: attribution_functionals(k, kind, dtype),
                            q.feature_mean, q.feature_cov, q.noise_var, q.num_train)


def _multifidelity_form(s: MultiFidelitySurrogate):
    cheap = surrogate_ops(s.cheap).attribution_form(s.cheap)
    residual = surrogate_ops(s.residual).attribution_form(s.residual)
    return SumForm((cheap, residual), (s.rho, None))


def _linear_predict(s: LinearSurrogate, masks):
    return masks @ s.coef + s.intercept[None, :]


def _multifidelity_predict(s: MultiFidelitySurrogate, masks):
    return s.rho[None, :] * kernel_predict(s.cheap, masks) + kernel_predict(s.residual, masks)


register_surrogate(LinearSurrogate, SurrogateOps(
    num_tasks=lambda s: s.coef.shape[0], dtype=lambda s: s.coef.dtype,
    predict=_linear_predict, attribution_form=lambda s: LinearForm(s.coef)))
register_surrogate(KernelSurrogate, SurrogateOps(
    num_tasks=lambda s: s.masks.shape[1], dtype=lambda s: s.dual_coef.dtype,
    predict=kernel_predict, attribution_form=kernel_form, posterior=exact_posterior))
register_surrogate(NystromSurrogate, SurrogateOps(
    num_tasks=lambda n: n.surrogate.masks.shape[1], dtype=lambda n: n.surrogate.dual_coef.dtype,
    predict=lambda n, masks: kernel_predict(n.surrogate, masks),
    attribution_form=lambda n: kernel_form(n.surrogate), posterior=nystrom_posterior))
register_surrogate(QuadraticSurrogate, SurrogateOps(
    num_tasks=lambda q: q.linear.shape[0], dtype=lambda q: q.linear.dtype,
    predict=quadratic_predict, attribution_form=lambda q: PairwiseForm(q.linear, q.pairwise),
    posterior=_quadratic_posterior))
register_surrogate(MultiFidelitySurrogate, SurrogateOps(
    num_tasks=lambda s: s.cheap.masks.shape[1], dtype=lambda s: s.cheap.dual_coef.dtype,
    predict=_multifidelity_predict, attribution_form=_multifidelity_form))
