"""Kronecker-factored curvature algebra (kept apart from models, as in laplace-torch's ``KronDecomposed``).

One Linear layer with ``out`` outputs and ``in+1`` augmented inputs (bias as the last input column)
has its parameters laid out row-major as ``W_aug = [W | b]`` (``out × (in+1)``). Its curvature is
``H ≈ G ⊗ A`` with ``G`` ``out × out`` and ``A`` ``(in+1) × (in+1)``; with the eigendecompositions
``G = Q_G diag(g) Q_Gᵀ`` and ``A = Q_A diag(a) Q_Aᵀ`` (float64),

    log det(G ⊗ A / T + δ I) = Σ_ij log(g_i a_j / T + δ)                         (exact)

and, for an elementwise precision matrix ``Δ`` (``out × (in+1)``),

    log det(G ⊗ A / T + diag(vec Δ)) ≤ Σ_ij log(g_i a_j / T + δ̃_ij),  δ̃ = (Q_G∘Q_G)ᵀ Δ (Q_A∘Q_A)

(Hadamard's inequality applied in the Kronecker eigenbasis; equality when Δ is constant).

**Wide factors.** A factor given as a vector (``A`` of width ``in+1`` as ``[in+1]``, or ``G`` as ``[out]``) is
the diagonal of that factor: ``H ≈ G ⊗ diag(a)`` (or ``diag(g) ⊗ A``). Its eigenvectors are the unit vectors
(``Q_A = I``, never formed), so the same formulas hold with ``Q_A∘Q_A = I``. A unit prior on the rows or columns
of the diagonal side is then exact, not a bound: for ``Δ = 1 vᵀ`` (one precision per input column) and
``A = diag(a)``, ``G ⊗ diag(a)/T + diag(vec Δ)`` is block-diagonal over columns ``j`` with blocks
``a_j G / T + v_j I``, whose log-determinant is ``Σ_i log(g_i a_j / T + v_j)``. This is what
:class:`~spam_hf.curvature.CurvatureAccumulator` keeps for factors of ``diagonal_from`` or more (an LLM's MLP):
``d`` numbers instead of ``d²``, and no ``O(d³)`` eigendecomposition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from transformers.utils import logging

from .spectrum import LogSpectrum, one_sided_logdet

logger = logging.get_logger(__name__)


@dataclass
class Precision:
    """An elementwise prior precision for one layer's ``out × (in+1)`` parameters.

    Either rank one, ``Δ = u vᵀ`` (scalar, layer and unit priors: rows or columns share a
    precision), or ``dense`` (parameter prior).
    """

    u: Optional[torch.Tensor] = None  # [out]
    v: Optional[torch.Tensor] = None  # [in+1]
    dense: Optional[torch.Tensor] = None  # [out, in+1]

    @property
    def is_rank_one(self) -> bool:
        return self.dense is None

    def matrix(self) -> torch.Tensor:
        """The ``out × (in+1)`` matrix Δ."""
        return self.dense if self.dense is not None else torch.outer(self.u, self.v)

    def quadratic(self, w_aug_sq: torch.Tensor) -> torch.Tensor:
        """``Σ_ij Δ_ij · W²_ij`` for ``w_aug_sq = W_aug²`` (``out × (in+1)``), without forming Δ when rank one."""
        if self.dense is not None:
            return (self.dense * w_aug_sq).sum()
        return self.u @ (w_aug_sq @ self.v)

    def log_sum(self) -> torch.Tensor:
        """``Σ_ij log Δ_ij``."""
        if self.dense is not None:
            return self.dense.log().sum()
        return self.v.numel() * self.u.log().sum() + self.u.numel() * self.v.log().sum()


def check_finite(F: torch.Tensor) -> None:
    """:class:`FloatingPointError` naming the factor's shape when a Kronecker factor (a matrix, or a diagonal kept
    as a vector) has NaN or infinite entries: the losses or activations diverged."""
    if not torch.isfinite(F).all():
        what = f"{F.shape[0]} × {F.shape[1]}" if F.dim() == 2 else f"{F.shape[0]}"
        raise FloatingPointError(f"a {'diagonal ' if F.dim() == 1 else ''}Kronecker factor ({what}) has NaN or infinite "
                                 "entries: the training losses or activations diverged; lower the learning rate")


def symmetric_eigh(F: torch.Tensor) -> tuple:
    """``(vals, Q)`` with ``F = Q diag(vals) Qᵀ`` for a symmetric ``n × n`` Kronecker factor, robust to what
    pruning during training makes of the factors.

    Masked groups leave whole rows and columns of ``G`` / ``A`` exactly zero (a masked head's inputs to O,
    its Q/K/V rows' gradients); LAPACK's ``syevd`` can fail to converge on such factors ("ill-conditioned
    or too many repeated eigenvalues"). So: (1) rows and columns that are zero are split off exactly
    (eigenvalue 0, unit eigenvector) and only the rest is decomposed; (2) if ``eigh`` still fails, it is
    retried with a jitter ``ε I`` (``ε = 1e-10 · mean diagonal``, subtracted again from the eigenvalues);
    (3) then by the SVD (``F`` is positive semi-definite: ``F = U diag(s) Uᵀ``). A factor with NaN or
    infinite entries raises :class:`FloatingPointError` (the losses or activations diverged).
    """
    check_finite(F)
    n = F.shape[0]
    live = (F != 0).any(dim=1)
    k = int(live.sum())
    if k == n:
        return _eigh_with_fallbacks(F)
    vals = torch.zeros(n, dtype=F.dtype, device=F.device)
    Q = torch.zeros(n, n, dtype=F.dtype, device=F.device)
    dead = (~live).nonzero().squeeze(1)
    Q[dead, torch.arange(n - k, device=F.device)] = 1.0  # zero eigenvalues first (ascending, as eigh)
    if k:
        idx = live.nonzero().squeeze(1)
        sub_vals, sub_Q = _eigh_with_fallbacks(F[idx][:, idx])
        vals[n - k:] = sub_vals
        Q[idx.unsqueeze(1), torch.arange(n - k, n, device=F.device).unsqueeze(0)] = sub_Q
    return vals, Q


def symmetric_eigvalsh(F: torch.Tensor) -> torch.Tensor:
    """The eigenvalues of :func:`symmetric_eigh` (ascending) without the eigenvectors: ``eigvalsh``, falling back
    to :func:`symmetric_eigh` (zero rows split off, jitter, SVD) when LAPACK does not converge."""
    check_finite(F)
    try:
        return torch.linalg.eigvalsh(F)
    except torch.linalg.LinAlgError:
        return symmetric_eigh(F)[0]


def _eigh_with_fallbacks(F: torch.Tensor) -> tuple:
    """``torch.linalg.eigh``, then with a jitter, then the SVD (see :func:`symmetric_eigh`)."""
    try:
        return torch.linalg.eigh(F)
    except torch.linalg.LinAlgError:
        logger.warning(f"eigh of a {F.shape[0]} × {F.shape[0]} Kronecker factor failed to converge; retrying with "
                       "a jitter (then the SVD)")
    eps = 1e-10 * float(F.diagonal().abs().mean().clamp_min(1e-300))
    eye = torch.eye(F.shape[0], dtype=F.dtype, device=F.device)
    try:
        vals, Q = torch.linalg.eigh(F + eps * eye)
        return vals - eps, Q
    except torch.linalg.LinAlgError:
        U, s, _ = torch.linalg.svd(F)
        return s.flip(0), U.flip(1)


class KronEigen:
    """Eigendecomposed Kronecker factors ``G ⊗ A`` of one layer (float64)."""

    def __init__(self, G: torch.Tensor, A: torch.Tensor, keep_vectors: bool = False,
                 shared: Optional[list] = None, values_only: Tuple[bool, bool] = (False, False)) -> None:
        """``keep_vectors``: keep ``Q_G``/``Q_A`` themselves (only :meth:`dense` needs them); by default only
        their elementwise squares are kept, which halves the memory of a decomposed layer. A 1-D ``G`` or ``A`` is
        a diagonal factor (module docstring): its eigenvalues are its entries and it is not decomposed.
        ``values_only``: ``(G side, A side)`` whose prior precision is constant (a unit prior on rows leaves the
        columns' constant, :meth:`~spam_hf.priors.PriorPrecision.constant_sides`): there only the eigenvalues are
        computed (``eigvalsh``, about 2.5× faster than ``eigh``) and the side is projected as the identity, which
        is exact, since ``(Q∘Q)ᵀ (c·1) = c·1`` (every eigenvector has unit norm). ``shared``: a list the
        decompositions are remembered in; a factor equal (bitwise) to one decomposed before
        reuses its result (Q, K and V read the same input, so do gate and up: their ``A`` sums are identical).

        The eigendecomposition is float64 whatever the factors' dtype; the squared eigenvectors are
        stored in the factors' dtype (float32 factors: half the memory; the projection sums
        non-negative terms, so float32 costs ~1e-7 relative) and every result is float64."""
        if any(F.dim() not in (1, 2) or (F.dim() == 2 and F.shape[0] != F.shape[1]) for F in (G, A)):
            raise ValueError(f"Kronecker factors must be square matrices or diagonals (vectors), got G {tuple(G.shape)} "
                             f"and A {tuple(A.shape)}")
        # eigendecomposed where the factors live (a GPU when training there), kept on the CPU
        store = G.dtype if G.dtype in (torch.float32, torch.float64) else torch.float32
        vals_g, vals_a = (bool(v) and not keep_vectors for v in values_only)
        self.g, self._QG2, Q_G, self.diag_G = self._cached_eigh(G, store, keep_vectors, shared, vals_g)
        self.a, self._QA2, Q_A, self.diag_A = self._cached_eigh(A, store, keep_vectors, shared, vals_a)
        self.Q_G, self.Q_A = Q_G, Q_A

    @classmethod
    def _cached_eigh(cls, F: torch.Tensor, store: torch.dtype, keep_vectors: bool, shared: Optional[list],
                     values_only: bool = False):
        if shared is None:
            return cls._eigh(F, store, keep_vectors, values_only)
        for other, result in shared:
            if other.shape == F.shape and other.device == F.device and torch.equal(other, F):
                if values_only:
                    return result[0], None, None, result[3]
                if result[1] is not None or F.dim() == 1:
                    return result
        result = cls._eigh(F, store, keep_vectors, values_only)
        shared.append((F, result))
        del shared[:-SHARED_RECENT]  # modules reading one input are neighbours (q, k, v; gate, up)
        return result

    @staticmethod
    def _eigh(F: torch.Tensor, store: torch.dtype, keep_vectors: bool, values_only: bool = False):
        """``(eigenvalues ≥ 0, squared eigenvectors in store dtype, eigenvectors or None, diagonal)``, on the CPU;
        a diagonal factor (a vector) and ``values_only`` give ``None`` for both eigenvector matrices."""
        F = F.detach().to(torch.float64)
        if F.dim() == 1:
            check_finite(F)
            diag = F.cpu()
            return diag.clamp_min(0.0), None, None, diag
        diag = F.diagonal().cpu()
        if values_only:
            return symmetric_eigvalsh(0.5 * (F + F.T)).clamp_min(0.0).cpu(), None, None, diag
        vals, Q = symmetric_eigh(0.5 * (F + F.T))
        del F
        Q_kept = Q.to("cpu", copy=True) if keep_vectors else None
        Q2 = Q.square_().to("cpu", store)  # in place: no second float64 copy
        return vals.clamp_min(0.0).cpu(), Q2, Q_kept, diag

    @property
    def shape(self) -> tuple:
        return (self.g.numel(), self.a.numel())

    def eigenvalues(self, temperature: float = 1.0) -> torch.Tensor:
        """``g_i a_j / T`` as an ``out × (in+1)`` matrix (cached: hyper-steps reuse it)."""
        cached = getattr(self, "_eig_cache", None)
        if cached is None or cached[0] != temperature:
            cached = (temperature, torch.outer(self.g, self.a) / temperature)
            self._eig_cache = cached
        return cached[1]

    def project(self, precision: Precision) -> torch.Tensor:
        """``δ̃ = (Q_G∘Q_G)ᵀ Δ (Q_A∘Q_A)`` (``out × (in+1)``); ``O(out² + in²)`` when Δ is rank one."""
        if precision.is_rank_one:
            return torch.outer(_project(self._QG2, precision.u), _project(self._QA2, precision.v))
        dense = precision.dense
        if self._QG2 is not None:
            dense = self._QG2.T @ dense.to(self._QG2.dtype)
        if self._QA2 is not None:
            dense = dense.to(self._QA2.dtype) @ self._QA2
        return dense.double()

    def logdet(self, precision: Precision, temperature: float = 1.0) -> torch.Tensor:
        """``Σ_ij log(g_i a_j / T + δ̃_ij)``: exact for constant Δ, an upper bound otherwise.

        For a rank-one Δ (scalar, layer and unit priors) ``δ̃ = p qᵀ`` with ``p = (Q_G∘Q_G)ᵀ u``, ``q = (Q_A∘Q_A)ᵀ v``,
        and the sum and its gradient are computed in row blocks (:class:`_RankOneLogdet`): no ``out × (in+1)``
        matrix is held, and one pass gives both. When one side is fixed ones (the constant side of a unit, layer or
        scalar prior, not differentiated), the sum comes from a table of the other side's spectrum instead
        (:func:`~spam_hf.spectrum.one_sided_logdet`, ``O(out)`` per call once the table exists)."""
        if precision.is_rank_one:
            p, q = _project(self._QG2, precision.u), _project(self._QA2, precision.v)
            if _is_fixed_ones(q):  # δ̃_ij = p_i: tabulated over A's spectrum, O(out) (spam_hf.spectrum)
                return one_sided_logdet(p, self.g / temperature, self._spectrum("a"))
            if _is_fixed_ones(p):  # δ̃_ij = q_j
                return one_sided_logdet(q, self.a / temperature, self._spectrum("g"))
            return rank_one_logdet(p, q, temperature, g=self.g, a=self.a)
        return torch.log(self.eigenvalues(temperature) + self.project(precision)).sum()

    def _spectrum(self, side: str) -> LogSpectrum:
        """The :class:`~spam_hf.spectrum.LogSpectrum` of ``g`` or ``a``, built on first use and kept. Kept per
        eigenvalue tensor, not per layer: layers whose factor was decomposed once (``shared``: Q, K and V's ``A``;
        gate's and up's) hold the same tensor, so they share one table."""
        values = getattr(self, side)
        table = getattr(values, "_log_spectrum", None)  # kept on the tensor: it lives as long as the eigenvalues
        if table is None:
            table = values._log_spectrum = LogSpectrum(values)
        return table

    def diag(self) -> torch.Tensor:
        """Diagonal of ``G ⊗ A`` as an ``out × (in+1)`` matrix: ``diag(G) diag(A)ᵀ``."""
        return torch.outer(self.diag_G, self.diag_A)

    def dense(self) -> torch.Tensor:
        """The dense ``G ⊗ A`` (for tests on tiny layers only; needs ``keep_vectors=True``)."""
        def factor(Q, vals, Q2):
            if Q2 is None:
                return torch.diag(vals)  # a diagonal factor
            if Q is None:
                raise ValueError("dense() needs KronEigen(..., keep_vectors=True)")
            return Q @ torch.diag(vals) @ Q.T

        return torch.kron(factor(self.Q_G, self.g, self._QG2), factor(self.Q_A, self.a, self._QA2))


def rank_one_logdet(p: torch.Tensor, q: torch.Tensor, temperature: float = 1.0, g: Optional[torch.Tensor] = None,
                    a: Optional[torch.Tensor] = None, diagonal: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``Σ_ij log(E_ij / T + p_i q_j)`` with ``E = g aᵀ`` (KFAC eigenvalues) or ``E = diagonal`` (a diagonal
    curvature, ``out × (in+1)``), differentiable in ``p`` and ``q`` (float64), from one blocked pass
    (:class:`_RankOneLogdet`)."""
    if (diagonal is None) == (g is None or a is None):
        raise ValueError("rank_one_logdet needs either g and a (KFAC eigenvalues) or diagonal")
    return _RankOneLogdet.apply(p, q, g, a, diagonal, float(temperature))


class _RankOneLogdet(torch.autograd.Function):
    """``L = Σ_ij log(E_ij / T + p_i q_j)`` (float64), with ``∂L/∂p = R q`` and ``∂L/∂q = Rᵀ p`` for
    ``R_ij = 1 / (E_ij / T + p_i q_j)``, all from one pass over blocks of :data:`ROW_BLOCK` rows: no autograd
    graph of ``out × (in+1)`` intermediates, and ``E = g aᵀ`` recomputed per block rather than cached."""

    @staticmethod
    def forward(ctx, p, q, g, a, diagonal, temperature):
        a_t = a / temperature if a is not None else None
        total = torch.zeros((), dtype=torch.float64)
        grad_p = torch.empty_like(p)
        grad_q = torch.zeros_like(q)
        for start in range(0, p.numel(), ROW_BLOCK):
            rows = slice(start, start + ROW_BLOCK)
            if diagonal is None:
                M = torch.outer(g[rows], a_t)
            else:
                M = diagonal[rows].to(torch.float64) / temperature
            M.addr_(p[rows], q)
            R = torch.reciprocal(M)
            grad_p[rows] = R @ q
            grad_q.add_(p[rows] @ R)
            total += M.log_().sum()
        ctx.save_for_backward(grad_p, grad_q)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_p, grad_q = ctx.saved_tensors
        return grad_out * grad_p, grad_out * grad_q, None, None, None, None


SHARED_RECENT = 4
"""Decompositions :class:`KronEigen` remembers in ``shared`` (the most recent; older factors are released)."""

ROW_BLOCK = 256
"""Rows per block of :class:`_RankOneLogdet` (256 × 8192 float64 = 16 MB)."""


def _is_fixed_ones(x: torch.Tensor) -> bool:
    """Whether ``x`` is all ones and not differentiated (the constant side of a unit, layer or scalar prior)."""
    return not x.requires_grad and bool((x == 1).all())


def _project(Q2: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``(Q∘Q)ᵀ x`` in float64; ``x`` itself for a diagonal factor (``Q2 is None``: ``Q = I``)."""
    if Q2 is None:
        return x.double()
    return (Q2.T @ x.to(Q2.dtype)).double()
