"""Whole-block removal: after heads and neurons are cut, drop the blocks that are left doing (almost) nothing.

At high sparsity the global budget empties some blocks down to a head and a few dozen neurons. Such a block still
costs its layer norms, residual adds and small matrix products, and at batch 1 these per-block overheads are what
keeps the measured speed-up below the FLOP ratio. :func:`drop_idle_blocks` considers the blocks that keep at most
:data:`IDLE_SHARE` of a dense block's prunable cost and removes them best first: each step skips every remaining
candidate on the calibration batches (with the blocks already chosen skipped too) and takes the one whose loss is
lowest, as long as that loss stays within ``(1 + tolerance)`` of the loss with every block. Skipping is exact for a
pre-norm decoder block with no heads, no neurons and no biases left (it adds nothing to the residual stream); for a
post-norm encoder block it also removes two layer norms, which is what the calibration loss measures. Best first,
not emptiest first: on the CPU protocol's 90% MiniLM export, skipping the emptiest block raised the calibration
loss by 1.9% and the next emptiest lowered it by 4.4%, but skipping both raised it by 22%.

Dropped blocks leave the model (:func:`remove_blocks`): the block list is shorter, ``config.num_hidden_layers``
says so, ``layer_idx`` attributes (KV-cache slots) and ``config.layer_types`` follow, so the export loads with
the stock class (``--uniform``) or the per-layer sizes of ``config.spam_pruning`` (default), like any other.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn
from transformers.utils import logging

from ..architectures import get_family, group_specs
from ..architectures.base import GroupSpec, base_prefix
from ..distributed import all_reduce_sum, broadcast_object
from .selection import Selection, prunable_cost
from .sequential import batch_to

logger = logging.get_logger(__name__)

IDLE_SHARE = 0.1
"""A block is a candidate for removal when it keeps at most this share of a dense block's prunable cost."""


def layer_costs(model: nn.Module, specs: Sequence[GroupSpec], budget: str = "params",
                seq_len: int = 128) -> Dict[int, float]:
    """``{block: prunable cost left}`` (parameters, or FLOPs at ``seq_len``) of every block, from ``specs``; a
    block whose groups are all gone has no spec left and costs 0."""
    n_layers = len(get_family(model).layers(model))
    return {layer: prunable_cost(model, [s for s in specs if s.layer == layer], budget, seq_len)
            for layer in range(n_layers)}


class _SkipBlocks:
    """Within ``with``, the blocks ``skip`` (indices into the family's block list) return their input."""

    def __init__(self, model: nn.Module, skip: Iterable[int]) -> None:
        layers = get_family(model).layers(model)
        self.handles = [layers[i].register_forward_hook(_return_input, with_kwargs=True) for i in skip]

    def __enter__(self) -> "_SkipBlocks":
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def _return_input(module, args, kwargs, output):
    hidden = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    return hidden


def calibration_loss(model: nn.Module, batches: Iterable, max_batches: int, skip: Iterable[int] = ()) -> float:
    """Mean loss over the first ``max_batches`` batches (dicts with labels), with blocks ``skip`` skipped; with
    several processes, over every process's batches (so that all of them take the same decisions)."""
    device = next(model.parameters()).device
    total, n = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _SkipBlocks(model, skip):
            for i, batch in enumerate(batches):
                if i >= max_batches:
                    break
                loss = model(**batch_to(batch, device)).loss
                if loss is None:
                    raise ValueError("dropping blocks needs calibration batches with labels (the loss decides)")
                total += float(loss)
                n += 1
    finally:
        model.train(was_training)
    total, n = (float(x) for x in all_reduce_sum(torch.tensor([total, n], dtype=torch.float64)))  # every shard
    if n == 0:
        raise ValueError("dropping blocks needs at least one calibration batch")
    if not math.isfinite(total):
        raise FloatingPointError(f"non-finite calibration loss ({total}) while choosing blocks to drop")
    return total / n


