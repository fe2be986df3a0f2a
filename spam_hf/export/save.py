"""Save a structurally pruned (plain, non-peft) model so that it loads with ``from_pretrained`` anywhere.

The per-layer sizes go into ``config.json`` (``spam_pruning``); ``modeling_spam.py`` (the source of
:mod:`spam_hf.architectures.runtime`, the family's runtime module classes and one generated class)
is registered in ``auto_map``. When nothing was resized (or the result fits the stock config) a
stock checkpoint is written with no custom code.
"""

from __future__ import annotations

import inspect
import os
from typing import List, Optional

import torch
import transformers
from torch import nn

from ..architectures import runtime
from ..architectures.base import get_family, in_out_features
from ..architectures.runtime import (SPAM_PRUNING_KEY, RuntimeModule, SpamPrunedMixin, get_module_attr,
                                     replacement_kinds, set_module)

REMOTE_CODE_FILE = "modeling_spam.py"


def _stock_config(model: nn.Module, overrides: Optional[dict] = None):
    """``model.config`` without spam-hf's keys, with ``overrides`` applied (a new config object)."""
    d = {k: v for k, v in model.config.to_dict().items() if k not in (SPAM_PRUNING_KEY, "auto_map")}
    d.update(overrides or {})
    return model.config.__class__.from_dict(d)


def reference_model(model: nn.Module, overrides: Optional[dict] = None) -> nn.Module:
    """The stock model ``model``'s config builds (with ``overrides``), on the meta device: shapes only."""
    with torch.device("meta"):
        return _stock_class(model)(_stock_config(model, overrides))


def pruning_spec(model: nn.Module, reference: Optional[nn.Module] = None) -> dict:
    """How ``model`` differs from ``reference``: ``linear_shapes``, ``module_attrs`` and, per runtime module
    kind, ``{name: module.spec()}`` for every module replaced by it (``empty_attention``, ``kv_gather``, ...).

    ``reference`` is a stock model built from the same config (built here on the meta device when
    not given). Shapes are recorded for every Linear/Conv1D whose shape differs, and the family's
    ``runtime_attrs`` whose value differs.
    """
    reference = reference_model(model) if reference is None else reference
    ref_mods = dict(reference.named_modules())
    attr_names = get_family(model).runtime_attrs
    spec: dict = {"linear_shapes": {}, "module_attrs": {}, **{c.spec_key: {} for c in replacement_kinds()}}
    for name, mod in model.named_modules():
        ref = ref_mods.get(name)
        if isinstance(mod, RuntimeModule) and mod.spec_key:
            if ref is None or not mod.fits_stock(ref):  # one that fits is saved in the stock layout (to_stock_layout)
                spec[mod.spec_key][name] = mod.spec()
            continue
        if ref is None:
            continue
        try:
            got, want = in_out_features(mod), in_out_features(ref)
        except TypeError:
            got = want = None
        if got != want:
            spec["linear_shapes"][name] = list(got)
        changed = {a: int(_own_attr(mod, a)) for a in attr_names
                   if isinstance(_own_attr(mod, a), int) and _own_attr(mod, a) != get_module_attr(ref, a)}
        if changed:
            spec["module_attrs"][name] = changed
    return spec


def to_stock_layout(model: nn.Module, reference: nn.Module) -> None:
    """Put back, in place, every runtime module whose shapes fit the stock module at its path in ``reference``
    (:meth:`~spam_hf.architectures.runtime.RuntimeModule.fits_stock`): the mixture-of-experts blocks spam-hf
    split into Linear layers go back to the stock 3-D expert tensors when the experts kept their number and
    width. :func:`pruning_spec` records only the runtime modules that do not fit."""
    ref_mods = dict(reference.named_modules())
    for name, mod in list(model.named_modules()):
        ref = ref_mods.get(name)
        if isinstance(mod, RuntimeModule) and mod.spec_key and ref is not None and mod.fits_stock(ref):
            set_module(model, name, mod.to_stock(ref))


def _own_attr(module: nn.Module, attr: str):
    """``module``'s value of a runtime attribute; a ``config.<field>`` only where the module has its own config
    (:func:`~spam_hf.architectures.runtime.set_module_attr`), not the model's shared one."""
    if attr.startswith("config.") and not getattr(module, "_spam_own_config", False):
        return None
    return get_module_attr(module, attr)


