"""From a user's model and task-labelled data to attributions with intervals.

Configure once (:func:`workflow`, a :class:`WorkflowConfig`), then either call the stages
yourself (each a pure function of arrays that can be passed to ``jax.jit``) or let
:func:`run_workflow` run them in order with a progress bar and timings:

1. masks: ``m`` Bernoulli(``density``) subsets of the ``K`` tasks (:func:`kernattr.sample_subsets`);
2. features: projected output gradients of the training and target examples at the model's
   parameters (:func:`kernattr.make_projector`, :func:`kernattr.gradient_features`);
3. labels: the target metric of the linearized model trained on each mask
   (:func:`kernattr.estimate_subset_labels`), no retraining;
4. optional real runs: a user's ``train_fn(mask) -> metric`` on a budget of masks, to correct
   the estimated labels (:func:`kernattr.fit_multifidelity`) and to measure a held-out LDS with
   its bootstrap interval (:func:`kernattr.lds_interval`);
5. surrogate: :func:`kernattr.fit_kernel` with leave-one-out selection over its grid;
6. attributions: leave-one-out and Shapley scores with posterior intervals
   (:func:`kernattr.attribution_intervals`) and pairwise interactions.

Flax is imported only when a Flax model is passed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ._metrics import LDSInterval, lds_interval
from .data._subsets import sample_subsets
from .labels._estimation import estimate_subset_labels
from .labels._gradients import gradient_features
from .labels._projection import make_projector
from .readouts._attribution import interaction_scores, loo_scores, shapley_values
from .readouts._uncertainty import AttributionIntervals, attribution_intervals
from .surrogates._dispatch import fit_kernel, predict
from .surrogates._krr import MultiFidelitySurrogate
from .surrogates._multifidelity import fit_multifidelity

__all__ = [
    "Attributions",
    "Workflow",
    "WorkflowConfig",
    "WorkflowResult",
    "WorkflowTimings",
    "as_apply_fn",
    "run_workflow",
    "workflow",
]

_LOSSES = ("squared", "logistic", "softmax")
_METRICS = ("loss", "margin", "output")
_SOLVERS = ("fast", "anchored", "exact")
_PROJECTIONS = ("rademacher", "gaussian", "sjlt", "identity")
_KERNELS = ("linear+rbf", "rbf", "linear")  # the kernels with Shapley intervals


# ------------------------------------------------------------------------------ configuration
def _grid(value: Any, name: str) -> Any:
    """None, a float, or a tuple of floats (hashable, JSON-able)."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:
        items = tuple(float(v) for v in np.asarray(value, dtype=float).reshape(-1))
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be None, a float or a 1-D sequence of floats, "
                        f"got {value!r}.") from None
    if np.ndim(value) != 1 or not items:
        raise ValueError(f"`{name}` must be a float or a non-empty 1-D grid, got {value!r}.")
    return items


