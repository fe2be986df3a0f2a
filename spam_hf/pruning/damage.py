"""The formulas behind the group scores (the scores themselves, one module each, are in :mod:`.scores`).

Per parameter (augmented ``[W | b]`` layout, ``out × (in+1)``):

* ``opd``:       ``s_i = θ_i² · P_ii`` with ``P = H / T + diag(δ)`` the Laplace posterior precision
  (KFAC: ``diag H = diag(G) diag(A)ᵀ``);
* ``fisher``:    ``s_i = θ_i² · H_ii`` (no prior);
* ``magnitude``: ``s_i = θ_i²``;
* ``random``:    one uniform draw per group.

A group's score is the sum over the slices it owns (its rows, with their bias entries, in row
modules; its columns in column modules).

Group damage (:func:`group_damage`, methods ``damage`` and ``damage-out``) scores a whole group by the
increase of the Laplace objective when the group is set to zero, *with* the correlations inside the
group: ``½ Δθᵀ (H / T) Δθ + ½ Σ_{i∈g} δ_i θ_i²`` with ``Δθ = −θ_g`` and KFAC ``H = G ⊗ A`` per module, i.e.
``½ tr(G_RR · W_R A W_Rᵀ) / T`` for its rows ``R`` of a module and ``½ tr(W_Cᵀ G W_C · A_CC) / T`` for its
columns ``C``. ``damage-out`` counts only the consuming slices (the columns of O for a head, of down
for a neuron): removing a group *is* removing those, so their function-space damage is the other
candidate estimate. ``damage-obs`` is ``damage-out`` *after* the compensation that follows the removal
(:mod:`spam_hf.pruning.compensation`): with the consuming columns ``C`` set to zero and the remaining
columns ``R`` (bias included) free, the least-squares refit minimises ``½ tr(G ΔW Ā ΔWᵀ) / T`` (``Ā = A + λI``,
``λ`` the refit's damping), and its minimum is the group's damage,
``½ tr(G W_C (Ā / Ā_RR) W_Cᵀ) / T`` with the Schur complement ``Ā / Ā_RR = Ā_CC − Ā_CR Ā_RR⁻¹ Ā_RC =
((Ā⁻¹)_CC)⁻¹`` in place of ``A_CC`` (Optimal Brain Surgeon for a block of columns; ZipLM, Kurtic et al. 2023).
A group whose inputs the other columns can reproduce costs little, however large its weights.
``damage-exact`` is the consuming slices' damage without the Kronecker approximation: ``½ 1_Cᵀ M 1_C / T``
plus the prior term, with ``M = Σ_n m_n m_nᵀ`` the Fisher of masks on the consuming module's input columns
(``m_nc = Σ_t x_tc ∂ℓ_n/∂x_tc``; with sampled labels a GGN estimate, with true labels the mask Fisher of Kwon
et al. 2022), collected by ``SpamLaplace(mask_fisher=True)``.

A LoRA rank ``k`` is scored by the damage of removing its term ``s · b_k a_kᵀ`` from the merged weight
``W + s·BA`` (:func:`lora_rank_damage`): ``½ (b_kᵀ G_B b_k)(a_kᵀ A_A a_k) / T`` with ``A_A`` the input factor
of ``lora_A`` and ``G_B`` the output factor of ``lora_B`` (which holds the ``s²``). Unlike any sum over
the entries of ``a_k`` and ``b_k`` it does not change when a rank is rescaled (``a_k → c·a_k``,
``b_k → b_k / c``), which leaves the adapter's function unchanged. ``damage-obs`` treats a rank as the column
``k`` of ``lora_B`` that the compensation refits around (input factor: the rank activations ``A x``); it is
invariant under that rescaling too (the activation scales by ``c``, ``b_k`` by ``1 / c``).
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import torch
from torch import nn

from ..architectures.base import GroupSpec
from ..kron import KronEigen
from ..priors import PriorPrecision, params_aug

Factors = Dict[str, Tuple[torch.Tensor, torch.Tensor]]
LEAST_SQUARES_DAMPING = 0.01
"""``λ`` / mean diagonal of ``A`` of the least-squares refit (:func:`spam_hf.pruning.compensation.compensate`) and
of the ``damage-obs`` score that assumes it (SparseGPT's damping, for round-off in near-singular statistics)."""


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


def group_sums(specs: Iterable[GroupSpec], per_param: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``{spec.name: FloatTensor[G]}``: per-parameter scores (``{module: out × (in+1)}``) summed over the slices each
    group owns (its rows, bias entries included, and its columns)."""
    out: Dict[str, torch.Tensor] = {}
    for s in specs:
        total = torch.zeros(s.count, dtype=torch.float64)
        for m, idx in s.row_index.items():
            total += per_param[m][idx].sum(dim=(1, 2))
        for m, idx in s.col_index.items():
            total += per_param[m][:, idx].sum(dim=(0, 2))
        out[s.name] = total
    return out


def _blocks(X: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``[G, r, r]``: the blocks ``X[idx[g]][:, idx[g]]``."""
    return X[idx.unsqueeze(2), idx.unsqueeze(1)]


def _gram_blocks(X: torch.Tensor, Y: torch.Tensor, batch_first: bool) -> torch.Tensor:
    """``[G, r, r]``: ``X_gᵀ Y_g`` per group from sliced ``[out, G, r]`` tensors (``batch_first=False``, column
    slices) or ``X_g Y_gᵀ`` from ``[G, r, in]`` ones (row slices)."""
    if batch_first:
        return torch.einsum("gri,gsi->grs", X, Y)
    return torch.einsum("ogr,ogs->grs", X, Y)


def _block_sums(X: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``[G]``: ``Σ_{i,j ∈ idx[g]} X_ij`` for each row ``idx[g]`` of ``idx`` (``LongTensor[G, r]``)."""
    return _blocks(X, idx).sum(dim=(1, 2))


def schur_blocks(A: torch.Tensor, idx: torch.Tensor, damping: Optional[float] = None) -> torch.Tensor:
    """``[G, r, r]``: the Schur complement ``Ā / Ā_RR = ((Ā⁻¹)_CC)⁻¹`` of ``Ā = A + λI`` for each group's columns
    ``C = idx[g]`` (``idx``: ``LongTensor[G, r]``; ``R`` every other column), ``λ = damping ·`` mean ``diag(A)``
    (default :data:`LEAST_SQUARES_DAMPING`). What of the inputs ``C`` the other inputs cannot reproduce linearly
    (their ridge regression's residual)."""
    lam = (LEAST_SQUARES_DAMPING if damping is None else damping) * float(A.diagonal().mean().clamp_min(0.0))
    jitter = 1e-10 * float(A.diagonal().abs().mean().clamp_min(1e-30))  # a zero A (masked, or no inputs yet)
    damped = A.clone()  # damped in place: no identity matrix beside it (wide layers: 8k+ inputs)
    damped.diagonal().add_(lam + jitter)
    L = torch.linalg.cholesky(damped)
    del damped
    inv = torch.cholesky_inverse(L)
    del L
    block = _blocks(inv, idx)
    return torch.linalg.inv(0.5 * (block + block.transpose(1, 2)))


def group_damage(model: nn.Module, specs: Iterable[GroupSpec], factors: Factors,
                 prior: Optional[PriorPrecision] = None, temperature: float = 1.0,
                 consuming_only: bool = False, compensated: bool = False) -> Dict[str, torch.Tensor]:
    """``{spec.name: FloatTensor[G]}``: the increase of the Laplace objective when each group alone is zeroed.

    Args:
        factors: ``{module: (A, G)}`` float64 KFAC factors (``A`` over ``[x | 1]``, ``G`` extrapolated to
            ``N``), e.g. :meth:`spam_hf.posterior.SpamLaplace.factors`.
        prior: adds the exact prior term ``½ Σ δ_i θ_i²`` over the removed slices (none when ``None``).
        consuming_only: count only the column slices (``damage-out``).
        compensated: the column slices' damage after the least-squares refit of the remaining columns
            (``damage-obs``, consuming slices only): ``A_CC`` becomes the Schur complement of :func:`schur_blocks`.

    Per module (``W`` the ``out × (in+1)`` augmented weight): rows ``R`` cost ``tr(G_RR W_R A W_Rᵀ)``,
    i.e. the block sum of ``G ∘ (W A Wᵀ)`` over ``R × R``; columns ``C`` cost the block sum of
    ``(Wᵀ G W) ∘ A`` over ``C × C``. Cross-module terms are zero under block-diagonal KFAC.
    """
    specs = list(specs)
    modules = list(dict.fromkeys(m for s in specs for m in s.modules))
    params = params_aug(model, modules)
    out: Dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for s in specs:
            if s.kind == "lora_rank" and not compensated:  # compensated: B's columns, as O's / down's below
                out[s.name] = lora_rank_damage(params, s, factors, prior, temperature)
                continue
            curv = torch.zeros(s.count, dtype=torch.float64)
            prior_term = torch.zeros(s.count, dtype=torch.float64)
            slices = [(m, idx, "rows") for m, idx in s.row_index.items() if not (consuming_only or compensated)]
            slices += [(m, idx, "cols") for m, idx in s.col_index.items()]
            for m, idx, where in slices:
                if m not in factors:
                    raise ValueError(f"no Kronecker factors for module {m!r}")
                A, G = factors[m]
                W = params[m].to(A.device, A.dtype)  # computed where, and in the precision, the factors are
                if tuple(A.shape) != (W.shape[1],) * 2 or tuple(G.shape) != (W.shape[0],) * 2:
                    raise ValueError(f"factors of {m!r} have shapes {tuple(A.shape)}, {tuple(G.shape)}; weights "
                                     f"{tuple(W.shape)}")
                w2 = params[m].square() * prior.precision(m).matrix() if prior is not None else None
                if where == "rows":
                    term = (_gram_blocks(W[idx], (W @ A)[idx], batch_first=True) * _blocks(G, idx)).sum(dim=(1, 2))
                    curv += term.to(curv.device, curv.dtype)
                    if w2 is not None:
                        prior_term += w2[idx].sum(dim=(1, 2))
                    continue
                # columns C: the blocks (W_Cᵀ G W_C) of WᵀGW, never the (in+1)² matrix itself
                WGW = _gram_blocks(W[:, idx], (G @ W)[:, idx], batch_first=False)
                term = (WGW * (schur_blocks(A, idx) if compensated else _blocks(A, idx))).sum(dim=(1, 2))
                curv += term.to(curv.device, curv.dtype)
                if w2 is not None:
                    prior_term += w2[:, idx].sum(dim=(0, 2))
            out[s.name] = 0.5 * curv / temperature + 0.5 * prior_term
    return out


def lora_rank_damage(params: Dict[str, torch.Tensor], spec: GroupSpec, factors: Factors,
                     prior: Optional[PriorPrecision] = None, temperature: float = 1.0) -> torch.Tensor:
    """``FloatTensor[r]``: ``½ (b_kᵀ G_B b_k)(a_kᵀ A_A a_k) / T`` per rank of one LoRA module (module docstring),
    plus ``½ Σ δ θ²`` over ``a_k`` and ``b_k`` with a ``prior``. ``params``: augmented weights (``params_aug``)."""
    (a_name, a_idx), = spec.row_index.items()
    (b_name, b_idx), = spec.col_index.items()
    for m in (a_name, b_name):
        if m not in factors:
            raise ValueError(f"no Kronecker factors for module {m!r}")
    A_in, _ = factors[a_name]
    _, G_out = factors[b_name]
    lora_A, lora_B = params[a_name], params[b_name]  # r × in(+1), out × r(+1)
    rows, cols = a_idx.reshape(-1), b_idx.reshape(-1)
    a = lora_A[rows]  # r × (in[+1]): A's input factor has the same (augmented) width
    b = lora_B[:, cols]  # out × r
    if tuple(A_in.shape) != (a.shape[1],) * 2 or tuple(G_out.shape) != (b.shape[0],) * 2:
        raise ValueError(f"factors of {a_name!r} / {b_name!r} do not match the adapter's shapes")
    damage = 0.5 * ((a @ A_in) * a).sum(1) * ((G_out @ b) * b).sum(0) / temperature
    if prior is not None:
        damage = damage + 0.5 * ((lora_A.square() * prior.precision(a_name).matrix())[rows].sum(1)
                                 + (lora_B.square() * prior.precision(b_name).matrix())[:, cols].sum(0))
    return damage


def group_damage_exact(model: nn.Module, specs: Iterable[GroupSpec], mask_fisher: Dict[str, torch.Tensor],
                       prior: Optional[PriorPrecision] = None, temperature: float = 1.0) -> Dict[str, torch.Tensor]:
    """``{spec.name: FloatTensor[G]}``: ``½ 1_Cᵀ M 1_C / T + ½ Σ_{i∈C} δ_i θ_i²`` over each group's consuming
    columns ``C`` (``mask_fisher``: ``{module: M}``, e.g. :meth:`spam_hf.posterior.SpamLaplace.group_fisher`)."""
    specs = list(specs)
    modules = list(dict.fromkeys(m for s in specs for m in s.col_index))
    params = params_aug(model, modules)
    out: Dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for s in specs:
            total = torch.zeros(s.count, dtype=torch.float64)
            for m, idx in s.col_index.items():
                if m not in mask_fisher:
                    raise ValueError(f"no mask Fisher for module {m!r} (SpamLaplace(mask_fisher=True), then collect())")
                total += 0.5 * _block_sums(mask_fisher[m], idx) / temperature
                if prior is not None:
                    w2 = params[m].square() * prior.precision(m).matrix()
                    total += 0.5 * w2[:, idx].sum(dim=(0, 2))
            out[s.name] = total
    return out
