"""Prunable groups and the registry of architecture families.

A *group* is the set of weight slices that one structure (attention head, MLP neuron, LoRA rank)
owns across one or more linear modules (design §3). Groups of one kind in one layer share a
:class:`GroupSpec`: group ``g`` owns

* rows ``row_index[m][g]`` of every *row module* ``m`` (and the matching bias entries), and
* columns ``col_index[m][g]`` of every *column module* ``m``.

Weights are always seen in the ``out × in`` layout of :class:`torch.nn.Linear`; families whose
modules store them transposed (GPT-2 ``Conv1D``) say so through :func:`weight_out_in`.

Nothing outside ``spam_hf.architectures`` names a module: everything downstream (curvature, priors,
scoring, selection, surgery) works on the :class:`GroupSpec` objects a family returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Type

import torch
from torch import nn

from .runtime import new_linear, set_module

try:  # transformers' GPT-2 style layer (weights stored in × out)
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - very old transformers
    Conv1D = ()  # type: ignore[assignment]

GROUP_KINDS = ("head", "kv_head", "neuron", "expert", "lora_rank")


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The module's weight as an ``out × in`` tensor (a view; ``Conv1D`` weights are transposed)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if Conv1D and isinstance(module, Conv1D):
        return module.weight.t()
    raise TypeError(f"unsupported layer type {type(module).__name__}; supported: nn.Linear, transformers Conv1D")


def in_out_features(module: nn.Module) -> Tuple[int, int]:
    """``(in_features, out_features)`` of a Linear or Conv1D module."""
    w = weight_out_in(module)
    return int(w.shape[1]), int(w.shape[0])


def lookup_linear(mods: Dict[str, nn.Module], name: str, context: str) -> Tuple[int, int, bool]:
    """``(in_features, out_features, has_bias)`` of module ``name`` in ``mods`` (``dict(model.named_modules())``).

    Raises:
        ValueError: prefixed with ``context`` when the module is missing or not Linear-like.
    """
    if name not in mods:
        raise ValueError(f"{context}: module {name!r} is not in the model")
    try:
        fan_in, fan_out = in_out_features(mods[name])
    except TypeError as e:
        raise ValueError(f"{context}: module {name!r}: {e}") from None
    return fan_in, fan_out, getattr(mods[name], "bias", None) is not None


@dataclass
class GroupSpec:
    """All groups of one kind in one layer.

    Attributes:
        kind: ``"head"``, ``"kv_head"`` (grouped-query attention: the K/V rows one KV head owns),
            ``"neuron"``, ``"expert"`` (mixture of experts: the router row of one expert, the parent of its
            neurons) or ``"lora_rank"``.
        layer: transformer block index (or adapted-module index for LoRA).
        count: number of groups ``G``.
        row_index: module name -> ``LongTensor[G, r]``: output rows owned by each group.
        col_index: module name -> ``LongTensor[G, c]``: input columns owned by each group.
        attn_dim: per-group width of the attention score computation (head_dim for heads, else 0);
            used for the ``T²`` FLOPs of attention.
        parent: name of the spec whose groups this spec's groups depend on ("" when none): query heads
            on the KV head they read, an expert's neurons on the expert. A parent group is removed exactly when
            every child is removed, so selection keeps at least one child of every kept parent.
        parent_index: ``LongTensor[G]``: the parent group of each group (with ``parent``).
        token_share: the share of the tokens this spec's modules compute on, for FLOPs (1; an expert's neurons:
            ``top_k / experts`` of its layer, the expected share when routing is balanced).
    """

    kind: str
    layer: int
    count: int
    row_index: Dict[str, torch.Tensor] = field(default_factory=dict)
    col_index: Dict[str, torch.Tensor] = field(default_factory=dict)
    attn_dim: int = 0
    name: str = ""
    parent: str = ""
    parent_index: Optional[torch.Tensor] = None
    token_share: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in GROUP_KINDS:
            raise ValueError(f"unknown group kind {self.kind!r}; supported: {', '.join(GROUP_KINDS)}")
        for where, idx in (("row", self.row_index), ("column", self.col_index)):
            for m, t in idx.items():
                if t.dim() != 2 or t.shape[0] != self.count:
                    raise ValueError(
                        f"{self.kind} spec of layer {self.layer}: {where} index of {m!r} has shape "
                        f"{tuple(t.shape)}, expected ({self.count}, k)"
                    )
        if not self.row_index and not self.col_index:
            raise ValueError(f"{self.kind} spec of layer {self.layer} owns no slices")
        if not self.name:
            self.name = f"layer{self.layer}.{self.kind}"
        if bool(self.parent) != (self.parent_index is not None):
            raise ValueError(f"spec {self.name}: parent and parent_index go together")
        if self.parent_index is not None and tuple(self.parent_index.shape) != (self.count,):
            raise ValueError(f"spec {self.name}: parent_index has shape {tuple(self.parent_index.shape)}, "
                             f"expected ({self.count},)")

    @property
    def modules(self) -> List[str]:
        return list(dict.fromkeys([*self.row_index, *self.col_index]))

    def params_per_group(self, model: nn.Module) -> torch.Tensor:
        """Number of parameters each group owns, ``LongTensor[G]`` (weights plus owned bias entries)."""
        mods = dict(model.named_modules())
        total = torch.zeros(self.count, dtype=torch.long)
        for m, idx in self.row_index.items():
            fan_in, _ = in_out_features(mods[m])
            has_bias = getattr(mods[m], "bias", None) is not None
            total += idx.shape[1] * (fan_in + int(has_bias))
        for m, idx in self.col_index.items():
            _, fan_out = in_out_features(mods[m])
            total += idx.shape[1] * fan_out
        return total

    def flops_per_group(self, model: nn.Module, seq_len: int) -> torch.Tensor:
        """Forward FLOPs per sequence of length ``T`` that each group costs, ``FloatTensor[G]``.

        Linear slices: ``2·T·s·(#weights)`` (``s`` the :attr:`token_share`); attention heads add
        ``4·T²·head_dim`` (``QKᵀ`` and ``softmax·V``).
        """
        mods = dict(model.named_modules())
        w = torch.zeros(self.count, dtype=torch.float64)
        for m, idx in self.row_index.items():
            fan_in, _ = in_out_features(mods[m])
            w += idx.shape[1] * fan_in
        for m, idx in self.col_index.items():
            _, fan_out = in_out_features(mods[m])
            w += idx.shape[1] * fan_out
        return 2.0 * seq_len * self.token_share * w + 4.0 * seq_len**2 * self.attn_dim


def contiguous_blocks(count: int, width: int, offset: int = 0) -> torch.Tensor:
    """``LongTensor[count, width]`` whose row ``g`` is ``offset + g·width + [0, width)``."""
    return offset + torch.arange(count * width, dtype=torch.long).view(count, width)


def fused_qkv_heads(layer: int, fused: str, out: str, kv_heads: int, queries_per_kv: int, d: int) -> GroupSpec:
    """The heads of an attention whose query, key and value are one Linear (``[q | k | v]``: GPT-2's ``c_attn``,
    ModernBERT's ``Wqkv``, Phi-3's ``qkv_proj``), in whole KV groups: group ``g`` owns query rows
    ``g·r·d:(g+1)·r·d``, key rows ``H·d + g·d:(g+1)·d`` and value rows ``(H + K)·d + g·d:(g+1)·d`` of ``fused``
    (``K`` groups of ``r`` query heads, ``H = K·r``) and the same query columns of ``out``. Without GQA
    (``r = 1``) a group is one head."""
    q = contiguous_blocks(kv_heads, queries_per_kv * d)
    k = contiguous_blocks(kv_heads, d, offset=kv_heads * queries_per_kv * d)
    v = contiguous_blocks(kv_heads, d, offset=kv_heads * (queries_per_kv + 1) * d)
    return GroupSpec(kind="head", layer=layer, count=kv_heads, attn_dim=queries_per_kv * d,
                     row_index={fused: torch.cat([q, k, v], 1)}, col_index={out: q})


def fused_gated_neurons(layer: int, fused: str, down: str, neurons: int) -> GroupSpec:
    """The neurons of a gated MLP whose two halves are one Linear (``[gate | up]``, Phi-3's ``gate_up_proj``;
    ``[input | gate]``, ModernBERT's ``Wi``): neuron ``j`` owns rows ``j`` and ``I + j`` of ``fused`` and column
    ``j`` of ``down``."""
    one = contiguous_blocks(neurons, 1)
    return GroupSpec(kind="neuron", layer=layer, count=neurons, row_index={fused: torch.cat([one, one + neurons], 1)},
                     col_index={down: one})


class ArchitectureFamily:
    """What one model family exposes to spam-hf. Subclass per family (one file each)."""

    #: ``config.model_type`` values this family handles
    model_types: Tuple[str, ...] = ()
    #: dotted path of the block list inside the base model (e.g. ``encoder.layer``)
    layers_path: str = ""
    #: :class:`~spam_hf.architectures.runtime.RuntimeModule` classes that pruned models of this family may
    #: contain beyond the core ones; export copies their source into remote-code checkpoints
    runtime_modules: Tuple[type, ...] = ()
    #: LoRA target modules when the user names none (peft's default for the model type when empty). peft 0.21 has none
    #: for granite, smollm3 and phi3, and resolves mixtral's to nothing
    lora_targets: Tuple[str, ...] = ()
    #: integer attributes that ``shrink`` changes on modules and ``forward`` reads (export records them)
    runtime_attrs: Tuple[str, ...] = ()
    #: pruning-report name of each group kind this family produces (``<name>_kept`` / ``<name>_total``)
    report_fields: Dict[str, str] = {"head": "heads", "kv_head": "kv_heads", "neuron": "neurons",
                                     "expert": "experts", "lora_rank": "ranks"}
    #: group kinds that may shrink by the same count in every layer with the export still a stock checkpoint
    #: (:meth:`stock_config` expresses it); ``--uniform`` prunes only these. Neurons everywhere (one
    #: ``intermediate_size``); heads only where the config has a ``head_dim`` apart from ``hidden / heads``
    uniform_kinds: Tuple[str, ...] = ("neuron",)

    def layers(self, model: nn.Module) -> Sequence[nn.Module]:
        """The transformer blocks, in order."""
        if not self.layers_path:
            raise NotImplementedError
        return model.get_submodule(base_prefix(model) + self.layers_path)

    def _layer_name(self, model: nn.Module, i: int) -> str:
        return f"{base_prefix(model)}{self.layers_path}.{i}"

    def group_specs(self, model: nn.Module, kv_groups_only: bool = False) -> List[GroupSpec]:
        """Every prunable group spec of ``model`` (heads, neurons), in layer order.

        ``kv_groups_only``: grouped-query attention is pruned in whole KV groups (a KV head with every
        query head that reads it) instead of query heads plus KV heads; families without GQA ignore it.
        """
        raise NotImplementedError

    def shrink(self, model: nn.Module, keep: Dict[str, torch.Tensor], kv_groups_only: bool = False) -> None:
        """Physically keep only groups ``keep[spec.name]`` (sorted LongTensor) of each spec, in place.

        ``keep`` names the specs of ``group_specs(model, kv_groups_only)``.
        """
        raise NotImplementedError

    #: why models of this family cannot be dispatched with ``--device-map`` ("" when they can)
    device_map_refusal: str = ""
    #: why models of this family cannot be sharded with ``--fsdp2`` ("" when they can)
    fsdp2_refusal: str = ""

    def prepare(self, model: nn.Module) -> None:
        """Put ``model``'s modules in the layout this family prunes, in place and idempotent (:meth:`group_specs` does
        it first); nothing in most families. Mixture of experts: the 3-D expert tensors become Linear layers."""

    def mask(self, model: nn.Module, spec: GroupSpec, dropped: torch.Tensor) -> None:
        """What masking groups ``dropped`` of ``spec`` needs beyond zeroing their slices (``mask_groups`` zeroes
        them first); nothing in most families. Mixture of experts: a dropped expert is no longer routed to."""

    #: for a module (name suffix) that has no bias: the config flag that gives it one in the stock class, and every
    #: module suffix the flag gives a bias to (LLaMA: ``o_proj`` -> ``attention_bias`` on q/k/v/o)
    bias_flags: Dict[str, Tuple[str, Tuple[str, ...]]] = {}

    def add_bias(self, model: nn.Module, name: str) -> None:
        """Give module ``name`` a bias (for ``bias`` compensation), and zero biases to every module the family's
        config flag covers in every layer (:attr:`bias_flags`), so the export loads with the stock class and the
        model computes what it did. ``ValueError`` when the family has no such flag for the module."""
        suffix = name.rsplit(".", 1)[-1]
        if suffix not in self.bias_flags:
            raise ValueError(f"{name} has no bias and {type(self).__name__} has no config flag that adds one; "
                             "bias compensation needs it (use --compensation least-squares)")
        flag, suffixes = self.bias_flags[suffix]
        config = getattr(model, "config", None)
        if config is not None:
            setattr(config, flag, True)
        for module_name, module in model.named_modules():
            parts = module_name.split(".")
            owner = parts[-2] if parts[-1] == "linear" and len(parts) > 1 else parts[-1]  # HeadGatherLinear's
            if isinstance(module, nn.Linear) and owner in suffixes and module.bias is None:
                w = module.weight
                module.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                           requires_grad=w.requires_grad)

    def stock_config(self, model: nn.Module) -> Optional[Dict[str, int]]:
        """Config overrides under which the stock class builds ``model``'s (pruned) shapes, or ``None``.

        Export writes a stock checkpoint (no remote code) when these overrides reproduce every module
        shape; families return ``None`` when per-layer sizes differ.
        """
        return None


_REGISTRY: Dict[str, ArchitectureFamily] = {}
#: (predicate, family) for model wrappers that bring their own groups (peft adapters), checked first
_WRAPPERS: List[Tuple[Callable[[nn.Module], bool], ArchitectureFamily]] = []


def register(family_cls: Type[ArchitectureFamily]) -> Type[ArchitectureFamily]:
    """Class decorator: register a family under each of its ``model_types``."""
    inst = family_cls()
    for mt in family_cls.model_types:
        _REGISTRY[mt] = inst
    return family_cls


def register_wrapper(predicate: Callable[[nn.Module], bool], family: ArchitectureFamily) -> None:
    """Register a family for wrapped models (``predicate(model)`` true), e.g. peft LoRA models."""
    _WRAPPERS.append((predicate, family))


def supported_model_types() -> List[str]:
    return sorted(_REGISTRY)


def model_type_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    mt = getattr(config, "model_type", None)
    if mt is None:
        raise ValueError(f"{type(model).__name__} has no config.model_type; spam-hf needs a transformers model")
    return mt


def get_family(model_or_type) -> ArchitectureFamily:
    """The family for a model (or a ``model_type`` string); a clear error when unsupported.

    A wrapped model (a peft LoRA model, see :func:`register_wrapper`) gets the wrapper's family (its
    groups are adapter ranks), whatever its base model.
    """
    if not isinstance(model_or_type, str):
        for predicate, family in _WRAPPERS:
            if predicate(model_or_type):
                return family
    mt = model_or_type if isinstance(model_or_type, str) else model_type_of(model_or_type)
    if mt not in _REGISTRY:
        raise ValueError(f"unknown model_type {mt!r}; supported: {', '.join(supported_model_types())}")
    return _REGISTRY[mt]


def group_specs(model: nn.Module, kv_groups_only: bool = False) -> List[GroupSpec]:
    """Group specs of ``model`` via its registered family, checked against the model's modules."""
    specs = get_family(model).group_specs(model, kv_groups_only=kv_groups_only)
    validate_specs(model, specs)
    return specs


