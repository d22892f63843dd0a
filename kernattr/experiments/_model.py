"""The experiment's model: an NNX transformer on modular-arithmetic examples, and its pretraining."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ..adapters import Transformer, answer_fn, from_nnx
from .. import groundtruth as gt
from .modular import ModularData


class ModelSpec(NamedTuple):
    """How to build the model (all static ints)."""

    d_model: int = 32
    num_heads: int = 2
    num_layers: int = 1
    d_mlp: int = 64


def build_model(data: ModularData, spec: ModelSpec, key: jax.Array):
    """Returns ``(apply_fn, params, init_fn)``.

    ``apply_fn(params, example [4]) -> [C]`` answer logits; ``params`` the initial parameters
    (from ``key``); ``init_fn(key) -> params`` a fresh initialisation (retraining from scratch).
    """

    def make(k):
        model = Transformer(
            vocab_size=data.vocab_size,
            num_classes=data.num_classes,
            seq_len=3,
            d_model=spec.d_model,
            num_heads=spec.num_heads,
            num_layers=spec.num_layers,
            d_mlp=spec.d_mlp,
            rngs=nnx.Rngs(params=k),
        )
        return from_nnx(model)

    logits_fn, params = make(key)
    apply_fn = answer_fn(logits_fn, output="logits")

    def init_fn(k):
        return make(k)[1]

    return apply_fn, params, init_fn


def pretrain(
    apply_fn: Callable,
    params: Any,
    data: ModularData,
    *,
    num_steps: int,
    learning_rate: float,
    weight_decay: float,
) -> Any:
    """``W0``: full-batch AdamW on ALL tasks (the all-ones mask of the task-weighted objective)."""
    ones = jnp.ones((1, int(data.task_ids.max()) + 1))
    opt = optax.adamw(learning_rate, weight_decay=weight_decay)
    stacked = gt.finetune_on_masks(
        apply_fn, params, jnp.asarray(data.train_inputs), jnp.asarray(data.train_labels),
        jnp.asarray(data.task_ids), ones, loss="softmax", optimizer=opt, num_steps=num_steps,
    )
    return jax.tree.map(lambda x: x[0], stacked)


def restrict_to(apply_fn: Callable, params: Any, name: str) -> tuple[Callable, Any]:
    """``(apply_fn', sub)``: the model as a function of ``params[name]`` alone, every other
    parameter frozen at its value in ``params`` (e.g. ``name="unembed"``: last-layer fine-tuning,
    where the logits are linear in the trained parameters and linearizing them is exact)."""
    if name not in params:
        raise ValueError(f"no parameter group {name!r}; the model has {list(params.keys())}.")
    frozen = dict(params)

    def sub_apply(sub, x):
        return apply_fn(type(params)({**frozen, name: sub}), x)

    return sub_apply, params[name]
