"""Benchmark: retrains saved by active mask selection (``ka.select_masks``) vs random masks.

On synthetic games (``ka.synthetic_game``, interaction kind) the "real retrain" of a mask is a
noisy evaluation of the game. Random arm: Bernoulli(1/2) masks. Active arm: the same first
``--start`` random masks, then rounds of ``--batch`` masks chosen by ``ka.select_masks``
(integrated-variance criterion over a 2,048-mask Bernoulli(1/2) pool, fantasised updates) from
the current surrogate, refitted after each round (``ka.fit_kernel``, default linear+rbf kernel and
grids; ``--surrogate quadratic``: ``ka.fit_quadratic``, default grids; ``--surrogate ard``:
``ka.fit_quadratic(..., ard_steps=--ard-steps)``, one learned prior variance per pair; the same
surrogate for both arms). With ``--surrogate ard`` the random arm of ``fit_quadratic`` (no ARD) is
also printed, and the retrains at which random masks with ARD reach ITS LDS at ``--budget``
(the saving that comes from the model rather than from the choice of masks). Both arms are
scored by held-out LDS against noisy retrains of 1,000 Bernoulli(1/2)
masks, averaged over seeds. Printed: the LDS curves, the active - random LDS difference per size with a 95% t-interval over
seeds, per seed the retrains at which active reaches that seed's random LDS at ``--budget``,
random's mean LDS at ``--budget`` retrains, the number of retrains at which the mean active curve
first reaches it (linear interpolation), and the ratio (target <= 0.7, i.e. <= 280 at 400); the noise ceiling; a plot if ``--plot`` is given.
``ORACLE-BOUND`` (any surrogate, noise > 0): the fewest retrains with which ANY selection rule,
adaptive or not, could match the integrated posterior variance that random masks give at the
budget, under the ARD surrogate's model with its prior variances set to the game's true
coefficients (``oracle_bound``, ``variance_lower_bound``); when it is above 0.7 of the budget, no
rule can meet the 30% target as that model measures it. With ``--surrogate quadratic`` also
a lower bound on the retrains that any design chosen without the labels needs to match random's
posterior variance at the budget, at the hyperparameters the grid fit chose (``design_bound``).
``--pairs`` sets the interacting pairs per target (default 6, the games everywhere else).

    nice -n 10 python benchmarks/bench_active.py --surrogate ard --plot active.png
    python benchmarks/bench_active.py --smoke
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from _records import record
from _active import plot_curves, print_mean_curves, report_model_saving, report_reach, surrogate_fit


def t_quantile(n: int) -> float:
    """0.975 quantile of Student's t with ``n - 1`` degrees of freedom (n seeds; table, 1.96 beyond)."""
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
    return table.get(n - 1, 2.228 if n - 1 < 20 else 1.96)


def variance_lower_bound(prior: np.ndarray, m: int) -> float:
    """Lower bound on the integrated posterior variance ``tr((D⁻¹ + X_cᵀX_c)⁻¹)`` (noise units)
    that ANY ``m`` masks can give a Bayesian linear model on Walsh features with prior variances
    ``prior [r]`` (``D = diag(prior)``, ``X_c`` the design's centred ``±1`` features).

    Under Bernoulli(1/2) masks the Walsh features are orthonormal, so that trace is the posterior
    variance of the predictions averaged over Bernoulli(1/2) masks (the held-out masks here). Two
    bounds, the larger returned:
    - *orthogonal*: ``f(A) = tr((D⁻¹ + A)⁻¹)`` is convex and unchanged by coordinate sign flips
      (which keep ``D``), so ``f(A) >= f(diag A)``; every ``±1`` feature has ``(X_cᵀX_c)_ii <= m``
      and ``f`` falls as a diagonal grows, so ``f(A) >= Σ_i 1/(1/prior_i + m)``, attained by an
      orthogonal design (the full factorial);
    - *rank*: ``A`` has rank ``<= m``; even noise-free labels on its range leave the prior on an
      ``r - m``-dimensional complement, whose trace is at least the sum of the ``r - m`` smallest
      prior variances (Ky Fan).
    """
    prior = np.sort(np.asarray(prior, np.float64))
    orthogonal = float(np.sum(1.0 / (1.0 / prior + m)))
    return max(orthogonal, float(prior[: max(prior.size - m, 0)].sum()))


def fewest_masks(prior: np.ndarray, variance: float, limit: int) -> int:
    """Smallest ``m <= limit`` whose :func:`variance_lower_bound` is ``<= variance`` (``limit``
    if no smaller ``m`` is; when ``variance`` is what some ``limit`` masks give, the bound at
    ``limit`` is below it, so the answer is exact)."""
    lo, hi = 0, limit  # the bound does not increase with m
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if variance_lower_bound(prior, mid) <= variance else (mid + 1, hi)
    return lo


