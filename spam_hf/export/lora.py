"""Save a rank-pruned LoRA adapter as a stock peft adapter (``PeftModel.from_pretrained`` loads it).

Each adapted module keeps its scaling ``s = α / r`` after losing ranks, so the config lists every
kept module by its full name with ``rank_pattern[m] = r'`` and ``alpha_pattern[m] = s · r'``; modules
that lost every rank are left out of ``target_modules`` and their (empty) weights are not saved.

When the base model itself was pruned (``SpamTrainer.prune_base``), the smaller base is exported
next to the adapter, in ``<output_dir>/base`` (a spam-hf export: stock or remote code), and the
adapter config's ``base_model_name_or_path`` points at it.
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from typing import Optional

from safetensors.torch import save_file
from torch import nn

from ..architectures.base import in_out_features
from ..architectures.lora import active_adapter, base_name, lora_layers
from ..architectures.runtime import RuntimeModule
from .save import reference_model, save_pruned_model

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def pruned_lora_config(model: nn.Module):
    """A copy of the active ``LoraConfig`` describing the pruned ranks (full module names, escaped as regexes)."""
    adapter = active_adapter(model)
    config = copy.deepcopy(model.peft_config[adapter])
    targets, ranks, alphas = [], {}, {}
    for name, layer in lora_layers(model):
        r = layer.lora_A[adapter].out_features
        if r == 0:
            continue
        key = base_name(name)
        targets.append(key)
        ranks[re.escape(key)] = int(r)
        alphas[re.escape(key)] = float(layer.scaling[adapter]) * int(r)
    if not targets:
        raise ValueError("every LoRA rank was pruned: there is no adapter left to save")
    config.target_modules = targets
    config.rank_pattern = ranks
    config.alpha_pattern = alphas
    config.r = max(ranks.values())
    config.lora_alpha = alphas[re.escape(targets[0])]
    config.inference_mode = True
    return config


BASE_SUBDIR = "base"


def base_is_pruned(model: nn.Module) -> bool:
    """Whether any base layer of the peft ``model`` is smaller than its config says, or replaced by a runtime module
    that no stock module stands for (an attention that lost all heads, experts that differ in number or width)."""
    base = model.get_base_model()
    ref = dict(reference_model(base).named_modules())
    for name, mod in base.named_modules():
        target = name[: -len(".base_layer")] if name.endswith(".base_layer") else name
        if isinstance(mod, RuntimeModule) and mod.spec_key and not (target in ref and mod.fits_stock(ref[target])):
            return True
        if target in ref and not hasattr(mod, "base_layer"):
            try:
                if in_out_features(mod) != in_out_features(ref[target]):
                    return True
            except TypeError:
                continue
    return False


def save_lora_adapter(model: nn.Module, output_dir: str, tokenizer=None, merged_dir: Optional[str] = None) -> str:
    """Write the pruned adapter (config + ``adapter_model.safetensors``) to ``output_dir``.

    ``merged_dir``: also write the base model with the adapter merged in (a stock checkpoint when the
    base was not pruned). A pruned base goes to ``output_dir/base``. Returns ``"peft_adapter"``.
    """
    from peft.utils import get_peft_model_state_dict

    adapter = active_adapter(model)
    config = pruned_lora_config(model)
    os.makedirs(output_dir, exist_ok=True)
    if base_is_pruned(model):
        base_dir = os.path.join(output_dir, BASE_SUBDIR)
        save_pruned_model(copy.deepcopy(model).unload(), base_dir, tokenizer=tokenizer)
        config.base_model_name_or_path = os.path.abspath(base_dir)
    dropped = [base_name(name) for name, layer in lora_layers(model) if layer.lora_A[adapter].out_features == 0]
    with warnings.catch_warnings():  # peft warns about the zero-size tensors of emptied modules, dropped below
        warnings.simplefilter("ignore")
        state = get_peft_model_state_dict(model, adapter_name=adapter)
    state = {k: v.detach().contiguous() for k, v in state.items()
             if not any(f".{d}.lora_" in f".{k}" for d in dropped)}
    save_file(state, os.path.join(output_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    if merged_dir:
        save_pruned_model(copy.deepcopy(model).merge_and_unload(), merged_dir, tokenizer=tokenizer)
    return "peft_adapter"
