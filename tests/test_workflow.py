"""The workflow equals the step-by-step public calls, for an NNX, a Linen and a plain model."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

import kernattr as ka
from kernattr.adapters import from_nnx

K, N, T, M, D_IN, H, C = 4, 48, 6, 24, 3, 8, 3
OPTIONS = dict(num_masks=M, proj_dim=16, gamma=(0.2, 0.5), ridge=(1e-2, 1e-1, 1.0), mix=(0.0, 0.5))


def _data():
    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (N, D_IN))
    y = jax.random.randint(ky, (N,), 0, C)
    t = jnp.arange(N) % K
    return x, y, t, x[:T] + 0.1, y[:T]


def _weights():
    k1, k2 = jax.random.split(jax.random.key(1))
    return {"w1": jax.random.normal(k1, (D_IN, H)) / 2, "b1": jnp.zeros(H),
            "w2": jax.random.normal(k2, (H, C)) / 2, "b2": jnp.full(C, 0.1)}


def _plain(p, x):
    return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


class _NNX(nnx.Module):
    def __init__(self, w):
        self.l1 = nnx.Linear(D_IN, H, rngs=nnx.Rngs(0))
        self.l2 = nnx.Linear(H, C, rngs=nnx.Rngs(1))
        self.l1.kernel[...], self.l1.bias[...] = w["w1"], w["b1"]
        self.l2.kernel[...], self.l2.bias[...] = w["w2"], w["b2"]

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))


class _Linen(linen.Module):
    @linen.compact
    def __call__(self, x):
        return linen.Dense(C, name="out")(jax.nn.relu(linen.Dense(H, name="hidden")(x)))


def _model(kind):
    """(model, variables, (apply_fn, params) written by hand for the step-by-step path)."""
    w = _weights()
    if kind == "nnx":
        model = _NNX(w)
        return model, None, from_nnx(model)
    if kind == "linen":
        module = _Linen()
        variables = {"params": {"hidden": {"kernel": w["w1"], "bias": w["b1"]},
                                "out": {"kernel": w["w2"], "bias": w["b2"]}}}
        return module, variables, (lambda p, x: module.apply({"params": p}, x),
                                   variables["params"])
    return _plain, w, (_plain, w)


# Step-by-step public calls; module-level jitted functions, so the three model kinds share them.
@jax.jit
def _downstream(train, target, masks):
    labels = ka.estimate_subset_labels(train, target, masks, loss="softmax", ridge=1e-3,
                                       solver="fast")
    s = ka.fit_kernel(masks, labels, kernel="linear+rbf", gamma=jnp.asarray(OPTIONS["gamma"]),
                      ridge=jnp.asarray(OPTIONS["ridge"]), mix=jnp.asarray(OPTIONS["mix"]))
    return labels, s, (ka.attribution_intervals(s, kind="loo"),
                       ka.attribution_intervals(s, kind="shapley"), ka.interaction_scores(s))


def _step_by_step(key, apply_fn, params, x, y, t, xt, yt):
    k_masks, k_proj, _, _, _, _ = jax.random.split(key, 6)
    masks = ka.sample_subsets(k_masks, num_tasks=K, num_subsets=M, p=0.5)
    feats = jax.jit(lambda k, p, x, y, t: ka.gradient_features(
        apply_fn, p, x, y, ka.make_projector(k, p, dim=16), task_ids=t, num_tasks=K
    ) if t is not None else ka.gradient_features(apply_fn, p, x, y, ka.make_projector(k, p, dim=16)))
    train, target = feats(k_proj, params, x, y, t), feats(k_proj, params, xt, yt, None)
    labels, s, (loo, shap, inter) = _downstream(train, target, masks)
    return masks, train, labels, s, loo, shap, inter


def _equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert jax.tree.structure(a) == jax.tree.structure(b)


def _close(a, b, **tol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


@pytest.fixture(scope="module")
def runs():
    """Per model kind: the workflow's result, its Workflow and the step-by-step public calls."""
    x, y, t, xt, yt = _data()
    out = {}
    for kind in ("nnx", "linen", "plain"):
        model, variables, (apply_fn, params) = _model(kind)
        before = jax.tree.map(np.asarray, nnx.state(model)) if kind == "nnx" else None
        wf = ka.workflow(model, variables, num_tasks=K, loss="softmax", **OPTIONS)
        key = jax.random.key(3)
        res = ka.run_workflow(key, wf, x, y, t, xt, yt, progress=False)
        ref = _step_by_step(key, apply_fn, params, x, y, t, xt, yt)
        if kind == "nnx":  # the user's model is not mutated
            _equal(before, jax.tree.map(np.asarray, nnx.state(model)))
        out[kind] = (res, wf, ref)
    return out


