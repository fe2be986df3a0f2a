"""Input checks shared by the library, the arguments and the CLI, with one wording each."""

from __future__ import annotations

from typing import Iterable


def check_choice(name: str, value, allowed: Iterable) -> None:
    """``ValueError("<name> must be one of a, b, c; got 'x'")`` unless ``value`` is in ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def validate_sparsity(sparsity: float) -> None:
    """``ValueError`` unless ``0 < sparsity < 1``."""
    if not (0.0 < float(sparsity) < 1.0):
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")


def check_round_to(round_to: int) -> None:
    """``ValueError`` unless ``round_to`` is a whole number ``>= 1`` (neurons kept per layer: a multiple of it)."""
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a whole number >= 1 (1: no rounding), got {round_to!r}")


def check_distillation(alpha: float, temperature: float, hidden_weight: float) -> None:
    """One-line errors for values outside ``α ∈ [0, 1]``, ``τ > 0``, ``β ≥ 0`` (distillation recovery)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distill (the weight of the teacher's soft labels) must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"distill_temperature must be > 0, got {temperature}")
    if hidden_weight < 0:
        raise ValueError(f"distill_hidden_weight must be >= 0, got {hidden_weight}")
