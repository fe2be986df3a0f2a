"""``PruningConfig``: every choice of one pruning job in one object, and the defaults the score registry gives.

    config = PruningConfig(sparsity=0.7)            # method "auto", rounds and compensation from the score
    config.resolved(lora=False)                     # damage-obs, 4 rounds, least-squares compensation

``spam_hf.pruning.prune``, ``plan``, ``prune_in_rounds``, ``SpamTrainer.prune`` and the CLI's jobs all take it, so a
default is decided in one place: :meth:`PruningConfig.resolved`. It is also the CLI's pruning section: ``compress``
and ``prune`` parse their pruning options into it with ``HfArgumentParser`` (each field's help is its ``--help``
line), so this module imports neither torch nor the scores until a config is resolved.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from ..arguments import choice
from ..checks import check_choice, check_round_to, validate_sparsity
from ..choices import BUDGETS, COMPENSATIONS, score_names

if TYPE_CHECKING:
    from .scores import Score

MAX_ROUND_SHARE = 0.3
"""By default no round removes more than this share of what is left (:func:`rounds_for_sparsity`)."""


def rounds_for_sparsity(sparsity: float, max_share: float = MAX_ROUND_SHARE) -> int:
    """The fewest geometric rounds in which none removes more than ``max_share`` of what is left:
    ``⌈log(1 − s) / log(1 − max_share)⌉`` (2 at 50%, 4 at 70%, 7 at 90% for the default 0.3)."""
    validate_sparsity(sparsity)
    if not 0.0 < max_share < 1.0:
        raise ValueError(f"max_share must be in (0, 1), got {max_share}")
    return max(1, math.ceil(math.log1p(-sparsity) / math.log1p(-max_share) - 1e-9))


def known_methods() -> tuple:
    """``auto`` and every score: the shipped ones (:func:`spam_hf.choices.score_names`, without importing them) and,
    once the registry is loaded, any registered at run time (:func:`spam_hf.pruning.scores.register`)."""
    names = set(score_names())
    registry = sys.modules.get(f"{__package__}.scores")
    if registry is not None:
        names |= set(registry.score_names())
    return ("auto",) + tuple(sorted(names))


@dataclass(frozen=True)
class PruningConfig:
    """How to prune: what to remove and how to choose it (the target, the budget, the score, rounds and
    compensation). Each field's help below is also its ``--help`` line and its entry in the CLI reference
    (``--flops-seq-len``, ``--prune-seed``, ...).

    For Python callers: ``method="auto"``, ``rounds=0`` and ``compensate=None`` are filled in by
    :meth:`resolved` from the score registry (:func:`~spam_hf.pruning.scores.resolve_method`; ``compensation`` is
    :func:`spam_hf.pruning.compensation.compensate`'s kind, :func:`~spam_hf.pruning.compensation.compensate_bias`
    or :func:`spam_hf.pruning.refit_to_reference`). ``sequential=None`` leaves the choice to the caller: the CLI's
    jobs decide it from the predicted memory; :func:`spam_hf.pruning.prune` prunes all blocks at once. The group
    granularity of grouped-query attention is not a field: it is the statistics' (``kv_groups_only`` of
    :func:`~spam_hf.pruning.prune` and :func:`~spam_hf.pruning.plan`).
    """

    sparsity: float = field(default=0.5, metadata={"help": "Fraction in (0, 1) of the prunable block parameters "
                                                           "(or FLOPs with --budget flops) to remove."})
    budget: str = choice("params", BUDGETS, "What --sparsity counts: parameters, or FLOPs at --flops-seq-len.")
    method: str = choice("auto", ("auto",) + score_names(),
                         "How groups are scored. auto: damage-obs (the loss increase a head or neuron's removal "
                         "leaves after compensation) for a full model, opd for LoRA ranks. The others: damage "
                         "scores before compensation (damage, damage-exact, damage-out), opd (weights² times the "
                         "posterior precision), and the baselines fisher, magnitude, random, wanda-sp and flap.")
    flops_seq_len: int = field(default=128, metadata={"help": "Sequence length of FLOP budgets, reports and latency."})
    min_keep: float = field(default=0.0, metadata={
        "help": "Keep at least this fraction of the heads and of the neurons of every layer (0 = a layer may lose "
                "all of them)."})
    rounds: int = field(default=0, metadata={"help": "Reach the target in this many rounds, with fresh statistics "
                                                     "each round. 0 = auto: with a damage score on a full model, "
                                                     "enough rounds that none removes more than 30%% of what is "
                                                     "left; else 1."})
    compensate: Optional[bool] = field(default=None, metadata={
        "help": "Refit the remaining weights of O / down so that each layer still computes what it did. Default: on "
                "with a damage score on a full model, and with flap (bias compensation)."})
    compensation: str = choice("least-squares", COMPENSATIONS,
                               "How to compensate: least-squares (refit every output on the layer's inputs), "
                               "posterior (the Laplace posterior's conditional mean), bias (the removed inputs' "
                               "mean into the bias, as FLAP does) or reference (refit to the unpruned model's "
                               "outputs, layer by layer).")
    calibration_batches: int = field(default=32, metadata={
        "help": "Training batches per round for the statistics of damage scores, rounds and compensation."})
    prune_seed: int = field(default=0, metadata={"help": "Seed of the random baseline."})
    sequential: Optional[bool] = field(default=None, metadata={
        "help": "Prune one block at a time, holding one block's statistics (for models whose statistics do not fit "
                "at once); the budget stays global. Default: only when they would not fit in memory."})
    uniform: bool = field(default=False, metadata={
        "help": "Remove the same number of groups from every layer, chosen by the same scores under the same budget, "
                "so the export is a stock checkpoint that loads without custom code (vLLM, ONNX, TGI). Decoders "
                "with a head_dim (LLaMA, Mistral, Qwen) shrink heads, in whole KV groups, and neurons; encoders "
                "and GPT-2 only neurons, since their stock classes tie the head size to hidden / heads."})
    round_to: int = field(default=1, metadata={
        "help": "Keep a multiple of N neurons in every layer (8, 16, 64: widths that matrix kernels run at full "
                "speed); each layer rounds down or up, whichever does less damage, with the budget kept. Heads are "
                "not rounded (each is head_dim wide). 1: off."})

    drop_blocks: Optional[float] = field(default=None, metadata={
        "help": "After the cut, also remove whole blocks that keep at most 10%% of a block, the least harmful "
                "first, while the calibration loss with them skipped stays within this fraction of the loss with "
                "every block (e.g. 0.05); the export has fewer layers. Default: keep every block."})

    def __post_init__(self) -> None:
        validate_sparsity(self.sparsity)
        check_choice("budget", self.budget, BUDGETS)
        check_choice("method", self.method, known_methods())
        check_choice("compensation", self.compensation, COMPENSATIONS)
        if not 0.0 <= self.min_keep < 1.0:
            raise ValueError(f"min_keep must be in [0, 1), got {self.min_keep}")
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0 (0 = the score's default), got {self.rounds}")
        if self.calibration_batches < 1:
            raise ValueError(f"calibration_batches must be >= 1, got {self.calibration_batches}")
        if self.flops_seq_len < 1:
            raise ValueError(f"flops_seq_len must be >= 1, got {self.flops_seq_len}")
        check_round_to(self.round_to)
        if self.drop_blocks is not None and not (0.0 <= self.drop_blocks < float("inf")):
            raise ValueError(f"drop_blocks must be a tolerance >= 0 (a fraction of the calibration loss), "
                             f"got {self.drop_blocks}")

    @classmethod
    def build(cls, sparsity: Optional[float] = None, config: Optional["PruningConfig"] = None,
              **options) -> "PruningConfig":
        """``config`` (default: the defaults) with ``sparsity`` and any field in ``options`` replaced; the form the
        keyword APIs (``plan(model, stats, 0.5, method="opd")``) use. Unknown options are a ``TypeError``."""
        unknown = set(options) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown pruning option(s) {sorted(unknown)}; PruningConfig has "
                            f"{[f.name for f in dataclasses.fields(cls)]}")
        if sparsity is not None:
            options["sparsity"] = sparsity
        return dataclasses.replace(config, **options) if config is not None else cls(**options)

    def replace(self, **changes) -> "PruningConfig":
        return dataclasses.replace(self, **changes)

    def resolved(self, lora: bool) -> "PruningConfig":
        """The config with ``method``, ``rounds`` and ``compensate`` filled in from the score registry: a score
        that wants rounds (the damage scores) prunes a full model in :func:`rounds_for_sparsity` rounds with
        compensation (measured on the CPU protocol, docs/results.md); every other score, and every score on LoRA
        ranks, in one shot without compensation, unless chosen otherwise."""
        from .scores import get_score, resolve_method

        if self.uniform and lora:
            raise ValueError("--uniform is for heads and neurons: a pruned LoRA adapter is a stock peft adapter "
                             "already (its ranks per module in rank_pattern)")
        method = resolve_method(self.method, lora)
        rounds_by_default = get_score(method).rounds and not lora
        rounds = self.rounds or (rounds_for_sparsity(self.sparsity) if rounds_by_default and not self.sequential
                                 else 1)
        compensate = self.compensate if self.compensate is not None else rounds_by_default
        compensation = self.compensation
        if self.compensate is None and get_score(method).compensation and not lora:
            compensate, compensation = True, get_score(method).compensation  # flap: bias compensation, as FLAP prunes
        return dataclasses.replace(self, method=method, rounds=rounds, compensate=compensate, compensation=compensation)

    @property
    def score(self) -> "Score":
        """The registered score (``auto`` must be resolved first)."""
        from .scores import get_score

        if self.method == "auto":
            raise ValueError("method 'auto' is resolved by PruningConfig.resolved(lora) before it names a score")
        return get_score(self.method)

    @property
    def in_rounds(self) -> bool:
        """Whether pruning goes through calibration rounds: several rounds, compensation, or a score that reads
        calibration statistics of the current model (a resolved config)."""
        return self.rounds > 1 or bool(self.compensate) or self.score.calibrated

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
