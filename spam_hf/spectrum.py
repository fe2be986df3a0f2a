"""Log-determinants of a KFAC block under a prior that is constant along one side, at ``O(out)`` per evaluation.

Under a unit prior on rows (heads of Q/K/V, neurons of gate/up), a scalar or a layer prior, the projected precision
of a Kronecker block ``G ⊗ A`` is ``δ̃_ij = p_i`` (the columns' side is all ones), so its log-determinant is, with
``x_i = g_i / T``,

    Σ_ij log(x_i a_j + p_i) = Σ_i [ n log p_i + Φ_A(x_i / p_i) ],   Φ_A(t) = Σ_j log(1 + t a_j)

(``n`` eigenvalues ``a_j ≥ 0``; columns are the same with ``G`` and ``A`` swapped). ``Φ_A`` depends only on the
factor, so it is tabulated once and every hyper-step costs ``O(out)`` instead of the ``O(out · n)`` of the
direct sum (:func:`~spam_hf.kron.rank_one_logdet`), which at LLM widths is 20 passes over every block weight per
prior update.

The table (:class:`LogSpectrum`) is in ``s = log t``, where ``Φ(e^s) = Σ_j softplus(s + log a_j)`` is smooth with
``dΦ/ds = Σ_j σ(s + log a_j) ∈ [0, n]`` and ``d²Φ/ds² = Σ_j σ(1 − σ)``. Both are evaluated by cubic Hermite
interpolation between knots ``h`` apart from exact values and slopes at the knots; the interpolation error is at most
``h⁴/384 · max|d⁴Φ/ds⁴| ≤ h⁴/384 · n/8`` (``|σ'''| ≤ 1/8``), about ``2·10⁻¹¹ n`` at the default ``h = 1/64``.
Below ``t · max(a) = 10⁻⁴`` the Taylor series ``t S₁ − t² S₂/2 + t³ S₃/3`` (``S_k = Σ a_j^k``) is used, whose error is
below ``10⁻¹²`` relative. The gradient is ``∂/∂p_i = (n − dΦ/ds(s_i)) / p_i``.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch

KNOT_STEP = 1.0 / 64
"""Distance of the table's knots in ``s = log t`` (error bound in the module docstring)."""

TAYLOR_BELOW = 1e-4
"""``t · max(a)`` below which ``Φ`` comes from its Taylor series instead of the table."""

KNOTS_PER_CHUNK = 256
"""Knots evaluated at once when the table is built (``256 × n`` float64 temporaries)."""

MARGIN = 4.0
"""Extra range (in ``s``) a table is built with beyond the queries that needed it, so that a prior moving a
little between hyper-steps does not rebuild it."""


