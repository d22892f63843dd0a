"""The public API: every public name still imports, is the same object everywhere it is
exported, and keeps the signature it had (new optional arguments and new result fields are
allowed; a removed or re-ordered argument, a changed default, a dropped field is not).

The snapshot below was taken from the package before it was reorganised into subpackages; a
deliberate API change edits it here (and is noted in the changelog).
"""

from __future__ import annotations

import importlib
import inspect
import os
import re

import numpy as np
import pytest

import kernattr as ka

# name -> ("fields", *NamedTuple fields) | ((param, kind, repr(default) or None), ...) | None
SIGNATURES = {
    'kernattr': {
        'AttributionIntervals': ('fields', 'value', 'std', 'lower', 'upper'),
        'BootstrapInterval': ('fields', 'mean', 'low', 'high', 'std', 'samples'),
        'CGResult': ('fields', 'solution', 'num_iter', 'residual', 'converged'),
        'EstimatorError': ('fields', 'relative_error', 'no_change_relative_error', 'relative_error_per_mask', 'elementwise_mean', 'elementwise_median', 'elementwise_p90', 'no_change_elementwise_mean', 'spearman', 'spearman_per_target', 'change_captured'),
        'GradientFeatures': ('fields', 'grads', 'outputs', 'labels', 'task_ids'),
        'KernelSurrogate': ('fields', 'masks', 'dual_coef', 'intercept', 'gamma', 'ridge', 'mix', 'gamma_grid', 'mix_grid', 'ridge_grid', 'linear_scale', 'cv_error', 'cv_spearman', 'spec'),
        'LDSInterval': ('fields', 'mean', 'low', 'high', 'std', 'samples', 'num_valid'),
        'LDSResult': ('fields', 'mean', 'per_target', 'num_valid'),
        'LinearSurrogate': ('fields', 'coef', 'intercept'),
        'MultiFidelitySurrogate': ('fields', 'cheap', 'residual', 'rho', 'cv_error', 'cv_error_real_only', 'cv_rho'),
        'NystromSurrogate': ('fields', 'surrogate', 'feature_map', 'feature_mean', 'eigvecs', 'eigvals', 'noise_var', 'num_train'),
        'PairMasks': ('fields', 'masks', 'pairs'),
        'PairedLDSInterval': ('fields', 'mean', 'low', 'high', 'std', 'samples', 'a', 'b'),
        'Projector': (('key', 'POSITIONAL_OR_KEYWORD', None), ('kind', 'POSITIONAL_OR_KEYWORD', None), ('dim', 'POSITIONAL_OR_KEYWORD', None), ('block_size', 'POSITIONAL_OR_KEYWORD', None), ('nonzeros', 'POSITIONAL_OR_KEYWORD', None), ('treedef', 'POSITIONAL_OR_KEYWORD', None), ('leaf_shapes', 'POSITIONAL_OR_KEYWORD', None), ('leaf_paths', 'POSITIONAL_OR_KEYWORD', None), ('selected', 'POSITIONAL_OR_KEYWORD', None)),
        'QuadraticSurrogate': ('fields', 'linear', 'pairwise', 'intercept', 'ratio', 'ridge', 'ratio_grid', 'ridge_grid', 'cv_error', 'feature_mean', 'feature_cov', 'noise_var', 'num_train', 'gamma', 'mix', 'feature_prior', 'ard_cv_error'),
        'SubsetData': ('fields', 'train_masks', 'train_labels', 'test_masks', 'test_labels'),
        'SubsetEstimates': ('fields', 'labels', 'theta', 'converged', 'num_iterations', 'grad_norm', 'num_hvps'),
        'SyntheticGame': ('fields', 'bias', 'linear', 'quadratic', 'noise'),
        'attribution_intervals': (('surrogate', 'POSITIONAL_OR_KEYWORD', None), ('kind', 'KEYWORD_ONLY', "'shapley'"), ('level', 'KEYWORD_ONLY', '0.95')),
        'banzhaf_values': (('surrogate', 'POSITIONAL_OR_KEYWORD', None),),
        'bootstrap_indices': (('key', 'POSITIONAL_OR_KEYWORD', None), ('num_rows', 'POSITIONAL_OR_KEYWORD', None), ('num_resamples', 'POSITIONAL_OR_KEYWORD', None)),
        'bootstrap_interval': (('key', 'POSITIONAL_OR_KEYWORD', None), ('values', 'POSITIONAL_OR_KEYWORD', None), ('num_resamples', 'KEYWORD_ONLY', '1000'), ('level', 'KEYWORD_ONLY', '0.95')),
        'data_mesh': (('devices', 'POSITIONAL_OR_KEYWORD', 'None'), ('axis', 'KEYWORD_ONLY', "'data'")),
        'estimate_subset_labels': (('train', 'POSITIONAL_OR_KEYWORD', None), ('target', 'POSITIONAL_OR_KEYWORD', None), ('masks', 'POSITIONAL_OR_KEYWORD', None), ('loss', 'KEYWORD_ONLY', None), ('metric', 'KEYWORD_ONLY', "'loss'"), ('ridge', 'KEYWORD_ONLY', None), ('solver', 'KEYWORD_ONLY', "'fast'"), ('mask_chunk_size', 'KEYWORD_ONLY', 'None'), ('max_iter', 'KEYWORD_ONLY', '50'), ('tol', 'KEYWORD_ONLY', 'None'), ('throw', 'KEYWORD_ONLY', 'True')),
        'estimate_subsets': (('train', 'POSITIONAL_OR_KEYWORD', None), ('target', 'POSITIONAL_OR_KEYWORD', None), ('masks', 'POSITIONAL_OR_KEYWORD', None), ('loss', 'KEYWORD_ONLY', None), ('metric', 'KEYWORD_ONLY', "'loss'"), ('ridge', 'KEYWORD_ONLY', None), ('solver', 'KEYWORD_ONLY', "'fast'"), ('mask_chunk_size', 'KEYWORD_ONLY', 'None'), ('max_iter', 'KEYWORD_ONLY', '50'), ('tol', 'KEYWORD_ONLY', 'None'), ('throw', 'KEYWORD_ONLY', 'True')),
        'estimator_error': (('F_hat', 'POSITIONAL_OR_KEYWORD', None), ('F', 'POSITIONAL_OR_KEYWORD', None), ('F0', 'POSITIONAL_OR_KEYWORD', 'None')),
        'fit_kernel': (('masks', 'POSITIONAL_OR_KEYWORD', None), ('y', 'POSITIONAL_OR_KEYWORD', None), ('kernel', 'KEYWORD_ONLY', "'linear+rbf'"), ('gamma', 'KEYWORD_ONLY', 'None'), ('ridge', 'KEYWORD_ONLY', 'None'), ('mix', 'KEYWORD_ONLY', 'None'), ('degree', 'KEYWORD_ONLY', '2'), ('coef0', 'KEYWORD_ONLY', '1.0'), ('select', 'KEYWORD_ONLY', "'mse'"), ('per_target', 'KEYWORD_ONLY', 'False'), ('fit_intercept', 'KEYWORD_ONLY', 'True'), ('throw', 'KEYWORD_ONLY', 'True'), ('num_landmarks', 'KEYWORD_ONLY', 'None'), ('key', 'KEYWORD_ONLY', 'None'), ('solver', 'KEYWORD_ONLY', "'direct'")),
        'fit_kernel_cg': (('key', 'POSITIONAL_OR_KEYWORD', None), ('masks', 'POSITIONAL_OR_KEYWORD', None), ('y', 'POSITIONAL_OR_KEYWORD', None), ('num_landmarks', 'KEYWORD_ONLY', None), ('kernel', 'KEYWORD_ONLY', "'linear+rbf'"), ('gamma', 'KEYWORD_ONLY', 'None'), ('ridge', 'KEYWORD_ONLY', 'None'), ('mix', 'KEYWORD_ONLY', 'None'), ('degree', 'KEYWORD_ONLY', '2'), ('coef0', 'KEYWORD_ONLY', '1.0'), ('tol', 'KEYWORD_ONLY', 'None'), ('max_iter', 'KEYWORD_ONLY', '500'), ('block_size', 'KEYWORD_ONLY', 'None'), ('mesh', 'KEYWORD_ONLY', 'None'), ('axis', 'KEYWORD_ONLY', 'None'), ('throw', 'KEYWORD_ONLY', 'True')),
        'fit_linear': (('masks', 'POSITIONAL_OR_KEYWORD', None), ('y', 'POSITIONAL_OR_KEYWORD', None), ('ridge', 'KEYWORD_ONLY', '0.0'), ('throw', 'KEYWORD_ONLY', 'True')),
        'fit_multifidelity': (('cheap_masks', 'POSITIONAL_OR_KEYWORD', None), ('cheap_y', 'POSITIONAL_OR_KEYWORD', None), ('real_masks', 'POSITIONAL_OR_KEYWORD', None), ('real_y', 'POSITIONAL_OR_KEYWORD', None), ('rho', 'KEYWORD_ONLY', 'None'), ('kernel_options', 'VAR_KEYWORD', None)),
        'fit_nystrom': (('key', 'POSITIONAL_OR_KEYWORD', None), ('masks', 'POSITIONAL_OR_KEYWORD', None), ('y', 'POSITIONAL_OR_KEYWORD', None), ('num_landmarks', 'KEYWORD_ONLY', None), ('kernel', 'KEYWORD_ONLY', "'linear+rbf'"), ('gamma', 'KEYWORD_ONLY', 'None'), ('ridge', 'KEYWORD_ONLY', 'None'), ('mix', 'KEYWORD_ONLY', 'None'), ('degree', 'KEYWORD_ONLY', '2'), ('coef0', 'KEYWORD_ONLY', '1.0'), ('block_size', 'KEYWORD_ONLY', '2048'), ('mesh', 'KEYWORD_ONLY', 'None'), ('axis', 'KEYWORD_ONLY', 'None'), ('throw', 'KEYWORD_ONLY', 'True')),
        'fit_quadratic': (('masks', 'POSITIONAL_OR_KEYWORD', None), ('y', 'POSITIONAL_OR_KEYWORD', None), ('ratio', 'KEYWORD_ONLY', 'None'), ('ridge', 'KEYWORD_ONLY', 'None'), ('block_size', 'KEYWORD_ONLY', '2048'), ('mesh', 'KEYWORD_ONLY', 'None'), ('axis', 'KEYWORD_ONLY', 'None'), ('throw', 'KEYWORD_ONLY', 'True'), ('ard_steps', 'KEYWORD_ONLY', '0')),
        'gradient_features': (('apply_fn', 'POSITIONAL_OR_KEYWORD', None), ('params', 'POSITIONAL_OR_KEYWORD', None), ('inputs', 'POSITIONAL_OR_KEYWORD', None), ('labels', 'POSITIONAL_OR_KEYWORD', None), ('projector', 'POSITIONAL_OR_KEYWORD', None), ('task_ids', 'KEYWORD_ONLY', 'None'), ('num_tasks', 'KEYWORD_ONLY', 'None'), ('chunk_size', 'KEYWORD_ONLY', 'None'), ('method', 'KEYWORD_ONLY', "'vjp'"), ('mesh', 'KEYWORD_ONLY', 'None'), ('throw', 'KEYWORD_ONLY', 'True')),
        'gradient_features_fn': (('apply_fn', 'POSITIONAL_OR_KEYWORD', None), ('projector', 'POSITIONAL_OR_KEYWORD', None), ('num_tasks', 'KEYWORD_ONLY', 'None'), ('chunk_size', 'KEYWORD_ONLY', 'None'), ('method', 'KEYWORD_ONLY', "'vjp'"), ('mesh', 'KEYWORD_ONLY', 'None'), ('throw', 'KEYWORD_ONLY', 'True')),
        'group_masks': (('sample_masks', 'POSITIONAL_OR_KEYWORD', None), ('group_ids', 'POSITIONAL_OR_KEYWORD', None), ('num_groups', 'KEYWORD_ONLY', 'None'), ('rule', 'KEYWORD_ONLY', "'exact'")),
        'influence_scores': (('train', 'POSITIONAL_OR_KEYWORD', None), ('target', 'POSITIONAL_OR_KEYWORD', None), ('loss', 'KEYWORD_ONLY', None), ('metric', 'KEYWORD_ONLY', "'loss'"), ('damping', 'KEYWORD_ONLY', None), ('num_tasks', 'KEYWORD_ONLY', 'None')),
        'interaction_scores': (('surrogate', 'POSITIONAL_OR_KEYWORD', None),),
        'lds': (('pred', 'POSITIONAL_OR_KEYWORD', None), ('actual', 'POSITIONAL_OR_KEYWORD', None)),
        'lds_interval': (('key', 'POSITIONAL_OR_KEYWORD', None), ('pred', 'POSITIONAL_OR_KEYWORD', None), ('actual', 'POSITIONAL_OR_KEYWORD', None), ('num_resamples', 'KEYWORD_ONLY', '1000'), ('level', 'KEYWORD_ONLY', '0.95'), ('batch_size', 'KEYWORD_ONLY', 'None')),
        'leave_one_out_masks': (('num_tasks', 'POSITIONAL_OR_KEYWORD', None), ('dtype', 'KEYWORD_ONLY', 'None')),
        'linearize': (('apply_fn', 'POSITIONAL_OR_KEYWORD', None), ('params0', 'POSITIONAL_OR_KEYWORD', None)),
        'load_subsets': (('path', 'POSITIONAL_OR_KEYWORD', None), ('format', 'KEYWORD_ONLY', 'None'), ('scores', 'KEYWORD_ONLY', 'None'), ('group_ids', 'KEYWORD_ONLY', 'None'), ('num_groups', 'KEYWORD_ONLY', 'None'), ('rule', 'KEYWORD_ONLY', "'exact'")),
        'loo_scores': (('surrogate', 'POSITIONAL_OR_KEYWORD', None),),
        'make_projector': (('key', 'POSITIONAL_OR_KEYWORD', None), ('params', 'POSITIONAL_OR_KEYWORD', None), ('dim', 'KEYWORD_ONLY', None), ('kind', 'KEYWORD_ONLY', "'rademacher'"), ('filter', 'KEYWORD_ONLY', 'None'), ('block_size', 'KEYWORD_ONLY', 'None'), ('nonzeros', 'KEYWORD_ONLY', '1')),
        'normalized_error': (('pred', 'POSITIONAL_OR_KEYWORD', None), ('actual', 'POSITIONAL_OR_KEYWORD', None)),
        'pair_masks': (('num_tasks', 'POSITIONAL_OR_KEYWORD', None), ('dtype', 'KEYWORD_ONLY', 'None')),
        'paired_lds_interval': (('key', 'POSITIONAL_OR_KEYWORD', None), ('pred_a', 'POSITIONAL_OR_KEYWORD', None), ('pred_b', 'POSITIONAL_OR_KEYWORD', None), ('actual', 'POSITIONAL_OR_KEYWORD', None), ('num_resamples', 'KEYWORD_ONLY', '1000'), ('level', 'KEYWORD_ONLY', '0.95'), ('batch_size', 'KEYWORD_ONLY', 'None')),
        'pearson': (('a', 'POSITIONAL_OR_KEYWORD', None), ('b', 'POSITIONAL_OR_KEYWORD', None)),
        'posterior_variance': (('surrogate', 'POSITIONAL_OR_KEYWORD', None), ('masks', 'POSITIONAL_OR_KEYWORD', None), ('include_noise', 'KEYWORD_ONLY', 'False')),
        'predict': (('surrogate', 'POSITIONAL_OR_KEYWORD', None), ('masks', 'POSITIONAL_OR_KEYWORD', None)),
        'project': (('projector', 'POSITIONAL_OR_KEYWORD', None), ('tree', 'POSITIONAL_OR_KEYWORD', None)),
        'projected_gradients': (('apply_fn', 'POSITIONAL_OR_KEYWORD', None), ('params', 'POSITIONAL_OR_KEYWORD', None), ('inputs', 'POSITIONAL_OR_KEYWORD', None), ('projector', 'POSITIONAL_OR_KEYWORD', None), ('chunk_size', 'KEYWORD_ONLY', 'None'), ('method', 'KEYWORD_ONLY', "'vjp'"), ('mesh', 'KEYWORD_ONLY', 'None')),
        'projector_matrix': (('projector', 'POSITIONAL_OR_KEYWORD', None), ('dtype', 'KEYWORD_ONLY', 'None')),
        'rank_data': (('x', 'POSITIONAL_OR_KEYWORD', None),),
        'relative_error': (('pred', 'POSITIONAL_OR_KEYWORD', None), ('actual', 'POSITIONAL_OR_KEYWORD', None)),
        'sample_subsets': (('key', 'POSITIONAL_OR_KEYWORD', None), ('num_tasks', 'KEYWORD_ONLY', None), ('num_subsets', 'KEYWORD_ONLY', None), ('p', 'KEYWORD_ONLY', 'None'), ('size', 'KEYWORD_ONLY', 'None'), ('dtype', 'KEYWORD_ONLY', 'None')),
        'select_masks': (('key', 'POSITIONAL_OR_KEYWORD', None), ('surrogate', 'POSITIONAL_OR_KEYWORD', None), ('num', 'POSITIONAL_OR_KEYWORD', None), ('num_candidates', 'KEYWORD_ONLY', '2048'), ('p', 'KEYWORD_ONLY', '0.5'), ('candidates', 'KEYWORD_ONLY', 'None'), ('criterion', 'KEYWORD_ONLY', "'integrated'")),
        'shapley_values': (('surrogate', 'POSITIONAL_OR_KEYWORD', None),),
        'shard_examples': (('tree', 'POSITIONAL_OR_KEYWORD', None), ('mesh', 'POSITIONAL_OR_KEYWORD', None), ('axis', 'KEYWORD_ONLY', "'data'")),
        'solve_kernel_cg': (('key', 'POSITIONAL_OR_KEYWORD', None), ('masks', 'POSITIONAL_OR_KEYWORD', None), ('rhs', 'POSITIONAL_OR_KEYWORD', None), ('gamma', 'KEYWORD_ONLY', None), ('ridge', 'KEYWORD_ONLY', None), ('kernel', 'KEYWORD_ONLY', "'rbf'"), ('mix', 'KEYWORD_ONLY', '0.0'), ('degree', 'KEYWORD_ONLY', '2'), ('coef0', 'KEYWORD_ONLY', '1.0'), ('num_landmarks', 'KEYWORD_ONLY', '256'), ('tol', 'KEYWORD_ONLY', 'None'), ('max_iter', 'KEYWORD_ONLY', '500'), ('block_size', 'KEYWORD_ONLY', 'None'), ('mesh', 'KEYWORD_ONLY', 'None'), ('axis', 'KEYWORD_ONLY', 'None'), ('throw', 'KEYWORD_ONLY', 'True')),
        'spearman': (('a', 'POSITIONAL_OR_KEYWORD', None), ('b', 'POSITIONAL_OR_KEYWORD', None)),
        'synthetic_game': (('key', 'POSITIONAL_OR_KEYWORD', None), ('num_tasks', 'KEYWORD_ONLY', None), ('num_targets', 'KEYWORD_ONLY', '1'), ('kind', 'KEYWORD_ONLY', "'interaction'"), ('noise', 'KEYWORD_ONLY', '0.1'), ('num_pairs', 'KEYWORD_ONLY', '6'), ('interaction_share', 'KEYWORD_ONLY', '0.5'), ('dtype', 'KEYWORD_ONLY', 'None')),
        'tracin_scores': (('train', 'POSITIONAL_OR_KEYWORD', None), ('target', 'POSITIONAL_OR_KEYWORD', None), ('loss', 'KEYWORD_ONLY', None), ('metric', 'KEYWORD_ONLY', "'loss'"), ('learning_rate', 'KEYWORD_ONLY', '1.0'), ('weighting', 'KEYWORD_ONLY', "'task'"), ('num_tasks', 'KEYWORD_ONLY', 'None')),
        'trak_scores': (('train', 'POSITIONAL_OR_KEYWORD', None), ('target', 'POSITIONAL_OR_KEYWORD', None), ('loss', 'KEYWORD_ONLY', None), ('metric', 'KEYWORD_ONLY', "'loss'"), ('damping', 'KEYWORD_ONLY', '0.0'), ('weighting', 'KEYWORD_ONLY', "'sum'"), ('num_tasks', 'KEYWORD_ONLY', 'None')),
    },
    'kernattr.adapters': {
        'Actor': (('args', 'VAR_POSITIONAL', None), ('kwargs', 'VAR_KEYWORD', None)),
        'Batch': ('fields', 'obs', 'task', 'action', 'reward', 'next_obs', 'done'),
        'OUTPUTS': None,
        'SAC': (('actor_def', 'POSITIONAL_OR_KEYWORD', None), ('critic_def', 'POSITIONAL_OR_KEYWORD', None), ('obs_dim', 'POSITIONAL_OR_KEYWORD', None), ('task_dim', 'POSITIONAL_OR_KEYWORD', None), ('act_dim', 'POSITIONAL_OR_KEYWORD', None)),
        'SACParams': ('fields', 'actor', 'critic', 'target_critic', 'log_alpha'),
        'TrainState': ('fields', 'params', 'anchor', 'opt_state', 'step'),
        'Transformer': (('args', 'VAR_POSITIONAL', None), ('kwargs', 'VAR_KEYWORD', None)),
        'TwinCritic': (('args', 'VAR_POSITIONAL', None), ('kwargs', 'VAR_KEYWORD', None)),
        'actor_mean_labels': (('batch', 'POSITIONAL_OR_KEYWORD', None),),
        'answer_fn': (('apply_fn', 'POSITIONAL_OR_KEYWORD', None), ('output', 'KEYWORD_ONLY', "'logits'")),
        'answer_output': (('logits', 'POSITIONAL_OR_KEYWORD', None), ('label', 'POSITIONAL_OR_KEYWORD', None), ('output', 'POSITIONAL_OR_KEYWORD', None)),
        'from_nnx': (('module', 'POSITIONAL_OR_KEYWORD', None), ('filter', 'KEYWORD_ONLY', "<class 'flax.nnx.variablelib.Param'>"), ('deterministic', 'KEYWORD_ONLY', 'True'), ('add_batch_axis', 'KEYWORD_ONLY', 'True')),
        'make_sac': (('key', 'POSITIONAL_OR_KEYWORD', None), ('obs_dim', 'KEYWORD_ONLY', None), ('task_dim', 'KEYWORD_ONLY', None), ('act_dim', 'KEYWORD_ONLY', None), ('hidden', 'KEYWORD_ONLY', '(64, 64)'), ('init_alpha', 'KEYWORD_ONLY', '0.1')),
        'make_train_step': (('sac', 'POSITIONAL_OR_KEYWORD', None), ('actor_optimizer', 'KEYWORD_ONLY', None), ('critic_optimizer', 'KEYWORD_ONLY', None), ('alpha_optimizer', 'KEYWORD_ONLY', 'None'), ('gamma', 'KEYWORD_ONLY', '0.9'), ('tau', 'KEYWORD_ONLY', '0.02'), ('bc_weight', 'KEYWORD_ONLY', '0.0'), ('q_weight', 'KEYWORD_ONLY', '1.0'), ('prox', 'KEYWORD_ONLY', '0.0'), ('target_entropy', 'KEYWORD_ONLY', 'None')),
        'pack_examples': (('batch', 'POSITIONAL_OR_KEYWORD', None), ('output', 'KEYWORD_ONLY', None), ('td_target', 'KEYWORD_ONLY', 'None'), ('noise', 'KEYWORD_ONLY', 'None')),
        'sac_losses': (('sac', 'POSITIONAL_OR_KEYWORD', None), ('params', 'POSITIONAL_OR_KEYWORD', None), ('batch', 'POSITIONAL_OR_KEYWORD', None), ('weights', 'POSITIONAL_OR_KEYWORD', None), ('key', 'POSITIONAL_OR_KEYWORD', None), ('gamma', 'KEYWORD_ONLY', '0.9'), ('bc_weight', 'KEYWORD_ONLY', '0.0'), ('q_weight', 'KEYWORD_ONLY', '1.0'), ('target_entropy', 'KEYWORD_ONLY', 'None')),
        'sac_output_fn': (('sac', 'POSITIONAL_OR_KEYWORD', None), ('params', 'POSITIONAL_OR_KEYWORD', None), ('output', 'KEYWORD_ONLY', None), ('filter', 'KEYWORD_ONLY', "'all'"), ('alpha', 'KEYWORD_ONLY', 'None')),
        'squash': (('mean', 'POSITIONAL_OR_KEYWORD', None), ('log_std', 'POSITIONAL_OR_KEYWORD', None), ('eps', 'POSITIONAL_OR_KEYWORD', None)),
        'tanh_gaussian_log_prob': (('mean', 'POSITIONAL_OR_KEYWORD', None), ('log_std', 'POSITIONAL_OR_KEYWORD', None), ('action', 'POSITIONAL_OR_KEYWORD', None)),
        'td_targets': (('sac', 'POSITIONAL_OR_KEYWORD', None), ('params', 'POSITIONAL_OR_KEYWORD', None), ('batch', 'POSITIONAL_OR_KEYWORD', None), ('key', 'POSITIONAL_OR_KEYWORD', None), ('gamma', 'KEYWORD_ONLY', '0.9')),
    },
    'kernattr.groundtruth': {
        'Comparison': ('fields', 'error', 'labels', 'base'),
        'EstimatorError': ('fields', 'relative_error', 'no_change_relative_error', 'relative_error_per_mask', 'elementwise_mean', 'elementwise_median', 'elementwise_p90', 'no_change_elementwise_mean', 'spearman', 'spearman_per_target', 'change_captured'),
        'FinetuneLabels': ('fields', 'labels', 'base', 'params'),
        'compare_estimator_to_finetuning': (('F_hat', 'POSITIONAL_OR_KEYWORD', None), ('apply_fn', 'POSITIONAL_OR_KEYWORD', None), ('params0', 'POSITIONAL_OR_KEYWORD', None), ('inputs', 'POSITIONAL_OR_KEYWORD', None), ('labels', 'POSITIONAL_OR_KEYWORD', None), ('task_ids', 'POSITIONAL_OR_KEYWORD', None), ('masks', 'POSITIONAL_OR_KEYWORD', None), ('target_inputs', 'POSITIONAL_OR_KEYWORD', None), ('target_labels', 'POSITIONAL_OR_KEYWORD', None), ('loss', 'KEYWORD_ONLY', None), ('metric', 'KEYWORD_ONLY', "'loss'"), ('finetune_kwargs', 'VAR_KEYWORD', None)),
        'estimator_error': (('F_hat', 'POSITIONAL_OR_KEYWORD', None), ('F', 'POSITIONAL_OR_KEYWORD', None), ('F0', 'POSITIONAL_OR_KEYWORD', 'None')),
        'evaluate_targets': (('apply_fn', 'POSITIONAL_OR_KEYWORD', None), ('stacked_params', 'POSITIONAL_OR_KEYWORD', None), ('inputs', 'POSITIONAL_OR_KEYWORD', None), ('labels', 'POSITIONAL_OR_KEYWORD', None), ('loss', 'KEYWORD_ONLY', None), ('metric', 'KEYWORD_ONLY', "'loss'"), ('mask_chunk_size', 'KEYWORD_ONLY', 'None')),
        'finetune_fn': (('apply_fn', 'POSITIONAL_OR_KEYWORD', None), ('loss', 'KEYWORD_ONLY', None), ('optimizer', 'KEYWORD_ONLY', None), ('num_steps', 'KEYWORD_ONLY', None), ('batch_size', 'KEYWORD_ONLY', 'None'), ('prox', 'KEYWORD_ONLY', '0.0'), ('mask_chunk_size', 'KEYWORD_ONLY', 'None'), ('init_fn', 'KEYWORD_ONLY', 'None'), ('shared_init', 'KEYWORD_ONLY', 'True'), ('common_random_numbers', 'KEYWORD_ONLY', 'True')),
        'finetune_labels': (('apply_fn', 'POSITIONAL_OR_KEYWORD', None), ('params0', 'POSITIONAL_OR_KEYWORD', None), ('inputs', 'POSITIONAL_OR_KEYWORD', None), ('labels', 'POSITIONAL_OR_KEYWORD', None), ('task_ids', 'POSITIONAL_OR_KEYWORD', None), ('masks', 'POSITIONAL_OR_KEYWORD', None), ('target_inputs', 'POSITIONAL_OR_KEYWORD', None), ('target_labels', 'POSITIONAL_OR_KEYWORD', None), ('loss', 'KEYWORD_ONLY', None), ('metric', 'KEYWORD_ONLY', "'loss'"), ('return_params', 'KEYWORD_ONLY', 'False'), ('finetune_kwargs', 'VAR_KEYWORD', None)),
        'finetune_on_masks': (('apply_fn', 'POSITIONAL_OR_KEYWORD', None), ('params0', 'POSITIONAL_OR_KEYWORD', None), ('inputs', 'POSITIONAL_OR_KEYWORD', None), ('labels', 'POSITIONAL_OR_KEYWORD', None), ('task_ids', 'POSITIONAL_OR_KEYWORD', None), ('masks', 'POSITIONAL_OR_KEYWORD', None), ('loss', 'KEYWORD_ONLY', None), ('optimizer', 'KEYWORD_ONLY', None), ('num_steps', 'KEYWORD_ONLY', None), ('batch_size', 'KEYWORD_ONLY', 'None'), ('key', 'KEYWORD_ONLY', 'None'), ('prox', 'KEYWORD_ONLY', '0.0'), ('mask_chunk_size', 'KEYWORD_ONLY', 'None'), ('init_fn', 'KEYWORD_ONLY', 'None'), ('shared_init', 'KEYWORD_ONLY', 'True'), ('common_random_numbers', 'KEYWORD_ONLY', 'True')),
    },
}
EXPERIMENTS = {
    'atlas': ('Cell', 'atlas_cells', 'atlas_table', 'centre_config', 'estimator_variants', 'run_atlas', 'variants_table', 'write_atlas_figure'),
    'families': ('FamilyData', 'interaction_report', 'make_family_data', 'other_pairs', 'pair_drop_masks', 'second_differences'),
    'fit': ('Split', 'fit_report', 'json_safe', 'split_heldout'),
    'icl': ('ICLExperimentConfig', 'aggregate', 'all_subsets', 'attribution_for_rule', 'format_table', 'kernel_subset_search', 'make_masks', 'pair_category', 'run_icl', 'tiny_config', 'write_plots'),
    'icl_cli': ('add_icl',),
    'icl_estimator': ('PromptInteractions', 'PromptPlan', 'PromptTaylor', 'anchor_weights', 'distinct_prompts', 'estimate_query_losses', 'gradient_alignment_scores', 'interaction_logits', 'interaction_query_losses', 'prompt_interactions', 'prompt_taylor', 'soft_prompt_logits', 'subset_indices', 'taylor_labels'),
    'icl_model': ('ICLConfig', 'ICLProblem', 'ICLTransformer', 'TrainedICL', 'cached_icl_model', 'default_cache_dir', 'demo_token', 'icl_curve', 'init_icl_model', 'make_icl_problem', 'make_prompt_batch', 'query_losses', 'query_token', 'train_icl_model'),
    'model': (),
    'modular': ('ModularData', 'grid_shape', 'make_modular_data', 'modular_labels', 'xor_codes'),
    'pipeline': ('Estimates', 'Features', 'GroundTruth', 'MaskSet', 'MethodOutputs', 'PipelineConfig', 'Prepared', 'cached_ground_truth', 'default_cache_dir', 'demo_config', 'estimate_stage', 'evaluate_stage', 'features_stage', 'format_table', 'ground_truth_stage', 'headline_config', 'last_layer_config', 'make_data', 'make_masks', 'make_runner', 'masks_stage', 'method_metrics', 'methods_stage', 'mixture_masks', 'prepare', 'prepare_stage', 'real_labels', 'run_pipeline', 'train_fn', 'training_key', 'write_stage'),
    'plots': ('save_figure', 'write_lds_plot', 'write_plots'),
    'rl': ('Features', 'Prepared', 'RLConfig', 'all_masks_with', 'baseline_scores', 'estimated_labels', 'features', 'format_table', 'make_finetune_eval', 'make_masks', 'prepare', 'run_masks', 'run_rl', 'run_seed', 'select', 'select_additive', 'target_examples', 'write_rl_plots'),
    'rl_cli': ('add_mt10', 'add_rl'),
    'rl_env': ('TaskSet', 'Transitions', 'collect', 'default_tasks', 'env_step', 'expert_preaction', 'rollout_returns', 'start_states'),
    'rl_mt10': ('MT10Config', 'MT10Run', 'collect_mt10', 'format_mt10', 'make_envs', 'rollout', 'run_mt10'),
}

