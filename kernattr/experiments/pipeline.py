"""The end-to-end attribution pipeline on modular arithmetic (what ``kernattr demo`` runs).

Stages (each timed):

1. data (:func:`kernattr.experiments.modular.make_modular_data`) and an NNX transformer;
   ``W0`` = full-batch AdamW on all tasks.
2. masks: ``num_train_masks`` surrogate-training masks and ``num_heldout_masks`` held-out masks,
   each drawn as a mixture of Bernoulli densities ``densities`` (spread for LDS, mass near the
   all-tasks anchor for leave-one-out), plus the ``K`` leave-one-out masks and the full mask.
3. ground truth: REAL fine-tuning from ``W0`` on every mask (``regime="finetune"``; objective =
   task-weighted loss + ``prox/2 ||W - W0||²``, Adam with cosine decay to zero so that each run
   reaches the proximal optimum), or retraining from scratch (``regime="scratch"``), vmapped
   over masks; cached on disk under a hash of the configuration.
4. the gradient estimator: Rademacher-projected output gradients (full logits, softmax loss,
   ``d = 1024``) at ``W0`` and the task-weighted GLM per mask with ``ridge = prox`` (the converged
   proximal objective of the linearized model, which is what the first-order method
   approximates), solved in float64 (the ``"exact"`` solver stalls in float32 here).
5. methods on the same masks and targets: ``kernel`` / ``linear`` surrogates on estimated
   labels, ``kernel_real`` / ``datamodels`` on real labels, ``influence``, ``trak``, ``tracin``.
6. metrics: LDS on held-out masks, LOO correlation (Pearson, Spearman) with real leave-one-out,
   estimator relative error; ``results.json``, ``predictions.npz`` and PNG plots.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

CACHE_VERSION = "modular-gt-v1"


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Everything that defines a run (JSON-serialisable; the ground-truth cache key hashes it).

    Data: ``task``, ``p``, ``num_tasks`` (K), ``num_targets`` (T), ``train_fraction``, ``seed``.
    Model: ``d_model``, ``num_heads``, ``num_layers``, ``d_mlp``; pretraining ``pretrain_*``.
    Ground truth: ``regime`` (``"finetune"`` from ``W0`` or ``"scratch"``), ``finetune_steps``,
    ``finetune_lr`` (Adam, cosine-decayed to 0), ``prox`` (L2 pull to ``W0``; fine-tuning only).
    Masks: ``num_train_masks``, ``num_heldout_masks`` drawn from a mixture over ``densities``.
    Estimator: ``proj_kind``, ``proj_dim``, ``solver`` (``"exact"`` | ``"fast"``), ``ridge``
    (``None``: equal to ``prox``). Baselines: ``damping`` (``None``: equal to the ridge).
    """

    task: str = "quadratic"
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
    num_train_masks: int = 100
    num_heldout_masks: int = 100
    densities: tuple = (0.5, 0.7, 0.9)
    proj_kind: str = "rademacher"
    proj_dim: int = 1024
    solver: str = "fast"
    solver_tol: Optional[float] = 1e-6
    estimator_x64: bool = True
    ridge: Optional[float] = None
    damping: Optional[float] = None
    kernel_per_target: bool = True

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["densities"] = list(self.densities)
        return d

    def ground_truth_key(self) -> str:
        """Hash of every field that changes the real labels (not the estimator's settings)."""
        skip = {"proj_kind", "proj_dim", "solver", "solver_tol", "estimator_x64", "ridge", "damping", "kernel_per_target"}
        if self.regime == "finetune":
            skip.add("scratch_steps")
        d = {k: v for k, v in self.to_dict().items() if k not in skip}
        d["_version"] = CACHE_VERSION
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def default_cache_dir() -> str:
    base = os.environ.get("KERNATTR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "kernattr"
    )
    return base


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


# ------------------------------------------------------------------------------- model / W0


def prepare(cfg: PipelineConfig):
    """Data, model, ``W0`` (deterministic from ``cfg.seed``)."""
    from ._model import ModelSpec, build_model, pretrain
    from .modular import make_modular_data

    data = make_modular_data(task=cfg.task, p=cfg.p, num_tasks=cfg.num_tasks,
                             num_targets=cfg.num_targets, train_fraction=cfg.train_fraction,
                             seed=cfg.seed)
    spec = ModelSpec(cfg.d_model, cfg.num_heads, cfg.num_layers, cfg.d_mlp)
    apply_fn, params, init_fn = build_model(data, spec, jax.random.fold_in(jax.random.key(cfg.seed), 1))
    params0 = pretrain(apply_fn, params, data, num_steps=cfg.pretrain_steps,
                       learning_rate=cfg.pretrain_lr, weight_decay=cfg.pretrain_weight_decay)
    return data, apply_fn, params0, init_fn


