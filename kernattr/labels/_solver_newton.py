"""The ``"exact"`` solver: line-searched inexact Newton with preconditioned conjugate gradients,
batched over masks (each mask stops on its own), and the weighted-objective helpers it shares
with the estimator.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._losses import curvature_apply, loss_grad_curvature, loss_values
from ._solver_fast import chol_solve

__all__ = ["newton_cg", "objective", "outputs_at", "weighted_grad"]


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


def newton_cg(
    grads, labels, weights, chol, g0norm, singular, theta, z, grad, ridge, *, loss, max_iter, tol
):
    """Line-searched inexact Newton, Newton systems by preconditioned CG, batched over masks.

    ``theta [d, mc]``, ``z = f0 + G theta [n, C, mc]`` and ``grad [d, mc]`` are the start;
    ``chol [mc, d, d]`` the preconditioner's Cholesky factors. Every mask stops on its own (its
    iterates are frozen), so results do not depend on the other masks of the chunk.
    """
    dtype = grads.dtype
    n, c, d = grads.shape
    mc = theta.shape[1]
    max_cg = max(10, min(d, 100))
    tiny = jnp.finfo(dtype).tiny
    gflat = grads.reshape(n * c, d)

    def hvp(state, v):
        u = (gflat @ v).reshape(n, c, mc)
        return weighted_grad(grads, weights, curvature_apply(state, u, loss)) + ridge * v

    def pcg(state, rhs, active, forcing):
        """Solve H p = rhs per mask to ``||res|| <= forcing ||rhs||`` (frozen when inactive)."""
        target = forcing * jnp.linalg.norm(rhs, axis=0)
        zr = chol_solve(chol, rhs)
        count = jnp.zeros((mc,), jnp.int32)
        init = (jnp.zeros_like(rhs), rhs, zr, jnp.sum(rhs * zr, axis=0), active, count, 0)

        def cond(cs):
            return jnp.any(cs[4]) & (cs[6] < max_cg)

        def body(cs):
            x, res, p, rz, act, count, it = cs
            hp = hvp(state, p)
            php = jnp.sum(p * hp, axis=0)
            alpha = jnp.where(act, rz / jnp.where(php > 0, php, 1.0), 0.0)
            x = x + alpha[None, :] * p
            res = res - alpha[None, :] * hp
            z_new = chol_solve(chol, res)
            rz_new = jnp.sum(res * z_new, axis=0)
            beta = rz_new / jnp.where(rz > 0, rz, 1.0)
            count = count + act.astype(jnp.int32)
            act = act & (php > 0) & (jnp.linalg.norm(res, axis=0) > target)
            p = jnp.where(act[None, :], z_new + beta[None, :] * p, p)
            return x, res, p, jnp.where(act, rz_new, rz), act, count, it + 1

        out = jax.lax.while_loop(cond, body, init)
        return out[0], out[5]

    def within_tol(err, theta):
        """``err`` within ``tol`` of ``θ`` in the Euclidean norm or in the data norm.

        The data norm ``||v||_A = sqrt(vᵀ A v)``, ``A = P - ridge I`` the preconditioner's data
        part, measures ``v`` through the outputs on the training examples, so it is blind to
        directions no selected example sees (the null space of the features, present whenever
        ``d`` exceeds their rank). There a Newton step ``P⁻¹ ∇`` only amplifies the rounding
        noise of ``∇`` by ``1/ridge``: the Euclidean test alone would then report a converged
        answer as a failure. ``||Lᵀ v||² = vᵀ P v`` with ``P = L Lᵀ``.
        """

        def norms(v):
            lt_v = jnp.einsum("mji,jm->im", chol, v)  # Lᵀ v per mask, [d, mc]
            e2 = jnp.sum(v * v, axis=0)
            a2 = jnp.maximum(jnp.sum(lt_v * lt_v, axis=0) - ridge * e2, 0.0)
            return jnp.sqrt(e2), jnp.sqrt(a2)

        err_e, err_a = norms(err)
        th_e, th_a = norms(theta)
        return (err_e <= tol * th_e) | (err_a <= tol * th_a)

    def close_enough(theta, grad):
        """Estimated distance to the optimum, ``P⁻¹ ∇`` (a preconditioned Newton step, no
        Hessian-vector product), within ``tol`` of ``θ``; or an exactly zero gradient."""
        gnorm = jnp.linalg.norm(grad, axis=0)
        return (gnorm == 0) | within_tol(chol_solve(chol, grad), theta)

    f = objective(z, labels, weights, theta, ridge, loss)
    conv = (g0norm == 0) | close_enough(theta, grad)
    done = singular | conv
    zeros = jnp.zeros((mc,), jnp.int32)
    state0 = (theta, z, f, grad, done, conv, zeros, zeros, 0)

    def cond(st):
        return jnp.any(~st[4]) & (st[8] < max_iter)

    def body(st):
        theta, z, f, grad, done, conv, iters, hvps, it = st
        active = ~done
        gnorm = jnp.linalg.norm(grad, axis=0)

        def newton_cg_step():
            _, curv = loss_grad_curvature(z, labels, loss)
            forcing = jnp.minimum(0.5, jnp.sqrt(gnorm / jnp.maximum(g0norm, tiny)))
            return pcg(curv, -grad, active, forcing)

        def preconditioner_step():
            # First iteration: the preconditioner is the exact Hessian at the anchor (and, for
            # squared loss, everywhere), so its Newton step needs no Hessian-vector product.
            return -chol_solve(chol, grad), jnp.zeros((mc,), jnp.int32)

        step, used = jax.lax.cond(it == 0, preconditioner_step, newton_cg_step)
        zstep = (gflat @ step).reshape(n, c, mc)
        slope = jnp.sum(grad * step, axis=0)
        slack = 16.0 * jnp.finfo(dtype).eps * jnp.abs(f)

        def ls_cond(ls):
            return jnp.any(ls[1]) & (ls[2] < 40)

        def ls_body(ls):
            alpha, searching, k = ls
            trial = objective(
                z + alpha[None, None, :] * zstep, labels, weights,
                theta + alpha[None, :] * step, ridge, loss,
            )  # fmt: skip
            # The slack absorbs rounding of f: near the optimum the predicted decrease falls below
            # it, and a strict test would then reject good Newton steps at random.
            accept = trial <= f + 1e-4 * alpha * slope + slack
            searching = searching & ~accept
            return jnp.where(searching, 0.5 * alpha, alpha), searching, k + 1

        alpha, failed, _ = jax.lax.while_loop(
            ls_cond, ls_body, (jnp.ones((mc,), dtype), active, 0)
        )
        upd = active & ~failed
        alpha = jnp.where(upd, alpha, 0.0)
        theta_new = theta + alpha[None, :] * step
        z_new = z + alpha[None, None, :] * zstep
        f_new = objective(z_new, labels, weights, theta_new, ridge, loss)
        r_new, _ = loss_grad_curvature(z_new, labels, loss)
        grad_new = weighted_grad(grads, weights, r_new) + ridge * theta_new
        # Converged: the estimated distance to the optimum is <= tol relative to θ, or the full
        # Newton step just taken was (the error after it is then far smaller). A failed line
        # search means nothing better is representable: that mask stops, converged only by
        # these criteria (float32 gradients stall at a rounding floor of about 1e-5 relative).
        small_step = (alpha == 1.0) & within_tol(step, theta_new)
        conv_new = conv | (upd & (close_enough(theta_new, grad_new) | small_step))
        done_new = done | failed | conv_new
        return (
            jnp.where(upd[None, :], theta_new, theta),
            jnp.where(upd[None, None, :], z_new, z),
            jnp.where(upd, f_new, f),
            jnp.where(upd[None, :], grad_new, grad),
            done_new,
            conv_new,
            iters + active.astype(jnp.int32),
            hvps + used,
            it + 1,
        )

    theta, _, _, grad, _, conv, iters, hvps, _ = jax.lax.while_loop(cond, body, state0)
    gnorm = jnp.linalg.norm(grad, axis=0)
    ok = ~singular & conv & jnp.all(jnp.isfinite(theta), axis=0)
    return theta, ok, iters, gnorm, hvps
