"""``from_nnx``: a Flax NNX module as a pure ``apply_fn(params, x)`` and a params pytree."""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx


def from_nnx(
    module: nnx.Module,
    *,
    filter: Any = nnx.Param,
    deterministic: bool = True,
    add_batch_axis: bool = True,
) -> tuple[Callable[[Any, jax.Array], jax.Array], nnx.State]:
    """Split an NNX module into a pure function of ONE example and the parameters to linearize.

    The user's module is never mutated: it is split with ``nnx.split`` (after ``nnx.view`` in
    deterministic mode, which returns a new module sharing the arrays), and ``apply_fn`` merges a
    fresh module from the graph definition on every call. Parameters selected by ``filter`` are
    the ``params`` pytree (what gradients, projection, and fine-tuning act on); every other state
    (unselected parameters, batch statistics, RNG state) is closed over as a constant.

    Args:
      module: a ``flax.nnx.Module`` whose ``__call__`` maps a batch of inputs ``[B, ...]`` to
        outputs ``[B, ...]`` (or one unbatched input when ``add_batch_axis=False``).
      filter: an NNX filter selecting the linearized parameters (default ``nnx.Param``: all of
        them). E.g. ``nnx.All(nnx.Param, nnx.PathContains("unembed"))`` for the last layer only.
      deterministic: evaluate in inference mode (``deterministic=True`` for dropout,
        ``use_running_average=True`` for batch norm) through ``nnx.view``; the caller's module
        keeps its own flags.
      add_batch_axis: ``apply_fn`` adds a leading batch axis of one before calling the module and
        removes it afterwards (the module is written for batches, kernattr passes one example).

    Returns:
      ``(apply_fn, params)``: ``apply_fn(params, x)`` evaluates the module on one example ``x``
      (a scalar or ``[C]`` outputs); ``params`` is an ``nnx.State`` pytree with ``D`` entries.

    Raises:
      TypeError: ``module`` is not an ``nnx.Module``.
      ValueError: the filter selects no parameters.

    >>> from flax import nnx
    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> apply_fn, params = from_nnx(model)
    >>> apply_fn(params, jax.numpy.ones(3)).shape
    (2,)
    """
    if not isinstance(module, nnx.Module):
        raise TypeError(f"`module` must be a flax.nnx.Module, got {type(module).__name__}.")
    view = module
    if deterministic:
        view = nnx.view(
            module, deterministic=True, use_running_average=True, raise_if_not_found=False
        )
    graphdef, params, rest = nnx.split(view, filter, ...)
    if not jax.tree.leaves(params):
        raise ValueError(
            "`filter` selects no parameters of `module`; pass e.g. nnx.Param or a path filter "
            "that matches at least one parameter."
        )

    def apply_fn(params, x):
        model = nnx.merge(graphdef, params, rest, copy=True)
        if add_batch_axis:
            return model(jax.numpy.asarray(x)[None])[0]
        return model(x)

    return apply_fn, params
