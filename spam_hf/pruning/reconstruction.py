"""Compensation toward the unpruned model: refit every consuming layer, in forward order, to the *reference*
(unpruned) model's outputs on calibration tokens.

The ``least-squares`` compensation (:mod:`spam_hf.pruning.compensation`) keeps what a layer computes *from the
inputs it sees now*: the target is ``W x``, ``x`` the pruned model's inputs. Errors of the layers below
(their removed groups) reach it uncorrected and add up with depth. Here the target is the reference model's
output of the same module on the same tokens, ``y⁰ = W⁰ x⁰``, and the inputs are those of the current model
after every layer below has been refitted (one layer at a time, as SparseGPT / ZipLM process layers):

    W' = argmin_W  Σ_t ‖W x_{t,R} − y⁰_t‖² + λ ‖W − W_R‖²
       = (Σ_t y⁰_t x_{t,R}ᵀ + λ W_R) (Σ_t x_{t,R} x_{t,R}ᵀ + λ I)⁻¹

over the real (non-padding) tokens ``t``, ``R`` the kept input columns and the bias column (inputs
``[x | 1]``), the removed columns ``S`` set to zero, and ``λ`` = ``LEAST_SQUARES_DAMPING`` × the mean diagonal of
``Σ x_R x_Rᵀ`` (it damps the change ``W' − W_R``). With ``y⁰ = W x`` (no layer below changed) this is the
``least-squares`` refit. Every column module of the specs is refitted (O / down, LoRA's B), also those that
lose no column in this round: they correct the drift of the layers below.

Cost: one forward of the reference model over the calibration batches, then per refitted module one forward
of the current model stopped at that module; statistics ``(in+1)²`` and ``out × (in+1)`` per module, float64.
"""

from __future__ import annotations

from itertools import islice
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from ..architectures.base import GroupSpec
from ..curvature import token_layout
from .compensation import LEAST_SQUARES_DAMPING, _kept_and_removed, augmented_weight, removed_columns, \
    set_augmented_weight


class _Stop(Exception):
    """Raised by a hook once the module of interest has been seen: the rest of the forward is not needed."""


def _rows(t: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``[B, T, d]`` (or ``[N, d]``) → ``[n, d]`` float64: the rows of real tokens (``mask``: ``[B, T]``)."""
    if t.dim() == 3 and mask is not None and mask.shape == t.shape[:2]:
        t = t[mask.bool()]
    return t.reshape(-1, t.shape[-1]).double()


def _inputs(batch: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor) and k != "labels"}


@torch.no_grad()
def reference_outputs(reference: nn.Module, modules: Sequence[str], batches: Sequence[Dict[str, torch.Tensor]]
                      ) -> List[Dict[str, torch.Tensor]]:
    """Per batch, ``{module: [n, out]}`` float64: the reference model's outputs of ``modules`` at real tokens."""
    mods = dict(reference.named_modules())
    device = next(reference.parameters()).device
    was_training = reference.training
    reference.eval()
    out: List[Dict[str, torch.Tensor]] = []
    current: Dict[str, torch.Tensor] = {}
    mask: List[Optional[torch.Tensor]] = [None]

    def hook(name):
        def fn(mod, args, output):
            current[name] = _rows(token_layout(mod, output), mask[0]).cpu()
        return fn

    handles = [mods[m].register_forward_hook(hook(m)) for m in modules]
    try:
        for batch in batches:
            inputs = _inputs(batch, device)
            mask[0] = inputs.get("attention_mask")
            current = {}
            reference(**inputs)
            out.append(current)
    finally:
        for h in handles:
            h.remove()
        reference.train(was_training)
    return out


@torch.no_grad()
def input_moments(model: nn.Module, module: str, batches: Sequence[Dict[str, torch.Tensor]],
                  targets: Sequence[torch.Tensor]) -> tuple:
    """``(Σ_t x̄_t x̄_tᵀ, Σ_t y⁰_t x̄_tᵀ)`` float64 with ``x̄ = [x | 1]`` (the bias column only if the module has a
    bias) the inputs of ``module`` in ``model`` at real tokens and ``targets[i]`` (``[n_i, out]``) the reference
    outputs of batch ``i`` at the same tokens. Each forward stops right after ``module``."""
    mod = dict(model.named_modules())[module]
    device = next(model.parameters()).device
    with_bias = getattr(mod, "bias", None) is not None
    sums: Dict[str, torch.Tensor] = {}
    mask: List[Optional[torch.Tensor]] = [None]

    def pre_hook(m, args):
        sums["x"] = _rows(token_layout(m, args[0]), mask[0]).cpu()
        raise _Stop

    handle = mod.register_forward_pre_hook(pre_hook)
    was_training = model.training
    model.eval()
    xx = yx = None
    try:
        for batch, y in zip(batches, targets):
            inputs = _inputs(batch, device)
            mask[0] = inputs.get("attention_mask")
            try:
                model(**inputs)
            except _Stop:
                pass
            x = sums.pop("x")
            if with_bias:
                x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"{module!r}: {x.shape[0]} input tokens but {y.shape[0]} reference outputs")
            xx = x.T @ x if xx is None else xx + x.T @ x
            yx = y.T @ x if yx is None else yx + y.T @ x
    finally:
        handle.remove()
        model.train(was_training)
    return xx, yx