@pytest.mark.parametrize("kind", ["nnx", "linen", "plain"])
def test_workflow_equals_step_by_step(runs, kind):
    x, y, t, xt, yt = _data()
    res, wf, (masks, train, labels, s, loo, shap, inter) = runs[kind]
    key = jax.random.key(3)
    np.testing.assert_array_equal(res.masks, masks)
    # the stage itself, through jit, against the public call
    np.testing.assert_array_equal(jax.jit(wf.features)(jax.random.split(key, 6)[1], x, y, t).grads,
                                  train.grads)
    np.testing.assert_allclose(res.labels, labels, rtol=1e-6, atol=1e-7)
    # The workflow compiles each stage on its own and `_downstream` compiles them together: two
    # programs that XLA may fuse, and so round, differently. Equal to float32 tolerance, leaf by
    # leaf, with the same structure (bitwise equality would test XLA's fusion choices).
    _close(res.surrogate, s, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(res.surrogate.gamma, s.gamma)  # same grid point selected
    np.testing.assert_array_equal(res.surrogate.ridge, s.ridge)
    # read-outs of the two surrogates: float32 rounding, amplified by the kernel solve, relative
    # to each array's scale
    for a, b in ((res.shapley.value, shap.value), (res.shapley.lower, shap.lower),
                 (res.loo.upper, loo.upper), (res.interactions, inter)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))
    assert res.shapley.value.shape == (K, T) and res.interactions.shape == (K, K, T)
    assert bool(jnp.all(res.shapley.lower <= res.shapley.upper))
    assert res.lds is None and res.real_masks is None
    assert all(math.isfinite(v) for v in res.timings[:3]) and math.isnan(res.timings.real_runs)


def _train_fn(mask):
    """A stand-in for real fine-tuning: a fixed non-additive game of the mask, [T]."""
    w = jnp.linspace(-1.0, 1.0, K * T).reshape(K, T)
    return 1.0 + mask @ w + 0.5 * mask[0] * mask[1]


def test_real_runs_multifidelity_and_heldout_lds(runs, capsys):
    x, y, t, xt, yt = _data()
    wf = ka.workflow(_plain, _weights(), num_tasks=K, loss="softmax", num_real=6, num_heldout=8,
                     num_resamples=50, mask_batch=12, **OPTIONS)
    key = jax.random.key(3)
    res = ka.run_workflow(key, wf, x, y, t, xt, yt, train_fn=_train_fn, progress=True)
    assert "kernattr" in capsys.readouterr().err  # the progress bar was drawn
    k_masks, k_proj, k_real, k_held, _, k_boot = jax.random.split(key, 6)
    real_masks = ka.sample_subsets(k_real, num_tasks=K, num_subsets=6, p=0.5)
    held = ka.sample_subsets(k_held, num_tasks=K, num_subsets=8, p=0.5)
    np.testing.assert_array_equal(res.real_masks, real_masks)
    np.testing.assert_array_equal(res.heldout_labels, jnp.stack([_train_fn(m) for m in held]))
    kw = {k: jnp.asarray(OPTIONS[k]) for k in ("gamma", "ridge", "mix")}
    mf = jax.jit(lambda *a: ka.fit_multifidelity(*a, **kw))(res.masks, res.labels, real_masks,
                                                           res.real_labels)
    assert isinstance(res.surrogate, ka.MultiFidelitySurrogate)
    np.testing.assert_allclose(res.surrogate.rho, mf.rho, rtol=1e-5)
    # values are the multi-fidelity surrogate's exact Shapley values
    np.testing.assert_allclose(res.shapley.value, ka.shapley_values(mf), rtol=1e-4, atol=1e-5)
    lds = ka.lds_interval(k_boot, ka.predict(mf, held), res.heldout_labels, num_resamples=50)
    np.testing.assert_allclose(res.lds.mean, lds.mean, rtol=1e-5)
    assert res.lds.low <= res.lds.mean <= res.lds.high
    assert res.timings.real_runs > 0 and res.timings.lds >= 0
    # labels in two batches of 12 masks equal the labels in one call (same key, same model)
    np.testing.assert_allclose(res.labels, runs["plain"][0].labels, rtol=1e-6, atol=1e-7)


def test_result_saves_and_loads(runs, tmp_path):
    res = runs["plain"][0]
    ka.save(tmp_path / "r.npz", res)
    back = ka.load(tmp_path / "r.npz")
    assert back.config == res.config and isinstance(back, ka.WorkflowResult)
    _equal(back, res)


