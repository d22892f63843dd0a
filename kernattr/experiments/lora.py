"""LoRA fine-tuning of a pretrained multi-task transformer: the estimator's accuracy and cost
measured together (``kernattr reproduce lora``).

Stages (plain functions; :func:`run_lora` chains them):

1. **model** — :mod:`kernattr.experiments.lora_pretrain`: a decoder-only NNX transformer
   pretrained with optax on 16 synthetic sequence tasks (cached on disk, ``--check`` verifies it).
2. **LoRA** — :func:`kernattr.adapters.from_lora` of rank ``r`` on every attention (query, key,
   value, output) and MLP (in, out) kernel of the blocks; the rest of the model frozen.
3. **ground truth** — real LoRA fine-tuning (AdamW, fixed steps, minibatches drawn from the
   mask's tasks, :func:`kernattr.groundtruth.finetune_fn`) on every mask, ``lax.map`` over
   chunks of masks, cached on disk (and shipped as a labels-only file); labels are the
   cross-entropy of held-out target examples of the target tasks.
4. **estimator** — the LoRA model's logits linearized in the ``B`` factors at ``B = 0`` with
   ``A`` held at its random init (at ``B = 0`` the gradient with respect to ``A`` is exactly
   zero, so ``A``'s own movement only enters the output at second order, through ``ΔA·ΔB``);
   projected per-example gradients (:func:`kernattr.gradient_features`); the softmax GLM per mask
   (:func:`kernattr.estimate_subset_labels`) with its ridge chosen on the TRAINING masks' real
   labels (a validation split: the held-out masks are never looked at).
5. **methods** — kernel and linear surrogates on estimated labels, kernel and datamodels on
   real labels, multi-fidelity, influence (also at its best damping in hindsight), TRAK, TracIn;
   LDS with bootstrap intervals on held-out masks, paired intervals, the noise ceiling (the
   held-out masks fine-tuned again with other minibatch draws).
6. **where it holds** — a small sweep over the learning rate and the number of steps.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

import kernattr as ka

from .lora_pretrain import (NUM_DIGITS, TASKS, PretrainConfig, make_examples, num_parameters,
                            per_task_eval, eval_set, pretrained, tiny_pretrain_config)

DAMPING_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
RIDGE_GRID = tuple(float(x) for x in np.logspace(-4, 6, 21))
PAIRED = (("kernel", "linear"), ("kernel", "influence_best"), ("kernel_real", "datamodels"),
          ("kernel", "influence"), ("multifidelity", "kernel_real_few"))
LDS_METHODS = ("kernel", "linear", "kernel_real", "datamodels", "multifidelity",
               "kernel_real_few", "influence", "influence_best", "trak", "tracin")
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs", "results",
                       "data", "lora_groundtruth.npz")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """A whole run (JSON-serialisable). Every field but the estimator's (``proj_dim``,
    ``num_real_few``) and the sweep's enters the ground truth's hash."""

    pretrain: PretrainConfig = PretrainConfig()
    examples_per_task: int = 32
    target_tasks: tuple = ("add", "add3", "kv", "index")
    targets_per_task: int = 12
    rank: int = 4
    alpha: float = 8.0
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    num_steps: int = 20
    batch_size: int = 32
    num_train_masks: int = 150
    num_heldout_masks: int = 80
    density: float = 0.5
    mask_chunk_size: int = 4
    seed: int = 0
    proj_dim: int = 256
    features_output: str = "logodds"   # or "logits" (see make_features_fn)
    precondition: str = "none"         # or "adam" (see adam_preconditioner)
    # labels for the surrogates: "linearized_adamw" (the fine-tuning's own AdamW run on the
    # model linearized in B, see linearized_finetune_labels) or "glm" (the GLM per mask)
    estimator: str = "linearized_adamw"
    linearized_chunk_size: int = 4     # masks per vmap in the linearized runs
    linearized_logits_variant: bool = True   # also the ten-logit linearization (held-out only)
    num_real_few: int = 30
    # (field, value) cells of the "where it holds" table, each on `sweep_masks` masks
    sweep: tuple = (("learning_rate", 1e-3), ("learning_rate", 1e-2), ("num_steps", 60),
                    ("learning_rate", 3e-4))
    sweep_masks: int = 31

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def ground_truth_dict(self) -> dict:
        d = self.to_dict()
        for k in ("proj_dim", "features_output", "precondition", "num_real_few", "sweep",
                  "sweep_masks", "estimator", "linearized_chunk_size",
                  "linearized_logits_variant"):
            d.pop(k)
        return d

    def digest(self, **overrides) -> str:
        d = {**self.ground_truth_dict(), **overrides}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def tiny_config(seed: int = 0) -> LoraConfig:
    """A toy configuration for tests and ``--smoke`` (seconds)."""
    return LoraConfig(pretrain=tiny_pretrain_config(seed=seed), examples_per_task=4,
                      targets_per_task=2, rank=2, num_steps=3, batch_size=8,
                      num_train_masks=12, num_heldout_masks=8, mask_chunk_size=4, seed=seed,
                      proj_dim=16, num_real_few=4, sweep=(("learning_rate", 1e-2),),
                      sweep_masks=6)


# ------------------------------------------------------------------------------------- problem


def make_problem(cfg: LoraConfig) -> dict:
    """Fine-tuning examples (``examples_per_task`` per task) and target examples (held-out
    examples of ``target_tasks``), from a seed unrelated to pretraining's."""
    K = len(TASKS)
    rng = np.random.default_rng(cfg.seed + 2000)
    tids = np.repeat(np.arange(K), cfg.examples_per_task)
    train = make_examples(rng, tids)
    target_ids = np.repeat([TASKS.index(t) for t in cfg.target_tasks], cfg.targets_per_task)
    target = make_examples(rng, target_ids)
    return {"train": train, "task_ids": tids.astype(np.int32), "target": target,
            "target_task_ids": target_ids.astype(np.int32)}


def make_masks(cfg: LoraConfig) -> dict:
    """Training and held-out masks (Bernoulli(``density``) per task) and the sweep's.

    Mask ``i`` of a group is drawn from ``fold_in(key, i)`` alone, so a group's first rows do
    not depend on its size (a run cut short keeps a usable prefix)."""
    K = len(TASKS)
    keys = jax.random.split(jax.random.key(cfg.seed + 11), 3)

    def sample(k, m):
        one = lambda i: jax.random.bernoulli(jax.random.fold_in(k, i), cfg.density, (K,))  # noqa: E731
        return np.asarray(jax.vmap(one)(jnp.arange(m)), np.float32)

    return {"train": sample(keys[0], cfg.num_train_masks),
            "heldout": sample(keys[1], cfg.num_heldout_masks),
            "sweep": sample(keys[2], cfg.sweep_masks),
            "full": np.ones((1, K), np.float32)}


def lora_model(cfg: LoraConfig, logits_fn: Callable, params0: Any):
    """``(lora_fn, lora_params0, targets)``: LoRA on the blocks' attention and MLP kernels.

    ``lora_fn(lora_params, example [9]) -> [10]`` answer logits (``example`` = tokens, answer).
    """
    from kernattr.adapters import answer_fn, from_lora, lora_targets

    f = answer_fn(logits_fn, output="logits")
    targets = lora_targets(params0, include=lambda s: "blocks" in s)
    lora_fn, lp0 = from_lora(f, params0, jax.random.key(cfg.seed + 3), rank=cfg.rank,
                             alpha=cfg.alpha, targets=targets)
    return lora_fn, lp0, targets


def make_labeler(cfg: LoraConfig, lora_fn: Callable, lp0: dict, prob: dict, *,
                 learning_rate: float, num_steps: int, return_params: bool = False) -> Callable:
    """Jitted ``labels(masks [c, K], key) -> [c, T]``: real LoRA fine-tuning on each mask
    (AdamW, ``num_steps`` minibatch steps of ``batch_size`` examples drawn from the mask's
    tasks), then the cross-entropy of every target example. ``return_params``: returns
    ``(labels, fine-tuned LoRA parameters [c, ...])`` (the same computation)."""
    import optax

    import kernattr.groundtruth as kgt

    train = kgt.finetune_fn(lora_fn, loss="softmax",
                            optimizer=optax.adamw(learning_rate, weight_decay=cfg.weight_decay),
                            num_steps=num_steps, batch_size=cfg.batch_size,
                            mask_chunk_size=cfg.mask_chunk_size)
    X, y, t = (jnp.asarray(prob["train"]), jnp.asarray(prob["train"][:, -1]),
               jnp.asarray(prob["task_ids"]))
    Xt, yt = jnp.asarray(prob["target"]), jnp.asarray(prob["target"][:, -1])

    def labels(masks, key):
        W = train(lp0, X, y, t, masks, key)
        F = kgt.evaluate_targets(lora_fn, W, Xt, yt, loss="softmax", metric="loss",
                                 mask_chunk_size=cfg.mask_chunk_size)
        return (F, W) if return_params else F

    return jax.jit(labels)


def base_labels(lora_fn: Callable, lp0: dict, prob: dict) -> np.ndarray:
    """``F0 [T]``: target cross-entropy at the pretrained model (``B = 0``)."""
    import kernattr.groundtruth as kgt

    one = jax.tree.map(lambda x: x[None], lp0)
    return np.asarray(kgt.evaluate_targets(lora_fn, one, jnp.asarray(prob["target"]),
                                           jnp.asarray(prob["target"][:, -1]), loss="softmax",
                                           metric="loss"))[0]


def sweep_key(field: str, value) -> str:
    """Name of a sweep cell's group in the ground-truth file."""
    return f"sweep_{field}_{value:g}"


