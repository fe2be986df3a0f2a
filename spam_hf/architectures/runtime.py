"""Runtime support for structurally pruned checkpoints. Imports only ``torch`` and ``transformers``.

This file is the core of the modeling file written into every exported checkpoint: export copies it
verbatim, appends the source of the :class:`RuntimeModule` classes the model's family declares
(``ArchitectureFamily.runtime_modules``) and one generated class, so
``AutoModel*.from_pretrained(path, trust_remote_code=True)`` works where spam-hf is not installed.
``spam_hf.from_pretrained`` uses the same code without remote code.

``config.spam_pruning`` (written by ``spam_hf.export``) holds:

* ``linear_shapes``: ``{module name: [in_features, out_features]}`` for every resized layer (it keeps
  its type; types other than ``nn.Linear`` are rebuilt by the runtime class whose ``resizes`` names them);
* ``module_attrs``: ``{module name: {attribute: int}}`` head counts and split sizes that attention
  modules read at run time (the family's ``runtime_attrs``);
* one entry per runtime module kind, keyed by its ``spec_key``: ``{module name: spec()}`` for every
  module replaced by that class (``empty_attention`` for :class:`ZeroHeadAttention`; families add
  their own, e.g. LLaMA's ``kv_gather``).
"""

from __future__ import annotations

import copy
from typing import Dict, List, Optional

import torch
from torch import nn

SPAM_PRUNING_KEY = "spam_pruning"


class RuntimeModule:
    """Mixin for modules that pruned models need at load time; subclasses register themselves.

    A subclass sets either ``spec_key`` (it *replaces* modules: ``spec()`` records how, ``rebuild(old,
    entry)`` redoes it on a freshly built stock model) or ``resizes`` (a layer type, other than
    ``nn.Linear``, that :func:`new_linear` builds through ``resized(like, fan_in, fan_out)``).
    ``imports`` are the lines its source needs beyond this file's imports (export writes them).
    """

    spec_key: str = ""
    resizes: Optional[type] = None
    imports: tuple = ()
    registry: List[type] = []

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        RuntimeModule.registry[:] = [c for c in RuntimeModule.registry if c.__name__ != cls.__name__] + [cls]

    def spec(self) -> dict:
        raise NotImplementedError

    @classmethod
    def rebuild(cls, old: nn.Module, entry: dict) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def resized(cls, like: nn.Module, fan_in: int, fan_out: int) -> nn.Module:
        raise NotImplementedError

    def fits_stock(self, reference: nn.Module) -> bool:
        """Whether this module has the shapes of ``reference`` (the stock model's module at its path, on the meta
        device), so that export can write it in the stock layout (:meth:`to_stock`). Replacements that compute
        something the stock module cannot (an empty attention, gathered KV heads) never fit."""
        return False

    def to_stock(self, reference: nn.Module) -> nn.Module:
        """A module of ``reference``'s class computing what this one does, with this module's weights (only when
        :meth:`fits_stock`)."""
        raise NotImplementedError


def replacement_kinds() -> List[type]:
    """Registered runtime classes that replace modules (those with a ``spec_key``), in registration order."""
    return [c for c in RuntimeModule.registry if c.spec_key]


def new_linear(like: nn.Module, fan_in: int, fan_out: int) -> nn.Module:
    """A fresh layer of ``like``'s type, device and dtype with ``fan_in`` inputs and ``fan_out`` outputs."""
    w = like.weight
    if isinstance(like, nn.Linear):
        return nn.Linear(fan_in, fan_out, bias=like.bias is not None, device=w.device, dtype=w.dtype)
    for cls in RuntimeModule.registry:
        if cls.resizes is not None and isinstance(like, cls.resizes):
            return cls.resized(like, fan_in, fan_out).to(device=w.device, dtype=w.dtype)
    raise ValueError(f"cannot resize a {type(like).__name__}: no runtime module resizes it")


def output_width(proj: nn.Module) -> int:
    """Output features of a Linear (``weight`` out × in) or a transformers ``Conv1D`` (``nf``)."""
    return int(proj.nf) if hasattr(proj, "nf") else int(proj.weight.shape[0])