def test_bad_configuration():
    w = _weights()
    with pytest.raises(ValueError, match="num_tasks"):
        ka.workflow(_plain, w, num_tasks=0, loss="softmax")
    with pytest.raises(ValueError, match="loss"):
        ka.workflow(_plain, w, num_tasks=K, loss="hinge")
    with pytest.raises(ValueError, match="density"):
        ka.workflow(_plain, w, num_tasks=K, loss="softmax", density=1.0)
    with pytest.raises(ValueError, match="num_real"):
        ka.workflow(_plain, w, num_tasks=K, loss="softmax", num_real=2)
    with pytest.raises(ValueError, match="gamma"):
        ka.workflow(_plain, w, num_tasks=K, loss="softmax", gamma=[[0.1]])
    with pytest.raises(TypeError, match="unknown workflow option"):
        ka.workflow(_plain, w, num_tasks=K, loss="softmax", num_mask=3)
    with pytest.raises(TypeError, match="needs its parameters"):
        ka.workflow(_plain, num_tasks=K, loss="softmax")
    with pytest.raises(TypeError, match="own parameters"):
        ka.workflow(_model("nnx")[0], w, num_tasks=K, loss="softmax")
    with pytest.raises(TypeError, match="'params'"):
        ka.workflow(_Linen(), w, num_tasks=K, loss="softmax")
    with pytest.raises(TypeError, match="callable"):
        ka.workflow(3, w, num_tasks=K, loss="softmax")


def test_bad_run_input():
    x, y, t, xt, yt = _data()
    wf = ka.workflow(_plain, _weights(), num_tasks=K, loss="softmax", num_real=3, **OPTIONS)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="train_fn"):
        ka.run_workflow(key, wf, x, y, t, xt, yt, progress=False)
    with pytest.raises(TypeError, match="kernattr.Workflow"):
        ka.run_workflow(key, "wf", x, y, t, xt, yt, progress=False)
    wf = ka.workflow(_plain, _weights(), num_tasks=K, loss="softmax", num_heldout=3, **OPTIONS)
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        ka.run_workflow(key, wf, x, y, t, xt, yt, train_fn=lambda m: jnp.zeros(2), progress=False)
    wf = ka.workflow(_plain, _weights(), num_tasks=K, loss="softmax", **OPTIONS)
    # value checks hold under the stages' jit: raised from the compiled program, same message
    with pytest.raises((ValueError, jax.errors.JaxRuntimeError), match="task_ids.*outside"):
        ka.run_workflow(key, wf, x, y, t.at[0].set(K), xt, yt, progress=False)
    with pytest.raises(ValueError, match="labels"):  # labels of the wrong length
        ka.run_workflow(key, wf, x, y[:-1], t, xt, yt, progress=False)
    with pytest.raises(ValueError, match="both"):
        ka.run_workflow(key, wf, x, y, t, xt, yt, real_masks=jnp.ones((3, K)), progress=False)


def test_nystrom_stage_equals_public_call(runs):
    """With num_landmarks the fit stage is fit_kernel's Nystrom path (key draws the landmarks)."""
    res = runs["plain"][0]
    wf = ka.workflow(_plain, _weights(), num_tasks=K, loss="softmax", num_landmarks=8, **OPTIONS)
    key = jax.random.key(9)
    s = jax.jit(wf.fit)(res.masks, res.labels, key=key)
    kw = {k: jnp.asarray(OPTIONS[k]) for k in ("gamma", "ridge", "mix")}
    ref = jax.jit(lambda m, y, k: ka.fit_kernel(m, y, num_landmarks=8, key=k, **kw))(
        res.masks, res.labels, key)
    assert isinstance(s, ka.NystromSurrogate)
    _equal(s, ref)
    attrs = jax.jit(wf.attributions)(s)
    np.testing.assert_allclose(attrs.shapley.value, ka.shapley_values(ref), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="key"):
        wf.fit(res.masks, res.labels)


def test_as_apply_fn_linen_extra_collections_and_call_kwargs():
    class WithStats(linen.Module):
        @linen.compact
        def __call__(self, x, train: bool = True):
            x = linen.Dense(3)(x)
            return linen.BatchNorm(use_running_average=not train)(x)

    module = WithStats()
    x = jax.random.normal(jax.random.key(0), (5, 2))
    variables = module.init(jax.random.key(1), x, train=False)
    apply_fn, params = ka.as_apply_fn(module, variables, call_kwargs={"train": False})
    assert set(params) == {"Dense_0", "BatchNorm_0"} and "batch_stats" in variables
    expected = module.apply(variables, x, train=False)
    np.testing.assert_allclose(jax.vmap(apply_fn, (None, 0))(params, x), expected, rtol=1e-6)
    with pytest.raises(TypeError, match="Linen modules only"):
        ka.as_apply_fn(_plain, _weights(), call_kwargs={"train": False})
