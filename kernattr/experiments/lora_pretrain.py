"""The pretrained multi-task transformer of the LoRA experiment: 16 synthetic sequence tasks on
one vocabulary, a decoder-only NNX transformer, its pretraining with optax, an on-disk cache and
a check of the cached checkpoint.

Every example is ``[task token, x_0, ..., x_6]`` (digits ``x_j`` in ``0..9``, the task token
``10 + k``) and its answer is one digit. The tasks share the inputs' format, so some help each
other (``add``/``add3``/``add_shift``; ``first``/``index``; ``min``/``median``/``max``) and some
conflict (``add`` against ``add_shift``, the same inputs with answers one apart; ``kv`` against
``kv_reverse``; ``count_x0`` against ``count_even``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

TASKS = (
    "add", "add_shift", "sub", "mul", "add3", "first", "last", "second_last",
    "min", "max", "median", "count_x0", "count_even", "kv", "kv_reverse", "index",
)
NUM_DIGITS = 10
CONTENT_LEN = 7
SEQ_LEN = CONTENT_LEN + 1
VOCAB_SIZE = NUM_DIGITS + len(TASKS)


def _answers(task: int, x: np.ndarray) -> np.ndarray:
    """Answers ``[n]`` of task ``task`` for contents ``x [n, 7]``."""
    name = TASKS[task]
    s = np.sort(x, axis=1)
    if name == "add":
        return (x[:, 0] + x[:, 1]) % 10
    if name == "add_shift":
        return (x[:, 0] + x[:, 1] + 1) % 10
    if name == "sub":
        return (x[:, 0] - x[:, 1]) % 10
    if name == "mul":
        return (x[:, 0] * x[:, 1]) % 10
    if name == "add3":
        return (x[:, 0] + x[:, 1] + x[:, 2]) % 10
    if name == "first":
        return x[:, 0]
    if name == "last":
        return x[:, 6]
    if name == "second_last":
        return x[:, 5]
    if name == "min":
        return s[:, 0]
    if name == "max":
        return s[:, -1]
    if name == "median":
        return s[:, 3]
    if name == "count_x0":
        return (x == x[:, :1]).sum(1) % 10
    if name == "count_even":
        return (x % 2 == 0).sum(1) % 10
    if name in ("kv", "kv_reverse"):  # keys at 0, 2, 4, values at 1, 3, 5, query at 6
        src, dst = (0, 1) if name == "kv" else (1, 0)
        hit = x[:, src:6:2] == x[:, 6:7]
        return x[:, dst:6:2][np.arange(len(x)), hit.argmax(1)]
    if name == "index":
        return x[np.arange(len(x)), x[:, 6] % 6]
    raise AssertionError(name)


def make_examples(rng: np.random.Generator, task_ids: np.ndarray) -> np.ndarray:
    """Examples ``[n, 9]`` int32 (the 8 tokens, then the answer) for the tasks ``task_ids [n]``.

    >>> ex = make_examples(np.random.default_rng(0), np.array([0, 13]))
    >>> ex.shape, int((ex[0, 1] + ex[0, 2]) % 10) == int(ex[0, -1])
    ((2, 9), True)
    """
    task_ids = np.asarray(task_ids)
    n = len(task_ids)
    x = rng.integers(0, NUM_DIGITS, size=(n, CONTENT_LEN))
    for k in (TASKS.index("kv"), TASKS.index("kv_reverse")):
        rows = np.flatnonzero(task_ids == k)
        if len(rows):
            src = 0 if TASKS[k] == "kv" else 1
            distinct = np.argsort(rng.random((len(rows), NUM_DIGITS)), axis=1)[:, :3]
            x[rows, src:6:2] = distinct
            x[rows, 6] = distinct[np.arange(len(rows)), rng.integers(0, 3, len(rows))]
    y = np.empty(n, np.int64)
    for k in np.unique(task_ids):
        rows = task_ids == k
        y[rows] = _answers(int(k), x[rows])
    return np.concatenate([(NUM_DIGITS + task_ids)[:, None], x, y[:, None]], 1).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Model size and pretraining schedule (every field enters the checkpoint's hash)."""

    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 4
    d_mlp: int = 768
    num_steps: int = 1200
    batch_size: int = 128
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    eval_examples_per_task: int = 64
    max_eval_loss: float = 1.6   # --check fails above this mean eval loss (chance: log 10 = 2.30)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """Hash of the configuration (names the cache file)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def tiny_pretrain_config(**kw) -> PretrainConfig:
    """A toy configuration for tests (seconds)."""
    base = dict(d_model=16, num_heads=2, num_layers=1, d_mlp=32, num_steps=30, batch_size=32,
                warmup_steps=5, eval_examples_per_task=8, max_eval_loss=2.5)
    return PretrainConfig(**{**base, **kw})


def build_model(cfg: PretrainConfig, key: jax.Array) -> tuple[Callable, Any]:
    """``(logits_fn, params)``: ``logits_fn(params, tokens [8]) -> [10]`` answer logits."""
    from flax import nnx

    from kernattr.adapters import Transformer, from_nnx

    model = Transformer(vocab_size=VOCAB_SIZE, num_classes=NUM_DIGITS, seq_len=SEQ_LEN,
                        d_model=cfg.d_model, num_heads=cfg.num_heads,
                        num_layers=cfg.num_layers, d_mlp=cfg.d_mlp, rngs=nnx.Rngs(params=key))
    return from_nnx(model)


def num_parameters(params: Any) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def eval_set(cfg: PretrainConfig) -> np.ndarray:
    """Fixed evaluation examples ``[16 * E, 9]`` (seed ``cfg.seed + 1000``)."""
    ids = np.repeat(np.arange(len(TASKS)), cfg.eval_examples_per_task)
    return make_examples(np.random.default_rng(cfg.seed + 1000), ids)


