"""Pruning: group damage (scores), global selection, the plan/apply verbs and surgery.

``plan(model, posterior, sparsity, ...) -> PruningPlan`` decides with the model untouched;
``apply(model, plan)`` removes the groups for real.
"""

from .damage import SCORE_METHODS, group_scores, parameter_scores
from .plan import PruningPlan, apply, plan
from .selection import BUDGETS, LayerReport, Selection, plot_selection, select_groups, validate_sparsity
from .surgery import mask_groups, prune_groups

__all__ = ["BUDGETS", "LayerReport", "PruningPlan", "SCORE_METHODS", "Selection", "apply", "group_scores",
           "mask_groups", "parameter_scores", "plan", "plot_selection", "prune_groups", "select_groups",
           "validate_sparsity"]