def _count(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    return int(value)


def _choice(value: Any, name: str, allowed: tuple) -> str:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}.")
    return value


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=[],
    meta_fields=[
        "num_tasks", "loss", "metric", "num_masks", "density", "proj_dim", "proj_kind",
        "estimator_ridge", "solver", "chunk_size", "mask_batch", "kernel", "gamma", "ridge", "mix",
        "num_landmarks", "level", "num_real", "num_heldout", "num_resamples",
    ],
)
@dataclasses.dataclass(frozen=True)
class WorkflowConfig:
    """What a workflow does (static, hashable, no arrays); checked when built.

    Attributes:
      num_tasks: ``K``, number of tasks (task ids lie in ``0..K-1``).
      loss: ``"squared"``, ``"logistic"`` or ``"softmax"``: the training loss of the model, as in
        :func:`kernattr.estimate_subset_labels`.
      metric: ``"loss"``, ``"margin"`` or ``"output"``: the quantity read on each target example.
      num_masks: ``m``, masks with estimated labels (``>= 3``).
      density: probability that a task is in a mask, in ``(0, 1)``.
      proj_dim: ``d``, projected gradient dimension (ignored by ``proj_kind="identity"``).
      proj_kind: ``"rademacher"``, ``"gaussian"``, ``"sjlt"`` or ``"identity"``.
      estimator_ridge: ``>= 0`` ridge of the estimator's GLM (the pull to the trained model).
      solver: estimator solver, ``"fast"``, ``"anchored"`` or ``"exact"``.
      chunk_size: examples per gradient batch (``None``: all at once).
      mask_batch: masks per estimation call; ``None``: one call (the progress bar then ticks
        once for the labels). The labels do not depend on it.
      kernel: surrogate kernel, ``"linear+rbf"``, ``"rbf"`` or ``"linear"``.
      gamma, ridge, mix: :func:`kernattr.fit_kernel` settings: ``None`` (its default grid), a
        float, or a tuple (a grid, selected by leave-one-out).
      num_landmarks: Nyström landmarks for many masks (``None``: the exact kernel).
      level: coverage of the intervals, in ``(0, 1)``.
      num_real: real runs (``train_fn``) whose labels correct the estimated ones
        (multi-fidelity); ``0`` or ``>= 3``.
      num_heldout: real runs held out to measure the LDS; ``0`` or ``>= 3``.
      num_resamples: bootstrap replicates of the LDS interval.

    >>> import kernattr as ka
    >>> ka.WorkflowConfig(num_tasks=4, loss="squared", gamma=[0.1, 0.3]).gamma
    (0.1, 0.3)
    """

    num_tasks: int
    loss: str
    metric: str = "loss"
    num_masks: int = 256
    density: float = 0.5
    proj_dim: int = 64
    proj_kind: str = "rademacher"
    estimator_ridge: float = 1e-3
    solver: str = "fast"
    chunk_size: Optional[int] = None
    mask_batch: Optional[int] = None
    kernel: str = "linear+rbf"
    gamma: Any = None
    ridge: Any = None
    mix: Any = None
    num_landmarks: Optional[int] = None
    level: float = 0.95
    num_real: int = 0
    num_heldout: int = 0
    num_resamples: int = 1000

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        set_("num_tasks", _count(self.num_tasks, "num_tasks", 1))
        _choice(self.loss, "loss", _LOSSES)
        _choice(self.metric, "metric", _METRICS)
        set_("num_masks", _count(self.num_masks, "num_masks", 3))
        if not (isinstance(self.density, (int, float)) and 0.0 < self.density < 1.0):
            raise ValueError(f"`density` must be a float in (0, 1), got {self.density!r}.")
        set_("density", float(self.density))
        set_("proj_dim", _count(self.proj_dim, "proj_dim", 1))
        _choice(self.proj_kind, "proj_kind", _PROJECTIONS)
        if not (isinstance(self.estimator_ridge, (int, float)) and self.estimator_ridge >= 0):
            raise ValueError(f"`estimator_ridge` must be a float >= 0, got {self.estimator_ridge!r}.")
        set_("estimator_ridge", float(self.estimator_ridge))
        _choice(self.solver, "solver", _SOLVERS)
        for name in ("chunk_size", "mask_batch", "num_landmarks"):
            if getattr(self, name) is not None:
                set_(name, _count(getattr(self, name), name, 1))
        _choice(self.kernel, "kernel", _KERNELS)
        for name in ("gamma", "ridge", "mix"):
            set_(name, _grid(getattr(self, name), name))
        if not (isinstance(self.level, float) and 0.0 < self.level < 1.0):
            raise ValueError(f"`level` must be a float in (0, 1), got {self.level!r}.")
        for name in ("num_real", "num_heldout"):
            value = _count(getattr(self, name), name, 0)
            if 0 < value < 3:
                raise ValueError(f"`{name}` must be 0 or >= 3 (a fit or an LDS needs 3 masks), "
                                 f"got {value}.")
            set_(name, value)
        set_("num_resamples", _count(self.num_resamples, "num_resamples", 2))
        if self.num_landmarks is not None and self.num_real:
            raise ValueError("`num_landmarks` (Nystrom) cannot be combined with `num_real` "
                             "(multi-fidelity uses the exact kernel); drop one.")


