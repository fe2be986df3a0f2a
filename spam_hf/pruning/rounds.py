"""Pruning in rounds: a large removal split into steps, each with fresh statistics and compensation.

Large removals interact: a group that is cheap to remove while its layer is intact may not be once
half the layer is gone. Round ``k`` removes groups until ``targets[k]`` of the *original* prunable
cost is gone, after re-collecting the curvature of the current model on a few calibration batches;
only the groups removed in that round are compensated, from statistics taken just before their removal.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, List, Optional, Sequence

import torch
from torch import nn
from transformers.utils import logging

from ..architectures import consuming_modules, group_specs, is_peft_model
from ..checks import validate_sparsity
from ..distill import frozen_copy
from ..distributed import broadcast_parameters, is_distributed
from .compensation import compensate as compensate_groups
from .compensation import add_consuming_biases, compensate_bias
from .config import PruningConfig
from .planning import PruningResult, apply, plan
from .reconstruction import refit_to_reference
from .selection import kept_selection, prunable_cost

logger = logging.get_logger("spam_hf")


def removed_summary(specs, keep) -> str:
    """``"3 heads, 120 neurons"``: the groups of each kind a plan removes."""
    removed: dict = {}
    for s in specs:
        removed[s.kind] = removed.get(s.kind, 0) + s.count - len(keep[s.name])
    words = {"head": "heads", "kv_head": "KV heads", "neuron": "neurons", "expert": "experts",
             "lora_rank": "LoRA ranks"}
    return ", ".join(f"{n} {words.get(k, k + 's')}" for k, n in removed.items() if n) or "nothing"


def geometric_targets(sparsity: float, rounds: int) -> List[float]:
    """``rounds`` cumulative targets ending at ``sparsity`` whose *kept* fractions fall geometrically,
    ``1 − (1 − s)^(k / K)``: each round removes the same share of what is left."""
    validate_sparsity(sparsity)
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    return [1.0 - (1.0 - sparsity) ** (k / rounds) for k in range(1, rounds + 1)]


def prune_in_rounds(model: nn.Module, make_posterior: Callable[[nn.Module], object], calibration: Iterable,
                    targets: Sequence[float], config: Optional[PruningConfig] = None, *, progress: bool = False,
                    scores_fn: Optional[Callable[[nn.Module, object], dict]] = None,
                    start_from: Optional[object] = None, max_batches: Optional[int] = None,
                    kv_groups_only: bool = False, **options) -> PruningResult:
    """Prune ``model`` in place through cumulative ``targets`` (fractions of the original prunable cost).

    Args:
        make_posterior: builds a :class:`~spam_hf.posterior.SpamLaplace` for the current model (called
            every round; the previous round's unit precisions of kept groups are carried over), e.g.
            :meth:`SpamLaplace.calibration_posterior`.
        calibration: batches for the statistics of each round: the first ``max_batches`` of them (default
            ``config.calibration_batches``).
        config, options: the :class:`~spam_hf.pruning.PruningConfig` (``options`` replace its fields; ``sparsity``
            is ``targets[-1]``), resolved for ``model`` (:meth:`PruningConfig.resolved`). Used: ``method`` (any
            score; the damage scores and compensation use the round's KFAC factors), ``budget``, ``seq_len``,
            ``min_keep`` (every layer keeps at least this fraction of its *original* heads and of its neurons: the
            floor does not shrink with the rounds), ``compensate`` and ``compensation`` (``least-squares`` or
            ``posterior`` from the round's KFAC factors, :func:`spam_hf.pruning.compensation.compensate`; ``bias``
            from the round's input means, :func:`~spam_hf.pruning.compensation.compensate_bias`;
            ``reference``: every consuming layer refitted in forward order to the outputs of ``model`` as it was
            on entry, a frozen copy kept for the purpose, :func:`spam_hf.pruning.reconstruction.refit_to_reference`).
        scores_fn: ``(model, posterior) -> {spec name: scores}`` for a score spam-hf does not compute (a
            peer's); ``method`` (any string) then only names it.
        start_from: a posterior of the unpruned model (the trained one) whose unit precisions the first
            round starts from; later rounds start from the previous round's.
        kv_groups_only: grouped-query attention in whole KV groups (must match ``make_posterior``'s).
    """
    if list(targets) != sorted(targets) or not targets:
        raise ValueError(f"targets must be increasing fractions, got {list(targets)}")
    for t in targets:
        validate_sparsity(t)
    label = options.pop("method", None) if scores_fn is not None else None  # a score from outside the registry
    config = PruningConfig.build(targets[-1], config, **options).resolved(is_peft_model(model))
    method, budget, seq_len, compensate = label or config.method, config.budget, config.flops_seq_len, config.compensate
    compensation, kv_groups_only = config.compensation, bool(kv_groups_only)
    needs_statistics = compensate or scores_fn is not None or config.score.needs_posterior
    max_batches = max_batches if max_batches is not None else config.calibration_batches
    if compensate and compensation == "reference" and is_distributed():
        raise ValueError("compensation 'reference' runs in one process (its statistics are not summed over "
                         "processes); use least-squares under torchrun / accelerate")
    reference = frozen_copy(model) if compensate and compensation == "reference" else None
    if compensate and compensation == "bias":  # the biases the compensation writes count in the budget from the start
        add_consuming_biases(model, consuming_modules(group_specs(model, kv_groups_only)))
    specs0 = group_specs(model, kv_groups_only)
    total0 = prunable_cost(model, specs0, budget, seq_len)
    original = {s.name: torch.arange(s.count) for s in specs0}  # original index of every remaining group
    # min_keep is a fraction of each layer's original heads / neurons: a fraction of what earlier rounds left
    # would shrink the floor round after round (7 rounds at 90%: 77 of 1,536 neurons became 10)
    floors = {s.name: math.ceil(config.min_keep * s.count) for s in specs0}
    plans, compensated = [], []
    previous = (start_from, {}) if start_from is not None else None  # (posterior, keep) to carry precisions from
    for i, target in enumerate(targets, 1):
        specs = group_specs(model, kv_groups_only)
        current = prunable_cost(model, specs, budget, seq_len)
        relative = (current - (1.0 - target) * total0) / current
        if relative <= 0:
            continue
        posterior = make_posterior(model)
        if previous is not None:
            posterior.carry_over(*previous)
        if needs_statistics:
            posterior.collect(calibration, max_batches=max_batches, progress=progress)
        round_config = config.replace(sparsity=min(relative, 1.0 - 1e-9), min_keep=0.0)
        if scores_fn is not None:
            p = plan(model, posterior, config=round_config, floors=floors, scores=scores_fn(model, posterior),
                     method=method, kv_groups_only=kv_groups_only)
        else:
            p = plan(model, posterior, config=round_config, floors=floors, kv_groups_only=kv_groups_only)
        if reference is not None:
            compensated.append(refit_to_reference(model, reference, posterior.specs, p.keep, calibration,
                                                  max_batches=max_batches))
        elif compensate and compensation == "bias":
            compensated.append(compensate_bias(model, posterior.specs, p.keep, posterior.input_moments()))
        elif compensate:
            # the posterior of the calibration batches alone: their statistics are not extrapolated to N
            compensated.append(compensate_groups(model, posterior.specs, p.keep, posterior.factors(extrapolate=False),
                                                 posterior.prior, posterior.temperature, kind=compensation))
        logger.info(f"round {i} of {len(targets)}: {method} removes {removed_summary(posterior.specs, p.keep)} "
                    f"({target:.0%} of prunable {budget} removed in all)"
                    + (f", {compensation} compensation" if compensate else ""))
        apply(model, p)
        plans.append(p)
        previous = (posterior, p.keep)
        for name, kept in p.keep.items():
            original[name] = original[name][kept]
    broadcast_parameters(model)  # data parallel: every process holds the main process's compensated weights
    total = prunable_cost(model, group_specs(model, kv_groups_only), budget, seq_len)
    selection = kept_selection(specs0, original, budget, float(targets[-1]), total0, total)
    return PruningResult(plans=plans, compensated=compensated, selection=selection, config=config)
