"""Masks and the data behind them: sampling subsets of tasks, loading others' (mask, label)
files, synthetic task games, and the built-in example (``example_game.json``).

Bottom of the numerical core, above the checks: imports only :mod:`kernattr._checks`. The
public names are re-exported by :mod:`kernattr`; the modules here are private.
"""