def _run_chunks(labeler: Callable, masks: np.ndarray, key: jax.Array, done: np.ndarray,
                chunk: int, save: Callable, log: Optional[Callable]) -> tuple[float, int]:
    """Labels of ``masks`` chunk by chunk, resuming after the ``len(done)`` rows already done,
    each chunk saved as it finishes. Returns ``(seconds, masks)`` of the timed chunks (every
    chunk after the first of this call, whose time includes compilation)."""
    rows, secs, timed = ([done] if len(done) else []), 0.0, 0
    for i, start in enumerate(range(len(done), len(masks), chunk)):
        part = masks[start:start + chunk]
        pad = chunk - len(part)
        batch = np.concatenate([part, np.repeat(part[-1:], pad, 0)]) if pad else part
        t = time.perf_counter()
        out = np.asarray(labeler(jnp.asarray(batch), key))[:len(part)]
        dt = time.perf_counter() - t
        if i > 0:
            secs, timed = secs + dt, timed + len(batch)
        rows.append(out)
        save(np.concatenate(rows))
        if log is not None:
            log(f"  {start + len(part)}/{len(masks)} masks, {dt / len(batch):.2f}s/mask")
    return secs, timed


def ground_truth(cfg: LoraConfig, *, cache_dir: Optional[str] = None, log=None,
                 chunk: int = 8, shipped: Optional[str] = SHIPPED, compute: bool = True) -> dict:
    """Real LoRA fine-tuning labels on every mask of ``cfg`` (cached; resumable).

    Groups: ``train`` (row 0 is the all-tasks mask, then the training masks), ``heldout``,
    ``repeat`` (the held-out
    masks again with other minibatch draws: the noise ceiling) and one group per sweep cell
    (:func:`sweep_key`: the all-tasks mask, then the sweep masks). Loaded from
    ``shipped`` (a labels-only ``.npz``) or the cache when its hash matches ``cfg``. With
    ``compute=False`` nothing is fine-tuned: the (possibly partial) cache is returned as is.
    """
    from .pipeline import default_cache_dir

    digest = cfg.digest()
    path = os.path.join(cache_dir or default_cache_dir(), f"lora_gt_{digest}.npz")
    need = {"F_train": 1 + cfg.num_train_masks, "F_heldout": cfg.num_heldout_masks,
            "F_repeat": cfg.num_heldout_masks,
            **{f"F_{sweep_key(f, v)}": 1 + cfg.sweep_masks for f, v in cfg.sweep}}
    for p in (shipped, path):
        if p and os.path.exists(p):
            with np.load(p) as z:
                if str(z["digest"]) == digest and all(k in z.files and len(z[k]) >= m
                                                      for k, m in need.items()):
                    return {k: z[k] for k in z.files} | {"source": p}
    store: dict = {}
    if os.path.exists(path):
        with np.load(path) as z:
            if str(z["digest"]) == digest:
                store = {k: z[k] for k in z.files}
    if not compute:
        if not store:
            raise FileNotFoundError(f"no ground truth for config {digest} at {path}.")
        return store | {"source": path}

    def flush():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, **{**store, "digest": np.array(digest)})
        os.replace(tmp, path)

    logits_fn, params0, _ = pretrained(cfg.pretrain, cache_dir=cache_dir, log=log)
    lora_fn, lp0, _ = lora_model(cfg, logits_fn, params0)
    prob = make_problem(cfg)
    masks = make_masks(cfg)
    store["F0"] = base_labels(lora_fn, lp0, prob)
    key, key_repeat = jax.random.key(cfg.seed + 5), jax.random.key(cfg.seed + 6)
    # the all-tasks mask rides along as the first row of "train" (and of every sweep cell)
    groups = [("train", np.concatenate([masks["full"], masks["train"]]), key, cfg.learning_rate,
               cfg.num_steps),
              ("heldout", masks["heldout"], key, cfg.learning_rate, cfg.num_steps),
              ("repeat", masks["heldout"], key_repeat, cfg.learning_rate, cfg.num_steps)]
    for field, value in cfg.sweep:
        kw = {"learning_rate": cfg.learning_rate, "num_steps": cfg.num_steps, field: value}
        groups.append((sweep_key(field, value), np.concatenate([masks["full"], masks["sweep"]]),
                       key, kw["learning_rate"], int(kw["num_steps"])))
    labelers: dict = {}
    for name, ms, k, lr, steps in groups:
        done = store.get(f"F_{name}", np.zeros((0,)))
        if len(done) >= len(ms):
            continue
        if log is not None:
            log(f"{name}: {len(ms)} masks (lr {lr}, {steps} steps)")
        if (lr, steps) not in labelers:
            labelers[(lr, steps)] = make_labeler(cfg, lora_fn, lp0, prob, learning_rate=lr,
                                                 num_steps=steps)

        def save(arr, name=name):
            store[f"F_{name}"] = arr
            flush()

        secs, timed = _run_chunks(labelers[(lr, steps)], ms, k, done, chunk, save, log)
        # fine-tuning seconds per mask (compile excluded), accumulated over resumed runs
        store[f"seconds_{name}"] = np.array(float(store.get(f"seconds_{name}", 0.0)) + secs)
        store[f"timed_{name}"] = np.array(int(store.get(f"timed_{name}", 0)) + timed)
        flush()
    return dict(store) | {"source": path}


def write_labels_file(gt: dict, path: str = SHIPPED) -> str:
    """Writes the labels-only file shipped with the docs (what :func:`ground_truth` reads)."""
    keep = {k: v for k, v in gt.items() if k != "source"}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez_compressed(path, **{k: (np.asarray(v, np.float32) if k.startswith("F") else v)
                                 for k, v in keep.items()})
    return path


# ----------------------------------------------------------------------------------- estimator


def _b_filter(path, leaf) -> bool:
    """Projector filter: the ``B`` factors only (the first-order model is in ``B``, ``A`` fixed)."""
    return jax.tree_util.keystr(path).endswith("['b']")


@functools.partial(jax.jit, static_argnums=0)
def _b_grads(lora_fn: Callable, lp0: dict, X: jax.Array) -> dict:
    """Per-example gradients ``{path: [n, r, O]}`` of the cross-entropy w.r.t. the B factors."""

    def loss_b(b, ex):
        lp = {k: {"a": v["a"], "b": b[k]} for k, v in lp0.items()}
        return -jax.nn.log_softmax(lora_fn(lp, ex))[ex[-1]]

    b0 = {k: v["b"] for k, v in lp0.items()}
    return jax.lax.map(lambda ex: jax.grad(loss_b)(b0, ex), X, batch_size=32)


def adam_preconditioner(cfg: LoraConfig, lora_fn: Callable, lp0: dict, prob: dict, *,
                        eps: float = 1e-8) -> dict:
    """``{path: [r, O]}``: Adam's per-coordinate step scale ``1 / (sqrt(v) + eps)`` for the
    ``B`` factors at ``B = 0``, with ``v`` the expected squared minibatch gradient of the
    all-tasks fine-tuning objective (``ḡ² + (E[g_i²] − ḡ²) / batch_size``; a task drawn
    uniformly, then one of its examples). Mask-independent: the estimator's one approximation
    of Adam's normalisation (the real ``v`` depends on the mask)."""
    X = jnp.asarray(prob["train"])
    t = np.asarray(prob["task_ids"])
    K = len(TASKS)

    grads = _b_grads(lora_fn, lp0, X)
    w = jnp.asarray(1.0 / (K * np.bincount(t, minlength=K)[t]), jnp.float32)   # [n], sums to 1

    def scale(g):
        mean = jnp.tensordot(w, g, 1)
        sq = jnp.tensordot(w, g * g, 1)
        v = mean ** 2 + (sq - mean ** 2) / cfg.batch_size
        return 1.0 / (jnp.sqrt(v) + eps)

    P = jax.tree.map(scale, grads)
    mean = sum(jnp.sum(x) for x in jax.tree.leaves(P)) / sum(x.size for x in jax.tree.leaves(P))
    return jax.tree.map(lambda x: x / mean, P)   # mean 1: the ridge absorbs the overall scale


def make_features_fn(cfg: LoraConfig, lora_fn: Callable, lp0: dict, *,
                     output: str = "logodds", preconditioner: Optional[dict] = None,
                     unprojected: bool = False) -> Callable:
    """Jitted ``features(lora_params, train [n, 9], task_ids [n], target [T, 9]) ->
    (train, target)`` :class:`kernattr.GradientFeatures`, gradients with respect to the ``B``
    factors only, projected to ``proj_dim`` (``unprojected=True``: the identity projector, the
    full ``D_B``-dimensional Jacobian that :func:`linearized_finetune_labels` needs, since
    Adam's normalisation is per coordinate of ``B``).

    ``output="logodds"`` (default): one scalar per example, the log-odds of the correct answer
    ``z = logit_y − logsumexp_{c≠y} logit_c``. The fine-tuning loss is a function of it alone
    (cross-entropy ``= log(1 + e^{−z})``, the logistic loss with label 1), so the estimator
    solves the same objective with ONE gradient per example instead of ``C = 10``.
    ``output="logits"``: the ``[10]`` logits (softmax GLM, ten gradients per example).

    ``preconditioner`` (``{path: [r, O]}``, e.g. :func:`adam_preconditioner`): the model is
    linearized in ``B̃`` with ``B = sqrt(P) ⊙ B̃``, so that the GLM's ridge-regularised step in
    ``B̃`` is the ``P``-preconditioned step in ``B`` (Adam's per-coordinate normalisation)."""
    from kernattr.adapters import answer_output

    if preconditioner is not None:
        root = jax.tree.map(jnp.sqrt, preconditioner)
        base_fn = lora_fn

        def lora_fn(lp, ex):  # noqa: F811 - B = sqrt(P) ⊙ B̃
            return base_fn({k: {"a": v["a"], "b": v["b"] * root[k]} for k, v in lp.items()}, ex)

    if unprojected:
        proj = ka.make_projector(jax.random.key(cfg.seed + 4), lp0, kind="identity", dim=None,
                                 filter=_b_filter)
    else:
        proj = ka.make_projector(jax.random.key(cfg.seed + 4), lp0, dim=cfg.proj_dim,
                                 filter=_b_filter)
    K = len(TASKS)
    if output == "logodds":
        fn = lambda lp, ex: answer_output(lora_fn(lp, ex), ex[-1], "logodds")  # noqa: E731
        lab = lambda X: jnp.ones(X.shape[0], jnp.float32)  # noqa: E731
    else:
        fn, lab = lora_fn, (lambda X: X[:, -1])

    def features(lp, X, t, Xt):
        tr = ka.gradient_features(fn, lp, X, lab(X), proj, task_ids=t, num_tasks=K,
                                  chunk_size=32)
        tg = ka.gradient_features(fn, lp, Xt, lab(Xt), proj, chunk_size=32)
        return tr, tg

    return jax.jit(features)


