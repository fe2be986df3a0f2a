"""Mixture-of-experts decoders (``mixtral``, ``qwen3_moe``): the LLaMA layout with a sparse block of routed
experts in place of the MLP.

Stock transformers keeps a sparse block's experts in two 3-D parameters (``experts.gate_up_proj`` ``[E, 2I, H]``,
``experts.down_proj`` ``[E, H, I]``) and its router as a raw ``[E, H]`` weight, while spam-hf's curvature, scores
and surgery work on Linear layers. So the first time a model's groups are asked for (:meth:`MoeFamily.group_specs`,
hence ``SpamTrainer`` and ``prune``), every sparse block becomes a :class:`RoutedExperts`: the router an
``nn.Linear(H, E)`` under ``mlp.router``, expert ``e`` three Linear layers under ``mlp.routed.e``
(``gate_proj``, ``up_proj``, ``down_proj``), computing exactly what the stock block computes.

Groups of sparse layer ``i`` (attention as in :mod:`.llama`; Qwen3-MoE's dense MLP layers as LLaMA's MLP):

* expert ``e`` (kind ``"expert"``, spec ``layer{i}.expert``): row ``e`` of the router;
* neuron ``j`` of expert ``e`` (kind ``"neuron"``, spec ``layer{i}.expert{e}.neuron``, ``e`` the expert's index in
  the unpruned block, so names stay while other experts go): row ``j`` of its
  ``gate_proj`` and ``up_proj``, column ``j`` of its ``down_proj``. Its ``parent`` is expert ``e``: selection
  removes single neurons, or a whole expert with its router row and every neuron it has left, at the bundle's
  summed score per cost, so one budget mixes both (an expert leaves with its last neuron).

Removing expert ``e`` deletes its router row and its MLP: each token then chooses its top ``k`` among the kept
experts (softmax over their logits), which is what the masked model computes with expert ``e``'s logit at
``-inf`` (:meth:`MoeFamily.mask`). An expert whose neurons are all zero but which is kept still receives its
routing weight and adds nothing.

Curvature: each expert computes on the tokens routed to it only. While a hook watches its layers (curvature
capture, the input factors of block-by-block pruning, reference outputs), every expert is called, even with no
token, and its layers carry ``spam_token_rows = (token positions, (B, T))`` during the call, so spam-hf's hooks put
its rows back in the ``[B, T]`` layout every other tracked layer has, zero at the tokens not routed to it (zero
rows in its input factor, zero output gradients; :func:`spam_hf.curvature.token_layout`). Under torch.export
(ONNX) every expert runs on every token instead, with weight 0 where it is not routed: the graph cannot hold a
data-dependent token count.

FLOPs (``--budget flops``, the reports): an expert's layers count on ``top_k / E`` of the tokens
(:attr:`~.base.GroupSpec.token_share`), what each computes on average when routing is balanced. Removing a whole
expert then saves parameters, not FLOPs: the tokens go to the other experts.

Export: when every sparse layer keeps the same number of experts and every expert the same width, the blocks go
back to the stock 3-D layout and the checkpoint is stock (``num_local_experts`` / ``num_experts`` and
``intermediate_size`` / ``moe_intermediate_size`` in the config); otherwise ``spam_pruning.routed_experts``
records each block's expert widths and the export ships :class:`RoutedExperts` as remote code.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from transformers.activations import ACT2FN

from .base import GroupSpec, contiguous_blocks, register, set_module
from .llama import HeadGatherLinear, LlamaFamily
from .runtime import RuntimeModule

#: per model type: (config field of the expert count, config field of an expert's width, routing weights renormalised
#: over the top k (None: ``config.norm_topk_prob``), routing weights cast to the router's dtype before weighting)
_MOE_FIELDS = {"mixtral": ("num_local_experts", "intermediate_size", True, False),
               "qwen3_moe": ("num_experts", "moe_intermediate_size", None, True)}


class RoutedExperts(nn.Module, RuntimeModule):
    """A sparse mixture-of-experts block whose router and experts are Linear layers.

    ``router``: ``Linear(H, E)``; ``routed[e]``: ``{gate_proj: Linear(H, I_e), up_proj: Linear(H, I_e),
    down_proj: Linear(I_e, H)}`` (widths may differ, ``I_e = 0`` included). For hidden states ``x``
    (``(B, T, H) -> (B, T, H)``): ``p = softmax(router(x) + logit_mask)`` in float32, the top
    ``k = min(top_k, E)`` experts per token with weights ``p`` (divided by their sum when ``normalize``), and
    ``y = Σ_{e in top k} w_e · down_e(act(gate_e(x)) · up_e(x))``. ``logit_mask`` is ``-inf`` at the experts
    masking has dropped (``dropped``, not saved), else 0; ``expert_ids`` are the kept experts' indices in the unpruned
    block. Recorded in ``spam_pruning["routed_experts"]``.
    """

    spec_key = "routed_experts"
    imports = ("from transformers.activations import ACT2FN",)

    def __init__(self, router: nn.Linear, experts: List[Tuple[nn.Module, nn.Module, nn.Module]], top_k: int,
                 normalize: bool, cast_weights: bool, act: str, jitter_noise: float = 0.0,
                 expert_ids: Optional[List[int]] = None) -> None:
        super().__init__()
        #: each expert's index in the unpruned block (group spec names stay the same while experts go)
        self.expert_ids = [int(e) for e in expert_ids] if expert_ids is not None else list(range(len(experts)))
        self.router = router
        self.routed = nn.ModuleList(nn.ModuleDict({"gate_proj": g, "up_proj": u, "down_proj": d})
                                    for g, u, d in experts)
        self.top_k, self.normalize, self.cast_weights = int(top_k), bool(normalize), bool(cast_weights)
        self.act, self.jitter_noise = act, float(jitter_noise)
        self.act_fn = ACT2FN[act]
        #: positions of the experts masking has dropped (a list, not a buffer: a checkpoint loaded on the meta device
        #: would leave a buffer that is not saved uninitialised)
        self.dropped: List[int] = []

    def _watched(self) -> bool:
        """Whether a hook watches an expert's layers (curvature, input factors): then every expert is called, with
        the tokens routed to it and their positions (module docstring)."""
        return any(m._forward_hooks or m._forward_pre_hooks for e in self.routed for m in e.values())

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        ex = self.routed[e]
        return ex["down_proj"](self.act_fn(ex["gate_proj"](x)) * ex["up_proj"](x))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.training and self.jitter_noise > 0:
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            hidden_states = hidden_states * noise
        size = hidden_states.shape[-1]
        x = hidden_states.reshape(-1, size)
        out = torch.zeros_like(x)
        experts = len(self.routed)
        if experts == 0 or len(self.dropped) == experts:
            self.router(hidden_states)  # hooks on the router still see a forward
            return out.view(hidden_states.shape)
        logits = self.router(hidden_states).reshape(-1, experts)  # the (B, T) layout, as every tracked layer sees
        logits32 = logits.float()
        if self.dropped:
            logits32 = logits32.index_fill(-1, torch.tensor(self.dropped, device=logits.device), float("-inf"))
        probs = torch.softmax(logits32, dim=-1)
        weights, chosen = torch.topk(probs, min(self.top_k, experts), dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.cast_weights:
            weights = weights.to(logits.dtype)
        if torch.compiler.is_compiling():  # torch.export (ONNX): no data-dependent token count in the graph
            for e in range(experts):
                hit = chosen == e  # [N, k]
                routed = hit.any(-1, keepdim=True).to(x.dtype)
                y = self._expert(e, (x * routed).view(hidden_states.shape)).reshape(-1, size)
                out = out + (y * (weights * hit).sum(-1, keepdim=True)).to(out.dtype)
            return out.view(hidden_states.shape)
        watched = self._watched()
        for e in range(experts):
            token, slot = torch.where(chosen == e)
            if not token.numel() and not watched:
                continue
            layers = list(self.routed[e].values())
            for layer in layers:  # where the rows come from, for hooks that need the [B, T] layout (module docstring)
                layer.spam_token_rows = (token, tuple(hidden_states.shape[:-1])) if watched else None
            try:
                y = self._expert(e, x[token]) * weights[token, slot, None]
            finally:
                for layer in layers:
                    layer.spam_token_rows = None
            out.index_add_(0, token, y.to(out.dtype))
        return out.view(hidden_states.shape)

    def widths(self) -> List[int]:
        """``[I_e]``: each expert's neurons."""
        return [int(e["up_proj"].out_features) for e in self.routed]

    def spec(self) -> dict:
        """This module's ``routed_experts`` entry."""
        w = self.router.weight
        return {"hidden_size": int(w.shape[1]), "widths": self.widths(), "expert_ids": self.expert_ids,
                "top_k": self.top_k, "normalize": self.normalize, "cast_weights": self.cast_weights, "act": self.act,
                "jitter_noise": self.jitter_noise}

    @classmethod
    def rebuild(cls, old: nn.Module, entry: dict) -> nn.Module:
        w = next(old.parameters())
        h = entry["hidden_size"]

        def linear(fan_in: int, fan_out: int) -> nn.Linear:
            return nn.Linear(fan_in, fan_out, bias=False, device=w.device, dtype=w.dtype)

        experts = [(linear(h, i), linear(h, i), linear(i, h)) for i in entry["widths"]]
        return cls(linear(h, len(experts)), experts, entry["top_k"], entry["normalize"], entry["cast_weights"],
                   entry["act"], entry.get("jitter_noise", 0.0), entry.get("expert_ids"))

    @classmethod
    def from_stock(cls, block: nn.Module, normalize: bool, cast_weights: bool, act: str) -> "RoutedExperts":
        """The stock sparse block ``block`` (``gate.weight [E, H]``, ``experts.gate_up_proj [E, 2I, H]`` as
        ``[gate | up]``, ``experts.down_proj [E, H, I]``) with its weights copied into Linear layers."""
        router_w = block.gate.weight.detach()
        gate_up, down = block.experts.gate_up_proj.detach(), block.experts.down_proj.detach()
        n = router_w.shape[0]
        i = gate_up.shape[1] // 2

        def linear(weight: torch.Tensor, trained: bool) -> nn.Linear:
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                layer.weight.copy_(weight)
            return layer.requires_grad_(trained)

        trained = block.experts.gate_up_proj.requires_grad
        experts = [(linear(gate_up[e, :i], trained), linear(gate_up[e, i:], trained), linear(down[e], trained))
                   for e in range(n)]
        module = cls(linear(router_w, block.gate.weight.requires_grad), experts, block.gate.top_k, normalize,
                     cast_weights, act, getattr(block, "jitter_noise", 0.0))
        return module.train(block.training)

    def fits_stock(self, reference: nn.Module) -> bool:
        """The stock block has as many experts, each of this block's width (and none is masked)."""
        gate_up = getattr(getattr(reference, "experts", None), "gate_up_proj", None)
        if gate_up is None:
            return False
        n, width = int(gate_up.shape[0]), int(gate_up.shape[1]) // 2
        return len(self.routed) == n and all(i == width for i in self.widths()) and not self.dropped

    def to_stock(self, reference: nn.Module) -> nn.Module:
        """The stock block (``reference``'s class) with these weights in its 3-D layout."""
        w = self.router.weight
        block = copy.deepcopy(reference).to_empty(device=w.device).to(w.dtype)
        with torch.no_grad():
            block.gate.weight.copy_(w)
            for e, ex in enumerate(self.routed):
                block.experts.gate_up_proj[e].copy_(torch.cat([ex["gate_proj"].weight, ex["up_proj"].weight]))
                block.experts.down_proj[e].copy_(ex["down_proj"].weight)
        return block.train(self.training)


