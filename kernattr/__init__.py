"""kernattr: task attribution with kernel surrogate models in JAX.

Subsets of tasks are 0/1 masks; a surrogate fitted on (mask, measured metric) pairs predicts
the metric of any subset and gives attributions (leave-one-out, exact Shapley, interactions).
See README.md for a tour.

This module is the public face: every name below is re-exported from the private modules, laid
out by the layers data flows through (imports run one way, down this list): ``_checks``,
``_linalg``, ``_sharding`` (ground floor), ``_metrics``, ``data/`` (masks, loaders, games),
``labels/`` (gradients, projection, losses, the estimator), ``surrogates/``, ``readouts/``
(attributions, uncertainty, mask selection), ``_baselines``; above them ``groundtruth``,
``adapters``, ``workflow``/``io``/``plots``, this face, ``experiments`` and the CLI.
"""

from importlib import metadata as _metadata

# --- subsets (data/_subsets.py)
from .data._subsets import PairMasks as PairMasks
from .data._subsets import leave_one_out_masks as leave_one_out_masks
from .data._subsets import pair_masks as pair_masks
from .data._subsets import sample_subsets as sample_subsets

# --- surrogates (surrogates/: _krr.py, _multifidelity.py, _dispatch.py)
from .surrogates._krr import KernelSurrogate as KernelSurrogate
from .surrogates._krr import LinearSurrogate as LinearSurrogate
from .surrogates._krr import MultiFidelitySurrogate as MultiFidelitySurrogate
from .surrogates._dispatch import fit_kernel as fit_kernel
from .surrogates._krr import fit_linear as fit_linear
from .surrogates._dispatch import predict as predict
from .surrogates._multifidelity import fit_multifidelity as fit_multifidelity

# --- large-m surrogates (surrogates/: _nystrom.py, _cg.py, _quadratic.py)
from .surrogates._nystrom import NystromSurrogate as NystromSurrogate
from .surrogates._nystrom import fit_nystrom as fit_nystrom
from .surrogates._cg import CGResult as CGResult
from .surrogates._cg import fit_kernel_cg as fit_kernel_cg
from .surrogates._cg import solve_kernel_cg as solve_kernel_cg
from .surrogates._quadratic import QuadraticSurrogate as QuadraticSurrogate
from .surrogates._quadratic import fit_quadratic as fit_quadratic

# --- attribution (readouts/_attribution.py)
from .readouts._attribution import banzhaf_values as banzhaf_values
from .readouts._attribution import interaction_scores as interaction_scores
from .readouts._attribution import loo_scores as loo_scores
from .readouts._attribution import shapley_values as shapley_values

# --- uncertainty and active selection (readouts/_uncertainty.py)
from .readouts._uncertainty import AttributionIntervals as AttributionIntervals
from .readouts._uncertainty import attribution_intervals as attribution_intervals
from .readouts._uncertainty import posterior_variance as posterior_variance
from .readouts._uncertainty import select_masks as select_masks

# --- metrics (_metrics.py)
from ._metrics import BootstrapInterval as BootstrapInterval
from ._metrics import EstimatorError as EstimatorError
from ._metrics import LDSInterval as LDSInterval
from ._metrics import LDSResult as LDSResult
from ._metrics import PairedLDSInterval as PairedLDSInterval
from ._metrics import bootstrap_indices as bootstrap_indices
from ._metrics import bootstrap_interval as bootstrap_interval
from ._metrics import estimator_error as estimator_error
from ._metrics import lds as lds
from ._metrics import lds_interval as lds_interval
from ._metrics import paired_lds_interval as paired_lds_interval
from ._metrics import normalized_error as normalized_error
from ._metrics import pearson as pearson
from ._metrics import rank_data as rank_data
from ._metrics import relative_error as relative_error
from ._metrics import spearman as spearman

# --- loaders (data/_loaders.py)
from .data._loaders import SubsetData as SubsetData
from .data._loaders import group_masks as group_masks
from .data._loaders import load_subsets as load_subsets

