"""In-context learning of affine rules mod p: the data, an NNX transformer, and its training.

**The rule family.** A rule is ``r = (a, b)`` with ``a ∈ {1..p-1}``, ``b ∈ Z_p`` and
``r(x) = (a·x + b) mod p`` (``p`` prime, ``p(p-1)`` rules). A demonstration is a pair
``(x, y)``; a prompt is a sequence of demonstrations followed by a query ``x_q`` whose answer
``r(x_q)`` the model must predict. The family makes demonstrations interact for real:

* one demonstration ``(x, y)`` is consistent with ``p - 1`` rules (one per ``a``), which predict
  ``p - 1`` different answers at every other ``x_q``: alone it only answers the query ``x_q = x``;
* two demonstrations with distinct inputs identify the rule (``a = (y - y')/(x - x')``): all
  queries become answerable (**synergy**);
* a repeated demonstration adds nothing (**redundancy**);
* a demonstration with a corrupted label, or from another rule, contradicts the correct ones
  (**antagonism**; two from the same other rule even identify a wrong rule together).

**Tokens.** One token per demonstration: ``x·p + y`` (``p²`` ids); one per query: ``p² + x``
(``p`` ids); vocabulary ``p² + p``.

**The model** (:class:`ICLTransformer`) is a decoder-only transformer without position
embeddings (causal attention only), read at the last (query) position. Every token carries an
*inclusion weight* ``w ≥ 0`` that scales its attention: the attention logit of key ``j`` gets
``log w_j`` added, for every query row and layer, so ``w_j = 0`` removes token ``j`` exactly and
``w_j = 1`` is an ordinary token. With 0/1 weights the model's output equals that of the prompt
with the zero-weight tokens deleted (tested); fractional weights give a *soft prompt* that the
gradient estimator (:mod:`kernattr.experiments.icl_estimator`) differentiates through.

**Training** (:func:`train_icl_model`): AdamW (optax) on fresh random prompts every step: a random
rule, ``0..max_demos`` demonstrations with random inputs (repeats allowed), each label replaced by
a uniformly random one with probability ``label_noise``, and a random query; cross-entropy on the
query's answer. The weights are cached on disk (:func:`cached_icl_model`), keyed by a hash of
the configuration.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

__all__ = [
    "KINDS",
    "ICLConfig",
    "ICLProblem",
    "ICLTransformer",
    "TrainedICL",
    "cached_icl_model",
    "default_cache_dir",
    "demo_token",
    "icl_curve",
    "init_icl_model",
    "make_icl_problem",
    "make_prompt_batch",
    "query_losses",
    "query_token",
    "train_icl_model",
]

CACHE_VERSION = "icl-model-v1"
NEG = -1e9  # attention logit of a removed token (exp underflows to exactly 0)


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % q for q in range(2, int(math.isqrt(p)) + 1))


@dataclasses.dataclass(frozen=True)
class ICLConfig:
    """Everything that defines the trained model (hashed into the cache key).

    Attributes:
      p: prime modulus (``C = p`` answer classes, ``T ≤`` any number of queries).
      max_demos: most demonstrations in a training prompt (sequence length ``max_demos + 1``).
      label_noise: probability that a training demonstration's label is replaced by a uniformly
        random one (teaches the model that a single demonstration may be wrong).
      d_model, num_heads, num_layers, d_mlp: transformer size.
      steps, batch_size, learning_rate, weight_decay, warmup: AdamW with warmup + cosine decay.
      seed: initialisation and data stream.
    """

    p: int = 7
    max_demos: int = 8
    label_noise: float = 0.1
    d_model: int = 64
    num_heads: int = 4
    num_layers: int = 2
    d_mlp: int = 256
    steps: int = 3000
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 100
    seed: int = 0

    def __post_init__(self):
        if not _is_prime(int(self.p)):
            raise ValueError(f"`p` must be a prime, got {self.p}.")
        if not 0.0 <= self.label_noise < 1.0:
            raise ValueError(f"`label_noise` must be in [0, 1), got {self.label_noise}.")
        for name in ("max_demos", "d_model", "num_heads", "num_layers", "d_mlp", "steps",
                     "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"`{name}` must be a positive int, got {v!r}.")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"`d_model` ({self.d_model}) must be divisible by `num_heads` ({self.num_heads})."
            )
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(
                f"`learning_rate` must be positive and finite, got {self.learning_rate}.")

    @property
    def vocab_size(self) -> int:
        return self.p * self.p + self.p

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def key_hash(self) -> str:
        blob = json.dumps({**self.to_dict(), "_version": CACHE_VERSION}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def demo_token(x, y, p: int):
    """Token id of demonstration ``(x, y)``: ``x·p + y``.

    >>> int(demo_token(2, 3, 5))
    13
    """
    return x * p + y


def query_token(x, p: int):
    """Token id of query ``x``: ``p² + x``.

    >>> int(query_token(2, 5))
    27
    """
    return p * p + x


# ------------------------------------------------------------------------------------- model
class _Attention(nnx.Module):
    """Causal multi-head self-attention whose key ``j`` has ``log w_j`` added to its logits."""

    def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.qkv = nnx.Linear(d_model, 3 * d_model, rngs=rngs)
        self.out = nnx.Linear(d_model, d_model, rngs=rngs)

    def __call__(self, h, bias, visible, rows):
        b, l, d = h.shape
        nh = self.num_heads
        q, k, v = jnp.split(self.qkv(h), 3, axis=-1)
        q = q[:, l - rows:].reshape(b, rows, nh, d // nh)  # only the rows read downstream
        k, v = (t.reshape(b, l, nh, d // nh) for t in (k, v))
        logits = jnp.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(d // nh)
        logits = jnp.where(visible[None, None, l - rows:], logits + bias[:, None, None, :], NEG)
        att = jax.nn.softmax(logits, axis=-1)
        o = jnp.einsum("bhqk,bkhe->bqhe", att, v).reshape(b, rows, d)
        return self.out(o)


class _Block(nnx.Module):
    def __init__(self, d_model: int, num_heads: int, d_mlp: int, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(d_model, rngs=rngs)
        self.attn = _Attention(d_model, num_heads, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d_model, rngs=rngs)
        self.mlp_in = nnx.Linear(d_model, d_mlp, rngs=rngs)
        self.mlp_out = nnx.Linear(d_mlp, d_model, rngs=rngs)

    def __call__(self, h, bias, visible, rows):
        h = h[:, h.shape[1] - rows:] + self.attn(self.ln1(h), bias, visible, rows)
        return h + self.mlp_out(jax.nn.gelu(self.mlp_in(self.ln2(h))))


class ICLTransformer(nnx.Module):
    """Decoder-only transformer (no position embeddings) with per-token inclusion weights.

    Args:
      vocab_size: number of token ids (``p² + p`` for the affine-rule family).
      num_classes: ``C``, answer classes (``p``).
      d_model, num_heads, num_layers, d_mlp: size.
      rngs: ``nnx.Rngs`` for initialisation.

    Call: ``model(tokens [B, L] int, weights [B, L] float >= 0, num_queries=1)`` returns the
    ``[B, C]`` answer logits at the last position, or ``[B, Q, C]`` at the last
    ``Q = num_queries`` positions. Those query slots must have weight > 0; each one sees the
    prefix (the first ``L - Q`` tokens, causally) and itself, never another query, so ``Q``
    queries packed behind one prompt give exactly the logits of ``Q`` separate prompts. A token
    of weight 0 is invisible to every other token (exactly as if deleted).

    >>> model = ICLTransformer(vocab_size=30, num_classes=5, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3))).shape
    (2, 5)
    """

    def __init__(self, *, vocab_size: int, num_classes: int, d_model: int = 64,
                 num_heads: int = 4, num_layers: int = 2, d_mlp: int = 256, rngs: nnx.Rngs):
        if d_model % num_heads:
            raise ValueError(
                f"`d_model` ({d_model}) must be divisible by `num_heads` ({num_heads}).")
        self.embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
        self.blocks = nnx.List(
            [_Block(d_model, num_heads, d_mlp, rngs=rngs) for _ in range(num_layers)]
        )
        self.ln_f = nnx.LayerNorm(d_model, rngs=rngs)
        self.unembed = nnx.Linear(d_model, num_classes, rngs=rngs)

    def __call__(self, tokens: jax.Array, weights: jax.Array, num_queries: int = 1) -> jax.Array:
        tokens = jnp.asarray(tokens)
        weights = jnp.asarray(weights)
        if tokens.ndim != 2:
            raise ValueError(f"`tokens` must be [B, L] ints, got shape {tuple(tokens.shape)}.")
        if weights.shape != tokens.shape:
            raise ValueError(
                f"`weights` must have the shape of `tokens` {tuple(tokens.shape)}, got "
                f"{tuple(weights.shape)}."
            )
        l = tokens.shape[1]
        if isinstance(num_queries, bool) or not isinstance(num_queries, int) or not (
                1 <= num_queries <= l):
            raise ValueError(f"`num_queries` must be an int in 1..{l}, got {num_queries!r}.")
        pos = weights > 0
        bias = jnp.where(pos, jnp.log(jnp.where(pos, weights, 1.0)), NEG)
        # Causal, and the query slots (the last num_queries) are seen by nobody but themselves.
        i = jnp.arange(l)
        visible = (i[None, :] <= i[:, None]) & ((i[None, :] < l - num_queries)
                                                | (i[None, :] == i[:, None]))
        h = self.embed(tokens)
        n = len(self.blocks)
        for j, block in enumerate(self.blocks):
            h = block(h, bias, visible, num_queries if j == n - 1 else l)
        logits = self.unembed(self.ln_f(h))  # [B, Q, C]
        return logits[:, 0] if num_queries == 1 else logits


# -------------------------------------------------------------------------------------- data
def make_prompt_batch(key: jax.Array, *, p: int, batch_size: int, max_demos: int,
                      label_noise: float):
    """Random training prompts ``(tokens [B, L], weights [B, L], answers [B])``, ``L = max_demos+1``.

    Each row: a random rule ``(a, b)``, ``k ~ U{0..max_demos}`` demonstrations with random inputs
    (the first ``k`` slots, weight 1; the others weight 0), labels corrupted with probability
    ``label_noise``, and a random query in the last slot.

    >>> t, w, y = make_prompt_batch(jax.random.key(0), p=5, batch_size=3, max_demos=4,
    ...                             label_noise=0.1)
    >>> t.shape, w.shape, y.shape
    ((3, 5), (3, 5), (3,))
    """
    ka_, kb, kk, kx, kn, kr, kq = jax.random.split(key, 7)
    a = jax.random.randint(ka_, (batch_size, 1), 1, p)
    b = jax.random.randint(kb, (batch_size, 1), 0, p)
    k = jax.random.randint(kk, (batch_size, 1), 0, max_demos + 1)
    x = jax.random.randint(kx, (batch_size, max_demos), 0, p)
    y = (a * x + b) % p
    noisy = jax.random.bernoulli(kn, label_noise, y.shape)
    y = jnp.where(noisy, jax.random.randint(kr, y.shape, 0, p), y)
    xq = jax.random.randint(kq, (batch_size, 1), 0, p)
    tokens = jnp.concatenate([demo_token(x, y, p), query_token(xq, p)], axis=1)
    w = (jnp.arange(max_demos)[None, :] < k).astype(jnp.float32)
    weights = jnp.concatenate([w, jnp.ones((batch_size, 1), jnp.float32)], axis=1)
    answers = ((a * xq + b) % p)[:, 0]
    return tokens.astype(jnp.int32), weights, answers.astype(jnp.int32)


# ---------------------------------------------------------------------------------- training
class TrainedICL(NamedTuple):
    """A trained model as a pure function and its parameters.

    Attributes:
      apply_fn: ``apply_fn(params, tokens [L], weights [L], num_queries=1)`` -> ``[C]`` logits of
        ONE prompt (``[Q, C]`` for ``Q = num_queries`` packed queries, a static int).
      params: the parameter pytree (an ``nnx.State``).
      losses: ``[steps]`` training losses.
      seconds: training wall time (0 when loaded from the cache).
      cache_hit: loaded from disk.
    """

    apply_fn: Callable
    params: Any
    losses: np.ndarray
    seconds: float
    cache_hit: bool


def _build(cfg: ICLConfig, key: jax.Array):
    model = ICLTransformer(vocab_size=cfg.vocab_size, num_classes=cfg.p, d_model=cfg.d_model,
                           num_heads=cfg.num_heads, num_layers=cfg.num_layers, d_mlp=cfg.d_mlp,
                           rngs=nnx.Rngs(params=key))
    graphdef, params = nnx.split(model, nnx.Param)

    def apply_fn(params, tokens, weights, num_queries=1):
        m = nnx.merge(graphdef, params, copy=True)
        return m(jnp.asarray(tokens)[None], jnp.asarray(weights)[None], num_queries)[0]

    return apply_fn, params


def init_icl_model(key: jax.Array, cfg: ICLConfig) -> TrainedICL:
    """An untrained model (initial parameters from ``key``) as a :class:`TrainedICL`.

    >>> cfg = ICLConfig(p=5, d_model=16, d_mlp=32, num_heads=2)
    >>> init_icl_model(jax.random.key(0), cfg).losses.shape
    (0,)
    """
    apply_fn, params = _build(cfg, key)
    return TrainedICL(apply_fn, params, np.zeros((0,), np.float32), 0.0, False)


def train_icl_model(key: jax.Array, cfg: ICLConfig, *, progress: bool = False) -> TrainedICL:
    """Train :class:`ICLTransformer` on fresh random prompts (AdamW, warmup + cosine decay).

    Args:
      key: typed PRNG key (initialisation and the data stream).
      cfg: an :class:`ICLConfig`.
      progress: show a tqdm bar.

    Returns:
      :class:`TrainedICL`.

    >>> cfg = ICLConfig(p=5, steps=2, batch_size=8, d_model=16, d_mlp=32, num_heads=2)
    >>> trained = train_icl_model(jax.random.key(0), cfg)
    >>> trained.losses.shape
    (2,)
    """
    from tqdm.auto import tqdm

    k_init, k_data = jax.random.split(key)
    apply_fn, params = _build(cfg, k_init)
    warmup = min(cfg.warmup, cfg.steps // 2)
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup,
                                               max(cfg.steps, warmup + 1))
    opt = optax.adamw(sched, weight_decay=cfg.weight_decay)
    batched = jax.vmap(apply_fn, in_axes=(None, 0, 0))

    def loss_fn(params, tokens, weights, answers):
        logits = batched(params, tokens, weights)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, answers))

    def step(carry, k):
        params, state = carry
        tokens, weights, answers = make_prompt_batch(
            k, p=cfg.p, batch_size=cfg.batch_size, max_demos=cfg.max_demos,
            label_noise=cfg.label_noise)
        loss, g = jax.value_and_grad(loss_fn)(params, tokens, weights, answers)
        updates, state = opt.update(g, state, params)
        return (optax.apply_updates(params, updates), state), loss

    chunk = 100

    @jax.jit
    def run(carry, keys):
        return jax.lax.scan(step, carry, keys)

    carry = (params, opt.init(params))
    keys = jax.random.split(k_data, cfg.steps)
    losses = []
    t = time.perf_counter()
    with tqdm(total=cfg.steps, disable=not progress, desc="train ICL model", unit="step") as bar:
        for s in range(0, cfg.steps, chunk):
            carry, l = run(carry, keys[s:s + chunk])
            losses.append(np.asarray(l))
            bar.update(len(l))
            bar.set_postfix(loss=f"{float(l[-1]):.3f}")
    seconds = time.perf_counter() - t
    return TrainedICL(apply_fn, carry[0], np.concatenate(losses), seconds, False)


def default_cache_dir() -> str:
    """``$KERNATTR_CACHE`` or ``~/.cache/kernattr`` (``$XDG_CACHE_HOME`` respected).

    >>> isinstance(default_cache_dir(), str)
    True
    """
    return os.environ.get("KERNATTR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "kernattr"
    )


def cached_icl_model(cfg: ICLConfig, *, cache_dir: Optional[str] = None,
                     progress: bool = False) -> TrainedICL:
    """:func:`train_icl_model` with ``key = jax.random.key(cfg.seed)``, cached on disk.

    The parameters are stored in ``<cache_dir>/icl-<hash>.npz`` (hash of ``cfg``); a later call
    with the same configuration loads them instead of training.

    >>> import tempfile
    >>> cfg = ICLConfig(p=5, steps=2, batch_size=8, d_model=16, d_mlp=32, num_heads=2)
    >>> d = tempfile.mkdtemp()
    >>> cached_icl_model(cfg, cache_dir=d).cache_hit, cached_icl_model(cfg, cache_dir=d).cache_hit
    (False, True)
    """
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, f"icl-{cfg.key_hash()}.npz")
    apply_fn, template = _build(cfg, jax.random.key(cfg.seed))
    leaves, treedef = jax.tree.flatten(template)
    if os.path.exists(path):
        with np.load(path) as z:
            stored = [z[f"p{i}"] for i in range(len(leaves))]
            if all(s.shape == l.shape for s, l in zip(stored, leaves)):
                params = jax.tree.unflatten(treedef, [jnp.asarray(s) for s in stored])
                return TrainedICL(apply_fn, params, z["losses"], 0.0, True)
    trained = train_icl_model(jax.random.key(cfg.seed), cfg, progress=progress)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + f".tmp{os.getpid()}.npz"
    np.savez(tmp, losses=trained.losses, config=json.dumps(cfg.to_dict(), sort_keys=True),
             **{f"p{i}": np.asarray(l) for i, l in enumerate(jax.tree.leaves(trained.params))})
    os.replace(tmp, path)
    return trained


def icl_curve(key: jax.Array, trained: TrainedICL, cfg: ICLConfig, *, num_rules: int = 64,
              max_shots: Optional[int] = None) -> np.ndarray:
    """Mean query loss against the number of correct demonstrations (the ICL curve).

    For ``k = 0..max_shots``: ``num_rules`` random rules, ``k`` correct demonstrations with
    random inputs each, every query ``x ∈ Z_p``; returns ``[max_shots + 1]`` mean cross-entropy.

    >>> cfg = ICLConfig(p=5, d_model=16, d_mlp=32, num_heads=2)
    >>> icl_curve(jax.random.key(1), init_icl_model(jax.random.key(0), cfg), cfg,
    ...           num_rules=2, max_shots=2).shape
    (3,)
    """
    p = cfg.p
    max_shots = cfg.max_demos if max_shots is None else int(max_shots)
    n = max_shots + 1
    ka_, kb, kx = jax.random.split(key, 3)
    a = jax.random.randint(ka_, (n, num_rules, 1), 1, p)
    b = jax.random.randint(kb, (n, num_rules, 1), 0, p)
    x = jax.random.randint(kx, (n, num_rules, max_shots), 0, p)
    demos = demo_token(x, (a * x + b) % p, p)  # [n, R, max_shots]
    shots = (jnp.arange(max_shots)[None, None, :] < jnp.arange(n)[:, None, None])
    xq = jnp.arange(p)
    tokens = jnp.concatenate([demos, jnp.broadcast_to(query_token(xq, p), (n, num_rules, p))], 2)
    weights = jnp.concatenate([jnp.broadcast_to(shots, demos.shape).astype(jnp.float32),
                               jnp.ones((n, num_rules, p), jnp.float32)], axis=2)
    ans = (a * xq[None, None, :] + b) % p  # [n, R, p]

    @jax.jit
    def run(params, tokens, weights, ans):
        logits = jax.vmap(lambda t, w: trained.apply_fn(params, t, w, p))(
            tokens.reshape(n * num_rules, -1), weights.reshape(n * num_rules, -1))
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, ans.reshape(n * num_rules, p))
        return jnp.mean(ce.reshape(n, -1), axis=1)

    return np.asarray(run(trained.params, tokens, weights, ans))


# ----------------------------------------------------------------------- attribution problem
KINDS = ("frequent", "correct", "noisy", "other_rule")


class ICLProblem(NamedTuple):
    """One demonstration-attribution problem for a target rule (numpy arrays).

    Attributes:
      candidates: ``[K]`` demonstration tokens (the candidates, in prompt order).
      kinds: ``[K]`` index into :data:`KINDS` of each candidate: ``"frequent"`` (a correct
        demonstration at the frequent query input ``x*``; several copies, redundant with each
        other), ``"correct"`` (correct, other inputs; repeats possible), ``"noisy"`` (wrong label),
        ``"other_rule"`` (correct for one of a few other rules).
      demo_x, demo_y: ``[K]`` each candidate's input and label.
      queries: ``[T]`` query tokens; ``answers``: ``[T]`` their answers under the target rule.
      query_x: ``[T]`` query inputs (a ``frequent_fraction`` of them at ``x*``).
      rule: ``(a, b)`` of the target rule; ``frequent_x``: ``x*``.
      p: the modulus.
    """

    candidates: np.ndarray
    kinds: np.ndarray
    demo_x: np.ndarray
    demo_y: np.ndarray
    queries: np.ndarray
    answers: np.ndarray
    query_x: np.ndarray
    rule: tuple
    frequent_x: int
    p: int


def make_icl_problem(key: jax.Array, *, p: int, num_candidates: int = 50, num_queries: int = 16,
                     num_frequent: int = 5, num_correct: int = 11, num_noisy: int = 10,
                     num_other_rules: int = 3, frequent_fraction: float = 0.5) -> ICLProblem:
    """A random target rule with its candidate demonstrations and queries.

    Candidates (shuffled): ``num_frequent`` copies of the correct demonstration at ``x*``,
    ``num_correct`` correct ones at random other inputs, ``num_noisy`` with a wrong label, and the
    rest correct for one of ``num_other_rules`` other rules (split evenly). Queries: a
    ``frequent_fraction`` of the ``T`` queries ask ``x*``; the others cycle over the remaining
    inputs. So the demonstrations that look best one at a time (the copies at ``x*``) are
    redundant with each other, and a good 4-shot prompt mixes inputs.

    Args:
      key: typed PRNG key.
      p: prime modulus.
      num_candidates: ``K``.
      num_queries: ``T``.
      num_frequent, num_correct, num_noisy: counts per kind (the rest are other-rule).
      num_other_rules: number of distinct other rules.
      frequent_fraction: share of the queries at ``x*``.

    Returns:
      :class:`ICLProblem`.

    >>> prob = make_icl_problem(jax.random.key(0), p=7)
    >>> prob.candidates.shape, prob.queries.shape, int((prob.kinds == 0).sum())
    ((50,), (16,), 5)
    """
    if not _is_prime(int(p)):
        raise ValueError(f"`p` must be a prime, got {p}.")
    num_other = num_candidates - num_frequent - num_correct - num_noisy
    if min(num_frequent, num_correct, num_noisy, num_other) < 0:
        raise ValueError("the candidate counts exceed `num_candidates`.")
    if num_other > 0 and num_other_rules < 1:
        raise ValueError("`num_other_rules` must be >= 1 when there are other-rule candidates.")
    if not 0.0 <= frequent_fraction <= 1.0:
        raise ValueError(f"`frequent_fraction` must be in [0, 1], got {frequent_fraction}.")
    seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
    rng = np.random.default_rng(seed)
    a, b = int(rng.integers(1, p)), int(rng.integers(0, p))
    xs = int(rng.integers(0, p))
    others = np.array([x for x in range(p) if x != xs])
    rules = set()
    while len(rules) < num_other_rules:
        r = (int(rng.integers(1, p)), int(rng.integers(0, p)))
        if r != (a, b):
            rules.add(r)
    rules = sorted(rules)
    x = np.concatenate([
        np.full(num_frequent, xs),
        rng.choice(others, num_correct),
        rng.integers(0, p, num_noisy),
        rng.integers(0, p, num_other),
    ]).astype(np.int64)
    y = (a * x + b) % p
    kinds = np.repeat(np.arange(4), [num_frequent, num_correct, num_noisy, num_other])
    noisy = kinds == 2
    y[noisy] = (y[noisy] + rng.integers(1, p, noisy.sum())) % p
    oth = np.flatnonzero(kinds == 3)
    for i, j in enumerate(oth):
        ra, rb = rules[i % len(rules)]
        y[j] = (ra * x[j] + rb) % p
    perm = rng.permutation(num_candidates)
    x, y, kinds = x[perm], y[perm], kinds[perm]
    n_freq = int(round(frequent_fraction * num_queries))
    rest = np.resize(rng.permutation(others), num_queries - n_freq)
    qx = np.concatenate([np.full(n_freq, xs), rest]).astype(np.int64)
    return ICLProblem(
        candidates=demo_token(x, y, p).astype(np.int32), kinds=kinds.astype(np.int32),
        demo_x=x.astype(np.int32), demo_y=y.astype(np.int32),
        queries=query_token(qx, p).astype(np.int32), answers=((a * qx + b) % p).astype(np.int32),
        query_x=qx.astype(np.int32), rule=(a, b), frequent_x=xs, p=int(p),
    )


def _check_masks01(masks, k: int):
    masks = jnp.asarray(masks)
    if masks.ndim != 2 or masks.shape[1] != k:
        raise ValueError(f"`masks` must be [m, {k}] (one column per candidate), got "
                         f"{tuple(masks.shape)}.")
    if not jnp.issubdtype(masks.dtype, jnp.floating):
        masks = masks.astype(jnp.float32)
    return masks


def query_losses(apply_fn: Callable, params: Any, candidates, queries, answers, masks, *,
                 size: Optional[int] = None, chunk_size: int = 256) -> jax.Array:
    """Real labels: per-query cross-entropy of the prompt of each mask (one forward pass each).

    The prompt of mask ``s`` is the candidates with ``s = 1`` in candidate order, followed by
    each query (all ``T`` queries packed behind one prompt; see :class:`ICLTransformer`).

    Args:
      apply_fn: from :class:`TrainedICL`.
      params: model parameters.
      candidates: ``[K]`` demonstration tokens.
      queries: ``[T]`` query tokens; answers: ``[T]`` answers.
      masks: ``[m, K]`` 0/1 masks (fractional weights are allowed when ``size`` is None: a
        soft prompt).
      size: when every mask has exactly ``size`` ones, the prompt is gathered to ``size``
        demonstrations (cheaper); otherwise all ``K`` candidates are passed with their weights.
      chunk_size: masks per ``lax.map`` batch.

    Returns:
      ``[m, T]`` losses.

    >>> cfg = ICLConfig(p=5, d_model=16, d_mlp=32, num_heads=2)
    >>> tr = init_icl_model(jax.random.key(0), cfg)
    >>> prob = make_icl_problem(jax.random.key(1), p=5, num_candidates=6, num_queries=3,
    ...                         num_frequent=1, num_correct=2, num_noisy=1)
    >>> m = jnp.array([[1., 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0]])
    >>> query_losses(tr.apply_fn, tr.params, prob.candidates, prob.queries, prob.answers, m,
    ...              size=2).shape
    (2, 3)
    """
    cands = jnp.asarray(candidates)
    qs = jnp.asarray(queries)
    ans = jnp.asarray(answers)
    k, t = cands.shape[0], qs.shape[0]
    masks = _check_masks01(masks, k)
    if ans.shape != qs.shape:
        raise ValueError(f"`answers` must have the shape of `queries` {tuple(qs.shape)}, got "
                         f"{tuple(ans.shape)}.")
    ones = jnp.ones((t,), masks.dtype)

    def one(mask):
        if size is None:
            tokens = jnp.concatenate([cands, qs])
            weights = jnp.concatenate([mask, ones])
        else:
            idx = jnp.argsort(-mask, stable=True)[:size]  # the kept ones, in candidate order
            tokens = jnp.concatenate([cands[idx], qs])
            weights = jnp.concatenate([mask[idx], ones])
        logits = apply_fn(params, tokens, weights, t).reshape(t, -1)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ans)

    return jax.lax.map(one, masks, batch_size=chunk_size)