@register
class MoeFamily(LlamaFamily):
    """Mixtral and Qwen3-MoE (module docstring): LLaMA's attention groups, and experts with their neurons."""

    model_types = tuple(_MOE_FIELDS)
    runtime_modules = (HeadGatherLinear, RoutedExperts)
    report_fields = {**LlamaFamily.report_fields, "expert": "experts"}
    uniform_kinds = ("head", "neuron")  # every expert of every layer the same width; experts stay
    device_map_refusal = ("spam-hf splits a mixture-of-experts block's expert tensors into Linear layers in memory, "
                          "which accelerate's offload hooks do not follow")
    fsdp2_refusal = ("spam-hf splits a mixture-of-experts block's expert tensors into Linear layers in memory, "
                     "which FSDP2 shards as 3-D tensors")

    def prepare(self, model: nn.Module) -> None:
        """Replace every stock sparse block by a :class:`RoutedExperts` (in place; idempotent)."""
        _, _, normalize, cast = _MOE_FIELDS[model.config.model_type]
        if normalize is None:
            normalize = bool(getattr(model.config, "norm_topk_prob", False))
        for i, layer in enumerate(self.layers(model)):
            mlp = layer.mlp
            if hasattr(getattr(mlp, "experts", None), "gate_up_proj"):
                if any(hasattr(m, "_hf_hook") for m in (layer, mlp, mlp.experts)):
                    raise ValueError("mixture-of-experts blocks are split into Linear layers in memory; this model's "
                                     "experts are dispatched by accelerate (--device-map), whose hooks would not "
                                     "follow the split")
                set_module(model, f"{self._layer_name(model, i)}.mlp",
                           RoutedExperts.from_stock(mlp, normalize, cast, model.config.hidden_act))

    def group_specs(self, model: nn.Module, kv_groups_only: bool = False) -> List[GroupSpec]:
        self.prepare(model)
        return super().group_specs(model, kv_groups_only)

    def _mlp_specs(self, mlp: nn.Module, path: str, i: int) -> List[GroupSpec]:
        if not isinstance(mlp, RoutedExperts):  # a dense layer (Qwen3-MoE's mlp_only_layers)
            if not hasattr(mlp, "up_proj"):
                raise ValueError(f"layer {i}'s MLP is a {type(mlp).__name__} without the 3-D expert tensors "
                                 "(experts.gate_up_proj) of transformers 5 or a dense up_proj; spam-hf cannot "
                                 "prune it")
            return super()._mlp_specs(mlp, path, i)
        if not len(mlp.routed):
            return []
        experts = GroupSpec(kind="expert", layer=i, count=len(mlp.routed),
                            row_index={f"{path}.router": contiguous_blocks(len(mlp.routed), 1)})
        specs = [experts]
        for e, width in enumerate(mlp.widths()):
            if width:  # named after the expert's index in the unpruned block, which stays while others go
                one, ex = contiguous_blocks(width, 1), f"{path}.routed.{e}"
                specs.append(GroupSpec(kind="neuron", layer=i, count=width,
                                       name=f"layer{i}.expert{mlp.expert_ids[e]}.neuron",
                                       row_index={f"{ex}.gate_proj": one, f"{ex}.up_proj": one},
                                       col_index={f"{ex}.down_proj": one},
                                       parent=experts.name, parent_index=torch.full((width,), e, dtype=torch.long),
                                       token_share=min(mlp.top_k, len(mlp.routed)) / len(mlp.routed)))
        return specs

    def shrink(self, model: nn.Module, keep: Dict[str, torch.Tensor], kv_groups_only: bool = False) -> None:
        """LLaMA's surgery, plus: a dropped expert loses its router row and its MLP (its neurons go with it); an
        expert not named in ``keep`` is kept when some neuron of it is (a parent leaves with its last child)."""
        specs = self.group_specs(model, kv_groups_only)
        keep = dict(keep)
        kept_experts: Dict[int, torch.Tensor] = {}
        for s in specs:
            if s.kind != "expert":
                continue
            neurons = {int(c.parent_index[0]): c.name for c in specs if c.parent == s.name}  # expert -> its spec
            if s.name not in keep:  # kept: an expert with a neuron kept (or without neurons to keep)
                keep[s.name] = torch.tensor([e for e in range(s.count) if e not in neurons or neurons[e] not in keep
                                             or len(keep[neurons[e]])], dtype=torch.long)
            kept = torch.as_tensor(keep[s.name], dtype=torch.long).sort().values
            for e in set(neurons) - set(kept.tolist()):
                keep[neurons[e]] = torch.tensor([], dtype=torch.long)
            if kept.numel() < s.count:
                kept_experts[s.layer] = kept
        super().shrink(model, keep, kv_groups_only)  # router rows and expert neurons, by their names before renumbering
        for i, kept in kept_experts.items():
            block = self.layers(model)[i].mlp
            block.routed = nn.ModuleList(block.routed[int(e)] for e in kept)
            block.expert_ids = [block.expert_ids[int(e)] for e in kept]
            position = {int(e): p for p, e in enumerate(kept)}
            block.dropped = [position[e] for e in block.dropped if e in position]

    def mask(self, model: nn.Module, spec: GroupSpec, dropped: torch.Tensor) -> None:
        """A dropped expert's logit becomes ``-inf``: no token is routed to it, as after its removal."""
        if spec.kind == "expert":
            block = self.layers(model)[spec.layer].mlp
            block.dropped = sorted(set(block.dropped) | set(dropped.tolist()))

    def mlp_config(self, model: nn.Module) -> Optional[Dict[str, int]]:
        """The expert count and width when every sparse layer kept the same ``E ≥ top_k`` experts, each the same
        ``I > 0`` wide, and Qwen3-MoE's dense layers the same ``intermediate_size``; ``None`` otherwise."""
        count_key, width_key, _, _ = _MOE_FIELDS[model.config.model_type]
        aliases = getattr(model.config, "attribute_map", {})  # transformers 5.2x: Qwen3-MoE's num_experts is an alias
        count_key, width_key = aliases.get(count_key, count_key), aliases.get(width_key, width_key)
        counts, widths, dense = set(), set(), set()
        for layer in self.layers(model):
            if isinstance(layer.mlp, RoutedExperts):
                counts.add(len(layer.mlp.routed))
                widths.update(layer.mlp.widths())
            elif hasattr(layer.mlp, "up_proj"):
                dense.add(layer.mlp.up_proj.out_features)
            else:  # still the stock block: unpruned
                counts.add(getattr(model.config, count_key))
                widths.add(getattr(model.config, width_key))
        if len(counts) > 1 or len(widths) > 1 or len(dense) > 1 or 0 in widths | dense:
            return None
        out = {}
        if counts:
            n = counts.pop()
            if n < model.config.num_experts_per_tok:
                return None
            out.update({count_key: n, width_key: widths.pop()})
        if dense:
            out["intermediate_size"] = dense.pop()
        return out
