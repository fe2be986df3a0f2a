"""The pruning step as two verbs: :func:`plan` (decide, model untouched) and :func:`apply` (surgery).

    p = plan(model, posterior, sparsity=0.7)      # scores -> global selection -> per-layer report
    p = plan(model, posterior, config=PruningConfig(sparsity=0.7, method="opd"))
    p.save("plan.json"); p = PruningPlan.load("plan.json")
    apply(model, p)                                 # heads / neurons / LoRA ranks removed for real

A plan records everything needed to redo the surgery on another copy of the same model: the group
specs it was made for (names and counts), which groups each keeps, the scores, the budget
bookkeeping and the per-layer report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from ..architectures import get_family, group_specs, is_peft_model
from ..architectures.base import GroupSpec
from ..distributed import broadcast_object
from .config import PruningConfig
from .scores import Statistics, get_score, resolve_method
from .selection import LayerReport, Selection, select_groups
from .surgery import prune_groups


@dataclass
class PruningPlan:
    """What :func:`apply` removes, and why.

    Attributes:
        selection: kept groups per spec, budget bookkeeping, per-layer report.
        method: the registered score that made it (:mod:`spam_hf.pruning.scores`).
        counts: ``{spec name: groups before pruning}`` (checked against the model by :func:`apply`).
        scores: ``{spec name: [score per group]}``.
        kv_groups_only: the group granularity of grouped-query attention the specs were made with.
        seq_len: sequence length of FLOP budgets and reports.
    """

    selection: Selection
    method: str
    counts: Dict[str, int]
    scores: Dict[str, List[float]] = field(default_factory=dict)
    kv_groups_only: bool = False
    seq_len: int = 128

    @property
    def keep(self) -> Dict[str, torch.Tensor]:
        return self.selection.keep

    @property
    def achieved(self) -> float:
        return self.selection.achieved

    def to_dict(self) -> dict:
        return {"method": self.method, "kv_groups_only": self.kv_groups_only, "seq_len": self.seq_len,
                "counts": dict(self.counts), "scores": {k: list(v) for k, v in self.scores.items()},
                **self.selection.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "PruningPlan":
        layers = []
        for row in d.get("layers", []):
            fields = sorted({k[: -len("_kept")] for k in row if k.endswith("_kept")})
            layers.append(LayerReport(layer=int(row["layer"]), module=row.get("module", ""),
                                      kept={f: int(row[f"{f}_kept"]) for f in fields if row.get(f"{f}_total")},
                                      total={f: int(row[f"{f}_total"]) for f in fields if row.get(f"{f}_total")}))
        selection = Selection(keep={k: torch.tensor(v, dtype=torch.long) for k, v in d["keep"].items()},
                              budget=d["budget"], sparsity_target=float(d["sparsity_target"]),
                              total_cost=float(d["total_cost"]), removed_cost=float(d["removed_cost"]), layers=layers)
        return cls(selection=selection, method=d["method"], counts={k: int(v) for k, v in d["counts"].items()},
                   scores={k: [float(x) for x in v] for k, v in d.get("scores", {}).items()},
                   kv_groups_only=bool(d.get("kv_groups_only", False)), seq_len=int(d.get("seq_len", 128)))

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str) -> "PruningPlan":
        with open(path) as f:
            return cls.from_dict(json.load(f))


@dataclass
class PruningResult:
    """What :func:`spam_hf.pruning.prune` (and :func:`~spam_hf.pruning.prune_in_rounds`) did.

    Attributes:
        plans: one :class:`PruningPlan` per round (one for a one-shot prune), each of the model as it was then.
        compensated: per round, ``{module: columns refitted}`` (empty without compensation).
        selection: all rounds as one selection of the *original* model's groups (for reports); its ``achieved``
            (also ``result.achieved``) is the fraction of the original prunable cost removed.
        config: the resolved :class:`~spam_hf.pruning.PruningConfig` it ran with.
        dropped_blocks: whole blocks removed after the cut (``drop_blocks``; original indices), and
        layer_map: ``{old index: new index}`` of the blocks kept (empty when none was dropped).
    """

    plans: List[PruningPlan]
    compensated: List[dict]
    selection: Selection
    config: Optional[PruningConfig] = None
    dropped_blocks: List[int] = field(default_factory=list)
    layer_map: Dict[int, int] = field(default_factory=dict)

    @property
    def achieved(self) -> float:
        return self.selection.achieved


def plan(model: nn.Module, posterior=None, sparsity: Optional[float] = None, *,
         config: Optional[PruningConfig] = None, specs: Optional[List[GroupSpec]] = None,
         scores: Optional[Dict[str, torch.Tensor]] = None, floors: Optional[Dict[str, int]] = None,
         kv_groups_only: Optional[bool] = None, **options) -> PruningPlan:
    """Score every group of ``model`` and choose which to remove in one shot; the model is not changed.

    Args:
        posterior: a :class:`~spam_hf.posterior.SpamLaplace` (its specs, priors, curvature and temperature): the
            statistics the score reads (:attr:`Score.needs <spam_hf.pruning.scores.Score>`); ``None`` for scores
            that read none (``magnitude``, ``random``). Calibration statistics (``damage*``) come from its live
            sums, e.g. after :meth:`SpamLaplace.collect`.
        sparsity: replaces the config's ``sparsity``.
        config: the :class:`~spam_hf.pruning.PruningConfig` (default: its defaults), with ``sparsity`` and any of
            its fields in ``options`` replaced (:meth:`PruningConfig.build`). Only the choice of groups is made
            here: ``rounds`` and ``compensate`` are :func:`spam_hf.pruning.prune`'s.
        specs: the group specs (default: the posterior's, else the family's for ``model``).
        scores: precomputed ``{spec name: FloatTensor[G]}`` (a score spam-hf does not compute, e.g. a peer's);
            ``method`` (any string) then only names them in the plan.
        floors: ``{spec name: n}``, at least ``n`` groups kept in that spec (on top of ``min_keep``).
        kv_groups_only: grouped-query attention in whole KV groups (``None``: the posterior's, else ``False``).
        **options: fields of :class:`~spam_hf.pruning.PruningConfig` to replace.

    With several processes (``torch.distributed``) every process must call it; all return the main
    process's plan.
    """
    label = options.pop("method", None) if scores is not None else None  # a score from outside the registry
    config = PruningConfig.build(sparsity, config, **options)
    method = label or resolve_method(config.method, is_peft_model(model))
    if kv_groups_only is None:
        kv_groups_only = posterior.kv_groups_only if posterior is not None else False
    if specs is None:
        specs = posterior.specs if posterior is not None else group_specs(model, kv_groups_only=kv_groups_only)
    if scores is None:
        score = get_score(method)
        if score.needs_posterior and posterior is None:
            raise ValueError(f"method {method!r} needs a posterior (SpamLaplace) with curvature")
        scores = score(model, specs, Statistics.of(posterior, score.needs), seed=config.prune_seed)
    family = get_family(model)
    selection = select_groups(model, specs, scores, config.sparsity, budget=config.budget, seq_len=config.flops_seq_len,
                              min_keep=config.min_keep, report_fields=family.report_fields, floors=floors,
                              uniform_kinds=family.uniform_kinds if config.uniform else None, round_to=config.round_to)
    # data parallel: every process scores, the main process's plan is the one all of them apply
    return broadcast_object(PruningPlan(selection=selection, method=method, counts={s.name: s.count for s in specs},
                                        scores={k: v.tolist() for k, v in scores.items()},
                                        kv_groups_only=kv_groups_only, seq_len=config.flops_seq_len))


def apply(model: nn.Module, pruning_plan: PruningPlan) -> nn.Module:
    """Remove the groups ``pruning_plan`` drops from ``model``, in place; returns ``model``.

    Raises:
        ValueError: when the model's groups are not those the plan was made for.
    """
    # the family's specs, unvalidated: a peft model's base (LoRA layers in place) is a valid target too
    specs = get_family(model).group_specs(model, kv_groups_only=pruning_plan.kv_groups_only)
    have = {s.name: s.count for s in specs}
    if have != pruning_plan.counts:
        diff = sorted(set(have.items()) ^ set(pruning_plan.counts.items()))[:3]
        raise ValueError(f"this plan was made for other groups than the model has (e.g. {diff}); plan again "
                         "on this model")
    for name, kept in pruning_plan.keep.items():
        kept = torch.as_tensor(kept)
        if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= have[name]):
            raise ValueError(f"plan keeps group indices of {name} outside [0, {have[name]})")
    return prune_groups(model, pruning_plan.keep, kv_groups_only=pruning_plan.kv_groups_only)
