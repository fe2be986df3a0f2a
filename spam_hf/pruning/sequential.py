"""Block-sequential pruning: one block's statistics at a time, for models whose statistics do not fit at once.

All-at-once pruning (:func:`~spam_hf.pruning.prune_in_rounds`) holds KFAC factors of every prunable module of
the model together; at Llama widths that is many times the block weights. Here (SparseGPT's and FLAP's order):

1. **Output factors** (one forward and backward of the dense model over the calibration batches): the output
   factor ``G = Σ g gᵀ`` (hidden × hidden) of every *consuming* module (O for heads, down for neurons), from
   sampled labels as in training. ``2 · L · hidden²`` numbers; no input factor is formed.
2. **Budget pass** (one forward, block by block): the calibration inputs of block 0 are recorded once (with the
   keyword inputs, masks and position embeddings, of the first block of each kind where the config's
   ``layer_types`` mix sliding and full attention, as Gemma's do); block
   ``l`` runs on them with hooks on its consuming modules, which gives their input factors ``A = Σ a aᵀ / n``
   (the wide ones: ``intermediate²`` for down). The block's groups are scored, ``A`` is freed, and the block's
   outputs become block ``l+1``'s inputs. One global selection over every block's scores (the budget stays
   global, as all-at-once) fixes how much of each block's prunable cost goes.
3. **Compression pass** (one forward, block by block): block ``l`` sees the outputs of the already-compressed
   blocks before it. Its input factors are collected again on those inputs; with ``rescore`` its groups are
   scored again and the block's share of the budget (from pass 2) is removed by that score; the consuming
   modules are refitted by least squares on those inputs (compensation), the groups cut, and the block's
   (compressed) outputs passed on.

Memory beyond the model: the ``G`` factors, one block's ``A`` factors, and the hidden states of the
calibration batches at one block boundary. Output gradients are those of the *dense* model (pass 1): ``G`` is
not refreshed after earlier blocks are cut (it would need a backward per block).

A block offloaded by accelerate is brought onto the device while it is scored and cut
(:func:`~spam_hf.offload.onloaded`); a block of an FSDP2-sharded model is gathered into a plain copy and sharded
again after (:func:`~spam_hf.sharding.gathered_block`): one whole block at a time, either way.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn
from transformers.utils import logging

from ..architectures import consuming_modules, get_family, group_specs, is_peft_model
from ..architectures.base import GroupSpec
from ..curvature import CurvatureAccumulator, _at_least_float32, nonzero_rows, token_layout
from ..distributed import all_reduce_sum, broadcast_object, broadcast_parameters
from ..offload import execution_device, is_offloaded, onloaded
from ..posterior import likelihood_of
from ..sharding import gathered_block, is_sharded_model, reshard_all
from .compensation import compensate as compensate_groups
from .config import PruningConfig
from .planning import PruningPlan, PruningResult
from .scores import Statistics, get_score, score_names
from .selection import kept_selection, prunable_cost, removed_cost, select_groups
from .surgery import prune_groups

logger = logging.get_logger("spam_hf")

def sequential_ok(score) -> bool:
    """Whether the block-sequential path computes ``score``: from the consuming modules' factors, the trained
    posterior's curvature diagonal, or the weights alone (``damage`` reads the row modules' factors too,
    ``damage-exact`` the mask Fisher; both need every module at once)."""
    needs = set(score.needs)
    return needs <= {"diagonal"} or (score.consuming_only and needs <= {"factors"})


class _Stop(Exception):
    """Raised by the hook that records block 0's inputs, to end the forward there."""


def sequential_refusal(model: nn.Module, config: PruningConfig) -> Optional[str]:
    """Why the block-sequential path cannot prune ``model`` as ``config`` (resolved) says, or ``None``."""
    if is_peft_model(model):
        return "block-sequential pruning is for heads and neurons of a full model, not LoRA ranks"
    if not sequential_ok(config.score):
        usable = [n for n in score_names() if sequential_ok(get_score(n))]
        return (f"block-sequential pruning scores with one of {', '.join(usable)}; {config.method!r} needs every "
                "module's statistics at once")
    if config.uniform:
        return ("block-sequential pruning sets each block's share as it goes; --uniform chooses one count for every "
                "layer at once: prune all blocks at once (--sequential False)")
    if config.compensate and config.compensation != "least-squares":
        return ("block-sequential pruning compensates by least squares on each block's inputs; compensation "
                f"{config.compensation!r} is for all-at-once pruning")
    return None