def estimator_loss(output: str) -> str:
    """The GLM loss that matches the fine-tuning objective for a features ``output``."""
    return "logistic" if output == "logodds" else "softmax"


@jax.jit
def _estimate(train, target, masks, ridge):
    # logistic for scalar (log-odds) features, softmax for [n, C, d] logits features
    loss = "softmax" if train.grads.ndim == 3 else "logistic"
    return ka.estimate_subset_labels(train, target, masks, loss=loss, metric="loss",
                                     ridge=ridge, solver="fast")


def select_ridge(train, target, masks: np.ndarray, real: np.ndarray, grid=RIDGE_GRID) -> dict:
    """The ridge of the grid whose estimated labels are closest (mean squared error) to the real
    labels ``real [m, T]`` of ``masks`` (calibration masks: never the held-out ones)."""
    errs = []
    for r in grid:
        try:
            errs.append(float(np.mean((np.asarray(_estimate(train, target, jnp.asarray(masks), r))
                                       - real) ** 2)))
        except Exception:  # a ridge too small for the statistics' conditioning: not a candidate
            errs.append(float("inf"))
    best = int(np.nanargmin(errs))
    return {"ridge": float(grid[best]), "grid": list(grid), "mse": errs}


def adam_heuristic_ridge(cfg: LoraConfig, train, *, learning_rate: float, num_steps: int,
                         num_b: int) -> float:
    """A ridge from the optimiser alone (no real labels): Adam moves each coordinate by about
    ``lr`` a step, so the update has norm about ``lr · steps · sqrt(D_B)``; a ridge-dominated
    GLM step has norm ``||ḡ|| / ridge`` with ``ḡ`` the all-tasks mean gradient at ``B = 0``."""
    G = np.asarray(train.grads)
    if G.ndim == 2:                                   # log-odds z: d/dz log(1 + e^-z) = σ(z) - 1
        g = (np.asarray(jax.nn.sigmoid(train.outputs)) - 1.0)[:, None] * G
    else:                                             # logits [n, C, d]: softmax - onehot
        p = np.asarray(jax.nn.softmax(train.outputs, -1))
        onehot = np.eye(G.shape[1])[np.asarray(train.labels)]
        g = np.einsum("nc,ncd->nd", p - onehot, G)    # per-example loss gradient (projected)
    t = np.asarray(train.task_ids)
    gbar = np.mean([g[t == k].mean(0) for k in np.unique(t)], 0)
    return float(np.linalg.norm(gbar) / (learning_rate * num_steps * np.sqrt(num_b)))


# ------------------------------------------------------------------ linearized AdamW estimator


def linearized_finetune_labels(train, target, masks, key, *, loss: str, optimizer,
                               num_steps: int, batch_size: Optional[int],
                               mask_chunk_size: Optional[int] = None,
                               metric: str = "loss") -> jax.Array:
    """Runs the fine-tuning's own optimizer on the first-order model: labels ``[m, T]``.

    The model is replaced by its linearization ``f_i(θ) = f_i(0) + g_i · θ`` (``g_i`` the
    UNPROJECTED output gradient of example ``i`` with respect to the trained coordinates, e.g.
    the LoRA ``B`` factors at ``B = 0``), and every mask is trained on it exactly as the real
    fine-tuning trains the model: the same optimizer (AdamW's per-coordinate normalisation
    included), the same number of steps, and the same minibatch draws
    (:func:`kernattr.groundtruth.finetune_fn` with the same ``key``: the draws are a function of
    the key, the mask and the task ids only). The targets are then scored on the linear model.
    Each step costs a ``[batch, D]`` matrix-vector product instead of a forward and backward
    pass through the network.

    Args:
      train: :class:`kernattr.GradientFeatures` of the ``n`` training examples with
        ``grads [n, D]`` (scalar output) or ``[n, C, D]`` (``C`` outputs), ``outputs``,
        ``labels`` and ``task_ids``; computed with the identity projector.
      target: the ``T`` target examples' features (same ``D``).
      masks: ``[m, K]`` 0/1 masks.
      key: typed PRNG key of the real fine-tuning (its minibatch draws).
      loss: ``"logistic"`` (scalar log-odds with label 1: the cross-entropy),
        ``"softmax"`` (``[C]`` logits) or ``"squared"``: the fine-tuning loss on the outputs.
      optimizer: the fine-tuning's ``optax`` optimizer (e.g. ``optax.adamw(lr, weight_decay=wd)``).
      num_steps: optimizer steps; ``batch_size``: examples per step (``None``: full batch).
      mask_chunk_size: masks per ``vmap`` (``lax.map`` over chunks; memory grows with it).
      metric: target metric (``"loss"``, ``"margin"`` or ``"output"``).

    Returns:
      ``[m, T]`` target metric after the linearized fine-tuning of each mask.

    Raises:
      ValueError: ``train.task_ids`` is ``None``, or ``train`` and ``target`` differ in ``D``
        (and the checks of :func:`kernattr.groundtruth.finetune_on_masks`).

    Exact when the outputs are linear in the trained coordinates: then it IS the real
    fine-tuning (tested against it). With LoRA the ``A`` factors are left out: at ``B = 0`` the
    outputs' gradient with respect to ``A`` is exactly zero, so on the linear model Adam never
    moves them (zero moments give a zero step; weight decay alone changes no output).

    >>> import jax, jax.numpy as jnp, optax, kernattr as ka
    >>> g = jnp.eye(4)[:, :2]; t = jnp.array([0, 0, 1, 1])
    >>> tr = ka.GradientFeatures(g, jnp.zeros(4), jnp.zeros(4), t)
    >>> tg = ka.GradientFeatures(g[:1], jnp.zeros(1), jnp.ones(1))
    >>> F = linearized_finetune_labels(tr, tg, jnp.eye(2), jax.random.key(0), loss="squared",
    ...                                optimizer=optax.sgd(1.0), num_steps=1, batch_size=None)
    >>> F.shape
    (2, 1)
    """
    import kernattr.groundtruth as kgt

    if train.task_ids is None:
        raise ValueError("`train` needs task_ids (GradientFeatures of the training examples).")
    D = np.shape(train.grads)[-1]
    if np.shape(target.grads)[-1] != D:
        raise ValueError(f"`train` and `target` gradients differ in D: {D} vs "
                         f"{np.shape(target.grads)[-1]}.")

    def lin(theta, inp):
        return inp[0] + inp[1] @ theta

    fit = kgt.finetune_fn(lin, loss=loss, optimizer=optimizer, num_steps=num_steps,
                          batch_size=batch_size, mask_chunk_size=mask_chunk_size)
    theta0 = jnp.zeros((D,), jnp.result_type(train.grads))
    theta = fit(theta0, (train.outputs, train.grads), train.labels, train.task_ids, masks, key)
    return kgt.evaluate_targets(lin, theta, (target.outputs, target.grads), target.labels,
                                loss=loss, metric=metric, mask_chunk_size=mask_chunk_size)


def make_linearized_labeler(cfg: LoraConfig, *, learning_rate: float, num_steps: int,
                            batch_size: Optional[int] = -1) -> Callable:
    """Jitted ``labels(train, target, masks [c, K], key) -> [c, T]``:
    :func:`linearized_finetune_labels` with the fine-tuning's AdamW (``batch_size=-1``: the
    config's; ``None``: full batch). The features are arguments, not constants folded into the
    compiled function (they are tens to hundreds of MB)."""
    import optax

    bs = cfg.batch_size if batch_size == -1 else batch_size
    opt = optax.adamw(learning_rate, weight_decay=cfg.weight_decay)

    def labels(train, target, masks, key):
        loss = "logistic" if train.grads.ndim == 2 else "softmax"
        return linearized_finetune_labels(train, target, masks, key, loss=loss, optimizer=opt,
                                          num_steps=num_steps, batch_size=bs,
                                          mask_chunk_size=cfg.linearized_chunk_size)

    return jax.jit(labels)


def _err(F_hat, F, F0) -> dict:
    e = ka.estimator_error(jnp.asarray(F_hat), jnp.asarray(F), F0=jnp.asarray(F0))
    return {"relative_error": float(e.relative_error),
            "no_change_relative_error": float(e.no_change_relative_error),
            "ratio_to_no_change": float(e.relative_error / e.no_change_relative_error),
            "spearman": float(e.spearman)}


def _compare(E: np.ndarray, E_ref: np.ndarray, F: np.ndarray, F0: np.ndarray, *,
             seed: int = 0, num_resamples: int = 1000) -> dict:
    """95% bootstrap intervals over masks (the same resamples for both) of an estimator's
    error ratio and Spearman (= the LDS of its labels), and of their differences from a
    reference estimator ``E_ref``: ``{"ratio": [lo, hi], "spearman": [lo, hi],
    "ratio_minus_ref": [mean, lo, hi], "spearman_minus_ref": [mean, lo, hi]}``."""
    mean_F = F.mean(1)
    err = lambda X: np.abs(X.mean(1) - mean_F) / np.abs(mean_F)  # noqa: E731
    e, e_ref, nc = err(E), err(E_ref), np.abs(F0.mean() - mean_F) / np.abs(mean_F)
    idx = np.random.default_rng(seed).integers(0, len(F), (num_resamples, len(F)))
    r, r_ref = e[idx].mean(1) / nc[idx].mean(1), e_ref[idx].mean(1) / nc[idx].mean(1)
    q = lambda x: [float(np.quantile(x, 0.025)), float(np.quantile(x, 0.975))]  # noqa: E731
    key = jax.random.key(seed)
    sp = ka.lds_interval(key, jnp.asarray(E), jnp.asarray(F), num_resamples=num_resamples)
    d = ka.paired_lds_interval(key, jnp.asarray(E), jnp.asarray(E_ref), jnp.asarray(F),
                               num_resamples=num_resamples)
    return {"ratio": q(r), "spearman": [float(sp.low), float(sp.high)],
            "ratio_minus_ref": [float(e.mean() / nc.mean() - e_ref.mean() / nc.mean()),
                                *q(r - r_ref)],
            "spearman_minus_ref": [float(d.mean), float(d.low), float(d.high)]}

