"""The end-to-end attribution pipeline on modular arithmetic (what ``kernattr demo`` and
``kernattr reproduce modular`` run).

A run is a sequence of named stages, each a function returning a NamedTuple:

1. :func:`prepare_stage`: data (:func:`kernattr.experiments.modular.make_modular_data`, or a
   task family of :mod:`kernattr.experiments.families`) and an NNX transformer; ``W0`` =
   full-batch AdamW on all tasks.
2. :func:`masks_stage`: ``num_train_masks`` surrogate-training masks and ``num_heldout_masks``
   held-out masks, each drawn as a mixture of Bernoulli densities ``densities``, plus the ``K``
   leave-one-out masks, the full mask and (for a family) the pair-drop masks of the designed
   pairs and of as many other pairs.
3. :func:`ground_truth_stage`: REAL training on every mask, vmapped over masks and cached on
   disk under a hash of the configuration: fine-tuning from ``W0`` (``regime="finetune"``;
   objective = task-weighted loss + ``prox/2 ||W - W0||²``, Adam with cosine decay to zero) or
   retraining from scratch (``regime="scratch"``). The held-out masks are trained a second time
   with another seed (``gt_seed + 1``) for the noise ceiling.
4. :func:`features_stage`: Rademacher-projected output gradients (full logits, softmax loss,
   ``d = proj_dim``) at ``W0`` (or at the all-tasks trained point, ``linearize_at="full"``).
5. :func:`estimate_stage`: the task-weighted GLM per mask (``ridge = prox`` unless set),
   float64.
6. :func:`methods_stage`: ``kernel`` / ``linear`` surrogates on estimated labels,
   ``kernel_real`` / ``datamodels`` / ``quadratic_real`` (:func:`kernattr.fit_quadratic`, every
   pairwise interaction and no higher order) on real labels, ``kernel_real_few`` on the first
   ``num_real_few`` real labels, ``multifidelity`` (those real labels plus every estimated
   label, :func:`kernattr.fit_multifidelity`), ``influence``, ``trak``, ``tracin``.
7. :func:`evaluate_stage`: LDS with 95% bootstrap intervals over held-out masks, paired
   differences, LOO correlations, the estimator's error, the noise ceiling, the measured
   second differences of designed pairs; :func:`write_stage` writes ``results.json``,
   ``predictions.npz`` and PNG plots.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from functools import partial
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

CACHE_VERSION = "modular-gt-v2"
# Paired comparisons reported in results.json: (a, b) means LDS(a) - LDS(b).
PAIRED = (("kernel_real", "datamodels"), ("kernel", "influence"), ("kernel", "linear"),
          ("multifidelity", "kernel_real_few"), ("multifidelity", "kernel"),
          ("quadratic_real", "kernel_real"), ("kernel", "influence_best"))
# Damping grid of ``influence_best``: influence functions with the damping that gives the best
# held-out LDS in hindsight (an oracle choice, generous to influence functions).
DAMPING_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Everything that defines a run (JSON-serialisable; the ground-truth cache key hashes it).

    Data: ``task``, ``family`` (a task family of :mod:`kernattr.experiments.families`, which
    then replaces ``task``; ``num_tasks`` = 2 x blocks), ``grouping`` (``"blocks"``: a task is a
    grid block or a family's task; ``"samples"``: ``num_tasks`` random groups of examples),
    ``p``, ``num_tasks`` (K), ``num_targets`` (T), ``train_fraction``, ``seed``.
    Model: ``d_model``, ``num_heads``, ``num_layers``, ``d_mlp``; pretraining ``pretrain_*``.
    Ground truth: ``regime`` (``"finetune"`` from ``W0`` or ``"scratch"``), ``finetune_steps``,
    ``finetune_lr`` (Adam, cosine-decayed to 0), ``prox`` (L2 pull to ``W0``; fine-tuning only),
    ``scratch_steps``, ``finetune_params`` (``"all"`` or ``"head"``: fine-tune, linearize and
    score only the unembedding layer, the rest frozen at ``W0``), ``gt_seed`` (seed of the
    training itself: the init of ``"scratch"``, the init of ``W0`` for ``"finetune"``; the noise
    ceiling retrains with ``gt_seed + 1``),
    ``noise_ceiling`` (whether to measure it).
    Masks: ``num_train_masks``, ``num_heldout_masks`` drawn from a mixture over ``densities``;
    ``num_real_few`` real labels for ``kernel_real_few`` / ``multifidelity``.
    Estimator: ``proj_kind``, ``proj_dim``, ``solver`` (``"fast"`` | ``"anchored"`` |
    ``"exact"``), ``ridge`` (``None``: equal to ``prox``), ``linearize_at`` (``"W0"`` or
    ``"full"``: the model trained on all tasks under the run's regime). Baselines: ``damping``
    (``None``: equal to the ridge).
    """

    task: str = "quadratic"
    family: Optional[str] = None
    grouping: str = "blocks"
    p: int = 17
    num_tasks: int = 25
    num_targets: int = 48
    train_fraction: float = 1.0
    seed: int = 0
    d_model: int = 32
    num_heads: int = 2
    num_layers: int = 1
    d_mlp: int = 64
    pretrain_steps: int = 300
    pretrain_lr: float = 3e-3
    pretrain_weight_decay: float = 1.0
    regime: str = "finetune"
    finetune_steps: int = 40
    finetune_lr: float = 3e-3
    prox: float = 10.0
    scratch_steps: int = 300
    finetune_params: str = "all"
    gt_seed: int = 0
    noise_ceiling: bool = True
    num_train_masks: int = 100
    num_heldout_masks: int = 100
    num_real_few: int = 32
    densities: tuple = (0.5, 0.7, 0.9)
    proj_kind: str = "rademacher"
    proj_dim: int = 1024
    solver: str = "fast"
    solver_tol: Optional[float] = 1e-6
    estimator_x64: bool = True
    ridge: Optional[float] = None
    linearize_at: str = "W0"
    damping: Optional[float] = None
    kernel_per_target: bool = True

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["densities"] = list(self.densities)
        return d

    def ground_truth_key(self) -> str:
        """Hash of every field that changes the real labels (not the estimator's settings)."""
        skip = {"proj_kind", "proj_dim", "solver", "solver_tol", "estimator_x64", "ridge",
                "damping", "kernel_per_target", "linearize_at", "noise_ceiling", "num_real_few"}
        if self.regime == "finetune":
            skip.add("scratch_steps")
        d = {k: v for k, v in self.to_dict().items() if k not in skip}
        d["_version"] = CACHE_VERSION
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# Full fine-tuning (overrides of PipelineConfig's defaults), the base of ``kernattr reproduce
# modular``, ``suite`` and ``atlas``: strong fine-tuning of every parameter (prox 0.03, 200 steps)
# and dense masks (density 0.9), the regime where the regime study found the kernel's largest
# advantage over a linear surrogate on real labels (its figures are on the modular results page).
FULL_FINETUNE = {"prox": 0.03, "finetune_steps": 200, "densities": (0.9,)}


