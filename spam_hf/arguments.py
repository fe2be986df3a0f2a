"""Configuration, declared once: used by the Python API, the ``spam-hf`` CLI and the YAML recipes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from transformers import TrainingArguments

from .curvature import CURVATURE_KINDS, FISHER_TYPES, REDUCTIONS
from .priors import PRIOR_KINDS
from .scoring import SCORE_METHODS

BUDGETS = ("params", "flops")


def _check(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


@dataclass
class SpamTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the SpaM knobs. The prior replaces weight decay on covered parameters."""

    prior: str = field(default="unit", metadata={"help": f"Prior structure: one of {', '.join(PRIOR_KINDS)}. "
                                                         "'unit' = one precision per head / neuron / LoRA rank."})
    prior_init: float = field(default=1.0, metadata={"help": "Initial prior precision δ₀ of every group."})
    curvature: str = field(default="kfac", metadata={"help": "Curvature approximation: 'kfac' (Kronecker factors) "
                                                             "or 'diag' (scalable diagonal)."})
    fisher_type: str = field(default="mc", metadata={"help": "'mc': Monte-Carlo Fisher (labels sampled from the "
                                                             "model, a GGN estimate); 'empirical': empirical Fisher."})
    kfac_reduction: str = field(default="auto", metadata={"help": "'reduce' (sequence-level losses), 'expand' "
                                                                  "(token-level losses) or 'auto' (by task)."})
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

    def __post_init__(self) -> None:
        super().__post_init__()
        _check("prior", self.prior, PRIOR_KINDS)
        _check("curvature", self.curvature, CURVATURE_KINDS)
        _check("fisher_type", self.fisher_type, FISHER_TYPES)
        _check("kfac_reduction", self.kfac_reduction, ("auto",) + REDUCTIONS)
        if not self.prior_init > 0:
            raise ValueError(f"prior_init must be > 0, got {self.prior_init}")
        if self.curvature_every < 1:
            raise ValueError(f"curvature_every must be >= 1, got {self.curvature_every}")
        if self.marglik_frequency < 0 or self.marglik_burn_in < 0 or self.n_hypersteps < 1:
            raise ValueError("marglik_frequency and marglik_burn_in must be >= 0 and n_hypersteps >= 1")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


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
    budget: str = field(default="params", metadata={"help": "'params' or 'flops' (at --flops-seq-len)."})
    flops_seq_len: int = field(default=128, metadata={"help": "Sequence length for FLOP budgets and reports."})
    min_keep: float = field(default=0.0, metadata={"help": "Keep at least this fraction of the heads and of the "
                                                            "neurons of every layer (0 = a layer may lose all)."})
    method: str = field(default="opd", metadata={"help": f"Group scores: {', '.join(SCORE_METHODS)}."})
    recovery_epochs: float = field(default=0.0, metadata={"help": "Fine-tune epochs after pruning (0 = none)."})
    recovery_steps: int = field(default=0, metadata={"help": "Fine-tune steps after pruning (overrides epochs)."})
    recovery_lr: float = field(default=5e-5, metadata={"help": "Learning rate of the recovery fine-tune."})
    measure_latency: bool = field(default=True, metadata={"help": "Measure forward latency before and after."})
    latency_batch_size: int = field(default=32, metadata={"help": "Batch size for the latency measurement."})
    prune_seed: int = field(default=0, metadata={"help": "Seed for the 'random' baseline."})

    def __post_init__(self) -> None:
        validate_sparsity(self.sparsity)
        _check("budget", self.budget, BUDGETS)
        _check("method", self.method, SCORE_METHODS)
        if not 0.0 <= self.min_keep < 1.0:
            raise ValueError(f"min_keep must be in [0, 1), got {self.min_keep}")
        if self.flops_seq_len < 1:
            raise ValueError(f"flops_seq_len must be >= 1, got {self.flops_seq_len}")


def validate_sparsity(sparsity: float) -> None:
    if not (0.0 < float(sparsity) < 1.0):
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