# ---------------------------------------------------------------------------- ground truth


def real_labels(cfg, data, apply_fn, params0, init_fn, masks, *, progress=False):
    """``F [m, T]`` target losses after real training on each mask, and ``F0 [T]`` at ``W0``."""
    import optax

    import kernattr.groundtruth as gt

    K = cfg.num_tasks
    chunk = 64
    if cfg.regime == "finetune":
        opt = optax.adam(optax.cosine_decay_schedule(cfg.finetune_lr, cfg.finetune_steps))
        W = gt.finetune_on_masks(
            apply_fn, params0, jnp.asarray(data.train_inputs), jnp.asarray(data.train_labels),
            jnp.asarray(data.task_ids), masks, loss="softmax", optimizer=opt,
            num_steps=cfg.finetune_steps, prox=cfg.prox, mask_chunk_size=chunk, progress=progress,
        )
    elif cfg.regime == "scratch":
        opt = optax.adamw(optax.cosine_decay_schedule(cfg.pretrain_lr, cfg.scratch_steps),
                          weight_decay=cfg.pretrain_weight_decay)
        W = gt.finetune_on_masks(
            apply_fn, params0, jnp.asarray(data.train_inputs), jnp.asarray(data.train_labels),
            jnp.asarray(data.task_ids), masks, loss="softmax", optimizer=opt,
            num_steps=cfg.scratch_steps, init_fn=init_fn, key=jax.random.key(cfg.seed + 1),
            mask_chunk_size=chunk, progress=progress,
        )
    else:
        raise ValueError(f"`regime` must be 'finetune' or 'scratch', got {cfg.regime!r}.")
    del K
    evaluate = jax.jit(lambda W: gt.evaluate_targets(
        apply_fn, W, jnp.asarray(data.target_inputs), jnp.asarray(data.target_labels),
        loss="softmax", mask_chunk_size=chunk))
    F = evaluate(W)
    F0 = evaluate(jax.tree.map(lambda x: x[None], params0))[0]
    return np.asarray(F), np.asarray(F0)


def cached_ground_truth(cfg, data, apply_fn, params0, init_fn, all_masks, *, cache_dir=None,
                        progress=False) -> tuple[np.ndarray, np.ndarray, float, bool]:
    """``(F, F0, seconds, hit)``: real labels for ``all_masks``, from the cache when present."""
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, f"gt-{cfg.ground_truth_key()}.npz")
    if os.path.exists(path):
        with np.load(path) as z:
            if z["masks"].shape == all_masks.shape and np.array_equal(z["masks"], all_masks):
                return z["F"], z["F0"], float(z["seconds"]), True
    t = time.perf_counter()
    F, F0 = real_labels(cfg, data, apply_fn, params0, init_fn, jnp.asarray(all_masks),
                        progress=progress)
    seconds = time.perf_counter() - t
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + f".tmp{os.getpid()}.npz"
    np.savez(tmp, masks=all_masks, F=F, F0=F0, seconds=seconds,
             config=json.dumps(cfg.to_dict(), sort_keys=True))
    os.replace(tmp, path)
    return F, F0, seconds, False


# ----------------------------------------------------------------------------------- metrics


def _corr(a: np.ndarray, b: np.ndarray, rank: bool) -> float:
    """Mean over target columns of the Pearson (or Spearman) correlation of ``a[:, t]``, ``b[:, t]``."""
    import kernattr as ka
    from kernattr._metrics import pearson

    fn = ka.spearman if rank else pearson
    r = np.asarray(fn(jnp.asarray(a), jnp.asarray(b)))
    return float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")


def method_metrics(pred_heldout, actual_heldout, loo_pred, loo_real) -> dict:
    import kernattr as ka

    return {
        "lds": float(ka.lds(jnp.asarray(pred_heldout), jnp.asarray(actual_heldout)).mean),
        "loo_pearson": _corr(loo_pred, loo_real, rank=False),
        "loo_spearman": _corr(loo_pred, loo_real, rank=True),
    }


# ---------------------------------------------------------------------------------- pipeline