# Last-layer fine-tuning (``kernattr reproduce modular --last-layer``): only the unembedding is
# fine-tuned (561 parameters at p = 17), so the logits are linear in what is trained and the
# linearized GLM is the real fine-tuning problem: no projection, the GLM solved to convergence
# (``solver="exact"``), a very weak pull to ``W0`` (prox 3e-6) so that fine-tuning moves far from
# it and the labels stop being additive, and enough Adam steps (cosine-decayed) to reach the
# proximal optimum (prox 3e-4 needs 1,000; 3e-6 needs 10,000: the estimated labels then match the
# real ones with Spearman 0.999 across masks).
LAST_LAYER = {"finetune_params": "head", "prox": 3e-6, "finetune_lr": 0.03,
              "finetune_steps": 10_000, "solver": "exact", "proj_kind": "identity"}


def last_layer_config(**overrides) -> PipelineConfig:
    """:data:`FULL_FINETUNE` with :data:`LAST_LAYER` on top (last-layer fine-tuning), then
    ``overrides`` (``kernattr reproduce modular --last-layer``).

    >>> last_layer_config().finetune_params, last_layer_config(prox=1e-3).prox
    ('head', 0.001)
    """
    return PipelineConfig(**{**FULL_FINETUNE, **LAST_LAYER, **overrides})


# The headline regime ``kernattr demo`` runs: last-layer fine-tuning (:data:`LAST_LAYER`) on the
# antagonism family (each block has a partner with the same inputs and a conflicting rule), masks
# of density 0.95, gradients projected from 561 to d = 448 dimensions. The linearization is exact
# there, the real labels are far from additive (K = 24), and the projection is the estimator's one
# error. Density 0.95 rather than 0.9: the kernel's lead on real labels was x1.16 / x1.19 at seeds
# 0 / 1 there, against x1.20 / x1.125 at 0.9. d = 448 rather than none or 256: unprojected, the
# estimated labels are exact and 32 real labels add nothing to them; at d = 256 the estimator
# ranks masks with Spearman 0.66 / 0.71 only; at 448, 0.86 / 0.86 (seeds 0 / 1).
HEADLINE = {**LAST_LAYER, "family": "antagonism", "num_tasks": 24, "densities": (0.95,),
            "proj_kind": "rademacher", "proj_dim": 448}


def headline_config(**overrides) -> PipelineConfig:
    """``kernattr demo``'s configuration: :data:`HEADLINE` on top of :data:`FULL_FINETUNE`.

    >>> cfg = headline_config(seed=2)
    >>> cfg.family, cfg.finetune_params, cfg.num_tasks, cfg.seed
    ('antagonism', 'head', 24, 2)
    """
    return PipelineConfig(**{**FULL_FINETUNE, **HEADLINE, **overrides})


def demo_config(**overrides) -> PipelineConfig:
    """Full fine-tuning (:data:`FULL_FINETUNE`; the atlas's centre, ``kernattr reproduce
    modular``), with ``overrides``.

    >>> demo_config(seed=3).seed
    3
    """
    return PipelineConfig(**{**FULL_FINETUNE, **overrides})


def default_cache_dir() -> str:
    base = os.environ.get("KERNATTR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "kernattr"
    )
    return base


# ------------------------------------------------------------------------------ stage results


class Prepared(NamedTuple):
    """Stage 1: ``data`` (ModularData), ``apply_fn``, ``params0`` (``W0``), ``init_fn``,
    ``designed`` (FamilyData or ``None``), ``seconds``."""

    data: Any
    apply_fn: Callable
    params0: Any
    init_fn: Callable
    designed: Any
    seconds: float


class MaskSet(NamedTuple):
    """Stage 2 (numpy float32): ``train [m, K]``, ``heldout [m', K]``, ``loo [K, K]``,
    ``full [1, K]``, ``pairs [P, K]`` pair-drop masks of ``pair_index [P, 2]`` (the first
    ``num_designed`` rows are the designed pairs)."""

    train: np.ndarray
    heldout: np.ndarray
    loo: np.ndarray
    full: np.ndarray
    pairs: np.ndarray
    pair_index: np.ndarray
    num_designed: int

    def stacked(self) -> np.ndarray:
        """All masks in one array, in field order (the ground-truth cache's layout)."""
        return np.concatenate([self.train, self.heldout, self.loo, self.full, self.pairs])


