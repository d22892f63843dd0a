"""What the read-outs need from a surrogate, and the one table that says it for every type.

Every surrogate type is registered once (:func:`register_surrogate`) with a
:class:`SurrogateOps` record: its number of tasks and dtype, its predictions at validated masks,
its *attribution form* and (optionally) its *posterior*. :func:`kernattr.predict`, the
attributions and the uncertainty read-outs look the type up here (:func:`surrogate_ops`) and
never branch on surrogate types themselves.

Attribution forms (what leave-one-out, Shapley, Banzhaf and interaction scores are read from;
every score is linear in the game, so a sum of parts is read part by part):

* :class:`LinearForm` ``g(s) = sᵀ coef`` (+ a constant, which no score sees);
* :class:`KernelForm` ``g(s) = Σ_i α_i k(s, s_i)`` for a single kernel (``"rbf"``,
  ``"polynomial"`` or ``"linear"``), read by the closed forms of the kernel;
* :class:`PairwiseForm` ``g(s) = sᵀ a + Σ_{j<k} B_jk s_j s_k``;
* :class:`SumForm` ``Σ_p w_p · part_p`` with per-target weights ``w_p [T]`` (or 1).

Posteriors (what posterior variances, attribution intervals and mask selection read; both give
the covariance of ``g`` in units of ``prior_var``):

* :class:`GPPosterior`: a Gaussian process, ``k(x, x') + Σ_f sign_f P_f(x) P_f(x')ᵀ`` with
  ``P_f(x) = const_f + k(x, centres_f) coefs_f`` (exact and Nyström kernel surrogates);
* :class:`FeaturePosterior`: a Bayesian linear model on explicit features ``φ``,
  ``(φ(x) - mean)ᵀ cov (φ(x') - mean) + 1/num_train`` (the Walsh / pairwise surrogate).

:func:`read_form` and :func:`read_posterior` walk these forms with one function per form kind,
supplied by the read-out. This module sits at the bottom of :mod:`kernattr.surrogates`
(above only :mod:`._krr`); the built-in types are registered in :mod:`._registry`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from ._krr import KernelSurrogate, split_linear_part, surrogate_gram

__all__ = [
    "FeaturePosterior",
    "GPPosterior",
    "KernelForm",
    "LinearForm",
    "PairwiseForm",
    "PosteriorFactor",
    "SumForm",
    "SurrogateOps",
    "kernel_form",
    "read_form",
    "read_posterior",
    "register_surrogate",
    "surrogate_ops",
]


# --------------------------------------------------------------------------------------------
# Attribution forms
# --------------------------------------------------------------------------------------------
class LinearForm(NamedTuple):
    """``g(s) = sᵀ coef``; ``coef [K, T]``."""

    coef: jax.Array


class KernelForm(NamedTuple):
    """``g(s) = Σ_i α_i k(s, s_i)``: a :class:`~kernattr.KernelSurrogate` with a single kernel
    (``spec.kernel`` one of ``"rbf"``, ``"polynomial"``, ``"linear"``; ``"linear+rbf"`` is first
    split by :func:`kernel_form`)."""

    surrogate: KernelSurrogate


class PairwiseForm(NamedTuple):
    """``g(s) = sᵀ linear + Σ_{j<k} pairwise[j, k] s_j s_k``; ``linear [K, T]``,
    ``pairwise [K, K, T]`` symmetric with zero diagonal."""

    linear: jax.Array
    pairwise: jax.Array


class SumForm(NamedTuple):
    """``Σ_p weights[p] · parts[p]``; each weight ``[T]`` (scales the last axis) or ``None``
    (1)."""

    parts: tuple
    weights: tuple


def kernel_form(s: KernelSurrogate):
    """The attribution form of a kernel surrogate: ``"linear+rbf"`` is split exactly into a
    linear part and an RBF part (:func:`split_linear_part`), the single kernels are one part."""
    if s.spec.kernel != "linear+rbf":
        return KernelForm(s)
    coef, rest = split_linear_part(s)
    return SumForm((LinearForm(coef), KernelForm(rest)), (None, None))


def read_form(form, *, linear: Callable, kernel: Callable, pairwise: Callable) -> jax.Array:
    """A read-out of an attribution form: ``linear(coef)``, ``kernel(kernel_surrogate)``,
    ``pairwise(linear, pairwise)`` on the parts, summed with their weights (in order)."""
    kind = type(form)
    if kind is SumForm:
        out = None
        for part, w in zip(form.parts, form.weights):
            v = read_form(part, linear=linear, kernel=kernel, pairwise=pairwise)
            if w is not None:
                v = w.reshape((1,) * (v.ndim - 1) + w.shape) * v
            out = v if out is None else out + v
        return out
    readers = {LinearForm: lambda f: linear(f.coef), KernelForm: lambda f: kernel(f.surrogate),
               PairwiseForm: lambda f: pairwise(f.linear, f.pairwise)}
    if kind not in readers:
        raise TypeError(f"attribution form must be LinearForm, KernelForm, PairwiseForm or "
                        f"SumForm, got {kind.__name__}.")
    return readers[kind](form)


# --------------------------------------------------------------------------------------------
# Posteriors
# --------------------------------------------------------------------------------------------
class PosteriorFactor(NamedTuple):
    """A ``[n, r]`` factor ``P(x) = const + k(x, centres) @ coefs`` entering with ``sign``."""

    centres: jax.Array
    coefs: jax.Array
    const: jax.Array
    sign: float


class GPPosterior(NamedTuple):
    """Gaussian-process posterior of a kernel surrogate (covariance in units of ``prior_var``).

    Attributes:
      base: the :class:`~kernattr.KernelSurrogate` (spec, parameters and the posterior mean).
      kp: ``(gamma, mix, linear_scale)`` scalars of the kernel.
      ridge: scalar ridge (the noise variance in units of ``prior_var``).
      prior_var: ``[T]`` ``σ_f²``.
      noise_var: ``[T]`` ``σ_n²``.
      factors: tuple of :class:`PosteriorFactor`.
    """

    base: KernelSurrogate
    kp: tuple
    ridge: jax.Array
    prior_var: jax.Array
    noise_var: jax.Array
    factors: tuple

    @property
    def unit_noise(self) -> jax.Array:
        """Observation noise in units of ``prior_var`` (kept away from 0)."""
        return jnp.maximum(self.ridge, jnp.finfo(self.base.dual_coef.dtype).tiny)

    def factor_values(self, f: PosteriorFactor, x: jax.Array) -> jax.Array:
        return f.const[None, :] + surrogate_gram(self.base.spec, x, f.centres, *self.kp) @ f.coefs

    def covariance(self, x: jax.Array) -> jax.Array:
        """``[n, n]`` unit posterior covariance at validated masks ``x [n, K]``."""
        cov = surrogate_gram(self.base.spec, x, x, *self.kp)
        for f in self.factors:
            p = self.factor_values(f, x)
            cov = cov + f.sign * (p @ p.T)
        return cov

    def variance(self, x: jax.Array) -> jax.Array:
        """``[n]`` unit posterior variance, without forming ``[n, n]``."""
        spec, kp = self.base.spec, self.kp
        out = jax.vmap(lambda a: surrogate_gram(spec, a[None], a[None], *kp)[0, 0])(x)
        for f in self.factors:
            p = self.factor_values(f, x)
            out = out + f.sign * jnp.sum(p * p, axis=1)
        return jnp.maximum(out, 0.0)


class FeaturePosterior(NamedTuple):
    """Bayesian linear model on features ``φ`` (covariance in units of ``noise_var``).

    Attributes:
      features: ``φ``, validated masks ``[n, K]`` -> ``[n, d]``.
      functionals: ``kind -> [K, d]``, the leave-one-out (``"loo"``) or Shapley
        (``"shapley"``) value of each feature for each task.
      mean: ``[d]`` mean training feature.
      cov: ``[d, d]`` posterior covariance of the coefficients over ``noise_var``.
      noise_var: ``[T]`` ``σ_n²`` (also the scale: ``prior_var``).
      num_train: scalar, training rows ``m`` (the intercept's variance is ``1/m``).
    """

    features: Callable
    functionals: Callable
    mean: jax.Array
    cov: jax.Array
    noise_var: jax.Array
    num_train: jax.Array

    @property
    def prior_var(self) -> jax.Array:
        return self.noise_var

    @property
    def unit_noise(self) -> jax.Array:
        return jnp.ones((), self.cov.dtype)

    def covariance(self, x: jax.Array) -> jax.Array:
        xc = self.features(x) - self.mean[None, :]
        return xc @ self.cov @ xc.T + 1.0 / self.num_train

    def variance(self, x: jax.Array) -> jax.Array:
        xc = self.features(x) - self.mean[None, :]
        return jnp.einsum("md,de,me->m", xc, self.cov, xc) + 1.0 / self.num_train


def read_posterior(post, *, gp: Callable, features: Callable):
    """``gp(post)`` for a :class:`GPPosterior`, ``features(post)`` for a
    :class:`FeaturePosterior`."""
    readers = {GPPosterior: gp, FeaturePosterior: features}
    if type(post) not in readers:
        raise TypeError(f"posterior must be GPPosterior or FeaturePosterior, got {type(post).__name__}.")
    return readers[type(post)](post)


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------
class SurrogateOps(NamedTuple):
    """What the read-outs need from one surrogate type.

    Attributes:
      num_tasks: ``s -> K`` (Python int).
      dtype: ``s -> dtype`` of its parameters (query masks are cast to it).
      predict: ``(s, masks [m', K]) -> [m', T]`` at masks already validated and cast.
      attribution_form: ``s ->`` a :class:`LinearForm`, :class:`KernelForm`,
        :class:`PairwiseForm` or :class:`SumForm` of them.
      posterior: ``s ->`` :class:`GPPosterior` or :class:`FeaturePosterior`; ``None`` when the
        type has no posterior (posterior read-outs then raise ``TypeError``).
    """

    num_tasks: Callable[[Any], int]
    dtype: Callable[[Any], Any]
    predict: Callable[[Any, jax.Array], jax.Array]
    attribution_form: Callable[[Any], Any]
    posterior: Callable[[Any], Any] | None = None


_REGISTRY: dict[type, SurrogateOps] = {}


def register_surrogate(cls: type, ops: SurrogateOps) -> type:
    """Declare once what the read-outs need from surrogates of type ``cls``; returns ``cls``.

    Registering a type again replaces its record. ``cls`` should be a pytree (e.g. a
    ``NamedTuple``) so that its instances pass through ``jax.jit``.
    """
    if not isinstance(cls, type):
        raise TypeError(f"`cls` must be a class, got {cls!r}.")
    if not isinstance(ops, SurrogateOps):
        raise TypeError(f"`ops` must be a SurrogateOps, got {type(ops).__name__}.")
    _REGISTRY[cls] = ops
    return cls


def surrogate_ops(surrogate: Any, *, need_posterior: bool = False) -> SurrogateOps:
    """The registered :class:`SurrogateOps` of ``type(surrogate)``; ``TypeError`` otherwise."""
    ops = _REGISTRY.get(type(surrogate))
    if ops is None:
        known = ", ".join(sorted(c.__name__ for c in _REGISTRY))
        raise TypeError(
            f"`surrogate` must be one of the registered surrogate types ({known}), got "
            f"{type(surrogate).__name__}. A new type is declared once with "
            "kernattr.surrogates._protocol.register_surrogate(cls, SurrogateOps(...))."
        )
    if need_posterior and ops.posterior is None:
        with_post = ", ".join(sorted(c.__name__ for c, o in _REGISTRY.items() if o.posterior))
        raise TypeError(
            f"`surrogate` has no posterior: {type(surrogate).__name__} is not one of the types "
            f"with one ({with_post})."
        )
    return ops