def design_bound(s, num_tasks: int) -> float:
    """Fewest masks with which ANY design chosen without looking at labels could reach the
    integrated posterior variance ``tr(feature_cov)`` that the ``QuadraticSurrogate`` ``s`` has on
    its own masks, at its chosen prior ``v_i / ridge`` (:func:`variance_lower_bound`)."""
    from kernattr.surrogates._quadratic import _prior_scale

    k = num_tasks
    prior = np.asarray(_prior_scale(s.ratio[0], k, k * (k - 1) // 2)) ** 2 / float(s.ridge[0])
    return float(fewest_masks(prior, float(np.trace(np.asarray(s.feature_cov))), prior.size))


def walsh_coefficients(game) -> np.ndarray:
    """``[d, T]`` coefficients of a noise-free ``ka.synthetic_game`` on the Walsh features
    (``χ_k``, then ``χ_j χ_k`` for ``j < k``, ``χ = 2 s - 1``; the constant left out): with
    ``s = (1 + χ)/2``, a pair term ``q_jk s_j s_k`` gives ``q_jk/4`` to ``χ_j χ_k`` and ``q_jk/4`` to
    ``χ_j`` and to ``χ_k``, and ``l_k s_k`` gives ``l_k/2`` to ``χ_k``."""
    lin, quad = np.asarray(game.linear, np.float64), np.asarray(game.quadratic, np.float64)
    k = lin.shape[0]
    iu, ju = np.triu_indices(k, 1)
    sym = quad + np.swapaxes(quad, 0, 1)
    return np.concatenate([lin / 2 + sym.sum(1) / 4, quad[iu, ju] / 4])


def oracle_bound(game, masks) -> tuple[float, float, int]:
    """Fewest retrains with which ANY selection rule, adaptive or not, could reach the integrated
    posterior variance that random ``masks`` ``[n, K]`` give, under the surrogate's own model with
    its prior variances set to the truth.

    The model: ``ka.fit_quadratic(..., ard_steps=...)``'s (one prior variance per Walsh coefficient,
    shared by the targets, a flat intercept), with ``ρ_i = mean_t c_it² / σ²`` from the game's true
    coefficients ``c`` and noise ``σ``; coefficients with ``ρ_i = 0`` are known to be 0. With the
    prior known the posterior does not depend on the labels, so an adaptive rule is no better than
    the best fixed design, which :func:`variance_lower_bound` bounds.

    Returns ``(random_variance, bound_at_n, m_min)``: the random masks' integrated variance, the
    bound at ``n`` masks (``<=`` the former, a check), and the smallest ``m`` whose bound is
    ``<=`` the random masks' variance. Needs ``game.noise > 0``.
    """
    from kernattr.surrogates._quadratic import walsh_features

    coef = walsh_coefficients(game)
    x = np.asarray(walsh_features(jnp.asarray(masks)), np.float64)  # ±1 entries: exact in float32
    exact = np.asarray(game.evaluate(masks), np.float64)
    fitted = x @ coef + (exact - x @ coef).mean(0)  # the constant is left out of ``coef``
    assert np.abs(fitted - exact).max() < 1e-4 * max(1.0, np.abs(exact).max()), "walsh_coefficients"
    rho = (coef**2).mean(1) / float(game.noise) ** 2
    rel = rho > 0
    xr = x[:, rel] - x[:, rel].mean(0)
    random_var = float(np.trace(np.linalg.inv(xr.T @ xr + np.diag(1.0 / rho[rel]))))
    n = masks.shape[0]
    return random_var, variance_lower_bound(rho[rel], n), fewest_masks(rho[rel], random_var, n)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--K", type=int, default=30)
    p.add_argument("--T", type=int, default=8)
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--pairs", type=int, default=6, help="interacting pairs per target (ka.synthetic_game num_pairs)")
    p.add_argument("--start", type=int, default=100)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--budget", type=int, default=400)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--candidates", type=int, default=2048)
    p.add_argument("--criterion", default="integrated")
    p.add_argument("--surrogate", default="kernel", choices=["kernel", "quadratic", "ard"],
                   help="fit both arms with ka.fit_kernel (default kernel and grids), ka.fit_quadratic, "
                        "or ka.fit_quadratic with ard_steps")
    p.add_argument("--ard-steps", type=int, default=50)
    p.add_argument("--plot", default=None)
    a = p.parse_args(argv)
    if a.smoke:
        a.K, a.T, a.start, a.batch, a.budget, a.seeds, a.candidates = 10, 2, 40, 20, 80, 1, 256

    import kernattr as ka

    sizes = list(range(a.start, a.budget + 1, a.batch))
    print(
        f"sizes: K={a.K} T={a.T} noise={a.noise} pairs={a.pairs} start={a.start} batch={a.batch} budget={a.budget} "
        f"seeds={a.seeds} pool={a.candidates} criterion={a.criterion} surrogate={a.surrogate}  devices={jax.device_count()}  "
        f"cpus={os.cpu_count()}  load(1m)={os.getloadavg()[0]:.1f}"
    )
    fit = surrogate_fit(ka, a.surrogate, a.ard_steps)
    fit_grid = jax.jit(ka.fit_quadratic)
    select = jax.jit(lambda k, s: ka.select_masks(k, s, a.batch, num_candidates=a.candidates, criterion=a.criterion))
    rand, act, ceil, bound = np.zeros((a.seeds, len(sizes))), np.zeros((a.seeds, len(sizes))), [], []
    grid = np.zeros((a.seeds, len(sizes)))
    oracle = []  # (random variance, bound at the budget, fewest retrains) per seed
    for seed in range(a.seeds):
        kg, km, ky, kt, kyt, kyt2, ks = jax.random.split(jax.random.key(seed), 7)
        game = ka.synthetic_game(kg, num_tasks=a.K, num_targets=a.T, noise=a.noise, num_pairs=a.pairs)
        test = ka.sample_subsets(kt, num_tasks=a.K, num_subsets=1000, p=0.5)
        y_test = game.evaluate(test, kyt)
        ceil.append(float(ka.lds(game.evaluate(test, kyt2), y_test).mean))
        pool = ka.sample_subsets(km, num_tasks=a.K, num_subsets=a.budget, p=0.5)
        y_pool = game.evaluate(pool, ky)
        for i, n in enumerate(sizes):
            rand[seed, i] = float(ka.lds(ka.predict(fit(pool[:n], y_pool[:n]), test), y_test).mean)
            if a.surrogate == "ard":
                grid[seed, i] = float(ka.lds(ka.predict(fit_grid(pool[:n], y_pool[:n]), test), y_test).mean)
        if a.noise > 0:
            oracle.append(oracle_bound(game, pool))
        if a.surrogate == "quadratic":
            bound.append(design_bound(fit(pool, y_pool), a.K))
        x, yy = pool[: a.start], y_pool[: a.start]
        for i, n in enumerate(sizes):
            s = fit(x, yy)
            act[seed, i] = float(ka.lds(ka.predict(s, test), y_test).mean)
            if n < a.budget:
                new = select(jax.random.fold_in(ks, i), s)
                x = jnp.concatenate([x, new])
                yy = jnp.concatenate([yy, game.evaluate(new, jax.random.fold_in(ky, 1000 + i))])
        print(f"seed {seed}: random {np.round(rand[seed], 4).tolist()}  active {np.round(act[seed], 4).tolist()}")
    r, ac = rand.mean(0), act.mean(0)
    if bound:
        print(f"design bound (quadratic model at the hyperparameters chosen on {a.budget} random masks; "
              f"any design chosen without the labels): >= {[round(b) for b in bound]} retrains "
              f"to reach random's integrated posterior variance at {a.budget} (ratio {np.mean(bound) / a.budget:.2f})")
    if oracle:
        need = [o[2] for o in oracle]
        print(f"ORACLE-BOUND any selection rule (adaptive or not), with the surrogate's model and the true "
              f"prior variances, needs >= {need} retrains (per seed) for the integrated posterior variance random "
              f"masks give at {a.budget} ({[round(o[0], 4) for o in oracle]}, noise units): ratio "
              f"{np.mean(need) / a.budget:.2f} (target <= 0.70)")
        if any(o[1] > o[0] * (1 + 1e-9) for o in oracle):
            print("ERROR: the bound exceeds the random design's own variance")
            return 1
    print_mean_curves(sizes, rand, act)
    diff = act - rand
    half = t_quantile(a.seeds) * diff.std(0, ddof=1) / np.sqrt(a.seeds) if a.seeds > 1 else np.full(len(sizes), np.nan)
    print("active - random LDS per size, mean [95% t-interval over seeds]:",
          [f"{d:+.4f} [{d - h:+.4f}, {d + h:+.4f}]" if np.isfinite(h) else f"{d:+.4f} (1 seed)"
           for d, h in zip(diff.mean(0), half)])
    print(f"noise ceiling (mean): {np.mean(ceil):.4f}")
    record("held-out LDS at the budget, active vs random masks", figure=ac[-1], unit="LDS",
           anchor=r[-1], anchor_name="random Bernoulli(1/2) masks", higher_is_better=True,
           sizes=dict(K=a.K, T=a.T, budget=a.budget, seeds=a.seeds, surrogate=a.surrogate),
           note=f"noise ceiling {np.mean(ceil):.4f}")
    report_reach(sizes, rand, act, a.budget)
    if a.surrogate == "ard":
        report_model_saving(sizes, grid, rand, a.budget)
    if a.plot:
        plot_curves(a.plot, sizes, r, ac, random_label=f"random Bernoulli(1/2), {a.surrogate}",
                    active_label=f"select_masks ({a.criterion}, {a.surrogate})",
                    xlabel="real retrains (masks)",
                    title=f"synthetic games K={a.K}, T={a.T}, {a.seeds} seeds", ceiling=np.mean(ceil),
                    extra=[("random Bernoulli(1/2), fit_quadratic", grid.mean(0))] if a.surrogate == "ard" else (),
                    vline=(np.mean([o[2] for o in oracle]),
                           f"fewest retrains any rule needs for random's\nposterior variance at {a.budget} (oracle bound)")
                    if oracle else None)
    return 0 if np.all(np.isfinite(ac)) else 1


if __name__ == "__main__":
    sys.exit(main())