def validate_specs(model: nn.Module, specs: Iterable[GroupSpec]) -> None:
    """Check that every module a spec names exists, is Linear-like, and indices are in range.

    Raises:
        ValueError: naming the spec, the module and what is wrong.
    """
    specs = list(specs)
    mods = dict(model.named_modules())
    owned_rows: Dict[str, torch.Tensor] = {}
    owned_cols: Dict[str, torch.Tensor] = {}
    for spec in specs:
        for where, idx_map, owned in (("rows", spec.row_index, owned_rows), ("cols", spec.col_index, owned_cols)):
            for m, idx in idx_map.items():
                fan_in, fan_out, _ = lookup_linear(mods, m, f"group spec {spec.name}")
                size = fan_out if where == "rows" else fan_in
                if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
                    raise ValueError(f"group spec {spec.name}: {where} of {m!r} out of range [0, {size})")
                mask = owned.setdefault(m, torch.zeros(size, dtype=torch.bool))
                flat = idx.reshape(-1)
                if mask[flat].any() or flat.unique().numel() != flat.numel():
                    raise ValueError(f"group spec {spec.name}: {where} of {m!r} are owned by more than one group")
                mask[flat] = True
    counts = {s.name: s.count for s in specs}
    for spec in specs:
        if spec.parent and spec.parent not in counts:
            raise ValueError(f"group spec {spec.name}: parent spec {spec.parent!r} is not among the specs")
        if spec.parent and spec.count and (int(spec.parent_index.min()) < 0
                                           or int(spec.parent_index.max()) >= counts[spec.parent]):
            raise ValueError(f"group spec {spec.name}: parent_index out of range [0, {counts[spec.parent]})")
    both = set(owned_rows) & set(owned_cols)
    if both:
        raise ValueError(f"modules {sorted(both)} have both rows and columns owned by groups; a weight must have one owner")


