"""LoRA experiment: the adapter against hand-written LoRA forwards, the estimator exact on a model
linear in the LoRA parameters, the pretraining check on a toy config, the tasks, the schema."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kernattr as ka
import kernattr.groundtruth as kgt
from kernattr.adapters import from_lora, from_nnx, lora_merge, lora_targets
from kernattr.experiments import lora, lora_pretrain as lp


class _MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(3, 5, rngs=rngs)
        self.l2 = nnx.Linear(5, 2, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.tanh(self.l1(x)))


def _random_b(lora_params, key):
    return {k: {"a": v["a"], "b": jax.random.normal(jax.random.fold_in(key, i), v["b"].shape)}
            for i, (k, v) in enumerate(lora_params.items())}


def test_adapter_matches_handwritten_lora_mlp():
    model = _MLP(nnx.Rngs(0))
    f, params = from_nnx(model)
    g, lp0 = from_lora(f, params, jax.random.key(1), rank=2, alpha=4.0)
    assert set(lp0) == set(lora_targets(params)) and len(lp0) == 2
    x = jax.random.normal(jax.random.key(2), (3,))
    np.testing.assert_allclose(g(lp0, x), f(params, x), rtol=1e-6)  # B = 0: the base model
    lpr = _random_b(lp0, jax.random.key(3))
    (k1, a1), (k2, a2) = [(k, lpr[k]) for k in lora_targets(params)]
    W1, b1 = model.l1.kernel[...], model.l1.bias[...]
    W2, b2 = model.l2.kernel[...], model.l2.bias[...]
    s = 4.0 / 2
    h = jnp.tanh(x @ W1 + b1 + s * (x @ a1["a"]) @ a1["b"])
    want = h @ W2 + b2 + s * (h @ a2["a"]) @ a2["b"]
    np.testing.assert_allclose(g(lpr, x), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.jit(g)(lpr, x), want, rtol=1e-5, atol=1e-6)


def test_adapter_matches_flax_lora_module():
    """Against Flax's own ``nnx.LoRA`` wrapping the same base layer (scale 1)."""
    base = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    f, params = from_nnx(base)
    g, lp0 = from_lora(f, params, jax.random.key(1), rank=2)
    (k,) = lp0
    lpr = _random_b(lp0, jax.random.key(5))
    ref = nnx.LoRA(4, 2, 3, base_module=base, rngs=nnx.Rngs(1))
    ref.lora_a[...] = lpr[k]["a"]
    ref.lora_b[...] = lpr[k]["b"]
    x = jax.random.normal(jax.random.key(2), (4,))
    np.testing.assert_allclose(g(lpr, x), ref(x[None])[0], rtol=1e-5, atol=1e-6)


def test_adapter_attention_output_kernel_has_two_input_axes():
    layer = nnx.LinearGeneral((2, 4), 3, axis=(-2, -1), rngs=nnx.Rngs(0))

    class Attn(nnx.Module):
        def __init__(self):
            self.attn = nnx.Dict(out=layer)

        def __call__(self, x):
            return self.attn["out"](x)

    f, params = from_nnx(Attn())
    g, lp0 = from_lora(f, params, jax.random.key(1), rank=1)
    (k,) = lp0
    assert lp0[k]["a"].shape == (8, 1) and lp0[k]["b"].shape == (1, 3)
    lpr = _random_b(lp0, jax.random.key(2))
    x = jax.random.normal(jax.random.key(3), (2, 4))
    want = (jnp.einsum("hd,hdo->o", x, layer.kernel[...]) + layer.bias[...]
            + (x.reshape(-1) @ lpr[k]["a"]) @ lpr[k]["b"])
    np.testing.assert_allclose(g(lpr, x), want, rtol=1e-5, atol=1e-6)


def test_adapter_bad_input():
    f, params = from_nnx(_MLP(nnx.Rngs(0)))
    with pytest.raises(ValueError, match="rank"):
        from_lora(f, params, jax.random.key(0), rank=0)
    with pytest.raises(ValueError, match="not a leaf"):
        from_lora(f, params, jax.random.key(0), rank=1, targets=("['nope']",))
    with pytest.raises(ValueError, match="empty"):
        from_lora(f, params, jax.random.key(0), rank=1, targets=())
    with pytest.raises(TypeError, match="callable"):
        from_lora(None, params, jax.random.key(0), rank=1)
    with pytest.raises(ValueError, match="not found"):
        lora_merge(params, {"['x']": {"a": jnp.ones((1, 1)), "b": jnp.ones((1, 1))}})