# --- synthetic task games (data/_games.py)
from .data._games import SyntheticGame as SyntheticGame
from .data._games import synthetic_game as synthetic_game

# --- projection (labels/_projection.py)
from .labels._projection import Projector as Projector
from .labels._projection import make_projector as make_projector
from .labels._projection import project as project
from .labels._projection import projector_matrix as projector_matrix

# --- sharding (_sharding.py)
from ._sharding import data_mesh as data_mesh
from ._sharding import shard_examples as shard_examples

# --- gradients (labels/_features.py, labels/_gradients.py)
from .labels._features import GradientFeatures as GradientFeatures
from .labels._gradients import gradient_features as gradient_features
from .labels._gradients import gradient_features_fn as gradient_features_fn
from .labels._gradients import linearize as linearize
from .labels._gradients import projected_gradients as projected_gradients

# --- estimation (labels/_estimation.py)
from .labels._estimation import SubsetEstimates as SubsetEstimates
from .labels._estimation import estimate_subset_labels as estimate_subset_labels
from .labels._estimation import estimate_subsets as estimate_subsets

# --- baselines (_baselines.py)
from ._baselines import influence_scores as influence_scores
from ._baselines import tracin_scores as tracin_scores
from ._baselines import trak_scores as trak_scores

# --- building blocks for code on top of kernattr (layout): a jit-safe value check, and the
# per-example weights of a mask's training objective
from ._checks import error_if as error_if
from .labels._losses import task_weights as task_weights

# --- workflow, save/load (workflow.py, io.py): a user's model -> attributions; results on disk
from .workflow import Attributions as Attributions
from .workflow import Workflow as Workflow
from .workflow import WorkflowConfig as WorkflowConfig
from .workflow import WorkflowResult as WorkflowResult
from .workflow import WorkflowTimings as WorkflowTimings
from .workflow import as_apply_fn as as_apply_fn
from .workflow import run_workflow as run_workflow
from .workflow import workflow as workflow
from .workflow import __all__ as _workflow_names
from .io import load as load
from .io import save as save

try:
    __version__ = _metadata.version("kernattr")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AttributionIntervals",
    "CGResult",
    "NystromSurrogate",
    "QuadraticSurrogate",
    "attribution_intervals",
    "fit_kernel_cg",
    "fit_nystrom",
    "fit_quadratic",
    "posterior_variance",
    "select_masks",
    "solve_kernel_cg",
    "BootstrapInterval",
    "EstimatorError",
    "GradientFeatures",
    "KernelSurrogate",
    "LDSInterval",
    "LDSResult",
    "LinearSurrogate",
    "MultiFidelitySurrogate",
    "PairMasks",
    "PairedLDSInterval",
    "Projector",
    "SubsetData",
    "SubsetEstimates",
    "SyntheticGame",
    "banzhaf_values",
    "bootstrap_indices",
    "bootstrap_interval",
    "data_mesh",
    "estimate_subset_labels",
    "estimator_error",
    "fit_kernel",
    "fit_linear",
    "fit_multifidelity",
    "gradient_features",
    "gradient_features_fn",
    "group_masks",
    "influence_scores",
    "interaction_scores",
    "lds",
    "lds_interval",
    "leave_one_out_masks",
    "linearize",
    "load_subsets",
    "loo_scores",
    "make_projector",
    "normalized_error",
    "pair_masks",
    "paired_lds_interval",
    "pearson",
    "predict",
    "project",
    "projected_gradients",
    "projector_matrix",
    "rank_data",
    "relative_error",
    "sample_subsets",
    "shapley_values",
    "shard_examples",
    "spearman",
    "synthetic_game",
    "tracin_scores",
    "trak_scores",
    # building blocks (layout)
    "error_if",
    "task_weights",
    # workflow (every name of kernattr.workflow's __all__), save/load (lib)
    *_workflow_names,
    "load",
    "save",
]
