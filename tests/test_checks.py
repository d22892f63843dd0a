"""Tests for the shared input checks (kernattr/_checks.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernattr import _checks


def test_check_grid_accepts_jax_array_inside_jit():
    grid = jnp.array([0.1, 1.0, 10.0])

    @jax.jit
    def f(y):
        g = _checks.check_grid(grid, "gamma")
        return y * g

    np.testing.assert_allclose(f(jnp.float32(2.0)), [0.2, 2.0, 20.0], rtol=1e-6)


@pytest.mark.parametrize("bad", [[[1.0, 2.0]], [], [1.0, np.nan]])
def test_check_grid_rejects(bad):
    with pytest.raises(ValueError, match="ridge"):
        _checks.check_grid(np.asarray(bad), "ridge")


def test_check_masks_eager_and_jit():
    good = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_array_equal(_checks.check_masks(good), good)
    bad = jnp.array([[1.0, 0.5], [0.0, 1.0]])
    with pytest.raises(ValueError, match="1 entries are neither"):
        _checks.check_masks(bad)
    f = jax.jit(lambda m: _checks.check_masks(m).sum())
    assert float(f(good)) == 2.0
    with pytest.raises(Exception, match="masks` must contain only 0 and 1"):
        jax.block_until_ready(f(bad))
    with pytest.raises(ValueError, match="rank 2"):
        _checks.check_masks(jnp.ones(3))


def test_check_labels_nan_and_rows():
    y, was_1d = _checks.check_labels(jnp.arange(3.0), 3)
    assert was_1d and y.shape == (3, 1)
    with pytest.raises(ValueError, match="non-finite"):
        _checks.check_labels(jnp.array([1.0, jnp.nan, 2.0]), 3)
    with pytest.raises(ValueError, match="rows"):
        _checks.check_labels(jnp.arange(4.0), 3)


def test_failed_check_under_jit_is_one_clean_error(caplog, capfd):
    """issue 26 row 8: the error reaches the caller; JAX does not log "jax.debug.callback
    failed" with a traceback first. Other callbacks' failures are still logged."""
    import logging

    import kernattr as ka

    with caplog.at_level(logging.DEBUG):
        with pytest.raises(Exception, match="ridge"):
            jax.block_until_ready(
                jax.jit(lambda r: ka.fit_linear(jnp.eye(3), jnp.ones(3), ridge=r).coef)(-1.0))
    assert "callback failed" not in caplog.text
    assert "callback failed" not in capfd.readouterr().err
    # a failing callback that is not a kernattr check is still reported by JAX
    caplog.clear()

    def boom(_):
        raise RuntimeError("not a check")

    with caplog.at_level(logging.DEBUG), pytest.raises(Exception):
        jax.block_until_ready(jax.jit(lambda x: (jax.debug.callback(boom, x), x)[1])(1.0))
    assert "callback failed" in caplog.text


def test_labels_without_target_columns_rejected():
    """issue 26 row 6: [m, 0] labels are one clear error."""
    with pytest.raises(ValueError, match="no target columns"):
        _checks.check_labels(jnp.zeros((4, 0)), 4)
