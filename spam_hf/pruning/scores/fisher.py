"""``fisher``: ``Σ θ_i² H_ii`` over the slices a group owns (the curvature diagonal without prior or temperature).
A baseline on the trained posterior's curvature diagonal."""

from ..damage import group_sums, parameter_scores
from .base import Score, register


def fisher_scores(model, specs, statistics, seed):
    modules = list(dict.fromkeys(m for s in specs for m in s.modules))
    return group_sums(specs, parameter_scores(model, modules, "fisher", curvature=statistics.diagonal))


FISHER = register(Score("fisher", fisher_scores, needs=("diagonal",),
                        summary="the curvature diagonal times the squared weights, no prior (baseline)"))