def test_estimator_exact_on_model_linear_in_lora_b():
    """``f(x) = x (W + A B)`` is linear in ``B`` (``A`` fixed): the GLM per mask of the
    estimator (identity projection, squared loss, ridge) is exactly the ridge-regularised
    fine-tuning optimum of ``B``, computed here in closed form from hand-written features."""
    rng = np.random.default_rng(0)
    n, K, T = 12, 3, 4
    params = {"w": {"kernel": jnp.asarray(rng.normal(size=(3, 1)), jnp.float32)}}
    f = lambda p, x: (x @ p["w"]["kernel"])[0]  # noqa: E731
    g, lp0 = from_lora(f, params, jax.random.key(0), rank=2)
    (k,) = lp0
    A = lp0[k]["a"]
    X = jnp.asarray(rng.normal(size=(n, 3)), jnp.float32)
    y = jnp.asarray(rng.normal(size=n), jnp.float32)
    t = jnp.repeat(jnp.arange(K), n // K)
    Xt = jnp.asarray(rng.normal(size=(T, 3)), jnp.float32)
    yt = jnp.zeros(T)
    masks = jnp.array([[1, 1, 1], [1, 0, 1], [0, 1, 0], [1, 1, 0]], jnp.float32)
    ridge = 0.3
    proj = ka.make_projector(jax.random.key(1), lp0, kind="identity", dim=None,
                             filter=lora._b_filter)
    tr = ka.gradient_features(g, lp0, X, y, proj, task_ids=t, num_tasks=K)
    tg = ka.gradient_features(g, lp0, Xt, yt, proj)
    assert tr.grads.shape == (n, 2)                     # only B is differentiated
    est = ka.estimate_subset_labels(tr, tg, masks, loss="squared", metric="output", ridge=ridge)
    # oracle: the ridge-regularised weighted least squares in B, solved by numpy from the
    # hand-written features phi = (x A) (f = x W + phi B), no autodiff
    W0 = np.asarray(params["w"]["kernel"], np.float64)[:, 0]
    phi, phit = np.asarray(X @ A, np.float64), np.asarray(Xt @ A, np.float64)
    f0 = np.asarray(X, np.float64) @ W0
    want = []
    for s in np.asarray(masks):
        w = s[np.asarray(t)] / (n // K) / s.sum()      # each selected task's mean loss
        H = phi.T @ (w[:, None] * phi) + ridge * np.eye(2)
        b = np.linalg.solve(H, phi.T @ (w * (np.asarray(y) - f0)))
        want.append(np.asarray(Xt, np.float64) @ W0 + phit @ b)
    np.testing.assert_allclose(est, np.array(want), rtol=1e-4, atol=1e-5)


def test_tasks_match_brute_force():
    rng = np.random.default_rng(1)
    ex = lp.make_examples(rng, np.repeat(np.arange(len(lp.TASKS)), 20))
    for row in ex:
        k, x, ans = row[0] - lp.NUM_DIGITS, [int(v) for v in row[1:8]], int(row[8])
        name = lp.TASKS[k]
        want = {
            "add": (x[0] + x[1]) % 10, "add_shift": (x[0] + x[1] + 1) % 10,
            "sub": (x[0] - x[1]) % 10, "mul": (x[0] * x[1]) % 10,
            "add3": sum(x[:3]) % 10, "first": x[0], "last": x[6], "second_last": x[5],
            "min": min(x), "max": max(x), "median": sorted(x)[3], "count_x0": x.count(x[0]) % 10,
            "count_even": sum(v % 2 == 0 for v in x) % 10,
            "kv": dict(zip(x[0:6:2], x[1:6:2])).get(x[6]),
            "kv_reverse": dict(zip(x[1:6:2], x[0:6:2])).get(x[6]),
            "index": x[x[6] % 6],
        }[name]
        assert ans == want, (name, x, ans)


def test_pretraining_check_toy(tmp_path):
    cfg = lp.tiny_pretrain_config(num_steps=3, max_eval_loss=10.0)
    _, p1, info = lp.pretrained(cfg, cache_dir=str(tmp_path))
    assert not info["cache_hit"] and os.path.exists(lp._cache_path(cfg, str(tmp_path)))
    _, p2, info = lp.pretrained(cfg, cache_dir=str(tmp_path))
    assert info["cache_hit"]
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(a, b)
    res = lp.check_checkpoint(cfg, cache_dir=str(tmp_path))
    assert res.ok and res.digest == cfg.digest() and len(res.per_task) == 16
    assert np.log(10) - 1.0 < res.eval_loss < 10.0
    strict = lp.PretrainConfig(**{**cfg.to_dict(), "max_eval_loss": 1e-3})
    assert strict.digest() != cfg.digest()
    assert not lp.CheckResult(res.eval_loss < strict.max_eval_loss, res.eval_loss, 1e-3,
                              strict.digest(), {}).ok
    import shutil
    shutil.copy(lp._cache_path(cfg, str(tmp_path)), lp._cache_path(strict, str(tmp_path)))
    with pytest.raises(ValueError, match="hash"):               # the stored hash is cfg's
        lp.load_checkpoint(lp._cache_path(strict, str(tmp_path)), strict)


def test_results_schema():
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "results", "data", "lora.json")
    assert os.path.exists(path), "docs/results/data/lora.json is committed with the results page"
    with open(path) as f:
        r = json.load(f)
    for k in ("relative_error", "no_change_relative_error", "spearman"):
        assert np.isfinite(r["estimator"][k])
    for k in ("real_seconds_per_mask", "estimator_seconds_per_mask", "ratio"):
        assert r["cost"][k] > 0
    for name in ("kernel", "linear", "kernel_real", "datamodels", "multifidelity", "influence",
                 "influence_best", "trak", "tracin"):
        lo, hi = r["lds"][name]["lds_ci"]
        assert lo <= r["lds"][name]["lds"] <= hi
    for name in ("kernel-linear", "kernel-influence_best", "kernel_real-datamodels"):
        m, lo, hi = r["paired"][name]
        assert lo <= m <= hi
    assert r["num_tasks"] == 16 and r["num_parameters"] >= 1_000_000
    assert 0 < r["num_lora_parameters"] < r["num_parameters"]
    assert np.isfinite(r["target_change"]) and "lds_ci" in r["noise_ceiling"]
    assert lora.results_markdown(r).count("\n|") > 10


def _binary_lora_problem():
    """Two classes, logits ``x (W + s A B)``: the log-odds ``l_y − l_{1−y}`` are linear in ``B``."""
    rng = np.random.default_rng(3)
    n, K, T = 12, 3, 5
    params = {"w": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}}
    g, lp0 = from_lora(lambda p, x: x @ p["w"]["kernel"], params, jax.random.key(0), rank=2,
                       alpha=4.0)
    ex = lambda m: jnp.asarray(np.c_[rng.normal(size=(m, 3)), rng.integers(0, 2, m)],  # noqa: E731
                               jnp.float32)
    X, Xt = ex(n), ex(T)
    t = jnp.repeat(jnp.arange(K), n // K)
    masks = jnp.array([[1, 1, 1], [1, 0, 1], [0, 1, 0], [0, 0, 0]], jnp.float32)
    return g, lp0, X, Xt, t, masks


def test_linearized_adamw_is_real_adamw_on_model_linear_in_b():
    """Oracle: real AdamW fine-tuning of ``B`` (``A`` frozen) through the model itself, with
    the same draws; the model's log-odds are linear in ``B``, so the two must agree."""
    import optax

    from kernattr.adapters import answer_output

    g, lp0, X, Xt, t, masks = _binary_lora_problem()
    (k,) = lp0
    A = lp0[k]["a"]
    opt = optax.adamw(0.05, weight_decay=0.01)
    key = jax.random.key(7)
    logits_b = lambda b, e: g({k: {"a": A, "b": b}}, e[:3])  # noqa: E731
    real = kgt.finetune_fn(logits_b, loss="softmax", optimizer=opt, num_steps=6, batch_size=5)
    Wb = real(lp0[k]["b"], X, X[:, -1], t, masks, key)
    want = kgt.evaluate_targets(logits_b, Wb, Xt, Xt[:, -1], loss="softmax")
    proj = ka.make_projector(jax.random.key(1), lp0, kind="identity", dim=None,
                             filter=lora._b_filter)
    z = lambda lp, e: answer_output(g(lp, e[:3]), e[-1], "logodds")  # noqa: E731
    tr = ka.gradient_features(z, lp0, X, jnp.ones(len(X)), proj, task_ids=t, num_tasks=3)
    tg = ka.gradient_features(z, lp0, Xt, jnp.ones(len(Xt)), proj)
    run = jax.jit(lambda a, b, m, kk: lora.linearized_finetune_labels(
        a, b, m, kk, loss="logistic", optimizer=opt, num_steps=6, batch_size=5,
        mask_chunk_size=2))
    got = run(tr, tg, masks, key)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    assert float(jnp.max(jnp.abs(got[0] - got[-1]))) > 1e-2  # training moved (last: empty mask)


def test_linearized_adamw_bad_input():
    import optax

    g, lp0, X, Xt, t, masks = _binary_lora_problem()
    f = ka.GradientFeatures(jnp.ones((12, 4)), jnp.zeros(12), jnp.ones(12), t)
    kw = dict(loss="logistic", optimizer=optax.adam(0.1), num_steps=1, batch_size=None)
    with pytest.raises(ValueError, match="task_ids"):
        lora.linearized_finetune_labels(f._replace(task_ids=None), f, masks, None, **kw)
    with pytest.raises(ValueError, match="differ in D"):
        lora.linearized_finetune_labels(f, f._replace(grads=jnp.ones((12, 3))), masks, None, **kw)
