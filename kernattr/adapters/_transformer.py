"""A small decoder-only NNX transformer and output functions for its answer token."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

OUTPUTS = ("logits", "logit", "margin", "logodds")


class _Block(nnx.Module):
    """Pre-norm block: causal multi-head self-attention and a GELU MLP, both residual."""

    def __init__(self, d_model: int, num_heads: int, d_mlp: int, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(d_model, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads, d_model, decode=False, deterministic=True, rngs=rngs
        )
        self.ln2 = nnx.LayerNorm(d_model, rngs=rngs)
        self.mlp_in = nnx.Linear(d_model, d_mlp, rngs=rngs)
        self.mlp_out = nnx.Linear(d_mlp, d_model, rngs=rngs)

    def __call__(self, h, mask):
        h = h + self.attn(self.ln1(h), mask=mask)
        return h + self.mlp_out(jax.nn.gelu(self.mlp_in(self.ln2(h))))


class Transformer(nnx.Module):
    """Decoder-only transformer that reads a short token sequence and returns answer logits.

    Token and learned position embeddings, ``num_layers`` pre-norm blocks (causal attention,
    MLP, layer norm), a final layer norm, and an unembedding read at the LAST position.

    Args:
      vocab_size: number of input token ids.
      num_classes: ``C``, number of answer classes (logits returned).
      seq_len: ``L``, input sequence length.
      d_model, num_heads, num_layers, d_mlp: width, heads, depth, MLP width.
      rngs: ``nnx.Rngs`` for initialisation.

    Call: ``tokens [B, L]`` int -> ``[B, C]`` logits of the answer token.

    >>> model = Transformer(vocab_size=8, num_classes=7, seq_len=3, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 3), jnp.int32)).shape
    (2, 7)
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        num_classes: int,
        seq_len: int,
        d_model: int = 32,
        num_heads: int = 2,
        num_layers: int = 1,
        d_mlp: int = 64,
        rngs: nnx.Rngs,
    ):
        if d_model % num_heads:
            raise ValueError(f"`d_model` ({d_model}) must be divisible by `num_heads` ({num_heads}).")
        self.seq_len = seq_len
        self.embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq_len, d_model)))
        self.blocks = nnx.List(
            [_Block(d_model, num_heads, d_mlp, rngs=rngs) for _ in range(num_layers)]
        )
        self.ln_f = nnx.LayerNorm(d_model, rngs=rngs)
        self.unembed = nnx.Linear(d_model, num_classes, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[1] != self.seq_len:
            raise ValueError(
                f"`tokens` must have shape [B, {self.seq_len}], got {tuple(tokens.shape)}."
            )
        h = self.embed(tokens) + self.pos[...][None]
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            h = block(h, mask)
        return self.unembed(self.ln_f(h[:, -1]))


def answer_output(logits: jax.Array, label: jax.Array, output: str) -> jax.Array:
    """One example's output from its answer logits ``[C]`` and integer class ``label``.

    ``"logits"``: the ``[C]`` logits; ``"logit"``: logit of the correct class; ``"margin"``:
    correct logit minus the best other logit; ``"logodds"``: ``log p_y − log(1 − p_y)`` of the
    softmax probability of the correct class (``logit_y − logsumexp_{c≠y} logit_c``).

    >>> answer_output(jnp.array([1.0, 3.0, 0.0]), jnp.array(1), "margin")
    Array(2., dtype=float32)
    """
    if output == "logits":
        return logits
    y = jnp.asarray(label).astype(jnp.int32)
    correct = logits[y]
    is_y = jnp.arange(logits.shape[-1]) == y
    others = jnp.where(is_y, -jnp.inf, logits)
    if output == "logit":
        return correct
    if output == "margin":
        return correct - jnp.max(others)
    if output == "logodds":
        return correct - jax.nn.logsumexp(others)
    raise ValueError(f"`output` must be one of {OUTPUTS}, got {output!r}.")


def answer_fn(
    apply_fn: Callable[[Any, jax.Array], jax.Array], *, output: str = "logits"
) -> Callable[[Any, jax.Array], jax.Array]:
    """Wrap a tokens->logits ``apply_fn`` into an output function of one labelled example.

    Args:
      apply_fn: ``apply_fn(params, tokens [L]) -> [C]`` (e.g. from :func:`from_nnx` on a
        :class:`Transformer`).
      output: one of ``OUTPUTS`` (see :func:`answer_output`).

    Returns:
      ``fn(params, example)`` where ``example`` is ``[L + 1]`` ints: the ``L`` tokens followed by
      the correct class; returns ``[C]`` for ``"logits"`` and a scalar otherwise.

    >>> from kernattr.adapters import from_nnx
    >>> f, params = from_nnx(Transformer(vocab_size=8, num_classes=7, seq_len=3, rngs=nnx.Rngs(0)))
    >>> answer_fn(f, output="margin")(params, jnp.array([1, 2, 7, 3])).shape
    ()
    """
    if output not in OUTPUTS:
        raise ValueError(f"`output` must be one of {OUTPUTS}, got {output!r}.")

    def fn(params, example):
        example = jnp.asarray(example)
        if example.ndim != 1:
            raise ValueError(
                f"`example` must be one unbatched example [L + 1] (tokens then label), got shape "
                f"{tuple(example.shape)}; vmap over examples."
            )
        return answer_output(apply_fn(params, example[:-1]), example[-1], output)

    return fn
