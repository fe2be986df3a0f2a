"""MPNet (``mpnet``, the base of all-mpnet-base-v2) and DeBERTa-v2 / v3 (``deberta-v2``): BERT-layout encoders.

MPNet layer ``i`` (under ``mpnet.encoder.layer.i``): head ``h`` owns rows ``h·d:(h+1)·d`` of ``attention.attn.{q,k,v}``
and those columns of ``attention.attn.o``; neuron ``j`` row ``j`` of ``intermediate.dense`` and column ``j`` of
``output.dense``. The encoder computes one relative position bias ``[B, H, T, T]`` for all layers (an embedding
with one column per head); a layer that kept heads ``K`` reads it at ``K``
(:class:`KeptHeadsMPNetSelfAttention`, recorded in ``spam_pruning["mpnet_kept_heads"]``).

DeBERTa-v2 layer ``i`` (under ``deberta.encoder.layer.i``): head ``h`` owns rows of
``attention.self.{query,key,value}_proj`` (and of ``pos_key_proj`` / ``pos_query_proj`` when the config does not
share the attention keys with the position projections) and columns of ``attention.output.dense``. The relative
position terms are projected by each layer's own (pruned) projections, so they follow the heads; every count the
attention reads is its own ``num_attention_heads`` / ``all_head_size``.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn
from transformers.models.mpnet.modeling_mpnet import MPNetSelfAttention

from .base import GroupSpec, register
from .bert import BertFamily, _EncoderFamily
from .runtime import RuntimeModule


class KeptHeadsMPNetSelfAttention(MPNetSelfAttention, RuntimeModule):
    """MPNet self-attention that kept heads ``kept_heads`` (indices of the original ones): the position bias the
    encoder shares between layers (``[B, H, T, T]``, every original head) is read at those heads.

    Made by changing the class of the stock module (parameter names stay), so re-pruning composes the indices.
    """

    spec_key = "mpnet_kept_heads"
    imports = ("from transformers.models.mpnet.modeling_mpnet import MPNetSelfAttention",)

    def forward(self, hidden_states, attention_mask=None, position_bias=None, *args, **kwargs):
        if position_bias is not None:
            index = torch.tensor(self.kept_heads, dtype=torch.long, device=position_bias.device)
            position_bias = position_bias.index_select(1, index)
        return super().forward(hidden_states, attention_mask, position_bias, *args, **kwargs)

    def spec(self) -> dict:
        """This module's ``mpnet_kept_heads`` entry."""
        return {"heads": list(self.kept_heads)}

    @classmethod
    def adopt(cls, attn: nn.Module, heads: List[int]) -> nn.Module:
        """``attn`` (a stock ``MPNetSelfAttention`` or one of these) reading the position bias at ``heads`` of the
        original heads, with its head counts set."""
        attn.__class__ = cls
        attn.kept_heads = [int(h) for h in heads]
        attn.num_attention_heads = len(attn.kept_heads)
        attn.all_head_size = len(attn.kept_heads) * attn.attention_head_size
        return attn

    @classmethod
    def rebuild(cls, old: nn.Module, entry: dict) -> nn.Module:
        return cls.adopt(old, entry["heads"])


@register
class MPNetFamily(_EncoderFamily):
    model_types = ("mpnet",)
    layers_path = "encoder.layer"
    q, k, v, o = "attention.attn.q", "attention.attn.k", "attention.attn.v", "attention.attn.o"
    up, down = "intermediate.dense", "output.dense"
    attention_path = "attention.attn"
    attention_out_child = "o"
    runtime_modules = (KeptHeadsMPNetSelfAttention,)

    def _heads_kept(self, attn: nn.Module, kept: torch.Tensor) -> None:
        before = getattr(attn, "kept_heads", None)
        heads = [before[i] for i in kept.tolist()] if before is not None else kept.tolist()
        KeptHeadsMPNetSelfAttention.adopt(attn, heads)


@register
class DebertaV2Family(BertFamily):
    """BERT's module layout but for the projections' names, and ``attention_head_size`` when the config has one."""

    model_types = ("deberta-v2",)
    q, k, v = "attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj"

    def _head_dim(self, model: nn.Module) -> int:
        c = model.config
        return int(getattr(c, "attention_head_size", None) or c.hidden_size // c.num_attention_heads)

    def group_specs(self, model: nn.Module, kv_groups_only: bool = False) -> List[GroupSpec]:
        """As BERT's, with the rows of the separate position projections (``share_att_key=False``) per head."""
        specs = super().group_specs(model, kv_groups_only)
        for s in specs:
            if s.kind != "head":
                continue
            ln = self._layer_name(model, s.layer)
            attn = model.get_submodule(f"{ln}.{self.attention_path}")
            blocks = s.row_index[f"{ln}.{self.q}"]
            for child in ("pos_key_proj", "pos_query_proj"):
                if isinstance(getattr(attn, child, None), nn.Linear):
                    s.row_index[f"{ln}.{self.attention_path}.{child}"] = blocks
        return specs
