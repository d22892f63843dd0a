"""The oracle design bound printed by ``benchmarks/bench_active.py`` (``ORACLE-BOUND``): checked
against an exhaustive search over every design at K = 4, and tight where it should be.

The bound says how few retrains ANY mask-selection rule could need, so a bound that is too high
would wrongly excuse the active-selection benchmark; these tests would catch that.
"""

import itertools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernattr as ka

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
from bench_active import fewest_masks, oracle_bound, variance_lower_bound, walsh_coefficients  # noqa: E402

K = 4


def all_masks(k):
    return np.array(list(itertools.product([0.0, 1.0], repeat=k)))


def features(masks):
    """Walsh features χ_k, then χ_j χ_k (j < k), written out here (the library's order)."""
    c = 2.0 * masks - 1.0
    iu, ju = np.triu_indices(masks.shape[1], 1)
    return np.concatenate([c, c[:, iu] * c[:, ju]], axis=1)


def integrated_variance(masks, rho):
    """tr((X_cᵀ X_c + diag(1/ρ))⁻¹) on the coefficients with ρ > 0 (flat intercept)."""
    rel = rho > 0
    x = features(masks)[:, rel]
    x = x - x.mean(0)
    return float(np.trace(np.linalg.inv(x.T @ x + np.diag(1.0 / rho[rel]))))


@pytest.fixture
def game(x64):
    return ka.synthetic_game(jax.random.key(3), num_tasks=K, num_targets=2, noise=0.3, num_pairs=2)


def test_walsh_coefficients_reproduce_the_game(game):
    masks = all_masks(K)
    exact = np.asarray(game.evaluate(jnp.asarray(masks)))
    x = features(masks)
    coef, *_ = np.linalg.lstsq(np.hstack([np.ones((16, 1)), x]), exact, rcond=None)
    np.testing.assert_allclose(walsh_coefficients(game), coef[1:], atol=1e-10)


@pytest.mark.parametrize("m, measured", [(3, 0.58), (5, 0.37)])
def test_bound_is_below_every_design(game, m, measured):
    """Exhaustive: every multiset of m of the 16 masks (816 and 15,504); the bound may not exceed
    the best. m = 3 < r = 8 relevant coefficients exercises the rank part."""
    coef = walsh_coefficients(game)
    rho = (coef**2).mean(1) / float(game.noise) ** 2
    masks = all_masks(K)
    best = min(integrated_variance(masks[list(c)], rho)
               for c in itertools.combinations_with_replacement(range(16), m))
    bound = variance_lower_bound(rho[rho > 0], m)
    assert bound <= best * (1 + 1e-9)
    # Not zero, but loose with fewer masks than relevant coefficients (the fraction measured);
    # on K = 30 games the retrains it allows were within ~5% of what a greedy design with the
    # true prior needed (325 vs 335-344, one scratch game).
    assert bound > 0.8 * measured * best


def test_bound_is_attained_by_the_full_factorial():
    """The orthogonal part is exact for the full factorial, whatever the prior variances."""
    rho = np.random.default_rng(0).gamma(0.5, 2.0, size=K + K * (K - 1) // 2)
    np.testing.assert_allclose(variance_lower_bound(rho, 16), integrated_variance(all_masks(K), rho), rtol=1e-9)


def test_rank_part_with_noise_free_limit():
    """With huge information on m directions the rest keeps its prior: the r - m smallest."""
    rho = np.array([50.0, 10.0, 40.0, 20.0])
    assert variance_lower_bound(rho, 2) == pytest.approx(30.0)  # 10 + 20 (orthogonal part: 1.99)
    assert variance_lower_bound(rho, 0) == pytest.approx(rho.sum())
    assert fewest_masks(rho, 30.0, 10) == 2


def test_oracle_bound_on_random_masks(game):
    masks = ka.sample_subsets(jax.random.key(0), num_tasks=K, num_subsets=40, p=0.5)
    random_var, at_n, need = oracle_bound(game, masks)
    coef = walsh_coefficients(game)
    rho = (coef**2).mean(1) / float(game.noise) ** 2
    np.testing.assert_allclose(random_var, integrated_variance(np.asarray(masks), rho), rtol=1e-9)
    assert at_n <= random_var
    rel = rho[rho > 0]
    assert 1 <= need <= 40
    assert variance_lower_bound(rel, need) <= random_var < variance_lower_bound(rel, need - 1)
