"""The end of every job that prunes: plan + apply, optional recovery fine-tune, export, report, push."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from dataclasses import dataclass
from typing import Optional

from transformers import AutoConfig, Trainer, TrainingArguments
from transformers.utils import logging

from ..architectures import get_family, group_specs, is_peft_model
from ..arguments import DataArguments, FinishArguments
from ..costs import compare_latency
from ..distill import DistillationTrainer, freeze, frozen_copy
from ..distributed import broadcast_object, is_main_process
from ..export import gather_for_main, save_pruned
from ..export.folders import staged_folder
from ..export.hub import push_folder
from ..memory import PROCESS_BYTES, available_bytes, gib, predict
from ..posterior import unwrap
from ..pruning import PruningConfig, check_reachable
from ..pruning.selection import check_uniform
from ..pruning.sequential import check_sequential, sequential_refusal
from ..sharding import is_sharded_model
from ..trainer import SpamTrainer, per_batch_mean_loss
from .loading import collator_for, load_run_model, metrics_for
from .outputs import write_json
from .policy import resolve_recovery_lr
from .reporting import device_name, evaluate_metric, report_path, snapshot, write_report

logger = logging.get_logger(__name__)


@dataclass
class RunContext:
    """What a job knows when it reaches the pruning stage."""

    data: object  # the tokenised DatasetDict (train / validation)
    tokenizer: object
    data_args: DataArguments
    train_args: TrainingArguments
    dense: dict  # the snapshot of the model before pruning
    base_name: str  # the model name a model card shows
    command: str = ""
    merged: bool = False  # LoRA: also export the base with the adapter merged in
    base_sparsity: Optional[float] = None  # LoRA: also prune the frozen base (prune_base)
    masked_dense: bool = False  # pruned during training: the model before pruning is already masked
    posthoc_batches: Optional[int] = None  # LoRA base pruning: batches of its post-hoc curvature (default: an epoch)
    push_to_hub_repo: Optional[str] = None  # compress --push-to-hub REPO

    @property
    def metric(self) -> str:
        return self.data_args.metric


def plain_args(train_args: TrainingArguments) -> dict:
    """The plain ``TrainingArguments`` fields of ``train_args`` (SpaM fields dropped)."""
    return {f.name: getattr(train_args, f.name) for f in dataclasses.fields(TrainingArguments)
            if f.init and not f.name.startswith("_")}


def recover(model, ctx: RunContext, args: FinishArguments, out_dir: str, teacher=None) -> float:
    """Fine-tune the pruned ``model`` with a plain Trainer (``recovery_steps`` or ``recovery_epochs``), or, with a
    ``teacher`` (the unpruned model), by distillation (:class:`~spam_hf.distill.DistillationTrainer`); returns the metric.
    ``args`` come as :func:`prune_and_export` resolved them (``recovery_lr`` filled in)."""
    rec_args = plain_args(ctx.train_args)
    rec_args.update(output_dir=os.path.join(out_dir, "recovery"), learning_rate=args.recovery_lr,
                    num_train_epochs=args.recovery_epochs or 1, max_steps=args.recovery_steps or -1,
                    save_strategy="no", eval_strategy="no", load_best_model_at_end=False)
    common = dict(model=model, args=TrainingArguments(**rec_args), train_dataset=ctx.data["train"],
                  eval_dataset=ctx.data["validation"], data_collator=collator_for(ctx.data, ctx.tokenizer),
                  processing_class=ctx.tokenizer, compute_metrics=metrics_for(ctx.metric))
    if teacher is not None:
        rec = DistillationTrainer(teacher=teacher, alpha=args.distill, temperature=args.distill_temperature,
                                  hidden_weight=args.distill_hidden_weight, **common)
    else:
        rec = Trainer(**common)
    length = f"{args.recovery_steps} steps" if args.recovery_steps else f"{args.recovery_epochs:g} epoch(s)"
    logger.info(f"recovery: {length} at learning rate {args.recovery_lr:g}"
                + (f", distilled from the unpruned model (weight {args.distill:g})" if teacher is not None else ""))
    per_batch_mean_loss(rec).train()
    with contextlib.suppress(OSError):  # the Trainer's output folder, left empty: nothing of the run's own
        os.rmdir(rec_args["output_dir"])
    return evaluate_metric(rec, ctx.data["validation"], ctx.metric)


def check_teacher(args: FinishArguments, masked_dense: bool, config=None) -> None:
    """Refuse a distillation that cannot work, before any work: from a masked model (after pruning during training
    the run's own model before pruning has the removed groups already zeroed, so its soft labels are the student's
    own), or from a ``--distill-teacher`` that is not a folder or, by its ``config.json``, another architecture or
    label count than ``config`` (the student's)."""
    if not (args.distill or args.distill_hidden_weight):
        return
    if masked_dense and not args.distill_teacher:
        raise ValueError("this run pruned during training (--schedule_sparsity), so its model before pruning is the "
                         "masked one and cannot teach: give --distill-teacher with an unmasked model (e.g. the dense/ "
                         "of a run with --schedule_sparsity 0), recover without --distill, or (compress) prune after "
                         "training with --schedule_sparsity 0")
    path = args.distill_teacher
    if not path:
        return
    if not os.path.isdir(path):
        raise ValueError(f"--distill-teacher {path!r} is not a folder (a saved model: another run's dense/ or a "
                         "checkpoint)")
    if config is not None and os.path.exists(os.path.join(path, "config.json")):  # an adapter folder: at load
        check_same_task(path, AutoConfig.from_pretrained(path), config)


def check_same_task(path: str, teacher_config, student_config) -> None:
    """The teacher must be the student's architecture with its labels (its logits are the soft labels)."""
    n_teacher, n_student = getattr(teacher_config, "num_labels", None), getattr(student_config, "num_labels", None)
    if teacher_config.model_type != student_config.model_type or n_teacher != n_student:
        raise ValueError(f"--distill-teacher {path!r} is a {teacher_config.model_type} model with {n_teacher} labels; "
                         f"the pruned model is a {student_config.model_type} model with {n_student}")


def teacher_for(model, ctx: RunContext, args: FinishArguments):
    """The distillation teacher (frozen), or ``None`` without distillation: ``--distill-teacher`` loaded from its
    folder, else a copy of ``model`` before pruning."""
    if not (args.distill or args.distill_hidden_weight):
        return None
    check_teacher(args, ctx.masked_dense)
    if not args.distill_teacher:
        return frozen_copy(model)
    teacher = load_run_model(args.distill_teacher, ctx.data)
    check_same_task(args.distill_teacher, teacher.config, model.config)
    return freeze(teacher)


def precheck(model, config: PruningConfig, args: FinishArguments, kv_groups_only: bool,
             masked_dense: bool) -> PruningConfig:
    """Everything a pruning job can refuse before any work (compress before training, prune before loading the
    posterior): the target must be reachable with the model's groups, the pruning choices must work for this
    model (LoRA ranks, block by block) and a distillation teacher must fit. Returns ``config`` resolved
    (:meth:`PruningConfig.resolved`: ``auto`` and the rounds / compensation defaults from the score registry; on
    LoRA ranks rounds, compensation and ``damage-exact`` work as on heads and neurons)."""
    config = config.resolved(is_peft_model(model))
    specs = group_specs(model, kv_groups_only)
    uniform_kinds = get_family(model).uniform_kinds if config.uniform else None
    if uniform_kinds is not None:
        check_uniform(specs, uniform_kinds)
    check_reachable(model, specs, config.sparsity, config.budget, config.flops_seq_len, config.min_keep, uniform_kinds)
    if config.sequential:
        check_sequential(model, config)
    if config.drop_blocks is not None:
        if is_peft_model(model):
            raise ValueError("--drop_blocks removes whole blocks of a full model; on a LoRA run the groups are its "
                             "ranks (prune the base with --prune-base instead)")
        if args.distill_hidden_weight:
            raise ValueError("--drop_blocks leaves fewer hidden states than the teacher has, so "
                             "--distill_hidden_weight cannot pair them; use --distill alone")
    check_teacher(args, masked_dense, model.config)
    return config


def choose_sequential(model, config: PruningConfig, batch_size: int, seq_len: int, device=None) -> PruningConfig:
    """``--sequential`` left to the default: block by block when the statistics of all blocks at once
    (:func:`spam_hf.memory.predict`: factors, one calibration batch, scoring) would exceed 80% of the memory
    available on ``device`` (default: the model's), and the score and model allow it; all at once otherwise (the
    measured default where memory was never the problem)."""
    if config.sequential is not None:
        return config
    if sequential_refusal(model, config) is not None:
        return config.replace(sequential=False)
    stage = predict(model, training="none", consuming_only=config.score.collects_consuming_only,
                    batch_size=batch_size, seq_len=seq_len, calibration_batches=config.calibration_batches,
                    measure_latency=False)[0]
    need = stage.bytes - stage.parts["weights"] - PROCESS_BYTES  # the weights are already resident
    free = available_bytes(device if device is not None else next(model.parameters()).device)
    if not broadcast_object(need > 0.8 * free):  # data parallel: the main process decides for all
        return config.replace(sequential=False)
    logger.warning(f"statistics of all blocks at once would need {gib(need)} of {gib(free)} available: pruning "
                   "block by block (--sequential True; --sequential False forces all at once)")
    return config.replace(sequential=True, rounds=1)


def prune_and_export(trainer: SpamTrainer, ctx: RunContext, config: PruningConfig, args: FinishArguments,
                     out_dir: str) -> dict:
    """Prune ``trainer.model`` (and a LoRA base) as ``config`` says, recover, export to ``out_dir/model``, write
    the report.

    Returns the report dict (also ``out_dir/pruning_report.json``).
    """
    config = config.resolved(is_peft_model(trainer.model))
    args = dataclasses.replace(args, recovery_lr=resolve_recovery_lr(args, config.sparsity,
                                                                      ctx.train_args.learning_rate))
    if config.sequential is None:
        config = choose_sequential(unwrap(trainer.model), config, ctx.train_args.per_device_train_batch_size,
                                   ctx.data_args.max_seq_length)
    teacher = teacher_for(trainer.model, ctx, args)
    own_teacher = teacher is not None and not args.distill_teacher  # a copy of this model: timed as the dense one
    dense_model = teacher if own_teacher else (frozen_copy(trainer.model) if args.measure_latency else None)
    logger.info(f"pruning {config.sparsity:.0%} of the prunable {config.budget}: {config.method}"
                + (" block by block" if config.sequential else f" in {config.rounds} round(s)")
                + (f" with {config.compensation} compensation" if config.compensate else "")
                + (f", statistics from {config.calibration_batches} training batches per round"
                   if config.in_rounds or config.sequential else ""))
    selection = trainer.prune(config=config)
    base_selection = None
    if ctx.base_sparsity:
        base_selection = trainer.prune_base(ctx.base_sparsity, budget=config.budget, seq_len=config.flops_seq_len,
                                            min_keep=config.min_keep, max_batches=ctx.posthoc_batches)
    model = trainer.model
    pruned = snapshot(trainer, ctx.data["validation"], ctx.metric, config.flops_seq_len, args.latency_batch_size, False)
    logger.info(f"after pruning: {ctx.metric} {pruned[ctx.metric]:.4g} (before: {ctx.dense.get(ctx.metric, float('nan')):.4g})")
    latency = None
    if args.measure_latency:
        latency = compare_latency(dense_model, model, batch_size=args.latency_batch_size, seq_len=config.flops_seq_len)
        ctx.dense["latency_s"], pruned["latency_s"] = latency["dense_s"], latency["pruned_s"]
        if dense_model is not teacher:
            del dense_model
    if args.recovery_steps or args.recovery_epochs:
        pruned[f"{ctx.metric}_before_recovery"] = pruned[ctx.metric]
        pruned[ctx.metric] = recover(model, ctx, args, out_dir, teacher=teacher)
    export_dir = os.path.join(out_dir, "model")
    merged_dir = os.path.join(out_dir, "model-merged") if ctx.merged and is_peft_model(model) else None
    if not is_main_process():  # data parallel: every process pruned the same groups; one writes
        if is_sharded_model(model):  # FSDP2: every process takes part in gathering what the main process writes
            gather_for_main(model)
        return build_report(ctx, config, args, pruned, selection, base_selection, export_dir, "", merged_dir)
    logger.info(f"exporting to {export_dir}")
    # this job's own folders (compress, or prune into a new/empty folder), each written aside and renamed into place
    with staged_folder(export_dir) as stage, staged_folder(merged_dir) as merged_stage:
        kind = save_pruned(model, stage, tokenizer=ctx.tokenizer, merged_dir=merged_stage)
        report = build_report(ctx, config, args, pruned, selection, base_selection, export_dir, kind, merged_dir)
        if latency is not None:
            report["latency"] = latency
        write_report(report, selection, model, config, args, export_dir, kind, ctx.data_args, ctx.train_args,
                     card_dir=stage, repo=ctx.push_to_hub_repo)
    write_json(report_path(export_dir), report)
    repo = ctx.push_to_hub_repo
    if repo:
        report["hub_commit"] = push_folder(export_dir, repo)
        print(f"pushed to {repo}: {report['hub_commit']}")
        write_json(report_path(export_dir), report)
    return report


def build_report(ctx: RunContext, config: PruningConfig, args: FinishArguments, pruned: dict, selection,
                 base_selection, export_dir: str, kind: str, merged_dir: Optional[str]) -> dict:
    """``pruning_report.json``'s content: what was run, the dense and pruned snapshots, the selection."""
    return {
        "date": datetime.date.today().isoformat(),
        "command": ctx.command,
        "base_model": ctx.base_name,
        "device": device_name(),
        "metric": ctx.metric,
        "dense": ctx.dense,
        "pruned": pruned,
        "selection": selection.to_dict(),
        **({"base_selection": base_selection.to_dict()} if base_selection is not None else {}),
        "method": config.method, "rounds": config.rounds, "compensate": config.compensate, "min_keep": config.min_keep,
        "sequential": config.sequential,
        **({"compensation": config.compensation} if config.compensate else {}),
        **({"recovery": {"steps": args.recovery_steps, "epochs": args.recovery_epochs, "lr": args.recovery_lr,
                         "distill": args.distill, "distill_temperature": args.distill_temperature,
                         "distill_hidden_weight": args.distill_hidden_weight,
                         "distill_teacher": args.distill_teacher}}
           if args.recovery_steps or args.recovery_epochs else {}),
        "export": {"path": export_dir, "format": kind, **({"merged": merged_dir} if merged_dir else {})},
    }