# ------------------------------------------------------------------------------ model adapters
def _flax_kinds(model: Any) -> tuple[bool, bool]:
    """(is an NNX module, is a Linen module), without importing flax for other models."""
    if "flax" not in sys.modules:
        return False, False
    from flax import linen, nnx

    return isinstance(model, nnx.Module), isinstance(model, linen.Module)


def as_apply_fn(
    model: Any, variables: Any = None, *, filter: Any = None, call_kwargs: dict | None = None
) -> tuple[Callable, Any]:
    """A Flax NNX model, a Linen model and its variables, or a plain function, as ``(apply_fn, params)``.

    ``apply_fn(params, x)`` evaluates ONE example ``x`` (a scalar or ``[C]`` outputs); ``params``
    is the pytree that gradients are taken with respect to. The user's model is never mutated.

    Args:
      model: a ``flax.nnx.Module`` (``variables=None``; :func:`kernattr.adapters.from_nnx`, in
        inference mode), a ``flax.linen.Module`` (``variables`` its variables dict; only
        ``variables["params"]`` is linearized, other collections such as ``"batch_stats"`` are
        held fixed), or a callable ``apply_fn(params, x)`` of one example (``variables`` its
        params). Flax modules are called on a batch of one and the batch axis is removed.
      variables: see ``model``.
      filter: NNX only: which parameters to linearize (an NNX filter; default all ``nnx.Param``).
      call_kwargs: Linen only: keyword arguments of ``module.apply`` (e.g. ``{"train": False}``).

    Returns:
      ``(apply_fn, params)``.

    Raises:
      TypeError: ``model`` is none of the three, or ``variables`` does not fit it.

    >>> import jax.numpy as jnp, kernattr as ka
    >>> f, p = ka.as_apply_fn(lambda p, x: x @ p["w"], {"w": jnp.ones(3)})
    >>> float(f(p, jnp.ones(3)))
    3.0
    """
    is_nnx, is_linen = _flax_kinds(model)
    if is_nnx:
        if variables is not None or call_kwargs is not None:
            raise TypeError("an NNX module carries its own parameters: pass `variables=None` "
                            "and no `call_kwargs`.")
        from .adapters import from_nnx
        from flax import nnx

        return from_nnx(model, filter=nnx.Param if filter is None else filter)
    if filter is not None:
        raise TypeError("`filter` applies to NNX modules only; for other models pass the "
                        "parameters to linearize as `variables`.")
    if is_linen:
        if not isinstance(variables, dict) or "params" not in variables:
            raise TypeError("a Linen module needs its variables dict with a 'params' entry, "
                            "e.g. variables = module.init(key, x).")
        rest = {k: v for k, v in variables.items() if k != "params"}
        kwargs = dict(call_kwargs or {})

        def linen_apply(params, x):
            return model.apply({**rest, "params": params}, jnp.asarray(x)[None], **kwargs)[0]

        return linen_apply, variables["params"]
    if call_kwargs is not None:
        raise TypeError("`call_kwargs` applies to Linen modules only.")
    if not callable(model):
        raise TypeError("`model` must be a flax.nnx.Module, a flax.linen.Module (with its "
                        f"variables) or a callable apply_fn(params, x); got {type(model).__name__}.")
    if variables is None:
        raise TypeError("a plain apply_fn(params, x) needs its parameters as `variables`.")
    return model, variables


# ------------------------------------------------------------------------------ results
class Attributions(NamedTuple):
    """Per-task attributions of a surrogate (a pytree).

    Attributes:
      loo: :class:`~kernattr.AttributionIntervals`, ``[K, T]`` each: predicted leave-one-out
        effect ``g(1) - g(1 - e_k)`` with its posterior interval.
      shapley: :class:`~kernattr.AttributionIntervals`, ``[K, T]``: exact Shapley values.
      interactions: ``[K, K, T]`` pairwise interaction scores (:func:`kernattr.interaction_scores`).
    """

    loo: AttributionIntervals
    shapley: AttributionIntervals
    interactions: jax.Array


