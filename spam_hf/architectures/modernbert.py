"""ModernBERT (``modernbert``): fused ``attn.Wqkv``, gated ``mlp.Wi``, alternating local and global attention.

Layer ``i`` (under ``model.layers.i``) with ``H`` heads of width ``d = hidden / heads`` (from the config, unchanged
by pruning) and ``I`` MLP neurons:

* head ``h``: rows ``h·d:(h+1)·d`` of each third of ``attn.Wqkv`` (``[q | k | v]``, each ``H·d`` wide), columns
  ``h·d:(h+1)·d`` of ``attn.Wo``;
* neuron ``j``: rows ``j`` and ``I + j`` of ``mlp.Wi`` (``[input | gate]``, split by ``chunk(2)``), column ``j`` of
  ``mlp.Wo``.

The stock attention infers its head count from ``Wqkv``'s width (``view(..., 3, -1, d)``) and the MLP its width
from ``Wi``'s, so a pruned layer runs as it is: only the shapes go into the export's ``spam_pruning``. Local or
global attention is a per-layer mask and rotary embedding that pruning does not touch (block-sequential pruning
records one per kind). A layer with no head left gets a :class:`ZeroHeadAttention` (``Wo``'s bias).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from .base import (ArchitectureFamily, GroupSpec, fused_gated_neurons, fused_qkv_heads, register, set_module,
                   shrink_slices)
from .runtime import ZeroHeadAttention


@register
class ModernBertFamily(ArchitectureFamily):
    model_types = ("modernbert",)
    layers_path = "layers"
    uniform_kinds = ("neuron",)  # d = hidden / heads in the config: fewer heads need the remote code

    @staticmethod
    def head_dim(model: nn.Module) -> int:
        c = model.config
        return int(c.hidden_size // c.num_attention_heads)

    def group_specs(self, model: nn.Module, kv_groups_only: bool = False) -> List[GroupSpec]:
        d = self.head_dim(model)
        specs: List[GroupSpec] = []
        for i, layer in enumerate(self.layers(model)):
            ln = self._layer_name(model, i)
            if not isinstance(layer.attn, ZeroHeadAttention):
                width = layer.attn.Wqkv.out_features // 3
                heads = width // d
                if heads:
                    specs.append(fused_qkv_heads(i, f"{ln}.attn.Wqkv", f"{ln}.attn.Wo", heads, 1, d))
            neurons = layer.mlp.Wo.in_features
            if neurons:
                specs.append(fused_gated_neurons(i, f"{ln}.mlp.Wi", f"{ln}.mlp.Wo", neurons))
        return specs

    def shrink(self, model: nn.Module, keep: Dict[str, torch.Tensor], kv_groups_only: bool = False) -> None:
        for spec, kept in shrink_slices(model, self.group_specs(model), keep):
            if spec.kind == "head" and kept.numel() == 0:
                path = f"{self._layer_name(model, spec.layer)}.attn"
                set_module(model, path, ZeroHeadAttention(model.get_submodule(path).Wo, "Wo"))

    def stock_config(self, model: nn.Module) -> Optional[Dict[str, int]]:
        """``{"intermediate_size": I}`` when every layer kept all heads and the same number ``I`` of neurons."""
        specs = self.group_specs(model)
        heads = [s.count for s in specs if s.kind == "head"]
        neurons = {s.count for s in specs if s.kind == "neuron"}
        if len(heads) != len(self.layers(model)) or set(heads) != {model.config.num_attention_heads} \
                or len(neurons) != 1:
            return None
        return {"intermediate_size": neurons.pop()}
