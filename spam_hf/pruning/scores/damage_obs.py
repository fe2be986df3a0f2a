"""``damage-obs`` (the default for full models): the consuming slices' damage *after* the least-squares
compensation that follows the removal, ``½ tr(G W_C (Ā / Ā_RR) W_Cᵀ) / T`` with the Schur complement of the damped
input factor (Optimal Brain Surgeon for a block of columns; :func:`spam_hf.pruning.damage.group_damage` with
``compensated=True``). LoRA ranks as the columns of ``lora_B`` the compensation refits around. Calibration KFAC
factors; rounds with compensation by default."""

from ..damage import group_damage
from .base import Score, register


def damage_obs_scores(model, specs, statistics, seed):
    return group_damage(model, specs, statistics.factors, temperature=statistics.temperature, compensated=True)


DAMAGE_OBS = register(Score("damage-obs", damage_obs_scores, needs=("factors",), rounds=True, consuming_only=True,
                            summary="the damage of removing a group that is left after compensation (default)"))
