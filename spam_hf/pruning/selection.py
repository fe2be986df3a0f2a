"""Choose the groups to remove under a global parameter or FLOP budget, and report the result.

Groups are removed in increasing order of ``score / cost`` (cost = parameters, or FLOPs at a
sequence length), across all layers and kinds, until the removed cost reaches
``sparsity × total``, where *total* is the cost of every prunable module (all of Q/K/V/O and the
MLP weights and biases, including the O / down biases that no group owns). Query heads of
grouped-query attention depend on their KV head: a KV head is removed together with its last query
head, so every kept KV head keeps at least one (:func:`_greedy_drop`). An expert's neurons depend on the
expert (its router row) in the same way.

With ``uniform_kinds`` (``--uniform``) only groups of those kinds go, the same number from every layer, so the
export keeps one width per kind and loads as a stock checkpoint (:func:`_uniform_drop`).

With ``round_to`` (``--round-to``) every layer keeps a multiple of that many neurons (matmul-friendly widths):
each layer rounds down or up, whichever the scores prefer, with the budget kept (:func:`_round_drop`).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn
from transformers.utils import logging

from ..architectures.base import ArchitectureFamily, GroupSpec, in_out_features
from ..architectures.lora import adapted_module, base_name
from ..checks import check_choice, check_round_to, validate_sparsity
from ..choices import BUDGETS

logger = logging.get_logger("spam_hf")

DEFAULT_REPORT_FIELDS = ArchitectureFamily.report_fields


@dataclass
class LayerReport:
    """Groups kept / in total per report field (the family's ``report_fields``: ``heads``, ``kv_heads``,
    ``neurons``, ``ranks``) of one layer; for LoRA ``layer`` is the adapted module's index, ``module`` its name.
    With grouped-query attention ``heads`` counts query heads and ``kv_heads`` KV heads."""

    layer: int
    kept: Dict[str, int] = field(default_factory=dict)
    total: Dict[str, int] = field(default_factory=dict)
    module: str = ""

    def add(self, field_name: str, kept: int, total: int) -> None:
        """Count one spec's groups under ``field_name`` (summed: a mixture-of-experts layer has one neuron spec per
        expert)."""
        self.kept[field_name] = self.kept.get(field_name, 0) + kept
        self.total[field_name] = self.total.get(field_name, 0) + total

    def to_dict(self, fields: Tuple[str, ...] = tuple(DEFAULT_REPORT_FIELDS.values())) -> dict:
        """Flat ``{"layer", "module", "<field>_kept", "<field>_total"}`` (0 for fields this layer lacks)."""
        out: Dict[str, object] = {"layer": self.layer}
        for f in dict.fromkeys([*fields, *self.total]):
            out[f"{f}_kept"], out[f"{f}_total"] = self.kept.get(f, 0), self.total.get(f, 0)
        out["module"] = self.module
        return out


@dataclass
class Selection:
    """Which groups to keep (``keep[spec.name]`` sorted indices) and the budget bookkeeping."""

    keep: Dict[str, torch.Tensor]
    budget: str
    sparsity_target: float
    total_cost: float
    removed_cost: float
    layers: List[LayerReport] = field(default_factory=list)
    dropped_blocks: List[int] = field(default_factory=list)  # whole blocks removed after the cut (original indices)

    @property
    def achieved(self) -> float:
        return self.removed_cost / self.total_cost if self.total_cost else 0.0

    def to_dict(self) -> dict:
        return {
            "budget": self.budget,
            "sparsity_target": self.sparsity_target,
            "sparsity_achieved": self.achieved,
            "total_cost": self.total_cost,
            "removed_cost": self.removed_cost,
            "keep": {k: v.tolist() for k, v in self.keep.items()},
            "layers": [layer.to_dict() for layer in self.layers],
            **({"dropped_blocks": list(self.dropped_blocks)} if self.dropped_blocks else {}),
        }


def removed_cost(model: nn.Module, spec: GroupSpec, kept, budget: str, seq_len: int) -> float:
    """The cost (parameters, or FLOPs at ``seq_len``) of the groups of ``spec`` not in ``kept`` (indices)."""
    dropped = sorted(set(range(spec.count)) - set(torch.as_tensor(kept).tolist()))
    return float(group_costs(model, spec, budget, seq_len)[dropped].sum()) if dropped else 0.0


def kept_selection(specs: List[GroupSpec], kept: Dict[str, torch.Tensor], budget: str, target: float,
                   total_before: float, total_after: float) -> Selection:
    """A :class:`Selection` of the groups of ``specs`` (the model before pruning) that ``kept`` names (original
    indices per spec), for work that removed groups in several steps (rounds, blocks): ``total_before`` /
    ``total_after`` are the prunable costs before and after, the per-layer report counts what is left."""
    layers: Dict[int, LayerReport] = {}
    for s in specs:
        rep = layers.setdefault(s.layer, LayerReport(layer=s.layer))
        rep.add(DEFAULT_REPORT_FIELDS[s.kind], int(kept[s.name].numel()), s.count)
    return Selection(keep=dict(kept), budget=budget, sparsity_target=float(target), total_cost=total_before,
                     removed_cost=total_before - total_after, layers=[layers[k] for k in sorted(layers)])


def prunable_cost(model: nn.Module, specs: List[GroupSpec], budget: str, seq_len: int) -> float:
    """Total parameters (or FLOPs per sequence) of every module that some group touches (FLOPs: on its spec's
    ``token_share`` of the tokens)."""
    mods = dict(model.named_modules())
    share = {m: s.token_share for s in specs for m in s.modules}
    names = list(share)
    if budget == "params":
        return float(sum(p.numel() for m in names for p in mods[m].parameters(recurse=False)))
    weights = sum(in_out_features(mods[m])[0] * in_out_features(mods[m])[1] * share[m] for m in names)
    attn = sum(4.0 * seq_len**2 * s.attn_dim * s.count for s in specs)
    return float(2.0 * seq_len * weights + attn)


def group_costs(model: nn.Module, spec: GroupSpec, budget: str, seq_len: int) -> torch.Tensor:
    if budget == "params":
        return spec.params_per_group(model).to(torch.float64)
    return spec.flops_per_group(model, seq_len)


def removable_fraction(model: nn.Module, specs: List[GroupSpec], budget: str = "params", seq_len: int = 128,
                       min_keep: float = 0.0, uniform_kinds: Optional[Sequence[str]] = None) -> float:
    """The largest fraction of the prunable cost that removing groups can reach: every group but the
    ``ceil(min_keep · count)`` each spec keeps (biases no group owns always stay); with ``uniform_kinds``, only
    groups of those kinds, and every spec keeps at least one."""
    total = prunable_cost(model, specs, budget, seq_len)
    removable = 0.0
    for s in specs:
        if uniform_kinds is not None and s.kind not in uniform_kinds:
            continue
        stay = max(math.ceil(min_keep * s.count), 1 if uniform_kinds is not None else 0)
        cost = group_costs(model, s, budget, seq_len).sort().values
        removable += float(cost[: max(s.count - stay, 0)].sum())
    return removable / total if total else 0.0


def check_reachable(model: nn.Module, specs: List[GroupSpec], sparsity: float, budget: str = "params",
                    seq_len: int = 128, min_keep: float = 0.0, uniform_kinds: Optional[Sequence[str]] = None) -> None:
    """Before any work: a ``ValueError`` when ``sparsity`` would remove every head and neuron (nothing left
    to prune or to place priors on), or, with ``uniform_kinds``, more than those kinds hold; a warning when
    ``min_keep`` caps the removal below the target."""
    reachable = removable_fraction(model, specs, budget, seq_len, 0.0, uniform_kinds)
    if uniform_kinds is not None and sparsity >= reachable - 1e-12:
        raise ValueError(f"sparsity {sparsity:g} is out of reach of --uniform here: it removes only "
                         f"{' and '.join(k.replace('_', ' ') + 's' for k in uniform_kinds)} (what a stock checkpoint "
                         f"of this family can shrink), at most {reachable:.1%} of the prunable {budget}; choose less "
                         "or drop --uniform")
    if sparsity >= reachable - 1e-12:
        raise ValueError(f"sparsity {sparsity:g} would remove every head and neuron: at most {reachable:.1%} of the "
                         f"prunable {budget} can go (the biases of the output projections stay); choose less")
    if min_keep:
        capped = removable_fraction(model, specs, budget, seq_len, min_keep, uniform_kinds)
        if sparsity > capped:
            logger.warning(f"--min-keep {min_keep:g} caps the removal at {capped:.1%} of the prunable {budget}, "
                           f"below the target {sparsity:.1%}")


def select_groups(model: nn.Module, specs: List[GroupSpec], scores: Dict[str, torch.Tensor], sparsity: float,
                  budget: str = "params", seq_len: int = 128, min_keep: float = 0.0,
                  report_fields: Optional[Dict[str, str]] = None,
                  floors: Optional[Dict[str, int]] = None,
                  uniform_kinds: Optional[Sequence[str]] = None, round_to: int = 1) -> Selection:
    """Greedy global selection: cheapest ``score / cost`` first until ``sparsity`` of the cost is removed.

    ``min_keep`` in [0, 1): every spec (the heads, or the neurons, of one layer) keeps at least
    ``ceil(min_keep · count)`` groups; groups at that floor are passed over. If the floors make the
    target unreachable, the selection stops short and ``achieved`` says so. ``floors`` (``{spec name: n}``)
    raises a spec's floor to ``n`` groups (pruning in rounds: the floor of the *original* count, not a fraction
    of what earlier rounds left). ``report_fields`` names each group kind in the per-layer report (default:
    :data:`DEFAULT_REPORT_FIELDS`). ``uniform_kinds``: remove only groups of these kinds, the same number from
    every spec of a kind (:func:`_uniform_drop`) instead of the greedy global choice. ``round_to``: every spec of
    neurons keeps a multiple of ``round_to`` groups, or all of them (:func:`_round_drop`; with ``uniform_kinds``
    only such counts are searched).
    """
    validate_sparsity(sparsity)
    check_round_to(round_to)
    if not 0.0 <= min_keep < 1.0:
        raise ValueError(f"min_keep must be in [0, 1), got {min_keep}")
    check_choice("budget", budget, BUDGETS)
    missing = [s.name for s in specs if s.name not in scores]
    if missing:
        raise ValueError(f"no scores for group spec(s) {missing[:3]}")
    total = prunable_cost(model, specs, budget, seq_len)
    score, cost = [], []
    for s in specs:
        sc = scores[s.name].to(torch.float64)
        if sc.shape != (s.count,):
            raise ValueError(f"scores of {s.name} have shape {tuple(sc.shape)}, expected ({s.count},)")
        if not torch.isfinite(sc).all():
            raise ValueError(f"scores of {s.name} contain NaN or inf")
        score.append(sc)
        cost.append(group_costs(model, s, budget, seq_len))
    floor = [min(s.count, max(math.ceil(min_keep * s.count), (floors or {}).get(s.name, 0))) for s in specs]
    if uniform_kinds is not None:
        drop, removed = _uniform_drop(specs, score, cost, sparsity * total, floor, uniform_kinds, round_to)
    else:
        drop, removed = _greedy_drop(specs, score, cost, sparsity * total, floor)
        if round_to > 1:
            drop, removed = _round_drop(specs, score, cost, drop, removed, sparsity * total, floor, round_to)
    keep = {s.name: torch.tensor(sorted(set(range(s.count)) - drop[si]), dtype=torch.long)
            for si, s in enumerate(specs)}
    names = {**DEFAULT_REPORT_FIELDS, **(report_fields or {})}
    layers: Dict[int, LayerReport] = {}
    for s in specs:
        rep = layers.setdefault(s.layer, LayerReport(layer=s.layer))
        rep.add(names[s.kind], int(keep[s.name].numel()), s.count)
        if s.kind == "lora_rank":
            rep.module = base_name(adapted_module(s))
    return Selection(keep=keep, budget=budget, sparsity_target=float(sparsity), total_cost=total,
                     removed_cost=removed, layers=[layers[k] for k in sorted(layers)])


def _greedy_drop(specs: List[GroupSpec], scores: List[torch.Tensor], cost: List[torch.Tensor], target: float,
                 floor: List[int]) -> Tuple[List[Set[int]], float]:
    """Greedy removal, cheapest ``score / cost`` first, until ``target`` cost is removed.

    Returns ``(drop, removed)``: the removed groups per spec (``drop[spec index]``) and their total cost.

    A group of a spec with a ``parent`` (a query head) is removed alone only while its parent (KV
    head) keeps another child; the parent itself is a candidate together with all its remaining
    children, at ``(Σ scores) / (Σ costs)`` of that bundle (re-queued whenever a child leaves).
    Specs at their ``floor`` (groups kept) are passed over.
    """
    index = {s.name: si for si, s in enumerate(specs)}
    ratio = [sc / c.clamp_min(1e-12) for sc, c in zip(scores, cost)]
    drop: List[Set[int]] = [set() for _ in specs]
    children: Dict[Tuple[int, int], Set[Tuple[int, int]]] = {}  # (parent spec, group) -> {(spec, group)}
    for si, s in enumerate(specs):
        if s.parent:
            for g, p in enumerate(s.parent_index.tolist()):
                children.setdefault((index[s.parent], p), set()).add((si, g))
    version: Dict[Tuple[int, int], int] = {key: 0 for key in children}

    def bundle(key):
        members = [key, *children[key]]
        c = sum(float(cost[si][g]) for si, g in members)
        return sum(float(scores[si][g]) for si, g in members) / max(c, 1e-12)

    heap = [(float(ratio[si][g]), si, g, -1) for si in range(len(specs)) for g in range(specs[si].count)
            if (si, g) not in children]
    heap += [(bundle(key), key[0], key[1], 0) for key in children]
    heapq.heapify(heap)

    def room(si: int, n: int) -> bool:
        return specs[si].count - len(drop[si]) - n >= floor[si]

    removed = 0.0
    while heap and removed < target:
        _, si, g, ver = heapq.heappop(heap)
        if ver >= 0:  # a parent with its remaining children
            key = (si, g)
            if ver != version[key] or g in drop[si]:
                continue
            kids = children[key]
            by_spec: Dict[int, int] = {}
            for ci, _ in kids:
                by_spec[ci] = by_spec.get(ci, 0) + 1
            if not room(si, 1) or not all(room(ci, n) for ci, n in by_spec.items()):
                continue
            for ci, cg in kids:
                drop[ci].add(cg)
                removed += float(cost[ci][cg])
            drop[si].add(g)
            removed += float(cost[si][g])
            continue
        if g in drop[si] or not room(si, 1):
            continue
        s = specs[si]
        if s.parent:
            key = (index[s.parent], int(s.parent_index[g]))
            if len(children[key]) <= 1:  # the last child leaves only with its parent
                continue
            children[key].discard((si, g))
            version[key] += 1
            heapq.heappush(heap, (bundle(key), key[0], key[1], version[key]))
        drop[si].add(g)
        removed += float(cost[si][g])
    return drop, removed


def check_uniform(specs: List[GroupSpec], kinds: Sequence[str]) -> Dict[str, List[int]]:
    """``{kind: [spec index, ...]}`` of the specs uniform pruning shrinks; a one-line ``ValueError`` when it cannot:
    query heads that hang off KV heads (uneven query heads per KV head are not stock), layers that already differ,
    or no group of those kinds. An expert's neurons are their own kind here (``"neuron of expert"``): a stock
    mixture of experts has one width for its experts and another for its dense MLP layers."""
    parent_kind = {s.name: s.kind for s in specs}
    by_kind: Dict[str, List[int]] = {}
    for si, s in enumerate(specs):
        if s.kind in kinds:
            if s.parent and s.kind == "head":
                raise ValueError("--uniform removes whole KV groups of grouped-query attention (every layer keeps the "
                                 "same query heads per KV head): train and prune with --kv-groups-only True "
                                 "(kv_groups_only=True)")
            key = f"{s.kind} of {parent_kind[s.parent]}" if s.parent else s.kind
            by_kind.setdefault(key, []).append(si)
    if not by_kind:
        raise ValueError(f"--uniform removes {', '.join(kinds)}; this model has none")
    for kind, members in by_kind.items():
        counts = sorted({specs[si].count for si in members})
        if len(counts) != 1:
            what = kind.replace(" of ", "s of each ") if " of " in kind else kind + "s"
            raise ValueError(f"--uniform needs the same number of {what} in every layer, this model has {counts}: it "
                             "was pruned unevenly before; prune the unpruned model instead")
    return by_kind


def _uniform_drop(specs: List[GroupSpec], scores: List[torch.Tensor], cost: List[torch.Tensor], target: float,
                  floor: List[int], kinds: Sequence[str], round_to: int = 1) -> Tuple[List[Set[int]], float]:
    """Equal counts per layer: ``r_K`` groups leave every spec of kind ``K`` (in each spec its ``r_K`` lowest
    scores), the other kinds stay whole. The counts minimise the summed scores removed,
    ``D(r) = Σ_K Σ_{specs of K} Σ_{i < r_K} score_(i)``, subject to the removed cost ``C(r) ≥ target`` (the least
    total damage with equal counts under the global budget); exact: every count of all kinds but the one with the
    most groups, and for that one the smallest count that meets the target (``C`` grows with it). When no counts
    meet it, the counts that remove the most. Every spec keeps at least one group and its ``floor``. With
    ``round_to``, neuron counts are searched only where the neurons kept are a multiple of it (or all of them).

    Returns ``(drop, removed)`` as :func:`_greedy_drop`.
    """
    tables = {}  # kind -> (members, per-member ascending order, D by count, C by count)
    for kind, members in check_uniform(specs, kinds).items():
        order = [torch.argsort(scores[si], stable=True) for si in members]
        most = max(specs[members[0]].count - max([1] + [floor[si] for si in members]), 0)
        damage, removed = [0.0], [0.0]
        for r in range(most):
            damage.append(damage[-1] + sum(float(scores[si][o[r]]) for si, o in zip(members, order)))
            removed.append(removed[-1] + sum(float(cost[si][o[r]]) for si, o in zip(members, order)))
        count = specs[members[0]].count
        allowed = [r for r in range(len(damage))
                   if specs[members[0]].kind != "neuron" or r == 0 or (count - r) % round_to == 0]
        tables[kind] = (members, order, damage, removed, allowed)
    names = sorted(tables, key=lambda k: len(tables[k][4]))  # the kind with the most counts is searched by bisection
    last = tables[names[-1]]
    last_costs = [last[3][r] for r in last[4]]
    best_key, best = None, None
    for head in itertools.product(*(tables[k][4] for k in names[:-1])):
        part_damage = sum(tables[k][2][r] for k, r in zip(names, head))
        part_cost = sum(tables[k][3][r] for k, r in zip(names, head))
        i = bisect.bisect_left(last_costs, target - part_cost)
        feasible = i < len(last_costs)
        r = last[4][min(i, len(last_costs) - 1)]
        key = (0, part_damage + last[2][r]) if feasible else (1, -(part_cost + last[3][r]))
        if best_key is None or key < best_key:
            best_key, best = key, (*head, r)
    drop: List[Set[int]] = [set() for _ in specs]
    removed = 0.0
    for kind, r in zip(names, best):
        members, order, _, cumulative, _ = tables[kind]
        for si, o in zip(members, order):
            drop[si] = set(o[:r].tolist())
        removed += cumulative[r]
    return drop, removed


def _round_drop(specs: List[GroupSpec], scores: List[torch.Tensor], cost: List[torch.Tensor], drop: List[Set[int]],
                removed: float, target: float, floor: List[int], round_to: int,
                kinds: Sequence[str] = ("neuron",)) -> Tuple[List[Set[int]], float]:
    """Round every spec of ``kinds`` to a multiple of ``round_to`` groups kept (or all of them), keeping the budget.

    A spec keeping ``k`` groups can go *down* to ``⌊k/m⌋·m`` (its lowest-scoring kept groups leave: damage
    ``+D↓``, cost removed ``+C↓``; not below its ``floor``) or *up* to ``min(⌈k/m⌉·m, count)`` (its highest-scoring
    removed groups return: ``−D↑``, ``−C↑``). All start down, which keeps the budget; then specs go up in order of
    damage saved per cost given back, ``(D↓ + D↑) / (C↓ + C↑)``, while the removed cost stays at least
    ``min(target, removed)`` (a greedy 0/1 knapsack). Heads are not rounded: each is ``head_dim`` wide already.

    Returns ``(drop, removed)`` as :func:`_greedy_drop`.
    """
    drop = [set(d) for d in drop]
    need = min(target, removed)
    options = []  # (spec index, groups that leave going down, groups that return going up)
    for si, s in enumerate(specs):
        kept = s.count - len(drop[si])
        if s.kind not in kinds or kept % round_to == 0 or kept == s.count:
            continue
        kept_by_score = sorted(set(range(s.count)) - drop[si], key=lambda g: (float(scores[si][g]), g))
        removed_by_score = sorted(drop[si], key=lambda g: (-float(scores[si][g]), g))
        down = kept % round_to
        up = min(round_to - down, s.count - kept)
        can_down = kept - down >= floor[si]
        options.append((si, kept_by_score[:down] if can_down else None, removed_by_score[:up]))

    def total(groups, si, values) -> float:
        return sum(float(values[si][g]) for g in groups)

    for si, leave, _ in options:  # everything down first (forced up where the floor forbids down)
        if leave is not None:
            drop[si].update(leave)
            removed += total(leave, si, cost)
    flips = []
    for si, leave, back in options:
        if leave is None:
            drop[si].difference_update(back)
            removed -= total(back, si, cost)
            continue
        given_back = total(leave, si, cost) + total(back, si, cost)
        flips.append(((total(leave, si, scores) + total(back, si, scores)) / max(given_back, 1e-12), si, leave, back,
                      given_back))
    for _, si, leave, back, given_back in sorted(flips, key=lambda f: -f[0]):
        if removed - given_back >= need - 1e-9 * max(abs(need), 1.0):
            drop[si].difference_update(leave)
            drop[si].difference_update(back)
            removed -= given_back
    return drop, removed


def plot_selection(selection: Selection, path: str, title: str = "") -> None:
    """PNG: fraction of heads and neurons kept per layer (LoRA: of the ranks per adapted module)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r.to_dict() for r in selection.layers]
    layers = [r["layer"] for r in rows]

    def frac(r: dict, f: str) -> float:
        return r[f"{f}_kept"] / r[f"{f}_total"] if r[f"{f}_total"] else 0.0

    fig, ax = plt.subplots(figsize=(6, 3.2))
    if any(r["ranks_total"] for r in rows):
        ax.bar(layers, [frac(r, "ranks") for r in rows], 0.8, label="LoRA ranks kept")
        ax.set_xlabel("adapted module")
    else:
        w = 0.4
        ax.bar([x - w / 2 for x in layers], [frac(r, "heads") for r in rows], w, label="heads kept")
        ax.bar([x + w / 2 for x in layers], [frac(r, "neurons") for r in rows], w, label="neurons kept")
        ax.set_xlabel("layer")
    ax.set_ylabel("fraction kept")
    ax.set_ylim(0, 1.05)
    ax.set_title(title or f"{selection.budget} removed: {selection.achieved:.1%}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
