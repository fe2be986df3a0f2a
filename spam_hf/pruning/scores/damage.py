"""``damage``: the increase of the Laplace objective's likelihood term when a whole group is set to zero, with the
correlations inside the group, under KFAC ``H = G ⊗ A`` per module: ``½ tr(G_RR · W_R A W_Rᵀ) / T`` for its rows
``R`` and ``½ tr(W_Cᵀ G W_C · A_CC) / T`` for its columns ``C`` (:func:`spam_hf.pruning.damage.group_damage`);
LoRA ranks by the damage of their merged term. Calibration KFAC factors of the current model; rounds with
compensation by default.

The prior term ``½ Σ δ θ²`` is left out of every damage score: at marginal-likelihood priors ``δ_g ≈ n_g / Σθ²``
it is about ``n_g / 2`` for every group, carries no ranking information and, measured on MiniLM, outweighs the
data term tenfold and empties whole layers (docs/results.md, "Group damage")."""

from ..damage import group_damage
from .base import Score, register


def damage_scores(model, specs, statistics, seed):
    return group_damage(model, specs, statistics.factors, temperature=statistics.temperature)


DAMAGE = register(Score("damage", damage_scores, needs=("factors",), rounds=True,
                        summary="the damage of zeroing a group's rows and columns (KFAC, before compensation)"))