def run_pipeline(cfg: PipelineConfig, *, out: Optional[str] = None, cache_dir: Optional[str] = None,
                 progress: bool = True, plots: bool = True) -> dict:
    """Run every stage; returns the results dict (also written to ``out/results.json``)."""
    from functools import partial

    from tqdm.auto import tqdm

    import kernattr as ka

    stages = ["pretrain W0", "ground truth (real fine-tuning)", "gradient features",
              "estimated labels", "surrogates", "baselines", "write"]
    bar = tqdm(total=len(stages), disable=not progress, desc="kernattr", unit="stage")
    timings: dict[str, float] = {}

    def stage(name):
        bar.set_postfix_str(name)
        return time.perf_counter()

    t0 = time.perf_counter()
    t = stage(stages[0])
    data, apply_fn, params0, init_fn = prepare(cfg)
    jax.block_until_ready(params0)
    timings["pretrain"] = time.perf_counter() - t
    bar.update()

    masks = make_masks(cfg)
    K = cfg.num_tasks
    n_tr, n_ho = len(masks["train"]), len(masks["heldout"])
    all_masks = np.concatenate([masks["train"], masks["heldout"], masks["loo"], masks["full"]])
    t = stage(stages[1])
    F_all, F0, gt_seconds, hit = cached_ground_truth(cfg, data, apply_fn, params0, init_fn,
                                                     all_masks, cache_dir=cache_dir,
                                                     progress=progress)
    timings["ground_truth"] = time.perf_counter() - t
    timings["ground_truth_computed"] = gt_seconds
    bar.update()
    F_tr, F_ho = F_all[:n_tr], F_all[n_tr:n_tr + n_ho]
    F_loo, F_full = F_all[n_tr + n_ho:n_tr + n_ho + K], F_all[-1]
    loo_real = F_full[None, :] - F_loo  # [K, T]: F(all) - F(all but k)
    per_mask_gt = gt_seconds / len(all_masks)

    # ---- gradient features at W0 (full logits, softmax loss)
    t = stage(stages[2])
    proj_key = jax.random.fold_in(jax.random.key(cfg.seed), 2)
    dim = None if cfg.proj_kind == "identity" else cfg.proj_dim
    proj = ka.make_projector(proj_key, params0, dim=dim, kind=cfg.proj_kind)
    feats = jax.jit(partial(ka.gradient_features, apply_fn, projector=proj, chunk_size=128),
                    static_argnames=())
    train = feats(params0, jnp.asarray(data.train_inputs), jnp.asarray(data.train_labels),
                  task_ids=jnp.asarray(data.task_ids))
    target = feats(params0, jnp.asarray(data.target_inputs), jnp.asarray(data.target_labels))
    jax.block_until_ready((train, target))
    timings["features"] = time.perf_counter() - t
    bar.update()

    # ---- estimated labels on every mask (same ridge as the fine-tuning's prox)
    t = stage(stages[3])
    ridge = cfg.prox if cfg.ridge is None else cfg.ridge
    estimate = jax.jit(partial(ka.estimate_subset_labels, loss="softmax", metric="loss",
                               ridge=ridge, solver=cfg.solver, mask_chunk_size=64,
                               tol=cfg.solver_tol, max_iter=100))
    with jax.enable_x64(cfg.estimator_x64):
        dt = jnp.float64 if cfg.estimator_x64 else jnp.float32
        cast = lambda g: g._replace(grads=jnp.asarray(g.grads, dt),  # noqa: E731
                                    outputs=jnp.asarray(g.outputs, dt))
        Fh_all = np.asarray(estimate(cast(train), cast(target), jnp.asarray(all_masks, dt)),
                            np.float32)
    timings["estimate"] = time.perf_counter() - t
    bar.update()
    Fh_tr, Fh_ho = Fh_all[:n_tr], Fh_all[n_tr:n_tr + n_ho]
    est_err = __import__("kernattr.groundtruth", fromlist=["x"]).estimator_error(
        jnp.asarray(Fh_ho), jnp.asarray(F_ho), F0=jnp.asarray(F0))
    per_mask_est = (timings["features"] + timings["estimate"]) / len(all_masks)

    # ---- surrogates
    t = stage(stages[4])
    methods: dict[str, dict] = {}
    preds: dict[str, np.ndarray] = {}
    loos: dict[str, np.ndarray] = {}
    surrogates = {}
    for name, y, label_cost in (("kernel", Fh_tr, per_mask_est * n_tr),
                                ("linear", Fh_tr, per_mask_est * n_tr),
                                ("kernel_real", F_tr, per_mask_gt * n_tr),
                                ("datamodels", F_tr, per_mask_gt * n_tr)):
        ts = time.perf_counter()
        if name.startswith("kernel"):
            s = ka.fit_kernel(jnp.asarray(masks["train"]), jnp.asarray(y),
                              per_target=cfg.kernel_per_target)
        else:
            s = ka.fit_linear(jnp.asarray(masks["train"]), jnp.asarray(y), ridge=1e-3)
        pred = np.asarray(ka.predict(s, jnp.asarray(masks["heldout"])))
        loo = np.asarray(ka.loo_scores(s))
        fit_s = time.perf_counter() - ts
        surrogates[name] = s
        preds[name], loos[name] = pred, loo
        methods[name] = {**method_metrics(pred, F_ho, loo, loo_real),
                         "seconds": fit_s + label_cost, "fit_seconds": fit_s,
                         "label_seconds": label_cost}
    timings["surrogates"] = time.perf_counter() - t
    bar.update()

    # ---- baselines (scores [K, T], sign F(all) - F(all but k); LDS from additive predictions)
    t = stage(stages[5])
    damping = ridge if cfg.damping is None else cfg.damping
    feat_cost = timings["features"]
    for name, fn in (
        ("influence", partial(ka.influence_scores, loss="softmax", damping=damping, num_tasks=K)),
        ("trak", partial(ka.trak_scores, loss="softmax", damping=damping, num_tasks=K)),
        ("tracin", partial(ka.tracin_scores, loss="softmax", num_tasks=K)),
    ):
        ts = time.perf_counter()
        scores = np.asarray(jax.jit(fn)(train, target))
        sec = time.perf_counter() - ts
        pred = masks["heldout"] @ scores
        preds[name], loos[name] = pred, scores
        methods[name] = {**method_metrics(pred, F_ho, scores, loo_real),
                         "seconds": sec + feat_cost, "fit_seconds": sec, "label_seconds": feat_cost}
    timings["baselines"] = time.perf_counter() - t
    bar.update()

    t = stage(stages[6])
    ker = surrogates["kernel"]
    results = {
        "config": cfg.to_dict(),
        "sizes": {"n_train": int(len(data.train_labels)), "num_targets": int(len(data.target_labels)),
                  "num_tasks": K, "num_params": int(sum(x.size for x in jax.tree.leaves(params0))),
                  "num_train_masks": n_tr, "num_heldout_masks": n_ho, "num_classes": data.num_classes},
        "estimator": {
            "relative_error": float(est_err.relative_error),
            "no_change_relative_error": float(est_err.no_change_relative_error),
            "spearman": float(est_err.spearman),
            "change_captured": float(est_err.change_captured),
            "ratio_to_no_change": float(est_err.relative_error / est_err.no_change_relative_error),
            "ridge": float(ridge),
        },
        "methods": methods,
        "kernel_selection": {"gamma": np.asarray(ker.gamma).tolist()[:1],
                             "ridge": np.asarray(ker.ridge).tolist()[:1]},
        "ground_truth": {"cache_hit": bool(hit), "key": cfg.ground_truth_key(),
                         "seconds": gt_seconds, "num_masks": int(len(all_masks)),
                         "mean_target_loss_W0": float(np.mean(F0)),
                         "mean_target_loss_full": float(np.mean(F_full))},
        "timings": timings,
        "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
    }
    if out is not None:
        os.makedirs(out, exist_ok=True)
        np.savez(os.path.join(out, "predictions.npz"), heldout_masks=masks["heldout"],
                 train_masks=masks["train"], actual_heldout=F_ho, estimated_heldout=Fh_ho,
                 F0=F0, loo_real=loo_real,
                 **{f"pred_{k}": v for k, v in preds.items()}, **{f"loo_{k}": v for k, v in loos.items()})
        if plots:
            from .plots import write_plots

            inter = np.asarray(ka.interaction_scores(ker))
            results["plots"] = write_plots(out, masks=masks, F_ho=F_ho, preds=preds, loos=loos,
                                           loo_real=loo_real, interactions=inter,
                                           task=cfg.task, grid=data.grid)
    timings["total"] = time.perf_counter() - t0
    if out is not None:
        with open(os.path.join(out, "results.json"), "w") as fh:
            json.dump(results, fh, indent=2)
    bar.update()
    bar.close()
    return results


def format_table(results: dict) -> str:
    """A plain-text table of the results."""
    est = results["estimator"]
    lines = [
        f"estimator: relative_error={est['relative_error']:.4f}  "
        f"no_change={est['no_change_relative_error']:.4f}  spearman={est['spearman']:.3f}  "
        f"change_captured={est['change_captured']:.3f}",
        f"{'method':<12}{'LDS':>8}{'LOO r':>8}{'LOO rho':>9}{'seconds':>9}",
    ]
    for name, m in results["methods"].items():
        lines.append(f"{name:<12}{m['lds']:>8.3f}{m['loo_pearson']:>8.3f}{m['loo_spearman']:>9.3f}"
                     f"{m['seconds']:>9.2f}")
    return "\n".join(lines)
