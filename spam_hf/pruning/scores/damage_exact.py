"""``damage-exact``: the consuming slices' damage without the Kronecker approximation, ``½ 1_Cᵀ M 1_C / T`` with ``M``
the Fisher of masks on the consuming module's input columns (:func:`spam_hf.pruning.damage.group_damage_exact`;
with sampled labels a GGN estimate, with true labels the mask Fisher of Kwon et al. 2022). Calibration statistics;
rounds with compensation by default."""

from ..damage import group_damage_exact
from .base import Score, register


def damage_exact_scores(model, specs, statistics, seed):
    return group_damage_exact(model, specs, statistics.mask_fisher, temperature=statistics.temperature)


DAMAGE_EXACT = register(Score("damage-exact", damage_exact_scores, needs=("mask_fisher",), rounds=True, consuming_only=True,
                              summary="the damage of zeroing a group's consuming columns from the mask Fisher "
                                      "(no Kronecker approximation, before compensation)"))