def sharded_refusal(model: nn.Module, config: PruningConfig) -> Optional[str]:
    """Why an FSDP2-sharded ``model`` cannot be pruned where it is as ``config`` (resolved) says, or ``None``: a
    sharded model is pruned block by block, one gathered block at a time; anything that needs every block at once
    cannot be."""
    if config.sequential is False:
        return "--sequential False scores all blocks at once"
    if config.drop_blocks is not None:
        return "--drop-blocks compares whole blocks"
    return sequential_refusal(model, config)


def check_sequential(model: nn.Module, config: PruningConfig) -> None:
    """Refuse (one line) what the block-sequential path cannot do."""
    reason = sequential_refusal(model, config)
    if reason is not None:
        raise ValueError(reason)


@contextlib.contextmanager
def _editable(model: nn.Module, layers: nn.ModuleList, index: int, changed: bool = True):
    """``layers[index]`` with weights that can be read, refitted and cut: an offloaded block brought onto the device
    (:func:`~spam_hf.offload.onloaded`), a sharded one gathered into a plain copy
    (:func:`~spam_hf.sharding.gathered_block`), any other as it is. After, with ``changed``, the cut block goes back
    offloaded / sharded."""
    if is_sharded_model(model):
        with gathered_block(model, layers, index, changed=changed) as block:
            yield block
    else:
        with onloaded(layers[index], changed=changed):
            yield layers[index]


def _batches(calibration: Iterable, max_batches: int) -> List[Dict[str, torch.Tensor]]:
    out = []
    for i, batch in enumerate(calibration):
        if i >= max_batches:
            break
        out.append(batch)
    if not out:
        raise ValueError("block-sequential pruning got no calibration batches")
    return out


