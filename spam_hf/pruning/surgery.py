"""Physically remove selected groups (heads, neurons) from a model, in place."""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

from ..architectures.base import GroupSpec, get_family, weight_out_in


def prune_groups(model: nn.Module, keep: Dict[str, torch.Tensor], kv_groups_only: bool = False) -> nn.Module:
    """Shrink every Linear so that only groups ``keep[spec.name]`` remain; returns ``model``.

    ``keep`` names the specs of ``group_specs(model, kv_groups_only)``.

    Layers may lose every head (their attention becomes a ``ZeroHeadAttention``: the block keeps its
    residual path and output bias) or every neuron (zero-width MLP, output = down bias).
    """
    get_family(model).shrink(model, keep, kv_groups_only=kv_groups_only)
    return model


def mask_groups(model: nn.Module, specs: List[GroupSpec], keep: Dict[str, torch.Tensor]) -> nn.Module:
    """Zero (not remove) the weights of every group not in ``keep``, and route no token to a dropped expert
    (:meth:`ArchitectureFamily.mask`): the reference for :func:`prune_groups`."""
    mods = dict(model.named_modules())
    family = get_family(model)
    with torch.no_grad():
        for s in specs:
            dropped = sorted(set(range(s.count)) - set(torch.as_tensor(keep.get(s.name, range(s.count))).tolist()))
            if not dropped:
                continue
            d = torch.tensor(dropped, dtype=torch.long)
            for m, idx in s.row_index.items():
                rows = idx[d].reshape(-1)
                weight_out_in(mods[m])[rows] = 0
                if getattr(mods[m], "bias", None) is not None:
                    mods[m].bias[rows] = 0
            for m, idx in s.col_index.items():
                weight_out_in(mods[m])[:, idx[d].reshape(-1)] = 0
            family.mask(model, s, d)
    return model
