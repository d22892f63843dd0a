"""Jitted library functions shared by the tests (imported by them; not collected by pytest).

``fit_kernel`` names every argument of :func:`kernattr.fit_kernel` that selects code rather than
values as static, so one wrapper serves every test: each configuration compiles once.
"""

import jax

import kernattr as ka

FIT_KERNEL_STATIC = ("kernel", "degree", "coef0", "select", "per_target", "fit_intercept",
                     "throw", "num_landmarks", "solver")
fit_kernel = jax.jit(ka.fit_kernel, static_argnames=FIT_KERNEL_STATIC)
