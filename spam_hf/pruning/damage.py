"""Group scores for pruning: OPD (Optimal Posterior Damage) and baselines on the same groups.

Per parameter (augmented ``[W | b]`` layout, ``out × (in+1)``):

* ``opd``:       ``s_i = θ_i² · P_ii`` with ``P = H / T + diag(δ)`` the Laplace posterior precision
  (KFAC: ``diag H = diag(G) diag(A)ᵀ``);
* ``fisher``:    ``s_i = θ_i² · H_ii`` (no prior);
* ``magnitude``: ``s_i = θ_i²``;
* ``random``:    one uniform draw per group.

A group's score is the sum over the slices it owns (its rows, with their bias entries, in row
modules; its columns in column modules).
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch
from torch import nn

from ..architectures.base import GroupSpec
from ..checks import check_choice
from ..kron import KronEigen
from ..priors import PriorPrecision, params_aug

SCORE_METHODS = ("opd", "magnitude", "fisher", "random")


def _diag(curv) -> torch.Tensor:
    return curv.diag() if isinstance(curv, KronEigen) else curv.to(torch.float64)


def parameter_scores(model: nn.Module, modules: Iterable[str], method: str, prior: Optional[PriorPrecision] = None,
                     curvature: Optional[Dict[str, object]] = None, temperature: float = 1.0) -> Dict[str, torch.Tensor]:
    """Per-parameter scores ``{module: out × (in+1)}`` (float64) for ``opd``, ``fisher`` or ``magnitude``."""
    if method not in ("opd", "fisher", "magnitude"):
        raise ValueError(f"no per-parameter scores for method {method!r}")
    if method in ("opd", "fisher") and curvature is None:
        raise ValueError(f"method {method!r} needs curvature (train with SpamTrainer or fit priors post hoc first)")
    if method == "opd" and prior is None:
        raise ValueError("method 'opd' needs the prior precisions")
    modules = list(modules)
    params = params_aug(model, modules)
    out: Dict[str, torch.Tensor] = {}
    for m in modules:
        w2 = params[m].square()
        if method == "magnitude":
            out[m] = w2
            continue
        if m not in curvature:
            raise ValueError(f"no curvature for module {m!r}")
        h = _diag(curvature[m])
        if h.shape != w2.shape:
            raise ValueError(f"curvature of {m!r} has shape {tuple(h.shape)}, parameters {tuple(w2.shape)}")
        if method == "fisher":
            out[m] = w2 * h
        else:
            with torch.no_grad():
                out[m] = w2 * (h / temperature + prior.precision(m).matrix())
    return out


def group_scores(model: nn.Module, specs: Iterable[GroupSpec], method: str = "opd",
                 prior: Optional[PriorPrecision] = None, curvature: Optional[Dict[str, object]] = None,
                 temperature: float = 1.0, seed: int = 0) -> Dict[str, torch.Tensor]:
    """``{spec.name: FloatTensor[G]}``: the score of every group (higher = more important)."""
    check_choice("method", method, SCORE_METHODS)
    specs = list(specs)
    if method == "random":
        g = torch.Generator().manual_seed(seed)
        return {s.name: torch.rand(s.count, generator=g, dtype=torch.float64) for s in specs}
    modules = list(dict.fromkeys(m for s in specs for m in s.modules))
    per_param = parameter_scores(model, modules, method, prior, curvature, temperature)
    out: Dict[str, torch.Tensor] = {}
    for s in specs:
        total = torch.zeros(s.count, dtype=torch.float64)
        for m, idx in s.row_index.items():
            total += per_param[m][idx].sum(dim=(1, 2))
        for m, idx in s.col_index.items():
            total += per_param[m][:, idx].sum(dim=(0, 2))
        out[s.name] = total
    return out