# Names the README's code uses, besides every name in kernattr.__all__.
README_NAMES = {
    "kernattr.adapters": ("from_nnx", "Transformer", "make_sac", "sac_output_fn", "pack_examples",
                          "actor_mean_labels"),
    "kernattr.groundtruth": ("finetune_fn",),
    "kernattr.experiments.atlas": ("estimator_variants",),
    "kernattr.experiments.families": ("FAMILIES",),
}


def _params(obj):
    return [(p.name, p.kind.name, None if p.default is inspect.Parameter.empty else repr(p.default))
            for p in inspect.signature(obj).parameters.values()]


# Deliberate moves of single names (noted in the changelog): (module, name) -> new module.
NAMES_MOVED = {
    # the SAC training algorithm belongs to the RL experiments; the adapters keep the models
    # and their output functions
    ("kernattr.adapters", "TrainState"): "kernattr.experiments.sac",
    ("kernattr.adapters", "make_train_step"): "kernattr.experiments.sac",
    ("kernattr.adapters", "sac_losses"): "kernattr.experiments.sac",
    ("kernattr.adapters", "td_targets"): "kernattr.experiments.sac",
}


# Deprecated names (one public name per concept): still there, out of __all__, and they warn
# (on access for a module attribute, on call for a function kept for its own signature).
DEPRECATED = {
    ("kernattr", "estimate_subsets"): "call",  # -> estimate_subset_labels(..., diagnostics=True)
    ("kernattr.groundtruth", "estimator_error"): "access",  # -> kernattr.estimator_error
    ("kernattr.groundtruth", "EstimatorError"): "access",  # -> kernattr.EstimatorError
}


