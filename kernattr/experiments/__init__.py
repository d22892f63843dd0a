"""Experiments: modular arithmetic with an NNX transformer, end to end (``kernattr demo``).

Imports flax/optax/matplotlib; not imported by ``import kernattr``.
"""