def _change(F_full, F0) -> float:
    """Relative change of the mean target metric, all tasks vs ``W0`` (the mean over targets
    first, as in the estimator's relative error: per-target ratios would be dominated by the
    targets whose loss at ``W0`` is near zero)."""
    F0 = np.asarray(F0, np.float64)
    return float((np.mean(np.asarray(F_full, np.float64)) - F0.mean()) / F0.mean())


# ------------------------------------------------------------------------------------- the run


def _interval(ci) -> dict:
    return {"lds": float(ci.mean), "lds_ci": [float(ci.low), float(ci.high)]}


def _timed(fn, *args):
    """``(result, seconds)`` of one call, waited for."""
    ts = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - ts


def _linearized_stage(cfg: LoraConfig, lora_fn: Callable, lp0: dict, prob: dict,
                      M_tr: np.ndarray, M_ho: np.ndarray, F_ho: np.ndarray, F_rep: np.ndarray,
                      F0: np.ndarray, glm_features: tuple, say: Callable) -> dict:
    """The linearized-AdamW estimator: unprojected ``B`` Jacobians of the log-odds (timed,
    compilation apart), the fine-tuning's AdamW with its own draws on every training and
    held-out mask (timed), and on the held-out masks the variants that separate linearization
    error from minibatch noise: other draws (the repeat run's key), full batch, the projected
    features of the GLM, and (``linearized_logits_variant``) the ten-logit linearization."""
    key, key_rep = jax.random.key(cfg.seed + 5), jax.random.key(cfg.seed + 6)
    args = (lp0, jnp.asarray(prob["train"]), jnp.asarray(prob["task_ids"]),
            jnp.asarray(prob["target"]))
    jac_fn = make_features_fn(cfg, lora_fn, lp0, output="logodds", unprojected=True)
    _, jac_first = _timed(jac_fn, *args)
    (train_j, target_j), jac_s = _timed(jac_fn, *args)
    lab = make_linearized_labeler(cfg, learning_rate=cfg.learning_rate, num_steps=cfg.num_steps)
    all_masks = jnp.asarray(np.concatenate([M_tr, M_ho]))
    _, lin_first = _timed(lab, train_j, target_j, all_masks, key)
    L_all, lin_s = _timed(lab, train_j, target_j, all_masks, key)
    L_all = np.asarray(L_all, np.float64)
    m_all = len(all_masks)
    L_tr, L_ho = L_all[:len(M_tr)], L_all[len(M_tr):]
    say(f"linearized AdamW: jacobians {jac_s:.1f}s, {lin_s / m_all * 1e3:.1f}ms/mask")
    ho = jnp.asarray(M_ho)
    two = len(F_rep) == len(F_ho)
    L_ho_rep = np.asarray(lab(train_j, target_j, ho, key_rep), np.float64)
    full = make_linearized_labeler(cfg, learning_rate=cfg.learning_rate,
                                   num_steps=cfg.num_steps, batch_size=None)
    L_ho_full = np.asarray(full(train_j, target_j, ho, key), np.float64)
    L_ho_proj = np.asarray(lab(*glm_features, ho, key), np.float64)
    variants = {
        "same_draws": {**_err(L_ho, F_ho, F0),
                       "against_mean_of_two_runs": _err(L_ho, (F_ho + F_rep) / 2, F0) if two else None,
                       "what": "the real run's minibatch draws (its key)"},
        "other_draws": {**_err(L_ho_rep, F_ho, F0),
                        "against_repeat_run": _err(L_ho_rep, F_rep, F0) if two else None,
                        "what": "the repeat run's draws, scored against run 1 (and against the "
                                "repeat run, whose draws they are)"},
        "full_batch": {**_err(L_ho_full, F_ho, F0), "what": "full-batch AdamW, no draws"},
        "projected": {**_err(L_ho_proj, F_ho, F0),
                      "what": f"AdamW on the {cfg.proj_dim} projected coordinates of the GLM's "
                              "features (Adam normalises projected, not B, coordinates)"},
    }
    if two:
        variants["mean_of_two_draws"] = {
            **_err((L_ho + L_ho_rep) / 2, (F_ho + F_rep) / 2, F0),
            "what": "mean of the same- and other-draws runs against the mean of the two real runs"}
    logits = None
    if cfg.linearized_logits_variant:
        # one call each: the times INCLUDE compilation (an upper bound on its cost)
        jl = make_features_fn(cfg, lora_fn, lp0, output="logits", unprojected=True)
        (train_l, target_l), jl_s = _timed(jl, *args)
        L_ho_l, ll_s = _timed(lab, train_l, target_l, ho, key)
        L_ho_l = np.asarray(L_ho_l, np.float64)
        del train_l, target_l
        logits = {**_err(L_ho_l, F_ho, F0),
                  "intervals_vs_logodds": _compare(L_ho_l, L_ho, F_ho, F0, seed=cfg.seed),
                  "against_mean_of_two_runs": _err(L_ho_l, (F_ho + F_rep) / 2, F0) if two else None,
                  "jacobian_seconds": jl_s, "per_mask_seconds_excluding_fixed": ll_s / len(M_ho),
                  "timing": "one call each, compilation included (upper bounds)",
                  "what": "all ten logits linearized in B (softmax cross-entropy on them), same "
                          "draws; held-out masks only"}
        say(f"linearized AdamW on logits: jacobians {jl_s:.1f}s, {ll_s / len(M_ho) * 1e3:.1f}ms/mask")
    return {"L_tr": L_tr, "L_ho": L_ho, "train_j": train_j, "target_j": target_j, "lab": lab,
            "all_masks": all_masks,
            "variants": variants, "logits": logits, "jac_s": jac_s, "jac_first": jac_first,
            "lin_s": lin_s, "lin_first": lin_first, "m_all": m_all}


def _error_decomposition(cfg: LoraConfig, logits_fn: Callable, params0: Any, lora_fn: Callable,
                         lp0: dict, prob: dict, W: dict, F: np.ndarray, L: np.ndarray,
                         F0: np.ndarray) -> dict:
    """Where the linearized estimator's error comes from, on masks fine-tuned for real with
    their parameters ``W`` (leading mask axis) and labels ``F``; ``L`` its labels there. Each
    row replaces the real model at the real fine-tuned parameters by one approximation:
    ``A`` put back at its initialisation (``B`` as trained: what ignoring ``A``'s movement
    costs); the model linear in ``B`` at the trained ``B`` (``A`` at init: the linearization
    the estimator uses, on the real trajectory's end point); the model linear in the merged
    kernels ``W0 + scale·A·B`` at the trained ``A`` and ``B`` (``A``'s movement kept, the
    network's curvature dropped); and the estimator itself (its own trajectory)."""
    from kernattr.adapters import answer_fn, answer_output, lora_merge

    Xt = jnp.asarray(prob["target"])
    f = answer_fn(logits_fn, output="logits")
    scale = cfg.alpha / cfg.rank

    def z(fn, p):
        return jax.vmap(lambda ex: answer_output(fn(p, ex), ex[-1], "logodds"))(Xt)

    def ce(zz):
        return np.asarray(jax.nn.softplus(-zz), np.float64)

    @jax.jit
    def rows(lp):
        a0 = {k: {"a": lp0[k]["a"], "b": v["b"]} for k, v in lp.items()}
        lin_b = jax.jvp(lambda p: z(lora_fn, p), (lp0,), (jax.tree.map(jnp.subtract, a0, lp0),))
        d = jax.tree.map(jnp.subtract, lora_merge(params0, lp, scale=scale), params0)
        lin_w = jax.jvp(lambda p: z(f, p), (params0,), (d,))
        return z(lora_fn, a0), lin_b[0] + lin_b[1], lin_w[0] + lin_w[1]

    za0, zb, zw = jax.lax.map(rows, W)
    out = {"num_masks": int(len(F)), "no_change": _err(np.broadcast_to(F0, F.shape), F, F0)}
    for name, E in (("A_at_init", ce(za0)), ("linear_in_B_at_trained_B", ce(zb)),
                    ("linear_in_W_at_trained_A_B", ce(zw)), ("linearized_adamw", L)):
        e = _err(E, F, F0)
        out[name] = {"relative_error": e["relative_error"],
                     "ratio_to_no_change": e["ratio_to_no_change"]}
    dA = [float(jnp.linalg.norm(W[k]["a"] - lp0[k]["a"][None]) / jnp.linalg.norm(lp0[k]["a"])
                / np.sqrt(len(F))) for k in W]
    out["relative_A_movement"] = {"mean": float(np.mean(dA)), "min": float(np.min(dA)),
                                  "max": float(np.max(dA))}
    return out


class _Setup(NamedTuple):
    """What a run is built on: the pretrained model (``logits_fn``, ``params0``, ``pretrain``
    its cache record), its LoRA (``lora_fn``, ``lp0`` at init, ``targets`` the adapted
    kernels), the problem and masks, and the real labels ``gt`` as float64 arrays: ``F0`` at
    ``W0`` ``[T]``, ``F_full`` all tasks ``[1, T]``, ``F_tr``/``F_ho`` training/held-out
    ``[m, T]``, ``F_rep`` the held-out repeat run (empty when absent), and the masks
    ``M_tr``/``M_ho`` those labels belong to."""

    logits_fn: Callable
    params0: Any
    pretrain: dict
    lora_fn: Callable
    lp0: dict
    targets: Any
    prob: dict
    masks: dict
    gt: dict
    F0: np.ndarray
    F_full: np.ndarray
    F_tr: np.ndarray
    F_ho: np.ndarray
    F_rep: np.ndarray
    M_tr: np.ndarray
    M_ho: np.ndarray


