"""Adapters from Flax NNX models to the ``(apply_fn, params)`` pairs kernattr works with.

Flax is imported lazily: ``import kernattr.adapters`` works without flax installed; the first
use of a name below imports it.

Public names:

- ``from_nnx``: any ``flax.nnx.Module`` -> ``(apply_fn, params)``, without mutating the model.
- ``Transformer``: a small decoder-only NNX transformer for short token sequences.
- ``answer_fn`` / ``answer_output`` / ``OUTPUTS``: output functions for the answer token (logit
  of the correct class, margin, log-odds, full logits).
- ``make_sac`` / ``SAC`` / ``SACParams`` / ``Batch`` / ``sac_output_fn`` / ``pack_examples`` /
  ``actor_mean_labels`` / ``tanh_gaussian_log_prob`` / ``squash`` / ``Actor`` / ``TwinCritic``:
  soft actor-critic models as pure functions, and their output functions. The SAC training
  algorithm built on them (``td_targets``, ``sac_losses``, ``make_train_step``, ``TrainState``)
  is in :mod:`kernattr.experiments.sac`.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "from_nnx": "._nnx",
    "Transformer": "._transformer",
    "answer_fn": "._transformer",
    "answer_output": "._transformer",
    "OUTPUTS": "._transformer",
    **{name: "._sac" for name in (
        "Actor", "Batch", "SAC", "SACParams", "TwinCritic", "actor_mean_labels", "make_sac",
        "pack_examples", "sac_output_fn", "squash", "tanh_gaussian_log_prob")},
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name], __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
