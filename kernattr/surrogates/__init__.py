"""Surrogate models fitted on (mask, label) pairs.

Bottom to top: ``_krr`` (kernels, ``KernelSpec``, grids and their leave-one-out selection, the
linear and exact kernel ridge surrogates), ``_feature_ridge`` (the row-streaming ridge engine in
a feature space), ``_nystrom``, ``_cg`` and ``_quadratic`` (the large-``m`` solvers, built on the
two below them), ``_multifidelity``, and ``_dispatch``, which sits above them all: the public
``fit_kernel`` (choosing a solver) and ``predict`` (for every surrogate type). The public names
are re-exported by :mod:`kernattr`; the modules here are private.
"""
