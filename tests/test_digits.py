"""The digits experiment (kernattr.experiments.digits) and the curvature pieces
(kernattr.experiments.curvature): exact game values against brute force, Hutchinson against the
exact Hessian trace, SAM / noise-stability steps against hand computations, the stages at toy
size and the results.json schema."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("sklearn")

import kernattr as ka  # noqa: E402
from kernattr.experiments import curvature as C  # noqa: E402
from kernattr.experiments import digits as D  # noqa: E402


# ------------------------------------------------------------------ exact values vs brute force


def _brute(F: np.ndarray, K: int):
    """Shapley by averaging marginal contributions over all K! orders, Banzhaf over all
    subsets, LOO, anchored second differences and the Shapley interaction index, directly."""
    val = {frozenset(k for k in range(K) if (i >> k) & 1): F[i] for i in range(2 ** K)}
    N = frozenset(range(K))
    shap = np.zeros((K,) + F.shape[1:])
    for order in itertools.permutations(range(K)):
        s = frozenset()
        for k in order:
            shap[k] += val[s | {k}] - val[s]
            s = s | {k}
    shap /= math.factorial(K)
    subsets = [frozenset(c) for r in range(K + 1) for c in itertools.combinations(range(K), r)]
    banz = np.stack([np.mean([val[s | {k}] - val[s] for s in subsets if k not in s], axis=0)
                     for k in range(K)])
    loo = np.stack([val[N] - val[N - {k}] for k in range(K)])
    inter = np.zeros((K, K) + F.shape[1:])
    sii = np.zeros((K, K) + F.shape[1:])
    for i, j in itertools.combinations(range(K), 2):
        inter[i, j] = inter[j, i] = val[N] - val[N - {i}] - val[N - {j}] + val[N - {i, j}]
        tot = 0.0
        for s in subsets:
            if i in s or j in s:
                continue
            w = math.factorial(len(s)) * math.factorial(K - len(s) - 2) / math.factorial(K - 1)
            tot = tot + w * (val[s | {i, j}] - val[s | {i}] - val[s | {j}] + val[s])
        sii[i, j] = sii[j, i] = tot
    return shap, banz, loo, inter, sii


def test_exact_attributions_match_brute_force_through_jit():
    K, T = 4, 3
    F = np.random.default_rng(0).normal(size=(2 ** K, T))
    ex = jax.jit(D.exact_attributions)(jnp.asarray(F, jnp.float32))
    shap, banz, loo, inter, sii = _brute(F, K)
    for got, want in ((ex.shapley, shap), (ex.banzhaf, banz), (ex.loo, loo),
                      (ex.interactions, inter), (ex.shapley_interactions, sii)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    # efficiency: Σ_k φ_k = F(all) − F(∅) per target
    np.testing.assert_allclose(np.asarray(ex.shapley).sum(0), F[-1] - F[0], atol=1e-5)
    assert np.abs(np.asarray(ex.efficiency_error)).max() < 1e-5


def test_exact_attributions_1d_and_bad_input():
    F = np.array([0.0, 1.0, 2.0, 5.0])              # synergy 2 between the two tasks
    ex = D.exact_attributions(F)
    np.testing.assert_allclose(np.asarray(ex.shapley), [2.0, 3.0])
    np.testing.assert_allclose(np.asarray(ex.interactions), [[0.0, 2.0], [2.0, 0.0]])
    with pytest.raises(ValueError, match="2\\^K rows"):
        D.exact_attributions(np.zeros((6, 2)))
    with pytest.raises(ValueError, match="must be"):
        D.exact_attributions(np.zeros((4, 2, 2)))


def test_all_masks_order_and_bad_input():
    m = D.all_masks(3)
    assert m.shape == (8, 3) and m.dtype == np.float32
    np.testing.assert_array_equal(m @ (2 ** np.arange(3)), np.arange(8))
    with pytest.raises(ValueError, match="num_tasks"):
        D.all_masks(0)


# ------------------------------------------------------------------------------- curvature


def test_hutchinson_trace_matches_exact_hessian_trace_of_a_tiny_model():
    x = jax.random.normal(jax.random.key(1), (12, 3))
    y = jnp.arange(12) % 3
    params = {"w": 0.5 * jax.random.normal(jax.random.key(2), (3, 4)),
              "v": 0.5 * jax.random.normal(jax.random.key(3), (4, 3))}

    def loss(p):
        logits = jnp.tanh(x @ p["w"]) @ p["v"]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    flat, unravel = jax.flatten_util.ravel_pytree(params)
    exact = float(jnp.trace(jax.hessian(lambda f: loss(unravel(f)))(flat)))
    est = jax.jit(lambda k, p: C.hutchinson_trace(k, loss, p, num_probes=200,
                                                  num_resamples=200))(jax.random.key(0), params)
    assert float(est.low) <= exact <= float(est.high)
    assert abs(float(est.mean) - exact) < 4 * float(est.std)
    assert est.samples.shape == (200,)
    with pytest.raises(ValueError, match="num_probes"):
        C.hutchinson_trace(jax.random.key(0), loss, params, num_probes=1)
    with pytest.raises(TypeError, match="typed PRNG key"):
        C.hutchinson_trace(0, loss, params)


def test_sam_step_matches_hand_computation_under_jit():
    f = lambda w: jnp.sum(w ** 4) / 4.0 + w[0] * w[1]  # noqa: E731
    w = jnp.array([1.0, -2.0, 0.5])
    lr, rho = 0.1, 0.3
    opt = C.sam(optax.sgd(lr), rho)
    step = jax.jit(lambda g, s, p: opt.update(g, s, p, value_fn=f))
    u, _ = step(jax.grad(f)(w), opt.init(w), w)
    wn = np.array(w, np.float64)
    grad = lambda v: v ** 3 + np.array([v[1], v[0], 0.0])  # noqa: E731
    g = grad(wn)
    adv = wn + rho * g / np.linalg.norm(g)
    np.testing.assert_allclose(np.asarray(u), -lr * grad(adv), rtol=1e-5)
    with pytest.raises(ValueError, match="value_fn"):
        opt.update(g, opt.init(w), w)
    with pytest.raises(ValueError, match="rho"):
        C.sam(optax.sgd(0.1), 0.0)
    with pytest.raises(TypeError, match="optax"):
        C.sam("adam", 0.1)


def test_noise_stability_is_the_antithetic_mean_gradient():
    f = lambda w: jnp.sum(jnp.sin(w))  # noqa: E731
    w = jnp.array([0.3, -1.0])
    opt = C.noise_stability(optax.sgd(1.0), 0.2, jax.random.key(5))
    state = opt.init(w)
    u, state2 = jax.jit(lambda s: opt.update(jnp.zeros(2), s, w, value_fn=f))(state)
    # the same draw by hand: the first key split, one normal draw for the single leaf
    _, draw = jax.random.split(jax.random.key(5))
    noise = 0.2 * jax.random.normal(jax.random.split(draw, 1)[0], (2,))
    want = -0.5 * (jnp.cos(w + noise) + jnp.cos(w - noise))
    np.testing.assert_allclose(np.asarray(u), np.asarray(want), rtol=1e-6)
    assert not np.array_equal(jax.random.key_data(state2.key), jax.random.key_data(state.key))
    with pytest.raises(ValueError, match="sigma"):
        C.noise_stability(optax.sgd(1.0), -1.0, jax.random.key(0))


# ------------------------------------------------------------------------- stages, schema


def test_load_digits_data_split_and_bad_input():
    d = D.load_digits_data(num_train=100, num_targets=20, seed=1)
    assert d.train_inputs.shape == (100, 64) and d.target_inputs.shape == (20, 64)
    np.testing.assert_array_equal(np.bincount(d.target_labels), np.full(10, 2))
    np.testing.assert_array_equal(d.task_ids, d.train_labels)
    assert 0.0 <= d.train_inputs.min() and d.train_inputs.max() <= 1.0
    # targets are held out: no target image is a training image
    assert not (d.target_inputs[:, None, :] == d.train_inputs[None]).all(-1).any()
    with pytest.raises(ValueError, match="multiple of 10"):
        D.load_digits_data(num_targets=15)
    with pytest.raises(ValueError, match="num_train"):
        D.load_digits_data(num_train=5000)


def test_patch_convolution_matches_lax_conv():
    h = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    kern = jax.random.normal(jax.random.key(1), (3, 3, 3, 5))
    for stride in (1, 2):
        # zero padding of one pixel on every side (for stride 2 XLA's "SAME" would pad
        # only after the last pixel)
        want = jax.lax.conv_general_dilated(h, kern, (stride, stride), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        got = D._patches(h, stride) @ kern.reshape(27, 5)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def toy_stages(tmp_path_factory):
    """Stages 1-3 (data and W0, all 1,024 fine-tunings, exact values) at toy size."""
    cfg = D.tiny_config(num_train=100, num_targets=10, pretrain_steps=5, finetune_steps=3,
                        batch_size=4, num_repeat=8, mask_chunk=1024)
    cache = str(tmp_path_factory.mktemp("digits-cache"))
    prep = D.prepare_stage(cfg)
    gt = D.ground_truth_stage(cfg, prep, cache_dir=cache)
    return cfg, cache, prep, gt, D.exact_stage(gt)


def test_toy_stages_exact_ground_truth(toy_stages):
    cfg, cache, prep, gt, ex = toy_stages
    assert gt.F.shape == (1024, 10) and gt.repeat.shape == (8, 10) and not gt.cache_hit
    # an empty mask does not train: its labels are the losses at W0
    np.testing.assert_allclose(gt.F[0], gt.F0, rtol=1e-5, atol=1e-6)
    # fine-tuning on a mask changes the labels, and the repeat uses another minibatch seed
    assert np.abs(gt.F[-1] - gt.F0).max() > 0
    assert not np.allclose(gt.repeat, gt.F[gt.repeat_index])
    # efficiency of the exact Shapley values, in float64
    scale = np.abs(gt.F[-1] - gt.F[0]).max()
    assert np.abs(ex.efficiency_error).max() < 1e-12 * max(1.0, scale)
    np.testing.assert_allclose(ex.loo, gt.F[-1][None] - gt.F[1023 - 2 ** np.arange(10)],
                               rtol=1e-6, atol=1e-7)


def test_ground_truth_cache_is_reused(toy_stages, monkeypatch):
    cfg, cache, prep, gt, _ = toy_stages

    def fail(*a, **k):
        raise AssertionError("fine-tuned again instead of reading the cache")

    monkeypatch.setattr(D, "make_runner", lambda *a, **k: fail)
    again = D.ground_truth_stage(cfg, prep, cache_dir=cache)
    assert again.cache_hit
    np.testing.assert_array_equal(again.F, gt.F)


def test_evaluate_method_row_schema():
    K, T = 4, 6
    rng = np.random.default_rng(0)
    F = rng.normal(size=(2 ** K, T))
    ex = D.exact_attributions(F)
    masks = D.all_masks(K)
    exact_scores = D.MethodScores(F[1::2], np.asarray(ex.loo), np.asarray(ex.shapley),
                                  np.asarray(ex.banzhaf), np.asarray(ex.interactions), 0.0)
    row = D.evaluate_method(jax.random.key(0), exact_scores, F[1::2], ex, 50)
    # a method that returns the exact values and the true labels scores 1 everywhere
    for key in ("lds", "shapley_corr", "loo_corr", "banzhaf_corr", "interaction_corr"):
        assert row[key] == pytest.approx(1.0)
        assert row[key + "_ci"] == pytest.approx([1.0, 1.0])
    add = D.additive_scores(rng.normal(size=(K, T)), masks[1::2])
    row = D.evaluate_method(jax.random.key(0), add, F[1::2], ex, 50)
    assert row["interaction_corr"] is None and len(row["shapley_corr_ci"]) == 2
    lo, hi = row["lds_ci"]
    assert lo <= hi


def test_curvature_row_schema_on_a_toy_problem():
    """A row of the curvature table from a quadratic loss with a known Hessian trace and a
    game with an interaction (kernel and linear surrogates both fitted)."""
    K = 5
    masks = D.all_masks(K)
    F = (masks @ np.arange(1.0, K + 1) + 3.0 * masks[:, 0] * masks[:, 1])[:, None]
    F = np.concatenate([F, -F], axis=1)
    loss = lambda p: 0.5 * jnp.sum(jnp.arange(1.0, 4.0) * p ** 2)  # noqa: E731  (trace 6)
    row = D.curvature_row(jax.random.key(0), model="toy", training="plain", loss_fn=loss,
                          params0=jnp.zeros(3), fit_masks=masks[::2], held_masks=masks[1::2],
                          F_fit=F[::2], F_held=F[1::2], Fhat_fit=F[::2], num_probes=4,
                          num_resamples=20)
    assert row["hessian_trace"] == pytest.approx(6.0)
    assert row["hessian_trace_ci"] == pytest.approx([6.0, 6.0])
    for tag in ("real", "est"):
        for name in ("kernel", "linear"):
            lo, hi = row[f"lds_{name}_{tag}_ci"]
            assert lo <= hi and -1.0 <= row[f"lds_{name}_{tag}"] <= 1.0
        assert len(row[f"kernel_minus_linear_{tag}"]) == 3
    md = D.results_markdown({"num_subsets_retrained": 32, "num_tasks": K, "exact": {
        "efficiency_max_abs_error": 0.0}, "curvature": [row]})
    assert "| toy | plain | 6 [6, 6] |" in md


@pytest.mark.slow  # covered by `kernattr reproduce digits --smoke`
def test_smoke_run_and_results_json_schema(tmp_path):
    import json

    cfg = D.tiny_config(mask_counts=(30,), num_resamples=20)
    res = D.run_digits(cfg, out=str(tmp_path), cache_dir=str(tmp_path / "cache"), progress=False,
                       plots=True, curvature=True)
    with open(tmp_path / "results.json") as fh:
        data = json.load(fh)
    assert data["num_subsets_retrained"] == 1024 and data["num_tasks"] == 10
    assert data["exact"]["efficiency_max_abs_error"] < 1e-9
    for key in ("relative_error", "no_change_relative_error", "spearman"):
        assert np.isfinite(data["estimator"][key])
    for name in D.METHODS:
        row = data["methods"][f"{name}@30"]
        assert -1.0 <= row["lds"] <= 1.0 and len(row["lds_ci"]) == 2
        assert np.isfinite(row["shapley_corr"]) and len(row["shapley_corr_ci"]) == 2
    assert [(r["model"], r["training"]) for r in data["curvature"]] == [
        ("digits", t) for t in D.TRAININGS]
    for r in data["curvature"]:
        assert r["hessian_trace_ci"][0] <= r["hessian_trace_ci"][1]
    assert (tmp_path / "digits_shapley.png").exists()
    assert "| subsets retrained | 1024 |" in D.results_markdown(res)




@pytest.mark.slow  # compiles the estimator; `kernattr reproduce digits --smoke` runs ridge_check
def test_ridge_check_selects_on_one_half_and_reports_on_the_other(toy_stages):
    cfg, _, prep, gt, _ = toy_stages
    est = D.estimate_stage(cfg, prep, gt.masks)
    rc = D.ridge_check(est, gt, ridges=(1e-2, 10.0))
    # the configured ridge reproduces the stage's labels (same features, same solver)
    again = D.estimated_labels(est.train, est.target, gt.masks, cfg.ridge)
    np.testing.assert_allclose(again, est.F_hat, rtol=1e-6, atol=1e-6)
    # the report half is scored on the odd-indexed subsets only (an oracle from the same labels)
    F_hat = D.estimated_labels(est.train, est.target, gt.masks, 10.0)
    err = ka.estimator_error(F_hat[1::2], gt.F[1::2], F0=gt.F0)
    assert rc["report_relative_error"][1] == pytest.approx(float(err.relative_error), rel=1e-6)
    assert rc["selected"] == rc["ridges"][int(np.argmax(rc["select_spearman"]))]
