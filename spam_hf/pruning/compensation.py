"""Compensation: move the remaining weights of a consuming layer so that it still computes what it did, given
that the removed block is zero.

A head is consumed by the columns of O it owns, a neuron by its column of down (a LoRA rank by its
column of B). Removing input columns ``S`` of a layer with KFAC precision ``G ⊗ A / T`` (``A`` over the
inputs ``[x | 1]``) and the remaining columns ``R`` (the bias column included) gives the conditional mean

    W_R ← W_R + W_S A_SR (A_RR + λ I)⁻¹

(least squares / OBS on the layer's input statistics), with the prior as damping. Under the KFAC
posterior precision ``G ⊗ A / T + δ I`` (``δ``: the module's mean prior precision) the conditional mean
decouples along the eigenvectors ``u_i`` of ``G`` (eigenvalues ``g_i``): output direction ``i`` gets its
own damping ``λ_i = T·δ / g_i``,

    W̃ = Uᵀ W,   W̃_{i,R} ← W̃_{i,R} + W̃_{i,S} A_SR (A_RR + λ_i I)⁻¹,   W ← U W̃

so directions the likelihood barely sees (small ``g_i``) stay near the prior's answer (no update), and
only the few that matter are refitted. (A single ``λ = Tδ / mean g`` — exact only for ``G = g·I`` —
under-damps most directions of a skewed ``G`` and overfits the calibration batches; README
"Group damage".) Rows of the other modules of a group need no update: they only feed the removed columns.

Two kinds (``COMPENSATIONS``):

* ``least-squares`` (the default): the refit ``W_R + W_S A_SR (A_RR + λI)⁻¹`` with ``λ`` 1% of the mean diagonal of
  ``A_RR`` (SparseGPT's damping, for round-off in near-singular statistics), every output direction refitted
  (the layer's whole output is matched on the calibration tokens, as Kwon et al. 2022 and OBS do; ``λ`` keeps
  the change ``W' − W_R`` small);
* ``posterior``: the KFAC posterior's conditional mean above, which refits only the output directions the
  classification loss's ``G`` sees and leaves the rest at "columns removed, no update".

Measured on the CPU protocol (README "Group damage"), least squares is the better one at 70 and 90% removed:
the next layers read every output direction of O and down, not only those the loss's local ``G`` weights.

``bias`` (FLAP's baseline bias compensation, An et al. 2024) moves the removed columns' average contribution into the
bias, ``b ← b + W_S x̄_S`` with ``x̄`` the calibration mean of the inputs (:func:`compensate_bias`): exact for the
constant part of the removed inputs, blind to what varies. A layer without a bias gets one (the family's config
flag, e.g. LLaMA's ``attention_bias`` / ``mlp_bias``, so the export loads with the stock class).

A fourth kind, ``reference``, refits every consuming layer to the *unpruned* model's outputs, one layer at a time
(:mod:`spam_hf.pruning.reconstruction`); it needs calibration batches, not factors, so it lives there.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

from ..architectures.base import GroupSpec, get_family, weight_out_in
from ..checks import check_choice
from ..choices import COMPENSATIONS
from ..kron import symmetric_eigh
from ..priors import PriorPrecision
from .damage import LEAST_SQUARES_DAMPING, Factors



def removed_columns(specs: Iterable[GroupSpec], keep: Dict[str, torch.Tensor]) -> Dict[str, List[int]]:
    """``{column module: input columns removed}`` for the groups ``keep`` does not keep (``[]`` if none)."""
    removed: Dict[str, List[int]] = {}
    for s in specs:
        kept = set(torch.as_tensor(keep.get(s.name, range(s.count))).tolist())
        dropped = [g for g in range(s.count) if g not in kept]
        for m, idx in s.col_index.items():
            removed.setdefault(m, []).extend(idx[dropped].reshape(-1).tolist() if dropped else [])
    return removed


def refit_losing_modules(model: nn.Module, removed: Dict[str, List[int]],
                         refit: Callable[[str, nn.Module, torch.Tensor], None]) -> Dict[str, int]:
    """``refit(name, module, columns)`` without gradients for every module of ``removed`` that loses columns
    (``columns``: the sorted distinct removed indices, a LongTensor); returns ``{module: columns removed}``."""
    mods = dict(model.named_modules())
    done: Dict[str, int] = {}
    with torch.no_grad():
        for m, cols in removed.items():
            if not cols:
                continue
            columns = torch.tensor(sorted(set(cols)), dtype=torch.long)
            refit(m, mods[m], columns)
            done[m] = int(columns.numel())
    return done


def augmented_weight(module: nn.Module, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[W | b]`` (``out × (in+1)``; ``W`` alone without a bias): the weights a refit moves, float64 on the CPU, or
    in the dtype and on the device of ``like`` (the statistics it is refitted with)."""
    dtype, device = (like.dtype, like.device) if like is not None else (torch.float64, torch.device("cpu"))
    w = weight_out_in(module).detach().to(device, dtype)
    bias = getattr(module, "bias", None)
    return torch.cat([w, bias.detach().to(device, dtype).unsqueeze(1)], 1) if bias is not None else w


