"""Task attribution on Meta-World MT10 with SAC (what ``kernattr reproduce mt10`` runs).

Needs the optional extra ``kernattr[rl]`` (``metaworld`` 3.x and ``mujoco``); nothing is
downloaded at run time. Same stages as :mod:`kernattr.experiments.rl`, on the real simulator:

1. offline data: Meta-World's scripted expert policies with Gaussian action noise, for the 10
   MT10 tasks (one fixed task variation each; one-hot task conditioning);
2. ``W0``: multi-task SAC+BC trained offline on all 10 tasks;
3. ground truth: fine-tune ``W0`` on each mask's tasks (vmapped), then roll the deterministic
   policy out in MuJoCo on each target task: return and success;
4. the gradient estimator on the actor-mean adapter (behaviour cloning part, as in ``rl``);
5. methods (LDS with bootstrap intervals on held-out masks) and companion selection.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from .. import task_weights
from ._rl_common import (SACAttributionConfig, lds_summary, paired_summary, sac_batch,
                         sac_optimizers)
from .rl import Features, select, select_additive

MT10 = ("reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3",
        "drawer-close-v3", "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3",
        "window-close-v3")
ACT_CLIP = 0.95


@dataclasses.dataclass(frozen=True)
class MT10Config(SACAttributionConfig):
    """A run of ``kernattr reproduce mt10`` (``quick()`` for the <= 15 min configuration).

    Shared fields as in :class:`~kernattr.experiments._rl_common.SACAttributionConfig`, with
    longer episodes, a wider agent, fewer masks and the ``"rbf"`` kernel by default. Added:
    ``tasks`` (the MT10 task names), ``targets``, ``seed``, action ``noise`` of the data
    collection, ``eval_episodes``.
    """

    episodes: int = 4
    horizon: int = 100
    hidden: tuple = (64, 64)
    finetune_steps: int = 40
    num_train_masks: int = 32
    num_cheap_masks: int = 256
    num_heldout_masks: int = 32
    num_random: int = 2
    kernel: str = "rbf"
    tasks: tuple = MT10
    targets: tuple = ("reach-v3", "drawer-close-v3", "window-open-v3")
    seed: int = 0
    noise: float = 0.3
    eval_episodes: int = 1

    @classmethod
    def quick(cls, **kw) -> "MT10Config":
        base = dict(num_train_masks=24, num_heldout_masks=24, horizon=80, episodes=3)
        base.update(kw)
        return cls(**base)


def _one_variation(name: str, seed: int):
    """One MT10 task variation of ``name``, built like Meta-World's own benchmark (which
    samples 50 variations per task and takes seconds; one is all this pipeline uses)."""
    import pickle

    import metaworld
    from metaworld import env_dict

    cls = env_dict.ALL_V3_ENVIRONMENTS[name]
    kwargs = dict(env_dict.ML1_ARGS_KWARGS[name]["kwargs"])
    kwargs.pop("task_id", None)
    env = cls()
    env._freeze_rand_vec = False
    env._set_task_called = True
    env._set_task_inner(**kwargs)
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        env.reset()
        vec = env._last_rand_vec
    finally:
        np.random.set_state(state)
    kwargs.update(rand_vec=vec, env_cls=cls, **getattr(metaworld, "_MT_OVERRIDE", {}))
    env.set_task(metaworld.Task(env_name=name, data=pickle.dumps(kwargs)))
    return env


def make_envs(names, seed: int = 0) -> dict:
    """One Meta-World env per task name, each fixed to one task variation (seeded)."""
    out = {}
    for name in names:
        if name not in MT10:
            raise ValueError(f"unknown MT10 task {name!r}; choose from {MT10}.")
        out[name] = _one_variation(name, seed)
    return out


def _policy(name: str):
    from metaworld import policies

    special = {"peg-insert-side-v3": "SawyerPegInsertionSideV3Policy"}
    cls = special.get(name) or (
        "Sawyer" + "".join(p.capitalize() for p in name.replace("-v3", "").split("-")) + "V3Policy")
    return getattr(policies, cls)()


def collect_mt10(envs: dict, names, *, episodes: int, horizon: int, noise: float, seed: int):
    """Noisy scripted-expert transitions for every task (numpy ``Transitions``-like dict)."""
    from .rl_env import Transitions

    rng = np.random.default_rng(seed)
    K = len(names)
    cols = {k: [] for k in ("obs", "task", "action", "reward", "next_obs", "done", "task_ids")}
    for k, name in enumerate(names):
        env, pol = envs[name], _policy(name)
        for e in range(episodes):
            obs, _ = env.reset(seed=int(seed * 1000 + e))
            for _ in range(horizon):
                a = np.clip(pol.get_action(obs) + noise * rng.standard_normal(4), -ACT_CLIP, ACT_CLIP)
                nxt, r, term, trunc, _ = env.step(a)
                for c, v in zip(cols, (obs, np.eye(K)[k], a, r, nxt, 0.0, k)):
                    cols[c].append(v)
                obs = nxt
                if term or trunc:
                    break
    arr = {c: np.asarray(v, np.int32 if c == "task_ids" else np.float32) for c, v in cols.items()}
    return Transitions(**{c: jnp.asarray(v) for c, v in arr.items()})


def rollout(env, act, *, horizon: int, episodes: int, seed: int) -> tuple[float, float]:
    """Mean return and success rate of the deterministic policy ``act(obs [39]) -> [4]``."""
    rets, succ = [], []
    for e in range(episodes):
        obs, _ = env.reset(seed=int(10_000 + seed * 100 + e))
        total, ok = 0.0, 0.0
        for _ in range(horizon):
            obs, r, term, trunc, info = env.step(np.asarray(act(obs)))
            total += float(r)
            ok = max(ok, float(info.get("success", 0.0)))
            if term or trunc:
                break
        rets.append(total)
        succ.append(ok)
    return float(np.mean(rets)), float(np.mean(succ))


class MT10Run:
    """Stages of one MT10 run (kept on one object: envs, data, agent, jitted functions)."""

    def __init__(self, cfg: MT10Config, *, progress: bool = False):
        from kernattr.adapters import make_sac

        from .sac import make_train_step

        self.cfg = cfg
        self.names = tuple(cfg.tasks)
        self.K = len(self.names)
        self.target_idx = tuple(self.names.index(t) for t in cfg.targets)
        self.envs = make_envs(self.names, cfg.seed)
        self.data = collect_mt10(self.envs, self.names, episodes=cfg.episodes,
                                 horizon=cfg.horizon, noise=cfg.noise, seed=cfg.seed)
        key = jax.random.key(cfg.seed)
        obs_dim = int(self.data.obs.shape[1])
        self.sac, params = make_sac(jax.random.fold_in(key, 2), obs_dim=obs_dim, task_dim=self.K,
                                    act_dim=4, hidden=cfg.hidden)
        init, step = make_train_step(self.sac, **sac_optimizers(cfg.pretrain_lr, cfg.pretrain_steps),
                                     gamma=cfg.gamma, bc_weight=cfg.bc_weight,
                                     q_weight=cfg.q_weight)
        batch = sac_batch(self.data)
        w = task_weights(jnp.ones((1, self.K)), self.data.task_ids, self.K)[0]

        @jax.jit
        def train(params, key):
            return jax.lax.fori_loop(0, cfg.pretrain_steps, lambda i, s: step(
                s, batch, w, jax.random.fold_in(key, i))[0], init(params)).params

        self.params0 = train(params, jax.random.fold_in(key, 3))
        finit, fstep = make_train_step(self.sac, **sac_optimizers(cfg.finetune_lr, cfg.finetune_steps),
                                       gamma=cfg.gamma, bc_weight=cfg.bc_weight,
                                       q_weight=cfg.q_weight, prox=cfg.prox)

        @jax.jit
        def finetune(masks, key):
            wts = task_weights(masks, self.data.task_ids, self.K)

            def one(w):
                return jax.lax.fori_loop(0, cfg.finetune_steps, lambda i, s: fstep(
                    s, batch, w, jax.random.fold_in(key, i))[0], finit(self.params0)).params.actor
            return jax.vmap(one)(wts)

        self.finetune = finetune
        self._act = jax.jit(lambda a, o, z: self.sac.act(a, o[None], z[None])[0])

    def real_labels(self, masks: np.ndarray, key, bar=None) -> tuple[np.ndarray, np.ndarray]:
        """``(returns [m, T], success [m, T])`` after real fine-tuning on each mask."""
        cfg = self.cfg
        actors = self.finetune(jnp.asarray(masks, jnp.float32), key)
        R = np.zeros((len(masks), len(self.target_idx)))
        S = np.zeros_like(R)
        for i in range(len(masks)):
            a_i = jax.tree.map(lambda x: x[i], actors)
            for j, t in enumerate(self.target_idx):
                z = jnp.eye(self.K)[t]
                R[i, j], S[i, j] = rollout(self.envs[self.names[t]],
                                           lambda o: self._act(a_i, jnp.asarray(o, jnp.float32), z),
                                           horizon=cfg.horizon, episodes=cfg.eval_episodes,
                                           seed=cfg.seed)
            if bar is not None:
                bar.update(1)
        return R, S

    def features(self) -> Features:
        import kernattr as ka
        from kernattr.adapters import actor_mean_labels, pack_examples, sac_output_fn

        fn, sel = sac_output_fn(self.sac, self.params0, output="actor_mean", filter="actor")
        kind = "identity" if self.cfg.proj_dim is None else "rademacher"
        proj = ka.make_projector(jax.random.fold_in(jax.random.key(self.cfg.seed), 5), sel,
                                 dim=self.cfg.proj_dim, kind=kind)
        feats = jax.jit(partial(ka.gradient_features, fn, projector=proj, chunk_size=512),
                        static_argnames=("num_tasks",))
        b = sac_batch(self.data)
        tid = jnp.repeat(self.data.task_ids, 4)
        train = feats(sel, pack_examples(b, output="actor_mean"), actor_mean_labels(b),
                      task_ids=tid, num_tasks=self.K)
        rows = np.concatenate([np.flatnonzero(np.asarray(self.data.task_ids) == t)
                               for t in self.target_idx])
        owner = np.concatenate([np.full(int(np.sum(np.asarray(self.data.task_ids) == t)), j)
                                for j, t in enumerate(self.target_idx)])
        tb = jax.tree.map(lambda x: x[rows], b)
        target = feats(sel, pack_examples(tb, output="actor_mean"), actor_mean_labels(tb))
        return Features(train, target, np.repeat(owner, 4), len(self.target_idx))


def run_mt10(cfg: MT10Config, *, out: Optional[str] = None, progress: bool = True,
             plots: bool = True) -> dict:
    """The MT10 pipeline (single seed); returns the results dict (also ``out/results.json``)."""
    import kernattr as ka
    from tqdm.auto import tqdm

    from .rl import all_masks_with, baseline_scores, estimated_labels, make_masks

    t_start = time.perf_counter()
    timings = {}
    t = time.perf_counter()
    run = MT10Run(cfg, progress=progress)
    timings["data_and_w0"] = time.perf_counter() - t
    K, T = run.K, len(run.target_idx)
    masks = make_masks(cfg, K)
    del all_masks_with
    n_sel = T * (6 + 1 + cfg.num_random)
    bar = tqdm(total=1 + len(masks["train"]) + len(masks["heldout"]) + n_sel,
               disable=not progress, desc="mt10: fine-tune + rollouts", unit="mask")
    key = jax.random.fold_in(jax.random.key(cfg.seed), 6)
    t = time.perf_counter()
    allm = np.concatenate([np.zeros((1, K), np.float32), masks["train"], masks["heldout"]])
    R, S = run.real_labels(allm, key, bar)
    timings["ground_truth"] = time.perf_counter() - t
    ntr = len(masks["train"])
    R0, S0 = R[0], S[0]
    R_tr, R_ho, S_ho = R[1:1 + ntr], R[1 + ntr:], S[1 + ntr:]

    t = time.perf_counter()
    feats = run.features()
    est_masks = np.concatenate([masks["train"], masks["cheap"], masks["heldout"]])
    Fh = estimated_labels(cfg, feats, est_masks)
    timings["estimator"] = time.perf_counter() - t
    n_est = len(est_masks) - len(masks["heldout"])
    Fh_tr = Fh[:n_est]
    preds, predictors = {}, {}
    for name, m, y in (("kernel", est_masks[:n_est], Fh_tr), ("linear", est_masks[:n_est], Fh_tr),
                       ("kernel_real", masks["train"], R_tr), ("datamodels", masks["train"], R_tr)):
        s = (ka.fit_kernel(jnp.asarray(m), jnp.asarray(y), per_target=True, kernel=cfg.kernel)
             if name.startswith("kernel") else ka.fit_linear(jnp.asarray(m), jnp.asarray(y),
                                                             ridge=1e-3))
        predictors[name] = (lambda s: lambda mm: ka.predict(s, jnp.asarray(mm)))(s)
        preds[name] = np.asarray(predictors[name](masks["heldout"]))
    scores = baseline_scores(cfg, feats, K)
    for name, s in scores.items():
        preds[name] = masks["heldout"] @ s

    t = time.perf_counter()
    sel_masks, sel_index = _selection_masks(cfg, run.target_idx, predictors, scores, K)
    R_sel, S_sel = run.real_labels(np.stack(sel_masks), jax.random.fold_in(key, 2), bar)
    bar.close()
    timings["selection"] = time.perf_counter() - t
    sel_R, sel_S, counts = _per_selector(sel_index, R_sel, S_sel, T)
    key_b = jax.random.key(cfg.seed + 99)
    lds = {n: lds_summary(key_b, p, R_ho) for n, p in preds.items()}
    results = {
        "lds": lds,
        "paired": {f"kernel-{b}": paired_summary(key_b, preds["kernel"], preds[b], R_ho)
                   for b in ("influence", "linear")},
        "selection": {n: float((v / counts[n]).mean()) for n, v in sel_R.items()},
        "selection_success": {n: float((v / counts[n]).mean()) for n, v in sel_S.items()},
        "selection_per_target": {n: (v / counts[n]).tolist() for n, v in sel_R.items()},
        "return_W0": R0.tolist(), "success_W0": S0.tolist(),
        "heldout_success_mean": float(S_ho.mean()),
        "heldout_return_spread": R_ho.std(0).tolist(),
        "num_targets": T, "num_seeds": 1, "targets": list(cfg.targets),
        "config": cfg.to_dict(), "timings": timings,
    }
    results["timings"]["total"] = time.perf_counter() - t_start
    if out is not None:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.json"), "w") as fh:
            json.dump(results, fh, indent=2)
    return results


def _selection_masks(cfg, target_idx, predictors: dict, scores: dict, K: int):
    """Every selector's mask for every target (and ``cfg.num_random`` random masks containing
    the target): ``(masks, index)`` with ``index[i] = (target column, selector name)``."""
    rng = np.random.default_rng(cfg.seed)
    sel_masks, sel_index = [], []
    for j, tt in enumerate(target_idx):
        chosen = {n: select(predictors[n], j, tt, K) for n in predictors}
        chosen.update({n: select_additive(scores[n], j, tt) for n in scores})
        chosen["all_tasks"] = np.ones(K, np.float32)
        for _ in range(cfg.num_random):
            m = (rng.random(K) < 0.5).astype(np.float32)
            m[tt] = 1.0
            chosen.setdefault("random", []).append(m)
        for n, m in chosen.items():
            for mm in (m if n == "random" else [m]):
                sel_index.append((j, n))
                sel_masks.append(mm)
    return sel_masks, sel_index


def _per_selector(sel_index, R_sel, S_sel, T: int):
    """Sums of each selector's real returns and successes per target, and their counts."""
    sel_R, sel_S, counts = {}, {}, {}
    for (j, n), r, s in zip(sel_index, R_sel, S_sel):
        sel_R.setdefault(n, np.zeros(T))[j] += r[j]
        sel_S.setdefault(n, np.zeros(T))[j] += s[j]
        counts.setdefault(n, np.zeros(T))[j] += 1
    return sel_R, sel_S, counts


def format_mt10(results: dict) -> str:
    """Plain-text summary of :func:`run_mt10`'s results."""
    lines = [f"targets {results['targets']}; W0 return {np.round(results['return_W0'], 1).tolist()} "
             f"success {results['success_W0']}",
             f"{'method':<12}{'LDS':>8}{'95% CI':>18}"]
    for n, m in results["lds"].items():
        lines.append(f"{n:<12}{m['lds']:>8.3f}   [{m['lds_ci'][0]:6.3f}, {m['lds_ci'][1]:6.3f}]")
    for k, (mu, lo, hi) in results["paired"].items():
        lines.append(f"paired {k:<20} {mu:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    lines.append("selection (target return / success, mean over targets):")
    for n, v in sorted(results["selection"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {n:<12}{v:>9.1f}  {results['selection_success'][n]:.2f}")
    return "\n".join(lines)
