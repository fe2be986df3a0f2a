"""Runtime support for structurally pruned checkpoints. Imports only ``torch`` and ``transformers``.

This file is copied verbatim into every exported checkpoint (with a small generated class appended),
so ``AutoModel*.from_pretrained(path, trust_remote_code=True)`` works where spam-hf is not
installed. ``spam_hf.from_pretrained`` uses the same functions without remote code.

``config.spam_pruning`` (written by ``spam_hf.export``) holds:

* ``linear_shapes``: ``{module name: [in_features, out_features]}`` for every resized ``nn.Linear`` or
  transformers ``Conv1D`` (the layer keeps its type);
* ``module_attrs``: ``{module name: {attribute: int}}`` head counts and split sizes that attention
  modules read at run time (GPT-2's ``num_heads``/``split_size``);
* ``empty_attention``: ``{module name: {"out_child": child or null, "layer_idx": i, "head_dim": d}}``
  for attention modules that lost every head and are replaced by :class:`ZeroHeadAttention`;
* ``kv_gather``: ``{module name: {"kv_heads": [...], "head_dim": d, "in_features", "out_features",
  "bias"}}`` for key/value projections replaced by :class:`HeadGatherLinear` (grouped-query
  attention with different numbers of query heads per KV head).
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

SPAM_PRUNING_KEY = "spam_pruning"


class EmptyInputConv1D(Conv1D):
    """A ``Conv1D`` with no input features (an MLP that lost every neuron): outputs its bias.

    The stock ``Conv1D.forward`` cannot reshape a zero-width input; the parameters (``weight``
    ``0 × nf``, ``bias`` ``nf``) are those of a stock ``Conv1D(nf, 0)``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.new_zeros(*x.shape[:-1], self.nf) + self.bias.to(x.dtype))


def conv1d(nf: int, nx: int) -> Conv1D:
    """``Conv1D(nf, nx)``, or an :class:`EmptyInputConv1D` when ``nx == 0``."""
    return EmptyInputConv1D(nf, nx) if nx == 0 else Conv1D(nf, nx)


_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


class ZeroHeadAttention(nn.Module):
    """Stands in for an attention module with no heads left.

    Returns ``(out_proj(x[..., :0]), None)``: with an output projection (kept under its original
    child name ``out_child``, a ``Linear(0, d)``) this is its bias broadcast over ``(B, T, d)``;
    without one, an empty ``(B, T, 0)`` context for the next projection to consume. Masks are
    accepted and ignored. In a decoder (``layer_idx`` given) a KV cache passed in receives empty
    ``(B, 0, T, head_dim)`` keys and values, so the cache's sequence length stays right for
    ``generate()``.
    """

    def __init__(self, out_proj: Optional[nn.Module] = None, out_child: Optional[str] = None,
                 layer_idx: Optional[int] = None, head_dim: Optional[int] = None) -> None:
        super().__init__()
        self.out_child = out_child if out_proj is not None else None
        self.layer_idx, self.head_dim = layer_idx, head_dim
        if self.out_child:
            setattr(self, self.out_child, out_proj)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.layer_idx is not None:
            cache = next((kwargs[k] for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)
            if cache is not None and hasattr(cache, "update"):
                b, t = hidden_states.shape[0], hidden_states.shape[1]
                kv = hidden_states.new_zeros(b, 0, t, self.head_dim or 1)
                cache.update(kv, kv.clone(), self.layer_idx)
        if not self.out_child:
            return hidden_states.new_zeros(*hidden_states.shape[:-1], 0), None
        proj = getattr(self, self.out_child)
        # a projection from 0 features outputs its bias (Conv1D cannot reshape an empty input, so no call)
        width = proj.nf if isinstance(proj, Conv1D) else proj.weight.shape[0]
        out = hidden_states.new_zeros(*hidden_states.shape[:-1], width)
        if getattr(proj, "bias", None) is not None:
            out = out + proj.bias.to(out.dtype)
        return out, None

    def spec(self) -> dict:
        """This module's ``empty_attention`` entry."""
        return {"out_child": self.out_child, "layer_idx": self.layer_idx, "head_dim": self.head_dim}


class HeadGatherLinear(nn.Module):
    """A key or value projection whose KV heads are repeated, one per query head.

    ``linear`` computes the ``K`` KV heads (``K·d`` outputs, weights stored once); output head ``h``
    is KV head ``kv_heads[h]``, so the stock attention runs with ``num_key_value_groups = 1`` when
    the query heads per KV head differ. The KV cache of such a layer holds ``len(kv_heads)`` heads.

    Shapes: ``(..., in) -> (..., len(kv_heads)·d)``.
    """

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
    for name, entry in spec.get("empty_attention", {}).items():
        entry = entry if isinstance(entry, dict) else {"out_child": entry}
        out_child = entry.get("out_child")
        old = model.get_submodule(name)
        out_proj = getattr(old, out_child) if out_child else None
        _set_module(model, name, ZeroHeadAttention(out_proj, out_child, entry.get("layer_idx"), entry.get("head_dim")))
    for name, entry in spec.get("kv_gather", {}).items():
        w = model.get_submodule(name).weight
        linear = nn.Linear(entry["in_features"], entry["out_features"], bias=entry["bias"], device=w.device,
                           dtype=w.dtype)
        _set_module(model, name, HeadGatherLinear(linear, entry["kv_heads"], entry["head_dim"]))
    for name, (fan_in, fan_out) in spec.get("linear_shapes", {}).items():
        old = model.get_submodule(name)
        w = old.weight
        if isinstance(old, nn.Linear):
            if tuple(w.shape) == (fan_out, fan_in):
                continue
            new = nn.Linear(fan_in, fan_out, bias=old.bias is not None, device=w.device, dtype=w.dtype)
        elif isinstance(old, Conv1D):  # transformers' GPT-2 layer: weight stored in × out
            if tuple(w.shape) == (fan_in, fan_out):
                continue
            new = conv1d(fan_out, fan_in).to(device=w.device, dtype=w.dtype)
        else:
            raise ValueError(f"spam_pruning resizes {name!r}, a {type(old).__name__}; expected Linear or Conv1D")
        _set_module(model, name, new)
    for name, attrs in spec.get("module_attrs", {}).items():
        module = model.get_submodule(name)
        for attr, value in attrs.items():
            setattr(module, attr, value)
    return model


class SpamPrunedMixin:
    """Mixed in front of a stock ``*For*`` class: builds the stock model, then applies ``spam_pruning``."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_spam_pruning(self, getattr(config, SPAM_PRUNING_KEY, None))