_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


class ZeroHeadAttention(nn.Module, RuntimeModule):
    """Stands in for an attention module with no heads left.

    Returns ``(out_proj(x[..., :0]), None)``: with an output projection (kept under its original
    child name ``out_child``, a ``Linear(0, d)``) this is its bias broadcast over ``(B, T, d)``;
    without one, an empty ``(B, T, 0)`` context for the next projection to consume. Masks are
    accepted and ignored. In a decoder (``layer_idx`` given) a KV cache passed in receives empty
    ``(B, 0, T, head_dim)`` keys and values, so the cache's sequence length stays right for
    ``generate()``.
    """

    spec_key = "empty_attention"

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
        out = hidden_states.new_zeros(*hidden_states.shape[:-1], output_width(proj))
        if getattr(proj, "bias", None) is not None:
            out = out + proj.bias.to(out.dtype)
        return out, None

    def spec(self) -> dict:
        """This module's ``empty_attention`` entry."""
        return {"out_child": self.out_child, "layer_idx": self.layer_idx, "head_dim": self.head_dim}

    @classmethod
    def rebuild(cls, old: nn.Module, entry: dict) -> nn.Module:
        entry = entry if isinstance(entry, dict) else {"out_child": entry}
        out_child = entry.get("out_child")
        out_proj = getattr(old, out_child) if out_child else None
        return cls(out_proj, out_child, entry.get("layer_idx"), entry.get("head_dim"))


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace submodule ``name`` (dotted path) of ``model`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_spam_pruning(model: nn.Module, spec: Optional[Dict] = None) -> nn.Module:
    """Reshape a freshly constructed stock model to the pruned sizes in ``spec``, in place.

    Weights of resized layers are left uninitialised; ``from_pretrained`` loads them afterwards.
    """
    spec = spec if spec is not None else getattr(model.config, SPAM_PRUNING_KEY, None)
    if not spec:
        return model
    kinds = {c.spec_key: c for c in replacement_kinds()}
    unknown = [k for k in spec if k not in kinds and k not in ("linear_shapes", "module_attrs")]
    if unknown:
        raise ValueError(f"spam_pruning names {unknown}, which this modeling code does not know")
    for key, cls in kinds.items():
        for name, entry in spec.get(key, {}).items():
            set_module(model, name, cls.rebuild(model.get_submodule(name), entry))
    for name, (fan_in, fan_out) in spec.get("linear_shapes", {}).items():
        old = model.get_submodule(name)
        w = old.weight
        stored = (fan_out, fan_in) if isinstance(old, nn.Linear) else (fan_in, fan_out)  # Conv1D: in × out
        if tuple(w.shape) != stored:
            set_module(model, name, new_linear(old, fan_in, fan_out))
    for name, attrs in spec.get("module_attrs", {}).items():
        module = model.get_submodule(name)
        for attr, value in attrs.items():
            set_module_attr(module, attr, value)
    return model


def set_module_attr(module: nn.Module, attr: str, value: int) -> None:
    """``module.attr = value``. ``attr = "config.<field>"`` sets the field on the module's own shallow copy of
    its config (made once): a per-layer value where the stock module reads a count from the shared config
    (Phi-3's attention reads ``config.num_attention_heads``)."""
    if not attr.startswith("config."):
        setattr(module, attr, value)
        return
    if not getattr(module, "_spam_own_config", False):
        module.config = copy.copy(module.config)
        module._spam_own_config = True
    setattr(module.config, attr[len("config."):], value)


def get_module_attr(module: nn.Module, attr: str):
    """``module.attr`` for a plain or a ``config.<field>`` attribute (``None`` when absent)."""
    owner = getattr(module, "config", None) if attr.startswith("config.") else module
    return getattr(owner, attr[len("config."):] if attr.startswith("config.") else attr, None)


class SpamPrunedMixin:
    """Mixed in front of a stock ``*For*`` class: builds the stock model, then applies ``spam_pruning``."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_spam_pruning(self, getattr(config, SPAM_PRUNING_KEY, None))
