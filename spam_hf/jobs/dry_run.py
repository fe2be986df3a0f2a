"""``compress --dry-run``: will the job fit? The predicted peak memory of every stage, from the config alone."""

from __future__ import annotations

from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from ..architectures import get_family, group_specs
from ..arguments import CompressArguments, DataArguments, LoraArguments, ModelArguments
from ..training_arguments import SpamTrainingArguments
from ..memory import gib, peak, predict
from ..pruning.config import PruningConfig
from .finish import choose_sequential
from .placement import dispatched_job
from .resolve import resolve_model


def meta_model(path: str, causal_lm: bool):
    """The model ``path``'s config describes, on the ``meta`` device (shapes and dtypes, no weights)."""
    config = AutoConfig.from_pretrained(path)
    get_family(config.model_type)  # an unsupported architecture fails here
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    with torch.device("meta"):
        auto = AutoModelForCausalLM if causal_lm else AutoModelForSequenceClassification
        model = auto.from_config(config)
    if isinstance(dtype, torch.dtype) and dtype != torch.float32:
        model = model.to(dtype)  # a checkpoint loads in float32 unless told otherwise; say what it holds
    return model


def dry_run(model_args: ModelArguments, data_args: DataArguments, config: PruningConfig, args: CompressArguments,
            train_args: SpamTrainingArguments, lora_args: Optional[LoraArguments] = None) -> dict:
    """Print the prunable groups per layer and the predicted peak of each stage (:func:`spam_hf.memory.predict`);
    the last line is ``peak memory: N GiB``. Nothing is loaded but the config, nothing is written."""
    lora_args = lora_args or LoraArguments()
    config, args = dispatched_job(model_args, config, args, lora_args, train_args.world_size)  # what the job refuses
    path = resolve_model(model_args.model_name_or_path)
    causal_lm = data_args.is_causal_lm
    model = meta_model(path, causal_lm)
    config = config.resolved(lora_args.enabled)
    if config.sequential is None:  # what the job would choose on this machine
        config = choose_sequential(model, config, train_args.per_device_train_batch_size, data_args.max_seq_length,
                                   device="cuda" if torch.cuda.is_available() and not train_args.use_cpu else "cpu")
    kv = train_args.kv_groups_only
    specs = group_specs(model, kv)
    counts: dict = {}  # layer -> kind -> groups (a mixture of experts has a neuron spec per expert)
    for s in specs:
        kinds = counts.setdefault(s.layer, {})
        kinds[s.kind] = kinds.get(s.kind, 0) + s.count
    per_layer = {layer: [f"{n} {kind.replace('_', ' ')}s" for kind, n in kinds.items()]
                 for layer, kinds in counts.items()}
    n_params = sum(p.numel() for p in model.parameters())
    stages = predict(model, training=args.training, curvature=train_args.curvature, sequential=config.sequential,
                     consuming_only=config.score.collects_consuming_only,
                     batch_size=train_args.per_device_train_batch_size, seq_len=data_args.max_seq_length,
                     calibration_batches=config.calibration_batches,
                     eval_batch_size=train_args.per_device_eval_batch_size, causal_lm=causal_lm,
                     measure_latency=args.measure_latency, kv_groups_only=kv,
                     diagonal_from=train_args.kfac_diagonal_from)
    print(f"dry run: {type(model).__name__} ({len(per_layer)} layers, {n_params:,} parameters, "
          f"{str(next(model.parameters()).dtype).replace('torch.', '')})")
    groups = sorted(set(", ".join(v) for v in per_layer.values()))
    print("prunable groups per layer: " + ("; ".join(groups) if len(groups) > 1 else groups[0]))
    print(f"pruning: {config.method}, " + ("block by block" if config.sequential else
                                          f"{config.rounds} round(s) all at once"))
    for st in stages:
        detail = ", ".join(f"{k} {gib(v)}" for k, v in st.parts.items() if v)
        print(f"  {st.name:<11} {gib(st.bytes):>10}   {st.note + ': ' if st.note else ''}{detail}")
    total = peak(stages)
    print(f"peak memory: {total / 2**30:.1f} GiB")
    return {"stages": {st.name: st.bytes for st in stages}, "peak_bytes": total,
            "groups_per_layer": per_layer}
