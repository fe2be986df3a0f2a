"""``wanda-sp``: structured Wanda (the baseline of FLAP, An et al. 2024). A group's score is ``Σ_i Σ_{j∈C} |W_ij|·‖X_j‖``
over its consuming columns ``C`` (O's for a head, down's for a neuron, ``lora_B``'s for a rank) and every output row
``i``, with ``‖X_j‖`` the root mean square of input channel ``j`` over the calibration tokens, ``√A_jj`` (the
common ``√n`` of the Euclidean norm changes no order). Reads the consuming modules' input factors; one shot,
no compensation by default."""

import torch

from .base import Score, register, summed_over_columns


def wanda_sp_scores(model, specs, statistics, seed):
    def weighted_magnitude(m, W):
        A, _ = statistics.factors[m]
        rms = A.diagonal().clamp_min(0.0).sqrt().to("cpu", torch.float64)  # [in (+1)]
        return (W.abs() * rms).sum(0)

    return summed_over_columns(model, specs, weighted_magnitude)


WANDA_SP = register(Score("wanda-sp", wanda_sp_scores, needs=("factors",), consuming_only=True,
                          summary="|W| times the input's RMS over a group's consuming columns (Wanda-sp, a peer's "
                                  "baseline)"))