class WorkflowTimings(NamedTuple):
    """Wall-clock seconds of each stage of :func:`run_workflow` (NaN: not run).

    Attributes:
      masks, features, labels, real_runs, surrogate, attributions, lds: Python floats.
    """

    masks: float = math.nan
    features: float = math.nan
    labels: float = math.nan
    real_runs: float = math.nan
    surrogate: float = math.nan
    attributions: float = math.nan
    lds: float = math.nan


class WorkflowResult(NamedTuple):
    """Everything :func:`run_workflow` did and found (a pytree; :func:`kernattr.save` writes it).

    Attributes:
      config: the :class:`WorkflowConfig` (static).
      masks: ``[m, K]`` masks with estimated labels.
      labels: ``[m, T]`` estimated labels (``T`` target examples).
      real_masks: ``[r, K]`` masks trained for real and fitted on, or ``None``.
      real_labels: ``[r, T]`` their real labels, or ``None``.
      heldout_masks: ``[h, K]`` masks trained for real and only used for the LDS, or ``None``.
      heldout_labels: ``[h, T]`` their real labels, or ``None``.
      surrogate: the fitted surrogate (``KernelSurrogate``; ``NystromSurrogate`` with
        ``num_landmarks``; ``MultiFidelitySurrogate`` with real labels).
      loo, shapley: :class:`~kernattr.AttributionIntervals` ``[K, T]`` each.
      interactions: ``[K, K, T]``.
      lds: :class:`~kernattr.LDSInterval` of the surrogate on the held-out masks, or ``None``.
      timings: :class:`WorkflowTimings`.
    """

    config: WorkflowConfig
    masks: jax.Array
    labels: jax.Array
    real_masks: Optional[jax.Array]
    real_labels: Optional[jax.Array]
    heldout_masks: Optional[jax.Array]
    heldout_labels: Optional[jax.Array]
    surrogate: Any
    loo: AttributionIntervals
    shapley: AttributionIntervals
    interactions: jax.Array
    lds: Optional[LDSInterval]
    timings: WorkflowTimings


# ------------------------------------------------------------------------------ stages
def _with_base(iv: AttributionIntervals, base: jax.Array) -> AttributionIntervals:
    return AttributionIntervals(value=iv.value + base, std=iv.std, lower=iv.lower + base,
                                upper=iv.upper + base)


def _sample_masks(cfg: WorkflowConfig, key: jax.Array) -> jax.Array:
    return sample_subsets(key, num_tasks=cfg.num_tasks, num_subsets=cfg.num_masks, p=cfg.density)


def _estimate(cfg: WorkflowConfig, train: Any, target: Any, masks: jax.Array) -> jax.Array:
    return estimate_subset_labels(train, target, masks, loss=cfg.loss, metric=cfg.metric,
                                  ridge=cfg.estimator_ridge, solver=cfg.solver)


def _kernel_options(cfg: WorkflowConfig) -> dict:
    grids = {"gamma": cfg.gamma, "ridge": cfg.ridge, "mix": cfg.mix}
    if cfg.kernel != "linear+rbf":
        grids.pop("mix")
    return {"kernel": cfg.kernel, **{k: None if v is None else jnp.asarray(v)
                                     for k, v in grids.items()}}


def _fit(cfg: WorkflowConfig, masks, labels, real_masks=None, real_labels=None, key=None):
    options = _kernel_options(cfg)
    if (real_masks is None) != (real_labels is None):
        raise ValueError("give both `real_masks` and `real_labels`, or neither.")
    if real_masks is not None:
        return fit_multifidelity(masks, labels, real_masks, real_labels, **options)
    if cfg.num_landmarks is not None:
        if key is None:
            raise ValueError("`num_landmarks` is set: pass `key` to draw the landmarks.")
        return fit_kernel(masks, labels, num_landmarks=cfg.num_landmarks, key=key, **options)
    return fit_kernel(masks, labels, **options)


