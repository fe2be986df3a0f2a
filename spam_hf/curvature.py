"""KFAC and diagonal curvature of Linear/Conv1D layers, accumulated from hooks during training steps.

For a layer with input ``a`` (augmented with a 1 for the bias) and ``g`` the gradient of the
*summed* loss with respect to its output:

* KFAC: ``H ≈ G ⊗ A`` with ``A = Σ a aᵀ / n_m`` over the ``n_m`` rows in which the layer's input is not all
  zero and ``G = (N / n_g) Σ g gᵀ``, extrapolated to the ``N`` training examples (tokens for token-level losses).
  ``n_m`` is every row seen (``n``) for an ordinary layer; a mixture-of-experts expert sees the tokens not routed
  to it as zero rows (with zero output gradients), so its ``A`` averages over the tokens routed to it: ``G ⊗ A``
  then estimates ``Σ_routed g gᵀ ⊗ a aᵀ`` as KFAC does for any layer, where dividing by every token would shrink
  an expert's curvature by its share of the tokens.
* diagonal: ``diag H ≈ (N / n_g) Σ (g∘g)(a∘a)ᵀ``.

Wide factors (``diagonal_from``): a KFAC factor of width ``d ≥ diagonal_from`` (the MLP of an LLM: down's input,
gate's and up's outputs; the input of a LoRA ``A`` on down) keeps only its diagonal, ``Σ a∘a`` or ``Σ g∘g``:
``H ≈ G ⊗ diag(A)`` (or ``diag(G) ⊗ A``). That is ``d`` numbers instead of ``d²`` and no ``O(d³)``
eigendecomposition, and a unit prior on that side (MLP neurons are down's input columns and gate's / up's output
rows) stays exact in the log-determinant (:mod:`spam_hf.kron`). Group damage and compensation need the whole
factors: calibration posteriors never use the approximation.

``n_g`` is the number of loss units (examples) the summed rows stand for: ``n`` for one row per example
(``"reduce"``) and for token-level losses, but ``examples · n / rows before subsampling`` when a
sequence-level loss is expanded into token rows, whose ``Σ_t g_t g_tᵀ`` belongs to one example.

Sequences (Eschenhagen et al., NeurIPS 2023): ``"expand"`` treats every (non-padding) token as a row;
``"reduce"`` makes one row per sequence with ``â = mean_t a_t`` and ``ĝ = Σ_t g_t`` over
non-padding tokens. Padding positions never contribute.

Gradients ``g`` come from one extra backward of a *sampled* loss through the same forward graph
(``torch.autograd.grad`` w.r.t. the layer outputs): labels drawn from the model's predictive
distribution give the MC Fisher (= GGN in expectation, the default); the true labels give the
empirical Fisher (labelled as such, it is not the GGN).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .architectures.base import lookup_linear, weight_out_in
from .checks import check_choice
from .choices import CURVATURE_KINDS, DIAGONAL_FROM, FISHER_TYPES, REDUCTIONS  # noqa: F401  (enforced here)
from .distributed import all_reduce_sum, is_distributed, rank, reduce_to, shard_offset
from .kron import KronEigen

LIKELIHOODS = ("classification", "regression", "causal_lm")


def sampled_loss(logits: torch.Tensor, labels: Optional[torch.Tensor], likelihood: str, fisher: str = "mc",
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The summed negative log-likelihood whose output-gradients give the Fisher's ``g``.

    Args:
        logits: ``[B, C]`` (classification), ``[B, 1]`` or ``[B]`` (regression, unit-variance
            Gaussian), ``[B, T, V]`` (causal LM; position ``t`` predicts token ``t+1``).
        labels: true labels (``-100`` = ignored), needed for ``fisher="empirical"`` and for the
            causal-LM mask.
        fisher: ``"mc"`` draws ``y ~ p(y | f)``; ``"empirical"`` uses ``labels``.

    Monte-Carlo labels are drawn by inversion, ``y = min{c : Σ_{c' ≤ c} p_c' > u}``, from one uniform ``u`` per
    row drawn for the *global* rows of all processes (:func:`~spam_hf.distributed.shard_offset`), so a row's
    label does not depend on how a batch is split over processes.

    Returns:
        ``Σ_n -log p(y_n | f_n)`` over non-ignored rows (a scalar).
    """
    check_choice("likelihood", likelihood, LIKELIHOODS)
    check_choice("fisher_type", fisher, FISHER_TYPES)
    logits = _at_least_float32(logits)
    if likelihood == "causal_lm":
        if labels is None:
            raise ValueError("causal-LM curvature needs `labels` to know which positions count")
        logits = logits[:, :-1].reshape(-1, logits.shape[-1])
        labels = labels[:, 1:].reshape(-1)
    elif likelihood == "regression":
        f = logits.reshape(-1)
        if fisher == "mc":
            y = f.detach() + _global_draws(f.numel(), generator, torch.randn).to(f.device, f.dtype)
        else:
            y = labels.reshape(-1).to(f.dtype)
        return 0.5 * (f - y).square().sum()
    if labels is not None:
        valid = labels != -100
        logits = logits[valid]
        labels = labels[valid]
    if fisher == "mc":
        cdf = logits.detach().softmax(-1).cumsum(-1)  # on the logits' device (an LM's rows × vocab stay there)
        u = _global_draws(cdf.shape[0], generator, torch.rand).to(cdf.device, cdf.dtype)
        y = torch.searchsorted(cdf, u.unsqueeze(1)).squeeze(1).clamp_max(cdf.shape[1] - 1)
    else:
        y = labels
    return F.cross_entropy(logits, y, reduction="sum")


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Half precision computed in float32; float32 and float64 as they are."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _global_draws(n_local: int, generator: Optional[torch.Generator], draw) -> torch.Tensor:
    """This process's ``n_local`` of the draws ``draw(total)`` for the rows of every process (CPU)."""
    offset, total = shard_offset(n_local)
    return draw(total, generator=generator)[offset: offset + n_local]


