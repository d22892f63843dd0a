"""SAC in Flax NNX: the models and attribution adapters (kernattr.adapters) and the pure
training steps built on them (kernattr.experiments.sac)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kernattr as ka
from kernattr.adapters import (
    Batch, make_sac, pack_examples, sac_output_fn, squash, tanh_gaussian_log_prob,
    actor_mean_labels,
)
from kernattr.experiments.sac import make_train_step, sac_losses, td_targets

O, Z, A, B = 3, 2, 2, 12


@pytest.fixture(scope="module")
def agent():
    return make_sac(jax.random.key(0), obs_dim=O, task_dim=Z, act_dim=A, hidden=(8, 8))


@pytest.fixture(scope="module")
def batch():
    k = jax.random.split(jax.random.key(1), 4)
    return Batch(jax.random.normal(k[0], (B, O)), jax.nn.one_hot(jnp.arange(B) % Z, Z),
                 0.9 * jnp.tanh(jax.random.normal(k[1], (B, A))), jax.random.normal(k[2], (B,)),
                 jax.random.normal(k[3], (B, O)), (jnp.arange(B) % 5 == 0).astype(jnp.float32))


def _np_tanh_gauss_logpdf(mean, log_std, a):
    u = np.arctanh(a)
    sd = np.exp(log_std)
    logn = -0.5 * ((u - mean) / sd) ** 2 - np.log(sd) - 0.5 * np.log(2 * np.pi)
    return np.sum(logn - np.log(1 - a**2), axis=-1)


def test_log_prob_matches_numpy_oracle(agent, batch):
    sac, p = agent
    mean, log_std = sac.actor(p.actor, batch.obs, batch.task)
    got = jax.jit(tanh_gaussian_log_prob)(mean, log_std, batch.action)
    want = _np_tanh_gauss_logpdf(np.asarray(mean, np.float64), np.asarray(log_std, np.float64),
                                 np.asarray(batch.action, np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # the sampler's density is the density of the action it returns
    eps = jax.random.normal(jax.random.key(2), mean.shape)
    a, lp = squash(mean, log_std, 0.5 * eps)
    np.testing.assert_allclose(lp, tanh_gaussian_log_prob(mean, log_std, a), rtol=1e-4, atol=1e-4)
    assert np.all(np.abs(np.asarray(log_std)) <= 5.0)


def test_log_prob_adapter_matches_model(agent, batch):
    sac, p = agent
    fn, sel = sac_output_fn(sac, p, output="log_prob", filter="actor")
    ex = pack_examples(batch, output="log_prob")
    got = jax.jit(jax.vmap(fn, in_axes=(None, 0)))(sel, ex)
    mean, log_std = sac.actor(p.actor, batch.obs, batch.task)
    want = _np_tanh_gauss_logpdf(np.asarray(mean), np.asarray(log_std), np.asarray(batch.action))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # Q adapter = mean of the twin heads; critic loss against given TD targets
    fq, selq = sac_output_fn(sac, p, output="q", filter="critic")
    q = sac.q(p.critic, batch.obs, batch.task, batch.action)
    np.testing.assert_allclose(jax.vmap(fq, in_axes=(None, 0))(selq, pack_examples(batch, output="q")),
                               q.mean(-1), rtol=1e-5, atol=1e-6)
    y = td_targets(sac, p, batch, jax.random.key(3))
    fc, selc = sac_output_fn(sac, p, output="critic_loss", filter="all")
    exc = pack_examples(batch, output="critic_loss", td_target=y)
    np.testing.assert_allclose(jax.vmap(fc, in_axes=(None, 0))(selc, exc),
                               0.5 * jnp.sum((q - y[:, None]) ** 2, -1), rtol=1e-5, atol=1e-5)


def test_actor_mean_adapter_and_projected_gradients_vs_jacrev(agent, batch):
    sac, p = agent
    fn, sel = sac_output_fn(sac, p, output="actor_mean", filter="last")
    ex = pack_examples(batch, output="actor_mean")
    assert ex.shape == (B * A, O + Z + A)
    mean = sac.actor(p.actor, batch.obs, batch.task)[0]
    np.testing.assert_allclose(jax.vmap(fn, in_axes=(None, 0))(sel, ex), mean.reshape(-1), rtol=1e-5)
    labels = actor_mean_labels(batch)
    np.testing.assert_allclose(labels, np.arctanh(np.asarray(batch.action)).reshape(-1), rtol=1e-4)
    proj = ka.make_projector(jax.random.key(0), sel, kind="identity", dim=None)
    feats = jax.jit(lambda s, x, y: ka.gradient_features(fn, s, x, y, proj))(sel, ex, labels)
    jac = jax.jacrev(lambda s: jax.vmap(fn, in_axes=(None, 0))(s, ex))(sel)
    flat = jnp.concatenate([jac[k].reshape(B * A, -1) for k in sorted(jac)], axis=1)
    # identity projector flattens leaves in pytree (sorted-key) order
    np.testing.assert_allclose(feats.grads, flat, rtol=1e-5, atol=1e-6)
    # last-layer oracle: d mean_j / d mean_head.kernel[:, j] = hidden activation, other columns 0
    kname = [k for k in sel if "mean_head" in k and "kernel" in k][0]
    h = jnp.concatenate([batch.obs, batch.task], -1)
    from flax import nnx
    actor = nnx.merge(sac.actor_def, p.actor)
    for layer in actor.hidden:
        h = jax.nn.relu(layer(h))
    gk = jac[kname].reshape(B, A, -1, A)  # [B, j, H, A]
    for j in range(A):
        np.testing.assert_allclose(gk[:, j, :, j], h, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(gk[:, j, :, 1 - j], 0.0, atol=1e-7)


@pytest.mark.parametrize("output,filt,zero", [
    ("q", "actor", True), ("log_prob", "critic", True), ("actor_loss", "critic", False),
    ("critic_loss", "last", False),
])
def test_filter_selects_and_zeroes(agent, batch, output, filt, zero):
    sac, p = agent
    fn, sel = sac_output_fn(sac, p, output=output, filter=filt)
    prefix = {"actor": ".actor", "critic": ".critic"}.get(filt)
    if prefix:
        assert all(k.startswith(prefix) for k in sel)
    else:
        assert all("_out" in k or "head" in k for k in sel) and not any("target" in k for k in sel)
    kw = {"td_target": jnp.zeros(B)} if output == "critic_loss" else {}
    kw = {"noise": jnp.zeros((B, A))} if output == "actor_loss" else kw
    ex = pack_examples(batch, output=output, **kw)
    g = jax.grad(fn)(sel, ex[0])
    total = sum(float(jnp.sum(jnp.abs(v))) for v in g.values())
    assert (total == 0.0) == zero


def test_train_step_vmap_over_weights_equals_loop_and_trains(agent, batch):
    sac, p = agent
    init, step = make_train_step(sac, actor_optimizer=optax.adam(3e-2),
                                 critic_optimizer=optax.adam(3e-2), alpha_optimizer=optax.adam(1e-2),
                                 bc_weight=1.0, q_weight=0.5, prox=0.1, gamma=0.5)
    W = jnp.stack([jnp.ones(B) / B, (jnp.arange(B) < 6) / 6.0, jnp.zeros(B)])
    states = jax.vmap(init)(jax.tree.map(lambda x: jnp.broadcast_to(x, (3,) + x.shape), p))
    vstep = jax.jit(jax.vmap(step, in_axes=(0, None, 0, None)))
    key = jax.random.key(4)
    hist = []
    for i in range(6):
        states, losses = vstep(states, batch, W, jax.random.fold_in(key, i))
        hist.append(losses)
    one = jax.jit(step)
    s1 = init(p)
    for i in range(6):
        s1, _ = one(s1, batch, W[1], jax.random.fold_in(key, i))
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(states.params)):
        np.testing.assert_allclose(a, b[1], rtol=1e-4, atol=1e-5)
    # the all-zero mask trains nothing: actor and critic stay at W0
    for a, b in zip(jax.tree.leaves(p.actor), jax.tree.leaves(states.params.actor)):
        np.testing.assert_allclose(b[2], a, atol=1e-7)
    assert float(jnp.abs(states.params.log_alpha[0] - p.log_alpha)) > 0
    assert int(states.step[0]) == 6
    # it trains: behaviour-cloning and critic losses fall on the full mask
    assert float(hist[-1]["bc"][0]) < 0.7 * float(hist[0]["bc"][0])
    assert float(hist[-1]["critic"][0]) < float(hist[0]["critic"][0])
    # negative weights under jit poison the step (NaN), never a silent number
    bad, _ = one(init(p), batch, -jnp.ones(B), key)
    assert not np.isfinite(np.asarray(bad.params.log_alpha))


def test_bad_input(agent, batch):
    sac, p = agent
    with pytest.raises(ValueError, match="output"):
        sac_output_fn(sac, p, output="value")
    with pytest.raises(ValueError, match="filter"):
        sac_output_fn(sac, p, output="q", filter="encoder")
    fn, sel = sac_output_fn(sac, p, output="q")
    with pytest.raises(ValueError, match="example"):
        fn(sel, jnp.ones(O))
    with pytest.raises(ValueError, match="gamma"):
        td_targets(sac, p, batch, jax.random.key(0), gamma=1.0)
    with pytest.raises(ValueError, match="prox"):
        make_train_step(sac, actor_optimizer=optax.sgd(1.0), critic_optimizer=optax.sgd(1.0),
                        prox=-1.0)
    with pytest.raises(ValueError, match="td_target"):
        pack_examples(batch, output="critic_loss")
    with pytest.raises(TypeError, match="key"):
        make_sac(0, obs_dim=1, task_dim=1, act_dim=1)
    bad = -jnp.ones(B)
    with pytest.raises(ValueError, match="weights"):
        sac_losses(sac, p, batch, bad, jax.random.key(0))
    with pytest.raises(Exception, match="weights"):
        jax.block_until_ready(jax.jit(lambda w: sac_losses(sac, p, batch, w, jax.random.key(0)))(bad))
    with pytest.raises(ValueError, match="obs"):
        sac_losses(sac, p, batch._replace(obs=batch.obs[:, :2]), jnp.ones(B), jax.random.key(0))
