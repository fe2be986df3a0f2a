"""Laplace log marginal likelihood of the prunable layers and its optimisation in ``log δ``.

    log Z(δ) ≈ −Σ_n ℓ_n / T − ½ θᵀ diag(δ) θ + ½ Σ_i log δ_i − ½ log det(H / T + diag(δ))

over the covered parameters θ (the modules of the prior), with ``H`` block-diagonal across modules:
KFAC blocks ``G ⊗ A`` (log-det through :class:`~spam_hf.kron.KronEigen`, exact for scalar/layer
priors, the Hadamard upper bound for unit/parameter priors) or a diagonal (exact log-det of the
diagonal approximation). Constants in ``2π`` cancel and are omitted. Everything is float64.

:func:`optimize_prior` reduces the weights once to what ``θᵀΔθ`` needs (:class:`SquaredWeights`) and, where the
prior is constant along one side of a KFAC block, the log-determinant is read from a table of that side's
spectrum (:mod:`spam_hf.spectrum`): a hyper-step costs ``O(out + in)`` per module, not ``O(out · in)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import torch

from .distributed import all_reduce_sum
from .kron import KronEigen, Precision, rank_one_logdet
from .priors import LazyParams, PriorPrecision

Curvature = Union[Dict[str, KronEigen], Dict[str, torch.Tensor]]


def log_marginal_likelihood(prior: PriorPrecision, curvature: Curvature, params: Dict[str, torch.Tensor],
                            loss_sum: float = 0.0, temperature: float = 1.0,
                            modules: Optional[Sequence[str]] = None) -> torch.Tensor:
    """``log Z(δ)`` (a float64 scalar, differentiable in ``prior.log_delta``).

    Args:
        prior: the prior precisions.
        curvature: per module either a :class:`KronEigen` (KFAC) or the diagonal ``diag H``
            (``out × (in+1)``), already extrapolated to the full data set.
        params: per module the float64 augmented weights ``[W | b]`` (``out × (in+1)``); a mapping that makes
            them when read (:class:`~spam_hf.priors.LazyParams`) holds one at a time.
        loss_sum: ``Σ_n ℓ_n`` at θ (constant in δ; only shifts the value).
        temperature: ``T``.
        modules: the modules whose terms this process computes (those whose curvature it owns, a sharded model:
            :mod:`spam_hf.sharding`); their sum is then summed over processes, and is no longer differentiable.
            Default: every module of the prior.
    """
    _check_inputs(prior, curvature, params, temperature, modules)
    total = torch.zeros((), dtype=torch.float64)
    for m in prior.modules if modules is None else modules:
        total = total + module_term(prior, curvature, params, m, temperature)
    if modules is not None:
        total = all_reduce_sum(total.detach())
    return total - float(loss_sum) / temperature


def _check_inputs(prior: PriorPrecision, curvature: Curvature, params: Dict[str, torch.Tensor], temperature: float,
                  modules: Optional[Sequence[str]] = None) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    missing = [m for m in (prior.modules if modules is None else modules) if m not in curvature or m not in params]
    if missing:
        raise ValueError(f"marginal likelihood: no curvature or parameters for {len(missing)} module(s), e.g. {missing[:3]}")


@dataclass
class SquaredWeights:
    """What ``θᵀΔθ = Σ_ij Δ_ij W²_ij`` needs of one module's augmented weights ``W = [W | b]`` (``out × (in+1)``),
    reduced once per prior update instead of re-read at every hyper-step: the row sums ``W² 1`` (``[out]``) and
    column sums ``1ᵀ W²`` (``[in+1]``), which suffice for a rank-one ``Δ = u vᵀ`` constant along one side
    (``uᵀ W² v = v₀ · uᵀ(W² 1)`` when ``v = v₀ 1``), and ``W²`` itself only when the prior varies along both
    (:meth:`~spam_hf.priors.PriorPrecision.constant_sides` is ``(False, False)``: a parameter prior)."""

    row_sums: torch.Tensor
    col_sums: torch.Tensor
    full: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, w_aug: torch.Tensor, keep_full: bool = True) -> "SquaredWeights":
        w2 = w_aug.to(torch.float64).square()
        return cls(w2.sum(1), w2.sum(0), w2 if keep_full else None)

    @property
    def shape(self) -> tuple:
        return (self.row_sums.numel(), self.col_sums.numel())

    def quadratic(self, prec: Precision) -> torch.Tensor:
        """``Σ_ij Δ_ij W²_ij`` (float64, differentiable in the precision)."""
        if prec.is_rank_one:
            if bool((prec.v == prec.v[0]).all()):
                return prec.v[0] * (prec.u @ self.row_sums)
            if bool((prec.u == prec.u[0]).all()):
                return prec.u[0] * (self.col_sums @ prec.v)
        if self.full is None:
            raise ValueError("this precision varies along both sides: SquaredWeights needs keep_full=True")
        return prec.quadratic(self.full)


def squared_weights(prior: PriorPrecision, params: Dict[str, torch.Tensor],
                    modules: Optional[Sequence[str]] = None) -> Dict[str, SquaredWeights]:
    """:class:`SquaredWeights` of every covered module (or of ``modules``), reading each of ``params`` once (a
    :class:`~spam_hf.priors.LazyParams` makes one float64 copy at a time); ``W²`` is kept only for modules whose
    prior varies along both sides. Of a sharded model the sums are reduced from each process's rows
    (:func:`spam_hf.sharding.squared_sums`), for every module in turn on every process."""
    wanted = set(prior.modules if modules is None else modules)
    out = {}
    for m in prior.modules:
        keep_full = prior.constant_sides(m) == (False, False)
        if isinstance(params, LazyParams) and params.sharded:  # collectives: every process, every module
            squares = SquaredWeights(*params.squared_sums(m, keep_full))
        elif m in wanted:
            squares = SquaredWeights.of(params[m], keep_full=keep_full)
        else:
            continue
        if m in wanted:
            out[m] = squares
    return out


def module_term(prior: PriorPrecision, curvature: Curvature, params: Dict[str, torch.Tensor], m: str,
                temperature: float = 1.0) -> torch.Tensor:
    """Module ``m``'s share of ``log Z``: ``−½ θᵀΔθ + ½ Σ log δ − ½ log det(H_m / T + Δ)``.

    ``params[m]`` is the augmented weight ``[W | b]`` or its :class:`SquaredWeights`."""
    prec = prior.precision(m)
    w = params[m]
    squares = w if isinstance(w, SquaredWeights) else SquaredWeights.of(w)
    if squares.shape != prior.shapes[m]:
        raise ValueError(f"parameters of {m!r} have shape {squares.shape}, prior expects {prior.shapes[m]}")
    term = -0.5 * squares.quadratic(prec) + 0.5 * prec.log_sum()
    curv = curvature[m]
    if isinstance(curv, KronEigen):
        if curv.shape != prior.shapes[m]:
            raise ValueError(f"KFAC factors of {m!r} are {curv.shape}, prior expects {prior.shapes[m]}")
        return term - 0.5 * curv.logdet(prec, temperature)
    if tuple(curv.shape) != prior.shapes[m]:
        raise ValueError(f"diagonal curvature of {m!r} is {tuple(curv.shape)}, prior expects {prior.shapes[m]}")
    if prec.is_rank_one:  # blocked, without the out × (in+1) graph (kron.rank_one_logdet)
        return term - 0.5 * rank_one_logdet(prec.u.to(torch.float64), prec.v.to(torch.float64), temperature,
                                            diagonal=curv)
    return term - 0.5 * torch.log(curv.to(torch.float64) / temperature + prec.matrix()).sum()


def backward_log_marginal_likelihood(prior: PriorPrecision, curvature: Curvature, params: Dict[str, torch.Tensor],
                                     loss_sum: float = 0.0, temperature: float = 1.0,
                                     modules: Optional[Sequence[str]] = None) -> float:
    """Accumulate ``−∂ log Z / ∂ log δ`` into the prior's ``.grad`` one module at a time; returns ``log Z``.

    Same value and gradient as ``(-log_marginal_likelihood(...)).backward()``, but only one module's
    autograd graph (its ``out × (in+1)`` float64 intermediates) is alive at a time. With ``modules`` (this
    process's share, :func:`log_marginal_likelihood`) the gradients and the value are then summed over processes,
    so every process holds the whole gradient and takes the same step.
    """
    _check_inputs(prior, curvature, params, temperature, modules)
    total, bad = 0.0, None
    for m in prior.modules if modules is None else modules:
        term = module_term(prior, curvature, params, m, temperature)
        if not torch.isfinite(term):
            bad = f"log marginal likelihood term of {m!r} is {float(term)}"
            break
        (-term).backward()
        total += float(term.detach())
    if modules is not None:  # every process learns of a bad term before the sums (none may wait for the others)
        if float(all_reduce_sum(torch.tensor(float(bad is not None)))) > 0:
            bad = bad or "a log marginal likelihood term of another process's modules is not finite"
        else:
            total = _sum_over_processes(prior, total)
    if bad:
        raise FloatingPointError(f"{bad}; check curvature and weights for NaN")
    return total - float(loss_sum) / temperature


def _sum_over_processes(prior: PriorPrecision, value: float) -> float:
    """Sum each ``log δ`` gradient (none: zero) and ``value`` over processes, in place; returns the summed value."""
    for p in prior.parameters():
        p.grad = all_reduce_sum(p.grad if p.grad is not None else torch.zeros_like(p))
    return float(all_reduce_sum(torch.tensor(value, dtype=torch.float64)))


@dataclass
class HyperStepResult:
    log_marglik: List[float]

    @property
    def final(self) -> float:
        return self.log_marglik[-1]


def optimize_prior(prior: PriorPrecision, curvature: Curvature, params: Dict[str, torch.Tensor],
                   n_steps: int = 50, lr: float = 0.1, loss_sum: float = 0.0, temperature: float = 1.0,
                   optimizer_state: Optional[dict] = None, progress: bool = False,
                   modules: Optional[Sequence[str]] = None) -> HyperStepResult:
    """Maximise ``log Z`` over ``log δ`` with ``n_steps`` Adam steps; ``log δ`` clamped and NaN-free.

    ``optimizer_state`` (a dict) carries Adam's moments across calls when given; ``progress`` shows a progress bar;
    ``modules``: this process's share of the terms (:func:`log_marginal_likelihood`).
    """
    from tqdm.auto import tqdm

    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    opt = torch.optim.Adam(prior.parameters(), lr=lr)
    if optimizer_state and optimizer_state.get("adam"):
        try:
            opt.load_state_dict(optimizer_state["adam"])
        except ValueError:
            pass  # prior structure changed (e.g. after pruning): start Adam afresh
    _check_inputs(prior, curvature, params, temperature, modules)
    # θ is fixed while δ moves: read every weight once, not per step
    params = squared_weights(prior, params, modules)
    history: List[float] = []
    for _ in tqdm(range(n_steps), desc="prior fit: hyper-steps", disable=not progress, leave=False):
        opt.zero_grad(set_to_none=True)
        value = backward_log_marginal_likelihood(prior, curvature, params, loss_sum, temperature, modules)
        for p in prior.parameters():
            if p.grad is not None:
                p.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        opt.step()
        prior.clamp_()
        history.append(value)
    with torch.no_grad():
        history.append(float(log_marginal_likelihood(prior, curvature, params, loss_sum, temperature, modules)))
    if optimizer_state is not None:
        optimizer_state["adam"] = opt.state_dict()
    return HyperStepResult(history)