def _prepare_stage(cfg: LoraConfig, *, cache_dir: Optional[str], log, shipped: Optional[str],
                   compute_ground_truth: bool, say: Callable) -> _Setup:
    """Load (or pretrain) the model, attach the LoRA, build the problem and the masks, and read
    the real fine-tuning labels (computed when asked); the masks are cut to the labelled ones."""
    logits_fn, params0, pre = pretrained(cfg.pretrain, cache_dir=cache_dir, log=log)
    lora_fn, lp0, targets = lora_model(cfg, logits_fn, params0)
    prob, masks = make_problem(cfg), make_masks(cfg)
    gt = ground_truth(cfg, cache_dir=cache_dir, log=log, shipped=shipped,
                      compute=compute_ground_truth)
    F_tr = np.asarray(gt["F_train"][1:], np.float64)
    F_ho = np.asarray(gt["F_heldout"], np.float64)
    s = _Setup(logits_fn=logits_fn, params0=params0, pretrain=pre, lora_fn=lora_fn, lp0=lp0,
               targets=targets, prob=prob, masks=masks, gt=gt,
               F0=np.asarray(gt["F0"], np.float64),
               F_full=np.asarray(gt["F_train"][:1], np.float64), F_tr=F_tr, F_ho=F_ho,
               F_rep=np.asarray(gt.get("F_repeat", np.zeros((0,))), np.float64),
               M_tr=masks["train"][:len(F_tr)], M_ho=masks["heldout"][:len(F_ho)])
    say(f"ground truth: {len(F_tr)} training, {len(F_ho)} held-out masks ({gt['source']})")
    return s


class _RealCost(NamedTuple):
    """Real LoRA fine-tuning run in this session on ``masks`` (the first held-out ones) with
    ``key``: the ``labeler`` (it also returns the fine-tuned LoRA parameters), its labels ``F``
    and parameters ``W`` there, the seconds per mask, the first call's seconds (compilation
    included), and the largest difference from the cached labels of the same masks."""

    labeler: Callable
    masks: jax.Array
    key: jax.Array
    F: np.ndarray
    W: dict
    per_mask_s: float
    compile_s: float
    cache_diff: float


def _real_cost_stage(cfg: LoraConfig, s: _Setup, num_cost_masks: int,
                     say: Callable) -> _RealCost:
    """Time real fine-tuning now (the estimators' cost is measured against it in the same run)
    and check the cached labels reproduce."""
    labeler = make_labeler(cfg, s.lora_fn, s.lp0, s.prob, learning_rate=cfg.learning_rate,
                           num_steps=cfg.num_steps, return_params=True)
    cm = jnp.asarray(s.masks["heldout"][:num_cost_masks])
    key = jax.random.key(cfg.seed + 5)
    _, real_compile = _timed(labeler, cm, key)  # first call: compilation included
    (again, W_cost), real_s = _timed(labeler, cm, key)
    real_per_mask = real_s / num_cost_masks
    again = np.asarray(again)
    n_cmp = min(num_cost_masks, len(s.F_ho))
    cache_diff = (float(np.max(np.abs(again[:n_cmp] - s.F_ho[:n_cmp]))) if n_cmp
                  else float("nan"))
    say(f"real LoRA fine-tuning: {real_per_mask:.2f}s/mask (compile {real_compile:.1f}s)")
    return _RealCost(labeler=labeler, masks=cm, key=key, F=again, W=W_cost,
                     per_mask_s=real_per_mask, compile_s=real_compile, cache_diff=cache_diff)


class _GlmFit(NamedTuple):
    """The GLM estimator's features (``train_f``, ``target_f``), its ``loss``, the ``ridge``
    calibrated on the first ``ncal`` training masks (``sel``; ``sel_all`` on all of them), its
    labels ``E_tr``/``E_ho`` ``[m, T]``, and its timings (seconds; ``est_amortised`` per mask
    with the fixed costs spread over the ``num_masks`` estimated masks)."""

    train_f: Any
    target_f: Any
    loss: str
    ridge: float
    sel: dict
    sel_all: dict
    ncal: int
    E_tr: np.ndarray
    E_ho: np.ndarray
    num_masks: int
    feat_s: float
    feat_compile: float
    select_s: float
    est_s: float
    est_per_mask: float
    calib_real_s: float
    est_amortised: float


def _glm_stage(cfg: LoraConfig, s: _Setup, real: _RealCost, num_calibration: int,
               say: Callable) -> _GlmFit:
    """The GLM estimator: features (timed, compilation apart), the ridge calibrated on the
    first training masks' real labels (the held-out masks never looked at), and its labels of
    every training and held-out mask (timed)."""
    loss = estimator_loss(cfg.features_output)

    def features():
        pre_P = (adam_preconditioner(cfg, s.lora_fn, s.lp0, s.prob)
                 if cfg.precondition == "adam" else None)
        fn = make_features_fn(cfg, s.lora_fn, s.lp0, output=cfg.features_output,
                              preconditioner=pre_P)
        out = fn(s.lp0, jnp.asarray(s.prob["train"]), jnp.asarray(s.prob["task_ids"]),
                 jnp.asarray(s.prob["target"]))
        return jax.block_until_ready(out)

    m_tr, m_ho = len(s.F_tr), len(s.F_ho)
    _, feat_compile = _timed(features)       # first call: compilation included
    (train_f, target_f), feat_s = _timed(features)
    ncal = min(num_calibration, m_tr)
    sel, select_s = _timed(select_ridge, train_f, target_f, s.M_tr[:ncal], s.F_tr[:ncal])
    ridge = sel["ridge"]
    sel_all = select_ridge(train_f, target_f, s.M_tr, s.F_tr)
    all_masks = jnp.asarray(np.concatenate([s.M_tr, s.M_ho]))
    _timed(_estimate, train_f, target_f, all_masks, ridge)  # compile
    est_all, est_s = _timed(_estimate, train_f, target_f, all_masks, ridge)
    est_all = np.asarray(est_all, np.float64)
    m_all = m_tr + m_ho
    est_per_mask = est_s / m_all
    calib_real_s = ncal * real.per_mask_s
    est_amortised = (feat_s + select_s + calib_real_s + est_s) / m_all
    say(f"estimator: features {feat_s:.1f}s, {est_per_mask * 1e3:.2f}ms/mask, ridge {ridge}")
    return _GlmFit(train_f=train_f, target_f=target_f, loss=loss, ridge=ridge, sel=sel,
                   sel_all=sel_all, ncal=ncal, E_tr=est_all[:m_tr], E_ho=est_all[m_tr:],
                   num_masks=m_all, feat_s=feat_s, feat_compile=feat_compile,
                   select_s=select_s, est_s=est_s, est_per_mask=est_per_mask,
                   calib_real_s=calib_real_s, est_amortised=est_amortised)


def _num_b(lp0: dict) -> int:
    """Number of LoRA ``B`` parameters (the coordinates the estimators are linear in)."""
    return int(sum(v["b"].size for v in lp0.values()))


def _glm_report(cfg: LoraConfig, s: _Setup, real: _RealCost, g: _GlmFit,
                say: Callable) -> tuple:
    """The GLM's ``(accuracy, cost)`` dicts: its error on the held-out masks, the ridge
    variants (calibrated on all training masks; Adam's heuristic), the real labels' own noise,
    and its cost against real fine-tuning per mask and for 1000 masks."""
    F_ho, F_rep, F0, M_ho = s.F_ho, s.F_rep, s.F0, s.M_ho
    m_ho, two = len(F_ho), len(F_rep) == len(F_ho)
    heur = adam_heuristic_ridge(cfg, g.train_f, learning_rate=cfg.learning_rate,
                                num_steps=cfg.num_steps, num_b=_num_b(s.lp0))
    E_ho_heur = np.asarray(_estimate(g.train_f, g.target_f, jnp.asarray(M_ho), heur), np.float64)
    E_ho_all = np.asarray(_estimate(g.train_f, g.target_f, jnp.asarray(M_ho), g.sel_all["ridge"]),
                          np.float64)
    say("GLM: ridge variants done")
    glm = {**_err(g.E_ho, F_ho, F0), "ridge": g.ridge, "ridge_selection": g.sel,
           "ridge_how": f"grid ridge with the least squared error against the real labels "
                        f"of the first {g.ncal} TRAINING masks (held-out masks unseen)",
           "with_ridge_from_all_training_masks": {**_err(E_ho_all, F_ho, F0),
                                                  "ridge": g.sel_all["ridge"]},
           "with_adam_heuristic_ridge": {**_err(E_ho_heur, F_ho, F0), "ridge": heur},
           "num_heldout_masks": m_ho, "solver": "fast", "proj_dim": cfg.proj_dim,
           "features_output": cfg.features_output, "glm_loss": g.loss,
           # the real labels' own noise: a second fine-tuning run (other minibatch draws)
           # scored like the estimator, and the estimator against the two runs' mean
           "real_rerun": _err(F_rep, F_ho, F0) if two else None,
           "against_mean_of_two_runs": _err(g.E_ho, (F_ho + F_rep) / 2, F0) if two else None,
           "linearized_in": "B factors at B = 0, A fixed at its random init"}
    gt, real_per_mask = s.gt, real.per_mask_s
    glm_cost = {"real_seconds_per_mask": real_per_mask,
                "estimator_seconds_per_mask": g.est_amortised,
                "ratio": real_per_mask / g.est_amortised,
                "estimator_per_mask_seconds_excluding_fixed": g.est_per_mask,
                "features_seconds": g.feat_s, "features_first_call_seconds": g.feat_compile,
                "ridge_selection_seconds": g.select_s,
                "calibration_real_seconds": g.calib_real_s, "estimation_seconds": g.est_s,
                "amortised_over_masks": g.num_masks, "real_compile_seconds": real.compile_s,
                "seconds_1000_masks_real": 1000 * real_per_mask,
                "seconds_1000_masks_estimator": (g.feat_s + g.select_s + g.calib_real_s
                                                 + 1000 * g.est_per_mask),
                "cache_consistency_max_abs_diff": real.cache_diff,
                "ground_truth_seconds_per_mask": (
                    float(gt["seconds_train"]) / max(int(gt["timed_train"]), 1)
                    if "seconds_train" in gt else None)}
    glm_cost["ratio_1000_masks"] = (glm_cost["seconds_1000_masks_real"]
                                    / glm_cost["seconds_1000_masks_estimator"])
    return glm, glm_cost


