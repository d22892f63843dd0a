"""In-context learning experiment: model, data, real labels, Taylor estimator, search, driver."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kernattr as ka
from kernattr.experiments import icl, icl_estimator as est, icl_model as im

from _jitted import fit_kernel as _fk

P = 5
TINY = im.ICLConfig(p=P, steps=40, batch_size=32, d_model=16, num_heads=2, d_mlp=32, max_demos=4)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("icl-cache"))


@pytest.fixture(scope="module")
def trained(cache_dir):
    return im.cached_icl_model(TINY, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def problem():
    return im.make_icl_problem(jax.random.key(3), p=P, num_candidates=8, num_queries=4,
                               num_frequent=2, num_correct=2, num_noisy=2, num_other_rules=1)


def test_problem_composition_and_labels():
    prob = im.make_icl_problem(jax.random.key(1), p=7)
    a, b = prob.rule
    correct = (a * prob.demo_x + b) % 7 == prob.demo_y
    kinds = np.asarray(im.KINDS)[prob.kinds]
    assert np.all(correct[(kinds == "frequent") | (kinds == "correct")])
    assert not np.any(correct[kinds == "noisy"])
    assert np.all(prob.demo_x[kinds == "frequent"] == prob.frequent_x)
    assert np.all(prob.candidates == prob.demo_x * 7 + prob.demo_y)
    assert np.all(prob.answers == (a * prob.query_x + b) % 7)
    assert np.sum(prob.query_x == prob.frequent_x) >= 8
    with pytest.raises(ValueError, match="prime"):
        im.make_icl_problem(jax.random.key(1), p=8)
    with pytest.raises(ValueError, match="exceed"):
        im.make_icl_problem(jax.random.key(1), p=7, num_candidates=10)


def test_config_checks():
    with pytest.raises(ValueError, match="prime"):
        im.ICLConfig(p=9)
    with pytest.raises(ValueError, match="label_noise"):
        im.ICLConfig(label_noise=1.5)
    with pytest.raises(ValueError, match="divisible"):
        im.ICLConfig(d_model=10, num_heads=4)
    assert im.ICLConfig().key_hash() != im.ICLConfig(seed=1).key_hash()


def test_training_lowers_loss_and_cache(trained, cache_dir):
    first = trained
    again = im.cached_icl_model(TINY, cache_dir=cache_dir)
    assert not first.cache_hit and again.cache_hit
    assert np.mean(first.losses[-10:]) < np.mean(first.losses[:5])
    for x, y in zip(jax.tree.leaves(first.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_zero_weight_deletes_token_and_packed_queries(trained, problem):
    """Weights 0/1 == the prompt with the zero-weight tokens deleted; packing == separate."""
    f = jax.jit(trained.apply_fn, static_argnums=3)
    c, q = jnp.asarray(problem.candidates), jnp.asarray(problem.queries)
    keep = np.array([0, 2, 3, 6])
    w = jnp.zeros(8).at[keep].set(1.0)
    full = f(trained.params, jnp.concatenate([c, q]), jnp.concatenate([w, jnp.ones(4)]), 4)
    short = f(trained.params, jnp.concatenate([c[keep], q]), jnp.ones(8), 4)
    np.testing.assert_allclose(full, short, atol=1e-5)
    for t in range(4):
        single = f(trained.params, jnp.concatenate([c[keep], q[t:t + 1]]), jnp.ones(5), 1)
        np.testing.assert_allclose(full[t], single, atol=1e-5)


def test_model_input_checks():
    model = im.ICLTransformer(vocab_size=30, num_classes=5, d_model=8, num_heads=2, d_mlp=8,
                              rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="weights"):
        model(jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="num_queries"):
        model(jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3)), 4)


def test_query_losses_gather_equals_weighted_and_jit(trained, problem):
    masks = ka.sample_subsets(jax.random.key(2), num_tasks=8, num_subsets=6, size=3)
    args = (trained.apply_fn, trained.params, problem.candidates, problem.queries,
            problem.answers)
    gathered = jax.jit(lambda m: im.query_losses(*args, m, size=3, chunk_size=4))(masks)
    weighted = jax.jit(lambda m: im.query_losses(*args, m))(masks)
    np.testing.assert_allclose(gathered, weighted, atol=1e-5)
    # oracle: the loss of one prompt built by hand
    keep = np.flatnonzero(np.asarray(masks[0]))
    prompt = np.concatenate([problem.candidates[keep], problem.queries])
    logits = jax.jit(trained.apply_fn, static_argnums=3)(trained.params, prompt,
                                                          jnp.ones(3 + 4), 4)
    ce = -jax.nn.log_softmax(logits)[jnp.arange(4), problem.answers]
    np.testing.assert_allclose(gathered[0], ce, atol=1e-5)
    with pytest.raises(ValueError, match="masks"):
        im.query_losses(*args, masks[:, :5])


def test_taylor_exact_on_quadratic_and_jit():
    a = jax.random.normal(jax.random.key(0), (4, 4))
    fn = lambda w: jnp.stack([w @ a @ w + w[0], jnp.sum(w**2)])  # noqa: E731
    tay = jax.jit(est.prompt_taylor, static_argnums=0)(fn, jnp.full((4,), 0.5))
    masks = jnp.asarray(list(itertools.product([0.0, 1.0], repeat=4)))
    np.testing.assert_allclose(est.taylor_labels(tay, masks), jax.vmap(fn)(masks), atol=1e-5)
    first = est.taylor_labels(tay, masks, order=1)
    lin = fn(tay.anchor)[None] + (masks - 0.5) @ jax.jacrev(fn)(tay.anchor).T
    np.testing.assert_allclose(first, lin, atol=1e-5)
    # dropping the diagonal of the Hessian
    off = est.taylor_labels(tay, masks, diagonal=False)
    d = masks - 0.5
    diag = 0.5 * jnp.einsum("mk,kt->mt", d**2, jnp.einsum("kkt->kt", tay.hessian))
    np.testing.assert_allclose(off, est.taylor_labels(tay, masks) - diag, atol=1e-5)
    with pytest.raises(ValueError, match="order"):
        est.prompt_taylor(fn, jnp.ones(4), order=3)
    with pytest.raises(ValueError, match="entries <= 0"):
        est.prompt_taylor(fn, jnp.zeros(4))


def test_taylor_of_the_model_matches_finite_differences(trained, problem):
    allq = P * P + jnp.arange(P)
    fn = est.soft_prompt_logits(trained.apply_fn, trained.params, problem.candidates, allq)
    w0 = est.anchor_weights(8, 2)
    eps = 1e-2
    e = jnp.zeros(8).at[1].set(eps)

    @jax.jit
    def run(w0):
        tay = est.prompt_taylor(fn, w0)
        fd = (fn(w0 + e) - fn(w0 - e)) / (2 * eps)
        losses = est.estimate_query_losses(tay, w0[None], problem.query_x, problem.answers,
                                           num_classes=P)
        real = im.query_losses(trained.apply_fn, trained.params, problem.candidates,
                               problem.queries, problem.answers, w0[None])
        return tay, fd, losses, real

    tay, fd, losses, real = run(w0)
    np.testing.assert_allclose(fd, tay.grad[1], atol=2e-3)
    np.testing.assert_allclose(losses, real, atol=1e-4)  # exact at the anchor


def test_gradient_alignment_shape_and_sign(trained, problem):
    s = jax.jit(lambda k: est.gradient_alignment_scores(
        k, trained.apply_fn, trained.params, problem.candidates, problem.demo_x,
        problem.demo_y, problem.queries, problem.answers, est.anchor_weights(8, 2), p=P,
        dim=16))(jax.random.key(0))
    assert s.shape == (8, 4) and np.all(np.isfinite(s))


def test_kernel_subset_search_matches_predict():
    masks = ka.sample_subsets(jax.random.key(0), num_tasks=7, num_subsets=40, size=3)
    y = jnp.stack([masks[:, 0] * masks[:, 1] - masks[:, 2], masks[:, 3]], axis=1)
    subsets = jnp.asarray(icl.all_subsets(7, 3))
    check_search(_fk(masks, y, kernel="rbf", gamma=0.3, ridge=1e-2), subsets)
    check_search(_fk(masks, y, kernel="linear+rbf", gamma=0.3, mix=0.5, ridge=1e-2), subsets)
    with pytest.raises(ValueError, match="RBF"):
        icl.kernel_subset_search(_fk(masks, y, kernel="linear", ridge=1.0), subsets)
    assert icl.all_subsets(50, 4).shape == (230300, 4)


def check_search(s, subsets):
    pred, best = jax.jit(functools.partial(icl.kernel_subset_search, chunk_size=8))(s, subsets)
    rows = jnp.arange(subsets.shape[0])[:, None]
    full = jnp.zeros((subsets.shape[0], 7)).at[rows, subsets].set(1.0)
    ref = jax.jit(lambda s_, x: jnp.mean(ka.predict(s_, x), axis=1))(s, full)
    np.testing.assert_allclose(pred, ref, atol=1e-5)
    assert int(best) == int(jnp.argmin(ref))


def test_run_icl_tiny(tmp_path, trained, cache_dir):
    cfg = icl.tiny_config()
    cfg = cfg.__class__(**{**cfg.__dict__, "model": TINY, "num_rules": 1, "num_oracle": 50,
                           "num_train_masks": 40, "num_heldout_masks": 30, "num_resamples": 20})
    res = icl.run_icl(cfg, out=str(tmp_path), cache_dir=cache_dir, progress=False)
    assert res["model"]["cache_hit"]
    for name in ("kernel", "kernel_real", "linear", "influence"):
        lo, hi = res["lds"][name]["lds_ci"]
        assert lo <= res["lds"][name]["lds"] <= hi
    for name in ("kernel-linear", "kernel-influence"):
        assert len(res["paired"][name]) == 3
    sel = res["selection"]
    assert set(sel) >= {"random", "linear", "influence", "kernel", "oracle"}
    assert all(sel["oracle"] <= sel[n] + 1e-6 for n in ("linear", "influence", "kernel"))
    assert res["num_target_rules"] == 1
    assert 0 <= res["estimator"]["spearman"] <= 1 or np.isnan(res["estimator"]["spearman"])
    assert (tmp_path / "results.json").exists() and (tmp_path / "selection.png").exists()
    assert len(res["icl_curve"]) == TINY.max_demos + 1
    print(icl.format_table(res))


def test_interactions_exact_up_to_two_shots_and_jit(trained, problem):
    """The interaction expansion reproduces every 0/1/2-shot prompt exactly (real forward)."""
    allq = P * P + jnp.arange(P)
    inter = jax.jit(lambda c: est.prompt_interactions(trained.apply_fn, trained.params, c, allq,
                                                      chunk_size=8))(problem.candidates)
    assert inter.pair.shape == (8, 8, P, P)
    # eager (concrete candidates: identical prompts deduplicated) == traced (every prompt run)
    dup = jnp.asarray(problem.candidates).at[3].set(problem.candidates[1]).at[6].set(problem.candidates[1])
    eager = est.prompt_interactions(trained.apply_fn, trained.params, dup, allq, chunk_size=8)
    traced = jax.jit(lambda c: est.prompt_interactions(trained.apply_fn, trained.params, c, allq,
                                                       chunk_size=8))(dup)
    plan = est.distinct_prompts(dup)
    assert plan.single_tokens.shape[0] <= 6 and plan.pair_first.shape[0] < 28
    planned = jax.jit(lambda c, pl: est.prompt_interactions(trained.apply_fn, trained.params, c,
                                                            allq, chunk_size=8, plan=pl))(dup, plan)
    for a_, b_, c_ in zip(eager, traced, planned):
        np.testing.assert_allclose(a_, b_, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(c_, b_, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(eager.main[3], eager.main[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(inter.pair, jnp.swapaxes(inter.pair, 0, 1))
    np.testing.assert_array_equal(inter.pair[jnp.arange(8), jnp.arange(8)], 0.0)
    pairs = jnp.asarray(list(itertools.combinations(range(8), 2)))
    masks2 = jnp.zeros((len(pairs), 8)).at[jnp.arange(len(pairs))[:, None], pairs].set(1.0)
    # real forward passes and interaction-expanded losses, each compiled once per prompt size
    real = jax.jit(functools.partial(im.query_losses, trained.apply_fn, trained.params,
                                     problem.candidates, problem.queries, problem.answers),
                   static_argnames="size")
    expanded = jax.jit(est.interaction_query_losses, static_argnames="size")
    qx, ans = jnp.asarray(problem.query_x), jnp.asarray(problem.answers)
    np.testing.assert_allclose(expanded(inter, masks2, qx, ans, size=2), real(masks2, size=2),
                               atol=1e-4)
    np.testing.assert_allclose(expanded(inter, jnp.eye(8), qx, ans, size=1),
                               real(jnp.eye(8), size=1), atol=1e-4)
    # 4-shot: gather path == dense path, and it differs from the real label (not exact there)
    masks4 = ka.sample_subsets(jax.random.key(4), num_tasks=8, num_subsets=12, size=4)
    gathered = expanded(inter, masks4, qx, ans, size=4)
    dense = expanded(inter, masks4, qx, ans)
    np.testing.assert_allclose(gathered, dense, rtol=1e-4, atol=1e-4)
    assert float(jnp.max(jnp.abs(gathered - real(masks4, size=4)))) > 1e-3


def test_interactions_truncate_the_moebius_expansion():
    """On a known set function: pairs exact, the triple interaction is what is dropped."""
    v = jnp.array([1.0, 2.0, 3.0, 5.0])

    def f(params, tokens, weights, q):  # f(S) = Σ v_i + Σ_{i<j} v_i v_j + 7·[3 items]
        s = tokens[:-q] * weights[:-q]
        n = jnp.sum(weights[:-q])
        out = jnp.sum(s) + 0.5 * (jnp.sum(s) ** 2 - jnp.sum(s ** 2)) + 7.0 * (n >= 3)
        return jnp.full((q, 1), out)

    inter = est.prompt_interactions(f, None, v, jnp.zeros(1))
    np.testing.assert_allclose(inter.main[:, 0, 0], v)
    np.testing.assert_allclose(inter.pair[0, 3, 0, 0], 5.0)
    got = est.interaction_logits(inter, jnp.array([[0, 1, 3], [1, 2, 3]]))[:, 0, 0]
    np.testing.assert_allclose(got, [8.0 + 17.0, 10.0 + 31.0])  # the 7 of the triple is missing
    with pytest.raises(ValueError, match="subsets"):
        est.interaction_logits(inter, jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="candidates"):
        est.prompt_interactions(f, None, jnp.ones((2, 2)), jnp.zeros(1))
    with pytest.raises(ValueError, match="plan"):
        est.prompt_interactions(f, None, v, jnp.zeros(1), plan=est.distinct_prompts(v[:3]))
    with pytest.raises(ValueError, match="tokens differ"):
        est.prompt_interactions(f, None, v, jnp.zeros(1), plan=est.distinct_prompts(v + 1.0))
    with pytest.raises(ValueError, match="masks"):
        est.subset_indices(jnp.ones((2, 3)), 4)
    assert est.subset_indices(jnp.array([[0.0, 1.0, 1.0]]), 2).tolist() == [[1, 2]]


def test_experiment_estimator_choice(trained):
    cfg = icl.tiny_config()
    with pytest.raises(ValueError, match="estimator"):
        icl._Compiled(trained, cfg.__class__(**{**cfg.__dict__, "estimator": "exact"}))
    for name in ("interactions", "taylor"):
        fns = icl._Compiled(trained, cfg.__class__(**{**cfg.__dict__, "model": TINY,
                                                      "num_candidates": 6, "subset_size": 2,
                                                      "estimator": name}))
        c = jnp.arange(6, dtype=jnp.int32)
        masks = jnp.asarray(np.eye(6, dtype=np.float32)[:4] + np.eye(6, dtype=np.float32)[1:5])
        out = fns.estimate(fns.expand(c), masks, jnp.array([0, 1]), jnp.array([2, 3]))
        assert out.shape == (4, 2) and bool(jnp.all(jnp.isfinite(out)))