class GroundTruth(NamedTuple):
    """Stage 3: real labels ``[rows, T]`` per mask group, ``F0 [T]`` at ``W0``, ``loo_real
    [K, T]`` = ``F(all) - F(all - k)``, ``heldout_repeat`` (the held-out masks retrained with
    another seed, or ``None``), ``seconds`` (of computing, even when cached), ``cache_hit``,
    ``key``."""

    train: np.ndarray
    heldout: np.ndarray
    loo: np.ndarray
    full: np.ndarray
    pairs: np.ndarray
    F0: np.ndarray
    loo_real: np.ndarray
    heldout_repeat: Optional[np.ndarray]
    seconds: float
    cache_hit: bool
    key: str


class Features(NamedTuple):
    """Stage 4: ``train`` / ``target`` GradientFeatures at the linearization point, ``seconds``."""

    train: Any
    target: Any
    seconds: float


class Estimates(NamedTuple):
    """Stage 5: estimated labels ``train [m, T]``, ``heldout [m', T]``, ``ridge``, ``seconds``."""

    train: np.ndarray
    heldout: np.ndarray
    ridge: float
    seconds: float


class MethodOutputs(NamedTuple):
    """Stage 6: per method ``preds [m', T]`` on held-out masks, ``loos [K, T]`` scores,
    ``seconds`` (labels + fit), ``fit_seconds``, ``label_seconds``; ``kernel`` (the kernel
    surrogate on estimated labels, for interaction plots); ``influence_damping`` (the held-out
    LDS of influence functions at each damping of :data:`DAMPING_GRID`)."""

    preds: dict
    loos: dict
    seconds: dict
    fit_seconds: dict
    label_seconds: dict
    kernel: Any
    influence_damping: Optional[dict] = None


# ----------------------------------------------------------------------------------- masks


