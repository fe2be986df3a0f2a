"""Pruning: group damage (scores), global selection, the plan/apply verbs, compensation, rounds, surgery.

``plan(model, posterior, sparsity, ...) -> PruningPlan`` decides with the model untouched;
``apply(model, plan)`` removes the groups for real.
"""

from .compensation import compensate, conditional_mean, kron_conditional_mean
from .damage import DAMAGE_METHODS, EXACT_METHODS, SCORE_METHODS, group_damage, group_damage_exact, group_scores, \
    parameter_scores
from .plan import PruningPlan, apply, plan
from .reconstruction import refit_to_reference
from .rounds import RoundsResult, geometric_targets, prune_in_rounds, rounds_for_sparsity
from .selection import (BUDGETS, LayerReport, Selection, check_reachable, plot_selection, removable_fraction,
                        select_groups, validate_sparsity)
from .surgery import mask_groups, prune_groups

__all__ = ["BUDGETS", "DAMAGE_METHODS", "EXACT_METHODS", "group_damage_exact", "LayerReport", "PruningPlan", "RoundsResult", "SCORE_METHODS", "Selection",
           "apply", "check_reachable", "compensate", "conditional_mean", "kron_conditional_mean", "geometric_targets", "group_damage", "group_scores", "rounds_for_sparsity",
           "mask_groups", "parameter_scores", "plan", "plot_selection", "prune_groups", "prune_in_rounds", "refit_to_reference", "removable_fraction",
           "select_groups", "validate_sparsity"]
