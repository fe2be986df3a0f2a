"""Pruning: the engine (:func:`prune`), its config, the score registry, global selection, the plan/apply verbs,
compensation, rounds, surgery.

``prune(model, statistics, PruningConfig(...), calibration)`` does the whole job;
``plan(model, posterior, sparsity, ...) -> PruningPlan`` decides one shot with the model untouched;
``apply(model, plan)`` removes the groups for real.
"""

from .compensation import compensate, compensate_bias, conditional_mean, kron_conditional_mean, removed_columns
from .config import PruningConfig, rounds_for_sparsity
from .damage import group_damage, group_damage_exact, parameter_scores
from .engine import prune
from .plan import PruningPlan, PruningResult, apply, plan
from .reconstruction import refit_to_reference
from .rounds import geometric_targets, prune_in_rounds
from .scores import Score, Statistics, get_score, group_scores, register, resolve_method, score_names
from .selection import (BUDGETS, LayerReport, Selection, check_reachable, plot_selection, removable_fraction,
                        select_groups, validate_sparsity)
from .surgery import mask_groups, prune_groups

__all__ = ["BUDGETS", "LayerReport", "PruningConfig", "PruningPlan", "PruningResult", "Score", "Selection",
           "Statistics", "apply", "check_reachable", "compensate", "compensate_bias", "conditional_mean",
           "geometric_targets", "get_score", "group_damage", "group_damage_exact", "group_scores",
           "kron_conditional_mean", "mask_groups", "parameter_scores", "plan", "plot_selection", "prune",
           "prune_groups", "prune_in_rounds", "refit_to_reference", "register", "removable_fraction",
           "removed_columns", "resolve_method", "rounds_for_sparsity", "score_names", "select_groups",
           "validate_sparsity"]