class _Linearized(NamedTuple):
    """The linearized-AdamW estimator: ``stage`` (what :func:`_linearized_stage` returns), its
    accuracy dict ``est``, its cost dict ``cost`` and its amortised seconds per mask."""

    stage: dict
    est: dict
    cost: dict
    amortised: float


def _linearized_report(cfg: LoraConfig, s: _Setup, real: _RealCost, g: _GlmFit, glm: dict,
                       say: Callable) -> _Linearized:
    """Linearized AdamW (the fine-tuning's own optimizer and draws on the model linear in
    ``B``): its labels and variants, the decomposition of its error on the cost masks, its
    intervals against the GLM, and its cost against real fine-tuning (also timed back to back
    with it, for ratios less exposed to changes of load)."""
    F_ho, F0 = s.F_ho, s.F0
    lin = _linearized_stage(cfg, s.lora_fn, s.lp0, s.prob, s.M_tr, s.M_ho, F_ho, s.F_rep, F0,
                            (g.train_f, g.target_f), say)
    L_tr, L_ho = lin["L_tr"], lin["L_ho"]
    lin_per_mask = lin["lin_s"] / lin["m_all"]
    lin_amortised = (lin["jac_s"] + lin["lin_s"]) / lin["m_all"]
    decomposition = _error_decomposition(cfg, s.logits_fn, s.params0, s.lora_fn, s.lp0, s.prob,
                                         real.W, real.F, L_ho[:len(real.F)], F0)
    say("error decomposition done")
    lin_est = {**lin["variants"]["same_draws"], "variants": lin["variants"],
               "intervals_vs_glm": _compare(L_ho, g.E_ho, F_ho, F0, seed=cfg.seed),
               "training_masks": _err(L_tr, s.F_tr, F0),
               "logits_variant": lin["logits"], "error_decomposition": decomposition,
               "real_rerun": glm["real_rerun"], "num_heldout_masks": len(F_ho),
               "features_output": "logodds", "loss": "logistic (label 1) on the log-odds",
               "linearized_in": "B factors at B = 0 (unprojected); A left out: its gradient is "
                                "exactly zero at B = 0, so Adam never moves it on the linear model",
               "hyperparameters": "the fine-tuning's own (learning rate, weight decay, steps, "
                                  "batch size, draws); nothing calibrated on real labels"}
    real_per_mask = real.per_mask_s
    lin_cost = {"real_seconds_per_mask": real_per_mask,
                "estimator_seconds_per_mask": lin_amortised,
                "ratio": real_per_mask / lin_amortised,
                "estimator_per_mask_seconds_excluding_fixed": lin_per_mask,
                "jacobian_seconds": lin["jac_s"], "jacobian_first_call_seconds": lin["jac_first"],
                "estimation_seconds": lin["lin_s"], "estimation_first_call_seconds": lin["lin_first"],
                "amortised_over_masks": lin["m_all"], "real_compile_seconds": real.compile_s,
                "seconds_1000_masks_real": 1000 * real_per_mask,
                "seconds_1000_masks_estimator": lin["jac_s"] + 1000 * lin_per_mask,
                "cache_consistency_max_abs_diff": real.cache_diff}
    lin_cost["ratio_1000_masks"] = (lin_cost["seconds_1000_masks_real"]
                                    / lin_cost["seconds_1000_masks_estimator"])
    # the two timings above come from different moments of a run on a shared machine: time
    # them again back to back, three times, for ratios less exposed to changes of load
    inter = []
    for _ in range(3):
        _, r_s = _timed(real.labeler, real.masks, real.key)
        _, l_s = _timed(lin["lab"], lin["train_j"], lin["target_j"], lin["all_masks"], real.key)
        inter.append((r_s / len(real.masks)) / ((lin["jac_s"] + l_s) / lin["m_all"]))
    lin_cost["ratio_interleaved"] = inter
    lin_cost["ratio_interleaved_median"] = float(np.median(inter))
    say(f"interleaved cost ratios {[round(x, 1) for x in inter]}")
    return _Linearized(stage=lin, est=lin_est, cost=lin_cost, amortised=lin_amortised)


def _choose_estimator(cfg: LoraConfig, g: _GlmFit, glm: dict, glm_cost: dict,
                      lin: _Linearized) -> tuple:
    """``(accuracy, cost, S_tr, other, other_name)`` of the estimator ``cfg.estimator`` names:
    its labels ``S_tr`` of the training masks feed the surrogates; ``other`` (the other
    estimator's) feeds the extra kernel row ``other_name``."""
    if cfg.estimator == "linearized_adamw":
        estimator, cost, S_tr, other = lin.est, lin.cost, lin.stage["L_tr"], g.E_tr
    elif cfg.estimator == "glm":
        estimator, cost, S_tr, other = glm, glm_cost, g.E_tr, lin.stage["L_tr"]
    else:
        raise ValueError(f"`estimator` must be 'linearized_adamw' or 'glm', got {cfg.estimator!r}.")
    other_name = "kernel_glm" if cfg.estimator == "linearized_adamw" else "kernel_linearized_adamw"
    return estimator, cost, S_tr, other, other_name


def _methods_stage(cfg: LoraConfig, s: _Setup, g: _GlmFit, S_tr: np.ndarray, other: np.ndarray,
                   other_name: str, num_resamples: int) -> dict:
    """Surrogates (on estimated and on real labels) and baselines (influence, also at its best
    damping in hindsight; TRAK; TracIn) scored on the held-out masks: LDS with bootstrap
    intervals, paired intervals, the noise ceiling and the influence damping sweep."""
    K, loss, ridge, train_f, target_f = len(TASKS), g.loss, g.ridge, g.train_f, g.target_f
    F_tr, F_ho, F_rep, M_ho = s.F_tr, s.F_ho, s.F_rep, s.M_ho
    tr, ho = jnp.asarray(s.M_tr), jnp.asarray(M_ho)
    few = min(cfg.num_real_few, len(F_tr))
    preds: dict = {}

    def fit(name, surrogate):
        preds[name] = np.asarray(ka.predict(surrogate, ho))

    fit("kernel", ka.fit_kernel(tr, jnp.asarray(S_tr)))
    fit("linear", ka.fit_linear(tr, jnp.asarray(S_tr), ridge=1e-3))
    fit(other_name, ka.fit_kernel(tr, jnp.asarray(other)))
    fit("kernel_real", ka.fit_kernel(tr, jnp.asarray(F_tr)))
    fit("datamodels", ka.fit_linear(tr, jnp.asarray(F_tr), ridge=1e-3))
    fit("kernel_real_few", ka.fit_kernel(tr[:few], jnp.asarray(F_tr[:few])))
    fit("multifidelity", ka.fit_multifidelity(tr, jnp.asarray(S_tr), tr[:few],
                                              jnp.asarray(F_tr[:few])))
    for name, fn in (("influence", lambda a, b: ka.influence_scores(a, b, loss=loss,
                                                                    damping=ridge, num_tasks=K)),
                     ("trak", lambda a, b: ka.trak_scores(a, b, loss=loss, damping=ridge,
                                                          num_tasks=K)),
                     ("tracin", lambda a, b: ka.tracin_scores(a, b, loss=loss, num_tasks=K))):
        preds[name] = M_ho @ np.asarray(jax.jit(fn)(train_f, target_f))
    key_b = jax.random.key(cfg.seed + 7)
    actual = jnp.asarray(F_ho)
    sweep_lds = []
    for d in DAMPING_GRID:
        sc = np.asarray(ka.influence_scores(train_f, target_f, loss=loss, damping=d,
                                            num_tasks=K))
        sweep_lds.append(float(ka.lds(jnp.asarray(M_ho @ sc), actual).mean))
    best = int(np.nanargmax(sweep_lds))
    sc = np.asarray(ka.influence_scores(train_f, target_f, loss=loss,
                                        damping=DAMPING_GRID[best], num_tasks=K))
    preds["influence_best"] = M_ho @ sc
    lds = {name: _interval(ka.lds_interval(key_b, jnp.asarray(preds[name]), actual,
                                           num_resamples=num_resamples))
           for name in LDS_METHODS + (other_name,)}
    lds["influence_best"]["damping"] = DAMPING_GRID[best]
    lds["influence_best"]["what"] = "damping with the best held-out LDS, chosen in hindsight"
    lds["influence"]["damping"] = ridge
    paired = {}
    for a, b in PAIRED + (("kernel", other_name),):
        d = ka.paired_lds_interval(key_b, jnp.asarray(preds[a]), jnp.asarray(preds[b]), actual,
                                   num_resamples=num_resamples)
        paired[f"{a}-{b}"] = [float(d.mean), float(d.low), float(d.high)]
    noise = None
    if len(F_rep) == len(F_ho):
        noise = {**_interval(ka.lds_interval(key_b, jnp.asarray(F_rep), actual,
                                             num_resamples=num_resamples)),
                 "what": "LDS of the held-out masks fine-tuned again with other minibatch draws"}
    return {"lds": lds, "paired": paired, "noise_ceiling": noise,
            "influence_damping_sweep": {"damping": list(DAMPING_GRID), "lds": sweep_lds}}


