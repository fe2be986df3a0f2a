"""``compress``: resolve → load data → fine-tune with SpamTrainer → evaluate dense → save the run → prune →
(recovery) → evaluate → export (→ push). All inputs are validated before anything is written."""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Optional, Tuple

from transformers import Trainer, TrainingArguments, set_seed
from transformers.utils import logging

from ..architectures import get_family
from ..arguments import CompressArguments, DataArguments, LoraArguments, ModelArguments
from ..distributed import check_process_count, is_main_process
from ..export.hub import check_hub
from ..posterior import unwrap
from ..pruning.config import PruningConfig
from ..pruning.sequential import sharded_refusal
from ..trainer import SpamTrainer, check_complete, last_complete_checkpoint, per_batch_mean_loss
from ..training_arguments import SpamTrainingArguments
from .finish import RunContext, plain_args, precheck, prune_and_export
from .loading import collator_for, load_model, load_run_model, metrics_for, prepare, wrap_lora
from .outputs import check_output_dir, write_run_config
from .placement import dispatched_job
from .policy import resolve_schedule
from .reporting import snapshot
from .resolve import display_name

logger = logging.get_logger(__name__)


def base_sparsity(lora_args: LoraArguments, sparsity: float) -> Optional[float]:
    """How much of a LoRA run's frozen base to prune (``None``: the base is kept; default: ``sparsity``, the
    adapter's)."""
    if not lora_args.prune_base:
        return None
    return lora_args.base_sparsity if lora_args.base_sparsity is not None else sparsity


def resume_point(train_args: SpamTrainingArguments):
    """``--resume_from_checkpoint``: a checkpoint folder, or ``True`` for the last complete one in the output dir
    (``true`` / ``last``; unfinished ones are skipped with a warning); ``None`` when not resuming. A folder that
    does not exist, or was never finished, is an error now, not after loading the data."""
    value = train_args.resume_from_checkpoint
    if value in (None, "", False):
        return None
    if value is True or str(value).lower() in ("true", "last"):
        last = last_complete_checkpoint(train_args.output_dir)
        if last is None:
            raise ValueError(f"--resume_from_checkpoint: no complete checkpoint-* folder in {train_args.output_dir!r}")
        return last
    if not os.path.isdir(value):
        raise ValueError(f"--resume_from_checkpoint: {value!r} is not a checkpoint folder")
    check_complete(value)
    return value


def continues_run(resume: Optional[str], out_dir: str) -> bool:
    """Whether resuming from ``resume`` continues the run in ``out_dir``: only a checkpoint inside that folder
    does. A checkpoint kept elsewhere starts a new run there, so the non-empty check still applies (it used
    to be skipped for any resume, and the new run deleted the user's ``out_dir/model``)."""
    if resume is None:
        return False
    inside = os.path.realpath(resume)
    return inside.startswith(os.path.realpath(out_dir) + os.sep)


def check_shardable(model_type: str, lora_args: LoraArguments) -> None:
    """``--fsdp2`` refused, before loading, for a LoRA run and for the families that cannot be sharded."""
    if lora_args.enabled:
        raise ValueError("--fsdp2 with LoRA (--lora-r) is not supported: a LoRA run keeps the base frozen and needs "
                         "little memory per process; run it data parallel (leave --fsdp2 out)")
    reason = get_family(model_type).fsdp2_refusal
    if reason:
        raise ValueError(f"--fsdp2 is not supported for {model_type}: {reason}; run it data parallel (leave --fsdp2 "
                         "out)")


def sharded_pruning(trainer: SpamTrainer, config: PruningConfig, resolved: PruningConfig, args: CompressArguments,
                    dense_dir: str, data) -> Tuple[PruningConfig, CompressArguments, SpamTrainer]:
    """After FSDP2 training: ``(config, args, trainer)`` to prune with. By default the sharded model is pruned where
    it is, block by block (one gathered block at a time, :func:`spam_hf.sharding.gathered_block`), and stays
    sharded for the recovery and the export; its latency is not measured (a sharded forward's time is its
    all-gathers). Choices that need every block at once (``resolved``: ``--sequential False``, a score such as
    ``damage``, ``--uniform``, ``--drop-blocks``, distillation from the model before pruning) are pruned data
    parallel instead, each process on an unsharded copy read back from ``dense_dir``, with a warning that says why."""
    reason = sharded_refusal(unwrap(trainer.model), resolved)
    if reason is None and (args.distill or args.distill_hidden_weight):
        reason = "distillation keeps the model before pruning as its teacher"
    if reason is not None:
        logger.warning(f"the sharded model cannot be pruned where it is ({reason}): each process prunes an "
                       "unsharded copy of the model instead (leave that choice out to prune it block by block)")
        return config, args, trainer.unsharded(load_run_model(dense_dir, data))
    if args.measure_latency:
        logger.info("--fsdp2: latency is not measured (a sharded model's time is its all-gathers)")
        args = dataclasses.replace(args, measure_latency=False)
    logger.info("spam-hf prunes the FSDP2-sharded model where it is, block by block: one block at a time is gathered, "
                "cut and sharded again")
    return config.replace(sequential=True, rounds=1), args, trainer


