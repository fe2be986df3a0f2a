"""Group scores, one module each, in one registry (:mod:`.base`).

    from spam_hf.pruning.scores import get_score, score_names
    get_score("damage-obs").needs      # ('factors',): calibration KFAC factors of the current model
    get_score("opd").rounds            # False: one shot, no compensation by default

A new score is one module here, named after the score (``damage_obs.py`` registers ``damage-obs``): a function
``(model, specs, statistics, seed) -> {spec.name: FloatTensor[G]}`` registered with :func:`~.base.register` and the
statistics it reads. Every module of this folder is imported below; ``--method`` lists them
(:func:`spam_hf.choices.score_names`) without importing them.
"""

from __future__ import annotations

import importlib
from typing import Dict, Iterable, Optional, Tuple

import torch
from torch import nn

from ...architectures.base import GroupSpec
from ...checks import check_choice
from ...choices import score_names as score_files
from ...priors import PriorPrecision
from .base import CALIBRATION_STATISTICS, REGISTRY, STATISTICS, Score, Statistics, register

for _name in score_files():  # each module registers its score on import
    importlib.import_module(f".{_name.replace('-', '_')}", __name__)

DEFAULT_FULL = "damage-obs"
"""The score of ``method="auto"`` on a full model (heads and neurons): best without recovery on the CPU protocol."""
DEFAULT_LORA = "opd"
"""The score of ``method="auto"`` on LoRA ranks."""


def score_names() -> Tuple[str, ...]:
    """Every registered score, in registration order (the ``--method`` choices after ``auto``)."""
    return tuple(REGISTRY)


def get_score(name: str) -> Score:
    """The registered :class:`~.base.Score` called ``name`` (``ValueError`` listing the names otherwise)."""
    check_choice("method", name, score_names())
    return REGISTRY[name]


def resolve_method(method: str, lora: bool) -> str:
    """``auto`` → :data:`DEFAULT_LORA` on LoRA ranks, :data:`DEFAULT_FULL` otherwise; any other name is checked."""
    if method == "auto":
        return DEFAULT_LORA if lora else DEFAULT_FULL
    return get_score(method).name


def group_scores(model: nn.Module, specs: Iterable[GroupSpec], method: str = "opd",
                 prior: Optional[PriorPrecision] = None, curvature: Optional[Dict[str, object]] = None,
                 temperature: float = 1.0, seed: int = 0, factors=None,
                 mask_fisher: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """``{spec.name: FloatTensor[G]}``: the score ``method`` of every group (higher = more important), from
    statistics given explicitly (``curvature``: the curvature diagonal). ``ValueError`` when the score needs a
    statistic that is missing."""
    stats = Statistics(prior=prior, temperature=temperature, diagonal=curvature, factors=factors,
                       mask_fisher=mask_fisher)
    return get_score(method)(model, list(specs), stats, seed)


__all__ = ["CALIBRATION_STATISTICS", "DEFAULT_FULL", "DEFAULT_LORA", "REGISTRY", "STATISTICS", "Score", "Statistics",
           "get_score", "group_scores", "register", "resolve_method", "score_names"]