def _where_it_holds_stage(cfg: LoraConfig, s: _Setup, real: _RealCost, g: _GlmFit,
                          lin: _Linearized, num_calibration: int) -> list:
    """The "where it holds" table: the main setting, then each sweep cell with labels (the GLM's
    ridge calibrated on the cell's first masks; both estimators scored on the rest)."""
    gt, masks, F0 = s.gt, s.masks, s.F0
    real_per_mask, stage = real.per_mask_s, lin.stage
    table = [_cell("main", cfg.learning_rate, cfg.num_steps, s.F_full, F0, g.E_ho, s.F_ho,
                   g.ridge, real_per_mask, g.est_amortised, stage["L_ho"], lin.amortised)]
    key_main = jax.random.key(cfg.seed + 5)
    for field, value in cfg.sweep:
        name = sweep_key(field, value)
        if f"F_{name}" not in gt or len(gt[f"F_{name}"]) < num_calibration + 3:
            continue
        kw = {"learning_rate": cfg.learning_rate, "num_steps": cfg.num_steps, field: value}
        Fc = np.asarray(gt[f"F_{name}"], np.float64)
        Ms = masks["sweep"][:len(Fc) - 1]
        cal = num_calibration
        sc_sel = select_ridge(g.train_f, g.target_f, Ms[:cal], Fc[1:1 + cal])
        Ec = np.asarray(_estimate(g.train_f, g.target_f, jnp.asarray(Ms[cal:]), sc_sel["ridge"]),
                        np.float64)
        lab_c = make_linearized_labeler(cfg, learning_rate=kw["learning_rate"],
                                        num_steps=int(kw["num_steps"]))
        scored = jnp.asarray(Ms[cal:])
        _timed(lab_c, stage["train_j"], stage["target_j"], scored, key_main)   # compile
        Lc, lc_s = _timed(lab_c, stage["train_j"], stage["target_j"], scored, key_main)
        # real cost of the cell: this run's seconds per mask scaled by the number of steps (the
        # learning rate does not change the computation); not the ground-truth file's timing,
        # which comes from the run that computed it, under that run's load
        real_c = real_per_mask * int(kw["num_steps"]) / cfg.num_steps
        table.append(_cell(f"{field}={value}", kw["learning_rate"], int(kw["num_steps"]),
                           Fc[:1], F0, Ec, Fc[1 + cal:], sc_sel["ridge"], real_c, g.est_amortised,
                           np.asarray(Lc, np.float64),
                           stage["jac_s"] / stage["m_all"] + lc_s / len(scored)))
    return table


def _results_dict(cfg: LoraConfig, s: _Setup, glm: dict, glm_cost: dict, lin: _Linearized,
                  chosen: tuple, meth: dict, table: list, t_run: float) -> dict:
    """The run's results dict (what ``results.json`` holds): both estimators, the chosen one,
    the methods' LDS, the sweep table, sizes, the pretrained model's per-task evaluation and
    the configuration; ``seconds`` since ``t_run``."""
    estimator, cost, _, _, other_name = chosen
    F0, F_ho, pre = s.F0, s.F_ho, s.pretrain
    F0_eval = per_task_eval(s.logits_fn, s.params0, eval_set(cfg.pretrain))
    return {
        "estimator": estimator,
        "estimator_name": cfg.estimator,
        "cost": cost,
        "estimators": {"linearized_adamw": lin.est, "glm": glm},
        "costs": {"linearized_adamw": lin.cost, "glm": glm_cost},
        "surrogate_labels": f"{cfg.estimator} (row {other_name}: the kernel on the other "
                            "estimator's labels)",
        "target_change": _change(s.F_full, F0),
        "target_change_heldout_masks": float(np.mean(np.abs(F_ho.mean(1) - F0.mean()) / F0.mean())),
        "lds": meth["lds"],
        "paired": meth["paired"],
        "noise_ceiling": meth["noise_ceiling"],
        "influence_damping_sweep": meth["influence_damping_sweep"],
        "where_it_holds": table,
        "num_parameters": num_parameters(s.params0),
        "num_lora_parameters": int(sum(np.size(x) for x in jax.tree.leaves(s.lp0))),
        "num_lora_b_parameters": _num_b(s.lp0),
        "num_lora_kernels": len(s.targets),
        "num_tasks": len(TASKS),
        "num_targets": int(F_ho.shape[1]),
        "num_train_masks": len(s.F_tr),
        "num_heldout_masks": len(F_ho),
        "pretraining": {"eval_per_task": F0_eval, "cache_hit": pre.get("cache_hit"),
                        "seconds": pre.get("seconds"),
                        "eval_loss": float(np.mean([v["loss"] for v in F0_eval.values()]))},
        "config": cfg.to_dict(),
        "ground_truth_source": os.path.basename(str(s.gt["source"])),
        "seconds": time.perf_counter() - t_run,
    }


def run_lora(cfg: LoraConfig, *, out: Optional[str] = None, cache_dir: Optional[str] = None,
             compute_ground_truth: bool = False, plots: bool = True, log=None,
             num_resamples: int = 1000, num_cost_masks: int = 8, num_calibration: int = 8,
             shipped: Optional[str] = SHIPPED) -> dict:
    """Every stage; returns the results dict (also ``out/results.json`` and plots).

    The ground truth is read from the shipped labels file or the cache; with
    ``compute_ground_truth`` a missing one is computed (long). The cost of real fine-tuning is
    timed in this run on ``num_cost_masks`` held-out masks (their labels are also compared
    with the cached ones); the estimator's ridge is calibrated on the first ``num_calibration``
    training masks' real labels.
    """
    t_run = time.perf_counter()

    def say(msg):
        if log is not None:
            log(f"[{time.perf_counter() - t_run:.0f}s] {msg}")

    s = _prepare_stage(cfg, cache_dir=cache_dir, log=log, shipped=shipped,
                       compute_ground_truth=compute_ground_truth, say=say)
    real = _real_cost_stage(cfg, s, num_cost_masks, say)
    g = _glm_stage(cfg, s, real, num_calibration, say)
    glm, glm_cost = _glm_report(cfg, s, real, g, say)
    lin = _linearized_report(cfg, s, real, g, glm, say)
    chosen = _choose_estimator(cfg, g, glm, glm_cost, lin)
    _, _, S_tr, other, other_name = chosen
    meth = _methods_stage(cfg, s, g, S_tr, other, other_name, num_resamples)
    say("LDS done")
    table = _where_it_holds_stage(cfg, s, real, g, lin, num_calibration)
    say("sweep done")
    results = _results_dict(cfg, s, glm, glm_cost, lin, chosen, meth, table, t_run)
    if out is not None:
        os.makedirs(out, exist_ok=True)
        if plots:
            results["plots"] = write_plots(out, results,
                                           {"linearized AdamW": lin.stage["L_ho"], "GLM": g.E_ho},
                                           s.F_ho, s.F0)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=1, default=float)
    return results


def _holds(e: dict) -> bool:
    return bool(e["ratio_to_no_change"] <= 0.5 and e["relative_error"] <= 0.02
                and e["spearman"] >= 0.9)


def _cell(name, lr, steps, F_full, F0, E, F, ridge, real_s, est_s, L, lin_s) -> dict:
    """One row of the "where it holds" table: the GLM (``E``, fixed costs amortised ``est_s``)
    and linearized AdamW (``L``, ``lin_s``) against the real labels ``F`` of the cell."""
    e, el = _err(E, F, F0), _err(L, F, F0)
    return {"cell": name, "learning_rate": lr, "num_steps": steps,
            "target_change": _change(F_full, F0), **e, "ridge": ridge, "num_masks": len(F),
            "real_seconds_per_mask": real_s, "estimator_seconds_per_mask": est_s,
            "cost_ratio": real_s / est_s, "holds": _holds(e),
            "linearized_adamw": {**el, "estimator_seconds_per_mask": lin_s,
                                 "cost_ratio": real_s / lin_s, "holds": _holds(el)}}


# ------------------------------------------------------------------------------ plots / tables


