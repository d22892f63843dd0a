"""Labels for masks without retraining: per-example gradients, their random projection, losses,
and the gradient estimator of subset labels with its solvers.

Data flows ``_projection`` -> ``_gradients`` -> ``_features`` -> ``_estimation`` (which uses
``_losses``, ``_solver_fast`` and ``_solver_newton``). Imports only the ground floor
(:mod:`kernattr._checks`, :mod:`kernattr._sharding`). The public names are re-exported by
:mod:`kernattr`; the modules here are private.
"""
