"""Phi-3 (``phi3``): fused ``self_attn.qkv_proj`` and ``mlp.gate_up_proj``.

Layer ``i`` (under ``model.layers.i``) with head width ``d``, ``H`` query heads, ``K`` key/value heads and
``r = H / K`` query heads per KV head; ``qkv_proj``'s rows are ``[q (H·d) | k (K·d) | v (K·d)]`` and
``gate_up_proj``'s are ``[gate (I) | up (I)]`` (the MLP splits them with ``chunk(2)``):

* KV group ``g`` (kind ``"head"``, always whole groups: the fused layout has no room for the gathered K/V
  projection LLaMA uses for uneven query heads per KV head): query rows ``g·r·d:(g+1)·r·d``, key rows
  ``H·d + g·d:(g+1)·d`` and value rows ``H·d + K·d + g·d:(g+1)·d`` of ``qkv_proj``, and columns ``g·r·d:(g+1)·r·d``
  of ``o_proj``. Without GQA (Phi-3-mini: 32 heads on 32 KV heads) a group is one head;
* neuron ``j``: rows ``j`` and ``I + j`` of ``gate_up_proj``, column ``j`` of ``down_proj``.

Surgery keeps the rows of a fused projection in ascending order, so the kept layout is again
``[q | k | v]`` and ``[gate | up]``. The stock attention splits ``qkv`` at ``config.num_attention_heads · d``
(the shared config) and ``num_key_value_heads · d`` (its own attribute): after pruning, each attention module
gets its own copy of the config with its layer's head count (``config.num_attention_heads`` in
``spam_pruning.module_attrs``, restored by the export's runtime). A layer with no group left gets a
:class:`ZeroHeadAttention`.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from .base import (ArchitectureFamily, GroupSpec, fused_gated_neurons, fused_qkv_heads, register, set_module,
                   shrink_slices)
from .runtime import ZeroHeadAttention, set_module_attr


@register
class Phi3Family(ArchitectureFamily):
    model_types = ("phi3",)
    layers_path = "layers"
    runtime_attrs = ("num_key_value_heads", "config.num_attention_heads")
    lora_targets = ("qkv_proj",)  # peft's q_proj / v_proj default, fused
    uniform_kinds = ("head", "neuron")

    @staticmethod
    def head_dim(model: nn.Module) -> int:
        c = model.config
        return int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)

    def group_specs(self, model: nn.Module, kv_groups_only: bool = False) -> List[GroupSpec]:
        d = self.head_dim(model)
        specs: List[GroupSpec] = []
        for i, layer in enumerate(self.layers(model)):
            ln = self._layer_name(model, i)
            attn = layer.self_attn
            if not isinstance(attn, ZeroHeadAttention):
                kv = int(attn.num_key_value_heads)
                heads = int(attn.config.num_attention_heads)
                if kv and heads % kv:
                    raise ValueError(f"layer {i}: {heads} query heads do not split evenly over {kv} KV heads")
                if kv:
                    specs.append(fused_qkv_heads(i, f"{ln}.self_attn.qkv_proj", f"{ln}.self_attn.o_proj", kv,
                                                 heads // kv, d))
            neurons = layer.mlp.down_proj.in_features
            if neurons:
                specs.append(fused_gated_neurons(i, f"{ln}.mlp.gate_up_proj", f"{ln}.mlp.down_proj", neurons))
        return specs

    def shrink(self, model: nn.Module, keep: Dict[str, torch.Tensor], kv_groups_only: bool = False) -> None:
        d = self.head_dim(model)
        specs = self.group_specs(model)
        per_group = {s.name: int(model.get_submodule(f"{self._layer_name(model, s.layer)}.self_attn")
                                 .num_key_value_groups) for s in specs if s.kind == "head"}
        for spec, kept in shrink_slices(model, specs, keep):
            if spec.kind != "head":
                continue
            path = f"{self._layer_name(model, spec.layer)}.self_attn"
            attn = model.get_submodule(path)
            if kept.numel() == 0:
                set_module(model, path, ZeroHeadAttention(attn.o_proj, "o_proj", attn.layer_idx, d))
                continue
            set_module_attr(attn, "num_key_value_heads", int(kept.numel()))
            set_module_attr(attn, "config.num_attention_heads", int(kept.numel()) * per_group[spec.name])

    def stock_config(self, model: nn.Module) -> Optional[Dict[str, int]]:
        """Head counts, ``head_dim`` and ``intermediate_size`` when every layer kept the same numbers."""
        shapes = set()
        for layer in self.layers(model):
            attn = layer.self_attn
            if isinstance(attn, ZeroHeadAttention):
                return None
            shapes.add((int(attn.num_key_value_heads), int(attn.config.num_attention_heads),
                        layer.mlp.down_proj.in_features))
        if len(shapes) != 1:
            return None
        kv, heads, neurons = shapes.pop()
        if not kv or not neurons:
            return None
        return {"num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": self.head_dim(model),
                "intermediate_size": neurons}
