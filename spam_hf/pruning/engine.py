"""The pruning engine: one call from statistics to a smaller model.

    from spam_hf.pruning import PruningConfig, prune
    result = prune(model, posterior, PruningConfig(sparsity=0.7), calibration=train_loader)
    result.selection.to_dict()          # which groups of the original model are kept, per layer

:func:`prune` resolves the config against the score registry (:meth:`PruningConfig.resolved`), then either plans
and applies in one shot (scores of the trained posterior, ``opd`` / ``fisher``, or of the weights alone), or goes
through :func:`~spam_hf.pruning.prune_in_rounds`: calibration statistics of the current model each round, global
selection of that round's share of the budget, compensation, surgery; or, with ``sequential``, through
:func:`~spam_hf.pruning.sequential.prune_sequential`, one block's statistics at a time. With ``drop_blocks`` the
blocks left idle are then removed whole (:mod:`spam_hf.pruning.blocks`). ``SpamTrainer.prune`` and the CLI's jobs
are thin calls into it.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

from torch import nn

from ..architectures import is_peft_model
from ..posterior import SpamLaplace
from ..sharding import is_sharded_model
from .blocks import drop_idle_blocks
from .config import PruningConfig
from .planning import PruningResult, apply, plan
from .rounds import geometric_targets, prune_in_rounds
from .sequential import prune_sequential, sharded_refusal


def prune(model: nn.Module, statistics: Optional[SpamLaplace] = None, config: Optional[PruningConfig] = None,
          calibration: Optional[Iterable] = None, *, progress: bool = False, kv_groups_only: Optional[bool] = None,
          **options) -> PruningResult:
    """Remove groups of ``model`` in place until ``config.sparsity`` of its prunable budget is gone.

    Args:
        model: a transformers model of a registered family, or a peft LoRA model (its ranks are the groups).
        statistics: the trained posterior (:class:`~spam_hf.posterior.SpamLaplace` of ``model``): its priors and
            curvature diagonal for ``opd`` / ``fisher``, its settings (prior kind, ``N``, temperature, Fisher type)
            for the calibration posteriors of the rounds, whose unit precisions start from its. ``None`` for
            scores that read nothing (``magnitude``, ``random``); rounds then use a default posterior.
        config: the :class:`PruningConfig` (default: its defaults); ``options`` replace its fields.
        calibration: batches (a ``DataLoader``: rounds read ``len(calibration.dataset)`` as ``N`` when
            ``statistics`` gives none) for calibration statistics; needed by rounds, compensation and the damage
            scores.
        progress: progress bars for the calibration passes.
        kv_groups_only: grouped-query attention in whole KV groups (``None``: the statistics' own, else ``False``).

    Returns:
        :class:`~spam_hf.pruning.PruningResult` (its ``config`` is the resolved one).

    With several processes every process calls it with its shard of the calibration batches; the decisions are
    the main process's and the weights are broadcast, so every process ends with the same model. An FSDP2-sharded
    model is pruned where it is, block by block (:func:`~spam_hf.pruning.sequential.prune_sequential`, one
    gathered block at a time), and stays sharded.
    """
    config = PruningConfig.build(options.pop("sparsity", None), config, **options).resolved(is_peft_model(model))
    if is_sharded_model(model):  # FSDP2: pruned where it is, one gathered block at a time
        reason = sharded_refusal(model, config)
        if reason is not None:
            raise ValueError(f"an FSDP2-sharded model is pruned block by block (sequential=True): {reason}")
        config = config.replace(sequential=True, rounds=1)
    if config.drop_blocks is not None:
        if is_peft_model(model):
            raise ValueError("drop_blocks removes whole blocks of a full model; a LoRA model's groups are its ranks")
        if calibration is None:
            raise ValueError("drop_blocks needs calibration batches (calibration=a DataLoader with labels): the "
                             "calibration loss decides which blocks go")
    result = _cut(model, statistics, config, calibration, progress, kv_groups_only)
    if config.drop_blocks is not None:
        dropped = drop_idle_blocks(model, result.selection, calibration, config.drop_blocks,
                                   config.calibration_batches, config.budget, config.flops_seq_len)
        result.selection, result.dropped_blocks, result.layer_map = dropped.selection, dropped.dropped, dropped.layer_map
    return result


def _cut(model: nn.Module, statistics: Optional[SpamLaplace], config: PruningConfig, calibration: Optional[Iterable],
         progress: bool, kv_groups_only: Optional[bool]) -> PruningResult:
    """Heads and neurons: block by block, in one shot or in rounds, as ``config`` resolved it."""
    if kv_groups_only is None:
        kv_groups_only = statistics.kv_groups_only if statistics is not None else False
    if config.sequential:
        if calibration is None:
            raise ValueError("block-sequential pruning needs calibration batches (calibration=a DataLoader)")
        return prune_sequential(model, statistics, config, calibration, progress=progress,
                                kv_groups_only=kv_groups_only)
    if not config.in_rounds:
        p = plan(model, statistics, config=config, kv_groups_only=kv_groups_only)
        apply(model, p)
        return PruningResult(plans=[p], compensated=[], selection=p.selection, config=config)
    if calibration is None:
        raise ValueError(f"pruning with {config.method} in {config.rounds} round(s)"
                         f"{' with compensation' if config.compensate else ''} needs calibration batches "
                         "(calibration=a DataLoader of training batches)")
    return prune_in_rounds(model, calibration_posteriors(model, statistics, config, kv_groups_only), calibration,
                           geometric_targets(config.sparsity, config.rounds), config, progress=progress,
                           start_from=statistics, kv_groups_only=kv_groups_only)


def calibration_posteriors(model: nn.Module, statistics: Optional[SpamLaplace], config: PruningConfig,
                           kv_groups_only: bool = False) -> Callable[[nn.Module], SpamLaplace]:
    """``model -> SpamLaplace``: the posterior each round collects its calibration statistics in
    (:meth:`SpamLaplace.calibration_posterior` of ``statistics``, or of unit priors when there is none): the mask
    Fisher and the input means only when the score or the compensation reads them, and only the consuming modules'
    curvature when nothing else is read."""
    score = config.score
    mask_fisher = "mask_fisher" in score.needs
    input_means = "input_moments" in score.needs or (bool(config.compensate) and config.compensation == "bias")
    # curvature of O / down / lora_B alone where that is all that is read: a third of the factors at LLM widths
    consuming_only = score.collects_consuming_only
    if statistics is None:
        statistics = SpamLaplace(model, reduction="expand", kv_groups_only=bool(kv_groups_only))
    return lambda m: statistics.calibration_posterior(m, mask_fisher=mask_fisher, consuming_only=consuming_only,
                                                      input_means=input_means)
