"""Curvature of the loss at ``W0``: sharpness-aware and noise-stability training, Hessian traces.

The paper's robustness study trains ``W0`` three ways and asks whether surrogates stay accurate
when the loss landscape around ``W0`` is flat or curved. This module holds the pieces:

* :func:`sam`: sharpness-aware minimization (Foret et al. 2021) as an optax transformation: the
  gradient is taken at the adversarial point ``W + rho g / ||g||`` and handed to an inner
  optimizer.
* :func:`noise_stability`: noise-stability (weight-noise) training: the gradient is the mean of
  the gradients at ``W + U`` and ``W - U``, ``U ~ N(0, sigma² I)`` (a two-point, antithetic
  draw, so the first-order term of the noise cancels and the objective is
  ``E[L(W + U)] ≈ L(W) + sigma²/2 · tr(∇²L)``: a penalty on the Hessian trace).
* :func:`hutchinson_trace`: Hutchinson's estimator of ``tr(∇²L(W))`` from Rademacher probes,
  each a Hessian-vector product by forward-over-reverse differentiation (``jax.jvp`` of
  ``jax.grad``), with a bootstrap interval over the probes.

Both optimizers read the objective through optax's extra arguments (``value_fn``), the way
:func:`kernattr.groundtruth.finetune_on_masks` passes them, so they train any model the ground
truth trains.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

import kernattr as ka

__all__ = ["TraceEstimate", "hutchinson_trace", "noise_stability", "sam"]


def _check_positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a Python float > 0, got {value!r}.")
    if not value > 0:
        raise ValueError(f"`{name}` must be > 0, got {value}.")
    return float(value)


def _check_inner(inner: Any) -> None:
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(f"`inner` must be an optax.GradientTransformation (e.g. optax.adam(1e-3)), "
                        f"got {inner!r}.")


def _need_value_fn(value_fn: Any, who: str) -> None:
    if value_fn is None:
        raise ValueError(f"{who} needs the objective: call update(..., value_fn=f) with "
                         "f(params) -> scalar (kernattr.groundtruth.finetune_on_masks passes it).")


def sam(inner: optax.GradientTransformation, rho: float) -> optax.GradientTransformationExtraArgs:
    """Sharpness-aware minimization around an inner optax optimizer.

    Each step evaluates ``g = ∇L(W)``, moves to ``W + rho · g / ||g||`` (the first-order worst
    case in a ball of radius ``rho``) and hands ``∇L`` there to ``inner``. ``L`` comes from the
    ``value_fn`` extra argument (the current batch's objective).

    Args:
      inner: the optimizer that applies the adversarial gradient (e.g. ``optax.adamw(...)``).
      rho: radius of the adversarial step, ``> 0``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update(grads, state, params, *,
      value_fn)`` requires ``params`` and ``value_fn``.

    Raises:
      TypeError / ValueError: ``inner`` is not an optax transformation, ``rho <= 0``, or
      ``update`` is called without ``value_fn`` / ``params``.

    >>> import jax.numpy as jnp, optax
    >>> opt = sam(optax.sgd(1.0), rho=0.1)
    >>> f = lambda w: jnp.sum(w ** 2)
    >>> w = jnp.array([3.0, 4.0])
    >>> u, _ = opt.update(2 * w, opt.init(w), w, value_fn=f)
    >>> u.tolist()  # -(grad at w + 0.1 * w / ||w||) = -2 (w + 0.02 w)
    [-6.119999885559082, -8.15999984741211]
    """
    _check_inner(inner)
    rho = _check_positive(rho, "rho")

    def update(grads, state, params=None, *, value_fn=None, **extra):
        del extra
        _need_value_fn(value_fn, "sam")
        if params is None:
            raise ValueError("sam needs `params` in update(grads, state, params, value_fn=...).")
        norm = optax.tree.norm(grads)
        scale = rho / jnp.maximum(norm, jnp.finfo(norm.dtype).tiny)
        adv = jax.tree.map(lambda p, g: p + scale * g, params, grads)
        return inner.update(jax.grad(value_fn)(adv), state, params)

    return optax.GradientTransformationExtraArgs(inner.init, update)


class NoiseState(NamedTuple):
    """State of :func:`noise_stability`: the inner optimizer's state and a typed PRNG key."""

    inner: Any
    key: jax.Array


def noise_stability(inner: optax.GradientTransformation, sigma: float, key: jax.Array,
                    ) -> optax.GradientTransformationExtraArgs:
    """Noise-stability (weight-noise) training around an inner optax optimizer.

    Each step draws ``U ~ N(0, sigma² I)`` (a fresh key per step) and hands
    ``(∇L(W + U) + ∇L(W − U)) / 2`` to ``inner``: an unbiased gradient of ``E_U L(W + U)``
    whose first-order noise cancels (antithetic pair). ``L`` comes from ``value_fn``.

    Args:
      inner: the optimizer applied to the averaged gradient.
      sigma: standard deviation of the weight noise, ``> 0``.
      key: typed PRNG key of the noise (``jax.random.key(seed)``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`NoiseState`;
      ``update(grads, state, params, *, value_fn)`` requires ``params`` and ``value_fn``.

    Raises:
      TypeError / ValueError: bad ``inner``, ``sigma <= 0``, an untyped key, or ``update``
      without ``value_fn`` / ``params``.

    >>> import jax, jax.numpy as jnp, optax
    >>> opt = noise_stability(optax.sgd(1.0), sigma=0.5, key=jax.random.key(0))
    >>> f = lambda w: jnp.sum(w ** 2)   # quadratic: the antithetic mean is the exact gradient
    >>> w = jnp.array([1.0, -2.0])
    >>> u, _ = opt.update(2 * w, opt.init(w), w, value_fn=f)
    >>> [round(v, 5) for v in u.tolist()]
    [-2.0, 4.0]
    """
    _check_inner(inner)
    sigma = _check_positive(sigma, "sigma")
    if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
        raise TypeError(f"`key` must be a typed PRNG key (jax.random.key(seed)), got {key!r}.")

    def init(params):
        return NoiseState(inner.init(params), key)

    def update(grads, state, params=None, *, value_fn=None, **extra):
        del grads, extra
        _need_value_fn(value_fn, "noise_stability")
        if params is None:
            raise ValueError("noise_stability needs `params` in update(grads, state, params, "
                             "value_fn=...).")
        key_next, draw = jax.random.split(state.key)
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(draw, len(leaves))
        noise = treedef.unflatten([sigma * jax.random.normal(k, jnp.shape(p), jnp.result_type(p))
                                   for k, p in zip(keys, leaves)])
        g_plus = jax.grad(value_fn)(jax.tree.map(jnp.add, params, noise))
        g_minus = jax.grad(value_fn)(jax.tree.map(jnp.subtract, params, noise))
        mean = jax.tree.map(lambda a, b: 0.5 * (a + b), g_plus, g_minus)
        updates, inner_state = inner.update(mean, state.inner, params)
        return updates, NoiseState(inner_state, key_next)

    return optax.GradientTransformationExtraArgs(init, update)


class TraceEstimate(NamedTuple):
    """Hutchinson estimate of a Hessian trace (a pytree).

    Attributes:
      mean: scalar, the mean of the probes' ``vᵀ H v`` (unbiased for ``tr H``).
      low: scalar, lower end of the percentile bootstrap interval over probes.
      high: scalar, upper end.
      std: scalar, bootstrap standard error of ``mean``.
      samples: ``[num_probes]`` the probes' ``vᵀ H v``.
    """

    mean: jax.Array
    low: jax.Array
    high: jax.Array
    std: jax.Array
    samples: jax.Array


def hutchinson_trace(key: jax.Array, loss_fn: Callable[[Any], jax.Array], params: Any, *,
                     num_probes: int = 64, num_resamples: int = 1000, level: float = 0.95,
                     ) -> TraceEstimate:
    """Hutchinson's estimator of ``tr(∇² loss_fn(params))`` with a bootstrap interval.

    Each probe ``v`` has independent Rademacher (±1) entries, so ``E[vᵀ H v] = tr H``; ``H v`` is
    ``jax.jvp(jax.grad(loss_fn), (params,), (v,))`` (forward-over-reverse, no Hessian is
    formed). Probes run one after the other (``lax.map``), so memory is that of one
    Hessian-vector product.

    Args:
      key: typed PRNG key of the probes.
      loss_fn: ``loss_fn(params) -> scalar``, twice differentiable.
      params: parameter pytree (``D`` numbers in all).
      num_probes: number of probes, ``>= 2``.
      num_resamples: bootstrap replicates of the interval (:func:`kernattr.bootstrap_interval`).
      level: coverage of the interval in (0, 1).

    Returns:
      A :class:`TraceEstimate` ``(mean, low, high, std, samples [num_probes])``.

    Raises:
      TypeError / ValueError: untyped key, ``loss_fn`` not callable, ``num_probes < 2``.

    >>> import jax, jax.numpy as jnp
    >>> f = lambda w: 0.5 * jnp.sum(jnp.array([1.0, 2.0, 3.0]) * w ** 2)   # H = diag(1, 2, 3)
    >>> est = hutchinson_trace(jax.random.key(0), f, jnp.zeros(3), num_probes=8, num_resamples=100)
    >>> float(est.mean)   # diagonal H: every Rademacher probe gives the trace exactly
    6.0
    """
    if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
        raise TypeError(f"`key` must be a typed PRNG key (jax.random.key(seed)), got {key!r}.")
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable loss_fn(params) -> scalar, got {loss_fn!r}.")
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 2:
        raise ValueError(f"`num_probes` must be an int >= 2, got {num_probes!r}.")
    leaves, treedef = jax.tree.flatten(params)
    grad_fn = jax.grad(loss_fn)

    def one(k):
        keys = jax.random.split(k, len(leaves))
        v = treedef.unflatten([jax.random.rademacher(kk, jnp.shape(p), jnp.result_type(p))
                               for kk, p in zip(keys, leaves)])
        hv = jax.jvp(grad_fn, (params,), (v,))[1]
        return sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(hv)))

    probe_key, boot_key = jax.random.split(key)
    samples = jax.lax.map(one, jax.random.split(probe_key, num_probes))
    ci = ka.bootstrap_interval(boot_key, samples, num_resamples=num_resamples, level=level)
    return TraceEstimate(mean=jnp.mean(samples), low=ci.low, high=ci.high, std=ci.std,
                         samples=samples)