def base_prefix(model: nn.Module) -> str:
    """Dotted path of the base model inside ``model`` plus a dot ('' when ``model`` is the base model)."""
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and hasattr(model, prefix):
        return prefix + "."
    return ""


def shrink_linear(module: nn.Module, rows: Optional[torch.Tensor] = None, cols: Optional[torch.Tensor] = None) -> nn.Module:
    """A new layer of the same type (``nn.Linear`` or ``Conv1D``) keeping output ``rows`` and input ``cols``.

    Bias entries of kept rows are kept. Rows and columns are those of the ``out × in`` view.

    A peft LoRA layer (base layer + adapters) is shrunk in place and returned: its base layer loses
    the rows and columns, every adapter's ``B`` the same rows and ``A`` the same columns (the ranks
    stay), so ``W + s·B A`` loses exactly those rows and columns.
    """
    if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
        module.base_layer = shrink_linear(module.base_layer, rows, cols)
        for name in list(module.lora_A.keys()):
            if rows is not None:
                module.lora_B[name] = shrink_linear(module.lora_B[name], rows=rows)
            if cols is not None:
                module.lora_A[name] = shrink_linear(module.lora_A[name], cols=cols)
        module.in_features, module.out_features = in_out_features(module.base_layer)
        return module
    w = weight_out_in(module).detach()
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    new = new_linear(module, fan_in=w.shape[1], fan_out=w.shape[0])
    with torch.no_grad():
        weight_out_in(new).copy_(w)
        if module.bias is not None:
            b = module.bias.detach()
            new.bias.copy_(b.index_select(0, rows.to(b.device)) if rows is not None else b)
    new.train(module.training)
    return new


