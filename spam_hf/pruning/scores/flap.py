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

from ...architectures import consuming_modules
from ...priors import params_aug
from .base import Score, register


def flap_scores(model, specs, statistics, seed):
    params = params_aug(model, consuming_modules(specs))
    out = {}
    for s in specs:
        total = torch.zeros(s.count, dtype=torch.float64)
        for m, idx in s.col_index.items():
            _, variance = statistics.input_moments[m]
            W = params[m][:, : variance.numel()].to("cpu", torch.float64)  # the bias column is no channel
            per_column = variance * W.square().sum(0)
            total += per_column[idx].sum(1)
        out[s.name] = total / total.mean().clamp_min(1e-30)
    return out


FLAP = register(Score("flap", flap_scores, needs=("input_moments",), consuming_only=True, compensation="bias",
                      summary="input fluctuation times column norm, with bias compensation (FLAP, a peer's method)"))