def batch_to(batch: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    """``batch`` with its tensors on ``device`` (other entries as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _mask_of(batch: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
    return batch.get("attention_mask")


def _rows_of(batch: Dict[str, torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
    """The batch as one-sequence batches (sums over them equal the batch's; Monte-Carlo labels are drawn in the
    same row order)."""
    n = len(batch["input_ids"])
    return [{k: v[i:i + 1] if isinstance(v, torch.Tensor) and v.shape[:1] == (n,) else v for k, v in batch.items()}
            for i in range(n)]


def output_factors(model: nn.Module, modules: List[str], batches: List[Dict[str, torch.Tensor]], n_data: float,
                   fisher: str = "mc", seed: int = 0) -> Dict[str, torch.Tensor]:
    """Pass 1: ``{module: G}`` (the sums' dtype, ``out × out``) over ``batches``, extrapolated to ``n_data`` as
    :meth:`SpamLaplace.factors` does (``(N / n_g) Σ g gᵀ``); token rows (``expand``), sampled labels by default.
    One forward and one backward per sequence (an LM's logits and their gradient are one sequence × vocabulary
    at a time), in eval mode."""
    acc = CurvatureAccumulator(model, modules, kind="kfac", reduction="expand", fisher=fisher,
                               likelihood=likelihood_of(model), seed=seed, sides=("G",))
    device = execution_device(model)
    was_training = model.training
    model.eval()
    # offloaded blocks: autograd would keep every block's onloaded weights on the device until the backward
    saved = torch.autograd.graph.save_on_cpu() if is_offloaded(model) and device.type != "cpu" else \
        contextlib.nullcontext()
    try:
        for batch in batches:
            for row in _rows_of(batch_to(batch, device)):  # one sequence at a time: an LM's logits are rows × vocab
                with torch.enable_grad(), saved, acc.capture(model, _mask_of(row)):
                    out = model(**row)
                    acc.accumulate(out.logits, row.get("labels"))
                del out
    finally:
        model.train(was_training)
        reshard_all(model)  # FSDP2: the backward stopped at the outputs, so the root's weights were left gathered
    acc.all_reduce()
    scale = n_data / acc.n_g
    return {m: acc.sums[m]["G"].mul_(scale) for m in modules}  # the sums' dtype, on the model's device


def layer_kinds(model: nn.Module) -> List[Optional[str]]:
    """Each block's attention kind (``config.layer_types``: ``"sliding_attention"``, ``"full_attention"``, ...; all
    ``None`` where the config has none): blocks of different kinds get different masks, and in Gemma 3 different
    rotary embeddings, from the model's forward."""
    n = len(get_family(model).layers(model))
    kinds = getattr(model.config, "layer_types", None)
    return list(kinds) if kinds is not None and len(kinds) == n else [None] * n


def block_inputs(model: nn.Module, batches: List[Dict[str, torch.Tensor]]
                 ) -> Tuple[List[Tuple[tuple, dict]], List[Dict[Optional[str], dict]]]:
    """The positional and keyword inputs of the first block for each batch (hidden states first), and for each batch
    the keyword inputs of every block kind (:func:`layer_kinds`: masks, position embeddings), recorded by pre-hooks
    on the first block of each kind; the forward stops at the last of those (the first block alone for most
    models)."""
    layers = get_family(model).layers(model)
    kinds = layer_kinds(model)
    first = {kind: kinds.index(kind) for kind in dict.fromkeys(kinds)}  # kind -> its first block
    last = max(first.values())
    device = execution_device(model)
    recorded: List[Tuple[tuple, dict]] = []
    by_kind: List[Dict[Optional[str], dict]] = []

    def make_hook(index: int):
        def hook(module, args, kwargs):
            if index == 0:
                recorded.append((args, kwargs))
                by_kind.append({})
            for kind, at in first.items():
                if at == index:
                    by_kind[-1][kind] = kwargs
            if index == last:
                raise _Stop
        return hook

    # first among the block's pre-hooks: FSDP2's own gathers the block, which a stopped forward would leave gathered
    handles = [layers[i].register_forward_pre_hook(make_hook(i), with_kwargs=True, prepend=True)
               for i in sorted(set(first.values()))]
    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    try:
        with torch.no_grad():
            for batch in batches:
                inputs = {k: v for k, v in batch_to(batch, device).items() if k != "labels"}
                try:
                    model(**inputs, **extra)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
        reshard_all(model)  # FSDP2: the stopped forward left the root's weights (the embedding) gathered
    if len(recorded) != len(batches) or any(len(k) != len(first) for k in by_kind):
        raise RuntimeError("block-sequential pruning could not record the blocks' inputs")
    return recorded, by_kind


def _of_kind(inputs: List[Tuple[tuple, dict]], by_kind: List[Dict[Optional[str], dict]],
             kind: Optional[str]) -> List[Tuple[tuple, dict]]:
    """``inputs`` with the keyword inputs of a block of ``kind``."""
    return [(args, kwargs[kind]) for (args, _), kwargs in zip(inputs, by_kind)]


def _run_block(block: nn.Module, inputs: List[Tuple[tuple, dict]]) -> List[Tuple[tuple, dict]]:
    """Run ``block`` on every recorded input; the same inputs with its output as the new hidden states."""
    out = []
    with torch.no_grad():
        for args, kwargs in inputs:
            y = block(*args, **kwargs)
            hidden = y[0] if isinstance(y, (tuple, list)) else y
            out.append(((hidden, *args[1:]), kwargs))
    return out


def input_factors(model: nn.Module, block: nn.Module, modules: List[str], inputs: List[Tuple[tuple, dict]],
                  masks: List[Optional[torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """``{module: A}`` (``(in+1)²`` with the bias column last): ``Σ a aᵀ / n_m`` over the non-padding token rows of
    ``modules``' inputs while ``block`` runs on ``inputs``, ``n_m`` the rows whose input is not all zero (what
    :meth:`SpamLaplace.factors` gives with ``expand`` rows; an expert's routed tokens), on the model's device in
    float32 (float64 for a float64 model): scores and refits are computed there."""
    mods = dict(model.named_modules())
    sums: Dict[str, torch.Tensor] = {}
    rows: Dict[str, torch.Tensor] = {}  # per module: the rows whose input is not all zero (on its device)
    current: Dict[str, Optional[torch.Tensor]] = {"mask": None}

    def make_hook(name: str, biased: bool):
        def hook(module, args, output):
            x = _at_least_float32(token_layout(module, args[0].detach()))
            x = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() > 3 else x
            mask = current["mask"]
            a = x[mask.to(x.device).bool()] if (mask is not None and x.dim() == 3) else x.reshape(-1, x.shape[-1])
            rows[name] = rows.get(name, 0) + nonzero_rows(a)
            if biased:
                a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
            dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            sums[name] = sums.get(name, 0) + (a.T @ a).to(dtype)
        return hook

    handles = [mods[m].register_forward_hook(make_hook(m, getattr(mods[m], "bias", None) is not None))
               for m in modules]
    try:
        with torch.no_grad():
            for (args, kwargs), mask in zip(inputs, masks):
                current["mask"] = mask
                block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    n = all_reduce_sum(torch.stack([torch.as_tensor(rows.get(m, 0.0), dtype=torch.float64).cpu() for m in modules]))
    return {m: all_reduce_sum(sums[m]).div_(max(float(n[i]), 1.0)) for i, m in enumerate(modules)}


def _block_specs(specs: List[GroupSpec], layer: int) -> List[GroupSpec]:
    return [s for s in specs if s.layer == layer]


def prune_sequential(model: nn.Module, statistics, config: PruningConfig, calibration: Iterable,
                     rescore: bool = True, progress: bool = False, kv_groups_only: bool = False) -> PruningResult:
    """Prune ``model`` in place one block at a time (module docstring); ``config`` must be resolved.

    Args:
        statistics: the trained posterior (``N``, temperature, Fisher type, seed; the curvature diagonal for
            ``opd`` / ``fisher``), or ``None`` (``N`` = the calibration rows, temperature 1).
        calibration: training batches; the first ``config.calibration_batches`` are used by every pass.
        rescore: score each block again on the compressed blocks' outputs and remove its share of the budget by
            that score; ``False`` keeps the budget pass's groups (the all-at-once choice on dense statistics).
        kv_groups_only: grouped-query attention in whole KV groups (the statistics' granularity).
    """
    from tqdm.auto import tqdm

    check_sequential(model, config)
    score = config.score
    kv = bool(kv_groups_only)
    batches = _batches(calibration, config.calibration_batches)
    masks = [_mask_of(b) for b in batches]
    specs0 = group_specs(model, kv)
    family = get_family(model)
    layers = family.layers(model)
    if statistics is None and "diagonal" in score.needs:
        raise ValueError(f"method {score.name!r} needs a posterior (SpamLaplace) with curvature")
    # N only scales every G alike (no effect on choices or refits); the calibration rows without a posterior
    n_data = float(statistics.n_data) if statistics is not None and statistics.n_data else \
        float(sum(len(b["input_ids"]) for b in batches))
    temperature = statistics.temperature if statistics is not None else 1.0
    fisher = statistics.settings["fisher"] if statistics is not None else "mc"
    seed = statistics.settings["seed"] if statistics is not None else 0
    needs_factors = "factors" in score.needs or config.compensate
    G = output_factors(model, consuming_modules(specs0), batches, n_data, fisher, seed) if needs_factors else {}
    diagonal = statistics.diagonal() if "diagonal" in score.needs else None
    prior = statistics.prior if statistics is not None else None

    def paired(A: Dict[str, torch.Tensor]) -> Dict[str, tuple]:
        """``{module: (A, G)}``: a block's input factors with the output factors, in the input factors' dtype."""
        return {m: (A[m], G[m].to(A[m].dtype)) for m in A}

    def block_scores(specs: List[GroupSpec], A: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        factors = paired(A) if "factors" in score.needs else None
        stats = Statistics(prior=prior, temperature=temperature, diagonal=diagonal, factors=factors)
        return score(model, specs, stats, seed=config.prune_seed)

    # pass 2: every block scored on dense inputs, one block's input factors at a time; one global selection
    scores: Dict[str, torch.Tensor] = {}
    kinds = layer_kinds(model)
    inputs, by_kind = block_inputs(model, batches)
    for layer in tqdm(range(len(layers)), desc="sequential: budget", disable=not progress):
        specs = _block_specs(specs0, layer)
        inputs = _of_kind(inputs, by_kind, kinds[layer])
        with _editable(model, layers, layer, changed=False) as block:  # real weights while it is scored
            if specs:
                A = input_factors(model, block, consuming_modules(specs), inputs, masks) \
                    if "factors" in score.needs else {}
                scores.update(block_scores(specs, A))
                del A
            inputs = _run_block(block, inputs)
    del inputs, by_kind
    global_selection = select_groups(model, specs0, scores, config.sparsity, budget=config.budget,
                                     seq_len=config.flops_seq_len, min_keep=config.min_keep,
                                     report_fields=family.report_fields, round_to=config.round_to)
    global_plan = broadcast_object(PruningPlan(selection=global_selection, method=score.name,
                                               counts={s.name: s.count for s in specs0},
                                               scores={k: v.tolist() for k, v in scores.items()},
                                               kv_groups_only=kv, seq_len=config.flops_seq_len))
    removed_by_layer = _removed_cost(model, specs0, global_plan.keep, config)
    total0 = prunable_cost(model, specs0, config.budget, config.flops_seq_len)

    # pass 3: compress block by block on the outputs of the compressed blocks before it
    kept: Dict[str, torch.Tensor] = {}
    compensated: Dict[str, int] = {}
    inputs, by_kind = block_inputs(model, batches)
    for layer in tqdm(range(len(layers)), desc="sequential: compress", disable=not progress):
        specs = _block_specs(specs0, layer)
        inputs = _of_kind(inputs, by_kind, kinds[layer])
        cut = bool(specs) and removed_by_layer.get(layer, 0.0) > 0
        # real weights to refit and cut; an offloaded or sharded block goes back so after
        with _editable(model, layers, layer, changed=cut) as block:
            if cut:
                A = input_factors(model, block, consuming_modules(specs), inputs, masks) if needs_factors else {}
                keep = {s.name: global_plan.keep[s.name] for s in specs}
                if rescore:
                    keep = _block_keep(model, specs, block_scores(specs, A), removed_by_layer[layer], config)
                keep = broadcast_object(keep)
                if config.compensate:
                    compensated.update(compensate_groups(model, specs, keep, paired(A)))
                del A
                prune_groups(model, keep, kv_groups_only=kv)
                block = layers[layer]  # surgery may replace modules inside it
                kept.update(keep)
                logger.info(f"sequential: block {layer}: " + ", ".join(
                    f"{s.kind} {int(keep[s.name].numel())}/{s.count} kept" for s in specs))
            inputs = _run_block(block, inputs)
    del inputs, by_kind
    if not is_sharded_model(model):  # a sharded block was made the same everywhere before it was sharded again
        broadcast_parameters(model)
    for s in specs0:
        kept.setdefault(s.name, torch.arange(s.count))
    total = prunable_cost(model, group_specs(model, kv), config.budget, config.flops_seq_len)
    selection = kept_selection(specs0, kept, config.budget, config.sparsity, total0, total)
    return PruningResult(plans=[global_plan], compensated=[compensated] if config.compensate else [],
                         selection=selection, config=config)


def _removed_cost(model: nn.Module, specs: List[GroupSpec], keep: Dict[str, torch.Tensor],
                  config: PruningConfig) -> Dict[int, float]:
    """``{layer: cost of the groups the global selection removes there}`` (the per-block budgets)."""
    out: Dict[int, float] = {}
    for s in specs:
        out[s.layer] = out.get(s.layer, 0.0) + removed_cost(model, s, keep[s.name], config.budget, config.flops_seq_len)
    return out


def _block_keep(model: nn.Module, specs: List[GroupSpec], scores: Dict[str, torch.Tensor], removed: float,
                config: PruningConfig) -> Dict[str, torch.Tensor]:
    """The groups of one block to keep when ``removed`` of its prunable cost goes, chosen by ``scores``
    (:func:`select_groups` within the block, GQA constraints and ``min_keep`` included)."""
    block_total = prunable_cost(model, specs, config.budget, config.flops_seq_len)
    fraction = min(removed / block_total, 1.0 - 1e-9)
    selection = select_groups(model, specs, scores, fraction, budget=config.budget, seq_len=config.flops_seq_len,
                              min_keep=config.min_keep, report_fields=get_family(model).report_fields,
                              round_to=config.round_to)
    return {s.name: selection.keep[s.name] for s in specs}