def _attributions(cfg: WorkflowConfig, surrogate: Any) -> Attributions:
    level = cfg.level
    if isinstance(surrogate, MultiFidelitySurrogate):
        rho = surrogate.rho[None, :]
        loo = _with_base(attribution_intervals(surrogate.residual, kind="loo", level=level),
                         rho * loo_scores(surrogate.cheap))
        shap = _with_base(attribution_intervals(surrogate.residual, kind="shapley", level=level),
                          rho * shapley_values(surrogate.cheap))
    else:
        loo = attribution_intervals(surrogate, kind="loo", level=level)
        shap = attribution_intervals(surrogate, kind="shapley", level=level)
    return Attributions(loo=loo, shapley=shap, interactions=interaction_scores(surrogate))


def _lds(cfg: WorkflowConfig, key: jax.Array, surrogate: Any, masks, labels) -> LDSInterval:
    return lds_interval(key, predict(surrogate, masks), labels, num_resamples=cfg.num_resamples,
                        level=cfg.level)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["params"],
                   meta_fields=["config", "apply_fn"])
@dataclasses.dataclass(frozen=True)
class Workflow:
    """A configured workflow: the model as ``(apply_fn, params)`` and a :class:`WorkflowConfig`.

    Build it with :func:`workflow`. A ``Workflow`` is a pytree (``params`` are its leaves) and
    each method is one stage, a pure function of arrays that can be passed to ``jax.jit`` as
    it is (``jax.jit(wf.estimate)``); :func:`run_workflow` runs them in order.

    Attributes:
      config: :class:`WorkflowConfig` (static).
      apply_fn: ``apply_fn(params, x)`` of one example (static).
      params: the trained parameters ``W0`` (a pytree; what gradients are taken of).

    >>> import jax, jax.numpy as jnp, kernattr as ka
    >>> wf = ka.workflow(lambda p, x: x @ p, jnp.ones(3), num_tasks=2, loss="squared",
    ...                  num_masks=8, proj_kind="identity")
    >>> masks = jax.jit(wf.sample_masks)(jax.random.key(0))
    >>> x, t = jnp.eye(3)[jnp.array([0, 1, 2, 0])], jnp.array([0, 0, 1, 1])
    >>> features = jax.jit(wf.features)
    >>> train = features(jax.random.key(1), x, jnp.ones(4), t)
    >>> target = features(jax.random.key(1), x[:2], jnp.zeros(2))
    >>> jax.jit(wf.estimate)(train, target, masks).shape
    (8, 2)
    """

    config: WorkflowConfig
    apply_fn: Callable
    params: Any

    def sample_masks(self, key: jax.Array) -> jax.Array:
        """``[m, K]`` Bernoulli(``density``) masks (:func:`kernattr.sample_subsets`)."""
        return _sample_masks(self.config, key)

    def features(self, key: jax.Array, inputs: Any, labels: Any, task_ids: Any = None):
        """:class:`~kernattr.GradientFeatures` of ``inputs`` at ``params``.

        Args:
          key: typed key of the projection (:func:`kernattr.make_projector`); use the same key
            for the training and the target examples.
          inputs: pytree of ``[n, ...]`` arrays.
          labels: ``[n]``.
          task_ids: ``[n]`` ints in ``0..K-1`` (training examples) or ``None`` (targets).
        """
        c = self.config
        dim = None if c.proj_kind == "identity" else c.proj_dim
        projector = make_projector(key, self.params, dim=dim, kind=c.proj_kind)
        return gradient_features(
            self.apply_fn, self.params, inputs, labels, projector, task_ids=task_ids,
            num_tasks=None if task_ids is None else c.num_tasks, chunk_size=c.chunk_size,
        )

    def estimate(self, train: Any, target: Any, masks: jax.Array) -> jax.Array:
        """``[m, T]`` estimated labels of ``masks`` (:func:`kernattr.estimate_subset_labels`)."""
        return _estimate(self.config, train, target, masks)

    def fit(self, masks: jax.Array, labels: jax.Array, real_masks: Any = None,
            real_labels: Any = None, key: Any = None):
        """The surrogate: :func:`kernattr.fit_kernel` on ``(masks, labels)`` (Nyström with
        ``num_landmarks``; ``key`` draws the landmarks) or, given real labels ``[r, K]``,
        ``[r, T]``, :func:`kernattr.fit_multifidelity` of the estimated and the real labels."""
        return _fit(self.config, masks, labels, real_masks, real_labels, key)

    def attributions(self, surrogate: Any) -> Attributions:
        """Leave-one-out and Shapley scores with intervals, and interactions, of ``surrogate``.

        For a ``MultiFidelitySurrogate`` the intervals are those of its residual surrogate, the
        cheap surrogate held fixed (its own uncertainty is not included); the values are exact.
        """
        return _attributions(self.config, surrogate)

    def lds(self, key: jax.Array, surrogate: Any, masks: jax.Array, labels: jax.Array):
        """:func:`kernattr.lds_interval` of the surrogate's predictions on held-out ``masks``
        ``[h, K]`` against their real ``labels`` ``[h, T]``."""
        return _lds(self.config, key, surrogate, masks, labels)