class LogSpectrum:
    """``Φ(t) = Σ_j log(1 + t a_j)`` and ``t Φ'(t)`` for one factor's eigenvalues ``a ≥ 0`` (float64), tabulated.

    The table starts where the Taylor series stops (``t · max(a) = TAYLOR_BELOW``) and grows upwards on demand,
    ``KNOT_STEP`` apart; building a knot costs ``O(n)``, evaluating any ``t`` costs ``O(1)``."""

    def __init__(self, eigenvalues: torch.Tensor, step: float = KNOT_STEP) -> None:
        a = eigenvalues.detach().to("cpu", torch.float64).flatten()
        if a.numel() == 0 or bool((a < 0).any()) or not bool(torch.isfinite(a).all()):
            raise ValueError("LogSpectrum needs a non-empty vector of finite eigenvalues >= 0")
        self.n = a.numel()
        self._log_a = a[a > 0].log()
        self._sums = tuple(float(a.pow(k).sum()) for k in (1, 2, 3))
        self.step = float(step)
        a_max = float(a.max())
        self.s0 = math.log(TAYLOR_BELOW / a_max) if a_max > 0 else math.inf  # first knot
        self._F = torch.empty(0, dtype=torch.float64)  # Φ at the knots
        self._D = torch.empty(0, dtype=torch.float64)  # dΦ/ds
        self._E = torch.empty(0, dtype=torch.float64)  # d²Φ/ds²

    @property
    def knots(self) -> int:
        return self._F.numel()

    def _extend(self, s_max: float) -> None:
        """Build knots up to ``s_max + MARGIN`` (the ones built before are kept)."""
        needed = int(math.ceil((s_max + MARGIN - self.s0) / self.step)) + 2
        parts = [(self._F,), (self._D,), (self._E,)]
        for start in range(self.knots, needed, KNOTS_PER_CHUNK):
            k = torch.arange(start, min(start + KNOTS_PER_CHUNK, needed), dtype=torch.float64)
            z = (self.s0 + k * self.step)[:, None] + self._log_a[None, :]
            sig = torch.sigmoid(z)
            parts[0] += (torch.logaddexp(z, torch.zeros(())).sum(1),)  # softplus(z); F.softplus returns z above 20
            parts[1] += (sig.sum(1),)
            parts[2] += ((sig * torch.sigmoid(-z)).sum(1),)
        self._F, self._D, self._E = (torch.cat(p) for p in parts)

    def __call__(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(Φ(t), t Φ'(t))`` elementwise for ``t ≥ 0`` (float64, same shape as ``t``)."""
        t = t.to(torch.float64)
        phi, slope = torch.zeros_like(t), torch.zeros_like(t)
        if not math.isfinite(self.s0):  # every eigenvalue is zero: Φ ≡ 0
            return phi, slope
        s1, s2, s3 = self._sums
        low = t <= math.exp(self.s0)  # t · max(a) ≤ TAYLOR_BELOW
        tl = t[low]
        phi[low] = tl * (s1 - tl * (s2 / 2 - tl * s3 / 3))
        slope[low] = tl * (s1 - tl * (s2 - tl * s3))
        high = ~low
        if bool(high.any()):
            s = t[high].log()
            self._extend(float(s.max()))
            u = (s - self.s0) / self.step
            k = u.floor().long().clamp(0, self.knots - 2)
            tau = u - k
            h00 = (1 + 2 * tau) * (1 - tau) ** 2
            h10 = tau * (1 - tau) ** 2
            h01 = tau ** 2 * (3 - 2 * tau)
            h11 = tau ** 2 * (tau - 1)
            F, D, E, h = self._F, self._D, self._E, self.step
            phi[high] = h00 * F[k] + h10 * h * D[k] + h01 * F[k + 1] + h11 * h * D[k + 1]
            slope[high] = h00 * D[k] + h10 * h * E[k] + h01 * D[k + 1] + h11 * h * E[k + 1]
        return phi, slope


def one_sided_logdet(p: torch.Tensor, x: torch.Tensor, spectrum: LogSpectrum) -> torch.Tensor:
    """``Σ_ij log(x_i a_j + p_i) = Σ_i [n log p_i + Φ_A(x_i / p_i)]`` (float64 scalar, differentiable in ``p``).

    Args:
        p: ``[out]`` projected precisions of the varying side, ``> 0``.
        x: ``[out]`` that side's eigenvalues over the temperature, ``g_i / T ≥ 0``.
        spectrum: :class:`LogSpectrum` of the other side's eigenvalues ``a`` (``n`` of them).
    """
    return _OneSidedLogdet.apply(p, x, spectrum)


class _OneSidedLogdet(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p, x, spectrum):
        p64 = p.detach().to(torch.float64)
        phi, slope = spectrum(x.to(torch.float64) / p64)
        ctx.save_for_backward((spectrum.n - slope) / p64)
        return (spectrum.n * p64.log() + phi).sum()

    @staticmethod
    def backward(ctx, grad_out):
        (grad_p,) = ctx.saved_tensors
        return grad_out * grad_p, None, None
