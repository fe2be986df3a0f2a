"""``flap``: the fluctuation score of FLAP (An et al., AAAI 2024), a peer's method for LLMs. Input channel ``j`` of a
consuming module (O for a head, down for a neuron) scores ``Var(X_j) · ‖W_:,j‖²``, the variance of the channel over
the calibration tokens times its column's squared norm: how much the layer's output fluctuates with it, which a
constant (its mean, moved into the bias by ``bias`` compensation) cannot replace. A group scores the sum over its
columns.

FLAP's adaptive structure search standardises the scores of each layer's attention and MLP separately before one
global ranking. spam-hf ranks by score per cost (:mod:`spam_hf.pruning.selection`), which needs scores ≥ 0, so each
(layer, kind) is divided by its mean instead of standardised: the same across-layer comparison, on a ratio scale.
Calibration statistics (input moments of the consuming modules); one shot with ``bias`` compensation by default
(:func:`spam_hf.pruning.compensation.compensate_bias`), as FLAP prunes."""

import torch

from .base import Score, register, summed_over_columns


def flap_scores(model, specs, statistics, seed):
    def fluctuation(m, W):
        _, variance = statistics.input_moments[m]
        return variance * W[:, : variance.numel()].to("cpu", torch.float64).square().sum(0)  # no bias column

    scores = summed_over_columns(model, specs, fluctuation)
    return {name: total / total.mean().clamp_min(1e-30) for name, total in scores.items()}


FLAP = register(Score("flap", flap_scores, needs=("input_moments",), consuming_only=True, compensation="bias",
                      summary="input fluctuation times column norm, with bias compensation (FLAP, a peer's method)"))
