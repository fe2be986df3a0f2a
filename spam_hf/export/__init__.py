"""Export pruned models: weights + per-layer sizes + remote code, model card, Hub push."""

from .save import from_pretrained, pruning_spec, save_pruned

__all__ = ["from_pretrained", "pruning_spec", "save_pruned"]
