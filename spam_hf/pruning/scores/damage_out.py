"""``damage-out``: :mod:`damage <spam_hf.pruning.scores.damage>` over the consuming slices only (the columns of O
for a head, of down for a neuron): removing a group *is* removing those, so their function-space damage is the
other candidate estimate. Calibration KFAC factors; rounds with compensation by default."""

from ..damage import group_damage
from .base import Score, register


def damage_out_scores(model, specs, statistics, seed):
    return group_damage(model, specs, statistics.factors, temperature=statistics.temperature, consuming_only=True)


DAMAGE_OUT = register(Score("damage-out", damage_out_scores, needs=("factors",), rounds=True, consuming_only=True,
                            summary="the damage of zeroing a group's consuming columns (KFAC, before compensation)"))