# The driver's compiled stages: module-level functions of (static config, arrays), so runs
# with the same settings and shapes reuse jax's compilation cache whatever the model. Each
# stage sees only the configuration fields it reads (_FIELDS), so changing e.g. the number of
# real runs does not recompile the gradient or estimation stages.
_STAGES = {
    "masks": _sample_masks, "features": Workflow.features, "labels": _estimate, "surrogate": _fit,
    "attributions": _attributions, "lds": _lds,
}
_FIELDS = {
    "masks": ("num_masks", "density"),
    "features": ("proj_dim", "proj_kind", "chunk_size"),
    "labels": ("metric", "estimator_ridge", "solver"),
    "surrogate": ("kernel", "gamma", "ridge", "mix", "num_landmarks"),
    "attributions": ("level",),
    "lds": ("num_resamples", "level"),
}


def _stage_config(cfg: WorkflowConfig, stage: str) -> WorkflowConfig:
    """``cfg`` with the fields that ``stage`` does not read at their defaults."""
    kept = {name: getattr(cfg, name) for name in _FIELDS[stage]}
    return WorkflowConfig(num_tasks=cfg.num_tasks, loss=cfg.loss, **kept)


_JITTED = {name: jax.jit(fn) for name, fn in _STAGES.items()}


def workflow(model: Any, variables: Any = None, *, num_tasks: int, loss: str,
             filter: Any = None, call_kwargs: dict | None = None, **config: Any) -> Workflow:
    """Configure the attribution workflow for a model once; run it with :func:`run_workflow`.

    Args:
      model, variables, filter, call_kwargs: the model, as in :func:`as_apply_fn` (an NNX
        module; a Linen module and its variables; or ``apply_fn(params, x)`` and its params).
      num_tasks: ``K``.
      loss: ``"squared"``, ``"logistic"`` or ``"softmax"`` (the model's training loss).
      **config: any other :class:`WorkflowConfig` field (``num_masks``, ``density``,
        ``proj_dim``, ``proj_kind``, ``kernel``, ``num_real``, ``num_heldout``, ...).

    Returns:
      :class:`Workflow`.

    Raises:
      TypeError: unknown option, or a model that :func:`as_apply_fn` does not take.
      ValueError: an option out of range (the message names it).

    >>> import jax.numpy as jnp, kernattr as ka
    >>> wf = ka.workflow(lambda p, x: x @ p, jnp.ones(3), num_tasks=4, loss="squared",
    ...                  num_masks=32)
    >>> wf.config.num_masks, wf.sample_masks(jax.random.key(0)).shape
    (32, (32, 4))
    """
    known = {f.name for f in dataclasses.fields(WorkflowConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise TypeError(f"unknown workflow option(s) {unknown}; allowed: {sorted(known)}.")
    cfg = WorkflowConfig(num_tasks=num_tasks, loss=loss, **config)
    apply_fn, params = as_apply_fn(model, variables, filter=filter, call_kwargs=call_kwargs)
    return Workflow(config=cfg, apply_fn=apply_fn, params=params)


# ------------------------------------------------------------------------------ driver
class _Clock:
    """Times stages (blocking on their outputs) and ticks the progress bar."""

    def __init__(self, bar):
        self.bar, self.times = bar, {}

    def run(self, name: str, fn: Callable, *args, ticks: int = 1, **kwargs):
        self.bar.set_description(f"kernattr: {name}")
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args, **kwargs))
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start
        self.bar.update(ticks)
        return out


