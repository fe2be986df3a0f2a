"""LLaMA-layout decoders (llama, mistral, qwen2, qwen3, granite, smollm3, gemma2, gemma3_text): gated MLP and
grouped-query attention under ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``.

What the other members add sits outside the pruned projections and needs nothing here: Granite's multipliers,
SmolLM3's layers without rotary embedding, Gemma's ``head_dim`` apart from ``hidden / heads`` (read from the
config), attention soft-capping, the norms around each sub-block and Qwen 3 / Gemma 3's per-head ``q_norm`` /
``k_norm``. Gemma's alternating sliding and full attention is a per-block mask (block-sequential pruning records
one per kind). OLMo 2 (:class:`Olmo2Family`, below) normalises all heads of a layer at once; Phi-3 has fused
projections (``phi3.py``).

Layer ``i`` (under ``model.layers.i``) with head width ``d``, ``H`` query heads and ``K`` key/value
heads; query head ``h`` reads KV head ``kv(h)`` (stock: ``h // r`` with ``r = H / K``, what
``repeat_kv`` does):

* query head ``h`` (kind ``"head"``): rows ``h·d:(h+1)·d`` of ``self_attn.q_proj`` and the same
  columns of ``self_attn.o_proj``; its ``parent`` is KV head ``kv(h)``;
* KV head ``g`` (kind ``"kv_head"``): rows ``g·d:(g+1)·d`` of ``self_attn.k_proj`` and ``v_proj``.
  It is removed exactly when its last query head is (selection keeps ≥ 1 query head per kept KV head);
* without GQA (``r = 1``) one ``"head"`` group owns its Q, K, V rows and O columns;
* with ``kv_groups_only`` a ``"head"`` group is a whole KV group: its K/V rows and the Q rows / O
  columns of the ``r`` query heads that read it;
* neuron ``j``: row ``j`` of ``mlp.gate_proj`` and ``mlp.up_proj``, column ``j`` of ``mlp.down_proj``.

After pruning, ``head_dim`` and the rotary embedding are unchanged and the stock attention runs on
the narrower projections (it infers the head counts from their widths). When every kept KV head of
a layer keeps the same number ``q`` of query heads, the layer's ``num_key_value_groups`` becomes
``q``; otherwise ``k_proj``/``v_proj`` become :class:`HeadGatherLinear` (weights stored once, output
repeated per query head) and ``num_key_value_groups`` is 1. A layer with no head left gets a
:class:`ZeroHeadAttention` that still advances the KV cache.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from .base import ArchitectureFamily, GroupSpec, contiguous_blocks, register, set_module, shrink_slices
from .runtime import RuntimeModule, ZeroHeadAttention


class HeadGatherLinear(nn.Module, RuntimeModule):
    """A key or value projection whose KV heads are repeated, one per query head.

    ``linear`` computes the ``K`` KV heads (``K·d`` outputs, weights stored once); output head ``h``
    is KV head ``kv_heads[h]``, so the stock attention runs with ``num_key_value_groups = 1`` when
    the query heads per KV head differ. The KV cache of such a layer holds ``len(kv_heads)`` heads.

    Shapes: ``(..., in) -> (..., len(kv_heads)·d)``. Recorded in ``spam_pruning["kv_gather"]``.
    """

    spec_key = "kv_gather"

    def __init__(self, linear: nn.Module, kv_heads: List[int], head_dim: int) -> None:
        super().__init__()
        self.linear = linear
        self.kv_heads = [int(k) for k in kv_heads]
        self.head_dim = int(head_dim)
        self._index: dict = {}  # device -> LongTensor of kv_heads (not a buffer: config.spam_pruning holds it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        index = self._index.get(y.device)
        if index is None:
            index = self._index[y.device] = torch.tensor(self.kv_heads, dtype=torch.long, device=y.device)
        return y.unflatten(-1, (-1, self.head_dim)).index_select(-2, index).flatten(-2)

    def spec(self) -> dict:
        """This module's ``kv_gather`` entry."""
        w = self.linear.weight
        return {"kv_heads": self.kv_heads, "head_dim": self.head_dim, "in_features": int(w.shape[1]),
                "out_features": int(w.shape[0]), "bias": getattr(self.linear, "bias", None) is not None}

    @classmethod
    def rebuild(cls, old: nn.Module, entry: dict) -> nn.Module:
        w = old.weight
        linear = nn.Linear(entry["in_features"], entry["out_features"], bias=entry["bias"], device=w.device,
                           dtype=w.dtype)
        return cls(linear, entry["kv_heads"], entry["head_dim"])


