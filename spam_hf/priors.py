"""Gaussian prior precisions ``θ ~ N(0, diag(δ)⁻¹)`` over the prunable layers, stored as ``log δ``.

Kinds (design §4):

* ``scalar``: one δ for every covered parameter;
* ``layer``: one δ per Linear module;
* ``unit``: one δ per group (attention head, MLP neuron, LoRA rank), applied to every slice the
  group owns; entries owned by no group (the bias of the attention output and MLP down
  projections) get one δ per module;
* ``parameter``: one δ per parameter.

Each module's precision is a :class:`~spam_hf.kron.Precision` over its ``out × (in+1)``
augmented weight ``[W | b]``; it is rank one for every kind but ``parameter``.

MAP penalty per batch (added to the mean loss): ``(1 / 2N) Σ_i δ_i θ_i²``.
"""

from __future__ import annotations

from collections.abc import Mapping

from typing import Dict, Iterable, List, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .architectures.base import GroupSpec, lookup_linear, weight_out_in
from .curvature import weight_aug
from .checks import check_choice
from .choices import PRIOR_KINDS
from .kron import Precision
from .sharding import is_sharded, local_rows, squared_sums

LOG_DELTA_MIN, LOG_DELTA_MAX = -20.0, 25.0


class PriorPrecision:
    """Learnable log prior precisions for the modules touched by ``specs``.

    Args:
        model: the model (read for module shapes only).
        specs: the group specs (from :func:`spam_hf.architectures.group_specs`).
        kind: one of ``scalar``, ``layer``, ``unit``, ``parameter``.
        init: initial precision δ₀ (> 0) for every entry.
    """

    def __init__(self, model: nn.Module, specs: Iterable[GroupSpec], kind: str = "unit", init: float = 1.0) -> None:
        check_choice("prior", kind, PRIOR_KINDS)
        if not (init > 0 and init < float("inf")):
            raise ValueError(f"prior precision init must be a positive finite number, got {init}")
        self.kind = kind
        self.specs: List[GroupSpec] = list(specs)
        mods = dict(model.named_modules())
        self.shapes: Dict[str, Tuple[int, int]] = {}  # name -> (out, in+1 or in)
        self.has_bias: Dict[str, bool] = {}
        for spec in self.specs:
            for m in spec.modules:
                fan_in, fan_out, self.has_bias[m] = lookup_linear(mods, m, f"prior ({spec.name})")
                self.shapes[m] = (fan_out, fan_in + int(self.has_bias[m]))
        # ownership maps: per module, (spec name, LongTensor of group ids or -1) for rows / cols
        self.row_owner: Dict[str, Tuple[str, torch.Tensor]] = {}
        self.col_owner: Dict[str, Tuple[str, torch.Tensor]] = {}
        for spec in self.specs:
            for m, idx in spec.row_index.items():
                owner = torch.full((self.shapes[m][0],), -1, dtype=torch.long)
                owner[idx.reshape(-1)] = torch.arange(spec.count).repeat_interleave(idx.shape[1])
                self.row_owner[m] = (spec.name, owner)
            for m, idx in spec.col_index.items():
                owner = torch.full((self.shapes[m][1],), -1, dtype=torch.long)  # bias column stays -1
                owner[idx.reshape(-1)] = torch.arange(spec.count).repeat_interleave(idx.shape[1])
                self.col_owner[m] = (spec.name, owner)
        x0 = float(torch.tensor(init, dtype=torch.float64).log())
        self.log_delta: Dict[str, torch.Tensor] = {}
        if kind == "scalar":
            self.log_delta["scalar"] = torch.full((1,), x0, dtype=torch.float64)
        elif kind == "layer":
            for m in self.shapes:
                self.log_delta[f"layer:{m}"] = torch.full((1,), x0, dtype=torch.float64)
        elif kind == "unit":
            for spec in self.specs:
                self.log_delta[f"unit:{spec.name}"] = torch.full((spec.count,), x0, dtype=torch.float64)
            for m in self.shapes:
                if self._has_unowned(m):
                    self.log_delta[f"rest:{m}"] = torch.full((1,), x0, dtype=torch.float64)
        else:
            for m, shape in self.shapes.items():
                self.log_delta[f"param:{m}"] = torch.full(shape, x0, dtype=torch.float64)
        for v in self.log_delta.values():
            v.requires_grad_(True)
        self._cache: Dict = {}  # precisions on the training device, keyed by the log δ versions

    # ------------------------------------------------------------------ structure
    @property
    def modules(self) -> List[str]:
        return list(self.shapes)

    def _has_unowned(self, m: str) -> bool:
        if m in self.row_owner:
            return bool((self.row_owner[m][1] < 0).any())
        if m in self.col_owner:
            return bool((self.col_owner[m][1] < 0).any())
        return True

    def parameters(self) -> List[torch.Tensor]:
        """The float64 ``log δ`` leaves (optimised by the hyper-steps)."""
        return list(self.log_delta.values())

    def clamp_(self) -> None:
        """Keep ``log δ`` finite and within ``[LOG_DELTA_MIN, LOG_DELTA_MAX]``; NaNs reset to the bounds' mean."""
        with torch.no_grad():
            for v in self.log_delta.values():
                v.nan_to_num_(nan=0.5 * (LOG_DELTA_MIN + LOG_DELTA_MAX))
                v.clamp_(LOG_DELTA_MIN, LOG_DELTA_MAX)

    # ------------------------------------------------------------------ precisions
    def _delta(self, key: str) -> torch.Tensor:
        return self.log_delta[key].clamp(LOG_DELTA_MIN, LOG_DELTA_MAX).exp()

    def precision(self, module: str) -> Precision:
        """Elementwise precision Δ of ``module``'s ``out × (in+1)`` parameters (differentiable in ``log δ``)."""
        if module not in self.shapes:
            raise ValueError(f"prior: module {module!r} is not covered; covered: {len(self.shapes)} modules")
        out, inp = self.shapes[module]
        one_out = torch.ones(out, dtype=torch.float64)
        one_in = torch.ones(inp, dtype=torch.float64)
        if self.kind == "scalar":
            return Precision(u=self._delta("scalar").expand(out), v=one_in)
        if self.kind == "layer":
            return Precision(u=self._delta(f"layer:{module}").expand(out), v=one_in)
        if self.kind == "parameter":
            return Precision(dense=self._delta(f"param:{module}"))
        rest = self._delta(f"rest:{module}") if f"rest:{module}" in self.log_delta else None
        if module in self.row_owner:
            spec_name, owner = self.row_owner[module]
            u = self._fill(self._delta(f"unit:{spec_name}"), owner, rest)
            return Precision(u=u, v=one_in)
        if module in self.col_owner:
            spec_name, owner = self.col_owner[module]
            v = self._fill(self._delta(f"unit:{spec_name}"), owner, rest)
            return Precision(u=one_out, v=v)
        return Precision(u=rest.expand(out), v=one_in)

    def constant_sides(self, module: str) -> Tuple[bool, bool]:
        """``(rows, columns)``: whether Δ of ``module`` is, by its structure, constant along the output side (``u``)
        and the input side (``v``) of :meth:`precision` (scalar and layer priors: both; a unit prior: the side its
        groups do not own; a parameter prior: neither). A constant side needs only the eigenvalues of its KFAC
        factor (:class:`~spam_hf.kron.KronEigen`'s ``values_only``)."""
        if self.kind in ("scalar", "layer"):
            return True, True
        if self.kind == "parameter":
            return False, False
        if module in self.row_owner:
            return False, True
        if module in self.col_owner:
            return True, False
        return True, True

    @staticmethod
    def _fill(group_delta: torch.Tensor, owner: torch.Tensor, rest: Optional[torch.Tensor]) -> torch.Tensor:
        vals = group_delta[owner.clamp_min(0)]
        if rest is not None:
            vals = torch.where(owner >= 0, vals, rest.expand_as(vals))
        return vals

    def group_precisions(self) -> Dict[str, torch.Tensor]:
        """``{spec name: δ per group}`` (unit prior), or the precision averaged over each group's slices."""
        out: Dict[str, torch.Tensor] = {}
        for spec in self.specs:
            if self.kind == "unit":
                out[spec.name] = self._delta(f"unit:{spec.name}").detach().clone()
                continue
            total = torch.zeros(spec.count, dtype=torch.float64)
            count = torch.zeros(spec.count, dtype=torch.float64)
            for m, idx in spec.row_index.items():
                D = self.precision(m).matrix().detach()
                total += D[idx].sum(dim=(1, 2))
                count += idx.shape[1] * D.shape[1]
            for m, idx in spec.col_index.items():
                D = self.precision(m).matrix().detach()
                total += D[:, idx].sum(dim=(0, 2))
                count += idx.shape[1] * D.shape[0]
            out[spec.name] = total / count
        return out

    # ------------------------------------------------------------------ MAP penalty
    def penalty(self, model: nn.Module, n_data: float) -> torch.Tensor:
        """``(1 / 2N) Σ_i δ_i θ_i²`` over covered parameters; differentiable in θ (precisions detached). Of a sharded
        model (FSDP2) the sum over this process's rows only: summed over processes it is the whole penalty, and
        its gradient is each row's.

        A rank-one precision (every kind but ``parameter``) goes through :class:`_RankOnePenalty`: one read of the
        weight for the value and one write of its gradient ``Δ∘W / N``, with no ``[W | b]`` copy or ``W²``
        temporary (at LLM widths these passes over every block weight are a training step's largest overhead)."""
        mods = dict(model.named_modules())
        total = None
        for m in self.shapes:
            module = mods[m]
            # a sharded weight (FSDP2): this process's rows and their precisions (spam_hf.sharding)
            w, offset = local_rows(weight_out_in(module))
            bias = local_rows(module.bias)[0] if self.has_bias[m] else None
            prec = _precision_rows(self._device_precision(m, w.device), offset, w.shape[0])
            if prec.is_rank_one:
                term = _RankOnePenalty.apply(w, bias, prec.u, prec.v)
            else:
                if bias is not None:
                    w = torch.cat([w, bias.unsqueeze(1)], dim=1)
                term = prec.quadratic(w.float().square())
            total = term if total is None else total + term
        return total / (2.0 * n_data)

    def _device_precision(self, module: str, device: torch.device) -> Precision:
        cache = self._cache
        if cache.get("_version") != self._version():
            cache = {"_version": self._version()}
            self._cache = cache
        key = (module, str(device))
        if key not in cache:
            with torch.no_grad():
                p = self.precision(module)
                if p.is_rank_one:
                    cache[key] = Precision(u=p.u.float().to(device), v=p.v.float().to(device))
                else:
                    cache[key] = Precision(dense=p.dense.float().to(device))
        return cache[key]

    def _version(self) -> tuple:
        return tuple(v._version for v in self.log_delta.values())

    # ------------------------------------------------------------------ summaries and I/O
    def summary(self) -> Dict[str, float]:
        """Mean / min / max precision per group kind (for logging)."""
        stats: Dict[str, List[torch.Tensor]] = {}
        precisions = self.group_precisions()
        for spec in self.specs:
            stats.setdefault(spec.kind, []).append(precisions[spec.name])
        out: Dict[str, float] = {}
        for kind, vals in stats.items():
            v = torch.cat(vals)
            out[f"prior/{kind}_mean"] = float(v.mean())
            out[f"prior/{kind}_min"] = float(v.min())
            out[f"prior/{kind}_max"] = float(v.max())
        return out

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.log_delta.items()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Load ``log δ`` saved by :meth:`state_dict`; clear errors on missing keys or shapes."""
        for k, v in self.log_delta.items():
            if k not in state:
                raise ValueError(f"prior state has no entry {k!r} (prior kind {self.kind!r})")
            if tuple(state[k].shape) != tuple(v.shape):
                raise ValueError(f"prior entry {k!r} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}")
            with torch.no_grad():
                v.copy_(state[k].to(torch.float64))

    def save(self, path: str) -> None:
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, path, metadata={"kind": self.kind})

    def load(self, path: str) -> None:
        self.load_state_dict(load_file(path))


def _precision_rows(prec: Precision, start: int, n: int) -> Precision:
    """The precisions of rows ``[start, start + n)`` of a layer (``prec`` itself when those are all its rows)."""
    rows = prec.u if prec.is_rank_one else prec.dense
    if start == 0 and n == rows.shape[0]:
        return prec
    if prec.is_rank_one:
        return Precision(u=prec.u[start: start + n], v=prec.v)
    return Precision(dense=prec.dense[start: start + n])


class _RankOnePenalty(torch.autograd.Function):
    """``Σ_ij u_i v_j W²_ij + v_b Σ_i u_i b_i²`` for ``Δ = u vᵀ`` over ``[W | b]`` (``v_b = v[-1]`` when there is a
    bias), with ``∂/∂W = 2 u_i v_j W_ij`` and ``∂/∂b = 2 v_b u_i b_i``. The sums are float32 whatever the weight's
    dtype, as the unfused ``(Δ ∘ [W | b]²).sum()`` computed them; the precisions are constants."""

    @staticmethod
    def forward(ctx, weight, bias, u, v):
        w = weight.float()
        v_w = v[: w.shape[1]]
        constant_v = bool((v_w == v_w[0]).all())
        if constant_v:  # unit prior on rows, scalar and layer priors
            row = torch.einsum("ij,ij->i", w, w) * v_w[0]
        else:
            row = torch.einsum("ij,ij,j->i", w, w, v_w)
        value = u @ row
        if bias is not None:
            value = value + v[-1] * (u @ bias.float().square())
        ctx.constant_v = constant_v
        ctx.save_for_backward(weight, bias if bias is not None else torch.empty(0), u, v)
        return value

    @staticmethod
    def backward(ctx, grad_out):
        weight, bias, u, v = ctx.saved_tensors
        w = weight.float()
        v_w = v[: w.shape[1]]
        scale = (2 * grad_out) * u
        if ctx.constant_v:
            grad_w = w * (scale * v_w[0]).unsqueeze(1)
        else:
            grad_w = w * scale.unsqueeze(1) * v_w.unsqueeze(0)
        grad_b = None
        if bias.numel() and ctx.needs_input_grad[1]:
            grad_b = (2 * grad_out * v[-1] * u * bias.float()).to(bias.dtype)
        return grad_w.to(weight.dtype), grad_b, None, None


def params_aug(model: nn.Module, modules: Iterable[str]) -> Dict[str, torch.Tensor]:
    """``{module: [W | b]}`` in float64 (detached) for the marginal likelihood and scores."""
    mods = dict(model.named_modules())
    return {m: weight_aug(mods[m]).to(torch.float64).cpu() for m in modules}


class LazyParams(Mapping):
    """``params_aug`` one module at a time: ``[W | b]`` in float64 is made when a module is read and not kept, so a
    prior update over a large model holds one module's float64 copy instead of every module's (1.9 GB for the
    blocks of a 4-layer model of Llama-3.2-1B width)."""

    def __init__(self, model: nn.Module, modules: Iterable[str]) -> None:
        self._mods = dict(model.named_modules())
        self._names = list(modules)
        # FSDP2: the weights are row shards (spam_hf.sharding); read them through squared_sums
        self.sharded = any(is_sharded(self._mods[m].weight) for m in self._names)

    def squared_sums(self, name: str, keep_full: bool = False) -> Tuple[torch.Tensor, torch.Tensor,
                                                                         Optional[torch.Tensor]]:
        """Row and column sums of ``[W | b]²`` (and the square itself with ``keep_full``) of module ``name``, from
        this process's rows when the weight is sharded (:func:`spam_hf.sharding.squared_sums`)."""
        module = self._mods[name]
        return squared_sums(weight_out_in(module), getattr(module, "bias", None), keep_full)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return weight_aug(self._mods[name]).to(torch.float64).cpu()

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