def choose_idle_blocks(model: nn.Module, batches: Iterable, tolerance: float, max_batches: int,
                       budget: str = "params", seq_len: int = 128,
                       block_cost: Optional[float] = None) -> List[int]:
    """The blocks to drop, best first: among the candidates (blocks keeping at most :data:`IDLE_SHARE` of
    ``block_cost``, a dense block's prunable cost; every block when it is ``None``), each step skips every
    remaining candidate with the ones already chosen and takes the one with the lowest calibration loss, while that
    loss is at most ``(1 + tolerance) ×`` the loss with every block. Never every block. Costs at most
    ``c(c + 1) / 2`` calibration passes for ``c`` candidates."""
    if tolerance < 0:
        raise ValueError(f"drop_blocks tolerance must be >= 0, got {tolerance}")
    costs = layer_costs(model, group_specs(model), budget, seq_len)
    candidates = [i for i in costs if block_cost is None or costs[i] <= IDLE_SHARE * block_cost]
    base = calibration_loss(model, batches, max_batches)
    bound = base + tolerance * abs(base)
    chosen: List[int] = []
    while candidates and len(chosen) < len(costs) - 1:  # one block always stays (any of the candidates)
        losses = {i: calibration_loss(model, batches, max_batches, chosen + [i]) for i in candidates}
        best = min(candidates, key=lambda i: (losses[i], costs[i], i))
        if losses[best] > bound:
            logger.info(f"no further block goes: skipping block {best} too gives calibration loss {losses[best]:.4f} "
                        f"(bound {bound:.4f})")
            break
        chosen.append(best)
        candidates.remove(best)
        logger.info(f"block {best} ({costs[best]:.0f} prunable {budget} left) goes: calibration loss "
                    f"{losses[best]:.4f} (with every block {base:.4f})")
    return sorted(chosen)


def remove_blocks(model: nn.Module, drop: Iterable[int]) -> Dict[int, int]:
    """Delete blocks ``drop`` from ``model`` in place; returns ``{old index: new index}`` of the kept blocks.

    The block list, ``config.num_hidden_layers`` and (where present) ``config.layer_types`` shrink, and every
    ``layer_idx`` attribute in the kept blocks is renumbered (decoders index their KV cache with it)."""
    family = get_family(model)
    layers = family.layers(model)
    drop = sorted(set(int(i) for i in drop))
    n = len(layers)
    if any(i < 0 or i >= n for i in drop):
        raise ValueError(f"blocks to drop {drop} are not all in 0..{n - 1}")
    if len(drop) >= n:
        raise ValueError("cannot drop every block")
    config = getattr(model, "config", None)
    if drop and getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError("this GPT-2 config scales attention by 1 / layer index (scale_attn_by_inverse_layer_idx), "
                         "so removing a block would change the blocks after it")
    kept = [i for i in range(n) if i not in drop]
    mapping = {old: new for new, old in enumerate(kept)}
    new_layers = nn.ModuleList([layers[i] for i in kept])
    for new, block in enumerate(new_layers):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    parent_name, _, attr = (base_prefix(model) + family.layers_path).rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new_layers)
    if config is not None:
        config.num_hidden_layers = len(kept)
        types = getattr(config, "layer_types", None)
        if isinstance(types, list) and len(types) == n:
            config.layer_types = [types[i] for i in kept]
    return mapping


def drop_idle_blocks(model: nn.Module, selection: Selection, batches: Iterable, tolerance: float, max_batches: int,
                     budget: str = "params", seq_len: int = 128) -> "DroppedBlocks":
    """Choose the idle blocks (:func:`choose_idle_blocks`), remove them (:func:`remove_blocks`) and account for
    them in ``selection``: their groups' ``keep`` emptied, their layer reports at zero, and the removed cost
    counted from what is left of the model."""
    n_layers = len(get_family(model).layers(model))
    dropped = broadcast_object(choose_idle_blocks(model, batches, tolerance, max_batches, budget, seq_len,
                                                  block_cost=selection.total_cost / n_layers))
    if not dropped:
        return DroppedBlocks(selection=selection, dropped=[], layer_map={})
    layer_map = remove_blocks(model, dropped)
    left = prunable_cost(model, group_specs(model), budget, seq_len)
    keep = {name: (idx[:0] if _layer_of(name) in dropped else idx) for name, idx in selection.keep.items()}
    for rep in selection.layers:
        if rep.layer in dropped:
            rep.kept = {k: 0 for k in rep.kept}
    after = Selection(keep=keep, budget=selection.budget, sparsity_target=selection.sparsity_target,
                      total_cost=selection.total_cost, removed_cost=selection.total_cost - left,
                      layers=selection.layers, dropped_blocks=list(dropped))
    logger.info(f"dropped block(s) {dropped}: {after.achieved:.1%} of prunable {budget} removed in all")
    return DroppedBlocks(selection=after, dropped=dropped, layer_map=layer_map)


@dataclass
class DroppedBlocks:
    """What :func:`drop_idle_blocks` did: the updated selection, the dropped blocks (original indices) and
    ``{old index: new index}`` of the kept ones (empty when none was dropped)."""

    selection: Selection
    dropped: List[int]
    layer_map: Dict[int, int]


def _layer_of(spec_name: str) -> Optional[int]:
    """The block of a group spec's name (``layer3.head`` -> 3; every family names its specs so)."""
    match = re.match(r"layer(\d+)\.", spec_name)
    return int(match.group(1)) if match else None
