"""Architecture families: which modules form each prunable group, how to shrink them, and the runtime
modules their pruned checkpoints need (:mod:`~spam_hf.architectures.runtime` plus each family's own).

Adding a family is one file: subclass :class:`ArchitectureFamily`, decorate it with :func:`register`
and import it here (or anywhere before use). See ``docs/design.md`` ("Adding a family").
"""

from .base import (
    ArchitectureFamily,
    GroupSpec,
    consuming_modules,
    get_family,
    group_specs,
    prunable_modules,
    register,
    register_wrapper,
    supported_model_types,
    validate_specs,
    weight_out_in,
)
from . import bert, gpt2, llama, modernbert, moe, mpnet, phi3  # noqa: F401  (register the families)
from .lora import LoraFamily, is_peft_model
from .runtime import SPAM_PRUNING_KEY, RuntimeModule, ZeroHeadAttention

__all__ = [
    "ArchitectureFamily",
    "LoraFamily",
    "is_peft_model",
    "GroupSpec",
    "consuming_modules",
    "get_family",
    "group_specs",
    "prunable_modules",
    "register",
    "register_wrapper",
    "RuntimeModule",
    "SPAM_PRUNING_KEY",
    "ZeroHeadAttention",
    "supported_model_types",
    "validate_specs",
    "weight_out_in",
]
