"""The ``"exact"`` solver: line-searched inexact Newton with preconditioned conjugate gradients,
batched over masks (each mask stops on its own), and the weighted-objective helpers it shares
with the estimator.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ._losses import curvature_apply, loss_grad_curvature, loss_values
from ._solver_fast import chol_solve

__all__ = [
    "NewtonProblem", "NewtonStart", "newton_cg", "objective", "outputs_at", "weighted_grad",
]


def weighted_grad(grads, weights, r):
    """``Σ_i w_i G_iᵀ r_i`` for every mask: ``r [n, C, mc]``, weights ``[n, mc]`` -> ``[d, mc]``."""
    n, c, d = grads.shape
    wr = (r * weights[:, None, :]).reshape(n * c, -1)
    return grads.reshape(n * c, d).T @ wr


def outputs_at(grads, outputs, theta):
    """``f0 + G θ`` for every mask: ``theta [d, mc]`` -> ``[n, C, mc]``."""
    n, c, d = grads.shape
    return outputs[:, :, None] + (grads.reshape(n * c, d) @ theta).reshape(n, c, -1)


def objective(z, labels, weights, theta, ridge, loss):
    """Weighted objective ``[mc]`` at outputs ``z [n, C, mc]`` and ``theta [d, mc]``."""
    return jnp.sum(weights * loss_values(z, labels, loss), axis=0) + 0.5 * ridge * jnp.sum(
        theta * theta, axis=0
    )


class NewtonProblem(NamedTuple):
    """A chunk of ``mc`` weighted problems ``min_θ Σ_i w_i ℓ(f0_i + G_i θ, y_i) + ridge/2 ||θ||²``.

    Attributes:
      grads: ``[n, C, d]`` features ``G``.
      labels: ``[n]`` labels ``y``.
      weights: ``[n, mc]`` example weights of every mask.
      ridge: scalar ridge.
      chol: ``[mc, d, d]`` Cholesky factors of the preconditioner ``P`` (a Hessian approximation).
      singular: ``[mc]`` True where ``P`` is singular (that mask is not solved).
    """

    grads: jax.Array
    labels: jax.Array
    weights: jax.Array
    ridge: jax.Array
    chol: jax.Array
    singular: jax.Array


class NewtonStart(NamedTuple):
    """Where Newton-CG starts: ``theta [d, mc]``, its outputs ``z = f0 + G θ [n, C, mc]``, its
    gradient ``grad [d, mc]``, and ``g0norm [mc]``, the gradient norm at ``θ = 0`` (the scale of
    the CG forcing terms)."""

    theta: jax.Array
    z: jax.Array
    grad: jax.Array
    g0norm: jax.Array


class _Iterate(NamedTuple):
    theta: jax.Array  # [d, mc]
    z: jax.Array  # [n, C, mc]
    f: jax.Array  # [mc]
    grad: jax.Array  # [d, mc]
    done: jax.Array  # [mc]
    conv: jax.Array  # [mc]
    iters: jax.Array  # [mc]
    hvps: jax.Array  # [mc]
    it: jax.Array  # scalar


def _hvp(pb: NewtonProblem, curv, v, loss):
    """Hessian-vector products ``(Gᵀ W H G + ridge I) v`` for every mask; ``v [d, mc]``."""
    n, c, d = pb.grads.shape
    u = (pb.grads.reshape(n * c, d) @ v).reshape(n, c, -1)
    return weighted_grad(pb.grads, pb.weights, curvature_apply(curv, u, loss)) + pb.ridge * v


def _pcg(pb: NewtonProblem, curv, rhs, active, forcing, *, loss, max_cg):
    """Solve ``H p = rhs`` per mask to ``||res|| <= forcing ||rhs||`` by CG preconditioned with
    ``P`` (frozen when inactive); returns ``(p [d, mc], Hessian-vector products [mc])``."""
    mc = rhs.shape[1]
    target = forcing * jnp.linalg.norm(rhs, axis=0)
    zr = chol_solve(pb.chol, rhs)
    count = jnp.zeros((mc,), jnp.int32)
    init = (jnp.zeros_like(rhs), rhs, zr, jnp.sum(rhs * zr, axis=0), active, count, 0)

    def cond(cs):
        return jnp.any(cs[4]) & (cs[6] < max_cg)

    def body(cs):
        x, res, p, rz, act, count, it = cs
        hp = _hvp(pb, curv, p, loss)
        php = jnp.sum(p * hp, axis=0)
        alpha = jnp.where(act, rz / jnp.where(php > 0, php, 1.0), 0.0)
        x = x + alpha[None, :] * p
        res = res - alpha[None, :] * hp
        z_new = chol_solve(pb.chol, res)
        rz_new = jnp.sum(res * z_new, axis=0)
        beta = rz_new / jnp.where(rz > 0, rz, 1.0)
        count = count + act.astype(jnp.int32)
        act = act & (php > 0) & (jnp.linalg.norm(res, axis=0) > target)
        p = jnp.where(act[None, :], z_new + beta[None, :] * p, p)
        return x, res, p, jnp.where(act, rz_new, rz), act, count, it + 1

    out = jax.lax.while_loop(cond, body, init)
    return out[0], out[5]


def _within_tol(pb: NewtonProblem, err, theta, tol):
    """``err`` within ``tol`` of ``θ`` in the Euclidean norm or in the data norm.

    The data norm ``||v||_A = sqrt(vᵀ A v)``, ``A = P - ridge I`` the preconditioner's data
    part, measures ``v`` through the outputs on the training examples, so it is blind to
    directions no selected example sees (the null space of the features, present whenever
    ``d`` exceeds their rank). There a Newton step ``P⁻¹ ∇`` only amplifies the rounding
    noise of ``∇`` by ``1/ridge``: the Euclidean test alone would then report a converged
    answer as a failure. ``||Lᵀ v||² = vᵀ P v`` with ``P = L Lᵀ``.
    """

    def norms(v):
        lt_v = jnp.einsum("mji,jm->im", pb.chol, v)  # Lᵀ v per mask, [d, mc]
        e2 = jnp.sum(v * v, axis=0)
        a2 = jnp.maximum(jnp.sum(lt_v * lt_v, axis=0) - pb.ridge * e2, 0.0)
        return jnp.sqrt(e2), jnp.sqrt(a2)

    err_e, err_a = norms(err)
    th_e, th_a = norms(theta)
    return (err_e <= tol * th_e) | (err_a <= tol * th_a)


def _close_enough(pb: NewtonProblem, theta, grad, tol):
    """Estimated distance to the optimum, ``P⁻¹ ∇`` (a preconditioned Newton step, no
    Hessian-vector product), within ``tol`` of ``θ``; or an exactly zero gradient."""
    gnorm = jnp.linalg.norm(grad, axis=0)
    return (gnorm == 0) | _within_tol(pb, chol_solve(pb.chol, grad), theta, tol)


def _line_search(pb: NewtonProblem, st: _Iterate, step, zstep, active, loss):
    """Backtracking (Armijo) step sizes ``[mc]`` from 1, and where the search failed."""
    dtype = pb.grads.dtype
    slope = jnp.sum(st.grad * step, axis=0)
    slack = 16.0 * jnp.finfo(dtype).eps * jnp.abs(st.f)

    def ls_cond(ls):
        return jnp.any(ls[1]) & (ls[2] < 40)

    def ls_body(ls):
        alpha, searching, k = ls
        trial = objective(
            st.z + alpha[None, None, :] * zstep, pb.labels, pb.weights,
            st.theta + alpha[None, :] * step, pb.ridge, loss,
        )  # fmt: skip
        # The slack absorbs rounding of f: near the optimum the predicted decrease falls below
        # it, and a strict test would then reject good Newton steps at random.
        accept = trial <= st.f + 1e-4 * alpha * slope + slack
        searching = searching & ~accept
        return jnp.where(searching, 0.5 * alpha, alpha), searching, k + 1

    alpha, failed, _ = jax.lax.while_loop(
        ls_cond, ls_body, (jnp.ones(st.f.shape, dtype), active, 0)
    )
    return alpha, failed


def _newton_step(pb: NewtonProblem, g0norm, st: _Iterate, *, loss, tol, max_cg) -> _Iterate:
    """One line-searched Newton-CG iteration of every active mask."""
    n, c, d = pb.grads.shape
    mc = st.theta.shape[1]
    active = ~st.done
    gnorm = jnp.linalg.norm(st.grad, axis=0)
    tiny = jnp.finfo(pb.grads.dtype).tiny

    def newton_cg_step():
        _, curv = loss_grad_curvature(st.z, pb.labels, loss)
        forcing = jnp.minimum(0.5, jnp.sqrt(gnorm / jnp.maximum(g0norm, tiny)))
        return _pcg(pb, curv, -st.grad, active, forcing, loss=loss, max_cg=max_cg)

    def preconditioner_step():
        # First iteration: the preconditioner is the exact Hessian at the anchor (and, for
        # squared loss, everywhere), so its Newton step needs no Hessian-vector product.
        return -chol_solve(pb.chol, st.grad), jnp.zeros((mc,), jnp.int32)

    step, used = jax.lax.cond(st.it == 0, preconditioner_step, newton_cg_step)
    zstep = (pb.grads.reshape(n * c, d) @ step).reshape(n, c, mc)
    alpha, failed = _line_search(pb, st, step, zstep, active, loss)
    upd = active & ~failed
    alpha = jnp.where(upd, alpha, 0.0)
    theta_new = st.theta + alpha[None, :] * step
    z_new = st.z + alpha[None, None, :] * zstep
    f_new = objective(z_new, pb.labels, pb.weights, theta_new, pb.ridge, loss)
    r_new, _ = loss_grad_curvature(z_new, pb.labels, loss)
    grad_new = weighted_grad(pb.grads, pb.weights, r_new) + pb.ridge * theta_new
    # Converged: the estimated distance to the optimum is <= tol relative to θ, or the full
    # Newton step just taken was (the error after it is then far smaller). A failed line
    # search means nothing better is representable: that mask stops, converged only by
    # these criteria (float32 gradients stall at a rounding floor of about 1e-5 relative).
    small_step = (alpha == 1.0) & _within_tol(pb, step, theta_new, tol)
    conv_new = st.conv | (upd & (_close_enough(pb, theta_new, grad_new, tol) | small_step))
    return _Iterate(
        jnp.where(upd[None, :], theta_new, st.theta),
        jnp.where(upd[None, None, :], z_new, st.z),
        jnp.where(upd, f_new, st.f),
        jnp.where(upd[None, :], grad_new, st.grad),
        st.done | failed | conv_new,
        conv_new,
        st.iters + active.astype(jnp.int32),
        st.hvps + used,
        st.it + 1,
    )


def newton_cg(pb: NewtonProblem, start: NewtonStart, *, loss, max_iter, tol):
    """Line-searched inexact Newton, Newton systems by preconditioned CG, batched over masks.

    Every mask stops on its own (its iterates are frozen), so results do not depend on the
    other masks of the chunk. Returns ``(theta [d, mc], ok [mc], iterations [mc],
    gradient norm [mc], Hessian-vector products [mc])``.
    """
    d = pb.grads.shape[2]
    mc = start.theta.shape[1]
    max_cg = max(10, min(d, 100))
    f = objective(start.z, pb.labels, pb.weights, start.theta, pb.ridge, loss)
    conv = (start.g0norm == 0) | _close_enough(pb, start.theta, start.grad, tol)
    zeros = jnp.zeros((mc,), jnp.int32)
    st0 = _Iterate(start.theta, start.z, f, start.grad, pb.singular | conv, conv, zeros, zeros, 0)
    st = jax.lax.while_loop(
        lambda st: jnp.any(~st.done) & (st.it < max_iter),
        lambda st: _newton_step(pb, start.g0norm, st, loss=loss, tol=tol, max_cg=max_cg),
        st0,
    )
    gnorm = jnp.linalg.norm(st.grad, axis=0)
    ok = ~pb.singular & st.conv & jnp.all(jnp.isfinite(st.theta), axis=0)
    return st.theta, ok, st.iters, gnorm, st.hvps