def mixture_masks(key: jax.Array, *, num_tasks: int, num_subsets: int, densities) -> jax.Array:
    """``[m, K]`` masks, split evenly over Bernoulli densities (empty masks redrawn as full)."""
    import kernattr as ka

    densities = tuple(float(q) for q in densities)
    counts = [num_subsets // len(densities)] * len(densities)
    for i in range(num_subsets - sum(counts)):
        counts[i] += 1
    parts = [
        ka.sample_subsets(jax.random.fold_in(key, i), num_tasks=num_tasks, num_subsets=c, p=q)
        for i, (c, q) in enumerate(zip(counts, densities))
        if c > 0
    ]
    masks = jnp.concatenate(parts, axis=0)
    empty = jnp.sum(masks, axis=1, keepdims=True) == 0
    return jnp.where(empty, 1.0, masks)


def make_masks(cfg: PipelineConfig) -> dict:
    """Training, held-out, leave-one-out and full masks (numpy, float32)."""
    import kernattr as ka

    key = jax.random.key(cfg.seed)
    K = cfg.num_tasks
    train = mixture_masks(jax.random.fold_in(key, 11), num_tasks=K,
                          num_subsets=cfg.num_train_masks, densities=cfg.densities)
    held = mixture_masks(jax.random.fold_in(key, 12), num_tasks=K,
                         num_subsets=cfg.num_heldout_masks, densities=cfg.densities)
    loo = ka.leave_one_out_masks(K)
    full = jnp.ones((1, K))
    return {k: np.asarray(v, np.float32) for k, v in
            dict(train=train, heldout=held, loo=loo, full=full).items()}


def masks_stage(cfg: PipelineConfig, prep: Prepared) -> MaskSet:
    """Stage 2: every mask of the run (see :class:`MaskSet`)."""
    from .families import other_pairs, pair_drop_masks

    m = make_masks(cfg)
    K = cfg.num_tasks
    if prep.designed is not None:
        designed = np.asarray(prep.designed.designed_pairs)
        others = other_pairs(K, designed, len(designed), seed=cfg.seed)
        index = np.concatenate([designed, others]).astype(np.int64)
        pairs = pair_drop_masks(K, index)
        nd = len(designed)
    else:
        index, pairs, nd = np.zeros((0, 2), np.int64), np.zeros((0, K), np.float32), 0
    return MaskSet(m["train"], m["heldout"], m["loo"], m["full"], pairs, index, nd)


# ------------------------------------------------------------------------------- model / W0


def make_data(cfg: PipelineConfig):
    """The run's data (:class:`~kernattr.experiments.modular.ModularData`) and its
    :class:`~kernattr.experiments.families.FamilyData` (``None`` without a family)."""
    from .families import make_family_data
    from .modular import make_modular_data

    fam = None
    if cfg.family is not None:
        if cfg.num_tasks % 2:
            raise ValueError(f"a family needs an even `num_tasks` (2 x blocks), got {cfg.num_tasks}.")
        fam = make_family_data(cfg.family, p=cfg.p, num_blocks=cfg.num_tasks // 2,
                               num_targets=cfg.num_targets, seed=cfg.seed)
        data = fam.data
    else:
        # sample groups are drawn below, so the grid is then one block (any K fits)
        data = make_modular_data(task=cfg.task, p=cfg.p,
                                 num_tasks=1 if cfg.grouping == "samples" else cfg.num_tasks,
                                 num_targets=cfg.num_targets, train_fraction=cfg.train_fraction,
                                 seed=cfg.seed)
    if cfg.grouping == "samples":
        if fam is not None:
            raise ValueError("`grouping='samples'` regroups examples at random: it has no "
                             "designed pairs, so it cannot be combined with `family`.")
        rng = np.random.default_rng([cfg.seed, 31])
        n = len(data.task_ids)
        if cfg.num_tasks > n:
            raise ValueError(f"`num_tasks`={cfg.num_tasks} sample groups but only {n} examples.")
        data = data._replace(task_ids=(rng.permutation(n) % cfg.num_tasks).astype(np.int32))
    elif cfg.grouping != "blocks":
        raise ValueError(f"`grouping` must be 'blocks' or 'samples', got {cfg.grouping!r}.")
    return data, fam


def prepare(cfg: PipelineConfig):
    """``(data, apply_fn, W0, init_fn)``, deterministic from ``cfg.seed`` and ``cfg.gt_seed``."""
    return prepare_stage(cfg)[:4]


def prepare_stage(cfg: PipelineConfig) -> Prepared:
    """Stage 1: data, model and ``W0`` (see :class:`Prepared`)."""
    from ._model import ModelSpec, build_model, pretrain

    t = time.perf_counter()
    data, fam = make_data(cfg)
    spec = ModelSpec(cfg.d_model, cfg.num_heads, cfg.num_layers, cfg.d_mlp)
    init_key = jax.random.fold_in(jax.random.key(cfg.seed), 1)
    if cfg.gt_seed:
        init_key = jax.random.fold_in(init_key, 1000 + cfg.gt_seed)
    apply_fn, params, init_fn = build_model(data, spec, init_key)
    params0 = pretrain(apply_fn, params, data, num_steps=cfg.pretrain_steps,
                       learning_rate=cfg.pretrain_lr, weight_decay=cfg.pretrain_weight_decay)
    if cfg.finetune_params == "head":
        if cfg.regime != "finetune":
            raise ValueError("`finetune_params='head'` needs `regime='finetune'`.")
        from ._model import restrict_to

        apply_fn, params0 = restrict_to(apply_fn, params0, "unembed")
        init_fn = None
    elif cfg.finetune_params != "all":
        raise ValueError(f"`finetune_params` must be 'all' or 'head', got {cfg.finetune_params!r}.")
    jax.block_until_ready(params0)
    return Prepared(data, apply_fn, params0, init_fn, fam, time.perf_counter() - t)


# ---------------------------------------------------------------------------- ground truth


def training_key(cfg: PipelineConfig) -> jax.Array:
    """The key of the training itself (the shared init of ``"scratch"``; unused by full-batch
    fine-tuning), from ``seed`` and ``gt_seed``."""
    key = jax.random.key(cfg.seed + 1)
    return jax.random.fold_in(key, 1000 + cfg.gt_seed) if cfg.gt_seed else key


def train_fn(cfg: PipelineConfig, data, apply_fn, init_fn) -> Callable:
    """``train(params0, key, masks [c, K]) -> stacked params``: real training of a chunk of masks
    (``params0`` is the start of fine-tuning; ``key`` the init of retraining from scratch)."""
    import optax

    import kernattr.groundtruth as gt

    x, y, t = (jnp.asarray(a) for a in (data.train_inputs, data.train_labels, data.task_ids))
    if cfg.regime == "finetune":
        opt = optax.adam(optax.cosine_decay_schedule(cfg.finetune_lr, cfg.finetune_steps))
        return lambda params0, key, masks: gt.finetune_on_masks(
            apply_fn, params0, x, y, t, masks, loss="softmax", optimizer=opt,
            num_steps=cfg.finetune_steps, prox=cfg.prox)
    if cfg.regime == "scratch":
        opt = optax.adamw(optax.cosine_decay_schedule(cfg.pretrain_lr, cfg.scratch_steps),
                          weight_decay=cfg.pretrain_weight_decay)
        return lambda params0, key, masks: gt.finetune_on_masks(
            apply_fn, params0, x, y, t, masks, loss="softmax", optimizer=opt,
            num_steps=cfg.scratch_steps, init_fn=init_fn, key=key)
    raise ValueError(f"`regime` must be 'finetune' or 'scratch', got {cfg.regime!r}.")


MASK_CHUNK = 64


def make_runner(cfg: PipelineConfig, data, apply_fn, init_fn) -> Callable:
    """Jitted ``run(params0, key, masks [64, K]) -> F [64, T]`` (train, then target losses).

    Build it once and pass it to :func:`real_labels` for several seeds or starting points: the
    program compiles once (chunks are always :data:`MASK_CHUNK` masks, padded).
    """
    import kernattr.groundtruth as gt

    train = train_fn(cfg, data, apply_fn, init_fn)
    xt, yt = jnp.asarray(data.target_inputs), jnp.asarray(data.target_labels)
    return jax.jit(lambda p0, key, mk: gt.evaluate_targets(apply_fn, train(p0, key, mk), xt, yt,
                                                          loss="softmax"))


def real_labels(cfg, data, apply_fn, params0, init_fn, masks, *, progress=False, runner=None):
    """``F [m, T]`` target losses after real training on each mask, and ``F0 [T]`` at ``W0``."""
    from tqdm.auto import tqdm

    import kernattr.groundtruth as gt

    run = make_runner(cfg, data, apply_fn, init_fn) if runner is None else runner
    key = training_key(cfg)
    masks = np.asarray(masks, np.float32)
    m, chunk = len(masks), MASK_CHUNK
    num_chunks = -(-m // chunk)
    padded = np.concatenate([masks, np.ones((num_chunks * chunk - m, masks.shape[1]), np.float32)])
    out = [np.asarray(run(params0, key, jnp.asarray(padded[c * chunk:(c + 1) * chunk])))
           for c in tqdm(range(num_chunks), desc="training", unit="chunk", disable=not progress,
                         leave=False)]
    F = np.concatenate(out)[:m]
    F0 = np.asarray(gt.evaluate_targets(apply_fn, jax.tree.map(lambda a: a[None], params0),
                                        jnp.asarray(data.target_inputs),
                                        jnp.asarray(data.target_labels), loss="softmax"))[0]
    return F, F0


def cached_ground_truth(cfg, data, apply_fn, params0, init_fn, all_masks, *, cache_dir=None,
                        progress=False, runner=None) -> tuple[np.ndarray, np.ndarray, float, bool]:
    """``(F, F0, seconds, hit)``: real labels for ``all_masks``, from the cache when present."""
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, f"gt-{cfg.ground_truth_key()}.npz")
    if os.path.exists(path):
        with np.load(path) as z:
            if z["masks"].shape == all_masks.shape and np.array_equal(z["masks"], all_masks):
                return z["F"], z["F0"], float(z["seconds"]), True
    t = time.perf_counter()
    kw = {} if runner is None else {"runner": runner}
    F, F0 = real_labels(cfg, data, apply_fn, params0, init_fn, jnp.asarray(all_masks),
                        progress=progress, **kw)
    seconds = time.perf_counter() - t
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + f".tmp{os.getpid()}.npz"
    np.savez(tmp, masks=all_masks, F=F, F0=F0, seconds=seconds,
             config=json.dumps(cfg.to_dict(), sort_keys=True))
    os.replace(tmp, path)
    return F, F0, seconds, False


def ground_truth_stage(cfg: PipelineConfig, prep: Prepared, masks: MaskSet, *,
                       cache_dir=None, progress=False) -> GroundTruth:
    """Stage 3: real labels of every mask, and of the held-out masks under another seed."""
    all_masks = masks.stacked()
    runner = make_runner(cfg, prep.data, prep.apply_fn, prep.init_fn)
    F, F0, seconds, hit = cached_ground_truth(cfg, prep.data, prep.apply_fn, prep.params0,
                                              prep.init_fn, all_masks, cache_dir=cache_dir,
                                              progress=progress, runner=runner)
    sizes = [len(masks.train), len(masks.heldout), len(masks.loo), 1, len(masks.pairs)]
    tr, ho, loo, full, pairs = np.split(F, np.cumsum(sizes)[:-1])
    repeat = None
    if cfg.noise_ceiling:
        cfg2 = dataclasses.replace(cfg, gt_seed=cfg.gt_seed + 1)
        # finetune: another W0 (its init seed); scratch: another init of every retraining.
        # The same model and data, so the compiled training program is reused.
        prep2 = prepare_stage(cfg2) if cfg.regime == "finetune" else prep
        if cfg.finetune_params != "all":
            # the frozen layers are part of the model: the other W0's need its own program
            runner = make_runner(cfg2, prep2.data, prep2.apply_fn, prep2.init_fn)
        repeat, _, sec2, hit2 = cached_ground_truth(cfg2, prep.data, prep2.apply_fn,
                                                    prep2.params0, prep.init_fn, masks.heldout,
                                                    cache_dir=cache_dir, progress=progress,
                                                    runner=runner)
        seconds += sec2
        hit = hit and hit2
    return GroundTruth(tr, ho, loo, full[0], pairs, F0, full[0][None, :] - loo, repeat,
                       seconds, hit, cfg.ground_truth_key())


# ------------------------------------------------------------------------ features/estimates


def features_stage(cfg: PipelineConfig, prep: Prepared) -> Features:
    """Stage 4: projected logit gradients at ``W0`` or at the all-tasks trained point."""
    import kernattr as ka

    t = time.perf_counter()
    data, params = prep.data, prep.params0
    if cfg.linearize_at == "full":
        train = jax.jit(train_fn(cfg, data, prep.apply_fn, prep.init_fn))
        W = train(prep.params0, training_key(cfg), jnp.ones((1, cfg.num_tasks)))
        params = jax.tree.map(lambda a: a[0], W)
    elif cfg.linearize_at != "W0":
        raise ValueError(f"`linearize_at` must be 'W0' or 'full', got {cfg.linearize_at!r}.")
    proj_key = jax.random.fold_in(jax.random.key(cfg.seed), 2)
    dim = None if cfg.proj_kind == "identity" else cfg.proj_dim
    proj = ka.make_projector(proj_key, params, dim=dim, kind=cfg.proj_kind)
    feats = jax.jit(partial(ka.gradient_features, prep.apply_fn, projector=proj, chunk_size=128))
    train_f = feats(params, jnp.asarray(data.train_inputs), jnp.asarray(data.train_labels),
                    task_ids=jnp.asarray(data.task_ids))
    target_f = feats(params, jnp.asarray(data.target_inputs), jnp.asarray(data.target_labels))
    jax.block_until_ready((train_f, target_f))
    return Features(train_f, target_f, time.perf_counter() - t)


def estimate_stage(cfg: PipelineConfig, feats: Features, masks: MaskSet) -> Estimates:
    """Stage 5: estimated labels of the training and held-out masks (same ridge as ``prox``)."""
    import kernattr as ka

    t = time.perf_counter()
    ridge = cfg.prox if cfg.ridge is None else cfg.ridge
    estimate = jax.jit(partial(ka.estimate_subset_labels, loss="softmax", metric="loss",
                               ridge=ridge, solver=cfg.solver, mask_chunk_size=64,
                               tol=cfg.solver_tol, max_iter=100))
    both = np.concatenate([masks.train, masks.heldout])
    with jax.enable_x64(cfg.estimator_x64):
        dt = jnp.float64 if cfg.estimator_x64 else jnp.float32

        def cast(g):
            return g._replace(grads=jnp.asarray(g.grads, dt), outputs=jnp.asarray(g.outputs, dt))

        Fh = np.asarray(estimate(cast(feats.train), cast(feats.target), jnp.asarray(both, dt)),
                        np.float32)
    n = len(masks.train)
    return Estimates(Fh[:n], Fh[n:], float(ridge), time.perf_counter() - t)


# ----------------------------------------------------------------------------------- methods


def methods_stage(cfg: PipelineConfig, masks: MaskSet, gt: GroundTruth, est: Estimates,
                  feats: Features) -> MethodOutputs:
    """Stage 6: every method's held-out predictions and task scores (see
    :class:`MethodOutputs`). Label costs: estimated labels cost the features and estimation
    time per mask; real labels cost the ground truth's time per mask."""
    import kernattr as ka

    n_all = len(masks.stacked())
    per_gt = gt.seconds / n_all
    per_est = (feats.seconds + est.seconds) / (len(masks.train) + len(masks.heldout))
    n_tr, few = len(masks.train), min(cfg.num_real_few, len(masks.train))
    tr, ho = jnp.asarray(masks.train), jnp.asarray(masks.heldout)
    out = MethodOutputs({}, {}, {}, {}, {}, None)

    def record(name, fit, label_cost):
        ts = time.perf_counter()
        s = fit()
        pred = np.asarray(ka.predict(s, ho))
        loo = np.asarray(ka.loo_scores(s))
        fit_s = time.perf_counter() - ts
        out.preds[name], out.loos[name] = pred, loo
        out.fit_seconds[name], out.label_seconds[name] = fit_s, label_cost
        out.seconds[name] = fit_s + label_cost
        return s

    kern = partial(ka.fit_kernel, per_target=cfg.kernel_per_target)
    lin = partial(ka.fit_linear, ridge=1e-3)
    ker = record("kernel", lambda: kern(tr, jnp.asarray(est.train)), per_est * n_tr)
    record("linear", lambda: lin(tr, jnp.asarray(est.train)), per_est * n_tr)
    record("kernel_real", lambda: kern(tr, jnp.asarray(gt.train)), per_gt * n_tr)
    record("datamodels", lambda: lin(tr, jnp.asarray(gt.train)), per_gt * n_tr)
    record("quadratic_real", lambda: ka.fit_quadratic(tr, jnp.asarray(gt.train)), per_gt * n_tr)
    record("kernel_real_few", lambda: kern(tr[:few], jnp.asarray(gt.train[:few])), per_gt * few)
    record("multifidelity",
           lambda: ka.fit_multifidelity(tr, jnp.asarray(est.train), tr[:few],
                                        jnp.asarray(gt.train[:few]),
                                        per_target=cfg.kernel_per_target),
           per_est * n_tr + per_gt * few)

    def record_scores(name, scores, sec):
        """An additive baseline: task scores [K, T], held-out predictions ``masks @ scores``."""
        out.preds[name], out.loos[name] = masks.heldout @ scores, scores
        out.fit_seconds[name], out.label_seconds[name] = sec, feats.seconds
        out.seconds[name] = sec + feats.seconds

    damping = est.ridge if cfg.damping is None else cfg.damping
    K = cfg.num_tasks
    for name, fn in (
        ("influence", partial(ka.influence_scores, loss="softmax", damping=damping, num_tasks=K)),
        ("trak", partial(ka.trak_scores, loss="softmax", damping=damping, num_tasks=K)),
        ("tracin", partial(ka.tracin_scores, loss="softmax", num_tasks=K)),
    ):
        ts = time.perf_counter()
        scores = np.asarray(jax.jit(fn)(feats.train, feats.target))
        record_scores(name, scores, time.perf_counter() - ts)

    # influence functions at every damping of the grid, the best on the held-out labels kept
    ts = time.perf_counter()
    sweep = jax.jit(jax.vmap(lambda tr, tg, d: ka.influence_scores(
        tr, tg, loss="softmax", damping=d, num_tasks=K), in_axes=(None, None, 0)))
    all_scores = np.asarray(sweep(feats.train, feats.target,
                                  jnp.asarray(DAMPING_GRID, feats.train.grads.dtype)))
    lds = [float(ka.lds(jnp.asarray(masks.heldout @ s), jnp.asarray(gt.heldout)).mean)
           for s in all_scores]
    best = int(np.nanargmax(lds))
    record_scores("influence_best", all_scores[best], time.perf_counter() - ts)
    sweep_report = {"damping": list(DAMPING_GRID), "lds": lds, "best": DAMPING_GRID[best],
                    "what": "influence functions at each damping; influence_best uses the one "
                            "with the best held-out LDS, chosen in hindsight (an oracle)"}
    return out._replace(kernel=ker, influence_damping=sweep_report)


# ----------------------------------------------------------------------------------- metrics


def _corr(a: np.ndarray, b: np.ndarray, rank: bool) -> float:
    """Mean over target columns of the Pearson (or Spearman) correlation of ``a[:, t]``, ``b[:, t]``."""
    import kernattr as ka

    fn = ka.spearman if rank else ka.pearson
    r = np.asarray(fn(jnp.asarray(a), jnp.asarray(b)))
    return float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")


def method_metrics(pred_heldout, actual_heldout, loo_pred, loo_real) -> dict:
    import kernattr as ka

    return {
        "lds": float(ka.lds(jnp.asarray(pred_heldout), jnp.asarray(actual_heldout)).mean),
        "loo_pearson": _corr(loo_pred, loo_real, rank=False),
        "loo_spearman": _corr(loo_pred, loo_real, rank=True),
    }


def _interval(ci) -> list:
    return [float(ci.low), float(ci.high)]


def evaluate_stage(cfg: PipelineConfig, masks: MaskSet, gt: GroundTruth, est: Estimates,
                   meth: MethodOutputs, prep: Prepared, *, num_resamples: int = 1000) -> dict:
    """Stage 7: every figure of ``results.json`` except config, sizes and timings.

    LDS intervals: 95% percentile bootstrap over held-out masks (:func:`kernattr.lds_interval`,
    key ``seed + 7``; the same resamples for every method, so ``paired`` intervals are paired).
    """
    import kernattr as ka

    key = jax.random.key(cfg.seed + 7)
    actual = jnp.asarray(gt.heldout)
    methods = {}
    for name in meth.preds:
        ci = ka.lds_interval(key, jnp.asarray(meth.preds[name]), actual,
                             num_resamples=num_resamples)
        methods[name] = {**method_metrics(meth.preds[name], gt.heldout, meth.loos[name],
                                          gt.loo_real),
                         "lds_ci": _interval(ci), "seconds": meth.seconds[name],
                         "fit_seconds": meth.fit_seconds[name],
                         "label_seconds": meth.label_seconds[name]}
    paired = {}
    for a, b in PAIRED:
        d = ka.paired_lds_interval(key, jnp.asarray(meth.preds[a]), jnp.asarray(meth.preds[b]),
                                   actual, num_resamples=num_resamples)
        paired[f"{a}-{b}"] = [float(d.mean), float(d.low), float(d.high)]
    err = ka.estimator_error(jnp.asarray(est.heldout), actual, F0=jnp.asarray(gt.F0))
    per_mask = np.abs(est.heldout.mean(1) - gt.heldout.mean(1)) / np.abs(gt.heldout.mean(1))
    per_mask0 = np.abs(gt.F0.mean() - gt.heldout.mean(1)) / np.abs(gt.heldout.mean(1))
    per_mask_full = np.abs(gt.full.mean() - gt.heldout.mean(1)) / np.abs(gt.heldout.mean(1))
    ratio_ci = ka.bootstrap_interval(key, jnp.asarray(np.stack([per_mask, per_mask0], 1)),
                                     num_resamples=num_resamples)
    estimator = {
        "relative_error": float(err.relative_error),
        "relative_error_ci": [float(ratio_ci.low[0]), float(ratio_ci.high[0])],
        "no_change_relative_error": float(err.no_change_relative_error),
        "spearman": float(err.spearman),
        "change_captured": float(err.change_captured),
        "ratio_to_no_change": float(err.relative_error / err.no_change_relative_error),
        # the same "nothing changes" reference taken at the all-tasks trained model instead of W0
        "full_mask_relative_error": float(np.mean(per_mask_full)),
        "ridge": est.ridge,
        "solver": cfg.solver,
        "linearize_at": cfg.linearize_at,
    }
    noise = None
    if gt.heldout_repeat is not None:
        ci = ka.lds_interval(key, jnp.asarray(gt.heldout_repeat), actual,
                             num_resamples=num_resamples)
        noise = {"lds": float(ci.mean), "lds_ci": _interval(ci),
                 # what differs between the two labelings: "w0" (fine-tuning from a fixed W0 is
                 # deterministic, so only W0 is redrawn) or "init" (retraining from scratch)
                 "kind": "w0" if cfg.regime == "finetune" else "init",
                 "what": ("LDS between the held-out labels and the same masks retrained with "
                          + ("another W0 (init seed of pretraining); fine-tuning from a fixed W0 "
                             "is deterministic, so this measures the dependence on W0, not label "
                             "noise, and is not an upper bound" if cfg.regime == "finetune"
                             else "another initialisation"))}
    inter = None
    if prep.designed is not None and masks.num_designed:
        from .families import interaction_report, second_differences

        sd = second_differences(gt.full, gt.loo, gt.pairs, masks.pair_index)
        nd = masks.num_designed
        inter = interaction_report(sd[:nd], sd[nd:], prep.designed.designed_block,
                                   prep.data.target_task_ids)
        inter["family"] = cfg.family
    return {"methods": methods, "paired": paired, "estimator": estimator, "noise_ceiling": noise,
            "interactions": inter}


# ---------------------------------------------------------------------------------- pipeline


def run_pipeline(cfg: PipelineConfig, *, out: Optional[str] = None, cache_dir: Optional[str] = None,
                 progress: bool = True, plots: bool = True, num_resamples: int = 1000) -> dict:
    """Run every stage; returns the results dict (also written to ``out/results.json``)."""
    from tqdm.auto import tqdm

    stages = ("prepare", "ground truth", "features", "estimate", "methods", "evaluate", "write")
    bar = tqdm(total=len(stages), disable=not progress, desc="kernattr", unit="stage")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def timed(name, fn, *args, **kw):
        bar.set_postfix_str(name)
        t = time.perf_counter()
        res = fn(*args, **kw)
        timings[name.replace(" ", "_")] = time.perf_counter() - t
        bar.update()
        return res

    prep = timed("prepare", prepare_stage, cfg)
    masks = masks_stage(cfg, prep)
    gt = timed("ground truth", ground_truth_stage, cfg, prep, masks, cache_dir=cache_dir,
               progress=progress)
    timings["ground_truth_computed"] = gt.seconds
    feats = timed("features", features_stage, cfg, prep)
    est = timed("estimate", estimate_stage, cfg, feats, masks)
    meth = timed("methods", methods_stage, cfg, masks, gt, est, feats)
    ev = timed("evaluate", evaluate_stage, cfg, masks, gt, est, meth, prep,
               num_resamples=num_resamples)
    results = timed("write", write_stage, cfg, prep, masks, gt, est, meth, ev, timings, out=out,
                    plots=plots)
    bar.close()
    timings["total"] = time.perf_counter() - t0
    if out is not None:
        with open(os.path.join(out, "results.json"), "w") as fh:
            json.dump(results, fh, indent=2)
    return results


def write_stage(cfg, prep, masks, gt, est, meth, ev, timings, *, out=None, plots=True) -> dict:
    """Stage 8: the results dict; with ``out``, ``predictions.npz`` and the PNG plots."""
    import kernattr as ka

    data = prep.data
    ker = meth.kernel
    results = {
        "config": cfg.to_dict(),
        "sizes": {"n_train": int(len(data.train_labels)), "num_targets": int(len(data.target_labels)),
                  "num_tasks": cfg.num_tasks,
                  "num_params": int(sum(x.size for x in jax.tree.leaves(prep.params0))),
                  "num_train_masks": len(masks.train), "num_heldout_masks": len(masks.heldout),
                  "num_real_few": min(cfg.num_real_few, len(masks.train)),
                  "num_classes": data.num_classes},
        "estimator": ev["estimator"],
        "methods": ev["methods"],
        "paired": ev["paired"],
        "noise_ceiling": ev["noise_ceiling"],
        "interactions": ev["interactions"],
        "influence_damping": meth.influence_damping,
        "kernel_selection": {"gamma": np.asarray(ker.gamma).tolist()[:1],
                             "ridge": np.asarray(ker.ridge).tolist()[:1]},
        "ground_truth": {"cache_hit": bool(gt.cache_hit), "key": gt.key,
                         "seconds": gt.seconds, "num_masks": int(len(masks.stacked())),
                         "mean_target_loss_W0": float(np.mean(gt.F0)),
                         "mean_target_loss_full": float(np.mean(gt.full))},
        "timings": timings,
        "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
    }
    if out is not None:
        os.makedirs(out, exist_ok=True)
        extra = {} if gt.heldout_repeat is None else {"actual_heldout_repeat": gt.heldout_repeat}
        np.savez(os.path.join(out, "predictions.npz"), heldout_masks=masks.heldout,
                 train_masks=masks.train, actual_heldout=gt.heldout, actual_train=gt.train,
                 estimated_heldout=est.heldout, estimated_train=est.train, F0=gt.F0,
                 loo_real=gt.loo_real, **extra,
                 **{f"pred_{k}": v for k, v in meth.preds.items()},
                 **{f"loo_{k}": v for k, v in meth.loos.items()})
        if plots:
            from .plots import write_lds_plot, write_plots

            inter = np.asarray(ka.interaction_scores(ker))
            results["plots"] = write_plots(out, masks=masks._asdict(), F_ho=gt.heldout,
                                           preds=meth.preds, loos=meth.loos,
                                           loo_real=gt.loo_real, interactions=inter,
                                           task=cfg.family or cfg.task, grid=data.grid)
            results["plots"]["lds"] = write_lds_plot(out, ev["methods"], ev["noise_ceiling"])
    return results


def format_table(results: dict) -> str:
    """A plain-text table of the results."""
    est = results["estimator"]
    lines = [
        f"estimator: relative_error={est['relative_error']:.4f}  "
        f"no_change={est['no_change_relative_error']:.4f}  spearman={est['spearman']:.3f}  "
        f"change_captured={est['change_captured']:.3f}",
        f"{'method':<16}{'LDS':>7}{'95% CI':>16}{'LOO r':>8}{'LOO rho':>9}{'seconds':>9}",
    ]
    for name, m in results["methods"].items():
        lo, hi = m.get("lds_ci", [float("nan")] * 2)
        lines.append(f"{name:<16}{m['lds']:>7.3f}   [{lo:.3f}, {hi:.3f}]{m['loo_pearson']:>8.3f}"
                     f"{m['loo_spearman']:>9.3f}{m['seconds']:>9.2f}")
    for name, (mean, lo, hi) in results.get("paired", {}).items():
        lines.append(f"paired {name:<30} {mean:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    nc = results.get("noise_ceiling")
    if nc:
        lines.append(f"noise ceiling: {nc['lds']:.3f} [{nc['lds_ci'][0]:.3f}, {nc['lds_ci'][1]:.3f}]"
                     f" ({nc.get('what', 'LDS of a retraining with another seed')})")
    return "\n".join(lines)


def results_markdown(results: dict) -> str:
    """Markdown tables of a ``results.json`` written by :func:`run_pipeline` (for the docs site).

    Pure function of the dict: the methods' LDS with its 95% bootstrap interval and the
    leave-one-out correlations, the paired differences, the estimator's error against "nothing
    changes" and the noise ceiling. Timings are left out (they depend on the machine).

    Args:
      results: the dict of ``results.json`` (keys ``methods``, ``estimator``; optionally
        ``paired``, ``noise_ceiling``, ``config``).

    Returns:
      Markdown text (tables and a few lines), ending with a newline.

    Raises:
      KeyError: when ``methods`` or ``estimator`` is missing.

    >>> r = {"methods": {"kernel": {"lds": 0.8, "lds_ci": [0.7, 0.9], "loo_pearson": 0.5,
    ...                             "loo_spearman": 0.4}},
    ...      "estimator": {"relative_error": 0.1, "no_change_relative_error": 0.5,
    ...                    "spearman": 0.9}}
    >>> print(results_markdown(r).splitlines()[2])
    | kernel | 0.800 | [0.700, 0.900] | 0.500 | 0.400 |
    """
    methods = results["methods"]
    est = results["estimator"]

    def num(x, fmt):
        return "n/a" if x is None else format(x, fmt)

    lines = ["| method | LDS | 95% CI | LOO r | LOO ρ |", "|---|---|---|---|---|"]
    for name, m in methods.items():
        lo, hi = m.get("lds_ci", [None, None])
        lines.append(f"| {name} | {num(m['lds'], '.3f')} | [{num(lo, '.3f')}, {num(hi, '.3f')}] | "
                     f"{num(m.get('loo_pearson'), '.3f')} | {num(m.get('loo_spearman'), '.3f')} |")
    paired = results.get("paired") or {}
    if paired:
        lines += ["", "| a − b (paired, same bootstrap resamples) | mean | 95% CI |", "|---|---|---|"]
        for name, (mean, lo, hi) in paired.items():
            lines.append(f"| {name.replace('-', ' − ', 1)} | {mean:+.3f} | [{lo:+.3f}, {hi:+.3f}] |")
    lines += ["", f"Estimator on the held-out masks: relative error "
              f"{est['relative_error']:.1%} against {est['no_change_relative_error']:.1%} for "
              f"\"nothing changes\"; Spearman {est['spearman']:.3f} across masks."]
    nc = results.get("noise_ceiling")
    if nc:
        lo, hi = nc.get("lds_ci", [float("nan")] * 2)
        lines.append(f"Noise ceiling: {nc['lds']:.3f} [{lo:.3f}, {hi:.3f}]"
                     + (f" ({nc['what']})." if nc.get("what") else "."))
    return "\n".join(lines) + "\n"
