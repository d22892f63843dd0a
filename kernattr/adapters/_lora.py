"""LoRA (low-rank adaptation) for any ``(apply_fn, params)`` pair, e.g. one from :func:`from_nnx`.

A projection kernel ``W`` (``[I..., O...]``: input axes, then output axes) is adapted as
``W + scale · (A B)`` reshaped to ``W``'s shape, with ``A [I, r]`` and ``B [r, O]`` (``I``, ``O``
the products of the input and output axes). Since the model sees ``x W + scale · (x A) B`` this
is exactly the LoRA forward; adapting the parameters rather than the modules makes it work on
any model whose parameters are a pytree, without rewriting its modules. ``B`` starts at zero
(the adapted model equals the base model) and ``A`` at a random Gaussian of variance ``1/I``.

The LoRA parameters are a plain dict ``{keystr(path): {"a": A, "b": B}}``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["from_lora", "lora_merge", "lora_targets", "nnx_input_axes"]

PyTree = Any


def nnx_input_axes(path: str, shape: tuple) -> int:
    """Number of leading input axes of a kernel, for Flax NNX layers.

    ``nnx.Linear`` kernels ``[I, O]`` and the query/key/value kernels of
    ``nnx.MultiHeadAttention`` (``[I, heads, head_dim]``) have one input axis; the attention
    output kernel (``[heads, head_dim, O]``, path containing ``['out']`` below ``attn``) has two.

    >>> nnx_input_axes("['attn']['out']['kernel'].value", (4, 8, 32))
    2
    >>> nnx_input_axes("['mlp_in']['kernel'].value", (32, 64))
    1
    """
    if len(shape) == 3 and "['out']" in path and "attn" in path:
        return 2
    return 1


def lora_targets(params: PyTree, include: Optional[Callable[[str], bool]] = None) -> tuple:
    """Key-path strings of the leaves LoRA adapts: every ``kernel`` leaf of rank >= 2 whose path
    ``include(path)`` accepts (default: all of them).

    Args:
      params: parameter pytree (e.g. an ``nnx.State`` from :func:`from_nnx`).
      include: optional predicate on :func:`jax.tree_util.keystr` paths.

    Returns:
      A tuple of path strings, in the pytree's order.

    >>> lora_targets({"mlp": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)}})
    ("['mlp']['kernel']",)
    """
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        s = jax.tree_util.keystr(path)
        if "kernel" in s and np.ndim(leaf) >= 2 and (include is None or include(s)):
            out.append(s)
    return tuple(out)


def _split_shape(shape: tuple, n_in: int) -> tuple[int, int]:
    if not 1 <= n_in < len(shape):
        raise ValueError(f"input axes {n_in} must lie in 1..{len(shape) - 1} for a kernel of shape {shape}.")
    return int(np.prod(shape[:n_in])), int(np.prod(shape[n_in:]))


def lora_merge(params: PyTree, lora_params: dict, *, scale: float = 1.0) -> PyTree:
    """``params`` with every adapted kernel replaced by ``W + scale · reshape(A B)``.

    Args:
      params: base parameter pytree (``D`` numbers).
      lora_params: ``{path: {"a": [I, r], "b": [r, O]}}`` (from :func:`from_lora`).
      scale: LoRA scale ``alpha / r``.

    Returns:
      A pytree like ``params``.

    Raises:
      ValueError: a path of ``lora_params`` is not a leaf of ``params``, or ``A B`` does not
        have the kernel's size.

    >>> p = {"w": {"kernel": jnp.zeros((2, 3))}}
    >>> lp = {"['w']['kernel']": {"a": jnp.ones((2, 1)), "b": jnp.ones((1, 3))}}
    >>> lora_merge(p, lp, scale=0.5)["w"]["kernel"].tolist()
    [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]
    """
    if not isinstance(lora_params, dict):
        raise TypeError(f"`lora_params` must be a dict {{path: {{'a', 'b'}}}}, got {type(lora_params).__name__}.")
    seen = set()

    def merge(path, w):
        s = jax.tree_util.keystr(path)
        if s not in lora_params:
            return w
        seen.add(s)
        a, b = lora_params[s]["a"], lora_params[s]["b"]
        if a.shape[0] * b.shape[-1] != np.size(w):
            raise ValueError(f"LoRA factors {a.shape} x {b.shape} do not match kernel {s} of shape {w.shape}.")
        return w + (scale * (a @ b)).reshape(w.shape).astype(w.dtype)

    out = jax.tree_util.tree_map_with_path(merge, params)
    missing = set(lora_params) - seen
    if missing:
        raise ValueError(f"`lora_params` paths not found in `params`: {sorted(missing)}.")
    return out


def from_lora(
    apply_fn: Callable[[PyTree, Any], jax.Array],
    params: PyTree,
    key: jax.Array,
    *,
    rank: int,
    alpha: Optional[float] = None,
    targets: Optional[tuple] = None,
    input_axes: Callable[[str, tuple], int] = nnx_input_axes,
) -> tuple[Callable[[dict, Any], jax.Array], dict]:
    """LoRA of rank ``r`` on a model: ``(lora_apply_fn, lora_params)``, the base frozen.

    Args:
      apply_fn: ``apply_fn(params, x)`` for one example (e.g. from :func:`from_nnx`).
      params: the frozen base parameters ``W0``.
      key: typed PRNG key for the ``A`` factors (``jax.random.key(seed)``).
      rank: ``r >= 1``.
      alpha: LoRA alpha; the scale is ``alpha / r`` (default ``alpha = r``: scale 1).
      targets: key-path strings of the adapted kernels (default :func:`lora_targets`).
      input_axes: ``input_axes(path, shape) -> int`` leading input axes of a kernel (default
        :func:`nnx_input_axes`).

    Returns:
      ``lora_apply_fn(lora_params, x) = apply_fn(lora_merge(params, lora_params), x)`` and the
      initial ``lora_params`` (``B = 0``, so ``lora_apply_fn`` equals ``apply_fn`` at ``params``).

    Raises:
      ValueError: ``rank < 1``, no kernel selected, or a target not found.
      TypeError: ``apply_fn`` not callable.

    >>> f = lambda p, x: x @ p["w"]["kernel"]
    >>> params = {"w": {"kernel": jnp.ones((3, 2))}}
    >>> g, lp = from_lora(f, params, jax.random.key(0), rank=1)
    >>> lp["['w']['kernel']"]["a"].shape, g(lp, jnp.ones(3)).tolist()
    ((3, 1), [3.0, 3.0])
    """
    if not callable(apply_fn):
        raise TypeError(f"`apply_fn` must be callable apply_fn(params, x), got {apply_fn!r}.")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"`rank` must be an int >= 1, got {rank!r}.")
    scale = 1.0 if alpha is None else float(alpha) / rank
    if targets is None:
        targets = lora_targets(params)
    if not targets:
        raise ValueError("no kernel selected for LoRA: `targets` is empty.")
    leaves = {jax.tree_util.keystr(p): l for p, l in jax.tree_util.tree_flatten_with_path(params)[0]}
    lora_params = {}
    for i, s in enumerate(targets):
        if s not in leaves:
            raise ValueError(f"LoRA target {s!r} is not a leaf of `params`.")
        w = leaves[s]
        n_in, n_out = _split_shape(tuple(np.shape(w)), input_axes(s, tuple(np.shape(w))))
        a = jax.random.normal(jax.random.fold_in(key, i), (n_in, rank), jnp.asarray(w).dtype)
        lora_params[s] = {"a": a / np.sqrt(n_in), "b": jnp.zeros((rank, n_out), jnp.asarray(w).dtype)}

    def lora_apply_fn(lp, x):
        return apply_fn(lora_merge(params, lp, scale=scale), x)

    return lora_apply_fn, lora_params
