"""Encoder families with the BERT layout (bert, roberta, xlm-roberta, electra, camembert, ...) and DistilBERT.

BERT layer ``i`` (under ``<prefix>.encoder.layer.i``):

* head ``h``: rows ``h·d:(h+1)·d`` of ``attention.self.{query,key,value}`` (+ bias), columns of
  ``attention.output.dense``;
* neuron ``j``: row ``j`` of ``intermediate.dense`` (+ bias), column ``j`` of ``output.dense``.

DistilBERT layer ``i`` (under ``distilbert.transformer.layer.i``): ``attention.{q,k,v}_lin`` /
``attention.out_lin`` and ``ffn.lin1`` / ``ffn.lin2``.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

from .base import ArchitectureFamily, GroupSpec, contiguous_blocks, register, set_module, shrink_slices
from .runtime import ZeroHeadAttention


class _EncoderFamily(ArchitectureFamily):
    # module names relative to a layer
    q = k = v = o = up = down = ""
    attention_path: str = ""  # module replaced when a layer loses all heads
    attention_out_child: str | None = None  # child of attention_path kept as output projection
    intermediate_key: str = "intermediate_size"  # config key of the MLP width
    runtime_attrs = ("num_attention_heads", "n_heads", "all_head_size")  # what shrink() sets on attention
    uniform_kinds = ("neuron",)  # the stock classes derive the head size from hidden / heads: fewer heads need our code

    def _head_dim(self, model: nn.Module) -> int:
        """``hidden / heads`` from the config (what the stock classes compute)."""
        c = model.config
        return int(c.hidden_size // c.num_attention_heads)

    def group_specs(self, model: nn.Module, kv_groups_only: bool = False) -> List[GroupSpec]:
        d = self._head_dim(model)
        specs: List[GroupSpec] = []
        for i, layer in enumerate(self.layers(model)):
            ln = self._layer_name(model, i)
            try:
                heads = layer.get_submodule(self.q).out_features // d
            except AttributeError:  # the layer lost every head: its attention is a ZeroHeadAttention
                heads = 0
            if heads:
                blocks = contiguous_blocks(heads, d)
                specs.append(GroupSpec(
                    kind="head", layer=i, count=heads, attn_dim=d,
                    row_index={f"{ln}.{self.q}": blocks, f"{ln}.{self.k}": blocks, f"{ln}.{self.v}": blocks},
                    col_index={f"{ln}.{self.o}": blocks},
                ))
            neurons = layer.get_submodule(self.up).out_features
            if neurons:
                blocks = contiguous_blocks(neurons, 1)
                specs.append(GroupSpec(
                    kind="neuron", layer=i, count=neurons,
                    row_index={f"{ln}.{self.up}": blocks}, col_index={f"{ln}.{self.down}": blocks},
                ))
        return specs

    def shrink(self, model: nn.Module, keep: Dict[str, torch.Tensor], kv_groups_only: bool = False) -> None:
        d = self._head_dim(model)
        for spec, kept in shrink_slices(model, self.group_specs(model), keep):
            if spec.kind == "head":
                attn = model.get_submodule(f"{self._layer_name(model, spec.layer)}.{self.attention_path}")
                for attr in ("num_attention_heads", "n_heads"):
                    if hasattr(attn, attr):
                        setattr(attn, attr, int(kept.numel()))
                if hasattr(attn, "all_head_size"):
                    attn.all_head_size = int(kept.numel()) * d
                if kept.numel():
                    self._heads_kept(attn, kept)
                if kept.numel() == 0:
                    out_proj = getattr(attn, self.attention_out_child) if self.attention_out_child else None
                    path = f"{self._layer_name(model, spec.layer)}.{self.attention_path}"
                    set_module(model, path, ZeroHeadAttention(out_proj, self.attention_out_child))

    def _heads_kept(self, attn: nn.Module, kept: torch.Tensor) -> None:
        """What else an attention module that kept heads ``kept`` (of its current ones) needs (MPNet: the shared
        position bias read at those heads)."""

    def stock_config(self, model: nn.Module):
        """``{intermediate_size: I}`` when every layer kept all heads and the same number ``I`` of neurons."""
        specs = self.group_specs(model)
        heads = [s.count for s in specs if s.kind == "head"]
        neurons = {s.count for s in specs if s.kind == "neuron"}
        n_layers = len(self.layers(model))
        if len(heads) != n_layers or len(set(heads)) != 1 or len(neurons) != 1:
            return None
        return {self.intermediate_key: neurons.pop()}


@register
class BertFamily(_EncoderFamily):
    model_types = ("bert", "roberta", "xlm-roberta", "electra", "camembert", "data2vec-text", "xmod",
                   "roberta-prelayernorm")
    layers_path = "encoder.layer"
    q, k, v = "attention.self.query", "attention.self.key", "attention.self.value"
    o = "attention.output.dense"
    up, down = "intermediate.dense", "output.dense"
    attention_path = "attention.self"
    attention_out_child = None


@register
class DistilBertFamily(_EncoderFamily):
    model_types = ("distilbert",)
    layers_path = "transformer.layer"
    q, k, v, o = "attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin"
    up, down = "ffn.lin1", "ffn.lin2"
    attention_path = "attention"
    attention_out_child = "out_lin"
    intermediate_key = "hidden_dim"

    def _head_dim(self, model: nn.Module) -> int:
        c = model.config
        return int(c.dim // c.n_heads)
