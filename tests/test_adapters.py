"""Adapters: from_nnx (pure apply_fn, no mutation, filters) and the transformer's output functions."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kernattr.adapters import OUTPUTS, Transformer, answer_fn, answer_output, from_nnx


def _model(seed=0, **kw):
    return Transformer(vocab_size=8, num_classes=7, seq_len=3, d_model=8, num_heads=2,
                       d_mlp=16, rngs=nnx.Rngs(seed), **kw)


def _tokens(n=5, seed=0):
    return jax.random.randint(jax.random.key(seed), (n, 3), 0, 8)


class _Drop(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(3, 4, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(self.drop(jax.nn.relu(self.lin(x))))


def test_apply_fn_equals_module_forward_under_jit_and_vmap():
    model = _model()
    apply_fn, params = from_nnx(model)
    toks = _tokens()
    expected = np.asarray(model(toks))
    got = jax.jit(jax.vmap(apply_fn, in_axes=(None, 0)))(params, toks)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-5, atol=2e-5)
    one = jax.jit(apply_fn)(params, toks[0])
    np.testing.assert_allclose(np.asarray(one), expected[0], rtol=2e-5, atol=2e-5)


def test_gradients_match_module_gradients():
    model = _Drop(nnx.Rngs(1))
    apply_fn, params = from_nnx(model)
    x = jnp.arange(3.0)
    g = jax.grad(lambda p: apply_fn(p, x)[1])(params)
    view = nnx.view(model, deterministic=True)
    g_ref = nnx.grad(lambda m: m(x[None])[0, 1])(view)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(nnx.state(g_ref, nnx.Param))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_model_not_mutated_and_deterministic_view():
    model = _Drop(nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    apply_fn, params = from_nnx(model, deterministic=True)
    assert model.drop.deterministic is False  # the user's flag is untouched
    x = jnp.ones(3)
    y1 = apply_fn(params, x)
    y2 = apply_fn(params, x)  # deterministic: dropout off, same answer twice
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))
    view = nnx.view(model, deterministic=True)
    np.testing.assert_allclose(np.asarray(y1), np.asarray(view(x[None])[0]), rtol=1e-6)
    shifted = jax.tree.map(lambda p: p + 1.0, params)
    apply_fn(shifted, x)
    after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)


def test_filter_selects_linearized_parameters():
    model = _model()
    f_all, p_all = from_nnx(model)
    f_head, p_head = from_nnx(model, filter=nnx.All(nnx.Param, nnx.PathContains("unembed")))
    sizes = [x.size for x in jax.tree.leaves(p_head)]
    assert sum(sizes) == 8 * 7 + 7  # unembedding kernel + bias only
    x = _tokens(1)[0]
    np.testing.assert_allclose(np.asarray(f_head(p_head, x)), np.asarray(f_all(p_all, x)),
                               rtol=1e-6)
    # the output is affine in the unembedding: grad w.r.t. the bias is one-hot
    g = jax.grad(lambda p: f_head(p, x)[2])(p_head)
    bias_grad = [np.asarray(v) for v in jax.tree.leaves(g) if np.ndim(v) == 1][0]
    np.testing.assert_allclose(bias_grad, np.eye(7)[2], atol=1e-6)


def test_no_retrace_across_params():
    traces = []

    def f(p, x):
        traces.append(1)
        return apply_fn(p, x)

    jf = jax.jit(f)
    apply_fn, params = from_nnx(_Drop(nnx.Rngs(0)))
    x = jnp.ones(3)
    jf(params, x)
    jf(jax.tree.map(lambda p: p * 2.0, params), x)
    assert len(traces) == 1


def test_bad_input():
    with pytest.raises(TypeError, match="module"):
        from_nnx(lambda x: x)
    with pytest.raises(ValueError, match="filter"):
        from_nnx(_model(), filter=nnx.PathContains("no_such_layer"))
    with pytest.raises(ValueError, match="tokens"):
        _model()(jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="d_model"):
        Transformer(vocab_size=4, num_classes=3, seq_len=3, d_model=9, num_heads=2,
                    rngs=nnx.Rngs(0))
    f, p = from_nnx(_model())
    with pytest.raises(ValueError, match="output"):
        answer_fn(f, output="prob")
    with pytest.raises(ValueError, match="example"):
        answer_fn(f)(p, jnp.zeros((2, 4), jnp.int32))


@pytest.mark.parametrize("output", OUTPUTS)
def test_answer_outputs_against_numpy(output):
    logits = np.array([0.3, 2.0, -1.0, 1.5], np.float32)
    y = 1
    got = np.asarray(jax.jit(answer_output, static_argnums=2)(jnp.asarray(logits), jnp.array(y), output))
    prob = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    expected = {
        "logits": logits,
        "logit": logits[y],
        "margin": logits[y] - np.max(np.delete(logits, y)),
        "logodds": np.log(prob[y]) - np.log1p(-prob[y]),
    }[output]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_answer_fn_reads_label_from_example_and_vmaps():
    w = jax.random.normal(jax.random.key(0), (3, 7))
    f = lambda p, toks: toks.astype(jnp.float32) @ p  # noqa: E731  (tokens [3] -> logits [7])
    toks = _tokens(4)
    labels = jnp.array([0, 3, 6, 2])
    ex = jnp.concatenate([toks, labels[:, None]], axis=1)
    logits = np.asarray(toks, np.float32) @ np.asarray(w)
    got = jax.jit(jax.vmap(answer_fn(f, output="logit"), in_axes=(None, 0)))(w, ex)
    np.testing.assert_allclose(np.asarray(got), logits[np.arange(4), labels], rtol=1e-5)


def test_adapters_import_without_flax():
    code = ("import sys; import kernattr.adapters as a; import kernattr.experiments; "
            "import kernattr.cli; assert 'flax' not in sys.modules; print(sorted(a.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "from_nnx" in out.stdout
