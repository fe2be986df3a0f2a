"""Save a structurally pruned model so that it loads with ``from_pretrained`` anywhere.

The per-layer sizes go into ``config.json`` (``spam_pruning``); ``modeling_spam.py`` (this package's
:mod:`spam_hf.export.modeling_spam`, copied verbatim, plus one generated class) is registered in
``auto_map``. When nothing was resized (or the result fits the stock config) a stock checkpoint
is written with no custom code.
"""

from __future__ import annotations

import inspect
import os
from typing import Optional

import torch
import transformers
from torch import nn

from ..architectures.base import get_family, in_out_features
from ..architectures.lora import is_peft_model
from . import modeling_spam
from .modeling_spam import SPAM_PRUNING_KEY, HeadGatherLinear, SpamPrunedMixin, ZeroHeadAttention, apply_spam_pruning

REMOTE_CODE_FILE = "modeling_spam.py"


#: integer attributes attention modules read in ``forward`` (recorded when pruning changed them)
RUNTIME_ATTRS = ("num_heads", "split_size", "num_attention_heads", "all_head_size", "n_heads",
                 "num_key_value_groups")


def _stock_config(model: nn.Module, overrides: Optional[dict] = None):
    """``model.config`` without spam-hf's keys, with ``overrides`` applied (a new config object)."""
    d = {k: v for k, v in model.config.to_dict().items() if k not in (SPAM_PRUNING_KEY, "auto_map")}
    d.update(overrides or {})
    return model.config.__class__.from_dict(d)


def _reference(model: nn.Module, overrides: Optional[dict] = None) -> nn.Module:
    with torch.device("meta"):  # shapes only, no memory
        return _stock_class(model)(_stock_config(model, overrides))


def pruning_spec(model: nn.Module, reference: Optional[nn.Module] = None) -> dict:
    """``{"linear_shapes", "module_attrs", "empty_attention", "kv_gather"}``: how ``model`` differs from
    ``reference``.

    ``reference`` is a stock model built from the same config (built here on the meta device when
    not given). Shapes are recorded for every Linear/Conv1D whose shape differs, attributes from
    :data:`RUNTIME_ATTRS` whose value differs, every :class:`ZeroHeadAttention` and every
    :class:`HeadGatherLinear`.
    """
    reference = _reference(model) if reference is None else reference
    ref_mods = dict(reference.named_modules())
    shapes, attrs, empty, gather = {}, {}, {}, {}
    for name, mod in model.named_modules():
        ref = ref_mods.get(name)
        if isinstance(mod, ZeroHeadAttention):
            empty[name] = mod.spec()
            continue
        if isinstance(mod, HeadGatherLinear):
            gather[name] = mod.spec()
            continue
        if ref is None:
            continue
        try:
            got, want = in_out_features(mod), in_out_features(ref)
        except TypeError:
            got = want = None
        if got != want:
            shapes[name] = list(got)
        changed = {a: int(getattr(mod, a)) for a in RUNTIME_ATTRS
                   if isinstance(getattr(mod, a, None), int) and getattr(mod, a) != getattr(ref, a, None)}
        if changed:
            attrs[name] = changed
    return {"linear_shapes": shapes, "module_attrs": attrs, "empty_attention": empty, "kv_gather": gather}


def is_stock(spec: dict) -> bool:
    return not any(spec.values())


def _stock_class(model: nn.Module) -> type:
    """The transformers class a (possibly spam-wrapped) model instance derives from."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers.models."):
            return cls
    raise ValueError(f"{type(model).__name__} is not a transformers model class")


def remote_code_source(base_class_name: str) -> str:
    """The self-contained modeling file written next to the weights."""
    src = inspect.getsource(modeling_spam)
    cls = f"Spam{base_class_name}"
    return (src + f"\n\nfrom transformers import {base_class_name} as _SpamBase\n\n\n"
            f"class {cls}(SpamPrunedMixin, _SpamBase):\n"
            f"    \"\"\"{base_class_name} with per-layer sizes from ``config.spam_pruning``.\"\"\"\n")


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


def save_pruned(model: nn.Module, output_dir: str, tokenizer=None, extra_config: Optional[dict] = None) -> str:
    """Save weights (safetensors), config with ``spam_pruning`` and, when needed, the remote code.

    A peft LoRA model is saved as a stock peft adapter (:func:`spam_hf.export.lora.save_lora_adapter`).

    Returns ``"stock"``, ``"remote_code"`` or ``"peft_adapter"``.
    """
    if is_peft_model(model):
        from .lora import save_lora_adapter

        return save_lora_adapter(model, output_dir, tokenizer=tokenizer)
    os.makedirs(output_dir, exist_ok=True)
    spec = pruning_spec(model)
    overrides = get_family(model).stock_config(model) if not is_stock(spec) else None
    if overrides:
        spec_with = pruning_spec(model, _reference(model, overrides))
        if is_stock(spec_with):  # expressible in the stock class: a uniform result
            spec = spec_with
            for key, value in overrides.items():
                setattr(model.config, key, value)
    base = _stock_class(model)
    config = model.config
    for key in (SPAM_PRUNING_KEY, "auto_map"):
        if hasattr(config, key):
            delattr(config, key)
    config.architectures = [base.__name__]
    kind = "stock"
    if not is_stock(spec):
        kind = "remote_code"
        setattr(config, SPAM_PRUNING_KEY, {**spec, **(extra_config or {})})
        config.auto_map = {_auto_class_for(base): f"modeling_spam.Spam{base.__name__}"}
        with open(os.path.join(output_dir, REMOTE_CODE_FILE), "w") as f:
            f.write(remote_code_source(base.__name__))
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


__all__ = ["apply_spam_pruning", "from_pretrained", "pruning_spec", "save_pruned"]
