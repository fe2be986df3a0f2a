"""Pruning: the engine (:func:`prune`), its config, the score registry, global selection, the plan/apply verbs,
compensation, rounds, surgery.

``prune(model, statistics, PruningConfig(...), calibration)`` does the whole job;
``plan(model, posterior, sparsity, ...) -> PruningPlan`` decides one shot with the model untouched;
``apply(model, plan)`` removes the groups for real.

The names load on first use, so ``from spam_hf.pruning.config import PruningConfig`` (the CLI's pruning
section, parsed for ``--help``) imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_PUBLIC = {  # name: the module of this package that defines it
    **dict.fromkeys(("compensate", "compensate_bias", "conditional_mean", "kron_conditional_mean", "removed_columns"),
                    "compensation"),
    **dict.fromkeys(("PruningConfig", "rounds_for_sparsity"), "config"),
    **dict.fromkeys(("group_damage", "group_damage_exact", "parameter_scores"), "damage"),
    "prune": "engine",
    **dict.fromkeys(("PruningPlan", "PruningResult", "apply", "plan"), "planning"),
    "refit_to_reference": "reconstruction",
    **dict.fromkeys(("geometric_targets", "prune_in_rounds"), "rounds"),
    **dict.fromkeys(("Score", "Statistics", "get_score", "group_scores", "register", "resolve_method", "score_names"),
                    "scores"),
    **dict.fromkeys(("BUDGETS", "LayerReport", "Selection", "check_reachable", "plot_selection", "removable_fraction",
                     "select_groups", "validate_sparsity"), "selection"),
    **dict.fromkeys(("mask_groups", "prune_groups"), "surgery"),
}
__all__ = sorted(_PUBLIC)


__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC, globals())


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .compensation import compensate, compensate_bias, conditional_mean, kron_conditional_mean, removed_columns  # noqa: F401
    from .config import PruningConfig, rounds_for_sparsity  # noqa: F401
    from .damage import group_damage, group_damage_exact, parameter_scores  # noqa: F401
    from .engine import prune  # noqa: F401
    from .planning import PruningPlan, PruningResult, apply, plan  # noqa: F401
    from .reconstruction import refit_to_reference  # noqa: F401
    from .rounds import geometric_targets, prune_in_rounds  # noqa: F401
    from .scores import (Score, Statistics, get_score, group_scores, register, resolve_method,  # noqa: F401
                         score_names)
    from .selection import (BUDGETS, LayerReport, Selection, check_reachable, plot_selection,  # noqa: F401
                            removable_fraction, select_groups, validate_sparsity)
    from .surgery import mask_groups, prune_groups  # noqa: F401
