"""Export pruned models: weights + per-layer sizes + remote code, peft adapters, model card, Hub push."""

from __future__ import annotations

import tempfile
from typing import Optional

from torch import nn

from ..architectures.lora import is_peft_model
from .lora import save_lora_adapter
from .save import from_pretrained, pruning_spec, save_pruned_model


def save_pruned(model: nn.Module, output_dir: str, tokenizer=None, extra_config: Optional[dict] = None,
                merged_dir: Optional[str] = None) -> str:
    """Save any pruned model so that it reloads: a peft LoRA model as a stock peft adapter
    (:func:`~spam_hf.export.lora.save_lora_adapter`, ``merged_dir`` for a merged copy too), anything else
    with per-layer sizes and remote code (:func:`~spam_hf.export.save.save_pruned_model`).

    Returns ``"stock"``, ``"remote_code"`` or ``"peft_adapter"``.
    """
    if is_peft_model(model):
        return save_lora_adapter(model, output_dir, tokenizer=tokenizer, merged_dir=merged_dir)
    return save_pruned_model(model, output_dir, tokenizer=tokenizer, extra_config=extra_config)


def gather_for_main(model: nn.Module) -> None:
    """On a process other than the main one, with an FSDP2-sharded ``model``: take part in the gathering of its
    weights that the main process's :func:`save_pruned` needs (transformers' save of a sharded model gathers the
    full state dict on the main process, every process taking part); nothing is written here."""
    with tempfile.TemporaryDirectory() as scratch:
        save_pruned(model, scratch)


__all__ = ["from_pretrained", "gather_for_main", "pruning_spec", "save_lora_adapter", "save_pruned",
           "save_pruned_model"]
