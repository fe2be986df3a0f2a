"""The pruning step as two verbs: :func:`plan` (decide, model untouched) and :func:`apply` (surgery).

    p = plan(model, posterior, sparsity=0.7)      # scores -> global selection -> per-layer report
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

from ..architectures import get_family, group_specs
from ..architectures.base import GroupSpec
from ..checks import check_choice
from ..distributed import broadcast_object
from .damage import DAMAGE_METHODS, EXACT_METHODS, SCORE_METHODS, group_scores
from .selection import LayerReport, Selection, select_groups
from .surgery import prune_groups

CURVATURE_METHODS = ("opd", "fisher")  # the diagonal of the curvature
POSTERIOR_METHODS = CURVATURE_METHODS + DAMAGE_METHODS + EXACT_METHODS  # need a posterior


@dataclass
class PruningPlan:
    """What :func:`apply` removes, and why.

    Attributes:
        selection: kept groups per spec, budget bookkeeping, per-layer report.
        method: the score (``opd``, ``fisher``, ``magnitude``, ``random``).
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


def plan(model: nn.Module, posterior=None, sparsity: float = 0.5, method: str = "opd", budget: str = "params",
         seq_len: int = 128, min_keep: float = 0.0, seed: int = 0, kv_groups_only: Optional[bool] = None,
         specs: Optional[List[GroupSpec]] = None, scores: Optional[Dict[str, torch.Tensor]] = None,
         floors: Optional[Dict[str, int]] = None) -> PruningPlan:
    """Score every group of ``model`` and choose which to remove; the model is not changed.

    Args:
        posterior: a :class:`~spam_hf.posterior.SpamLaplace` (its specs, priors, curvature and
            temperature); needed by ``opd`` and ``fisher`` (curvature diagonal) and by ``damage`` /
            ``damage-out`` (live KFAC factors, e.g. after :meth:`SpamLaplace.collect`), optional for
            ``magnitude`` / ``random``.
        sparsity: fraction in (0, 1) of the prunable ``budget`` (``params`` or ``flops``) to remove.
        method: one of :data:`~spam_hf.pruning.damage.SCORE_METHODS`.
        seq_len: sequence length of FLOP budgets.
        min_keep: every layer keeps at least this fraction of its heads and of its neurons.
        seed: seed of the ``random`` baseline.
        kv_groups_only: group granularity of grouped-query attention (default: the posterior's, else False).
        specs: the group specs (default: the posterior's, else the family's for ``model``).
        scores: precomputed ``{spec name: FloatTensor[G]}`` (a score spam-hf does not compute, e.g. a
            peer's); ``method`` then only names them in the plan.
        floors: ``{spec name: n}``, at least ``n`` groups kept in that spec (on top of ``min_keep``).

    With several processes (``torch.distributed``) every process must call it; all return the main
    process's plan.
    """
    if scores is None:
        check_choice("method", method, SCORE_METHODS)
    if scores is None and method in POSTERIOR_METHODS and posterior is None:
        raise ValueError(f"method {method!r} needs a posterior (SpamLaplace) with curvature")
    if kv_groups_only is None:
        kv_groups_only = posterior.kv_groups_only if posterior is not None else False
    if specs is None:
        specs = posterior.specs if posterior is not None else group_specs(model, kv_groups_only=kv_groups_only)
    if scores is None:
        curvature = posterior.diagonal() if method in CURVATURE_METHODS else None
        factors = posterior.factors() if method in DAMAGE_METHODS else None
        mask_fisher = posterior.group_fisher() if method in EXACT_METHODS else None
        scores = group_scores(model, specs, method, prior=posterior.prior if posterior is not None else None,
                              curvature=curvature, temperature=posterior.temperature if posterior is not None else 1.0,
                              seed=seed, factors=factors, mask_fisher=mask_fisher)
    selection = select_groups(model, specs, scores, sparsity, budget=budget, seq_len=seq_len, min_keep=min_keep,
                              report_fields=get_family(model).report_fields, floors=floors)
    # data parallel: every process scores, the main process's plan is the one all of them apply
    return broadcast_object(PruningPlan(selection=selection, method=method, counts={s.name: s.count for s in specs},
                                        scores={k: v.tolist() for k, v in scores.items()},
                                        kv_groups_only=kv_groups_only, seq_len=seq_len))


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
