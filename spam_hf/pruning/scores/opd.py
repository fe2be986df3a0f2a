"""``opd``: Optimal Posterior Damage. Per parameter ``s_i = θ_i² · P_ii`` with ``P = H / T + diag(δ)`` the Laplace
posterior precision (KFAC: ``diag H = diag(G) diag(A)ᵀ``), summed over the slices a group owns. Reads the trained
posterior's curvature diagonal and priors; one shot by default."""

from ..damage import group_sums, parameter_scores
from .base import Score, register


def opd_scores(model, specs, statistics, seed):
    per_param = parameter_scores(model, _modules(specs), "opd", statistics.prior, statistics.diagonal,
                                 statistics.temperature)
    return group_sums(specs, per_param)


def _modules(specs):
    return list(dict.fromkeys(m for s in specs for m in s.modules))


OPD = register(Score("opd", opd_scores, needs=("diagonal",),
                     summary="the diagonal posterior precision times the squared weights (SpaM's OPD)"))
