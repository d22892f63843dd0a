"""Modular-arithmetic data, masks, ground-truth caching and a tiny end-to-end pipeline run."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernattr as ka
from kernattr.experiments import pipeline as pl
from kernattr.experiments.modular import grid_shape, make_modular_data, modular_labels, xor_codes

TINY = dict(task="xor", p=7, num_tasks=4, num_targets=6, d_model=8, num_heads=2, d_mlp=16,
            pretrain_steps=30, finetune_steps=5, num_train_masks=12, num_heldout_masks=12,
            proj_dim=32, densities=(0.5, 0.8))


# ----------------------------------------------------------------------------------- data


@pytest.mark.parametrize("task", ["addition", "quadratic", "xor"])
def test_tasks_cover_the_grid_and_labels_are_right(task):
    p, K = 11, 6
    d = make_modular_data(task=task, p=p, num_tasks=K, num_targets=10, seed=3)
    ex = np.concatenate([d.train_inputs, d.target_inputs])
    pairs = {(int(a), int(b)) for a, b in ex[:, :2]}
    assert len(pairs) == len(ex) == p * p  # train and targets partition the grid
    assert set(d.task_ids.tolist()) == set(range(K))
    r, c = grid_shape(K)
    assert (r, c) == d.grid == (2, 3)
    x, y = d.train_inputs[:, 0], d.train_inputs[:, 1]
    np.testing.assert_array_equal(d.task_ids, (x * r // p) * c + (y * c // p))
    assert np.all(d.train_inputs[:, 2] == p) and np.all(d.train_inputs[:, 3] == d.train_labels)
    brute = {"addition": lambda a, b: (a + b) % p,
             "quadratic": lambda a, b: (a * a + a * b + b * b) % p}
    if task in brute:
        np.testing.assert_array_equal(d.train_labels, brute[task](x, y))
        assert d.num_classes == p


def test_xor_construction_needs_both_codes():
    p = 13
    a, b, C = xor_codes(p, seed=5)
    assert C == 16 and len(set(a.tolist())) == p and len(set(b.tolist())) == p
    xs, ys = np.meshgrid(np.arange(p), np.arange(p), indexing="ij")
    lab, _ = modular_labels("xor", p, xs.ravel(), ys.ravel(), seed=5)
    lab = lab.reshape(p, p)
    # c(x,y) ^ c(x',y) ^ c(x,y') ^ c(x',y') == 0 for all quadruples
    quad = lab[:, None, :, None] ^ lab[None, :, :, None] ^ lab[:, None, None, :] ^ lab[None, :, None, :]
    assert not quad.any()
    # knowing x's code alone says nothing: every row (fixed x) and column has p distinct answers
    assert all(len(set(row)) == p for row in lab) and all(len(set(col)) == p for col in lab.T)


def test_data_deterministic_and_bad_input():
    d1 = make_modular_data(task="xor", p=7, num_tasks=4, num_targets=5, seed=1)
    d2 = make_modular_data(task="xor", p=7, num_tasks=4, num_targets=5, seed=1)
    d3 = make_modular_data(task="xor", p=7, num_tasks=4, num_targets=5, seed=2)
    np.testing.assert_array_equal(d1.train_inputs, d2.train_inputs)
    assert not np.array_equal(d1.target_inputs, d3.target_inputs)
    with pytest.raises(ValueError, match="`p`"):
        make_modular_data(p=9)
    with pytest.raises(ValueError, match="`task`"):
        make_modular_data(task="division")
    with pytest.raises(ValueError, match="`num_targets`"):
        make_modular_data(p=5, num_tasks=4, num_targets=25)
    with pytest.raises(ValueError, match="`num_tasks`"):
        make_modular_data(p=5, num_tasks=49)


def test_mixture_masks():
    m = pl.mixture_masks(jax.random.key(0), num_tasks=20, num_subsets=300, densities=(0.3, 0.9))
    m = np.asarray(m)
    assert m.shape == (300, 20) and set(np.unique(m)) <= {0.0, 1.0}
    assert m.sum(1).min() >= 1
    np.testing.assert_allclose(m[:150].mean(), 0.3, atol=0.05)
    np.testing.assert_allclose(m[150:].mean(), 0.9, atol=0.05)


# ------------------------------------------------------------------------------ caching


def test_ground_truth_cache_hit_and_miss(tmp_path, monkeypatch):
    cfg = pl.PipelineConfig(**TINY)
    data = make_modular_data(task="xor", p=7, num_tasks=4, num_targets=6)
    calls = []

    def fake_real_labels(cfg, data, apply_fn, params0, init_fn, masks, *, progress=False):
        calls.append(1)
        m = np.asarray(masks)
        return m @ np.arange(1.0, 7.0).reshape(1, 6).repeat(4, 0) / 10, np.ones(6)

    monkeypatch.setattr(pl, "real_labels", fake_real_labels)
    masks = np.asarray(ka.leave_one_out_masks(4), np.float32)
    F1, F01, _, hit1 = pl.cached_ground_truth(cfg, data, None, None, None, masks, cache_dir=str(tmp_path))
    F2, F02, _, hit2 = pl.cached_ground_truth(cfg, data, None, None, None, masks, cache_dir=str(tmp_path))
    assert (hit1, hit2) == (False, True) and len(calls) == 1
    np.testing.assert_array_equal(F1, F2)
    # estimator settings do not change the key; ground-truth settings do
    cfg_est = pl.PipelineConfig(**{**TINY, "proj_dim": 64})
    cfg_gt = pl.PipelineConfig(**{**TINY, "prox": 3.0})
    assert cfg_est.ground_truth_key() == cfg.ground_truth_key() != cfg_gt.ground_truth_key()
    pl.cached_ground_truth(cfg_gt, data, None, None, None, masks, cache_dir=str(tmp_path))
    assert len(calls) == 2
    # different masks under the same key: recomputed, not silently reused
    pl.cached_ground_truth(cfg, data, None, None, None, masks[:2], cache_dir=str(tmp_path))
    assert len(calls) == 3


# ---------------------------------------------------------------------- tiny end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("out"))
    cache = str(tmp_path_factory.mktemp("cache"))
    res = pl.run_pipeline(pl.PipelineConfig(**TINY), out=out, cache_dir=cache, progress=False)
    return res, out


def test_results_schema(tiny_run):
    res, out = tiny_run
    with open(os.path.join(out, "results.json")) as fh:
        saved = json.load(fh)
    assert saved["config"]["task"] == "xor" and saved["config"]["num_tasks"] == 4
    for key in ("relative_error", "no_change_relative_error", "spearman"):
        assert np.isfinite(saved["estimator"][key])
    assert set(saved["methods"]) == {"kernel", "linear", "kernel_real", "datamodels",
                                     "influence", "trak", "tracin", "kernel_real_few",
                                     "multifidelity", "quadratic_real", "influence_best"}
    for m in saved["methods"].values():
        assert {"lds", "lds_ci", "loo_pearson", "loo_spearman", "seconds"} <= set(m)
        assert -1.0 <= m["lds"] <= 1.0 and m["seconds"] > 0
        lo, hi = m["lds_ci"]
        assert lo <= m["lds"] + 1e-6 and m["lds"] - 1e-6 <= hi
    assert set(saved["paired"]) >= {"kernel_real-datamodels", "kernel-influence",
                                    "multifidelity-kernel_real_few", "multifidelity-kernel"}
    for name, (mean, lo, hi) in saved["paired"].items():
        a, b = name.split("-")
        np.testing.assert_allclose(mean, saved["methods"][a]["lds"] - saved["methods"][b]["lds"],
                                   atol=1e-6)
        assert lo <= hi
    nc = saved["noise_ceiling"]
    assert -1.0 <= nc["lds"] <= 1.0 and nc["lds_ci"][0] <= nc["lds"] <= nc["lds_ci"][1]
    assert nc["kind"] == ("w0" if saved["config"]["regime"] == "finetune" else "init")
    assert saved["sizes"]["num_real_few"] == 12  # min(num_real_few, num_train_masks)
    for path in saved["plots"].values():
        assert os.path.getsize(path) > 1000


def test_results_consistent_with_saved_predictions(tiny_run):
    res, out = tiny_run
    z = np.load(os.path.join(out, "predictions.npz"))
    actual = z["actual_heldout"]
    for name, m in res["methods"].items():
        lds = float(ka.lds(jnp.asarray(z[f"pred_{name}"]), jnp.asarray(actual)).mean)
        np.testing.assert_allclose(lds, m["lds"], atol=1e-6)
    # the noise ceiling is the LDS of the repeat retraining against the labels
    nc = float(ka.lds(jnp.asarray(z["actual_heldout_repeat"]), jnp.asarray(actual)).mean)
    np.testing.assert_allclose(nc, res["noise_ceiling"]["lds"], atol=1e-6)
    # quadratic_real is ka.fit_quadratic on every training mask's real labels
    quad = ka.fit_quadratic(jnp.asarray(z["train_masks"]), jnp.asarray(z["actual_train"]))
    np.testing.assert_allclose(np.asarray(ka.predict(quad, jnp.asarray(z["heldout_masks"]))),
                               z["pred_quadratic_real"], rtol=1e-4, atol=1e-5)
    # kernel_real_few is a kernel on the first num_real_few real labels only
    few = ka.fit_kernel(jnp.asarray(z["train_masks"][:12]), jnp.asarray(z["actual_train"][:12]),
                        per_target=True)
    np.testing.assert_allclose(np.asarray(ka.predict(few, jnp.asarray(z["heldout_masks"]))),
                               z["pred_kernel_real_few"], rtol=1e-4, atol=1e-5)
    for name, m in res["methods"].items():
        loo_rho = np.nanmean(np.asarray(ka.spearman(jnp.asarray(z[f"loo_{name}"]),
                                                    jnp.asarray(z["loo_real"]))))
        np.testing.assert_allclose(loo_rho, m["loo_spearman"], atol=1e-6)
    # estimator relative error recomputed from its definition
    est, F0 = z["estimated_heldout"], z["F0"]
    rel = np.mean(np.abs(est.mean(1) - actual.mean(1)) / np.abs(actual.mean(1)))
    no_change = np.mean(np.abs(F0.mean() - actual.mean(1)) / np.abs(actual.mean(1)))
    np.testing.assert_allclose(rel, res["estimator"]["relative_error"], rtol=1e-4)
    np.testing.assert_allclose(no_change, res["estimator"]["no_change_relative_error"], rtol=1e-4)
    # baselines' held-out predictions are additive in their task scores
    np.testing.assert_allclose(z["pred_influence"], z["heldout_masks"] @ z["loo_influence"],
                               rtol=1e-5, atol=1e-7)


def test_influence_best_is_the_best_damping_of_the_sweep(tiny_run):
    res, _ = tiny_run
    sweep = res["influence_damping"]
    assert sweep["damping"] == list(pl.DAMPING_GRID) and len(sweep["lds"]) == len(pl.DAMPING_GRID)
    best = int(np.nanargmax(sweep["lds"]))
    assert sweep["best"] == pl.DAMPING_GRID[best]
    np.testing.assert_allclose(res["methods"]["influence_best"]["lds"], sweep["lds"][best],
                               atol=1e-6)
    # the grid holds the run's own damping (= prox = 10): its entry is the `influence` method
    i = pl.DAMPING_GRID.index(res["config"]["prox"])
    np.testing.assert_allclose(sweep["lds"][i], res["methods"]["influence"]["lds"], atol=1e-5)
    assert res["methods"]["influence_best"]["lds"] >= res["methods"]["influence"]["lds"] - 1e-6


def test_last_layer_fine_tuning_is_what_the_estimator_solves(tmp_path):
    """Fine-tuning only the unembedding: the logits are linear in it, so the GLM the estimator
    solves (unprojected, to convergence) IS the fine-tuning problem; the estimated labels must
    equal the real ones (up to how far Adam converged), and far better than "nothing changes"."""
    cfg = pl.last_layer_config(**{**TINY, "finetune_steps": 300, "prox": 0.1})
    assert (cfg.finetune_params, cfg.solver, cfg.proj_kind) == ("head", "exact", "identity")
    prep = pl.prepare_stage(cfg)
    n_head = sum(x.size for x in jax.tree.leaves(prep.params0))
    assert n_head == (8 + 1) * prep.data.num_classes  # unembedding (d_model=8) + bias, only
    masks = pl.masks_stage(cfg, prep)
    gt = pl.ground_truth_stage(cfg, prep, masks, cache_dir=str(tmp_path))
    est = pl.estimate_stage(cfg, pl.features_stage(cfg, prep), masks)
    rel = np.abs(est.heldout - gt.heldout) / np.abs(gt.heldout)
    no_change = np.abs(gt.F0[None] - gt.heldout) / np.abs(gt.heldout)
    assert np.max(rel) < 1e-4 and np.mean(no_change) > 0.05  # measured: 4e-7 vs 0.15
    # the noise ceiling fine-tunes the head of another W0 on top of THAT W0's frozen layers
    cfg2 = pl.dataclasses.replace(cfg, gt_seed=1)
    prep2 = pl.prepare_stage(cfg2)
    F2, _ = pl.real_labels(cfg2, prep2.data, prep2.apply_fn, prep2.params0, None, masks.heldout)
    np.testing.assert_allclose(gt.heldout_repeat, F2, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs `regime='finetune'`"):
        pl.prepare_stage(pl.last_layer_config(**{**TINY, "regime": "scratch"}))
    with pytest.raises(ValueError, match="`finetune_params` must be"):
        pl.prepare_stage(pl.PipelineConfig(**{**TINY, "finetune_params": "body"}))


def test_demo_configuration_runs_end_to_end_at_tiny_size(tmp_path):
    """`kernattr demo`'s combination (task family + last layer + projected gradients) through
    every stage, at tiny size; the projection is the estimator's only error there, so its labels
    must track the real ones closely but not exactly."""
    cfg = pl.headline_config(p=7, num_tasks=4, num_targets=6, d_model=8, num_heads=2, d_mlp=16,
                             pretrain_steps=30, finetune_steps=300, prox=0.1,
                             num_train_masks=12, num_heldout_masks=12, num_real_few=8,
                             proj_dim=40, densities=(0.7,))
    assert (cfg.family, cfg.finetune_params, cfg.proj_kind) == ("antagonism", "head", "rademacher")
    res = pl.run_pipeline(cfg, cache_dir=str(tmp_path), progress=False, plots=False,
                          num_resamples=50)
    assert res["sizes"]["num_params"] == (8 + 1) * res["sizes"]["num_classes"] > 40
    inter = res["interactions"]  # each target's own block and its antagonistic partner
    assert inter["family"] == "antagonism" and inter["num_designed"] == cfg.num_targets
    assert np.isfinite(inter["designed_mean_abs"]) and inter["designed_mean_abs"] > 0
    est = res["estimator"]
    # projected (40 of 63 dimensions): visibly inexact, unlike unprojected (4e-7 in the test
    # above), yet better than "nothing changes" (measured: 1.3% vs 2.3%)
    assert 1e-4 < est["relative_error"] < est["no_change_relative_error"]
    assert set(res["methods"]) >= {"kernel", "multifidelity", "influence_best"}


def test_cli_parses_reproduce():
    from kernattr.cli import build_parser

    args = build_parser().parse_args(["reproduce", "modular", "--task", "addition", "--p", "11",
                                      "--tasks", "9", "--masks", "50", "--out", "x"])
    assert (args.task, args.p, args.tasks, args.masks, args.out) == ("addition", 11, 9, 50, "x")
    assert build_parser().parse_args(["demo"]).func.__name__ == "_run_demo"
    args = build_parser().parse_args(["reproduce", "modular", "--prox", "0.1", "--steps", "150"])
    assert (args.prox, args.steps) == (0.1, 150)
    args = build_parser().parse_args(["reproduce", "modular", "--last-layer"])
    assert args.last_layer and not build_parser().parse_args(["reproduce", "modular"]).last_layer
    assert build_parser().parse_args(["reproduce", "modular", "--density", "0.5"]).density == 0.5
    for bad in ("0", "1", "1.5", "nan"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["reproduce", "modular", "--density", bad])
    args = build_parser().parse_args(["reproduce", "atlas", "--prox", "1", "--steps", "100"])
    assert (args.prox, args.steps, args.quick) == (1.0, 100, False)
    for bad in (["--steps", "0"], ["--prox", "-1"], ["--prox", "nan"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["reproduce", "atlas", *bad])


def test_sample_grouping_allows_more_groups_than_grid_blocks():
    """200 random sample groups at p=17 (more than a 17x17 grid could hold as blocks)."""
    cfg = pl.PipelineConfig(grouping="samples", num_tasks=200, p=17, num_targets=8)
    data, fam = pl.make_data(cfg)
    counts = np.bincount(np.asarray(data.task_ids), minlength=200)
    assert fam is None and counts.shape == (200,) and counts.min() >= 1
    assert counts.max() - counts.min() <= 1  # groups as equal as the example count allows
    with pytest.raises(ValueError, match="sample groups but only"):
        pl.make_data(pl.PipelineConfig(grouping="samples", num_tasks=10_000, p=17))
