"""``PruningConfig``: every choice of one pruning job in one object, and the defaults the score registry gives.

    config = PruningConfig(sparsity=0.7)            # method "auto", rounds and compensation from the score
    config.resolved(lora=False)                     # damage-obs, 4 rounds, least-squares compensation

``spam_hf.pruning.prune``, ``plan``, ``prune_in_rounds``, ``SpamTrainer.prune`` and the CLI's jobs all take it, so a
default is decided in one place: :meth:`PruningConfig.resolved`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from ..checks import check_choice, validate_sparsity
from .compensation import COMPENSATIONS
from .scores import Score, get_score, resolve_method, score_names
from .selection import BUDGETS

MAX_ROUND_SHARE = 0.3
"""By default no round removes more than this share of what is left (:func:`rounds_for_sparsity`)."""


def rounds_for_sparsity(sparsity: float, max_share: float = MAX_ROUND_SHARE) -> int:
    """The fewest geometric rounds in which none removes more than ``max_share`` of what is left:
    ``⌈log(1 − s) / log(1 − max_share)⌉`` (2 at 50%, 4 at 70%, 7 at 90% for the default 0.3)."""
    validate_sparsity(sparsity)
    if not 0.0 < max_share < 1.0:
        raise ValueError(f"max_share must be in (0, 1), got {max_share}")
    return max(1, math.ceil(math.log1p(-sparsity) / math.log1p(-max_share) - 1e-9))


@dataclass(frozen=True)
class PruningConfig:
    """How to prune.

    Attributes:
        sparsity: fraction in (0, 1) of the prunable ``budget`` to remove.
        budget: ``params`` or ``flops`` (FLOPs per sequence of ``seq_len`` tokens).
        method: a registered score (:func:`spam_hf.pruning.scores.score_names`) or ``auto``
            (:func:`~spam_hf.pruning.scores.resolve_method`: ``damage-obs`` for heads and neurons, ``opd`` for
            LoRA ranks).
        seq_len: sequence length of FLOP budgets and reports.
        min_keep: every layer keeps at least this fraction of its original heads and of its neurons.
        rounds: geometric rounds (0 = the score's default: :func:`rounds_for_sparsity` for scores that want
            rounds on a full model, else 1).
        compensate: refit the consuming layers after each round's removal (``None`` = the score's default: with
            rounds, or the score's own compensation, ``bias`` for ``flap``, which then replaces ``compensation``).
        compensation: ``least-squares``, ``posterior``, ``bias`` or ``reference``
            (:func:`spam_hf.pruning.compensation.compensate`, :func:`~spam_hf.pruning.compensation.compensate_bias`,
            :func:`spam_hf.pruning.refit_to_reference`).
        calibration_batches: batches per round for calibration statistics.
        seed: seed of the ``random`` baseline.
        kv_groups_only: grouped-query attention in whole KV groups (``None``: the statistics' own, else ``False``).
        sequential: prune one block at a time, holding one block's statistics
            (:mod:`spam_hf.pruning.sequential`), for models whose statistics do not fit at once; replaces rounds.
    """

    sparsity: float = 0.5
    budget: str = "params"
    method: str = "auto"
    seq_len: int = 128
    min_keep: float = 0.0
    rounds: int = 0
    compensate: Optional[bool] = None
    compensation: str = "least-squares"
    calibration_batches: int = 32
    seed: int = 0
    kv_groups_only: Optional[bool] = None
    sequential: bool = False

    def __post_init__(self) -> None:
        validate_sparsity(self.sparsity)
        check_choice("budget", self.budget, BUDGETS)
        check_choice("method", self.method, ("auto",) + score_names())
        check_choice("compensation", self.compensation, COMPENSATIONS)
        if not 0.0 <= self.min_keep < 1.0:
            raise ValueError(f"min_keep must be in [0, 1), got {self.min_keep}")
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0 (0 = the score's default), got {self.rounds}")
        if self.calibration_batches < 1:
            raise ValueError(f"calibration_batches must be >= 1, got {self.calibration_batches}")
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")

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
    def score(self) -> Score:
        """The registered score (``auto`` must be resolved first)."""
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
