"""Read-outs of a fitted surrogate: attributions (leave-one-out, exact Shapley and Banzhaf
values, interactions), their posterior uncertainty, and the next masks to retrain.

Sits above :mod:`kernattr.surrogates`. The public names are re-exported by :mod:`kernattr`; the
modules here are private.
"""