def set_augmented_weight(module: nn.Module, new: torch.Tensor) -> None:
    """Write ``[W | b]`` (as :func:`augmented_weight` gives it) back into ``module``, in place."""
    w = weight_out_in(module)
    bias = getattr(module, "bias", None)
    w.copy_(new[:, : w.shape[1]].to(w.device, w.dtype))
    if bias is not None:
        bias.copy_(new[:, -1].to(bias.device, bias.dtype))


def _kept_and_removed(k: int, removed: torch.Tensor):
    """``(R, S)``: the indices in ``range(k)`` kept and removed."""
    mask = torch.ones(k, dtype=torch.bool)
    mask[removed] = False
    return mask.nonzero().squeeze(1), (~mask).nonzero().squeeze(1)


def conditional_mean(W: torch.Tensor, A: torch.Tensor, removed: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
    """``W`` (``out × k``, float64) with columns ``removed`` zeroed and the others moved by
    ``W_S A_SR (A_RR + damping·I)⁻¹`` (``A``: ``k × k`` second moment of the inputs)."""
    R, S = _kept_and_removed(W.shape[1], removed)
    out = W.clone()
    if S.numel() and R.numel():
        A_RR = A[R][:, R]  # one k × k copy, damped in place: no identity matrix, no LU (wide layers: k = 8k+)
        diag = A_RR.diagonal()
        diag += damping
        diag += 1e-10 * float(diag.mean().clamp_min(1e-30))
        rhs = (W[:, S] @ A[S][:, R]).T
        L, info = torch.linalg.cholesky_ex(A_RR)
        del A_RR
        if int(info) == 0:
            out[:, R] += torch.cholesky_solve(rhs, L).T
        else:  # not positive definite in floating point (an undamped, rank-deficient A): a general solve
            out[:, R] += torch.linalg.lstsq(A[R][:, R], rhs).solution.T
    out[:, S] = 0
    return out


def kron_conditional_mean(W: torch.Tensor, A: torch.Tensor, G: torch.Tensor, removed: torch.Tensor,
                          prior: float = 0.0) -> torch.Tensor:
    """The mean of ``W`` (``out × k``, float64) under the precision ``G ⊗ A + prior·I`` given columns ``removed``
    are zero (``prior`` = ``T·δ`` when the likelihood part is ``G ⊗ A / T``): per eigen-direction ``i`` of ``G``,
    :func:`conditional_mean` with damping ``prior / g_i`` (no update where ``g_i ≤ 0`` and ``prior > 0``)."""
    R, S = _kept_and_removed(W.shape[1], removed)
    out = W.clone()
    if not (S.numel() and R.numel()):
        out[:, S] = 0
        return out
    g, U = symmetric_eigh(G)  # masked groups leave zero rows, on which LAPACK's eigh can fail (kron.py)
    a, V = symmetric_eigh(A[R][:, R])
    a = a.clamp_min(0.0) + 1e-10 * float(a.clamp_min(0.0).mean().clamp_min(1e-30))
    if prior > 0:
        lam = torch.where(g > 0, prior / g.clamp_min(1e-300), torch.full_like(g, float("inf")))
    else:
        lam = torch.zeros_like(g)
    Wt = U.T @ W
    B = (Wt[:, S] @ A[S][:, R]) @ V  # out × |R|, in A_RR's eigenbasis
    update = (B / (a.unsqueeze(0) + lam.unsqueeze(1))) @ V.T
    out[:, R] += U @ update
    out[:, S] = 0
    return out


def _kept_diag_mean(A: torch.Tensor, removed: torch.Tensor) -> float:
    R, _ = _kept_and_removed(A.shape[0], removed)
    return float(A.diagonal()[R].mean()) if R.numel() else 0.0


def prior_times_temperature(prior: Optional[PriorPrecision], module: str, temperature: float = 1.0) -> float:
    """``T · mean(δ over the module)`` (0 without a prior): the prior part of the conditional mean's damping."""
    if prior is None:
        return 0.0
    with torch.no_grad():
        return temperature * float(prior.precision(module).matrix().mean())


def compensate(model: nn.Module, specs: Iterable[GroupSpec], keep: Dict[str, torch.Tensor], factors: Factors,
               prior: Optional[PriorPrecision] = None, temperature: float = 1.0,
               kind: str = "least-squares") -> Dict[str, int]:
    """Before surgery: for every column module of a spec that loses groups, set the removed columns to zero
    and move the others (bias included): by the least-squares refit (:func:`conditional_mean`, ``kind=
    "least-squares"``) or to the KFAC posterior's conditional mean (:func:`kron_conditional_mean` with
    ``prior``, ``kind="posterior"``). In place; returns ``{module: columns removed}``.

    ``keep`` names the groups kept per spec (as a plan's ``keep``); ``factors`` are the KFAC factors of
    the current model (:meth:`spam_hf.posterior.SpamLaplace.factors`).
    """
    check_choice("compensation", kind, COMPENSATIONS)
    if kind == "bias":
        raise ValueError("compensation 'bias' reads the input means, not factors: use compensate_bias")
    if kind == "reference":
        raise ValueError("compensation 'reference' refits to the unpruned model's outputs and needs calibration "
                         "batches: use spam_hf.pruning.refit_to_reference or prune_in_rounds")

    def refit(m: str, module: nn.Module, removed_cols: torch.Tensor) -> None:
        A, G = factors[m]
        W = augmented_weight(module, like=A)  # refitted where, and in the precision, the statistics are
        if tuple(A.shape) != (W.shape[1], W.shape[1]):
            raise ValueError(f"input factor of {m!r} has shape {tuple(A.shape)}, the layer has {W.shape[1]} inputs")
        if kind == "least-squares":
            new = conditional_mean(W, A, removed_cols, damping=LEAST_SQUARES_DAMPING * _kept_diag_mean(A, removed_cols))
        else:
            new = kron_conditional_mean(W, A, G, removed_cols, prior=prior_times_temperature(prior, m, temperature))
        set_augmented_weight(module, new)

    return refit_losing_modules(model, removed_columns(specs, keep), refit)


def add_consuming_biases(model: nn.Module, modules: Iterable[str]) -> None:
    """Zero biases where ``modules`` (consuming modules) have none, through the family's config flags
    (:meth:`ArchitectureFamily.add_bias`); the model computes what it did. Called before a ``bias``-compensated
    pruning selects anything, so that its budget counts the biases the export will hold."""
    mods = dict(model.named_modules())
    for m in modules:
        if getattr(mods[m], "bias", None) is None:
            get_family(model).add_bias(model, m)


def compensate_bias(model: nn.Module, specs: Iterable[GroupSpec], keep: Dict[str, torch.Tensor],
                    moments: Dict[str, tuple]) -> Dict[str, int]:
    """Before surgery: for every column module of a spec that loses groups, ``b ← b + W_S x̄_S`` over its removed
    input columns ``S`` (``x̄``: ``moments[m][0]``, the calibration mean of its inputs, ``[in]``), adding a bias
    where the layer has none (:func:`add_consuming_biases`). In place; returns ``{module: columns removed}``."""
    removed = removed_columns(specs, keep)
    add_consuming_biases(model, [m for m, cols in removed.items() if cols])

    def refit(m: str, module: nn.Module, columns: torch.Tensor) -> None:
        W = weight_out_in(module)
        idx = columns.to(W.device)
        mean = moments[m][0].to(W.device, torch.float64)
        shift = W.index_select(1, idx).to(torch.float64) @ mean[idx]
        module.bias.add_(shift.to(module.bias.dtype))

    return refit_losing_modules(model, removed, refit)