def refit(W: torch.Tensor, xx: torch.Tensor, yx: torch.Tensor, removed: torch.Tensor,
          damping: float = LEAST_SQUARES_DAMPING) -> torch.Tensor:
    """``W`` (``out × k``, float64, bias column last if any) refitted to the reference: columns ``removed`` zero,
    the others ``(yx_R + λ W_R)(xx_RR + λ I)⁻¹`` with ``λ = damping · mean diag(xx_RR)``."""
    R, _ = _kept_and_removed(W.shape[1], removed)
    new = torch.zeros_like(W)
    if R.numel() == 0:
        return new
    xx_RR = xx[R][:, R]
    lam = damping * float(xx_RR.diagonal().mean())
    lhs = xx_RR + lam * torch.eye(R.numel(), dtype=W.dtype)
    rhs = yx[:, R] + lam * W[:, R]
    new[:, R] = torch.linalg.solve(lhs, rhs.T).T  # xx_RR symmetric: W'_R lhs = rhs
    return new


def refit_to_reference(model: nn.Module, reference: nn.Module, specs: Iterable[GroupSpec],
                       keep: Dict[str, torch.Tensor], batches: Iterable[Dict[str, torch.Tensor]],
                       max_batches: Optional[int] = None, damping: float = LEAST_SQUARES_DAMPING) -> Dict[str, int]:
    """Before surgery: every column module of ``specs`` (in ``model``'s module order) gets its removed columns
    zeroed and the rest refitted to ``reference``'s outputs (module docstring). ``model`` and ``reference``
    must share module names and the layers' output widths (the reference may have more input columns).
    In place; returns ``{module: columns removed}`` (0 for a module only refitted)."""
    specs = list(specs)
    batches = list(islice(batches, max_batches))
    if not batches:
        raise ValueError("refit_to_reference needs at least one calibration batch")
    removed = removed_columns(specs, keep)
    order = [name for name, _ in model.named_modules() if name in removed]
    targets = reference_outputs(reference, order, batches)
    mods = dict(model.named_modules())
    done: Dict[str, int] = {}
    for m in order:
        module = mods[m]
        xx, yx = input_moments(model, m, batches, [t[m] for t in targets])
        W = augmented_weight(module)
        if tuple(yx.shape) != tuple(W.shape):
            raise ValueError(f"{m!r}: the reference's outputs and this model's inputs give {tuple(yx.shape)}, "
                             f"the layer is {tuple(W.shape)}")
        cols = torch.tensor(sorted(set(removed[m])), dtype=torch.long)
        with torch.no_grad():
            set_augmented_weight(module, refit(W, xx, yx, cols, damping))
        done[m] = int(cols.numel())
    return done
