"""Loading: data and tokenizer for a model, the model for the data, LoRA wrapping, saved run models."""

from __future__ import annotations

import contextlib
import json
import logging as std_logging
import os
from typing import List, Optional

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          DataCollatorWithPadding, default_data_collator)
from transformers.utils import logging as hf_logging

from ..architectures import SPAM_PRUNING_KEY, get_family
from ..architectures.llama import HeadGatherLinear
from ..arguments import DataArguments, LoraArguments, ModelArguments
from ..data import load_raw_data, tokenize
from ..export import from_pretrained
from ..metrics import compute_metrics_fn
from .resolve import resolve_model

logger = hf_logging.get_logger("spam_hf")


def prepare(model_args: ModelArguments, data_args: DataArguments):
    """Resolve the model, check its architecture, load and tokenise data (no output written).

    Returns ``(path, config, tokenizer, data)``.
    """
    path = resolve_model(model_args.model_name_or_path)
    config = AutoConfig.from_pretrained(path)
    get_family(config.model_type)  # unsupported architecture: fails before any training
    raw, text, pair, label = load_raw_data(data_args)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None and label is not None:  # decoders: pad classification batches with EOS
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {path} has neither a pad nor an EOS token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    data = tokenize(raw, tokenizer, text, pair, label, data_args.max_seq_length)
    return path, config, tokenizer, data


def load_data_for(tokenizer, data_args: DataArguments):
    """Load and tokenise ``data_args`` with an existing tokenizer."""
    raw, text, pair, label = load_raw_data(data_args)
    return tokenize(raw, tokenizer, text, pair, label, data_args.max_seq_length)


def collator_for(data, tokenizer):
    """Packed LM blocks have equal length (stack them); classification inputs are padded per batch."""
    return default_data_collator if getattr(data, "num_labels", None) is None else DataCollatorWithPadding(tokenizer)


def metrics_for(metric: str):
    """``compute_metrics`` for the Trainer; none for perplexity (from ``eval_loss``, logits never gathered)."""
    return None if metric == "perplexity" else compute_metrics_fn(metric)