def per_task_eval(logits_fn: Callable, params: Any, examples: np.ndarray) -> dict:
    """Mean cross-entropy and accuracy per task on ``examples [n, 9]``."""
    ex = jnp.asarray(examples)
    logits = jax.jit(jax.vmap(logits_fn, in_axes=(None, 0)))(params, ex[:, :-1])
    y = ex[:, -1]
    ce = np.asarray(-jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)[:, 0])
    acc = np.asarray(jnp.argmax(logits, 1) == y)
    tid = np.asarray(ex[:, 0]) - NUM_DIGITS
    return {TASKS[k]: {"loss": float(ce[tid == k].mean()), "accuracy": float(acc[tid == k].mean())}
            for k in range(len(TASKS))}


def pretrain(cfg: PretrainConfig, *, progress: bool = False, log: Optional[Callable] = None):
    """Pretrain with AdamW (warmup + cosine) on fresh uniform task mixtures every step.

    Returns ``(logits_fn, params, info)``; ``info`` holds the loss curve and the wall time.
    """
    import optax

    logits_fn, params = build_model(cfg, jax.random.key(cfg.seed))
    warmup = min(cfg.warmup_steps, cfg.num_steps // 2)
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup,
                                               max(cfg.num_steps, warmup + 1),
                                               cfg.learning_rate * 0.05)
    opt = optax.adamw(sched, weight_decay=cfg.weight_decay)

    def loss_fn(p, ex):
        logits = jax.vmap(logits_fn, in_axes=(None, 0))(p, ex[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ex[:, -1:], 1))

    @jax.jit
    def step(p, s, ex):
        val, g = jax.value_and_grad(loss_fn)(p, ex)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, val

    state = opt.init(params)
    rng = np.random.default_rng(cfg.seed)
    curve, t0 = [], time.perf_counter()
    for i in range(cfg.num_steps):
        ex = make_examples(rng, rng.integers(0, len(TASKS), cfg.batch_size))
        params, state, val = step(params, state, jnp.asarray(ex))
        if i % 50 == 0 or i == cfg.num_steps - 1:
            curve.append((i, float(val)))
            if log is not None:
                log(f"step {i} loss {float(val):.4f} {time.perf_counter() - t0:.0f}s")
    return logits_fn, params, {"curve": curve, "seconds": time.perf_counter() - t0}


def _cache_path(cfg: PretrainConfig, cache_dir: str) -> str:
    return os.path.join(cache_dir, f"lora_pretrain_{cfg.digest()}.npz")


def save_checkpoint(path: str, cfg: PretrainConfig, params: Any, info: dict) -> None:
    leaves = jax.tree.leaves(params)
    meta = json.dumps({"config": cfg.to_dict(), "digest": cfg.digest(), "info": info})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, meta=np.array(meta), **{f"p{i}": np.asarray(x) for i, x in enumerate(leaves)})
    os.replace(tmp, path)


def load_checkpoint(path: str, cfg: PretrainConfig) -> tuple[Callable, Any, dict]:
    """Loads a checkpoint written by :func:`save_checkpoint`; ``ValueError`` when its stored
    configuration hash or its parameter shapes do not match ``cfg``."""
    logits_fn, params = build_model(cfg, jax.random.key(cfg.seed))
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        if meta["digest"] != cfg.digest():
            raise ValueError(f"{path}: stored config hash {meta['digest']} != {cfg.digest()}.")
        leaves, treedef = jax.tree.flatten(params)
        new = [z[f"p{i}"] for i in range(len(leaves))]
    for a, b in zip(leaves, new):
        if a.shape != b.shape:
            raise ValueError(f"{path}: parameter shape {b.shape} != {a.shape}.")
    return logits_fn, jax.tree.unflatten(treedef, [jnp.asarray(x) for x in new]), meta["info"]


def pretrained(cfg: PretrainConfig, *, cache_dir: Optional[str] = None, log=None):
    """``(logits_fn, params, info)`` from the cache, pretraining (and caching) on a miss."""
    from .pipeline import default_cache_dir

    path = _cache_path(cfg, cache_dir or default_cache_dir())
    if os.path.exists(path):
        logits_fn, params, info = load_checkpoint(path, cfg)
        return logits_fn, params, {**info, "cache_hit": True, "path": path}
    logits_fn, params, info = pretrain(cfg, log=log)
    save_checkpoint(path, cfg, params, info)
    return logits_fn, params, {**info, "cache_hit": False, "path": path}


class CheckResult(NamedTuple):
    """Outcome of :func:`check_checkpoint`."""

    ok: bool
    eval_loss: float
    threshold: float
    digest: str
    per_task: dict


def check_checkpoint(cfg: PretrainConfig, *, cache_dir: Optional[str] = None, log=None) -> CheckResult:
    """Loads (or regenerates) the checkpoint of ``cfg`` and verifies it: the stored config hash
    equals ``cfg.digest()`` (checked on load) and the mean eval loss over the 16 tasks is below
    ``cfg.max_eval_loss``."""
    logits_fn, params, _ = pretrained(cfg, cache_dir=cache_dir, log=log)
    per_task = per_task_eval(logits_fn, params, eval_set(cfg))
    loss = float(np.mean([v["loss"] for v in per_task.values()]))
    return CheckResult(bool(loss < cfg.max_eval_loss), loss, cfg.max_eval_loss, cfg.digest(),
                       per_task)


if __name__ == "__main__":  # pragma: no cover - background pretraining
    import sys

    cfg = PretrainConfig()
    res = check_checkpoint(cfg, log=lambda s: print(s, flush=True))
    print(json.dumps(res._asdict(), indent=1), flush=True)
    sys.exit(0 if res.ok else 1)
