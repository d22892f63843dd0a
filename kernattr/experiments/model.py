"""The modular-arithmetic model used by the pipeline and the notebooks (public names).

:class:`ModelSpec` sizes the 1-block NNX transformer, :func:`build_model` returns
``(apply_fn, params, init_fn)`` for a :class:`~kernattr.experiments.modular.ModularData`, and
:func:`pretrain` trains ``W0`` on all tasks.
"""

from ._model import ModelSpec as ModelSpec
from ._model import build_model as build_model
from ._model import pretrain as pretrain

__all__ = ["ModelSpec", "build_model", "pretrain"]