def load_classifier(path: str, num_labels: int, label_names: Optional[List[str]] = None, tokenizer=None,
                    placement: Optional[dict] = None):
    kw = dict(placement or {})
    if label_names:
        kw.update(id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)})
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        kw["pad_token_id"] = tokenizer.pad_token_id  # decoder classifiers find the last real token by it
    with weights_named(path), quiet_load_report():
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, ignore_mismatched_sizes=True, output_loading_info=True, **kw)
    get_family(model)
    mismatched = {k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys", [])}
    new = sorted(set(info.get("missing_keys", [])) | mismatched)
    head = {n for n, _ in model.named_parameters() if not n.startswith(model.base_model_prefix + ".")}
    if new and set(new) <= head:  # the usual case: a fresh classification head on a pretrained body
        logger.info(f"new classification head ({', '.join(new)}): trained by this job")
    elif new:
        logger.warning(f"weights not in {path}, newly initialised: {', '.join(new[:8])}"
                       f"{', ...' if len(new) > 8 else ''}")
    return model


def pin_memory() -> bool:
    """``dataloader_pin_memory`` for this machine: pinned host memory only helps copies to a GPU (on a CPU torch
    warns about it on every data loader)."""
    return torch.cuda.is_available()


@contextlib.contextmanager
def quiet_load_report():
    """transformers' loading table (``LOAD REPORT``) left out while the job loads a model: the job reports what is
    new in one line instead. A filter, not a level: transformers checks its tensor-parallel plan (and warns about
    it) when that logger's level is WARNING or above."""
    report_logger = hf_logging.get_logger("transformers.modeling_utils")
    drop = _DropLoadReport()
    report_logger.addFilter(drop)
    try:
        yield
    finally:
        report_logger.removeFilter(drop)


class _DropLoadReport(std_logging.Filter):
    def filter(self, record: std_logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


def fsdp2_placement() -> dict:
    """``from_pretrained``'s ``distributed_config`` that shards the model over every process of this job with
    FSDP2 (``--fsdp2``); a clear error in one process or without transformers' native FSDP2."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes < 2:
        raise ValueError("--fsdp2 shards the model over the processes of torchrun / accelerate launch, and this job "
                         "runs in one: launch it with torchrun --nproc_per_node N (N >= 2)")
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        raise ValueError("--fsdp2 needs transformers' native FSDP2 (transformers.distributed.DistributedConfig), "
                         "which this transformers lacks: upgrade it") from None
    return {"distributed_config": DistributedConfig(fsdp_size=processes)}


def load_model(path: str, data, tokenizer=None, placement: Optional[dict] = None, fsdp2: bool = False):
    """``AutoModelForCausalLM`` for packed LM data, else a sequence classifier with the data's labels;
    ``placement``: ``from_pretrained``'s ``device_map`` / ``max_memory`` / ``offload_folder``
    (:meth:`ModelArguments.placement`); ``fsdp2``: sharded over the processes (:func:`fsdp2_placement`)."""
    if fsdp2:
        placement = {**(placement or {}), **fsdp2_placement()}
    if getattr(data, "num_labels", None) is None:
        with weights_named(path):
            model = AutoModelForCausalLM.from_pretrained(path, **(placement or {}))
        get_family(model)
        return model
    return load_classifier(path, data.num_labels, data.label_names, tokenizer, placement)


@contextlib.contextmanager
def weights_named(path: str):
    """A weights file that cannot be read (truncated safetensors: "incomplete metadata") is an error that names
    the model folder."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"the weights in {path} cannot be read ({first})") from None


def wrap_lora(model, lora_args: LoraArguments):
    """``peft.get_peft_model`` with the LoRA arguments; its errors (unknown target modules) as one clear line."""
    from peft import get_peft_model

    causal = type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    config = lora_args.peft_config(causal)
    targets = get_family(model).lora_targets
    if config.target_modules is None and targets:
        config.target_modules = set(targets)  # the family's default (peft's own lacks some, ArchitectureFamily)
    if isinstance(config.target_modules, (list, set)):
        names = [n for n, _ in model.named_modules()]
        missing = [t for t in config.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            linear = sorted({n.split(".")[-1] for n, m in model.named_modules()
                             if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"})
            raise ValueError(f"LoRA: target module(s) {', '.join(missing)} not found in {type(model).__name__}; "
                             f"its Linear layers are named {', '.join(linear)}")
        gathered = [n for n, m in model.named_modules() if isinstance(m, HeadGatherLinear)
                    and any(n == t or n.endswith("." + t) for t in config.target_modules)]
        if gathered:
            raise ValueError(f"LoRA: {gathered[0]} repeats KV heads (a GQA layer pruned to uneven query heads per "
                             f"KV head) and peft cannot wrap it; target its inner Linear ('linear') instead of "
                             f"k_proj/v_proj, or prune with --kv_groups_only True")
    try:
        model = get_peft_model(model, config)
    except (ValueError, KeyError) as e:
        raise ValueError(f"LoRA: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    get_family(model).group_specs(model)  # unsupported adapter layouts fail here, before training
    model.print_trainable_parameters()
    return model


def load_run_model(model_dir: str, data, base_path: Optional[str] = None):
    """A saved model: a spam-hf export / stock checkpoint, or a peft adapter on its base (``base_path`` or the
    adapter config's ``base_model_name_or_path``), trainable so that recovery fine-tuning works."""
    adapter_cfg = os.path.join(model_dir, "adapter_config.json")
    if not os.path.exists(adapter_cfg):
        return from_pretrained(model_dir)
    from peft import PeftModel

    with open(adapter_cfg) as f:
        base = base_path or json.load(f).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{model_dir} is a LoRA adapter whose config names no base model")
    pruned_base = False
    if os.path.isdir(base):  # a local base: maybe the smaller base written by --prune-base
        with open(os.path.join(base, "config.json")) as f:
            pruned_base = SPAM_PRUNING_KEY in json.load(f)
    base_model = from_pretrained(base) if pruned_base else load_model(resolve_model(base), data)
    return PeftModel.from_pretrained(base_model, model_dir, is_trainable=True)
