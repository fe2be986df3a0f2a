"""Pruning in rounds: a large removal split into steps, each with fresh statistics and compensation.

Large removals interact: a group that is cheap to remove while its layer is intact may not be once
half the layer is gone. Round ``k`` removes groups until ``targets[k]`` of the *original* prunable
cost is gone, after re-collecting the curvature of the current model on a few calibration batches;
only the groups removed in that round are compensated, from statistics taken just before their removal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence

import torch
from torch import nn

from ..architectures import group_specs
from ..checks import check_choice, validate_sparsity
from ..distill import frozen_copy
from ..distributed import broadcast_parameters, is_distributed
from .compensation import COMPENSATIONS
from .compensation import compensate as compensate_groups
from .plan import POSTERIOR_METHODS, PruningPlan, apply, plan
from .reconstruction import refit_to_reference
from .selection import DEFAULT_REPORT_FIELDS, LayerReport, Selection, prunable_cost


def geometric_targets(sparsity: float, rounds: int) -> List[float]:
    """``rounds`` cumulative targets ending at ``sparsity`` whose *kept* fractions fall geometrically,
    ``1 − (1 − s)^(k / K)``: each round removes the same share of what is left."""
    validate_sparsity(sparsity)
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    return [1.0 - (1.0 - sparsity) ** (k / rounds) for k in range(1, rounds + 1)]


def rounds_for_sparsity(sparsity: float, max_share: float = 0.3) -> int:
    """The fewest geometric rounds in which none removes more than ``max_share`` of what is left:
    ``⌈log(1 − s) / log(1 − max_share)⌉`` (2 at 50%, 4 at 70%, 7 at 90% for the default 0.3)."""
    validate_sparsity(sparsity)
    if not 0.0 < max_share < 1.0:
        raise ValueError(f"max_share must be in (0, 1), got {max_share}")
    return max(1, math.ceil(math.log1p(-sparsity) / math.log1p(-max_share) - 1e-9))


@dataclass
class RoundsResult:
    plans: List[PruningPlan]
    achieved: float  # fraction of the original prunable cost removed
    compensated: List[dict]
    selection: Selection  # the rounds as one selection of the original model's groups (for reports)


def prune_in_rounds(model: nn.Module, make_posterior: Callable[[nn.Module], object],
                    calibration: Iterable, targets: Sequence[float], method: str = "damage", budget: str = "params",
                    seq_len: int = 128, min_keep: float = 0.0, compensate: bool = True,
                    max_batches: Optional[int] = None, progress: bool = False,
                    scores_fn: Optional[Callable[[nn.Module, object], dict]] = None,
                    kv_groups_only: bool = False, start_from: Optional[object] = None,
                    compensation: str = "least-squares") -> RoundsResult:
    """Prune ``model`` in place through cumulative ``targets`` (fractions of the original prunable cost).

    Args:
        make_posterior: builds a :class:`~spam_hf.posterior.SpamLaplace` for the current model (called
            every round; the previous round's unit precisions of kept groups are carried over).
        calibration: batches for the curvature of each round (``max_batches`` of them).
        min_keep: every layer keeps at least this fraction of its *original* heads and of its neurons (the
            floor does not shrink with the rounds).
        method: any score; ``damage`` / ``damage-out`` and compensation use the round's KFAC factors.
        compensate: move the consuming layers' remaining weights: ``compensation`` names how
            (``least-squares`` or ``posterior`` from the round's KFAC factors,
            :func:`spam_hf.pruning.compensation.compensate`; ``reference``: every consuming layer refitted in
            forward order to the outputs of ``model`` as it was on entry, a frozen copy kept for the purpose,
            :func:`spam_hf.pruning.reconstruction.refit_to_reference`).
        scores_fn: ``(model, posterior) -> {spec name: scores}`` for a score spam-hf does not compute (a
            peer's); ``method`` then only names it.
        kv_groups_only: the grouped-query-attention granularity (must match ``make_posterior``'s).
        start_from: a posterior of the unpruned model (the trained one) whose unit precisions the first
            round starts from; later rounds start from the previous round's.
    """
    if list(targets) != sorted(targets) or not targets:
        raise ValueError(f"targets must be increasing fractions, got {list(targets)}")
    for t in targets:
        validate_sparsity(t)
    if not 0.0 <= min_keep < 1.0:
        raise ValueError(f"min_keep must be in [0, 1), got {min_keep}")
    check_choice("compensation", compensation, COMPENSATIONS)
    if compensate and compensation == "reference" and is_distributed():
        raise ValueError("compensation 'reference' runs in one process (its statistics are not summed over "
                         "processes); use least-squares under torchrun / accelerate")
    reference = frozen_copy(model) if compensate and compensation == "reference" else None
    specs0 = group_specs(model, kv_groups_only)
    total0 = prunable_cost(model, specs0, budget, seq_len)
    original = {s.name: torch.arange(s.count) for s in specs0}  # original index of every remaining group
    # min_keep is a fraction of each layer's original heads / neurons: a fraction of what earlier rounds left
    # would shrink the floor round after round (7 rounds at 90%: 77 of 1,536 neurons became 10)
    floors = {s.name: math.ceil(min_keep * s.count) for s in specs0}
    plans, compensated = [], []
    previous = (start_from, {}) if start_from is not None else None  # (posterior, keep) to carry precisions from
    for target in targets:
        specs = group_specs(model, kv_groups_only)
        current = prunable_cost(model, specs, budget, seq_len)
        relative = (current - (1.0 - target) * total0) / current
        if relative <= 0:
            continue
        posterior = make_posterior(model)
        if previous is not None:
            posterior.carry_over(*previous)
        if compensate or scores_fn is not None or method in POSTERIOR_METHODS:
            posterior.collect(calibration, max_batches=max_batches, progress=progress)
        p = plan(model, posterior, min(relative, 1.0 - 1e-9), method=method, budget=budget, seq_len=seq_len,
                 floors=floors, scores=scores_fn(model, posterior) if scores_fn is not None else None)
        if reference is not None:
            compensated.append(refit_to_reference(model, reference, posterior.specs, p.keep, calibration,
                                                  max_batches=max_batches))
        elif compensate:
            # the posterior of the calibration batches alone: their statistics are not extrapolated to N
            compensated.append(compensate_groups(model, posterior.specs, p.keep, posterior.factors(extrapolate=False),
                                                 posterior.prior, posterior.temperature, kind=compensation))
        apply(model, p)
        plans.append(p)
        previous = (posterior, p.keep)
        for name, kept in p.keep.items():
            original[name] = original[name][kept]
    broadcast_parameters(model)  # data parallel: every process holds the main process's compensated weights
    total = prunable_cost(model, group_specs(model, kv_groups_only), budget, seq_len)
    achieved = 1.0 - total / total0
    layers: dict = {}
    for s in specs0:
        rep = layers.setdefault(s.layer, LayerReport(layer=s.layer))
        field_name = DEFAULT_REPORT_FIELDS[s.kind]
        rep.kept[field_name], rep.total[field_name] = int(original[s.name].numel()), s.count
    selection = Selection(keep=original, budget=budget, sparsity_target=float(targets[-1]), total_cost=total0,
                          removed_cost=total0 - total, layers=[layers[k] for k in sorted(layers)])
    return RoundsResult(plans=plans, achieved=achieved, compensated=compensated, selection=selection)
