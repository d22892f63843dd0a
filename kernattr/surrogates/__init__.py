"""Surrogate models fitted on (mask, label) pairs.

Bottom to top: ``_krr`` (kernels, ``KernelSpec``, grids and their leave-one-out selection, the
linear and exact kernel ridge surrogates), ``_protocol`` (what the read-outs need from a
surrogate type: :class:`~._protocol.SurrogateOps`, the attribution forms and posteriors, and the
table they are registered in), ``_feature_ridge`` (the row-streaming ridge engine in a feature
space), ``_nystrom``, ``_cg`` and ``_quadratic`` (the large-``m`` solvers, built on the two
below them), ``_multifidelity``, ``_registry`` (every built-in surrogate type declared once:
predictions, attribution form, posterior), and ``_dispatch``, which sits above them all: the
public ``fit_kernel`` (choosing a solver) and ``predict`` (for every registered type). Every
public entry builds its :class:`~._krr.KernelSpec` once (:func:`~._krr.kernel_spec`) and passes
it down. The public names are re-exported by :mod:`kernattr`; the modules here are private.
"""
