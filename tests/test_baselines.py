"""Tests for the task-level attribution baselines (influence, TRAK, TracIn) against numpy oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

import kernattr as ka

K = 4


def _features(loss, n=20, T=5, d=6, C=3, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    shape = (n, d) if loss != "softmax" else (n, C, d)
    G = rng.normal(size=shape).astype(dtype)
    Gt = rng.normal(size=(T,) + shape[1:]).astype(dtype)
    f0 = 0.5 * rng.normal(size=shape[:-1]).astype(dtype)
    ft = 0.5 * rng.normal(size=(T,) + shape[1:-1]).astype(dtype)
    if loss == "squared":
        y, yt = rng.normal(size=n).astype(dtype), rng.normal(size=T).astype(dtype)
    elif loss == "logistic":
        y, yt = rng.integers(0, 2, n).astype(dtype), rng.integers(0, 2, T).astype(dtype)
    else:
        y, yt = rng.integers(0, C, n), rng.integers(0, C, T)
    tid = rng.permutation(np.arange(n) % K)
    train = ka.GradientFeatures(jnp.asarray(G), jnp.asarray(f0), jnp.asarray(y), jnp.asarray(tid))
    target = ka.GradientFeatures(jnp.asarray(Gt), jnp.asarray(ft), jnp.asarray(yt))
    return train, target


def _np(train):
    G = np.asarray(train.grads, float)
    f = np.asarray(train.outputs, float)
    if G.ndim == 2:
        G, f = G[:, None, :], f[:, None]
    return G, f, np.asarray(train.labels)


def _np_out_grad(f, y, loss, metric):
    """Closed-form ∇_f of the loss / metric per example, [n, C]."""
    n, C = f.shape
    if loss == "squared":
        if metric == "loss":
            return f - y[:, None]
        if metric == "margin":
            return -np.sign(f - y[:, None])
        return np.ones_like(f)
    if loss == "logistic":
        z = 2 * y[:, None] - 1
        if metric == "loss":
            return scipy.special.expit(f) - y[:, None]
        if metric == "margin":
            return z.astype(float)
        return np.ones_like(f)
    e = np.eye(C)[y.astype(int)]
    p = scipy.special.softmax(f, axis=1)
    if metric == "loss":
        return p - e
    if metric == "margin":
        other = np.where(e > 0, -np.inf, f).argmax(1)
        return e - np.eye(C)[other]
    return e


def _np_hess(f, loss):
    n, C = f.shape
    if loss == "squared":
        return np.broadcast_to(np.eye(C), (n, C, C))
    if loss == "logistic":
        p = scipy.special.expit(f)
        return (p * (1 - p))[:, :, None]
    p = scipy.special.softmax(f, axis=1)
    return np.stack([np.diag(pi) - np.outer(pi, pi) for pi in p])


def _np_influence(train, target, loss, metric, damping):
    G, f, y = _np(train)
    Gt, ft, yt = _np(target)
    tid = np.asarray(train.task_ids)
    counts = np.bincount(tid, minlength=K)
    w = 1.0 / (K * counts[tid])
    h = _np_hess(f, loss)
    H = sum(w[i] * G[i].T @ h[i] @ G[i] for i in range(len(w))) + damping * np.eye(G.shape[-1])
    g = np.einsum("nc,ncd->nd", _np_out_grad(f, y, loss, "loss"), G)
    phi = np.einsum("tc,tcd->td", _np_out_grad(ft, yt, loss, metric), Gt)
    scores = np.zeros((K, len(yt)))
    for k in range(K):
        w_minus = np.where(tid == k, 0.0, 1.0 / ((K - 1) * counts[tid]))
        delta = (w_minus - w) @ g
        scores[k] = phi @ np.linalg.solve(H, delta)
    return scores


@pytest.mark.parametrize(
    "loss,metric",
    [("squared", "loss"), ("squared", "output"), ("logistic", "loss"), ("logistic", "margin"),
     ("softmax", "loss"), ("softmax", "margin"), ("softmax", "output")],
)
def test_influence_equals_numpy_closed_form(x64, loss, metric):
    train, target = _features(loss)
    got = ka.influence_scores(train, target, loss=loss, metric=metric, damping=0.05)
    np.testing.assert_allclose(got, _np_influence(train, target, loss, metric, 0.05), rtol=1e-9, atol=1e-11)


def _stationary_squared(n_per=6, K_=20, d=5, T=4, seed=0):
    """Squared-loss features whose base outputs are the optimum of the all-tasks objective."""
    rng = np.random.default_rng(seed)
    n = n_per * K_
    G = rng.normal(size=(n, d))
    tid = np.arange(n) % K_
    w = 1.0 / (K_ * n_per) * np.ones(n)
    y = rng.normal(size=n)
    # Residuals r = f0 - y orthogonal to the weighted gradient span: Σ w_i G_i r_i = 0.
    r = rng.normal(size=n)
    A = (w[:, None] * G).T  # [d, n]
    r = r - A.T @ np.linalg.lstsq(A @ A.T, A @ r, rcond=None)[0]
    f0 = y + 0.3 * r
    Gt, ft = rng.normal(size=(T, d)), rng.normal(size=T)
    yt = rng.normal(size=T)
    return G, f0, y, tid, Gt, ft, yt


def _refit_outputs(G, f0, y, w, Gt, ft, ridge):
    """Exact task-weighted ridge refit of the linear model; returns target outputs."""
    H = G.T @ (w[:, None] * G) + ridge * np.eye(G.shape[1])
    theta = np.linalg.solve(H, G.T @ (w * (y - f0)))
    return ft + Gt @ theta


def test_influence_is_first_order_refit_change(x64):
    G, f0, y, tid, Gt, ft, yt = _stationary_squared()
    K_ = 20
    ridge = 0.01
    counts = np.bincount(tid)
    train = ka.GradientFeatures(jnp.asarray(G), jnp.asarray(f0), jnp.asarray(y), jnp.asarray(tid))
    target = ka.GradientFeatures(jnp.asarray(Gt), jnp.asarray(ft), jnp.asarray(yt))
    w_all = 1.0 / (K_ * counts[tid])
    for metric in ("output", "loss"):
        scores = np.asarray(ka.influence_scores(train, target, loss="squared", metric=metric, damping=ridge))

        def F(w):
            out = _refit_outputs(G, f0, y, w, Gt, ft, ridge)
            return out if metric == "output" else 0.5 * (out - yt) ** 2

        actual = np.zeros_like(scores)
        for k in range(K_):
            w_minus = np.where(tid == k, 0.0, 1.0 / ((K_ - 1) * counts[tid]))
            eps = 1e-5  # exact first order: −dF/dε along the removal direction
            deriv = (F(w_all + eps * (w_minus - w_all)) - F(w_all - eps * (w_minus - w_all))) / (2 * eps)
            np.testing.assert_allclose(scores[k], -deriv, rtol=1e-5, atol=1e-9)
            actual[k] = F(w_all) - F(w_minus)  # the real leave-one-task-out change
        # Small-effect regime (K=20): the first-order prediction tracks the real refit.
        assert np.corrcoef(scores.ravel(), actual.ravel())[0, 1] > 0.98
        assert np.linalg.norm(scores - actual) < 0.25 * np.linalg.norm(actual)


def _np_trak(train, target, loss, metric, damping, weighting):
    G, f, y = _np(train)
    Gt, ft, yt = _np(target)
    tid = np.asarray(train.task_ids)
    counts = np.bincount(tid, minlength=K)
    if loss == "squared":
        phi, q = G[:, 0], y - f[:, 0]
    elif loss == "logistic":
        z = 2 * y - 1
        phi, q = z[:, None] * G[:, 0], 1 - scipy.special.expit(z * f[:, 0])
    else:
        p = scipy.special.softmax(f, axis=1)
        yy = y.astype(int)
        py = p[np.arange(len(yy)), yy]
        logodds_grad = (np.eye(f.shape[1])[yy] - p) / (1 - py)[:, None]
        phi, q = np.einsum("nc,ncd->nd", logodds_grad, G), 1 - py
    omega = np.ones(len(tid)) if weighting == "sum" else 1.0 / (K * counts[tid])
    psi = np.einsum("tc,tcd->td", _np_out_grad(ft, yt, loss, metric), Gt)
    M = np.linalg.inv(phi.T @ phi + len(tid) * damping * np.eye(phi.shape[1]))
    return np.stack([psi @ M @ ((omega * q * (tid == k)) @ phi) for k in range(K)])


@pytest.mark.parametrize("loss", ["squared", "logistic", "softmax"])
@pytest.mark.parametrize("weighting", ["sum", "task"])
def test_trak_equals_numpy(x64, loss, weighting):
    train, target = _features(loss)
    for metric, damping in (("loss", 0.0), ("margin", 0.3)):
        got = ka.trak_scores(train, target, loss=loss, metric=metric, damping=damping, weighting=weighting)
        expect = _np_trak(train, target, loss, metric, damping, weighting)
        np.testing.assert_allclose(got, expect, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("loss", ["squared", "logistic", "softmax"])
def test_trak_weights_times_features_are_minus_loss_gradients(x64, loss):
    from kernattr._baselines import loss_grads, trak_features
    from kernattr.labels._estimation import check_feature_pair

    train, _ = _features(loss)
    (G, f0, y, _), _ = check_feature_pair(train, train, loss)
    phi, q = trak_features(G, f0, y, loss)
    np.testing.assert_allclose(q[:, None] * phi, -loss_grads(G, f0, y, loss), rtol=1e-10, atol=1e-12)


def test_trak_rank_deficient_gram_uses_pseudo_inverse(x64):
    train, target = _features("logistic", n=4, d=6)  # n < d: ΦᵀΦ singular
    got = ka.trak_scores(train, target, loss="logistic")
    G, f, y = _np(train)
    z = 2 * y - 1
    phi, q = z[:, None] * G[:, 0], 1 - scipy.special.expit(z * f[:, 0])
    Gt, ft, yt = _np(target)
    psi = np.einsum("tc,tcd->td", _np_out_grad(ft, yt, "logistic", "loss"), Gt)
    tid = np.asarray(train.task_ids)
    expect = np.stack([psi @ np.linalg.pinv(phi.T @ phi) @ ((q * (tid == k)) @ phi) for k in range(K)])
    np.testing.assert_allclose(got, expect, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("loss", ["squared", "logistic", "softmax"])
def test_tracin_equals_numpy(x64, loss):
    train, target = _features(loss)
    G, f, y = _np(train)
    Gt, ft, yt = _np(target)
    tid = np.asarray(train.task_ids)
    counts = np.bincount(tid, minlength=K)
    g = np.einsum("nc,ncd->nd", _np_out_grad(f, y, loss, "loss"), G)
    for metric in ("loss", "output"):
        psi = np.einsum("tc,tcd->td", _np_out_grad(ft, yt, loss, metric), Gt)
        for weighting, omega in (("sum", np.ones(len(tid))), ("task", 1.0 / (K * counts[tid]))):
            expect = np.stack([-0.1 * psi @ ((omega * (tid == k)) @ g) for k in range(K)])
            got = ka.tracin_scores(train, target, loss=loss, metric=metric, learning_rate=0.1, weighting=weighting)
            np.testing.assert_allclose(got, expect, rtol=1e-9, atol=1e-12)


def test_helpful_task_gets_negative_loss_score():
    # Task 0 holds copies of the target example; tasks 1 and 2 are unrelated noise.
    rng = np.random.default_rng(0)
    d = 4
    g_t = np.array([1.0, 0.5, 0.0, 0.0], np.float32)
    noise = rng.normal(size=(10, d)).astype(np.float32) * np.array([0, 0, 1, 1], np.float32)
    G = np.concatenate([np.tile(g_t, (5, 1)), noise])
    f0 = np.zeros(15, np.float32)
    y = np.concatenate([np.ones(5), rng.normal(size=10)]).astype(np.float32)
    tid = np.array([0] * 5 + [1] * 5 + [2] * 5)
    train = ka.GradientFeatures(jnp.asarray(G), jnp.asarray(f0), jnp.asarray(y), jnp.asarray(tid))
    target = ka.GradientFeatures(jnp.asarray(g_t[None]), jnp.zeros(1), jnp.ones(1))
    for fn, kw in ((ka.influence_scores, dict(damping=0.1)), (ka.trak_scores, dict(damping=0.1)),
                   (ka.tracin_scores, {})):
        s = np.asarray(fn(train, target, loss="squared", **kw))
        assert s[0, 0] < 0 and abs(s[1, 0]) < abs(s[0, 0]), fn.__name__
        s_out = np.asarray(fn(train, target, loss="squared", metric="output", **kw))
        assert s_out[0, 0] > 0, fn.__name__


def test_jit_no_retrace_and_vmap():
    train, target = _features("softmax", dtype=np.float32)
    traces = []

    def all_scores(tr, tg):
        traces.append(1)
        return (
            ka.influence_scores(tr, tg, loss="softmax", damping=0.1, num_tasks=K),
            ka.trak_scores(tr, tg, loss="softmax", damping=0.1, num_tasks=K),
            ka.tracin_scores(tr, tg, loss="softmax", num_tasks=K),
        )

    jitted = jax.jit(all_scores)
    got = jitted(train, target)
    G, f, y = _np(train)
    Gt, ft, yt = _np(target)
    tid = np.asarray(train.task_ids)
    g = np.einsum("nc,ncd->nd", _np_out_grad(f, y, "softmax", "loss"), G)
    psi = np.einsum("tc,tcd->td", _np_out_grad(ft, yt, "softmax", "loss"), Gt)
    w = 1.0 / (K * np.bincount(tid)[tid])
    expect = (
        _np_influence(train, target, "softmax", "loss", 0.1),
        _np_trak(train, target, "softmax", "loss", 0.1, "sum"),
        np.stack([-psi @ ((w * (tid == k)) @ g) for k in range(K)]),
    )
    for a, b in zip(got, expect):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-5)
    jitted(train._replace(grads=train.grads * 1.1), target)
    assert len(traces) == 1
    # vmap over checkpoints: TracIn summed over two checkpoints equals the sum of the two calls.
    stacked = jax.tree.map(lambda a: jnp.stack([a, a]), train)
    stacked = stacked._replace(grads=stacked.grads * jnp.array([1.0, 2.0])[:, None, None, None])
    per_ckpt = jax.vmap(lambda tr: ka.tracin_scores(tr, target, loss="softmax", num_tasks=K))(stacked)
    np.testing.assert_allclose(per_ckpt[1], 2 * per_ckpt[0], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="num_tasks"):
        jax.jit(lambda tr: ka.tracin_scores(tr, target, loss="softmax"))(train)


def test_bad_input():
    train, target = _features("squared", dtype=np.float32)
    kw = dict(loss="squared", damping=0.1)
    with pytest.raises(ValueError, match="task_ids"):
        ka.influence_scores(train._replace(task_ids=None), target, **kw)
    with pytest.raises(ValueError, match="target.grads"):
        ka.influence_scores(train, target._replace(grads=target.grads[:, :3]), **kw)
    with pytest.raises(ValueError, match="no examples"):
        ka.influence_scores(train, target, num_tasks=K + 1, **kw)
    with pytest.raises(ValueError, match="task_ids"):
        ka.influence_scores(train, target, num_tasks=K - 1, **kw)
    with pytest.raises(ValueError, match="damping"):
        ka.influence_scores(train, target, loss="squared", damping=-1.0)
    with pytest.raises(TypeError, match="damping"):
        ka.influence_scores(train, target, loss="squared", damping=None)
    with pytest.raises(ValueError, match="weighting"):
        ka.trak_scores(train, target, loss="squared", weighting="mean")
    with pytest.raises(ValueError, match="loss"):
        ka.tracin_scores(train, target, loss="hinge")
    with pytest.raises(ValueError, match="metric"):
        ka.tracin_scores(train, target, loss="squared", metric="accuracy")
    with pytest.raises(ValueError, match="non-finite"):
        ka.tracin_scores(train._replace(grads=train.grads.at[0, 0].set(jnp.nan)), target, loss="squared")
    with pytest.raises(ValueError, match="train.grads"):
        ka.tracin_scores(train, target, loss="softmax")
    with pytest.raises(TypeError, match="train"):
        ka.trak_scores((train.grads, train.outputs), target, loss="squared")
    with pytest.raises(ValueError, match="learning_rate"):
        ka.tracin_scores(train, target, loss="squared", learning_rate=jnp.ones(2))