def _real_runs(clock: _Clock, train_fn: Callable, masks: jax.Array, num_targets: int, dtype):
    rows = []
    for i in range(masks.shape[0]):
        row = clock.run("real_runs", lambda m: jnp.asarray(train_fn(m)), masks[i])
        row = jnp.reshape(row, (-1,)) if row.ndim == 0 else row
        if row.shape != (num_targets,):
            raise ValueError(f"`train_fn(mask)` must return the metric of the {num_targets} "
                             f"target examples, shape ({num_targets},); got {row.shape}.")
        rows.append(row.astype(dtype))
    return jnp.stack(rows)


def _check_real(real_masks, real_labels, cfg: WorkflowConfig, train_fn):
    if (real_masks is None) != (real_labels is None):
        raise ValueError("give both `real_masks` and `real_labels`, or neither.")
    if train_fn is not None and not callable(train_fn):
        raise TypeError(f"`train_fn` must be callable train_fn(mask [K]) -> [T], got {train_fn!r}.")
    if (cfg.num_real or cfg.num_heldout) and train_fn is None:
        raise ValueError(f"num_real={cfg.num_real} and num_heldout={cfg.num_heldout} real runs "
                         "need `train_fn`; pass it, or set both to 0.")
    if real_masks is not None and cfg.num_real:
        raise ValueError("give real labels either as `real_masks`/`real_labels` or through "
                         "`train_fn` with `num_real`, not both.")