def _stored(proj: nn.Module) -> nn.Module:
    """The Linear holding a K/V projection's weights (inside a :class:`HeadGatherLinear`, or itself)."""
    return proj.linear if isinstance(proj, HeadGatherLinear) else proj


def _query_heads_per_kv(kv_of: torch.Tensor, kv_count: int) -> Optional[int]:
    """``q`` when ``kv_of`` is ``[0]*q + [1]*q + ...`` (what ``repeat_kv`` computes), else ``None``."""
    if kv_count == 0 or kv_of.numel() % kv_count:
        return None
    q = kv_of.numel() // kv_count
    return q if torch.equal(kv_of, torch.arange(kv_count).repeat_interleave(q)) else None


@register
class LlamaFamily(ArchitectureFamily):
    model_types = ("llama", "mistral", "qwen2", "qwen3", "granite", "smollm3", "gemma2", "gemma3_text")
    layers_path = "layers"
    runtime_modules = (HeadGatherLinear,)
    runtime_attrs = ("num_key_value_groups",)
    lora_targets = ("q_proj", "v_proj")  # peft's default for llama
    uniform_kinds = ("head", "neuron")  # head_dim is a config field: fewer heads, same width each (whole KV groups)

    bias_flags = {"o_proj": ("attention_bias", ("q_proj", "k_proj", "v_proj", "o_proj")),
                  "down_proj": ("mlp_bias", ("gate_proj", "up_proj", "down_proj"))}

    def add_bias(self, model: nn.Module, name: str) -> None:
        """LLaMA's config has both flags; Mistral's and Qwen's stock classes do not read them, so their exports
        could not load a bias on O or down."""
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type != "llama":
            raise ValueError(f"{name} has no bias and the stock {model_type} class cannot load one; bias "
                             "compensation is for LLaMA, GPT-2 and BERT-like models (use --compensation least-squares)")
        super().add_bias(model, name)

    @staticmethod
    def head_dim(model: nn.Module) -> int:
        """``d`` from the config (checked: the query heads split evenly over the KV heads)."""
        c = model.config
        kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        if c.num_attention_heads % kv:
            raise ValueError(f"num_attention_heads={c.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={kv}")
        return int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)

    @staticmethod
    def kv_of_queries(attn: nn.Module, d: int) -> torch.Tensor:
        """``LongTensor[H]``: the KV head each query head of ``attn`` reads."""
        if isinstance(attn.k_proj, HeadGatherLinear):
            return torch.tensor(attn.k_proj.kv_heads, dtype=torch.long)
        return torch.arange(attn.q_proj.out_features // d) // int(attn.num_key_value_groups)

    @staticmethod
    def _kv_linear(attn: nn.Module, path: str, child: str) -> str:
        return f"{path}.{child}.linear" if isinstance(getattr(attn, child), HeadGatherLinear) else f"{path}.{child}"

    def group_specs(self, model: nn.Module, kv_groups_only: bool = False) -> List[GroupSpec]:
        d = self.head_dim(model)
        specs: List[GroupSpec] = []
        for i, layer in enumerate(self.layers(model)):
            ln = self._layer_name(model, i)
            attn, path = layer.self_attn, f"{ln}.self_attn"
            if not isinstance(attn, ZeroHeadAttention) and attn.q_proj.out_features:
                specs += self._attention_specs(attn, path, i, d, kv_groups_only)
            specs += self._mlp_specs(layer.mlp, f"{ln}.mlp", i)
        return specs

    def _mlp_specs(self, mlp: nn.Module, path: str, i: int) -> List[GroupSpec]:
        """The neurons of layer ``i``'s gated MLP at ``path`` (none when it has no neuron left)."""
        neurons = mlp.up_proj.out_features
        if not neurons:
            return []
        one = contiguous_blocks(neurons, 1)
        return [GroupSpec(kind="neuron", layer=i, count=neurons,
                          row_index={f"{path}.gate_proj": one, f"{path}.up_proj": one},
                          col_index={f"{path}.down_proj": one})]

    def _attention_specs(self, attn: nn.Module, path: str, i: int, d: int, kv_groups_only: bool) -> List[GroupSpec]:
        kv_of = self.kv_of_queries(attn, d)
        heads, kv_heads = kv_of.numel(), _stored(attn.k_proj).out_features // d
        q_name, o_name = f"{path}.q_proj", f"{path}.o_proj"
        k_name, v_name = self._kv_linear(attn, path, "k_proj"), self._kv_linear(attn, path, "v_proj")
        kv_rows = contiguous_blocks(kv_heads, d)
        q = _query_heads_per_kv(kv_of, kv_heads)
        if q == 1 or kv_groups_only:  # a group = one KV head and every query head reading it
            if q is None:
                counts = torch.bincount(kv_of, minlength=kv_heads).tolist()
                raise ValueError(f"layer {i} has {counts} query heads per KV head; whole KV groups need equal "
                                 f"numbers: prune this model with kv_groups_only=False")
            q_rows = contiguous_blocks(kv_heads, q * d)
            return [GroupSpec(kind="head", layer=i, count=kv_heads, attn_dim=q * d,
                              row_index={q_name: q_rows, k_name: kv_rows, v_name: kv_rows},
                              col_index={o_name: q_rows})]
        q_rows = contiguous_blocks(heads, d)
        kv_spec = GroupSpec(kind="kv_head", layer=i, count=kv_heads, row_index={k_name: kv_rows, v_name: kv_rows})
        return [GroupSpec(kind="head", layer=i, count=heads, attn_dim=d, row_index={q_name: q_rows},
                          col_index={o_name: q_rows}, parent=kv_spec.name, parent_index=kv_of), kv_spec]

    def shrink(self, model: nn.Module, keep: Dict[str, torch.Tensor], kv_groups_only: bool = False) -> None:
        d = self.head_dim(model)
        specs = self.group_specs(model, kv_groups_only)
        keep = dict(keep)
        kv_after: Dict[int, torch.Tensor] = {}  # layer -> KV head (new numbering) of each kept query head
        for s in specs:
            if s.kind != "head" or not s.parent:
                continue
            kept_q = torch.as_tensor(keep.get(s.name, range(s.count)), dtype=torch.long).sort().values
            read = s.parent_index[kept_q]
            if s.parent not in keep:  # not given: the KV heads the kept query heads read
                keep[s.parent] = read.unique()
            kept_kv = torch.as_tensor(keep[s.parent], dtype=torch.long).sort().values
            if not torch.equal(read.unique(), kept_kv):
                raise ValueError(f"layer {s.layer}: kept KV heads {kept_kv.tolist()} must be exactly those the kept "
                                 f"query heads read ({read.unique().tolist()}); a KV head goes with its last query head")
            kv_after[s.layer] = torch.searchsorted(kept_kv, read)
        changed = shrink_slices(model, specs, keep)
        for i, kv_of in kv_after.items():
            if kv_of.numel():
                self._set_kv_heads(model, f"{self._layer_name(model, i)}.self_attn", kv_of, d)
        for spec, kept in changed:
            if spec.kind == "head" and kept.numel() == 0:
                path = f"{self._layer_name(model, spec.layer)}.self_attn"
                attn = model.get_submodule(path)
                set_module(model, path, ZeroHeadAttention(attn.o_proj, "o_proj", attn.layer_idx, d))

    @staticmethod
    def _set_kv_heads(model: nn.Module, path: str, kv_of: torch.Tensor, d: int) -> None:
        """Make query head ``h`` of ``path`` read KV head ``kv_of[h]``: via ``num_key_value_groups`` when
        the pattern is ``repeat_kv``'s, else through :class:`HeadGatherLinear` K/V projections."""
        attn = model.get_submodule(path)
        q = _query_heads_per_kv(kv_of, int(kv_of.max()) + 1)
        for child in ("k_proj", "v_proj"):
            linear = _stored(getattr(attn, child))
            setattr(attn, child, linear if q else HeadGatherLinear(linear, kv_of.tolist(), d))
        attn.num_key_value_groups = q or 1

    def stock_config(self, model: nn.Module) -> Optional[Dict[str, int]]:
        """Head counts, ``head_dim`` and the MLP widths (:meth:`mlp_config`) when every layer kept the same numbers."""
        d = self.head_dim(model)
        shapes = set()
        for layer in self.layers(model):
            attn = layer.self_attn
            if isinstance(attn, ZeroHeadAttention) or isinstance(attn.k_proj, HeadGatherLinear):
                return None
            kv = attn.k_proj.out_features // d
            shapes.add((kv, kv * int(attn.num_key_value_groups)))
        mlp = self.mlp_config(model)
        if len(shapes) != 1 or mlp is None:
            return None
        kv, heads = shapes.pop()
        if not kv:
            return None
        return {"num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": d, **mlp}

    def mlp_config(self, model: nn.Module) -> Optional[Dict[str, int]]:
        """``{"intermediate_size": I}`` when every layer's MLP kept the same ``I > 0`` neurons, else ``None``."""
        widths = {layer.mlp.up_proj.out_features for layer in self.layers(model)}
        return {"intermediate_size": widths.pop()} if len(widths) == 1 and min(widths) else None


class KeptRowsRMSNorm(nn.Module, RuntimeModule):
    """OLMo 2's ``q_norm`` / ``k_norm`` (one RMSNorm over every head of a layer) after some heads went: the norm of
    the kept entries, still divided by the original width, so the removed heads count as the zeros they are in the
    masked model and the pruned layer computes exactly what the masked one did.

    ``y = w_kept · x / sqrt(Σ_kept x² / width + eps)`` (in float32, as the stock norm). Shapes: ``(..., size) ->
    (..., size)``. Recorded in ``spam_pruning["kept_rows_rms_norm"]``.
    """

    spec_key = "kept_rows_rms_norm"

    def __init__(self, weight: torch.Tensor, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        self.width, self.variance_epsilon = int(width), float(eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        variance = x.pow(2).sum(-1, keepdim=True) / self.width
        return (self.weight * (x * torch.rsqrt(variance + self.variance_epsilon))).to(dtype)

    def spec(self) -> dict:
        """This module's ``kept_rows_rms_norm`` entry."""
        return {"size": int(self.weight.numel()), "width": self.width, "eps": self.variance_epsilon}

    @classmethod
    def rebuild(cls, old: nn.Module, entry: dict) -> nn.Module:
        w = old.weight
        return cls(torch.empty(entry["size"], device=w.device, dtype=w.dtype), entry["width"], entry["eps"])


@register
class Olmo2Family(LlamaFamily):
    """OLMo 2 (``olmo2``): the LLaMA layout with norms after each sub-block and ``q_norm`` / ``k_norm`` over every
    head of a layer at once (``heads · d`` wide). Heads go in whole KV groups (a gathered K projection would be
    normalised over its repeated heads), and a layer that lost some gets :class:`KeptRowsRMSNorm` norms, which keep
    the original width in the denominator: pruning then equals masking, as in every family. The stock class
    normalises over the kept width, so an export that removed heads needs the remote code (neurons alone stay
    stock)."""

    model_types = ("olmo2",)
    runtime_modules = (HeadGatherLinear, KeptRowsRMSNorm)
    uniform_kinds = ("neuron",)

    def group_specs(self, model: nn.Module, kv_groups_only: bool = False) -> List[GroupSpec]:
        return super().group_specs(model, kv_groups_only=True)

    def shrink(self, model: nn.Module, keep: Dict[str, torch.Tensor], kv_groups_only: bool = False) -> None:
        kept_rows: Dict[int, Dict[str, torch.Tensor]] = {}
        for s in self.group_specs(model):
            if s.kind != "head" or s.name not in keep:
                continue
            kept = torch.as_tensor(keep[s.name], dtype=torch.long).sort().values
            if 0 < kept.numel() < s.count:
                q = s.row_index[next(m for m in s.row_index if m.endswith("q_proj"))]
                k = s.row_index[next(m for m in s.row_index if m.endswith("k_proj"))]
                kept_rows[s.layer] = {"q_norm": q[kept].reshape(-1), "k_norm": k[kept].reshape(-1)}
        super().shrink(model, keep, kv_groups_only=True)
        for layer, rows in kept_rows.items():
            attn = self.layers(model)[layer].self_attn
            for child, idx in rows.items():
                norm = getattr(attn, child)
                width = norm.width if isinstance(norm, KeptRowsRMSNorm) else norm.weight.numel()
                setattr(attn, child, KeptRowsRMSNorm(norm.weight.detach()[idx.to(norm.weight.device)], width,
                                                     norm.variance_epsilon))

    def stock_config(self, model: nn.Module) -> Optional[Dict[str, int]]:
        """The LLaMA overrides when no layer lost heads (``intermediate_size``); ``None`` otherwise."""
        for layer in self.layers(model):
            attn = layer.self_attn
            if isinstance(attn, ZeroHeadAttention) or isinstance(attn.q_norm, KeptRowsRMSNorm):
                return None
        return super().stock_config(model)