def compress(model_args: ModelArguments, data_args: DataArguments, config: PruningConfig, args: CompressArguments,
             train_args: SpamTrainingArguments, command: str = "", lora_args: Optional[LoraArguments] = None) -> dict:
    """Run the whole job; returns the report dict (also written to ``output_dir/pruning_report.json``).
    ``config`` says how to prune; ``args`` the recovery, the latency lines and the job around them.

    With ``lora_args.lora_r > 0`` the model is wrapped in a peft LoRA adapter: the base stays frozen,
    priors sit on the adapter ranks, and the export is a stock peft adapter.
    """
    lora_args = lora_args or LoraArguments()
    check_process_count(train_args.world_size)  # before anything is written
    out_dir = train_args.output_dir
    resume = resume_point(train_args)
    check_output_dir(out_dir, args.overwrite_output_dir or continues_run(resume, out_dir))
    if args.push_to_hub_repo:
        check_hub(args.push_to_hub_repo)  # an offline push fails now, not after training
    config, args = dispatched_job(model_args, config, args, lora_args, train_args.world_size)
    path, model_config, tokenizer, data = prepare(model_args, data_args)
    metric = data_args.metric
    set_seed(train_args.seed)  # a newly initialised head (the packaged MiniLM has none) is the same every run
    if model_args.fsdp2:
        check_shardable(model_config.model_type, lora_args)
    model = load_model(path, data, tokenizer, model_args.placement(), fsdp2=model_args.fsdp2)
    if lora_args.enabled:
        model = wrap_lora(model, lora_args)
    schedule = resolve_schedule(args, config.sparsity, train_args, lora_args.enabled)  # None / 0: none in training
    masked_dense = bool(schedule)
    resolved = precheck(model, config, args, train_args.kv_groups_only, masked_dense)  # before training, not after
    os.makedirs(out_dir, exist_ok=True)
    collator = collator_for(data, tokenizer)
    train_args = copy.deepcopy(train_args)
    if args.training in ("plain", "none"):
        train_args.marglik_frequency = 0
    elif train_args.schedule_sparsity is None:
        train_args.schedule_sparsity = schedule
        if schedule:  # the automatic schedule is for LoRA ranks only (it beats pruning after training, README "LoRA")
            logger.warning(f"pruning during training: ranks of the adapter are masked on a ramp to {config.sparsity:.0%} "
                           "removed, so dense/ holds the masked model (--schedule_sparsity 0 turns it off)")
    trainer = SpamTrainer(model=model, args=train_args, train_dataset=data["train"], eval_dataset=data["validation"],
                          data_collator=collator, processing_class=tokenizer, compute_metrics=metrics_for(metric))
    if args.training == "spam":
        trainer.train(resume_from_checkpoint=resume)
    elif args.training == "plain":
        plain = Trainer(model=model, args=TrainingArguments(**plain_args(train_args)), train_dataset=data["train"],
                        data_collator=collator, processing_class=tokenizer)
        per_batch_mean_loss(plain).train()
    if "diagonal" in resolved.score.needs and (args.training != "spam" or not trainer.has_curvature()):
        trainer.fit_priors_posthoc(max_batches=args.posthoc_batches)
    # latency is measured later, dense and pruned interleaved (prune_and_export)
    dense = snapshot(trainer, data["validation"], metric, config.flops_seq_len, args.latency_batch_size, False)
    trainer.save_model(os.path.join(out_dir, "dense"))
    if trainer.sharded:
        config, args, trainer = sharded_pruning(trainer, config, resolved, args, os.path.join(out_dir, "dense"), data)
    if is_main_process():
        write_run_config(out_dir, model_args, data_args, config, args, train_args, path, command, lora_args)
    ctx = RunContext(data=data, tokenizer=tokenizer, data_args=data_args, train_args=train_args, dense=dense,
                     base_name=display_name(model_args, path), command=command, merged=lora_args.lora_merge,
                     base_sparsity=base_sparsity(lora_args, config.sparsity), masked_dense=masked_dense,
                     posthoc_batches=args.posthoc_batches, push_to_hub_repo=args.push_to_hub_repo)
    return prune_and_export(trainer, ctx, config, args, out_dir)