def shrink_slices(model: nn.Module, specs: Iterable[GroupSpec],
                  keep: Dict[str, torch.Tensor]) -> List[Tuple[GroupSpec, torch.Tensor]]:
    """Keep only groups ``keep[spec.name]`` of each spec: every row module loses the other groups' rows,
    every column module their columns (:func:`shrink_linear`), in place.

    Returns ``[(spec, kept indices)]`` for the specs that lost groups, for family-specific follow-up
    (head counts, empty attention modules).
    """
    changed = []
    for spec in specs:
        if spec.name not in keep:
            continue
        kept = torch.as_tensor(keep[spec.name], dtype=torch.long).sort().values
        if kept.numel() and (kept[0] < 0 or kept[-1] >= spec.count or bool((kept[1:] == kept[:-1]).any())):
            raise ValueError(f"{spec.name}: kept groups {kept.tolist()} must be distinct indices in [0, {spec.count})")
        if kept.numel() == spec.count:
            continue
        # ascending: a fused projection (GPT-2's c_attn, Phi-3's qkv_proj) keeps its [q | k | v] layout, where the
        # group-major order (q_0 k_0 v_0 q_2 k_2 v_2) would mix the parts
        for m, idx in spec.row_index.items():
            set_module(model, m, shrink_linear(model.get_submodule(m), rows=idx[kept].reshape(-1).sort().values))
        for m, idx in spec.col_index.items():
            set_module(model, m, shrink_linear(model.get_submodule(m), cols=idx[kept].reshape(-1).sort().values))
        changed.append((spec, kept))
    return changed


def consuming_modules(specs: Iterable[GroupSpec]) -> List[str]:
    """Names of the modules whose input columns groups own (O for heads, down for neurons, ``lora_B`` for ranks):
    removing a group is removing those columns. First-seen order."""
    return list(dict.fromkeys(m for s in specs for m in s.col_index))


def prunable_modules(specs: Iterable[GroupSpec]) -> List[str]:
    """Names of every module that some group touches, in first-seen order."""
    out: Dict[str, None] = {}
    for s in specs:
        for m in s.modules:
            out[m] = None
    return list(out)

