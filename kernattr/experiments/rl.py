"""Task attribution for multi-task RL with SAC (what ``kernattr reproduce rl`` runs).

Stages (each a function returning a NamedTuple or dict; see :func:`run_rl`):

1. ``prepare``: the point-mass tasks (:mod:`kernattr.experiments.rl_env`), noisy-expert offline
   data, and ``W0`` = multi-task SAC+BC trained offline on all tasks.
2. masks: surrogate-training masks (real labels), cheap masks (estimated labels only), held-out
   masks, leave-one-out and full masks; shared by every seed.
3. ground truth: fine-tune ``W0`` offline on each mask's tasks (task-weighted SAC+BC with a
   proximal pull to ``W0``; all masks vmapped), then roll out the deterministic policy on each
   target task: the real return. The same runs give the target tasks' behaviour-cloning loss,
   the quantity the estimator predicts.
4. the gradient estimator: actor-mean output gradients at ``W0`` (:func:`kernattr.adapters.
   sac_output_fn` ``"actor_mean"``, actor filter) and the task-weighted squared-loss GLM per
   mask (``ka.estimate_subset_labels``), i.e. the linearized behaviour-cloning part of
   fine-tuning; label = minus the target tasks' BC loss (higher is better, like the return).
5. methods: ``kernel`` / ``linear`` on estimated labels, ``kernel_real`` / ``datamodels`` on
   real returns, ``influence``, ``tracin`` (scores of the same BC objective).
6. selection: for each target and method, the companion tasks the method predicts best, then
   fine-tuned for real; against random companions and all tasks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from functools import partial
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .. import task_weights
from ._rl_common import (SACAttributionConfig, lds_summary, paired_summary, sac_batch,
                         sac_optimizers)
from .plots import save_figure

METHODS = ("kernel", "kernel_real", "linear", "datamodels", "influence", "tracin")
SELECTORS = ("kernel", "kernel_real", "linear", "datamodels", "influence", "tracin")


@dataclasses.dataclass(frozen=True)
class RLConfig(SACAttributionConfig):
    """Everything that defines a run of ``kernattr reproduce rl`` (JSON-serialisable).

    The shared fields (data, agent, ``W0``, fine-tuning, masks, estimator, selection, kernel)
    are those of :class:`~kernattr.experiments._rl_common.SACAttributionConfig`, with its
    defaults. Added here: ``seeds``, independent repetitions (data, ``W0``, fine-tuning noise;
    masks are shared); ``eval_starts`` start states for evaluation; ``mask_chunk`` masks per
    vmapped fine-tuning chunk.
    """

    seeds: tuple = (0, 1, 2)
    eval_starts: int = 16
    mask_chunk: int = 64


# ---------------------------------------------------------------------------------- stage 1


class Prepared(NamedTuple):
    """Tasks, offline data, the agent and its multi-task checkpoint ``W0`` for one seed."""

    tasks: object
    targets: tuple
    data: object
    sac: object
    params0: object
    starts: jax.Array


def prepare(cfg: RLConfig, seed: int) -> Prepared:
    """Data and ``W0`` for one seed (deterministic from ``seed``)."""
    from kernattr.adapters import make_sac

    from .sac import make_train_step

    from .rl_env import collect, default_tasks, start_states

    key = jax.random.key(seed)
    tasks, targets = default_tasks()
    data = collect(jax.random.fold_in(key, 1), tasks, episodes=cfg.episodes, horizon=cfg.horizon)
    sac, params = make_sac(jax.random.fold_in(key, 2), obs_dim=2, task_dim=2, act_dim=2,
                           hidden=cfg.hidden)
    K = tasks.descriptor.shape[0]
    init, step = make_train_step(sac, **sac_optimizers(cfg.pretrain_lr, cfg.pretrain_steps),
                                 gamma=cfg.gamma, bc_weight=cfg.bc_weight, q_weight=cfg.q_weight)
    w = task_weights(jnp.ones((1, K)), data.task_ids, K)[0]
    batch = sac_batch(data)

    @jax.jit
    def train(params, key):
        def body(i, s):
            return step(s, batch, w, jax.random.fold_in(key, i))[0]
        return jax.lax.fori_loop(0, cfg.pretrain_steps, body, init(params)).params

    params0 = train(params, jax.random.fold_in(key, 3))
    starts = start_states(jax.random.fold_in(key, 4), cfg.eval_starts)
    return Prepared(tasks, targets, data, sac, params0, starts)


# ---------------------------------------------------------------------------------- stage 2


def make_masks(cfg: RLConfig, num_tasks: int) -> dict:
    """Train (real labels), cheap (estimated only), held-out, leave-one-out and full masks."""
    import kernattr as ka

    from .pipeline import mixture_masks

    key = jax.random.key(cfg.mask_seed)
    out = {}
    for i, (name, m) in enumerate((("train", cfg.num_train_masks), ("cheap", cfg.num_cheap_masks),
                                   ("heldout", cfg.num_heldout_masks))):
        out[name] = mixture_masks(jax.random.fold_in(key, i), num_tasks=num_tasks, num_subsets=m,
                                  densities=cfg.densities)
    out["loo"] = ka.leave_one_out_masks(num_tasks)
    out["full"] = jnp.ones((1, num_tasks))
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


# ---------------------------------------------------------------------------------- stage 3


def target_examples(prep: Prepared):
    """Target tasks' states with the clean expert's pre-tanh actions: ``(Batch, t_of_example)``."""
    from kernattr.adapters import Batch

    from .rl_env import expert_preaction

    d = prep.data
    rows, owner = [], []
    for j, t in enumerate(prep.targets):
        idx = np.flatnonzero(np.asarray(d.task_ids) == t)
        rows.append(idx)
        owner.append(np.full(len(idx), j))
    idx = np.concatenate(rows)
    obs, task = d.obs[idx], d.task[idx]
    goal = prep.tasks.goal[np.asarray(d.task_ids)[idx]]
    action = jnp.tanh(expert_preaction(obs, goal))
    zeros = jnp.zeros(len(idx))
    return Batch(obs, task, action, zeros, obs, zeros), np.concatenate(owner)


def make_finetune_eval(cfg: RLConfig, prep: Prepared):
    """A jitted ``(masks [c, K], key) -> (returns [c, T], bc_loss [c, T])``: real fine-tuning
    from ``W0`` on each mask (vmapped), then rollouts and the BC loss on every target task."""
    from .sac import make_train_step

    from .rl_env import rollout_returns

    sac, params0, data = prep.sac, prep.params0, prep.data
    K = prep.tasks.descriptor.shape[0]
    init, step = make_train_step(sac, **sac_optimizers(cfg.finetune_lr, cfg.finetune_steps),
                                 gamma=cfg.gamma, bc_weight=cfg.bc_weight, q_weight=cfg.q_weight,
                                 prox=cfg.prox)
    batch = sac_batch(data)
    tb, owner = target_examples(prep)
    T = len(prep.targets)
    onehot = jax.nn.one_hot(jnp.asarray(owner), T)  # [n_t, T]
    u_star = jnp.arctanh(jnp.clip(tb.action, -1 + 1e-6, 1 - 1e-6))
    tgt = jnp.asarray(prep.targets)
    cues, goals = prep.tasks.descriptor[tgt], prep.tasks.goal[tgt]

    def one(weights, key):
        def body(i, s):
            return step(s, batch, weights, jax.random.fold_in(key, i))[0]
        params = jax.lax.fori_loop(0, cfg.finetune_steps, body, init(params0)).params
        ret = jax.vmap(lambda c, g: rollout_returns(sac.act, params.actor, c, g, prep.starts,
                                                    horizon=cfg.horizon))(cues, goals)
        mean = sac.actor(params.actor, tb.obs, tb.task)[0]
        per_ex = 0.5 * jnp.mean((mean - u_star) ** 2, axis=-1)  # mean over the A dims
        bc = (per_ex @ onehot) / jnp.sum(onehot, axis=0)
        return ret, bc

    @jax.jit
    def run(masks, key):
        w = task_weights(masks, data.task_ids, K)
        return jax.vmap(one, in_axes=(0, None))(w, key)

    return run


def run_masks(fn, masks: np.ndarray, key, chunk: int, bar=None):
    """``fn`` over ``masks`` in padded chunks of ``chunk`` (one compilation)."""
    outs = []
    for i in range(0, len(masks), chunk):
        part = masks[i:i + chunk]
        pad = np.concatenate([part, np.ones((chunk - len(part), part.shape[1]), part.dtype)])
        r, b = fn(jnp.asarray(pad), key)
        outs.append((np.asarray(r)[:len(part)], np.asarray(b)[:len(part)]))
        if bar is not None:
            bar.update(len(part))
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


# ---------------------------------------------------------------------------------- stage 4


class Features(NamedTuple):
    train: object
    target: object
    owner: np.ndarray
    num_targets: int


def features(cfg: RLConfig, prep: Prepared, seed: int) -> Features:
    """Actor-mean output gradients at ``W0`` for every (transition, action dim) and target row."""
    import kernattr as ka
    from kernattr.adapters import actor_mean_labels, pack_examples, sac_output_fn

    fn, sel = sac_output_fn(prep.sac, prep.params0, output="actor_mean", filter="actor")
    kind = "identity" if cfg.proj_dim is None else "rademacher"
    proj = ka.make_projector(jax.random.fold_in(jax.random.key(seed), 5), sel, dim=cfg.proj_dim,
                             kind=kind)
    batch = sac_batch(prep.data)
    A = prep.sac.act_dim
    tid = jnp.repeat(prep.data.task_ids, A)
    feats = jax.jit(partial(ka.gradient_features, fn, projector=proj, chunk_size=512),
                    static_argnames=("num_tasks",))
    K = prep.tasks.descriptor.shape[0]
    train = feats(sel, pack_examples(batch, output="actor_mean"), actor_mean_labels(batch),
                  task_ids=tid, num_tasks=K)
    tb, owner = target_examples(prep)
    target = feats(sel, pack_examples(tb, output="actor_mean"), actor_mean_labels(tb))
    return Features(train, target, np.repeat(owner, A), len(prep.targets))


def estimated_labels(cfg: RLConfig, feats: Features, masks: np.ndarray) -> np.ndarray:
    """``[m, T]`` minus the estimated BC loss of each target task (higher is better)."""
    import kernattr as ka

    ridge = cfg.prox / (2.0 * cfg.bc_weight)  # per-dim examples halve the weights
    with jax.enable_x64(True):
        cast = lambda g: g._replace(grads=jnp.asarray(g.grads, jnp.float64),  # noqa: E731
                                    outputs=jnp.asarray(g.outputs, jnp.float64),
                                    labels=jnp.asarray(g.labels, jnp.float64))
        est = jax.jit(partial(ka.estimate_subset_labels, loss="squared", metric="loss",
                              ridge=ridge, solver="fast"))
        per_ex = np.asarray(est(cast(feats.train), cast(feats.target),
                                jnp.asarray(masks, jnp.float64)))
    onehot = np.eye(feats.num_targets)[feats.owner]
    return -(per_ex @ onehot) / onehot.sum(0)


def baseline_scores(cfg: RLConfig, feats: Features, num_tasks: int) -> dict:
    """``[K, T]`` influence and TracIn scores of the BC objective, sign as ``ka.loo_scores`` of
    the (higher-is-better) labels."""
    import kernattr as ka

    onehot = np.eye(feats.num_targets)[feats.owner]
    out = {}
    for name, fn in (("influence", partial(ka.influence_scores, loss="squared",
                                           damping=cfg.prox / (2.0 * cfg.bc_weight),
                                           num_tasks=num_tasks)),
                     ("tracin", partial(ka.tracin_scores, loss="squared", num_tasks=num_tasks))):
        s = np.asarray(jax.jit(fn)(feats.train, feats.target))  # [K, n_t] on the loss
        out[name] = -(s @ onehot) / onehot.sum(0)
    return out


# ---------------------------------------------------------------------------------- stage 6


def all_masks_with(target: int, num_tasks: int) -> np.ndarray:
    """``[2^(K-1), K]`` every mask that contains ``target``.

    >>> all_masks_with(0, 3).tolist()
    [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    """
    others = [k for k in range(num_tasks) if k != target]
    grid = ((np.arange(2 ** len(others))[:, None] >> np.arange(len(others))[None]) & 1)
    masks = np.zeros((len(grid), num_tasks), np.float32)
    masks[:, others] = grid
    masks[:, target] = 1.0
    return masks


def select(predict_fn, target_col: int, target_task: int, num_tasks: int) -> np.ndarray:
    """The mask containing the target that ``predict_fn(masks) [m, T]`` rates best.

    >>> select(lambda m: m @ np.array([[1.0], [-1.0], [2.0]]), 0, 0, 3).tolist()
    [1.0, 0.0, 1.0]
    """
    cand = all_masks_with(target_task, num_tasks)
    pred = np.asarray(predict_fn(cand))[:, target_col]
    return cand[int(np.argmax(pred))]


def select_additive(scores: np.ndarray, target_col: int, target_task: int) -> np.ndarray:
    """Target plus every task with a positive additive score (influence, TracIn).

    >>> select_additive(np.array([[-1.0], [0.5], [-2.0]]), 0, 0).tolist()
    [1.0, 1.0, 0.0]
    """
    mask = (scores[:, target_col] > 0).astype(np.float32)
    mask[target_task] = 1.0
    return mask


# ---------------------------------------------------------------------------------- driver


def _corr(a: np.ndarray, b: np.ndarray, rank: bool) -> float:
    import kernattr as ka

    fn = ka.spearman if rank else ka.pearson
    r = np.asarray(fn(jnp.asarray(a), jnp.asarray(b)))
    return float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")


def run_seed(cfg: RLConfig, seed: int, masks: dict, *, bar=None) -> dict:
    """Every stage for one seed; returns arrays (labels, predictions, scores, selections)."""
    import kernattr as ka

    t = {}
    t0 = time.perf_counter()
    prep = prepare(cfg, seed)
    jax.block_until_ready(prep.params0)
    t["w0"] = time.perf_counter() - t0
    K = prep.tasks.descriptor.shape[0]
    T = len(prep.targets)
    fn = make_finetune_eval(cfg, prep)
    key = jax.random.fold_in(jax.random.key(seed), 6)

    t0 = time.perf_counter()
    names = ("train", "heldout", "loo", "full")
    allm = np.concatenate([np.zeros((1, K), np.float32)] + [masks[n] for n in names])
    R, BC = run_masks(fn, allm, key, cfg.mask_chunk, bar)
    R_rep, _ = run_masks(fn, masks["heldout"], jax.random.fold_in(key, 1), cfg.mask_chunk, bar)
    t["ground_truth"] = time.perf_counter() - t0
    n = np.cumsum([1] + [len(masks[k]) for k in names])
    split = {k: slice(n[i], n[i + 1]) for i, k in enumerate(names)}
    R0, BC0 = R[0], BC[0]
    R_tr, R_ho, R_loo, R_full = (R[split[k]] for k in names)
    BC_ho = BC[split["heldout"]]

    t0 = time.perf_counter()
    feats = features(cfg, prep, seed)
    est_masks = np.concatenate([masks["train"], masks["cheap"], masks["heldout"]])
    Fh = estimated_labels(cfg, feats, est_masks)
    t["estimator"] = time.perf_counter() - t0
    n_est = len(masks["train"]) + len(masks["cheap"])
    Fh_tr, Fh_ho = Fh[:n_est], Fh[n_est:]
    est_tr_masks = est_masks[:n_est]

    t0 = time.perf_counter()
    preds, loos, predictors = {}, {}, {}
    for name, m, y in (("kernel", est_tr_masks, Fh_tr), ("linear", est_tr_masks, Fh_tr),
                       ("kernel_real", masks["train"], R_tr),
                       ("datamodels", masks["train"], R_tr)):
        if name.startswith("kernel"):
            s = ka.fit_kernel(jnp.asarray(m), jnp.asarray(y), per_target=True,
                              kernel=cfg.kernel)
        else:
            s = ka.fit_linear(jnp.asarray(m), jnp.asarray(y), ridge=1e-3)
        predictors[name] = (lambda s: lambda mm: ka.predict(s, jnp.asarray(mm)))(s)
        preds[name] = np.asarray(predictors[name](masks["heldout"]))
        loos[name] = np.asarray(ka.loo_scores(s))
    scores = baseline_scores(cfg, feats, K)
    for name, s in scores.items():
        preds[name] = masks["heldout"] @ s
        loos[name] = s
    t["methods"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    sel_masks, sel_index = [], []
    for j, tt in enumerate(prep.targets):
        chosen = {name: select(predictors[name], j, tt, K) for name in predictors}
        chosen.update({name: select_additive(scores[name], j, tt) for name in scores})
        chosen["all_tasks"] = np.ones(K, np.float32)
        for name, m in chosen.items():
            sel_index.append((j, name))
            sel_masks.append(m)
        for r in range(cfg.num_random):
            m = (rng.random(K) < 0.5).astype(np.float32)
            m[tt] = 1.0
            sel_index.append((j, "random"))
            sel_masks.append(m)
    R_sel, _ = run_masks(fn, np.stack(sel_masks), jax.random.fold_in(key, 2), cfg.mask_chunk, bar)
    selection: dict = {}
    chosen_sets: dict = {}
    for (j, name), row, m in zip(sel_index, R_sel, sel_masks):
        selection.setdefault(name, np.zeros(T)).__iadd__(
            np.eye(T)[j] * row[j] / (cfg.num_random if name == "random" else 1))
        if name != "random":
            chosen_sets.setdefault(name, [None] * T)[j] = np.flatnonzero(m).tolist()
    t["selection"] = time.perf_counter() - t0
    return dict(R0=R0, BC0=BC0, R_tr=R_tr, R_ho=R_ho, R_rep=R_rep, R_loo=R_loo, R_full=R_full[0],
                BC_ho=BC_ho, Fh_ho=Fh_ho, preds=preds, loos=loos, selection=selection,
                chosen=chosen_sets, timings=t, targets=prep.targets, names=prep.tasks.names,
                interactions=np.asarray(ka.interaction_scores(
                    _refit_kernel(est_tr_masks, Fh_tr, cfg.kernel))),
                num_params=int(sum(x.size for x in jax.tree.leaves(prep.params0.actor))))


def _refit_kernel(masks, y, kernel):
    import kernattr as ka

    return ka.fit_kernel(jnp.asarray(masks), jnp.asarray(y), per_target=True, kernel=kernel)


def run_rl(cfg: RLConfig, *, out: Optional[str] = None, progress: bool = True,
           plots: bool = True) -> dict:
    """Run every stage for every seed; returns the results dict (also ``out/results.json``)."""
    import kernattr as ka
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    K = 10
    masks = make_masks(cfg, K)
    per_seed_masks = (1 + sum(len(masks[k]) for k in ("train", "heldout", "loo", "full"))
                      + len(masks["heldout"]) + 3 * (len(SELECTORS) + 1 + cfg.num_random))
    bar = tqdm(total=per_seed_masks * len(cfg.seeds), disable=not progress, desc="rl: fine-tune",
               unit="mask")
    runs = [run_seed(cfg, s, masks, bar=bar) for s in cfg.seeds]
    bar.close()

    def stack(name):  # [m, T * S]: columns are (seed, target) pairs
        return np.concatenate([r[name] for r in runs], axis=1)

    R_ho, R_rep, Fh_ho, BC_ho = stack("R_ho"), stack("R_rep"), stack("Fh_ho"), stack("BC_ho")
    loo_real = np.concatenate([r["R_full"][None] - r["R_loo"] for r in runs], axis=1)  # [K, TS]
    key = jax.random.key(cfg.mask_seed)
    lds, loo = {}, {}
    for name in METHODS:
        pred = np.concatenate([r["preds"][name] for r in runs], axis=1)
        lds[name] = lds_summary(key, pred, R_ho)  # same key: same resamples for every method
        sc = np.concatenate([r["loos"][name] for r in runs], axis=1)
        lds[name]["lds_per_column"] = np.asarray(
            ka.spearman(jnp.asarray(pred), jnp.asarray(R_ho))).round(4).tolist()
        lds[name].update(loo_pearson=_corr(sc, loo_real, False),
                         loo_spearman=_corr(sc, loo_real, True))
        loo[name] = sc
    P = {n: np.concatenate([r["preds"][n] for r in runs], axis=1) for n in METHODS}
    paired = {f"kernel-{b}": paired_summary(key, P["kernel"], P[b], R_ho)
              for b in ("influence", "linear", "tracin")}
    paired["kernel_real-datamodels"] = paired_summary(key, P["kernel_real"], P["datamodels"], R_ho)
    ceiling = lds_summary(key, R_rep, R_ho)

    from kernattr import estimator_error

    BC0 = np.concatenate([r["BC0"] for r in runs])
    err = estimator_error(jnp.asarray(-Fh_ho), jnp.asarray(BC_ho), F0=jnp.asarray(BC0))
    per = {n: np.stack([r["selection"][n] for r in runs])
           for n in sorted(runs[0]["selection"])}  # [S, T]
    results = {
        "lds": lds,
        "paired": paired,
        "noise_ceiling": ceiling,
        "estimator": _estimator_summary(err),
        **_selection_summary(per),
        "return_W0": float(np.stack([r["R0"] for r in runs]).mean()),
        "chosen_companions": [r["chosen"] for r in runs],
        "num_targets": len(runs[0]["targets"]),
        "num_seeds": len(runs),
        "targets": [runs[0]["names"][t] for t in runs[0]["targets"]],
        "tasks": list(runs[0]["names"]),
        "config": cfg.to_dict(),
        "sizes": {"num_tasks": K, "actor_params": runs[0]["num_params"],
                  **{f"num_{k}_masks": int(len(v)) for k, v in masks.items()}},
        "timings": {k: float(sum(r["timings"][k] for r in runs)) for k in runs[0]["timings"]},
        "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
    }
    results["timings"]["total"] = time.perf_counter() - t_start
    if out is not None:
        os.makedirs(out, exist_ok=True)
        np.savez(os.path.join(out, "predictions.npz"), heldout_masks=masks["heldout"],
                 actual_heldout=R_ho, replicate_heldout=R_rep, estimated_heldout=Fh_ho,
                 loo_real=loo_real, **{f"pred_{k}": v for k, v in P.items()},
                 **{f"loo_{k}": v for k, v in loo.items()},
                 **{f"selection_{k}": v for k, v in per.items()})
        if plots:
            results["plots"] = write_rl_plots(out, runs[0]["interactions"], runs[0]["names"],
                                              runs[0]["targets"], per)
        with open(os.path.join(out, "results.json"), "w") as fh:
            json.dump(results, fh, indent=2)
    return results


def _estimator_summary(err) -> dict:
    """The estimator's error on the target tasks' behaviour-cloning loss, as JSON numbers."""
    return {"relative_error": float(err.relative_error),
            "no_change_relative_error": float(err.no_change_relative_error),
            "ratio_to_no_change": float(err.relative_error / err.no_change_relative_error),
            "spearman": float(err.spearman), "change_captured": float(err.change_captured),
            "quantity": "target tasks' behaviour-cloning loss (what the estimator predicts)"}


def _selection_summary(per: dict) -> dict:
    """Mean return of each selector's masks, its spread over seeds, and how often the kernel's
    choice beat each other selector's; ``per[name]`` is ``[S, T]`` (seeds, targets)."""
    return {
        "selection": {n: float(v.mean()) for n, v in per.items()},
        "selection_spread": {n: {"std_over_seeds_of_target_mean": float(v.mean(1).std()),
                                 "min": float(v.min()), "max": float(v.max()),
                                 "per_seed_target": v.tolist()} for n, v in per.items()},
        "selection_kernel_wins_fraction": {n: float(np.mean(per["kernel"] > v))
                                           for n, v in per.items() if n != "kernel"},
    }


def write_rl_plots(out: str, interactions: np.ndarray, names, targets, per: dict) -> list:
    """``interactions.png`` (kernel surrogate's pairwise interactions per target, seed 0) and
    ``selection.png`` (target return by selection method, mean and spread)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 3.8))
    for j, ax in enumerate(np.atleast_1d(axes)):
        m = interactions[:, :, j]
        v = np.abs(m).max() or 1.0
        im = ax.imshow(m, cmap="RdBu_r", vmin=-v, vmax=v)
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_title(f"target {names[targets[j]]}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("pairwise interactions (kernel surrogate, estimated labels)")
    files.append(save_figure(fig, out, "interactions.png"))

    order = sorted(per, key=lambda n: per[n].mean())
    fig, ax = plt.subplots(figsize=(7, 3.6))
    means = [per[n].mean() for n in order]
    ax.barh(range(len(order)), means, color=["C3" if n == "kernel" else "C0" for n in order])
    for i, n in enumerate(order):
        ax.plot(per[n].ravel(), np.full(per[n].size, i), "k.", ms=3)
    ax.set_yticks(range(len(order)), order)
    ax.set_xlabel("target return (mean reward per step; dots: each target x seed)")
    files.append(save_figure(fig, out, "selection.png"))
    return files


def format_table(results: dict) -> str:
    """Plain-text summary of :func:`run_rl`'s results."""
    est = results["estimator"]
    lines = [f"estimator (target BC loss): relative_error={est['relative_error']:.4f}  "
             f"no_change={est['no_change_relative_error']:.4f}  spearman={est['spearman']:.3f}",
             f"noise ceiling LDS {results['noise_ceiling']['lds']:.3f}",
             f"{'method':<12}{'LDS':>8}{'95% CI':>18}{'LOO r':>8}{'LOO rho':>9}"]
    for name, m in results["lds"].items():
        lo, hi = m["lds_ci"]
        lines.append(f"{name:<12}{m['lds']:>8.3f}   [{lo:6.3f}, {hi:6.3f}]"
                     f"{m['loo_pearson']:>8.3f}{m['loo_spearman']:>9.3f}")
    for k, (mu, lo, hi) in results["paired"].items():
        lines.append(f"paired {k:<24} {mu:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    lines.append(f"selection (target return, mean over {results['num_targets']} targets x "
                 f"{results['num_seeds']} seeds; W0 {results['return_W0']:.4f}):")
    for name, v in sorted(results["selection"].items(), key=lambda kv: -kv[1]):
        sp = results["selection_spread"][name]["std_over_seeds_of_target_mean"]
        lines.append(f"  {name:<12}{v:>9.4f}  (sd over seeds {sp:.4f})")
    return "\n".join(lines)
