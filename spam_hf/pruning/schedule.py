"""Pruning during training: a cubic sparsity ramp whose groups are masked (zeroed) as training goes.

The target after optimiser step ``t`` (Zhu & Gupta 2017) is

    s(t) = 0                                     for t < t₀
    s(t) = s_f · (1 − (1 − (t − t₀)/(t₁ − t₀))³)  for t₀ ≤ t < t₁
    s(t) = s_f                                   for t ≥ t₁

Every ``every`` steps in ``[t₀, t₁]`` the groups are re-scored on the current model and those beyond the
target are masked; masked groups stay zero (re-zeroed after each optimiser step) while the rest of the
model, and the priors, adapt to what is gone. The surgery is the usual ``prune`` at the end: masked
groups score zero under every score, so they are the ones removed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from ..checks import validate_sparsity

SCHEDULE_FILE = "spam_schedule.json"


@dataclass
class SparsitySchedule:
    final: float  # s_f, fraction of the prunable cost removed at the end step
    start_step: int  # t₀
    end_step: int  # t₁
    every: int = 10  # steps between mask updates

    def __post_init__(self) -> None:
        validate_sparsity(self.final)
        if not 0 <= self.start_step < self.end_step:
            raise ValueError(f"schedule needs 0 <= start step < end step, got {self.start_step}, {self.end_step}")
        if self.every < 1:
            raise ValueError(f"schedule_every must be >= 1, got {self.every}")

    @classmethod
    def from_fractions(cls, final: float, start: float, end: float, total_steps: int, every: int) -> "SparsitySchedule":
        """Start and end as fractions of ``total_steps`` (the Trainer's ``max_steps``)."""
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"schedule_start and schedule_end must satisfy 0 <= start < end <= 1, got {start}, {end}")
        t0 = int(math.floor(start * total_steps))
        t1 = max(t0 + 1, int(math.floor(end * total_steps)))
        return cls(final, t0, t1, every)

    def target(self, step: int) -> float:
        """``s(step)`` of the module docstring."""
        if step < self.start_step:
            return 0.0
        if step >= self.end_step:
            return self.final
        frac = (step - self.start_step) / (self.end_step - self.start_step)
        return self.final * (1.0 - (1.0 - frac) ** 3)

    def due(self, step: int) -> bool:
        """A mask update after this step: every ``every`` steps from ``t₀``, and at ``t₁``."""
        return self.start_step < step <= self.end_step and \
            ((step - self.start_step) % self.every == 0 or step == self.end_step)


def monotone_keep(new: Dict[str, torch.Tensor], old: Optional[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """``new ∩ old`` per spec: a group once masked stays masked."""
    if not old:
        return {k: torch.as_tensor(v).clone() for k, v in new.items()}
    out = {}
    for k, v in new.items():
        keep_old = set(torch.as_tensor(old.get(k, v)).tolist())
        out[k] = torch.tensor(sorted(g for g in torch.as_tensor(v).tolist() if g in keep_old), dtype=torch.long)
    return out


def kept_count(keep: Optional[Dict[str, torch.Tensor]], specs) -> int:
    """How many groups of ``specs`` ``keep`` keeps (all of them for ``None``: nothing masked yet)."""
    return sum(s.count if keep is None or s.name not in keep else len(keep[s.name]) for s in specs)


def write_keep(path: str, keep: Dict[str, torch.Tensor]) -> None:
    """The schedule's kept groups as JSON (``{spec: [indices]}``), saved in every checkpoint."""
    with open(path, "w") as f:
        json.dump({k: torch.as_tensor(v).tolist() for k, v in keep.items()}, f)


def read_keep(path: str) -> Dict[str, torch.Tensor]:
    with open(path) as f:
        return {k: torch.tensor(v, dtype=torch.long) for k, v in json.load(f).items()}