def _cases():
    for module, names in SIGNATURES.items():
        for name, pinned in names.items():
            yield pytest.param(module, name, pinned, id=f"{module}.{name}")


@pytest.mark.parametrize("module,name,pinned", list(_cases()))
def test_name_imports_with_its_signature(module, name, pinned):
    if (module, name) in NAMES_MOVED:
        old = importlib.import_module(module)
        assert name not in old.__all__ and not hasattr(old, name), f"stale {module}.{name}"
        module = NAMES_MOVED[module, name]
    mod = importlib.import_module(module)
    if (module, name) in DEPRECATED:
        assert name not in mod.__all__
        if DEPRECATED[module, name] == "access":
            with pytest.warns(DeprecationWarning):
                obj = getattr(mod, name)
        else:
            obj = getattr(mod, name)
    else:
        assert name in mod.__all__, f"{module}.__all__ lost {name!r}"
        obj = getattr(mod, name)
    if pinned is None:
        return
    if pinned[0] == "fields":
        fields = list(obj._fields)
        missing = [f for f in pinned[1:] if f not in fields]
        assert not missing, f"{module}.{name} lost fields {missing}"
        assert [f for f in fields if f in pinned[1:]] == list(pinned[1:]), "field order changed"
        return
    now = _params(obj)
    got = {p[0]: p for p in now}
    for p in pinned:
        assert p[0] in got, f"{module}.{name} lost argument {p[0]!r}"
        assert got[p[0]] == tuple(p) or list(got[p[0]]) == list(p), (
            f"{module}.{name}: argument {p[0]!r} was {p}, now {got[p[0]]}")
    # positional order of the pinned positional arguments is kept
    pos = [p[0] for p in now if p[1] in ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD")]
    pinned_pos = [p[0] for p in pinned if p[1] in ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD")]
    assert pos[: len(pinned_pos)] == pinned_pos
    # an added argument must not be required
    for p in now:
        if p[0] not in {q[0] for q in pinned}:
            assert p[2] is not None or p[1] in ("VAR_POSITIONAL", "VAR_KEYWORD"), (
                f"{module}.{name}: new argument {p[0]!r} has no default")


def test_every_public_name_is_one_object():
    """A name exported from two public namespaces is one object, and each public object is the
    one its defining module holds (no stale copies left behind by a move)."""
    import kernattr.adapters as ad
    import kernattr.groundtruth as gt

    for mod in (ka, ad, gt):
        for name in mod.__all__:
            obj = getattr(mod, name)
            home = getattr(obj, "__module__", None)
            qual = getattr(obj, "__qualname__", None)
            if home and qual and home.startswith("kernattr") and "." not in qual:
                assert getattr(importlib.import_module(home), qual) is obj, f"{mod.__name__}.{name}"
            assert getattr(mod, name) is obj  # lazy names resolve to the same object twice
    for name in set(gt.__all__) & set(ka.__all__):
        assert getattr(gt, name) is getattr(ka, name), name


def test_deprecated_estimate_subsets_warns_and_equals_the_new_call():
    import jax
    import jax.numpy as jnp

    g = jax.random.normal(jax.random.key(0), (6, 3))
    tr = ka.GradientFeatures(g, jnp.zeros(6), jnp.arange(6.0), jnp.array([0, 0, 1, 1, 2, 2]))
    tg = ka.GradientFeatures(g[:2], jnp.zeros(2), jnp.zeros(2))
    masks = jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    with pytest.warns(DeprecationWarning, match="diagnostics=True"):
        old = ka.estimate_subsets(tr, tg, masks, loss="squared", ridge=0.1)
    new = jax.jit(lambda m: ka.estimate_subset_labels(tr, tg, m, loss="squared", ridge=0.1,
                                                      diagnostics=True))(masks)
    assert isinstance(new, ka.SubsetEstimates)
    np.testing.assert_allclose(old.labels, new.labels, rtol=1e-6)
    labels = ka.estimate_subset_labels(tr, tg, masks, loss="squared", ridge=0.1)
    np.testing.assert_allclose(labels, new.labels, rtol=1e-6)


@pytest.mark.parametrize("module,names", sorted(README_NAMES.items()))
def test_readme_names_import(module, names):
    mod = importlib.import_module(module)
    for name in names:
        assert hasattr(mod, name), f"{module}.{name}"


def test_readme_ka_names_are_public():
    """Every ``ka.name`` the README uses is in ``kernattr.__all__``."""
    path = os.path.join(os.path.dirname(__file__), "..", "README.md")
    assert os.path.exists(path), "README.md is missing from the repository root"
    with open(path, encoding="utf-8") as f:
        used = set(re.findall(r"\bka\.([A-Za-z_]\w*)", f.read()))
    used -= {"__version__"}
    assert used, "the README uses no ka.* name"
    assert not sorted(used - set(ka.__all__))


# Deliberate moves (noted in the changelog): old module -> where its names live now.
MOVED = {
    # the engine of `kernattr fit` is the CLI's, not an experiment
    "kernattr.experiments.fit": "kernattr.cli_fit",
}


@pytest.mark.parametrize("module,names", sorted(EXPERIMENTS.items()))
def test_experiment_names_import(module, names):
    name = MOVED.get(f"kernattr.experiments.{module}", f"kernattr.experiments.{module}")
    mod = importlib.import_module(name)
    missing = [n for n in names if not hasattr(mod, n)]
    assert not missing, f"{name} lost {missing}"


@pytest.mark.parametrize("old", sorted(MOVED))
def test_moved_modules_are_gone(old):
    """A moved module leaves no stale copy behind."""
    with pytest.raises(ImportError):
        importlib.import_module(old)


def test_version():
    assert isinstance(ka.__version__, str) and ka.__version__
