"""``prune``: re-prune a finished ``compress`` run at another sparsity, without retraining."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Optional

from transformers import AutoTokenizer

from ..arguments import DataArguments, FinishArguments, LoraArguments, ModelArguments
from ..posterior import STATE_FILE
from ..pruning.config import PruningConfig
from ..trainer import SpamTrainer
from ..training_arguments import SpamTrainingArguments
from .compress import base_sparsity
from .finish import RunContext, precheck, prune_and_export
from .loading import collator_for, load_data_for, load_run_model, metrics_for, pin_memory
from .outputs import REPORT_FILE, RUN_CONFIG, check_reprune_output
from .reporting import snapshot
from .resolve import display_name


def reprune(run_dir: str, config: PruningConfig, args: Optional[FinishArguments] = None,
            output_dir: Optional[str] = None, command: str = "", overwrite_output_dir: bool = False) -> dict:
    """Re-prune a finished ``compress`` run as ``config`` says (another sparsity, score, ...) from its saved
    weights, priors and curvature; ``args``: the recovery and the latency lines (default: none, measured).

    The output directory (default ``RUN_DIR/pruned-S``) must be new or empty unless ``overwrite_output_dir``.
    """
    cfg_path = os.path.join(run_dir, RUN_CONFIG)
    dense_dir = os.path.join(run_dir, "dense")
    if not os.path.exists(cfg_path) or not os.path.exists(os.path.join(dense_dir, STATE_FILE)):
        raise ValueError(f"{run_dir!r} is not a spam-hf compress run (no {RUN_CONFIG} or dense/{STATE_FILE})")
    args = args if args is not None else FinishArguments()
    out = output_dir or os.path.join(run_dir, f"pruned-{config.sparsity:g}")
    check_reprune_output(run_dir, out, overwrite_output_dir)
    cfg = read_run_config(cfg_path)
    # pruned during training (only SpaM training has a schedule): dense/ is the masked model
    masked_dense = cfg.get("compress", {}).get("training", "spam") == "spam" and \
        bool(cfg["training"].get("schedule_sparsity"))
    data_args = DataArguments(**cfg["data"])
    state = read_json(os.path.join(dense_dir, STATE_FILE))
    scratch = os.path.join(out, "trainer_tmp")  # the Trainer's own output dir; removed when done
    known = {f.name for f in dataclasses.fields(SpamTrainingArguments) if f.init}
    tr = {k: v for k, v in cfg["training"].items() if k in known}
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # how the compress run was launched (torchrun), not this one:
        tr.pop("ddp_backend", None)  # a backend without a process group stops accelerate ("not been initialized")
    tr.update(output_dir=scratch, n_data=int(state["n_data"]), report_to=[], marglik_frequency=0,
              dataloader_pin_memory=tr.get("dataloader_pin_memory", True) and pin_memory())
    train_args = SpamTrainingArguments(**tr)
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    data = load_data_for(tokenizer, data_args)
    model = load_run_model(dense_dir, data, base_path=cfg["resolved_model"])
    precheck(model, config, args, train_args.kv_groups_only, masked_dense)
    created = not os.path.exists(out)
    os.makedirs(out, exist_ok=True)  # only now: a refused request leaves no folder behind
    try:
        return _prune_run(run_dir, cfg, config, args, out, scratch, model, data, tokenizer, data_args, train_args,
                          masked_dense, command)
    except BaseException:
        # a failed job (a truncated posterior file, a full disk, Ctrl-C) leaves nothing that blocks its retry
        if created and os.path.isdir(out) and not [f for f in os.listdir(out) if f != "trainer_tmp"]:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def read_json(path: str):
    """A JSON file of a run; a file that is not JSON is one line that names it."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from None


RUN_CONFIG_KEYS = ("model", "resolved_model", "data", "compress", "training")


def read_run_config(path: str) -> dict:
    """``run_config.json`` of a compress run, with one-line errors that name it when it is not JSON or lacks a
    section that ``prune`` rebuilds the run from."""
    cfg = read_json(path)
    missing = [k for k in RUN_CONFIG_KEYS if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise ValueError(f"{path} is not a spam-hf run config: it has no {', '.join(repr(k) for k in missing)}")
    return cfg


def _prune_run(run_dir, cfg, config, args, out, scratch, model, data, tokenizer, data_args, train_args, masked_dense,
               command):
    metric = data_args.metric
    dense_dir = os.path.join(run_dir, "dense")
    trainer = SpamTrainer(model=model, args=train_args, train_dataset=data["train"], eval_dataset=data["validation"],
                          data_collator=collator_for(data, tokenizer), processing_class=tokenizer,
                          compute_metrics=metrics_for(metric))
    trainer.load_spam_state(dense_dir)
    dense = None
    saved_report = os.path.join(run_dir, REPORT_FILE)
    if os.path.exists(saved_report):  # the dense numbers measured by `compress`, when they match this request
        with open(saved_report) as f:
            saved = json.load(f)["dense"]
        if saved.get("seq_len") == config.flops_seq_len:
            dense = {k: v for k, v in saved.items() if not k.startswith("latency")}  # re-measured, interleaved
    if dense is None:
        dense = snapshot(trainer, data["validation"], metric, config.flops_seq_len, args.latency_batch_size, False)
    lora_args = LoraArguments(**cfg.get("lora", {}))
    ctx = RunContext(data=data, tokenizer=tokenizer, data_args=data_args, train_args=train_args, dense=dense,
                     base_name=display_name(ModelArguments(**cfg["model"]), cfg["resolved_model"]), command=command,
                     merged=lora_args.lora_merge, base_sparsity=base_sparsity(lora_args, config.sparsity),
                     masked_dense=masked_dense)
    return prune_and_export(trainer, ctx, config, args, out)
