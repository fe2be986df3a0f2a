"""Architecture families: which modules form each prunable group, and how to shrink them."""

from .base import (
    ArchitectureFamily,
    Group,
    GroupSpec,
    get_family,
    group_specs,
    prunable_modules,
    supported_model_types,
    validate_specs,
    weight_out_in,
)
from . import bert, gpt2, llama  # noqa: F401  (register the families)
from .lora import LoraFamily, is_peft_model

__all__ = [
    "ArchitectureFamily",
    "LoraFamily",
    "is_peft_model",
    "Group",
    "GroupSpec",
    "get_family",
    "group_specs",
    "prunable_modules",
    "supported_model_types",
    "validate_specs",
    "weight_out_in",
]