def run_workflow(
    key: jax.Array,
    wf: Workflow,
    train_inputs: Any,
    train_labels: Any,
    task_ids: Any,
    target_inputs: Any,
    target_labels: Any,
    *,
    train_fn: Optional[Callable] = None,
    real_masks: Any = None,
    real_labels: Any = None,
    progress: bool = True,
    jit: bool = True,
) -> WorkflowResult:
    """Run every stage of a :class:`Workflow`: masks, features, labels, surrogate, attributions.

    ``key`` is split into six keys (masks, projection, real masks, held-out masks, landmarks,
    bootstrap), so a run depends only on ``key``, the data and the configuration. The stages
    are the :class:`Workflow` methods; the numbers equal calling them (or the public functions
    they wrap) one by one.

    Args:
      key: typed PRNG key.
      wf: :class:`Workflow` (:func:`workflow`).
      train_inputs: pytree of ``[n, ...]`` training inputs.
      train_labels: ``[n]`` their labels (targets, 0/1, or class ids, as the loss needs).
      task_ids: ``[n]`` ints in ``0..K-1``, the task of each training example.
      target_inputs: pytree of ``[T, ...]`` target inputs (the examples whose loss is
        attributed).
      target_labels: ``[T]`` their labels, in the same encoding as ``train_labels``.
      train_fn: optional ``train_fn(mask) -> [T]``: the real target metric of the model trained
        (e.g. fine-tuned from ``W0``) on the tasks in ``mask`` (``[K]`` float 0/1); called
        ``num_real + num_heldout`` times, in Python.
      real_masks, real_labels: optional real labels you already have (``[r, K]``, ``[r, T]``),
        fitted together with the estimated ones (:func:`kernattr.fit_multifidelity`).
      progress: show a ``tqdm`` progress bar over the stages and real runs.
      jit: compile each stage with ``jax.jit`` (``False``: run eagerly, e.g. to debug).

    Returns:
      :class:`WorkflowResult`.

    Raises:
      ValueError / TypeError: bad data (from the stage that receives it, naming the argument)
        or a configuration that needs what is missing (``num_real`` without ``train_fn``).

    >>> import jax, jax.numpy as jnp, kernattr as ka
    >>> x = jax.random.normal(jax.random.key(0), (40, 3))
    >>> wf = ka.workflow(lambda p, x: x @ p, jnp.ones(3), num_tasks=4, loss="squared",
    ...                  num_masks=24, proj_kind="identity", gamma=0.5, ridge=0.1, mix=0.5)
    >>> res = ka.run_workflow(jax.random.key(1), wf, x, x[:, 0], jnp.arange(40) % 4,
    ...                       x[:5], x[:5, 1], progress=False)
    >>> res.shapley.value.shape, res.interactions.shape
    ((4, 5), (4, 4, 5))
    """
    from tqdm import tqdm  # text bar (tqdm.auto warns in notebooks without ipywidgets)

    if not isinstance(wf, Workflow):
        raise TypeError(f"`wf` must be a kernattr.Workflow (kernattr.workflow(...)), got "
                        f"{type(wf).__name__}.")
    cfg = wf.config
    _check_real(real_masks, real_labels, cfg, train_fn)
    k_masks, k_proj, k_real, k_held, k_fit, k_boot = jax.random.split(key, 6)
    f = _JITTED if jit else _STAGES
    c = {name: _stage_config(cfg, name) for name in _STAGES}
    wf_features = Workflow(config=c["features"], apply_fn=wf.apply_fn, params=wf.params)
    batch = cfg.mask_batch or cfg.num_masks
    starts = list(range(0, cfg.num_masks, batch))
    total = 5 + len(starts) + cfg.num_real + cfg.num_heldout + (1 if cfg.num_heldout else 0)
    with tqdm(total=total, disable=not progress, leave=False) as bar:
        clock = _Clock(bar)
        masks = clock.run("masks", f["masks"], c["masks"], k_masks)
        train = clock.run("features", f["features"], wf_features, k_proj, train_inputs,
                          train_labels, task_ids)
        target = clock.run("features", f["features"], wf_features, k_proj, target_inputs,
                           target_labels)
        labels = jnp.concatenate([clock.run("labels", f["labels"], c["labels"], train, target,
                                            masks[s:s + batch]) for s in starts])
        num_targets = labels.shape[1]
        heldout_masks = heldout_labels = None
        if cfg.num_real:
            real_masks = sample_subsets(k_real, num_tasks=cfg.num_tasks, num_subsets=cfg.num_real,
                                        p=cfg.density)
            real_labels = _real_runs(clock, train_fn, real_masks, num_targets, labels.dtype)
        if cfg.num_heldout:
            heldout_masks = sample_subsets(k_held, num_tasks=cfg.num_tasks,
                                           num_subsets=cfg.num_heldout, p=cfg.density)
            heldout_labels = _real_runs(clock, train_fn, heldout_masks, num_targets, labels.dtype)
        fit_key = k_fit if cfg.num_landmarks else None
        surrogate = clock.run("surrogate", f["surrogate"], c["surrogate"], masks, labels,
                              real_masks, real_labels, fit_key)
        attrs = clock.run("attributions", f["attributions"], c["attributions"], surrogate)
        lds = None
        if cfg.num_heldout:
            lds = clock.run("lds", f["lds"], c["lds"], k_boot, surrogate, heldout_masks,
                            heldout_labels)
    return WorkflowResult(
        config=cfg, masks=masks, labels=labels, real_masks=real_masks, real_labels=real_labels,
        heldout_masks=heldout_masks, heldout_labels=heldout_labels, surrogate=surrogate,
        loo=attrs.loo, shapley=attrs.shapley, interactions=attrs.interactions, lds=lds,
        timings=WorkflowTimings(**clock.times),
    )