def is_stock(spec: dict) -> bool:
    return not any(spec.values())


def _stock_class(model: nn.Module) -> type:
    """The transformers class a (possibly spam-wrapped) model instance derives from."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers.models."):
            return cls
    raise ValueError(f"{type(model).__name__} is not a transformers model class")


def remote_code_source(base_class_name: str, runtime_modules: tuple = ()) -> str:
    """The self-contained modeling file written next to the weights: the runtime core, the source of each
    of ``runtime_modules`` (with its ``imports``) and ``Spam<base_class_name>``."""
    parts: List[str] = [inspect.getsource(runtime)]
    for cls in runtime_modules:
        imports = "".join(f"{line}\n" for line in cls.imports)
        parts.append(f"\n\n{imports}\n\n{inspect.getsource(cls)}")
    cls_name = f"Spam{base_class_name}"
    parts.append(f"\n\nfrom transformers import {base_class_name} as _SpamBase\n\n\n"
                 f"class {cls_name}(SpamPrunedMixin, _SpamBase):\n"
                 f"    \"\"\"{base_class_name} with per-layer sizes from ``config.spam_pruning``.\"\"\"\n")
    return "".join(parts)


def _auto_class_for(cls: type) -> str:
    """The ``AutoModel*`` name whose mapping contains ``cls`` (e.g. AutoModelForSequenceClassification)."""
    for auto_name in dir(transformers):
        if not auto_name.startswith("AutoModel"):
            continue
        auto = getattr(transformers, auto_name)
        mapping = getattr(auto, "_model_mapping", None)
        if mapping is None:
            continue
        try:
            if cls in mapping.values():
                return auto_name
        except Exception:
            continue
    raise ValueError(f"no AutoModel class maps to {cls.__name__}")


def save_pruned_model(model: nn.Module, output_dir: str, tokenizer=None, extra_config: Optional[dict] = None) -> str:
    """Save a plain (non-peft) model: weights (safetensors), config with ``spam_pruning`` and, when needed,
    the remote code. Returns ``"stock"`` or ``"remote_code"``."""
    os.makedirs(output_dir, exist_ok=True)
    family = get_family(model)
    reference = reference_model(model)
    spec = pruning_spec(model, reference)
    overrides = family.stock_config(model) if not is_stock(spec) else None
    if overrides:
        uniform = reference_model(model, overrides)
        spec_with = pruning_spec(model, uniform)
        if is_stock(spec_with):  # expressible in the stock class: a uniform result
            spec, reference = spec_with, uniform
            for key, value in overrides.items():
                setattr(model.config, key, value)
    to_stock_layout(model, reference)
    base = _stock_class(model)
    config = model.config
    for key in (SPAM_PRUNING_KEY, "auto_map"):
        if hasattr(config, key):
            delattr(config, key)
    config.architectures = [base.__name__]
    kind = "stock"
    if not is_stock(spec):
        kind = "remote_code"
        setattr(config, SPAM_PRUNING_KEY, {**{k: v for k, v in spec.items() if v}, **(extra_config or {})})
        config.auto_map = {_auto_class_for(base): f"modeling_spam.Spam{base.__name__}"}
        with open(os.path.join(output_dir, REMOTE_CODE_FILE), "w") as f:
            f.write(remote_code_source(base.__name__, family.runtime_modules))
    model.save_pretrained(output_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    return kind


def from_pretrained(path: str, **kwargs) -> nn.Module:
    """Load a spam-hf export without ``trust_remote_code`` (spam-hf's own copy of the modeling code)."""
    config = transformers.AutoConfig.from_pretrained(path)
    archs = getattr(config, "architectures", None) or []
    if not archs or not hasattr(transformers, archs[0]):
        raise ValueError(f"{path}: config.architectures {archs} names no transformers class")
    base = getattr(transformers, archs[0])
    if not getattr(config, SPAM_PRUNING_KEY, None):
        return base.from_pretrained(path, **kwargs)
    cls = type(f"Spam{base.__name__}", (SpamPrunedMixin, base), {})
    return cls.from_pretrained(path, config=config, **kwargs)


__all__ = ["from_pretrained", "pruning_spec", "save_pruned_model"]
