"""Runtime support for structurally pruned checkpoints. Imports only ``torch`` and ``transformers``.

This file is copied verbatim into every exported checkpoint (with a small generated class appended),
so ``AutoModel*.from_pretrained(path, trust_remote_code=True)`` works where spam-hf is not
installed. ``spam_hf.from_pretrained`` uses the same functions without remote code.

``config.spam_pruning`` (written by ``spam_hf.export``) holds:

* ``linear_shapes``: ``{module name: [in_features, out_features]}`` for every resized linear layer;
* ``empty_attention``: ``{module name: output-projection child or null}`` for attention modules that
  lost every head and are replaced by :class:`ZeroHeadAttention`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

SPAM_PRUNING_KEY = "spam_pruning"


class ZeroHeadAttention(nn.Module):
    """Stands in for an attention module with no heads left.

    Returns ``(out_proj(x[..., :0]), None)``: with an output projection (kept under its original
    child name ``out_child``, a ``Linear(0, d)``) this is its bias broadcast over ``(B, T, d)``;
    without one, an empty ``(B, T, 0)`` context for the next projection to consume. Extra
    arguments (masks, caches) are accepted and ignored.
    """

    def __init__(self, out_proj: Optional[nn.Module] = None, out_child: Optional[str] = None) -> None:
        super().__init__()
        self.out_child = out_child if out_proj is not None else None
        if self.out_child:
            setattr(self, self.out_child, out_proj)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        empty = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)
        out = getattr(self, self.out_child)(empty) if self.out_child else empty
        return out, None


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_spam_pruning(model: nn.Module, spec: Optional[dict] = None) -> nn.Module:
    """Reshape a freshly constructed stock model to the pruned sizes in ``spec``, in place.

    Weights of resized layers are left uninitialised; ``from_pretrained`` loads them afterwards.
    """
    spec = spec if spec is not None else getattr(model.config, SPAM_PRUNING_KEY, None)
    if not spec:
        return model
    for name, out_child in spec.get("empty_attention", {}).items():
        old = model.get_submodule(name)
        out_proj = getattr(old, out_child) if out_child else None
        _set_module(model, name, ZeroHeadAttention(out_proj, out_child))
    for name, (fan_in, fan_out) in spec.get("linear_shapes", {}).items():
        old = model.get_submodule(name)
        if tuple(old.weight.shape) == (fan_out, fan_in):
            continue
        new = nn.Linear(fan_in, fan_out, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
        _set_module(model, name, new)
    return model


class SpamPrunedMixin:
    """Mixed in front of a stock ``*For*`` class: builds the stock model, then applies ``spam_pruning``."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_spam_pruning(self, getattr(config, SPAM_PRUNING_KEY, None))
