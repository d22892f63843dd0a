"""Real fine-tuning (or retraining) on many task subsets at once, vmapped over masks.

This is the ground truth the estimator and the surrogates are judged against: real training
on each mask, made cheap by training many small models at once. One model per mask is trained with an optax optimizer on the
task-weighted objective of that mask; all masks of a chunk train in one ``jax.vmap``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import _checks
from .._checks import check_count, check_key, num_examples
from ..labels._losses import check_loss_metric, example_loss, example_metric, task_weights

__all__ = ["FinetuneLabels", "evaluate_targets", "finetune_labels", "finetune_on_masks"]

PyTree = Any


# ----------------------------------------------------------------------------- validation


def _check_labels(labels: Any, n: int, loss: str, name: str = "labels") -> jax.Array:
    """Per-example labels for ``loss``: class ids ``[n]`` for softmax, ``[n, ...]`` otherwise."""
    return _checks.check_example_labels(labels, n, name, vector=loss == "softmax",
                                        shape_doc="[n] (integer class ids for softmax)")


# ----------------------------------------------------------------------------- training


def _tree_sqnorm(a: PyTree, b: PyTree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda x, y: jnp.sum((x - y) ** 2), a, b))
    return sum(leaves, jnp.zeros((), leaves[0].dtype)) if leaves else jnp.zeros(())


def _take(tree: PyTree, idx: jax.Array) -> PyTree:
    return jax.tree_util.tree_map(lambda x: jnp.take(x, idx, axis=0), tree)


def _make_trainer(
    apply_fn: Callable,
    inputs: PyTree,
    labels: jax.Array,
    *,
    loss: str,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    batch_size: Optional[int],
    prox: float,
    task_ids: jax.Array,
    num_tasks: int,
) -> Callable:
    """Returns ``train(params_start, weights [n], mask [K], key) -> params`` for ONE mask."""
    extra_args = isinstance(optimizer, optax.GradientTransformationExtraArgs)
    use_prox = not (_checks.is_concrete(prox) and float(prox) == 0.0)
    if batch_size is not None:
        # Examples grouped by task: task k occupies order[starts[k] : starts[k] + counts[k]].
        order = jnp.argsort(task_ids, stable=True)
        counts = _checks.task_counts(task_ids, num_tasks)
        starts = jnp.cumsum(counts) - counts

    def draw(mask, key):
        """``batch_size`` example indices: a task uniformly among the selected ones (Gumbel-max
        with per-task noise shared by all masks), then an example uniformly within that task."""
        kg, ku = jax.random.split(key)
        gumbel = jax.random.gumbel(kg, (batch_size, num_tasks))
        task = jnp.argmax(jnp.where(mask[None, :] > 0, gumbel, -jnp.inf), axis=1)
        u = jax.random.uniform(ku, (batch_size,))
        within = jnp.minimum(jnp.floor(u * counts[task]).astype(jnp.int32), counts[task] - 1)
        return order[starts[task] + jnp.maximum(within, 0)]

    def per_example_losses(params, x, y):
        outs = jax.vmap(apply_fn, in_axes=(None, 0))(params, x)
        return jax.vmap(lambda o, t: example_loss(o, t, loss))(outs, y)

    def train(params_start, weights, mask, key):
        total = jnp.sum(weights)

        def objective(params, batch_idx):
            if batch_idx is None:
                data_term = jnp.sum(weights * per_example_losses(params, inputs, labels))
            else:
                xb, yb = _take(inputs, batch_idx), jnp.take(labels, batch_idx, axis=0)
                # Examples drawn with probability w_i / Σw: Σw · mean ℓ is unbiased for Σ w_i ℓ_i.
                data_term = total * jnp.mean(per_example_losses(params, xb, yb))
            if use_prox:
                data_term = data_term + 0.5 * prox * _tree_sqnorm(params, params_start)
            return data_term

        def step(carry, step_index):
            params, opt_state = carry
            if batch_size is None:
                batch_idx = None
            else:
                batch_idx = draw(mask, jax.random.fold_in(key, step_index))
            value_fn = lambda p: objective(p, batch_idx)  # noqa: E731
            value, grads = jax.value_and_grad(value_fn)(params)
            if extra_args:
                updates, opt_state = optimizer.update(
                    grads, opt_state, params, value=value, grad=grads, value_fn=value_fn
                )
            else:
                updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return (params, opt_state), None

        opt_state = optimizer.init(params_start)
        (params, _), _ = jax.lax.scan(step, (params_start, opt_state), jnp.arange(num_steps))
        # All-zero mask: no training data, the model stays exactly where it started.
        trained = total > 0
        return jax.tree_util.tree_map(
            lambda p, p0: jnp.where(trained, p, p0).astype(p0.dtype), params, params_start
        )

    return train


def _check_training_config(apply_fn, optimizer, num_steps, batch_size, mask_chunk_size, init_fn,
                           prox):
    """The training configuration shared by :func:`finetune_on_masks` and :func:`finetune_fn`
    (everything but the loss and the arrays); returns the checked ``(num_steps, batch_size,
    mask_chunk_size)``."""
    num_steps = check_count(num_steps, "num_steps", minimum=0)
    if batch_size is not None:
        batch_size = check_count(batch_size, "batch_size")
    if mask_chunk_size is not None:
        mask_chunk_size = check_count(mask_chunk_size, "mask_chunk_size")
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"`optimizer` must be an optax.GradientTransformation (e.g. optax.adam(1e-3)), got {optimizer!r}."
        )
    if not callable(apply_fn):
        raise TypeError(f"`apply_fn` must be callable apply_fn(params, x), got {apply_fn!r}.")
    if init_fn is not None and not callable(init_fn):
        raise TypeError(f"`init_fn` must be callable init_fn(key) -> params, got {init_fn!r}.")
    if isinstance(prox, (str, bytes)) or prox is None:
        raise TypeError(f"`prox` must be a float >= 0, got {prox!r}.")
    _checks.check_hyperparameter(prox, "prox", allow_zero=True)
    return num_steps, batch_size, mask_chunk_size


def finetune_on_masks(
    apply_fn: Callable,
    params0: PyTree,
    inputs: PyTree,
    labels: Any,
    task_ids: Any,
    masks: Any,
    *,
    loss: str,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    batch_size: Optional[int] = None,
    key: Optional[jax.Array] = None,
    prox: float = 0.0,
    mask_chunk_size: Optional[int] = None,
    init_fn: Optional[Callable[[jax.Array], PyTree]] = None,
    shared_init: bool = True,
    common_random_numbers: bool = True,
) -> PyTree:
    """Fine-tunes one model per task subset (mask), all masks of a chunk in one ``vmap``.

    For mask ``s`` the objective is

    ``L_s(W) = Σ_i w_i(s) ℓ(f(x_i; W), y_i) + (prox/2) ||W − W_start||²``

    with ``w = kernattr.task_weights`` (each selected task's MEAN loss counts equally,
    ``w_i = s[t_i] / (n_{t_i} Σ_k s_k)``, so the weights sum to 1) and ``ℓ`` the shared per-example
    loss (``"squared"``: ``½(f−y)²``, ``"logistic"``: ``log(1+e^{−z f})``, ``"softmax"``: cross
    entropy) — the same objective the gradient estimator linearizes. ``num_steps`` optimizer steps
    are taken from ``W_start``:

    * fine-tuning (``init_fn=None``): ``W_start = params0`` for every mask;
    * retraining from scratch (``init_fn`` given): ``W_start = init_fn(k)``. With
      ``shared_init=True`` (default) every mask starts from the SAME init ``k = fold_in(key, 0)``
      (common random numbers: differences between masks are not blurred by init noise); with
      ``shared_init=False`` mask ``j`` starts from ``k = fold_in(fold_in(key, 0), j)``.

    An all-zero mask has no data: its parameters are returned exactly equal to ``W_start``
    (``params0`` when fine-tuning), whatever the optimizer.

    ``batch_size=None`` takes full-batch steps (deterministic, no key needed). Otherwise each step
    draws ``batch_size`` examples with replacement, example ``i`` with probability ``w_i / Σ w``
    (a selected task uniformly, then one of its examples uniformly), and uses
    ``Σw · mean ℓ(batch)`` (an unbiased estimate of the data term). The task of each draw is the
    Gumbel-max over the selected tasks of per-task noise, so with ``common_random_numbers=True``
    (default; the noise of step ``t`` comes from ``fold_in(fold_in(key, 1), t)`` for every mask)
    two masks that differ in task ``k`` see the SAME batch except for the draws that land on
    ``k``: differences between masks (leave-one-out effects) are not buried in sampling noise.
    With ``False`` mask ``j`` uses ``fold_in(fold_in(fold_in(key, 1), j), t)`` (independent
    draws). Either way results are deterministic from ``key`` and do not depend on
    ``mask_chunk_size`` or on the other masks.

    Optimizers that take extra arguments (e.g. ``optax.lbfgs``) receive ``value``, ``grad`` and
    ``value_fn`` (the objective of the current batch).

    Args:
      apply_fn: ``apply_fn(params, x) -> scalar or [C]`` for ONE unbatched example (the same
        convention as :func:`kernattr.projected_gradients`).
      params0: parameter pytree ``W0`` (``D`` numbers in all). May be ``None`` when ``init_fn`` is
        given.
      inputs: array or pytree of arrays with a leading ``[n]`` example axis.
      labels: ``[n]`` regression targets / 0-1 labels / integer class ids (``"softmax"``).
      task_ids: ``[n]`` integer task of each example, in ``0..K-1``.
      masks: ``[m, K]`` 0/1 subset masks (bool/int accepted).
      loss: ``"squared"``, ``"logistic"`` or ``"softmax"``.
      optimizer: an ``optax.GradientTransformation`` (e.g. ``optax.adam(1e-3)``).
      num_steps: number of optimizer steps per mask.
      batch_size: minibatch size, or ``None`` for full-batch steps.
      key: typed PRNG key; required when ``batch_size`` or ``init_fn`` is given.
      prox: strength of the proximal term ``(prox/2)||W − W_start||²`` that keeps fine-tuning near
        the start (the regime a first-order estimator is for). ``0`` disables it.
      mask_chunk_size: masks trained together in one ``vmap``; memory grows with it. ``None``
        trains all ``m`` masks at once. Chunks run through ``lax.map`` (jit-compatible), one chunk
        after the other. Vmapping masks pays off while one mask's step leaves the hardware idle
        (tiny models, accelerators); once a step is matmul-bound (larger models on CPU) small
        chunks (1–4) are as fast and use less memory (the benchmarks page has the trade-off).
      init_fn: ``init_fn(key) -> params`` for retraining from scratch; ``None`` fine-tunes from
        ``params0``.
      shared_init: with ``init_fn``, start every mask from the same init (see above).
      common_random_numbers: with ``batch_size``, couple the minibatch draws of all masks (see
        above).

    Returns:
      A pytree like ``params0`` whose leaves carry a leading ``[m]`` mask axis: the parameters
      trained on each mask.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from kernattr.groundtruth import finetune_on_masks
      >>> apply_fn = lambda w, x: x @ w
      >>> x = jnp.ones((4, 2)); y = jnp.arange(4.0); t = jnp.array([0, 0, 1, 1])
      >>> masks = jnp.array([[1.0, 1.0], [1.0, 0.0]])
      >>> W = finetune_on_masks(apply_fn, jnp.zeros(2), x, y, t, masks, loss="squared",
      ...                       optimizer=optax.sgd(0.1), num_steps=10)
      >>> W.shape
      (2, 2)
    """
    check_loss_metric(loss)
    masks = _checks.check_masks(masks, "masks")
    m, num_tasks = masks.shape
    n = num_examples(inputs, "inputs")
    labels = _check_labels(labels, n, loss, "labels")
    task_ids, _ = _checks.check_task_ids(
        task_ids, num_tasks=num_tasks, num_examples=n, nonempty=True
    )
    num_steps, batch_size, mask_chunk_size = _check_training_config(
        apply_fn, optimizer, num_steps, batch_size, mask_chunk_size, init_fn, prox
    )
    if init_fn is None and params0 is None:
        raise ValueError("`params0` is None: pass the parameters to fine-tune, or `init_fn`.")
    if (batch_size is not None or init_fn is not None) and key is None:
        raise ValueError(
            "`key` is required when `batch_size` (minibatch draws) or `init_fn` (random init) is given; "
            "pass key=jax.random.key(seed)."
        )
    if key is not None:
        key = check_key(key)
        init_key, batch_key = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
    else:
        init_key = batch_key = jax.random.key(0)  # unused: full batch and no init_fn

    param_dtypes = [jnp.asarray(p).dtype for p in jax.tree_util.tree_leaves(params0)]
    w_dtype = jnp.result_type(*param_dtypes) if param_dtypes else masks.dtype
    if not jnp.issubdtype(w_dtype, jnp.floating):
        w_dtype = masks.dtype
    weights = task_weights(masks.astype(w_dtype), task_ids, num_tasks)  # [m, n]

    train = _make_trainer(
        apply_fn,
        inputs,
        labels,
        loss=loss,
        optimizer=optimizer,
        num_steps=num_steps,
        batch_size=batch_size,
        prox=prox,
        task_ids=task_ids,
        num_tasks=num_tasks,
    )

    if init_fn is not None and shared_init:
        params0 = init_fn(init_key)

    def per_mask(args):
        w, s, j = args
        if init_fn is not None and not shared_init:
            start = init_fn(jax.random.fold_in(init_key, j))
        else:
            start = params0
        mask_key = batch_key if common_random_numbers else jax.random.fold_in(batch_key, j)
        return train(start, w, s, mask_key)

    index = jnp.arange(m)
    # No progress bar and no jit here: drivers (experiments, CLI) jit this and show progress.
    if mask_chunk_size is None or mask_chunk_size >= m:
        return jax.vmap(lambda w, s, j: per_mask((w, s, j)))(weights, masks, index)
    return jax.lax.map(per_mask, (weights, masks, index), batch_size=mask_chunk_size)


def evaluate_targets(
    apply_fn: Callable,
    stacked_params: PyTree,
    inputs: PyTree,
    labels: Any,
    *,
    loss: str,
    metric: str = "loss",
    mask_chunk_size: Optional[int] = None,
) -> jax.Array:
    """Target metric of every target example under every mask's parameters.

    ``F[j, t] = example_metric(f(x_t; W_j), y_t)`` with the shared metric definitions of
    :mod:`kernattr.labels._losses` (``"loss"``; ``"margin"``; ``"output"``), the same numbers the
    estimator returns as ``F̂``.

    Args:
      apply_fn: ``apply_fn(params, x) -> scalar or [C]`` for one unbatched example.
      stacked_params: parameter pytree with a leading ``[m]`` axis (from :func:`finetune_on_masks`).
      inputs: target inputs, array or pytree with a leading ``[T]`` axis.
      labels: ``[T]`` target labels.
      loss: ``"squared"``, ``"logistic"`` or ``"softmax"`` (defines the metric).
      metric: ``"loss"``, ``"margin"`` or ``"output"``.
      mask_chunk_size: masks evaluated together (``lax.map``); ``None`` evaluates all at once.

    Returns:
      ``[m, T]`` metric values.

    Example:
      >>> import jax.numpy as jnp
      >>> from kernattr.groundtruth import evaluate_targets
      >>> W = jnp.array([[1.0, 0.0], [0.0, 1.0]])           # m=2 parameter vectors
      >>> evaluate_targets(lambda w, x: x @ w, W, jnp.eye(2), jnp.zeros(2), loss="squared")
      Array([[0.5, 0. ],
             [0. , 0.5]], dtype=float32)
    """
    check_loss_metric(loss, metric)
    T = num_examples(inputs, "inputs")
    labels = _check_labels(labels, T, loss, "labels")
    leaves = jax.tree_util.tree_leaves(stacked_params)
    if not leaves:
        raise ValueError("`stacked_params` is empty: pass a parameter pytree with a leading [m] axis.")
    ms = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
    if None in ms or len(ms) != 1:
        raise ValueError(
            "`stacked_params` leaves must share a leading [m] mask axis, "
            f"got leading sizes {sorted(map(str, ms))}."
        )
    if mask_chunk_size is not None:
        mask_chunk_size = check_count(mask_chunk_size, "mask_chunk_size")

    def one(params):
        outs = jax.vmap(apply_fn, in_axes=(None, 0))(params, inputs)
        return jax.vmap(lambda o, y: example_metric(o, y, loss, metric))(outs, labels)

    if mask_chunk_size is None:
        return jax.vmap(one)(stacked_params)
    return jax.lax.map(one, stacked_params, batch_size=mask_chunk_size)


class FinetuneLabels(NamedTuple):
    """Real subset labels from fine-tuning (a pytree).

    Attributes:
      labels: ``[m, T]`` target metric after fine-tuning on each mask (``F``).
      base: ``[T]`` target metric at the starting parameters ``params0`` (``F0``).
      params: the stacked fine-tuned parameters (leading ``[m]`` axis), or ``None`` when
        ``return_params=False``.
    """

    labels: jax.Array
    base: jax.Array
    params: Optional[PyTree]


def finetune_labels(
    apply_fn: Callable,
    params0: PyTree,
    inputs: PyTree,
    labels: Any,
    task_ids: Any,
    masks: Any,
    target_inputs: PyTree,
    target_labels: Any,
    *,
    loss: str,
    metric: str = "loss",
    return_params: bool = False,
    **finetune_kwargs: Any,
) -> FinetuneLabels:
    """Fine-tunes on every mask and evaluates the targets: the real labels ``F`` and ``F0``.

    :func:`finetune_on_masks` followed by :func:`evaluate_targets` on the fine-tuned models and on
    ``params0`` (the "nothing changes" reference). With ``init_fn`` (retraining from scratch),
    ``base`` is still evaluated at ``params0``.

    Args:
      apply_fn: ``apply_fn(params, x) -> scalar or [C]`` for one unbatched example.
      params0: parameter pytree ``W0``.
      inputs: training inputs with a leading ``[n]`` axis.
      labels: ``[n]`` training labels.
      task_ids: ``[n]`` integer task ids in ``0..K-1``.
      masks: ``[m, K]`` 0/1 masks.
      target_inputs: target inputs with a leading ``[T]`` axis.
      target_labels: ``[T]`` target labels.
      loss: ``"squared"``, ``"logistic"`` or ``"softmax"``.
      metric: ``"loss"``, ``"margin"`` or ``"output"``.
      return_params: also return the stacked fine-tuned parameters.
      **finetune_kwargs: keyword arguments of :func:`finetune_on_masks` (``optimizer``,
        ``num_steps``, ``batch_size``, ``key``, ``prox``, ``mask_chunk_size``, ``init_fn``, ...).

    Returns:
      A :class:`FinetuneLabels` ``(labels [m, T], base [T], params)``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from kernattr.groundtruth import finetune_labels
      >>> x = jnp.eye(2); y = jnp.ones(2); t = jnp.array([0, 1])
      >>> res = finetune_labels(lambda w, xi: xi @ w, jnp.zeros(2), x, y, t, jnp.eye(2), x, y,
      ...                       loss="squared", optimizer=optax.sgd(1.0), num_steps=1)
      >>> res.labels.tolist(), res.base.tolist()
      ([[0.0, 0.5], [0.5, 0.0]], [0.5, 0.5])
    """
    stacked = finetune_on_masks(
        apply_fn, params0, inputs, labels, task_ids, masks, loss=loss, **finetune_kwargs
    )
    chunk = finetune_kwargs.get("mask_chunk_size")
    F = evaluate_targets(
        apply_fn, stacked, target_inputs, target_labels, loss=loss, metric=metric, mask_chunk_size=chunk
    )
    if params0 is not None:
        one = jax.tree_util.tree_map(lambda p: jnp.asarray(p)[None], params0)
        F0 = evaluate_targets(apply_fn, one, target_inputs, target_labels, loss=loss, metric=metric)[0]
    else:
        F0 = jnp.full((F.shape[1],), jnp.nan, F.dtype)
    return FinetuneLabels(labels=F, base=F0, params=stacked if return_params else None)


def finetune_fn(
    apply_fn: Callable,
    *,
    loss: str,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    batch_size: Optional[int] = None,
    prox: float = 0.0,
    mask_chunk_size: Optional[int] = None,
    init_fn: Optional[Callable[[jax.Array], PyTree]] = None,
    shared_init: bool = True,
    common_random_numbers: bool = True,
) -> Callable[..., PyTree]:
    """Configure :func:`finetune_on_masks` once; returns a pure function of arrays only.

    The training configuration (model, loss, optimizer, steps, batching, proximal strength) is
    checked here, eagerly, so the returned
    ``train(params0, inputs, labels, task_ids, masks, key=None) -> params [m, ...]`` can be
    passed to ``jax.jit`` directly and reused for many masks, data sets or starting points; its
    array arguments are checked on every call, as in :func:`finetune_on_masks`.

    Args:
      apply_fn: ``apply_fn(params, x) -> scalar or [C]`` for ONE unbatched example.
      loss: as in :func:`finetune_on_masks`, and so are ``optimizer``, ``num_steps``,
        ``batch_size``, ``prox``, ``mask_chunk_size``, ``init_fn``, ``shared_init`` and
        ``common_random_numbers``.

    Returns:
      ``train(params0, inputs [n, ...], labels [n], task_ids [n], masks [m, K], key=None)`` ->
      a pytree like ``params0`` with a leading ``[m]`` mask axis on every leaf.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from kernattr.groundtruth import finetune_fn
      >>> train = jax.jit(finetune_fn(lambda w, x: x @ w, loss="squared",
      ...                             optimizer=optax.sgd(0.1), num_steps=10))
      >>> x = jnp.ones((4, 2)); y = jnp.arange(4.0); t = jnp.array([0, 0, 1, 1])
      >>> train(jnp.zeros(2), x, y, t, jnp.array([[1.0, 1.0], [1.0, 0.0]])).shape
      (2, 2)
    """
    check_loss_metric(loss)
    num_steps, batch_size, mask_chunk_size = _check_training_config(
        apply_fn, optimizer, num_steps, batch_size, mask_chunk_size, init_fn, prox
    )

    def train(params0: PyTree, inputs: PyTree, labels: Any, task_ids: Any, masks: Any,
              key: Optional[jax.Array] = None) -> PyTree:
        return finetune_on_masks(apply_fn, params0, inputs, labels, task_ids, masks, loss=loss,
                                 optimizer=optimizer, num_steps=num_steps, batch_size=batch_size,
                                 key=key, prox=prox, mask_chunk_size=mask_chunk_size,
                                 init_fn=init_fn, shared_init=shared_init,
                                 common_random_numbers=common_random_numbers)

    return train
