"""``magnitude``: ``Σ θ_i²`` over the slices a group owns. A baseline that needs no statistics."""

from ..damage import group_sums, parameter_scores
from .base import Score, register


def magnitude_scores(model, specs, statistics, seed):
    modules = list(dict.fromkeys(m for s in specs for m in s.modules))
    return group_sums(specs, parameter_scores(model, modules, "magnitude"))


MAGNITUDE = register(Score("magnitude", magnitude_scores, summary="the squared weights (baseline)"))