@dataclass
class _Capture:
    inputs: torch.Tensor
    output: torch.Tensor
    weight: Optional[torch.Tensor] = None  # out × in, for the group-mask Fisher of consuming modules
    rows: Optional[tuple] = None  # (token positions, (B, T)) of a layer that computed on some tokens (an expert)


class CurvatureAccumulator:
    """Running KFAC (or diagonal) curvature sums for a set of named Linear/Conv1D modules.

    Usage inside a training step::

        with acc.capture(model, attention_mask):
            out = model(**batch)
        acc.accumulate(out.logits, batch["labels"])   # extra backward of the sampled loss
        out.loss.backward()                           # the ordinary training backward

    State (``state_dict``) holds plain tensors: ``A``/``G`` (or ``D``) sums and the row count ``n``,
    so it can be saved, loaded and all-reduced. Sums are float32 for float32/bf16/fp16 models
    (half the memory of float64; the eigendecompositions and log-determinants are float64 regardless)
    and float64 for float64 models; ``accumulate_dtype`` overrides.
    """

    def __init__(self, model: nn.Module, module_names: Iterable[str], kind: str = "kfac",
                 reduction: str = "reduce", fisher: str = "mc", likelihood: str = "classification",
                 max_rows_per_batch: Optional[int] = None, seed: int = 0,
                 accumulate_dtype: Optional[torch.dtype] = None, mask_modules: Iterable[str] = (),
                 sides: Iterable[str] = ("A", "G"), diagonal_from: Optional[int] = None,
                 mean_modules: Iterable[str] = ()) -> None:
        check_choice("curvature", kind, CURVATURE_KINDS)
        if diagonal_from is not None and diagonal_from < 1:
            raise ValueError(f"diagonal_from must be a positive width (or None for whole factors), got {diagonal_from}")
        # KFAC factors at least this wide keep only their diagonal (module docstring); None: every factor whole
        self.diagonal_from = diagonal_from
        # KFAC: which factors to keep; ("G",) holds only the out × out output factors (block-sequential pruning
        # takes the wide input factors one block at a time from the block's inputs)
        self.sides = tuple(sides)
        if not self.sides or any(x not in ("A", "G") for x in self.sides):
            raise ValueError(f"sides must name 'A' and/or 'G', got {self.sides}")
        check_choice("reduction", reduction, REDUCTIONS)
        check_choice("fisher_type", fisher, FISHER_TYPES)
        check_choice("likelihood", likelihood, LIKELIHOODS)
        self.kind, self.reduction, self.fisher, self.likelihood = kind, reduction, fisher, likelihood
        self.max_rows_per_batch = max_rows_per_batch
        self.module_names: List[str] = list(dict.fromkeys(module_names))
        # consuming modules whose input-column mask Fisher M = Σ_n m_n m_nᵀ, m_n = Σ_t x_t ⊙ (Wᵀ g_t), is kept
        self.mask_modules: List[str] = [m for m in dict.fromkeys(mask_modules) if m in self.module_names]
        # modules whose input sum Σ x (``X``, in) is kept: with diag(A) the mean and variance of each input channel
        self.mean_modules: List[str] = [m for m in dict.fromkeys(mean_modules) if m in self.module_names]
        if not self.module_names:
            raise ValueError("no modules to collect curvature for")
        mods = dict(model.named_modules())
        self.shapes: Dict[str, tuple] = {}
        self._biased = set()
        for name in self.module_names:
            fan_in, fan_out, has_bias = lookup_linear(mods, name, "curvature")
            self.shapes[name] = (fan_out, fan_in + int(has_bias))
            if has_bias:
                self._biased.add(name)
        if accumulate_dtype is None:
            w = weight_out_in(mods[self.module_names[0]])
            accumulate_dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        self.dtype = accumulate_dtype
        self.generator = torch.Generator().manual_seed(seed)
        self._captures: Dict[str, _Capture] = {}
        self._mask: Optional[torch.Tensor] = None
        # {module: rank} when the model is sharded (FSDP2): only a module's owner keeps its sums (:meth:`_add`)
        self.owners: Optional[Dict[str, int]] = None
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Drop all accumulated sums. A module's sums are allocated when it first gets rows (or is indexed), so
        an accumulator that never accumulates (a Trainer that only prunes) holds no factor memory."""
        self.n = torch.zeros((), dtype=torch.float64)
        self.n_units = torch.zeros((), dtype=torch.float64)  # loss terms seen (examples, or tokens for causal LM)
        self.n_seen = torch.zeros((), dtype=torch.float64)   # rows before max_rows_per_batch subsampling
        self.reduced = False  # the sums are already summed over processes (all_reduce)
        self.sums: Dict[str, Dict[str, torch.Tensor]] = _LazySums(self._zeros)

    def _sizes(self, name: str) -> Dict[str, tuple]:
        """The sums of module ``name`` and their shapes: ``A`` ((in+1)²) and ``G`` (out²) for KFAC (those in
        ``sides``; a vector, the diagonal, for a factor of ``diagonal_from`` or more), ``D`` (out × (in+1)) for the
        diagonal, ``M`` (in²) for a mask module, ``X`` (in) for a mean module and ``R`` (a count) with ``A`` or
        ``X``: the rows whose input is not all zero."""
        if name not in self.shapes:
            raise KeyError(name)
        out, inp = self.shapes[name]
        sizes = {k: self._factor_shape(n) for k, n in (("A", inp), ("G", out)) if k in self.sides} \
            if self.kind == "kfac" else {"D": (out, inp)}
        width = inp - int(name in self._biased)
        if "A" in sizes or name in self.mean_modules:
            sizes["R"] = ()  # the rows A (and X) average over: those whose input is not all zero
        if name in self.mask_modules:
            sizes["M"] = (width, width)
        if name in self.mean_modules:
            sizes["X"] = (width,)
        return sizes

    def owns(self, name: str) -> bool:
        """Whether this process keeps module ``name``'s sums (every module unless :attr:`owners` says otherwise)."""
        return self.owners is None or self.owners[name] == rank()

    def factor_elements(self) -> Dict[str, int]:
        """``{module: elements of its sums}``: what a process that owns the module holds (for :attr:`owners`)."""
        return {m: sum(math.prod(shape) for shape in self._sizes(m).values()) for m in self.module_names}

    def _factor_shape(self, n: int) -> tuple:
        return (n,) if kept_diagonal(n, self.diagonal_from) else (n, n)

    @property
    def whole_factors(self) -> bool:
        """Whether every KFAC factor is kept whole (what group damage and compensation need)."""
        return self.kind == "kfac" and not any(kept_diagonal(n, self.diagonal_from)
                                               for shp in self.shapes.values() for n in shp)

    def _zeros(self, name: str) -> Dict[str, torch.Tensor]:
        return {k: torch.zeros(shape, dtype=torch.float64 if k == "R" else self.dtype)
                for k, shape in self._sizes(name).items()}

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Flat ``{"<module>.<A|G|D>": tensor, "n": count}`` (safetensors-friendly)."""
        state = {f"{m}.{k}": v.cpu() for m, d in self.sums.items() for k, v in d.items()}
        state["n"] = self.n.reshape(1)
        state["n_units"] = self.n_units.reshape(1)
        state["n_seen"] = self.n_seen.reshape(1)
        return state

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Load sums saved by :meth:`state_dict`; a clear error on missing keys or mismatched shapes."""
        if "n" not in state:
            raise ValueError("curvature state has no row count 'n'")
        empty = float(state["n"].reshape(())) <= 0  # saved before any rows: no factors were allocated
        self.sums = _LazySums(self._zeros)
        for m in self.shapes:
            sizes = self._sizes(m)
            if empty and not any(f"{m}.{k}" in state for k in sizes):
                continue
            loaded = {}
            for k, shape in sizes.items():
                key = f"{m}.{k}"
                if k == "R":  # files written before row counts per module: every row
                    loaded[k] = state.get(key, state["n"]).to(torch.float64).reshape(()).clone()
                    continue
                if key not in state:
                    raise ValueError(f"curvature state has no factor {key!r} (curvature kind {self.kind!r})")
                if tuple(state[key].shape) != shape:
                    raise ValueError(f"curvature factor {key!r} has shape {tuple(state[key].shape)}, "
                                     f"the model needs {shape}")
                loaded[k] = state[key].to(self.dtype).clone()
            self.sums[m] = loaded
        self.reduced = False  # saved sums are a process's own (checkpoints are written between reductions)
        self.n = state["n"].to(torch.float64).reshape(())
        # files written before n_seen existed: no subsampling record, and n_units only with a mask Fisher
        self.n_units = state["n_units"].to(torch.float64).reshape(()) if "n_units" in state else torch.zeros((), dtype=torch.float64)
        self.n_seen = state["n_seen"].to(torch.float64).reshape(()) if "n_seen" in state else self.n.clone()

    def all_reduce(self) -> None:
        """Sum factors and counts over processes (``torch.distributed``), in place, once: a second call
        before new rows arrive is a no-op (so is a single process). Rows accumulated after a reduction
        and before :meth:`reset` would be mixed with global sums; that raises in :meth:`accumulate`."""
        if not is_distributed() or self.reduced:
            return
        if self.owners is not None:  # owned sums are reduced at every step (accumulate)
            self.reduced = True
            return
        for m in self.shapes:  # every process reduces every module, whether it saw rows for it or not
            self.sums[m]
        for d in self.sums.values():
            for k, v in d.items():
                d[k] = all_reduce_sum(v)
        counts = all_reduce_sum(torch.stack([self.n, self.n_units, self.n_seen]))
        self.n, self.n_units, self.n_seen = counts[0], counts[1], counts[2]
        self.reduced = True

    # ------------------------------------------------------------------ capture
    @contextlib.contextmanager
    def capture(self, model: nn.Module, mask: Optional[torch.Tensor] = None) -> Iterator[None]:
        """Record inputs and outputs of the tracked modules during one forward.

        Args:
            mask: ``[B, T]`` with 1 for real tokens and 0 for padding (``attention_mask``).
        """
        mods = dict(model.named_modules())
        handles = []
        self._captures = {}
        self._mask = mask

        def make_hook(name: str):
            def hook(module, inputs, output):
                if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) or not output.requires_grad:
                    return
                weight = weight_out_in(module).detach() if name in self.mask_modules else None
                self._captures[name] = _Capture(inputs[0].detach(), output, weight,
                                                getattr(module, TOKEN_ROWS, None))
            return hook

        for name in self.module_names:
            if name not in mods:
                raise ValueError(f"curvature: module {name!r} is not in the model")
            handles.append(mods[name].register_forward_hook(make_hook(name)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _rows(self, x: torch.Tensor, reduce_op: str, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[rows, d]`` from a ``[B, T, d]`` (or ``[B, d]``) tensor, masking padding.

        ``reduce_op="mean"`` averages over real tokens, or, with ``weights`` (``[B, T]``, summing to 1
        per sequence), takes that weighted average.
        """
        x = _at_least_float32(x)
        if x.dim() == 2:
            return x
        x = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() > 3 else x
        mask = self._mask
        if mask is None:
            mask = torch.ones(x.shape[:2], device=x.device)
        if mask.shape != x.shape[:2]:
            raise ValueError(f"curvature mask has shape {tuple(mask.shape)} but the layer sees {tuple(x.shape[:2])}")
        m = mask.to(x.dtype).to(x.device)
        if self.reduction == "expand":
            return x[m.bool()]
        if reduce_op == "mean" and weights is not None:
            return torch.einsum("bt,btd->bd", weights.to(x.dtype) * m, x)
        summed = torch.einsum("bt,btd->bd", m, x)
        if reduce_op == "mean":
            summed = summed / m.sum(1, keepdim=True).clamp_min(1.0)
        return summed

    def _gradient_weights(self, grad: torch.Tensor) -> Optional[torch.Tensor]:
        """``w_t = ‖g_t‖ / Σ_s ‖g_s‖`` over real tokens (uniform where a sequence has no gradient)."""
        if self.reduction != "reduce-gw" or grad.dim() != 3:
            return None
        m = (self._mask if self._mask is not None else torch.ones(grad.shape[:2])).to(grad.device).float()
        norms = grad.float().norm(dim=-1) * m
        total = norms.sum(1, keepdim=True)
        uniform = m / m.sum(1, keepdim=True).clamp_min(1.0)
        return torch.where(total > 0, norms / total.clamp_min(1e-30), uniform)

    def accumulate(self, logits: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Add this batch's curvature to the sums; returns the sampled loss (detached).

        Must follow a forward run under :meth:`capture`, before the training backward frees the graph.
        """
        if self.reduced and self.owners is None:
            raise RuntimeError("curvature: these sums were already summed over processes; reset() before "
                               "accumulating new batches")
        missing = [m for m in self.module_names if m not in self._captures]
        if missing:
            raise RuntimeError(f"curvature: no forward captured for {len(missing)} module(s), e.g. {missing[:3]}; "
                               "run the forward inside `capture()` with gradients enabled")
        for name in self.module_names:  # allocated now, in the modules' order (what every later loop follows)
            if self.owns(name):
                self.sums[name]
        loss = sampled_loss(logits, labels, self.likelihood, self.fisher, self.generator)
        names = list(self._captures)
        outputs = [self._captures[m].output for m in names]
        grads = torch.autograd.grad(loss, outputs, retain_graph=True, allow_unused=True)
        rows_kept: Optional[torch.Tensor] = None
        n_rows = n_seen = None
        for name, grad in zip(names, grads):
            cap = self._captures[name]
            if grad is None:
                grad = torch.zeros_like(cap.output)
            inputs = cap.inputs
            if cap.rows is not None:  # an expert's rows, back at their tokens (zero elsewhere)
                inputs, grad = scatter_rows(inputs, cap.rows), scatter_rows(grad, cap.rows)
            a = self._rows(inputs, "mean", self._gradient_weights(grad))
            g = self._rows(grad, "sum")
            if self.shapes[name][1] == a.shape[1] + 1:
                a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
            if n_seen is None:
                n_seen = a.shape[0]
            if rows_kept is None and self.max_rows_per_batch and a.shape[0] > self.max_rows_per_batch:
                rows_kept = torch.randperm(a.shape[0], generator=self.generator)[: self.max_rows_per_batch].to(a.device)
            if rows_kept is not None:
                a, g = a[rows_kept], g[rows_kept]
            if n_rows is not None and a.shape[0] != n_rows:
                raise ValueError(f"curvature: module {name!r} sees {a.shape[0]} rows but others see {n_rows}; "
                                 "all tracked modules must see the same tokens")
            n_rows = a.shape[0]
            sizes = self._sizes(name)
            rows: Dict[str, torch.Tensor] = {}  # this batch's share of each sum
            if self.kind == "kfac":
                for k, x in (("A", a), ("G", g)):
                    if k in sizes:
                        rows[k] = (x.square().sum(0) if len(sizes[k]) == 1 else x.T @ x).to(self.dtype)
            else:
                rows["D"] = (g.square().T @ a.square()).to(self.dtype)
            if cap.weight is not None:
                m = self._mask_gradients(inputs, grad, cap.weight)
                rows["M"] = (m.T @ m).to(self.dtype)
            if "X" in sizes:  # the same rows as A (bias column dropped)
                rows["X"] = a[:, : sizes["X"][0]].sum(0).to(self.dtype)
            if "R" in sizes:
                rows["R"] = nonzero_rows(a[:, : a.shape[1] - int(name in self._biased)])
            self._add(name, rows)
        counts = torch.tensor([float(n_rows or 0), float(n_seen or 0), self._loss_units(logits, labels)],
                              dtype=torch.float64)
        if self.owners is not None:  # the sums just added hold every process's rows: so do the counts
            counts = all_reduce_sum(counts)
            self.reduced = False  # new losses since the last reduction (the sums need none)
        self.n += counts[0]
        self.n_seen += counts[1]
        self.n_units += counts[2]
        self._captures = {}
        self._mask = None
        return loss.detach()

    def _add(self, name: str, rows: Dict[str, torch.Tensor]) -> None:
        """Add one batch's ``rows`` (``{sum key: tensor}``) to module ``name``'s sums. With :attr:`owners` (a
        sharded model) the batch's sums of every process are first reduced onto the module's owner, and only the
        owner keeps them; every process calls this for every module, in the same order."""
        if self.owners is not None:
            rows = {k: reduce_to(v, self.owners[name]) for k, v in rows.items()}
            if not self.owns(name):
                return
        s = self.sums[name]
        for k, v in rows.items():
            if s[k].device != v.device:  # sums live on the device that produces the rows
                s[k] = s[k].to(v.device)
            s[k] += v.to(s[k].dtype)

    def _mask_gradients(self, x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``[B, in]``: per example, the gradient of the loss w.r.t. a multiplicative mask on each input column,
        ``m_bc = Σ_t x_btc (Wᵀ g_bt)_c`` (padding masked)."""
        x, grad = _at_least_float32(x), _at_least_float32(grad)
        if x.dim() == 2:
            x, grad = x.unsqueeze(1), grad.unsqueeze(1)
        dx = grad @ weight.to(grad.device, grad.dtype)
        if self._mask is not None and self._mask.shape == x.shape[:2]:
            dx = dx * self._mask.to(dx.device, dx.dtype).unsqueeze(-1)
        return torch.einsum("bti,bti->bi", x, dx)

    def _loss_units(self, logits: torch.Tensor, labels: Optional[torch.Tensor]) -> float:
        """Loss terms of this batch: examples, or predicted tokens for causal LM."""
        if self.likelihood == "causal_lm" and labels is not None:
            return float((labels[:, 1:] != -100).sum())
        return float(logits.shape[0])

    # ------------------------------------------------------------------ results
    def _check_ready(self) -> None:
        if float(self.n) <= 0:
            raise RuntimeError("no curvature accumulated yet")

    @property
    def n_g(self) -> float:
        """Loss units the ``G`` (and ``D``) sums stand for (module docstring): ``n`` unless a sequence-level
        loss was expanded into token rows, then ``examples · n / rows seen``."""
        n, units, seen = float(self.n), float(self.n_units), float(self.n_seen)
        if self.likelihood == "causal_lm" or units <= 0 or seen <= 0:
            return n
        return units * n / seen

    def rows(self, name: str) -> float:
        """``n_m``: the rows module ``name``'s input factor averages over (module docstring; at least 1)."""
        s = self.sums[name]
        return max(float(s["R"]) if "R" in s else float(self.n), 1.0)

    def kron(self, n_data: float, keep_vectors: bool = False,
             values_only: Optional[Dict[str, Tuple[bool, bool]]] = None, progress: bool = False) -> Dict[str, KronEigen]:
        """Eigendecomposed KFAC per module, extrapolated to ``n_data``: ``G = (N/n_g) ΣggT``, ``A = ΣaaT / n_m``;
        ``values_only[m]``: the sides of ``m`` whose prior is constant (eigenvalues only, :class:`KronEigen`);
        ``progress``: a progress bar over the modules (the slow part of a prior fit at LLM width)."""
        from tqdm.auto import tqdm

        if self.kind != "kfac":
            raise ValueError("kron() needs curvature='kfac'")
        self._check_ready()
        n_g = self.n_g
        out = {}
        shared: list = []  # equal factors (Q/K/V's and gate/up's A: the same inputs) are decomposed once
        for m, s in tqdm(self.sums.items(), desc="prior fit: eigendecompositions", disable=not progress,
                         leave=False):
            try:
                out[m] = KronEigen(s["G"] * (n_data / n_g), s["A"] / self.rows(m), keep_vectors, shared=shared,
                                   values_only=(values_only or {}).get(m, (False, False)))
            except FloatingPointError as e:  # name the module: the factor alone does not say which one diverged
                raise FloatingPointError(f"KFAC factors of {m!r}: {e}; check curvature and weights for NaN") from e
        return out

    def mask_fisher(self, n_data: float) -> Dict[str, torch.Tensor]:
        """``{module: M · N / units}`` (float64, ``in × in``): the Fisher of multiplicative masks on the input
        columns of each consuming module, extrapolated to ``n_data`` loss terms. ``1_Cᵀ M 1_C`` is the
        exact (not Kronecker) ``Δθᵀ F Δθ`` of zeroing columns ``C``."""
        if float(self.n_units) <= 0:
            raise RuntimeError("no mask Fisher accumulated (mask_modules empty or no batch seen)")
        scale = n_data / float(self.n_units)
        return {m: self.sums[m]["M"].to(torch.float64).cpu() * scale for m in self.mask_modules}

    def input_moments(self) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """``{mean module: (mean, variance)}`` of each input channel over the rows seen (float64, CPU, ``[in]``):
        ``x̄ = Σx / n_m`` and ``Σx² / n_m − x̄²`` (the second moment is the diagonal of the ``A`` sum)."""
        self._check_ready()
        out = {}
        for m in self.mean_modules:
            s, n = self.sums[m], self.rows(m)
            if "A" not in s:
                raise ValueError("input moments need the input factors (sides including 'A', curvature 'kfac')")
            mean = s["X"].to("cpu", torch.float64) / n
            second = _diagonal(s["A"]).to("cpu", torch.float64)[: mean.numel()] / n
            out[m] = (mean, (second - mean.square()).clamp_min(0.0))
        return out

    def diagonal(self, n_data: float) -> Dict[str, torch.Tensor]:
        """``diag H`` per module as ``out × (in+1)`` (from the KFAC factors' diagonals when ``kind='kfac'``)."""
        self._check_ready()
        return diagonal_from_state(self.diagonal_state(), n_data)

    def diagonal_state_keys(self) -> set:
        """The keys :meth:`diagonal_state` writes for these modules (without allocating their sums)."""
        per_module = (".Gdiag", ".Adiag", ".Arows") if self.kind == "kfac" else (".D",)
        return {"n", "n_g"} | {f"{m}{k}" for m in self.shapes for k in per_module}

    def diagonal_state(self) -> Dict[str, torch.Tensor]:
        """What :meth:`diagonal` needs, compactly (CPU, float64): ``"<m>.Gdiag"``/``"<m>.Adiag"`` (the
        factors' diagonals, ``out + in + 1`` numbers per module, and ``"<m>.Arows"``, ``n_m``) for KFAC, ``"<m>.D"``
        for the diagonal kind, and ``"n"``. Kept after a prior update instead of the full factors."""
        state: Dict[str, torch.Tensor] = {"n": self.n.reshape(1).clone(),
                                          "n_g": torch.tensor([self.n_g], dtype=torch.float64)}
        for m, s in self.sums.items():
            if self.kind == "kfac":
                state[f"{m}.Gdiag"] = _diagonal(s["G"]).to("cpu", torch.float64)
                state[f"{m}.Adiag"] = _diagonal(s["A"]).to("cpu", torch.float64)
                state[f"{m}.Arows"] = torch.tensor([self.rows(m)], dtype=torch.float64)
            else:
                state[f"{m}.D"] = s["D"].to("cpu", torch.float64)
        return state


def kept_diagonal(width: int, diagonal_from: Optional[int]) -> bool:
    """Whether a KFAC factor of ``width`` keeps only its diagonal (module docstring; ``None`` or 0: never)."""
    return bool(diagonal_from) and width >= diagonal_from


def _diagonal(factor: torch.Tensor) -> torch.Tensor:
    """The diagonal of a KFAC factor sum: a matrix's diagonal, or the vector a wide factor keeps."""
    return factor if factor.dim() == 1 else factor.diagonal()


class _LazySums(dict):
    """``{module: {factor: tensor}}`` whose entries are made by ``factory(module)`` when first indexed."""

    def __init__(self, factory) -> None:
        super().__init__()
        self._factory = factory

    def __missing__(self, name: str) -> Dict[str, torch.Tensor]:
        value = self._factory(name)
        self[name] = value
        return value


def diagonal_from_state(state: Dict[str, torch.Tensor], n_data: float) -> Dict[str, torch.Tensor]:
    """``diag H`` per module (``out × (in+1)``) from :meth:`CurvatureAccumulator.diagonal_state`:
    ``diag(G)·(N/n_g) ⊗ diag(A)/n_m`` for KFAC, ``D·N/n_g`` for the diagonal kind (``n_g = n_m = n`` in old
    files)."""
    n = float(state["n"].reshape(()))
    if n <= 0:
        raise RuntimeError("no curvature accumulated yet")
    n_g = float(state["n_g"].reshape(())) if "n_g" in state else n
    out = {}
    for key, value in state.items():
        if key.endswith(".Gdiag"):
            m = key[: -len(".Gdiag")]
            rows = float(state[f"{m}.Arows"].reshape(())) if f"{m}.Arows" in state else n
            out[m] = torch.outer(value * (n_data / n_g), state[f"{m}.Adiag"] / rows)
        elif key.endswith(".D"):
            out[key[: -len(".D")]] = value * (n_data / n_g)
    return out


#: attribute a layer carries during a call on some of the tokens only (a mixture-of-experts expert:
#: :class:`~spam_hf.architectures.moe.RoutedExperts`): ``(LongTensor positions in the flattened B·T tokens, (B, T))``
TOKEN_ROWS = "spam_token_rows"


def scatter_rows(t: torch.Tensor, rows: tuple) -> torch.Tensor:
    """``[n, d]`` rows computed at token positions ``rows[0]`` as ``[B, T, d]`` (``rows[1] = (B, T)``), zero at the
    other tokens."""
    index, shape = rows
    full = t.new_zeros(math.prod(shape), t.shape[-1])
    full.index_copy_(0, index.to(t.device), t.reshape(-1, t.shape[-1]))
    return full.view(*shape, t.shape[-1])


def token_layout(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A layer's input or output ``t`` in the model's token layout: ``t`` itself, or for a layer that computed on
    some of the tokens only (:data:`TOKEN_ROWS`, read during its call) those rows at their tokens, zero elsewhere."""
    rows = getattr(module, TOKEN_ROWS, None)
    return t if rows is None else scatter_rows(t, rows)


def nonzero_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` (``[rows, d]``) with a non-zero entry (every row when ``d = 0``): a scalar on ``x``'s device
    (no synchronisation with the host)."""
    if x.shape[1] == 0:
        return torch.full((), x.shape[0], device=x.device, dtype=torch.float64)
    return (x != 0).any(dim=1).sum().to(torch.float64)


def weight_aug(module: nn.Module) -> torch.Tensor:
    """``W_aug = [W | b]`` (``out × (in+1)``; no bias column when the layer has no bias), detached."""
    w = weight_out_in(module).detach()
    b = getattr(module, "bias", None)
    if b is None:
        return w
    return torch.cat([w, b.detach().unsqueeze(1)], dim=1)
