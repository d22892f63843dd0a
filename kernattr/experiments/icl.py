"""In-context demonstration attribution and selection, end to end (``kernattr reproduce icl``).

Stages (each a function returning plain data; :func:`run_icl` chains them):

1. **model** — :func:`kernattr.experiments.icl_model.cached_icl_model`: a 2-layer NNX
   transformer trained with optax on random affine rules mod ``p`` (cached on disk), and its ICL
   curve (query loss against the number of correct demonstrations).
2. **per target rule** (``num_rules`` of them, :func:`attribution_for_rule`):
   ``K = 50`` candidates and ``T`` queries (:func:`make_icl_problem`); fixed-size masks of 4
   candidates (training and held-out, the same index sets for every rule); real labels = the
   per-query loss of each 4-shot prompt (one forward pass each, vmapped); estimated labels =
   the second-order interaction expansion of the query logits from every 0-, 1- and 2-shot
   prompt (or, ``estimator="taylor"``, their Taylor expansion in the soft inclusion weights;
   :mod:`kernattr.experiments.icl_estimator`); surrogates: kernel and linear on estimated
   labels, kernel and linear (datamodels) on real labels; influence-style gradient-alignment
   scores; leave-one-out effects; selection of 4 demonstrations by each method, scored by a real
   forward pass; real pairwise second differences of the demonstrations.
3. **aggregate** — LDS with bootstrap intervals (:func:`kernattr.lds_interval`, the held-out
   masks resampled; columns = (rule, query) pairs), paired intervals
   (:func:`kernattr.paired_lds_interval`), estimator error, selection losses averaged over
   rules; ``results.json`` and plots.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

import kernattr as ka

from . import icl_estimator as est
from .icl_model import KINDS, ICLConfig, cached_icl_model, icl_curve, make_icl_problem, query_losses

METHODS = ("kernel", "kernel_real", "linear", "datamodels", "influence", "kernel_real_few",
           "multifidelity")
SELECTORS = ("random", "linear", "influence", "kernel", "kernel_real", "datamodels", "oracle")


@dataclasses.dataclass(frozen=True)
class ICLExperimentConfig:
    """A whole run (JSON-serialisable).

    Model: ``model`` (an :class:`ICLConfig`). Problem: ``num_candidates`` (K), ``num_queries``
    (T), ``subset_size`` (4), ``num_rules`` target rules, candidate mix ``num_frequent``,
    ``num_correct``, ``num_noisy`` (the rest other-rule, from ``num_other_rules`` rules),
    ``frequent_fraction`` of queries at ``x*``. Masks: ``num_train_masks``,
    ``num_heldout_masks``. Estimator: ``estimator`` — ``"interactions"`` (default: exact
    second-order interaction expansion of the logits from every 0-, 1- and 2-shot prompt,
    :func:`~kernattr.experiments.icl_estimator.prompt_interactions`) or ``"taylor"`` (the
    gradient Taylor expansion at a uniform soft prompt of total weight ``anchor_mass``, with
    ``taylor_order``, ``taylor_diagonal``); ``anchor_mass`` is also the soft context of the
    influence scores. ``num_real_few``: real labels given to the
    ``kernel_real_few`` and ``multifidelity`` methods (the first training masks; the latter also
    gets the estimated labels of all of them; ``ka.fit_multifidelity`` with its default
    grids). Influence: ``proj_dim``. Oracle: ``num_oracle`` random subsets scored by real
    forward passes. ``num_resamples`` bootstrap replicates.
    """

    model: ICLConfig = ICLConfig()
    num_candidates: int = 50
    num_queries: int = 16
    subset_size: int = 4
    num_rules: int = 10
    num_frequent: int = 5
    num_correct: int = 11
    num_noisy: int = 10
    num_other_rules: int = 3
    frequent_fraction: float = 0.5
    num_train_masks: int = 500
    num_heldout_masks: int = 200
    num_real_few: int = 100
    estimator: str = "interactions"
    anchor_mass: float = 8.0
    taylor_order: int = 2
    taylor_diagonal: bool = False
    proj_dim: int = 256
    num_oracle: int = 4000
    num_resamples: int = 1000
    seed: int = 0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return d


def tiny_config(seed: int = 0) -> ICLExperimentConfig:
    """A configuration that runs in well under a minute (tests, notebook, ``--smoke``).

    >>> tiny_config().num_rules
    2
    """
    return ICLExperimentConfig(
        model=ICLConfig(p=5, steps=300, batch_size=64, d_model=32, num_heads=2, d_mlp=64,
                        max_demos=6),
        num_candidates=16, num_queries=6, num_rules=2, num_frequent=3, num_correct=4,
        num_noisy=3, num_other_rules=2, num_train_masks=120, num_heldout_masks=60,
        num_real_few=30,
        anchor_mass=4.0, proj_dim=32, num_oracle=300, num_resamples=100, seed=seed)


# ------------------------------------------------------------------------------ helpers
def all_subsets(num_candidates: int, size: int) -> np.ndarray:
    """``[C(K, size), size]`` int32 indices of every ``size``-subset, ascending.

    >>> all_subsets(4, 2).tolist()
    [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    """
    return np.asarray(list(itertools.combinations(range(num_candidates), size)), np.int32)


def kernel_subset_search(surrogate: ka.KernelSurrogate, subsets: jax.Array, *,
                         chunk_size: int = 8192) -> tuple[jax.Array, jax.Array]:
    """Mean-over-targets prediction of a kernel surrogate on every subset, by gathers.

    For a subset ``S`` given by its indices, the inner product with centre ``i`` is
    ``Σ_{j∈S} c_ij`` (a sum of ``|S|`` columns of the centre matrix) and the Hamming distance
    ``|S| + n_i − 2·inner``, so no ``[m', K]`` mask matrix is formed. Supports ``"rbf"`` and
    ``"linear+rbf"`` (``mix·inner/linear_scale + (1 − mix)·exp(−γ·Hamming)``) with one shared
    ``(gamma, mix)``.

    Args:
      surrogate: a :class:`kernattr.KernelSurrogate` (``"rbf"`` or ``"linear+rbf"``, shared).
      subsets: ``[n, k]`` candidate indices.
      chunk_size: subsets per ``lax.map`` batch.

    Returns:
      ``(pred [n], best)``: the predicted mean over targets, and the index of its minimum.

    >>> masks = ka.sample_subsets(jax.random.key(0), num_tasks=5, num_subsets=30, size=2)
    >>> s = ka.fit_kernel(masks, masks[:, 0] - masks[:, 1], kernel="rbf", gamma=0.5,
    ...                  ridge=1e-2)
    >>> pred, best = kernel_subset_search(s, jnp.asarray(all_subsets(5, 2)))
    >>> all_subsets(5, 2)[int(best)].tolist()
    [1, 2]
    """
    spec = surrogate.spec
    if spec.kernel not in ("rbf", "linear+rbf") or not spec.shared_gamma:
        raise ValueError("`surrogate` must be an RBF or linear+RBF kernel surrogate with one "
                         "shared (gamma, mix); fit it with per_target=False.")
    centres = surrogate.masks
    ct = centres.T  # [K, m]
    n_i = jnp.sum(centres, axis=1)
    alpha = jnp.mean(surrogate.dual_coef, axis=1)
    b = jnp.mean(surrogate.intercept)
    g = surrogate.gamma[0]
    mix = surrogate.mix[0] if spec.kernel == "linear+rbf" else 0.0
    scale = surrogate.linear_scale
    k = subsets.shape[1]

    def one(idx):
        inner = jnp.sum(ct[idx], axis=0)  # [m]
        kern = (1.0 - mix) * jnp.exp(-g * (k + n_i - 2.0 * inner)) + mix * inner / scale
        return kern @ alpha + b

    pred = jax.lax.map(one, subsets, batch_size=chunk_size)
    return pred, jnp.argmin(pred)


def _mask_of(idx: np.ndarray, k: int) -> np.ndarray:
    m = np.zeros((k,), np.float32)
    m[np.asarray(idx)] = 1.0
    return m


def _top(scores: np.ndarray, size: int) -> np.ndarray:
    """Indices of the ``size`` most negative per-candidate effects (they lower the loss most)."""
    return np.sort(np.argsort(scores, kind="stable")[:size])


def pair_category(prob, i: int, j: int) -> str:
    """Category of the pair of candidates ``(i, j)`` for the second-difference report."""
    ki, kj = KINDS[prob.kinds[i]], KINDS[prob.kinds[j]]
    good = ("frequent", "correct")
    if ki in good and kj in good:
        return "correct, same input" if prob.demo_x[i] == prob.demo_x[j] else \
            "correct, distinct inputs"
    if (ki in good) != (kj in good):
        return "correct + wrong"
    if ki == kj == "other_rule":
        return "two other-rule"
    return "two wrong (noisy)"


# ------------------------------------------------------------------------------ stages
class _Compiled:
    """Jitted per-rule functions (compiled once per configuration)."""

    def __init__(self, trained, cfg: ICLExperimentConfig):
        p = cfg.model.p
        k = cfg.subset_size
        apply_fn, params = trained.apply_fn, trained.params
        self.real = jax.jit(lambda c, q, a, m: query_losses(apply_fn, params, c, q, a, m,
                                                            size=k, chunk_size=128))
        self.real_small = jax.jit(lambda c, q, a, m: query_losses(apply_fn, params, c, q, a, m,
                                                                  size=max(k - 1, 1),
                                                                  chunk_size=128))
        self.real_pairs = jax.jit(lambda c, q, a, m: query_losses(apply_fn, params, c, q, a, m,
                                                                  size=2, chunk_size=256))
        anchor = jnp.full((cfg.num_candidates,), cfg.anchor_mass / cfg.num_candidates)
        allq = p * p + jnp.arange(p)
        if cfg.estimator == "interactions":
            self.expand = jax.jit(lambda c: est.prompt_interactions(apply_fn, params, c, allq))
            self.estimate = jax.jit(lambda e, m, qx, a: est.interaction_query_losses(
                e, m, qx, a, size=k))
        elif cfg.estimator == "taylor":
            self.expand = jax.jit(lambda c: est.prompt_taylor(
                est.soft_prompt_logits(apply_fn, params, c, allq), anchor,
                order=cfg.taylor_order))
            self.estimate = jax.jit(lambda tay, m, qx, a: est.estimate_query_losses(
                tay, m, qx, a, num_classes=p, order=cfg.taylor_order,
                diagonal=cfg.taylor_diagonal))
        else:
            raise ValueError(f"`estimator` must be 'interactions' or 'taylor', got "
                             f"{cfg.estimator!r}.")
        self.influence = jax.jit(lambda key, c, dx, dy, q, a: est.gradient_alignment_scores(
            key, apply_fn, params, c, dx, dy, q, a, anchor, p=p, dim=cfg.proj_dim))
        self.fit_kernel = jax.jit(lambda m, y: ka.fit_kernel(m, y))
        self.fit_linear = jax.jit(lambda m, y: ka.fit_linear(m, y, ridge=1e-3))
        self.fit_mf = jax.jit(lambda cm, cy, rm, ry: ka.fit_multifidelity(cm, cy, rm, ry))
        self.search = jax.jit(kernel_subset_search)


def make_masks(cfg: ICLExperimentConfig) -> dict:
    """Training / held-out fixed-size masks and the oracle sample (numpy float32).

    >>> m = make_masks(tiny_config())
    >>> m["train"].shape, m["heldout"].shape
    ((120, 16), (60, 16))
    """
    key = jax.random.key(cfg.seed)
    kw = dict(num_tasks=cfg.num_candidates, size=cfg.subset_size)
    out = {
        "train": ka.sample_subsets(jax.random.fold_in(key, 1), num_subsets=cfg.num_train_masks,
                                   **kw),
        "heldout": ka.sample_subsets(jax.random.fold_in(key, 2),
                                     num_subsets=cfg.num_heldout_masks, **kw),
        "oracle": ka.sample_subsets(jax.random.fold_in(key, 3), num_subsets=cfg.num_oracle,
                                    **kw),
    }
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def attribution_for_rule(cfg: ICLExperimentConfig, fns: _Compiled, masks: dict,
                         subsets: jax.Array, rule_index: int) -> dict:
    """Every per-rule quantity (numpy arrays and floats); see the module docstring."""
    key = jax.random.fold_in(jax.random.key(cfg.seed), 1000 + rule_index)
    prob = make_icl_problem(jax.random.fold_in(key, 0), p=cfg.model.p,
                            num_candidates=cfg.num_candidates, num_queries=cfg.num_queries,
                            num_frequent=cfg.num_frequent, num_correct=cfg.num_correct,
                            num_noisy=cfg.num_noisy, num_other_rules=cfg.num_other_rules,
                            frequent_fraction=cfg.frequent_fraction)
    K, k = cfg.num_candidates, cfg.subset_size
    c, q, a = (jnp.asarray(v) for v in (prob.candidates, prob.queries, prob.answers))
    times = {}

    def real(m, fn=fns.real):
        return np.asarray(fn(c, q, a, jnp.asarray(m)))

    t = time.perf_counter()
    F_tr, F_ho = real(masks["train"]), real(masks["heldout"])
    times["real_labels"] = time.perf_counter() - t
    n_real = len(F_tr) + len(F_ho)

    t = time.perf_counter()
    expansion = fns.expand(c)
    qx = jnp.asarray(prob.query_x)
    Fh_tr = np.asarray(fns.estimate(expansion, jnp.asarray(masks["train"]), qx, a))
    Fh_ho = np.asarray(fns.estimate(expansion, jnp.asarray(masks["heldout"]), qx, a))
    times["estimated_labels"] = time.perf_counter() - t

    sur = {
        "kernel": fns.fit_kernel(jnp.asarray(masks["train"]), jnp.asarray(Fh_tr)),
        "linear": fns.fit_linear(jnp.asarray(masks["train"]), jnp.asarray(Fh_tr)),
        "kernel_real": fns.fit_kernel(jnp.asarray(masks["train"]), jnp.asarray(F_tr)),
        "datamodels": fns.fit_linear(jnp.asarray(masks["train"]), jnp.asarray(F_tr)),
    }
    few = cfg.num_real_few
    tr_few, F_few = jnp.asarray(masks["train"][:few]), jnp.asarray(F_tr[:few])
    sur["kernel_real_few"] = fns.fit_kernel(tr_few, F_few)
    sur["multifidelity"] = fns.fit_mf(jnp.asarray(masks["train"]), jnp.asarray(Fh_tr), tr_few,
                                      F_few)
    preds = {n: np.asarray(ka.predict(s, jnp.asarray(masks["heldout"]))) for n, s in sur.items()}
    infl = np.asarray(fns.influence(jax.random.fold_in(key, 1), c, jnp.asarray(prob.demo_x),
                                    jnp.asarray(prob.demo_y), q, a))  # [K, T]
    preds["influence"] = masks["heldout"] @ infl

    loo_real, loo = _loo_in_prompts(real, fns, sur, preds, masks["heldout"], F_ho, infl)
    choice, selection = _select_demonstrations(real, fns, sur, loo, subsets, masks, F_ho, k)
    cats = _second_differences(real, fns, prob, K)
    return dict(problem=prob, F_tr=F_tr, F_ho=F_ho, Fh_tr=Fh_tr, Fh_ho=Fh_ho, preds=preds,
                loo=loo, loo_real=loo_real, selection=selection,
                choice={n: np.asarray(v).tolist() for n, v in choice.items()},
                choice_kinds={n: [KINDS[prob.kinds[i]] for i in v] for n, v in choice.items()},
                second_differences=cats, times=times, num_real=n_real,
                gamma=float(np.asarray(sur["kernel"].gamma)[0]),
                ridge=float(np.asarray(sur["kernel"].ridge)[0]),
                mix=float(np.asarray(sur["kernel"].mix)[0]))



def _loo_in_prompts(real, fns: _Compiled, sur: dict, preds: dict, heldout: np.ndarray, F_ho,
                    infl) -> tuple[np.ndarray, dict]:
    """Leave-one-out inside the held-out prompts, ``F(S) - F(S minus j)`` for ``j`` in ``S``,
    averaged per candidate ``[K, T]``: real (a forward pass per dropped prompt) and each method's."""
    K = heldout.shape[1]
    rows, cols = np.nonzero(heldout)
    drop = heldout[rows].copy()
    drop[np.arange(len(rows)), cols] = 0.0
    F_drop = real(drop, fns.real_small)
    diff_real = F_ho[rows] - F_drop  # [m·k, T]
    counts = np.maximum(np.bincount(cols, minlength=K), 1)[:, None]

    def per_candidate(d):
        return np.stack([np.bincount(cols, weights=d[:, t], minlength=K)
                         for t in range(d.shape[1])], axis=1) / counts

    loo_real = per_candidate(diff_real)  # [K, T]
    loo = {}
    for n in ("kernel", "kernel_real", "kernel_real_few", "multifidelity"):
        pd = np.asarray(ka.predict(sur[n], jnp.asarray(drop)))
        loo[n] = per_candidate(preds[n][rows] - pd)
    loo["linear"] = np.asarray(sur["linear"].coef)
    loo["datamodels"] = np.asarray(sur["datamodels"].coef)
    loo["influence"] = infl
    return loo_real, loo


def _select_demonstrations(real, fns: _Compiled, sur: dict, loo: dict, subsets, masks: dict, F_ho,
                           k: int) -> tuple[dict, dict]:
    """``k`` demonstrations chosen by each method, each choice scored by a real forward pass;
    ``(choice, selection)`` with the random and oracle references in ``selection``."""
    K = masks["heldout"].shape[1]
    sub = np.asarray(subsets)
    choice = {
        "linear": _top(loo["linear"].mean(1), k),
        "datamodels": _top(loo["datamodels"].mean(1), k),
        "influence": _top(loo["influence"].mean(1), k),
    }
    for n in ("kernel", "kernel_real"):
        _, best = fns.search(sur[n], subsets)
        choice[n] = sub[int(best)]
    chosen = np.stack([_mask_of(choice[n], K) for n in choice])
    F_chosen = real(chosen).mean(1)
    F_oracle = real(masks["oracle"]).mean(1)
    selection = {n: float(v) for n, v in zip(choice, F_chosen)}
    selection["random"] = float(F_ho.mean())
    selection["oracle"] = float(min(F_oracle.min(), F_chosen.min()))
    return choice, selection


def _second_differences(real, fns: _Compiled, prob, K: int) -> dict:
    """Real pairwise second differences from the empty prompt, ``F(ij) - F(i) - F(j) + F()``,
    grouped by the kind of pair."""
    pairs = np.asarray(list(itertools.combinations(range(K), 2)))
    pm = np.zeros((len(pairs), K), np.float32)
    pm[np.arange(len(pairs))[:, None], pairs] = 1.0
    F_pair = real(pm, fns.real_pairs).mean(1)
    F_one = real(np.eye(K, dtype=np.float32), fns.real_pairs).mean(1)
    F_empty = float(real(np.zeros((1, K), np.float32), fns.real_pairs).mean())
    second = F_pair - F_one[pairs[:, 0]] - F_one[pairs[:, 1]] + F_empty
    cats: dict[str, list] = {}
    for (i, j), v in zip(pairs, second):
        cats.setdefault(pair_category(prob, int(i), int(j)), []).append(float(v))
    return cats

def _interval(res) -> dict:
    return {"lds": float(res.mean), "lds_ci": [float(res.low), float(res.high)]}


def _col_corr(a: np.ndarray, b: np.ndarray, rank: bool) -> float:
    fn = ka.spearman if rank else ka.pearson
    r = np.asarray(fn(jnp.asarray(a), jnp.asarray(b)))
    return float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")


def aggregate(cfg: ICLExperimentConfig, per_rule: list, curve: np.ndarray, timing: dict) -> dict:
    """Pool the rules into ``results.json``'s dictionary."""
    key = jax.random.key(cfg.seed + 7)
    actual = jnp.asarray(np.concatenate([r["F_ho"] for r in per_rule], axis=1))  # [m, R·T]
    preds = {n: jnp.asarray(np.concatenate([r["preds"][n] for r in per_rule], axis=1))
             for n in METHODS}
    B = cfg.num_resamples
    paired_fn = jax.jit(lambda x, y, z: ka.paired_lds_interval(key, x, y, z, num_resamples=B))
    paired, lds = {}, {}
    for first, other in (("kernel", "linear"), ("kernel", "influence"), ("kernel", "datamodels"),
                         ("kernel", "kernel_real"), ("kernel_real", "datamodels"),
                         ("multifidelity", "kernel_real_few"), ("multifidelity", "kernel")):
        res = paired_fn(preds[first], preds[other], actual)
        paired[f"{first}-{other}"] = [float(res.mean), float(res.low), float(res.high)]
        lds.setdefault(first, _interval(res.a))
        lds.setdefault(other, _interval(res.b))
    lds = {n: lds[n] for n in METHODS}
    for n in METHODS:
        lds[n]["loo_pearson"] = float(np.mean([_col_corr(r["loo"][n], r["loo_real"], False)
                                               for r in per_rule]))
        lds[n]["loo_spearman"] = float(np.mean([_col_corr(r["loo"][n], r["loo_real"], True)
                                                for r in per_rule]))
    F_ho = np.concatenate([r["F_ho"] for r in per_rule], axis=1)
    Fh_ho = np.concatenate([r["Fh_ho"] for r in per_rule], axis=1)
    rel = np.mean(np.abs(Fh_ho - F_ho) / np.abs(F_ho))
    rel_mean = np.mean([np.mean(np.abs(r["Fh_ho"].mean(1) - r["F_ho"].mean(1))
                                / np.abs(r["F_ho"].mean(1))) for r in per_rule])
    sp = float(ka.lds(jnp.asarray(Fh_ho), jnp.asarray(F_ho)).mean)
    sp_mean = float(np.mean([float(ka.spearman(jnp.asarray(r["Fh_ho"].mean(1)),
                                                jnp.asarray(r["F_ho"].mean(1))))
                             for r in per_rule]))
    n_masks = cfg.num_train_masks + cfg.num_heldout_masks
    real_s = float(np.mean([r["times"]["real_labels"] for r in per_rule]))
    est_s = float(np.mean([r["times"]["estimated_labels"] for r in per_rule]))
    selection = {n: float(np.mean([r["selection"][n] for r in per_rule])) for n in SELECTORS}
    cats: dict[str, list] = {}
    for r in per_rule:
        for c, v in r["second_differences"].items():
            cats.setdefault(c, []).extend(v)
    return {
        "config": cfg.to_dict(),
        "num_target_rules": len(per_rule),
        "icl_curve": [float(v) for v in curve],
        "lds": lds,
        "paired": paired,
        "noise_ceiling": 1.0,
        "estimator": {
            "relative_error": float(rel),
            "relative_error_mean_loss": float(rel_mean),
            "spearman": sp,
            "spearman_mean_loss": sp_mean,
            "seconds_per_subset": est_s / n_masks,
            "forward_seconds_per_subset": real_s / n_masks,
            "note": "relative_error: mean over held-out masks, queries and rules of |F̂-F|/|F|; "
                    "spearman: across held-out masks per query, averaged (as LDS); timings "
                    "include compilation on the first rule",
        },
        "selection": selection,
        "selection_per_rule": [r["selection"] for r in per_rule],
        "selection_kinds": [r["choice_kinds"] for r in per_rule],
        "second_differences": {c: {"mean": float(np.mean(v)), "std": float(np.std(v)),
                                   "count": len(v)} for c, v in sorted(cats.items())},
        "kernel_selection": {"gamma": [r["gamma"] for r in per_rule],
                             "ridge": [r["ridge"] for r in per_rule],
                             "mix": [r["mix"] for r in per_rule]},
        "timings": timing,
        "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
    }


def write_plots(out: str, results: dict, per_rule: list) -> dict:
    """``selection.png`` (bar chart), ``heldout.png`` (predicted vs real), ``icl_curve.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    sel = results["selection"]
    names = [n for n in SELECTORS if n in sel]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.bar(names, [sel[n] for n in names], color="tab:blue")
    ax.set_ylabel("real mean query loss")
    ax.set_title(f"4 demonstrations chosen by each method ({results['num_target_rules']} rules)")
    plt.setp(ax.get_xticklabels(), rotation=20)
    fig.tight_layout()
    paths["selection"] = os.path.join(out, "selection.png")
    fig.savefig(paths["selection"], dpi=110)
    plt.close(fig)

    r0 = per_rule[0]
    shown = [("estimator", r0["Fh_ho"])] + [(n, r0["preds"][n]) for n in METHODS]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.2), squeeze=False)
    actual = r0["F_ho"].mean(1)
    for ax, (n, pred) in zip(axes[0], shown):
        pm = pred.mean(1)
        ax.scatter(actual, pm, s=8, alpha=0.6)
        ax.set_title(n)
        ax.set_xlabel("real mean query loss")
    axes[0][0].set_ylabel("predicted")
    fig.suptitle("held-out 4-shot prompts, first target rule")
    fig.tight_layout()
    paths["heldout"] = os.path.join(out, "heldout.png")
    fig.savefig(paths["heldout"], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    curve = results["icl_curve"]
    ax.plot(range(len(curve)), curve, "o-")
    ax.set_xlabel("correct demonstrations in the prompt")
    ax.set_ylabel("mean query loss")
    ax.set_title("in-context learning curve")
    fig.tight_layout()
    paths["icl_curve"] = os.path.join(out, "icl_curve.png")
    fig.savefig(paths["icl_curve"], dpi=110)
    plt.close(fig)
    return paths


def run_icl(cfg: ICLExperimentConfig, *, out: Optional[str] = None,
            cache_dir: Optional[str] = None, progress: bool = True, plots: bool = True) -> dict:
    """Run every stage; returns the results dict (also written to ``out/results.json``)."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    timing = {}
    trained = cached_icl_model(cfg.model, cache_dir=cache_dir, progress=progress)
    timing["model"] = time.perf_counter() - t0
    timing["model_cache_hit"] = bool(trained.cache_hit)
    t = time.perf_counter()
    curve = icl_curve(jax.random.key(cfg.seed + 11), trained, cfg.model)
    timing["icl_curve"] = time.perf_counter() - t
    fns = _Compiled(trained, cfg)
    masks = make_masks(cfg)
    subsets = jnp.asarray(all_subsets(cfg.num_candidates, cfg.subset_size))
    per_rule = []
    t = time.perf_counter()
    for r in tqdm(range(cfg.num_rules), disable=not progress, desc="target rules", unit="rule"):
        per_rule.append(attribution_for_rule(cfg, fns, masks, subsets, r))
    timing["rules"] = time.perf_counter() - t
    t = time.perf_counter()
    results = aggregate(cfg, per_rule, curve, timing)
    timing["aggregate"] = time.perf_counter() - t
    results["model"] = {"train_seconds": float(trained.seconds),
                        "cache_hit": bool(trained.cache_hit),
                        "final_train_loss": float(np.mean(trained.losses[-100:])),
                        "num_params": int(sum(x.size for x in jax.tree.leaves(trained.params)))}
    results["num_subsets_searched"] = int(subsets.shape[0])
    if out is not None:
        os.makedirs(out, exist_ok=True)
        if plots:
            results["plots"] = write_plots(out, results, per_rule)
        np.savez(os.path.join(out, "predictions.npz"),
                 heldout_masks=masks["heldout"], train_masks=masks["train"],
                 **{f"actual_rule{i}": r["F_ho"] for i, r in enumerate(per_rule)},
                 **{f"estimated_rule{i}": r["Fh_ho"] for i, r in enumerate(per_rule)},
                 **{f"pred_{n}_rule{i}": r["preds"][n] for i, r in enumerate(per_rule)
                    for n in METHODS})
    timing["total"] = time.perf_counter() - t0
    if out is not None:
        with open(os.path.join(out, "results.json"), "w") as fh:
            json.dump(results, fh, indent=2)
    return results


def format_table(results: dict) -> str:
    """Plain-text summary table.

    >>> r = {"lds": {"kernel": {"lds": 0.5, "lds_ci": [0.4, 0.6], "loo_pearson": 0.1,
    ...      "loo_spearman": 0.2}}, "paired": {}, "selection": {"random": 1.0},
    ...      "estimator": {"relative_error": 0.1, "spearman": 0.9}, "num_target_rules": 1}
    >>> print(format_table(r).splitlines()[0])
    estimator (1 rules): relative error 0.100, Spearman 0.900
    """
    est_ = results["estimator"]
    lines = [f"estimator ({results['num_target_rules']} rules): relative error "
             f"{est_['relative_error']:.3f}, Spearman {est_['spearman']:.3f}",
             f"{'method':<12}{'LDS':>7}{'95% CI':>17}{'LOO r':>8}{'LOO rho':>9}"]
    for n, v in results["lds"].items():
        lines.append(f"{n:<12}{v['lds']:>7.3f}   [{v['lds_ci'][0]:.3f}, {v['lds_ci'][1]:.3f}]"
                     f"{v['loo_pearson']:>8.3f}{v['loo_spearman']:>9.3f}")
    for n, (m, lo, hi) in results["paired"].items():
        lines.append(f"paired {n:<24} {m:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    lines.append("selection (real mean query loss): " + ", ".join(
        f"{n} {v:.3f}" for n, v in results["selection"].items()))
    return "\n".join(lines)
