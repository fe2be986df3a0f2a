"""GPT-2: transformers ``Conv1D`` layers (weights stored ``in × out``) and a fused ``c_attn``.

Block ``i`` (under ``transformer.h.i``), with ``H`` heads of width ``d`` and ``E = H·d``:

* head ``h``: rows ``h·d:(h+1)·d`` of each third of ``attn.c_attn`` (query at offset 0, key at
  ``E``, value at ``2E``; with their bias entries), columns ``h·d:(h+1)·d`` of ``attn.c_proj``;
* neuron ``j``: row ``j`` of ``mlp.c_fc`` (+ bias), column ``j`` of ``mlp.c_proj``.

Rows and columns are those of the ``out × in`` view (:func:`~spam_hf.architectures.base.weight_out_in`),
so curvature, priors and scoring never see the transposed storage. After head pruning the attention
module's ``num_heads`` and ``split_size`` (the width of each third of ``c_attn``) are updated; export
records them in ``spam_pruning.module_attrs``.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from transformers.pytorch_utils import Conv1D

from .base import (ArchitectureFamily, GroupSpec, contiguous_blocks, fused_qkv_heads, register, set_module,
                   shrink_slices)
from .runtime import RuntimeModule, ZeroHeadAttention


class EmptyInputConv1D(Conv1D, RuntimeModule):
    """A ``Conv1D`` with no input features (an MLP that lost every neuron): outputs its bias.

    The stock ``Conv1D.forward`` cannot reshape a zero-width input; the parameters (``weight``
    ``0 × nf``, ``bias`` ``nf``) are those of a stock ``Conv1D(nf, 0)``. Also the resizer of every
    ``Conv1D`` (:func:`spam_hf.architectures.runtime.new_linear`).
    """

    resizes = Conv1D
    imports = ("from transformers.pytorch_utils import Conv1D",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.new_zeros(*x.shape[:-1], self.nf) + self.bias.to(x.dtype))

    @classmethod
    def resized(cls, like: nn.Module, fan_in: int, fan_out: int) -> nn.Module:
        """``Conv1D(nf=fan_out, nx=fan_in)``, or an empty-input one when ``fan_in == 0``."""
        return cls(fan_out, 0) if fan_in == 0 else Conv1D(fan_out, fan_in)


@register
class GPT2Family(ArchitectureFamily):
    model_types = ("gpt2",)
    layers_path = "h"
    runtime_modules = (EmptyInputConv1D,)
    runtime_attrs = ("num_heads", "split_size")
    uniform_kinds = ("neuron",)  # head_dim is n_embd / n_head in the stock class: fewer heads need our code
    fsdp2_refusal = "its Conv1D weights are stored in × out, so FSDP2's row shards would be input columns"

    @staticmethod
    def _head_dim(model: nn.Module) -> int:
        c = model.config
        if getattr(c, "add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention is not supported (its crossattention layers are not grouped)")
        return int(c.n_embd // c.n_head)

    def group_specs(self, model: nn.Module, kv_groups_only: bool = False) -> List[GroupSpec]:
        d = self._head_dim(model)
        specs: List[GroupSpec] = []
        for i, block in enumerate(self.layers(model)):
            ln = self._layer_name(model, i)
            if not isinstance(block.attn, ZeroHeadAttention):
                width = block.attn.c_attn.weight.shape[1] // 3  # Conv1D weight: in × out (= 3·H·d)
                heads = width // d
                if heads:
                    specs.append(fused_qkv_heads(i, f"{ln}.attn.c_attn", f"{ln}.attn.c_proj", heads, 1, d))
            neurons = block.mlp.c_fc.weight.shape[1]
            if neurons:
                specs.append(GroupSpec(
                    kind="neuron", layer=i, count=neurons,
                    row_index={f"{ln}.mlp.c_fc": contiguous_blocks(neurons, 1)},
                    col_index={f"{ln}.mlp.c_proj": contiguous_blocks(neurons, 1)},
                ))
        return specs

    def shrink(self, model: nn.Module, keep: Dict[str, torch.Tensor], kv_groups_only: bool = False) -> None:
        d = self._head_dim(model)
        for spec, kept in shrink_slices(model, self.group_specs(model), keep):
            if spec.kind != "head":
                continue
            path = f"{self._layer_name(model, spec.layer)}.attn"
            attn = model.get_submodule(path)
            if kept.numel() == 0:
                set_module(model, path, ZeroHeadAttention(attn.c_proj, "c_proj", attn.layer_idx, d))
            else:
                attn.num_heads = int(kept.numel())
                attn.split_size = int(kept.numel()) * d

    def stock_config(self, model: nn.Module) -> Optional[Dict[str, int]]:
        """``{"n_inner": I}`` when every block kept all heads (GPT-2 derives ``head_dim`` from
        ``n_embd / n_head``) and the same number ``I`` of neurons."""
        specs = self.group_specs(model)
        heads = [s.count for s in specs if s.kind == "head"]
        neurons = {s.count for s in specs if s.kind == "neuron"}
        if len(heads) != len(self.layers(model)) or set(heads) != {model.config.n_head} or len(neurons) != 1:
            return None
        return {"n_inner": neurons.pop()}
