"""Test configuration: 8 fake CPU devices and strict rank promotion, set before JAX starts."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def x64():
    """Run a test with float64 enabled, restored afterwards."""
    with jax.enable_x64(True):
        yield


def tol(dtype):
    """(rtol, atol) appropriate for a dtype."""
    import numpy as np

    return (1e-10, 1e-10) if np.dtype(dtype) == np.float64 else (2e-5, 2e-5)
