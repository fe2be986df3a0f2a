"""LLaMA-layout decoders (llama, mistral, qwen2, qwen3): gated MLP and grouped-query attention.

Layer ``i`` (under ``model.layers.i``), with ``K`` key/value heads, ``r = H / K`` query heads per KV
head (``repeat_kv`` gives query head ``h`` the KV head ``h // r``) and head width ``d``:

* KV group ``g`` (kind ``"head"``): rows ``g·d:(g+1)·d`` of ``self_attn.k_proj`` and ``v_proj``,
  rows ``g·r·d:(g+1)·r·d`` of ``self_attn.q_proj`` (the ``r`` query heads sharing it) and the same
  columns of ``self_attn.o_proj``. Without GQA (``r = 1``) a group is one attention head.
* neuron ``j``: row ``j`` of ``mlp.gate_proj`` and ``mlp.up_proj``, column ``j`` of ``mlp.down_proj``.

Pruning whole KV groups keeps ``r``, ``head_dim`` and the rotary embedding unchanged, so the stock
attention runs on the smaller projections (it infers the head count from their width). A layer
with no group left gets a :class:`ZeroHeadAttention` that still advances the KV cache.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from ..export.modeling_spam import ZeroHeadAttention
from .base import ArchitectureFamily, GroupSpec, contiguous_blocks, register, set_module, shrink_slices


@register
class LlamaFamily(ArchitectureFamily):
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    layers_path = "layers"

    @staticmethod
    def _dims(model: nn.Module) -> tuple:
        """``(head_dim d, query heads per KV head r)`` from the config."""
        c = model.config
        d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        if c.num_attention_heads % kv:
            raise ValueError(f"num_attention_heads={c.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={kv}")
        return int(d), int(c.num_attention_heads // kv)

    def group_specs(self, model: nn.Module) -> List[GroupSpec]:
        d, r = self._dims(model)
        specs: List[GroupSpec] = []
        for i, layer in enumerate(self.layers(model)):
            ln = self._layer_name(model, i)
            attn = layer.self_attn
            if not isinstance(attn, ZeroHeadAttention):
                groups = attn.k_proj.out_features // d
                if groups:
                    kv, q = contiguous_blocks(groups, d), contiguous_blocks(groups, r * d)
                    specs.append(GroupSpec(
                        kind="head", layer=i, count=groups, attn_dim=r * d,
                        row_index={f"{ln}.self_attn.q_proj": q, f"{ln}.self_attn.k_proj": kv,
                                   f"{ln}.self_attn.v_proj": kv},
                        col_index={f"{ln}.self_attn.o_proj": q},
                    ))
            neurons = layer.mlp.up_proj.out_features
            if neurons:
                one = contiguous_blocks(neurons, 1)
                specs.append(GroupSpec(
                    kind="neuron", layer=i, count=neurons,
                    row_index={f"{ln}.mlp.gate_proj": one, f"{ln}.mlp.up_proj": one},
                    col_index={f"{ln}.mlp.down_proj": one},
                ))
        return specs

    def shrink(self, model: nn.Module, keep: Dict[str, torch.Tensor]) -> None:
        d, _ = self._dims(model)
        for spec, kept in shrink_slices(model, self.group_specs(model), keep):
            if spec.kind == "head" and kept.numel() == 0:
                path = f"{self._layer_name(model, spec.layer)}.self_attn"
                attn = model.get_submodule(path)
                set_module(model, path, ZeroHeadAttention(attn.o_proj, "o_proj", attn.layer_idx, d))

    def stock_config(self, model: nn.Module) -> Optional[Dict[str, int]]:
        """Head counts, ``head_dim`` and ``intermediate_size`` when every layer kept the same numbers."""
        d, r = self._dims(model)
        specs = self.group_specs(model)
        groups = [s.count for s in specs if s.kind == "head"]
        neurons = [s.count for s in specs if s.kind == "neuron"]
        n = len(self.layers(model))
        if len(groups) != n or len(neurons) != n or len(set(groups)) != 1 or len(set(neurons)) != 1:
            return None
        return {"num_attention_heads": groups[0] * r, "num_key_value_heads": groups[0], "head_dim": d,
                "intermediate_size": neurons[0]}
