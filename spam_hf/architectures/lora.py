"""peft LoRA adapters: every rank of every adapted module is a group.

A LoRA layer adds ``s · B A x`` to its frozen base layer, with ``A`` (``lora_A.<adapter>``, an
``r × in`` Linear), ``B`` (``lora_B.<adapter>``, an ``out × r`` Linear) and ``s = α / r``. Rank
``k`` of module ``m`` owns row ``k`` of ``A`` and column ``k`` of ``B``; removing it removes the
rank-one term ``s · b_k a_kᵀ`` and nothing else, so a layer keeps its scaling ``s`` when ranks go
(export writes ``α' = s · r'`` into ``alpha_pattern``).

Groups have kind ``"lora_rank"`` and one spec per adapted module (``layer`` = the module's index
in model order). Curvature hooks sit on the ``A`` and ``B`` Linears themselves: the base weights
are frozen and carry no prior.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from .base import ArchitectureFamily, GroupSpec, contiguous_blocks, register_wrapper, shrink_slices


PEFT_PREFIX = "base_model.model."  # where a PeftModel keeps the wrapped model's modules
RANK_SUFFIX = ".lora_rank"  # spec name = adapted module + RANK_SUFFIX


def base_name(name: str) -> str:
    """A PeftModel module name as the base model names it (what peft's target matching sees)."""
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def adapted_module(spec: GroupSpec) -> str:
    """The PeftModel name of the LoRA layer whose ranks ``spec`` holds."""
    return spec.name[: -len(RANK_SUFFIX)]


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def active_adapter(model: nn.Module) -> str:
    """The single active adapter's name; clear errors for several adapters or a method other than LoRA."""
    name = model.active_adapter
    if isinstance(name, (list, tuple)):
        if len(name) != 1:
            raise ValueError(f"spam-hf needs exactly one active adapter, found {list(name)}")
        name = name[0]
    config = model.peft_config[name]
    method = str(getattr(config.peft_type, "value", config.peft_type))
    if method != "LORA":
        raise ValueError(f"peft method {method} is not supported; spam-hf prunes LoRA adapters (peft_type LORA)")
    if getattr(config, "use_dora", False):
        raise ValueError("DoRA adapters are not supported (their magnitude vector couples the ranks)")
    if getattr(config, "use_rslora", False):
        raise ValueError("use_rslora=True is not supported: peft forbids rank_pattern with rsLoRA, which export needs")
    return name


def lora_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``[(name, layer)]`` of every LoRA-adapted Linear of the active adapter, in model order."""
    from peft.tuners.lora import LoraLayer

    adapter = active_adapter(model)
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and adapter in getattr(mod, "lora_A", {}):
            if not isinstance(mod.lora_A[adapter], nn.Linear):
                raise ValueError(f"LoRA on {name} ({type(mod).__name__}) is not supported: only Linear adapters")
            out.append((name, mod))
    if not out:
        raise ValueError("the peft model has no LoRA Linear layers for its active adapter")
    return out


class LoraFamily(ArchitectureFamily):
    """Rank groups of a ``PeftModel`` with a LoRA adapter (not registered by ``model_type``)."""

    def layers(self, model: nn.Module) -> Sequence[nn.Module]:
        return [m for _, m in lora_layers(model)]

    def group_specs(self, model: nn.Module, kv_groups_only: bool = False) -> List[GroupSpec]:
        adapter = active_adapter(model)
        specs = []
        for i, (name, layer) in enumerate(lora_layers(model)):
            r = layer.lora_A[adapter].out_features
            if r == 0:
                continue
            ranks = contiguous_blocks(r, 1)
            specs.append(GroupSpec(kind="lora_rank", layer=i, count=r, name=f"{name}{RANK_SUFFIX}",
                                   row_index={f"{name}.lora_A.{adapter}": ranks},
                                   col_index={f"{name}.lora_B.{adapter}": ranks}))
        return specs

    def shrink(self, model: nn.Module, keep: Dict[str, torch.Tensor], kv_groups_only: bool = False) -> None:
        """Keep ranks ``keep[spec.name]``; ``r`` and ``α`` follow so that ``s = α / r`` is unchanged."""
        adapter = active_adapter(model)
        layers = dict(lora_layers(model))
        for spec, kept in shrink_slices(model, self.group_specs(model), keep):
            layer = layers[adapted_module(spec)]
            scaling = layer.scaling[adapter]
            layer.r[adapter] = int(kept.numel())
            layer.lora_alpha[adapter] = scaling * int(kept.numel())
            layer.scaling[adapter] = scaling


register_wrapper(is_peft_model, LoraFamily())