def write_plots(out: str, results: dict, estimates: dict, F_ho: np.ndarray,
                F0: np.ndarray) -> list:
    """``lora_estimator.png`` (estimated vs real mean target loss per held-out mask, one colour
    per estimator in ``estimates {name: [m, T]}``), ``lora_lds.png`` (LDS with intervals,
    noise ceiling) and ``lora_sweep.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    x = F_ho.mean(1)
    lo, hi = x.min(), x.max()
    for name, E in estimates.items():
        e = _err(E, F_ho, F0)
        ax.scatter(x, E.mean(1), s=12, label=f"{name}: ratio {e['ratio_to_no_change']:.2f}, "
                                              f"Spearman {e['spearman']:.2f}")
        lo, hi = min(lo, E.mean(1).min()), max(hi, E.mean(1).max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.axhline(F0.mean(), color="gray", lw=1, ls=":", label="W0 (nothing changes)")
    ax.set_xlabel("real LoRA fine-tuning: mean target loss")
    ax.set_ylabel("estimated mean target loss")
    ax.set_title("held-out masks", fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    paths.append(os.path.join(out, "lora_estimator.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = list(results["lds"])
    vals = [results["lds"][n]["lds"] for n in names]
    err = np.array([[v - results["lds"][n]["lds_ci"][0], results["lds"][n]["lds_ci"][1] - v]
                    for n, v in zip(names, vals)]).T
    ax.bar(range(len(names)), vals, yerr=err, capsize=3)
    if results["noise_ceiling"]:
        ax.axhline(results["noise_ceiling"]["lds"], color="k", ls="--", lw=1, label="noise ceiling")
        ax.legend(fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("LDS (held-out masks)")
    fig.tight_layout()
    paths.append(os.path.join(out, "lora_lds.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    paths.append(plot_sweep(out, results))
    return paths


def plot_sweep(out: str, results: dict) -> str:
    """``lora_sweep.png``: the estimator's error ratio and Spearman against the target change,
    one point per cell of the "where it holds" table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    rows = results["where_it_holds"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    x = [r["target_change"] for r in rows]
    ax.scatter(x, [r["ratio_to_no_change"] for r in rows], c="C0",
               label="GLM: error / 'nothing changes'")
    ax.scatter(x, [r["spearman"] for r in rows], c="C0", marker="s", label="GLM: Spearman")
    ax.scatter(x, [r["linearized_adamw"]["ratio_to_no_change"] for r in rows], c="C1",
               label="linearized AdamW: error / 'nothing changes'")
    ax.scatter(x, [r["linearized_adamw"]["spearman"] for r in rows], c="C1", marker="s",
               label="linearized AdamW: Spearman")
    for r in rows:
        ax.annotate(r["cell"], (r["target_change"], r["ratio_to_no_change"]), fontsize=6)
    ax.axhline(0.5, color="gray", ls=":", lw=1)
    ax.axhline(0.9, color="gray", ls="--", lw=1)
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("target change (all tasks vs W0)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out, "lora_sweep.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths[0]


def _f(x, nd=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{nd}f}"


def _est_row(name: str, e: Optional[dict], c: Optional[dict] = None) -> str:
    if not e:
        return ""
    mean2 = (e.get("against_mean_of_two_runs") or {}).get("spearman")
    cost = "" if c is None else (f"{_f(c['estimator_seconds_per_mask'], 4)} | "
                                 f"{_f(c['real_seconds_per_mask'] / c['estimator_seconds_per_mask'], 1)}")
    return (f"| {name} | {_f(e['relative_error'], 4)} | {_f(e['ratio_to_no_change'])} | "
            f"{_f(e['spearman'])} | {_f(mean2)} | {cost or ' | '} |")


def _estimator_lines(results: dict) -> list:
    """Estimator table: every estimator and variant on the held-out masks."""
    e, c = results["estimator"], results["cost"]
    ests = results.get("estimators") or {"estimator": e}
    costs = results.get("costs") or {"estimator": c}
    lines = ["| estimator (held-out masks) | rel. error | ratio to \"nothing changes\" | "
             "Spearman vs run 1 | Spearman vs mean of 2 runs | s/mask (fixed costs amortised) "
             "| cost ratio |", "|---|---|---|---|---|---|---|"]
    names = {"linearized_adamw": "linearized AdamW (same draws)", "glm": "GLM (calibrated ridge)",
             "estimator": "estimator"}
    for k, est in ests.items():
        lines.append(_est_row(names.get(k, k), est, costs.get(k)))
    lin = ests.get("linearized_adamw") or {}
    for k, v in (lin.get("variants") or {}).items():
        if k != "same_draws":
            lines.append(_est_row(f"linearized AdamW, {k.replace('_', ' ')}", v))
    lg = lin.get("logits_variant")
    if lg:
        per = lg["jacobian_seconds"] / costs["linearized_adamw"]["amortised_over_masks"] + \
            lg["per_mask_seconds_excluding_fixed"]
        lines.append(_est_row("linearized AdamW, ten logits", lg,
                              {"estimator_seconds_per_mask": per,
                               "real_seconds_per_mask": c["real_seconds_per_mask"]}))
    rr = e.get("real_rerun")
    if rr:
        lines.append(_est_row("real fine-tuning again, other draws (noise ceiling)", rr))
    pairs = [("linearized AdamW", "GLM", lin.get("intervals_vs_glm")),
             ("linearized AdamW, ten logits", "log-odds", (lg or {}).get("intervals_vs_logodds"))]
    if any(p[2] for p in pairs):
        lines += ["", "| held-out masks, 95% bootstrap intervals | ratio | Spearman | "
                      "ratio difference | Spearman difference |", "|---|---|---|---|---|"]
        for a, b, iv in pairs:
            if iv:
                r, sp = iv["ratio_minus_ref"], iv["spearman_minus_ref"]
                lines.append(
                    f"| {a} (difference: minus {b}) | [{_f(iv['ratio'][0])}, {_f(iv['ratio'][1])}] | "
                    f"[{_f(iv['spearman'][0])}, {_f(iv['spearman'][1])}] | {r[0]:+.3f} "
                    f"[{r[1]:+.3f}, {r[2]:+.3f}] | {sp[0]:+.3f} [{sp[1]:+.3f}, {sp[2]:+.3f}] |")
    return lines


def _cost_lines(results: dict) -> list:
    costs = results.get("costs") or {"estimator": results["cost"]}
    c0 = results["cost"]
    lines = ["| cost | seconds per mask | seconds for 1,000 masks | ratio per mask | "
             "ratio at 1,000 masks |", "|---|---|---|---|---|",
             f"| real LoRA fine-tuning | {_f(c0['real_seconds_per_mask'])} | "
             f"{c0['seconds_1000_masks_real']:.0f} | | |"]
    for k, c in costs.items():
        r1000 = c.get("ratio_1000_masks")
        lines.append(f"| {k.replace('_', ' ')} | {_f(c['estimator_seconds_per_mask'], 4)} | "
                     f"{c['seconds_1000_masks_estimator']:.0f} | {_f(c['ratio'], 1)} | "
                     f"{_f(r1000, 1)} |")
    inter = (costs.get("linearized_adamw") or {}).get("ratio_interleaved")
    if inter:
        lines += ["", "Linearized AdamW against real fine-tuning timed back to back, three times "
                      "(fixed costs amortised over the run's masks): ratios "
                  + ", ".join(f"{x:.1f}" for x in inter) + "."]
    return lines


def _decomposition_lines(results: dict) -> list:
    d = ((results.get("estimators") or {}).get("linearized_adamw") or {}).get(
        "error_decomposition")
    if not d:
        return []
    what = {"A_at_init": "real network, trained B, A put back at its init",
            "linear_in_B_at_trained_B": "linear in B at the trained B (A at init)",
            "linear_in_W_at_trained_A_B": "linear in the merged kernels at the trained A, B",
            "linearized_adamw": "linearized AdamW (its own trajectory)"}
    lines = ["", f"| error decomposition ({d['num_masks']} held-out masks fine-tuned for real) | "
                 "rel. error | ratio to \"nothing changes\" |", "|---|---|---|"]
    for k, v in what.items():
        lines.append(f"| {v} | {_f(d[k]['relative_error'], 4)} | "
                     f"{_f(d[k]['ratio_to_no_change'])} |")
    a = d["relative_A_movement"]
    lines.append(f"| (A moved by {_f(a['mean'], 2)} of its norm, {_f(a['min'], 2)} to "
                 f"{_f(a['max'], 2)} per kernel) | | |")
    return lines


def results_markdown(results: dict) -> str:
    """The Markdown tables of the results page, from a ``results.json`` dict (pure).

    >>> r = {"estimator": {"relative_error": 0.01, "no_change_relative_error": 0.1,
    ...      "ratio_to_no_change": 0.1, "spearman": 0.95, "ridge": 1.0},
    ...      "cost": {"real_seconds_per_mask": 2.0, "estimator_seconds_per_mask": 0.01,
    ...      "ratio": 200.0, "seconds_1000_masks_real": 2000.0,
    ...      "seconds_1000_masks_estimator": 20.0}, "target_change": -0.3,
    ...      "lds": {"kernel": {"lds": 0.5, "lds_ci": [0.4, 0.6]}},
    ...      "paired": {"kernel-linear": [0.1, 0.0, 0.2]}, "noise_ceiling": None,
    ...      "where_it_holds": [], "num_parameters": 10, "num_lora_parameters": 2,
    ...      "num_tasks": 16}
    >>> "| kernel | 0.500 | [0.400, 0.600] |" in results_markdown(r)
    True
    """
    lines = [
        f"Model: {results['num_parameters']:,} parameters, LoRA {results['num_lora_parameters']:,} "
        f"trainable parameters, {results['num_tasks']} tasks. Fine-tuning on all tasks changes "
        f"the target loss by {100 * results['target_change']:+.1f}% (relative to W0). "
        f"Labels for the surrogates: {results.get('estimator_name', 'estimator')}.",
        "", *_estimator_lines(results), "", *_cost_lines(results), *_decomposition_lines(results),
        "", "| method | LDS | 95% interval |", "|---|---|---|"]
    for name, v in results["lds"].items():
        lines.append(f"| {name} | {_f(v['lds'])} | [{_f(v['lds_ci'][0])}, {_f(v['lds_ci'][1])}] |")
    nc = results.get("noise_ceiling")
    if nc:
        lines.append(f"| noise ceiling | {_f(nc['lds'])} | [{_f(nc['lds_ci'][0])}, "
                     f"{_f(nc['lds_ci'][1])}] |")
    lines += ["", "| paired difference of LDS | mean | 95% interval |", "|---|---|---|"]
    for name, (m, lo, hi) in results["paired"].items():
        lines.append(f"| {name} | {_f(m)} | [{_f(lo)}, {_f(hi)}] |")
    rows = results.get("where_it_holds") or []
    if rows:
        lines += ["", "| cell | lr | steps | target change | real s/mask | GLM ratio | GLM Spearman "
                      "| lin. AdamW rel. error | lin. AdamW ratio | lin. AdamW Spearman | masks | "
                      "lin. AdamW cost ratio | holds (GLM / lin. AdamW) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            la = r.get("linearized_adamw") or {}
            lines.append(
                f"| {r['cell']} | {r['learning_rate']:g} | {r['num_steps']} | "
                f"{100 * r['target_change']:+.1f}% | {_f(r['real_seconds_per_mask'], 2)} | "
                f"{_f(r['ratio_to_no_change'])} | {_f(r['spearman'])} | "
                f"{_f(la.get('relative_error'), 4)} | {_f(la.get('ratio_to_no_change'))} | "
                f"{_f(la.get('spearman'))} | {r['num_masks']} | {_f(la.get('cost_ratio'), 0)} | "
                f"{'yes' if r['holds'] else 'no'} / {'yes' if la.get('holds') else 'no'} |")
    return "\n".join(lines) + "\n"
