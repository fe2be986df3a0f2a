"""``evaluate``: metric, parameters, FLOPs and latency of any checkpoint (pruned by spam-hf or stock)."""

from __future__ import annotations

import os
import tempfile

from transformers import AutoTokenizer, Trainer, TrainingArguments

from ..architectures import get_family
from ..arguments import DataArguments
from .loading import collator_for, load_data_for, load_run_model, metrics_for, pin_memory
from .reporting import fmt_flops, fmt_int, print_table, snapshot


def evaluate_checkpoint(model_dir: str, data_args: DataArguments, seq_len: int = 128, batch_size: int = 32) -> dict:
    """``{params, block_params, block_flops, latency_s, <metric>, ...}`` of the checkpoint in ``model_dir``,
    printed as a table. Nothing is written into ``model_dir``."""
    if not os.path.isdir(model_dir):
        raise ValueError(f"model dir {model_dir!r} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = load_data_for(tokenizer, data_args)
    model = load_run_model(model_dir, data)
    get_family(model)
    metric = data_args.metric
    with tempfile.TemporaryDirectory(prefix="spam-hf-eval-") as scratch:
        args = TrainingArguments(output_dir=scratch, report_to=[], per_device_eval_batch_size=64,
                                 dataloader_pin_memory=pin_memory())
        trainer = Trainer(model=model, args=args, data_collator=collator_for(data, tokenizer),
                          processing_class=tokenizer, compute_metrics=metrics_for(metric))
        res = snapshot(trainer, data["validation"], metric, seq_len, batch_size, True)
    print_table([("parameters", fmt_int(res["params"]), ""), ("block parameters", fmt_int(res["block_params"]), ""),
                 (f"block FLOPs (T={seq_len})", fmt_flops(res["block_flops"]), ""), (metric, f"{res[metric]:.4f}", ""),
                 (f"latency (batch {batch_size})", f"{res['latency_s'] * 1e3:.1f} ms", "")])
    return res
