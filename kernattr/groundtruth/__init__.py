"""Ground truth by real training: fine-tune (or retrain) one model per task subset, vmapped.

Imports optax, so it is a subpackage (``import kernattr.groundtruth``), not re-exported by
``kernattr``. Typical use::

    import kernattr.groundtruth as gt
    W = gt.finetune_on_masks(apply_fn, params0, x, y, task_ids, masks, loss="softmax",
                             optimizer=optax.adam(1e-3), num_steps=200)
    F = gt.evaluate_targets(apply_fn, W, x_target, y_target, loss="softmax", metric="loss")
    err = kernattr.estimator_error(F_hat, F, F0=F_at_W0)

``estimator_error`` and ``EstimatorError`` (the estimator's error against these labels) live in
:mod:`kernattr`; the names here are deprecated aliases of the same objects and warn.
"""

import warnings as _warnings

from .. import _metrics

from ._compare import Comparison as Comparison
from ._compare import compare_estimator_to_finetuning as compare_estimator_to_finetuning
from ._finetune import FinetuneLabels as FinetuneLabels
from ._finetune import evaluate_targets as evaluate_targets
from ._finetune import finetune_labels as finetune_labels
from ._finetune import finetune_fn as finetune_fn
from ._finetune import finetune_on_masks as finetune_on_masks

__all__ = [
    "Comparison",
    "FinetuneLabels",
    "compare_estimator_to_finetuning",
    "evaluate_targets",
    "finetune_labels",
    "finetune_fn",
    "finetune_on_masks",
]

_DEPRECATED = {"estimator_error": "kernattr.estimator_error",
               "EstimatorError": "kernattr.EstimatorError"}


def __getattr__(name):
    if name in _DEPRECATED:
        _warnings.warn(f"kernattr.groundtruth.{name} is deprecated; use {_DEPRECATED[name]} "
                       "(the same object).", DeprecationWarning, stacklevel=2)
        return getattr(_metrics, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
