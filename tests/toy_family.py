"""A family added from this one file, as docs/design.md ("Adding a family") describes: OPT decoders.

OPT layer ``i`` (under ``model.decoder.layers.i``): head ``h`` owns rows ``h·d:(h+1)·d`` of
``self_attn.{q,k,v}_proj`` (+ bias) and those columns of ``self_attn.out_proj``; neuron ``j`` owns row
``j`` of ``fc1`` (+ bias) and column ``j`` of ``fc2``. A layer that loses every head gets
:class:`OptNoHeads`, this family's own runtime module, which export copies into the checkpoint.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

from spam_hf.architectures import ArchitectureFamily, GroupSpec, ZeroHeadAttention, register
from spam_hf.architectures.base import contiguous_blocks, set_module, shrink_slices


class OptNoHeads(ZeroHeadAttention):
    """An OPT attention with no heads left (recorded under its own ``spam_pruning`` key)."""

    spec_key = "opt_no_heads"


@register
class ToyOptFamily(ArchitectureFamily):
    model_types = ("opt",)
    layers_path = "decoder.layers"
    runtime_modules = (OptNoHeads,)
    runtime_attrs = ("num_heads",)

    @staticmethod
    def head_dim(model: nn.Module) -> int:
        return int(model.config.hidden_size // model.config.num_attention_heads)

    def group_specs(self, model: nn.Module, kv_groups_only: bool = False) -> List[GroupSpec]:
        d, specs = self.head_dim(model), []
        for i, layer in enumerate(self.layers(model)):
            ln = self._layer_name(model, i)
            if not isinstance(layer.self_attn, OptNoHeads):
                blocks = contiguous_blocks(layer.self_attn.q_proj.out_features // d, d)
                specs.append(GroupSpec(kind="head", layer=i, count=blocks.shape[0], attn_dim=d,
                                       row_index={f"{ln}.self_attn.{p}_proj": blocks for p in "qkv"},
                                       col_index={f"{ln}.self_attn.out_proj": blocks}))
            if layer.fc1.out_features:
                blocks = contiguous_blocks(layer.fc1.out_features, 1)
                specs.append(GroupSpec(kind="neuron", layer=i, count=blocks.shape[0],
                                       row_index={f"{ln}.fc1": blocks}, col_index={f"{ln}.fc2": blocks}))
        return specs

    def shrink(self, model: nn.Module, keep: Dict[str, torch.Tensor], kv_groups_only: bool = False) -> None:
        for spec, kept in shrink_slices(model, self.group_specs(model), keep):
            if spec.kind != "head":
                continue
            path = f"{self._layer_name(model, spec.layer)}.self_attn"
            attn = model.get_submodule(path)
            if kept.numel():
                attn.num_heads = int(kept.numel())
            else:
                set_module(model, path, OptNoHeads(attn.out_proj, "out_proj", attn.layer_idx, self.head_dim(model)))
