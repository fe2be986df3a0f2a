"""The jobs' defaults that depend on more than one option: the recovery learning rate and the training schedule.

They are decisions, measured on the CPU protocol (docs/results.md, "Recovery learning rate" and "Damage after
compensation"), so they live with the jobs rather than with the argument declarations.
"""

from __future__ import annotations

from typing import Optional

from ..arguments import CompressJobArguments, RecoveryArguments, SpamArguments

HIGH_SPARSITY = 0.8
"""From this ``--sparsity`` on the recovery runs at the larger of :data:`RECOVERY_LR_SCALES` times the training rate."""

RECOVERY_LR_SCALES = (0.5, 2.0)
"""The recovery learning rate of :func:`resolve_recovery_lr` as multiples of the training one: below and from
``HIGH_SPARSITY`` removed."""


def resolve_recovery_lr(args: RecoveryArguments, sparsity: float, train_lr: float) -> float:
    """``--recovery-lr`` with its default filled in: ``train_lr`` (the run's training learning rate) times
    ``RECOVERY_LR_SCALES[0]`` below ``sparsity`` ``HIGH_SPARSITY``, ``RECOVERY_LR_SCALES[1]`` from it.

    A model with most of its groups removed is far from where training left it, and 200 steps at half the
    training rate barely move it; one with half its groups removed is close, and a larger rate undoes the
    fine-tune (CPU protocol, training lr 1e-4, 200 steps, 3 seeds: at 90% 79.9 ± 1.4 at 5e-5 against 81.5 ± 0.4 at
    2e-4; at 50% 86.2 against 85.4; at 70% a tie)."""
    if args.recovery_lr is not None:
        return args.recovery_lr
    low, high = RECOVERY_LR_SCALES
    return train_lr * (high if sparsity >= HIGH_SPARSITY else low)


def resolve_schedule(args: CompressJobArguments, sparsity: float, train_args: SpamArguments,
                     lora: bool) -> Optional[float]:
    """The ``schedule_sparsity`` that ``spam-hf compress`` trains with: the one given (``0`` = off); else
    ``sparsity`` (``--sparsity``) for LoRA ranks (the rank budget during training); else none: a full model is pruned after
    training (CPU protocol, 3 seeds: with ``damage-obs`` rounds at 80 / 90% removed ahead of pruning during
    training on every seed). Only SpaM training (``--training spam``) has a schedule."""
    if args.training != "spam":
        return None
    if train_args.schedule_sparsity is not None:
        return train_args.schedule_sparsity
    return sparsity if lora else None
