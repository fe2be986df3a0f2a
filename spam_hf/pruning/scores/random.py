"""``random``: one uniform draw per group from a generator seeded with ``seed`` (baseline)."""

import torch

from .base import Score, register


def random_scores(model, specs, statistics, seed):
    g = torch.Generator().manual_seed(seed)
    return {s.name: torch.rand(s.count, generator=g, dtype=torch.float64) for s in specs}


RANDOM = register(Score("random", random_scores, summary="a seeded uniform draw per group (baseline)"))
