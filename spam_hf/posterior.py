"""``SpamLaplace``: the Laplace posterior state of SpaM, held in one object.

It owns the group specs of a model, the prior precisions ``δ`` (:class:`~spam_hf.priors.PriorPrecision`),
the curvature sums (:class:`~spam_hf.curvature.CurvatureAccumulator`, KFAC or diagonal), what is kept
of the curvature for pruning after a prior update (the factors' diagonals), the data size ``N``, the
loss sum ``Σ_n ℓ_n`` at the current weights, the temperature ``T``, and the hyper-optimiser's state.

Verbs, in the spirit of laplace-torch::

    la = SpamLaplace(model, prior="unit", curvature="kfac", n_data=len(train))
    la.fit(train_loader)                  # post hoc: curvature from one pass, then optimise log δ
    la.log_marginal_likelihood()          # log Z(δ) ≈ −Σℓ/T − ½θᵀΔθ + ½Σlog δ − ½ log det(H/T + Δ)
    la.save("run/dense"); la.load("run/dense")

During training the trainer feeds it: ``with la.capture(model, mask): out = model(**batch)``, then
``la.accumulate(out.logits, labels)`` and ``la.add_loss(mean_loss)``; every so often
``la.optimize_prior_precision()``. ``state_dict()`` includes the hyper-optimiser's Adam moments and
the Monte-Carlo label generator, so a run resumed from it continues exactly.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .architectures import consuming_modules, get_family, group_specs, prunable_modules
from .architectures.base import GroupSpec
from .curvature import DIAGONAL_FROM, CurvatureAccumulator, diagonal_from_state
from .distributed import all_gather_object, all_reduce_sum, is_distributed, rank
from .marglik import Curvature, log_marginal_likelihood, optimize_prior
from .priors import LazyParams, PriorPrecision
from .sharding import assign_owners, is_sharded_model, owned

PRIOR_FILE = "spam_prior.safetensors"
CURVATURE_FILE = "spam_curvature.safetensors"
HYPER_FILE = "spam_hyper.safetensors"
STATE_FILE = "spam_state.json"
RETAINED_PREFIX = "retained."
LIVE_FILE = "spam_live_rank{rank}.safetensors"  # data parallel checkpoints: each process's own live sums


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / accelerate wrappers (``.module`` chains)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def likelihood_of(model: nn.Module) -> str:
    """``classification`` / ``regression`` / ``causal_lm`` from the model class and config."""
    name = type(unwrap(model)).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "causal_lm"
    config = getattr(model, "config", None)
    if getattr(config, "problem_type", None) == "regression" or getattr(config, "num_labels", 2) == 1:
        return "regression"
    return "classification"


def check_shardable(model: nn.Module) -> None:
    """A one-line refusal for a model sharded by FSDP2 whose family cannot be read that way
    (:attr:`~spam_hf.architectures.base.ArchitectureFamily.fsdp2_refusal`, the reason ``compress --fsdp2`` gives
    before loading)."""
    reason = get_family(model).fsdp2_refusal
    if reason:
        raise ValueError(f"spam-hf cannot train {model.config.model_type} sharded by FSDP2: {reason}; train it data "
                         "parallel (DDP)")


def _within_layer(spec: GroupSpec) -> str:
    """A spec's name without its ``layer{i}.`` prefix (``head``, ``expert3.neuron``): what identifies it within its
    layer when layers are renumbered."""
    prefix = f"layer{spec.layer}."
    return spec.name[len(prefix):] if spec.name.startswith(prefix) else spec.name


def _required_keys(keys) -> set:
    """The keys of a retained curvature state every file has (``n_g`` and the per-module ``.Arows`` came later:
    without them the state stands for every row)."""
    return {k for k in keys if k != "n_g" and not k.endswith(".Arows")}


class SpamLaplace:
    """Laplace approximation over the prunable layers of ``model`` with learnable prior precisions.

    Args:
        model: a transformers model (or peft LoRA model) of a registered family.
        prior: ``scalar`` / ``layer`` / ``unit`` / ``parameter``; ``prior_init`` the initial δ.
        curvature: ``kfac`` or ``diag``; ``reduction`` ``reduce``/``expand``/``reduce-gw`` or ``auto``
            (``expand`` for causal LM, else ``reduce``); ``fisher`` ``mc`` or ``empirical``.
        n_data: ``N`` (examples, or label tokens for causal LM); may be set later, needed by every
            verb that extrapolates the curvature.
        temperature: ``T``.
        max_rows_per_batch: cap on the rows one batch adds to the factors (``None``: all).
        seed: seed of the Monte-Carlo label generator.
        kv_groups_only: grouped-query attention in whole KV groups (see ``SpamTrainingArguments``).
        hyper_lr: learning rate of the Adam steps on ``log δ`` of :meth:`optimize_prior_precision`.
        n_hypersteps: the number of those steps per call.
        specs: the group specs (default: from the model's family).
        curvature_modules: collect curvature for these modules only (default: every prunable module); a posterior
            with a subset gives factors and scores of those, not the marginal likelihood.
        input_means: also keep the sums of the consuming modules' inputs, for the mean and variance of each input
            channel (:meth:`input_moments`: the ``flap`` score and ``bias`` compensation).
        diagonal_from: KFAC factors at least this wide keep only their diagonal, ``H ≈ G ⊗ diag(A)``
            (:mod:`spam_hf.curvature`; the MLP of an LLM); ``None`` keeps every factor whole.
        mask_fisher: also accumulate the exact Fisher of masks on the consuming modules' input columns
            (for ``damage-exact`` scores; memory like the KFAC input factors of those modules).
    """

    def __init__(self, model: nn.Module, prior: str = "unit", prior_init: float = 1.0, curvature: str = "kfac",
                 reduction: str = "auto", fisher: str = "mc", n_data: Optional[float] = None,
                 temperature: float = 1.0, max_rows_per_batch: Optional[int] = None, seed: int = 0,
                 kv_groups_only: bool = False, hyper_lr: float = 0.1, n_hypersteps: int = 20,
                 specs: Optional[List[GroupSpec]] = None, mask_fisher: bool = False,
                 curvature_modules: Optional[List[str]] = None, diagonal_from: Optional[int] = DIAGONAL_FROM,
                 input_means: bool = False) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        model = unwrap(model)
        sharded = is_distributed() and is_sharded_model(model)
        if sharded:  # before the groups are read: a mixture of experts would split its sharded expert tensors
            check_shardable(model)
        self.model = model
        self.kv_groups_only = kv_groups_only
        # what a posterior of another (pruned) copy of the model is built with (calibration_posterior)
        self.settings = dict(prior=prior, prior_init=prior_init, fisher=fisher, seed=seed,
                             kv_groups_only=kv_groups_only)
        self.specs: List[GroupSpec] = list(specs) if specs is not None else group_specs(model, kv_groups_only)
        if not self.specs:
            raise ValueError(f"{type(model).__name__} has no prunable groups left (every head and neuron was "
                             "removed); there is nothing to place priors on")
        self.modules: List[str] = prunable_modules(self.specs)
        self.likelihood = likelihood_of(model)
        if reduction == "auto":
            reduction = "expand" if self.likelihood == "causal_lm" else "reduce"
        self.prior = PriorPrecision(model, self.specs, kind=prior, init=prior_init)
        # calibration posteriors of scores that read only some modules track only those (no log Z then)
        self.curvature_modules: List[str] = list(curvature_modules) if curvature_modules is not None else self.modules
        self.curvature = CurvatureAccumulator(model, self.curvature_modules, kind=curvature, reduction=reduction, fisher=fisher,
                                              likelihood=self.likelihood, max_rows_per_batch=max_rows_per_batch,
                                              seed=seed, mask_modules=[m for sp in self.specs for m in sp.col_index]
                                              if mask_fisher else (), diagonal_from=diagonal_from,
                                              mean_modules=consuming_modules(self.specs) if input_means else ())
        if sharded:  # FSDP2: one owner per module's sums (spam_hf.sharding)
            self.curvature.owners = assign_owners(self.curvature.factor_elements(),
                                                  torch.distributed.get_world_size())
        self.n_data: Optional[float] = float(n_data) if n_data else None
        self.temperature = float(temperature)
        self.hyper_lr, self.n_hypersteps = float(hyper_lr), int(n_hypersteps)
        self.hyper_state: Dict[str, Any] = {}
        self.loss_sum: Any = 0.0  # Σ of per-batch mean losses since the last update (a tensor while training)
        self.loss_count = 0
        # diagonal state of the curvature used by the last prior update (for pruning and saving), its row count
        self.retained: Optional[Dict[str, torch.Tensor]] = None
        self.retained_rows = 0.0
        self.history: List[Dict[str, float]] = []
        self.timings = {"curvature_s": 0.0, "eigh_s": 0.0, "hypersteps_s": 0.0}

    @classmethod
    def from_args(cls, model: nn.Module, args, n_data: Optional[float] = None) -> "SpamLaplace":
        """From a :class:`~spam_hf.arguments.SpamTrainingArguments` (its SpaM fields)."""
        return cls(model, prior=args.prior, prior_init=args.prior_init, curvature=args.curvature,
                   reduction=args.kfac_reduction, fisher=args.fisher_type, n_data=n_data or args.n_data,
                   temperature=args.temperature, max_rows_per_batch=args.curvature_max_rows or None, seed=args.seed,
                   kv_groups_only=args.kv_groups_only, hyper_lr=args.hyper_lr, n_hypersteps=args.n_hypersteps,
                   diagonal_from=args.kfac_diagonal_from or None)

    def calibration_posterior(self, model: nn.Module, mask_fisher: bool = False,
                              consuming_only: bool = False, input_means: bool = False) -> "SpamLaplace":
        """A posterior of ``model`` (this one's model after pruning, or a copy) for calibration statistics: this
        one's prior kind, initial δ, Fisher type, seed, ``N``, temperature and group granularity, with token-level
        KFAC (``expand``) whatever the training used, the mask Fisher when ``mask_fisher``, and curvature of the
        consuming modules alone (O, down, ``lora_B``) with ``consuming_only``, their input sums with
        ``input_means``. Pruning rounds build one per round
        (:func:`spam_hf.pruning.prune`)."""
        specs = group_specs(unwrap(model), self.settings["kv_groups_only"])
        modules = consuming_modules(specs) if consuming_only else None
        return SpamLaplace(model, reduction="expand", n_data=self.n_data, temperature=self.temperature,
                           mask_fisher=mask_fisher, specs=specs, curvature_modules=modules, diagonal_from=None,
                           input_means=input_means, **self.settings)

    @property
    def owned_modules(self) -> Optional[List[str]]:
        """The modules whose curvature this process owns (a sharded model), or None: every process holds all."""
        if self.curvature.owners is None:
            return None
        return owned(self.curvature.owners, self.modules, rank())

    # ------------------------------------------------------------------ accumulation (fed by the trainer)
    def capture(self, model: nn.Module, attention_mask: Optional[torch.Tensor] = None):
        """Context manager: record the prunable layers' inputs/outputs during one forward."""
        return self.curvature.capture(unwrap(model), attention_mask)

    def accumulate(self, logits: torch.Tensor, labels: Optional[torch.Tensor] = None) -> None:
        """Add this forward's curvature (one extra backward of a sampled loss through the same graph)."""
        t0 = time.perf_counter()
        self.curvature.accumulate(logits, labels)
        self.timings["curvature_s"] += time.perf_counter() - t0

    def add_loss(self, mean_loss) -> None:
        """Record one batch's mean loss at the current weights (``N · mean`` estimates ``Σ_n ℓ_n``)."""
        self.loss_sum = self.loss_sum + mean_loss
        self.loss_count += 1

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """The MAP prior term per batch, ``(T / 2N) Σ_i δ_i θ_i²`` (differentiable in the weights)."""
        return self.prior.penalty(unwrap(model), self._n()) * self.temperature

    # ------------------------------------------------------------------ state queries
    def _n(self) -> float:
        if not self.n_data:
            raise ValueError("SpamLaplace needs N (n_data): the number of training examples (tokens for LM)")
        return float(self.n_data)

    @property
    def live_rows(self) -> float:
        return float(self.curvature.n)

    def has_curvature(self, retained_only: bool = False) -> bool:
        """Whether pruning scores can be computed (live sums, or those kept from the last prior update)."""
        return (self.live_rows > 0 and not retained_only) or self.retained is not None

    def curvature_estimate(self, progress: bool = False) -> Curvature:
        """The live sums extrapolated to ``N``: ``{module: KronEigen}`` (KFAC) or ``{module: diag H}``."""
        n = self._n()
        if self.curvature.kind != "kfac":
            return self.curvature.diagonal(n)
        return self.curvature.kron(n, values_only={m: self.prior.constant_sides(m) for m in self.curvature.shapes},
                                   progress=progress)

    def diagonal(self) -> Dict[str, torch.Tensor]:
        """``diag H`` per module (``out × (in+1)``) for pruning scores: from the live sums when they hold
        at least as many rows as those of the last prior update (or there was none), else from those."""
        if self.live_rows > 0 and self.live_rows >= self.retained_rows:
            return self.curvature.diagonal(self._n())
        if self.retained is not None:
            return diagonal_from_state(self.retained, self._n())
        raise RuntimeError("no curvature yet: train with SpamTrainer or call SpamLaplace.fit() before pruning")

    def factors(self, extrapolate: bool = True) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """``{module: (A, G)}`` from the live KFAC sums, float64: ``A = Σ a aᵀ / n_m`` (``(in+1)²``, bias column last;
        ``n_m`` the rows with a non-zero input, :meth:`CurvatureAccumulator.rows`)
        and ``G = (N / n_g) Σ g gᵀ`` (``out²``) extrapolated to ``N`` as :meth:`curvature_estimate` does, or with
        ``extrapolate=False`` ``G = Σ g gᵀ``: the likelihood of only the batches seen (what compensation trusts).
        Group damage and compensation need these (the retained state keeps only diagonals)."""
        if self.curvature.kind != "kfac":
            raise ValueError("group damage and compensation need curvature='kfac' (full Kronecker factors)")
        if not self.curvature.whole_factors:
            raise ValueError(f"this posterior keeps the Kronecker factors of width {self.curvature.diagonal_from} or "
                             "more as diagonals (diagonal_from); group damage and compensation need whole factors: "
                             "collect them in a calibration_posterior()")
        if self.live_rows <= 0:
            raise RuntimeError("no live curvature: collect() some batches first (the retained state keeps only "
                               "the factors' diagonals)")
        scale = self._n() / self.curvature.n_g if extrapolate else 1.0
        return {m: (s["A"].to(torch.float64).cpu() / self.curvature.rows(m), s["G"].to(torch.float64).cpu() * scale)
                for m, s in self.curvature.sums.items()}

    def group_fisher(self) -> Dict[str, torch.Tensor]:
        """``{consuming module: M}`` (``in × in``, float64, extrapolated to ``N``): the exact Fisher of masks on
        its input columns from the live sums (needs ``mask_fisher=True``); see ``damage-exact``."""
        return self.curvature.mask_fisher(self._n())

    def input_moments(self) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """``{consuming module: (mean, variance)}`` of each input channel over the calibration rows (``[in]``,
        float64; needs ``input_means=True``)."""
        if not self.curvature.mean_modules:
            raise ValueError("no input means collected: build the posterior with input_means=True, then collect()")
        return self.curvature.input_moments()

    def mean_loss(self) -> float:
        return float(self.loss_sum) / max(self.loss_count, 1)

    def _check_whole(self) -> None:
        if self.curvature_modules != self.modules:
            raise ValueError("this posterior collects curvature of some modules only (calibration statistics for "
                             "pruning); it has no marginal likelihood")

    def log_marginal_likelihood(self, curvature: Optional[Curvature] = None) -> torch.Tensor:
        """``log Z(δ)`` (float64, differentiable in ``prior.log_delta``) with ``curvature`` (default: the
        live sums, :meth:`curvature_estimate`) and ``Σℓ ≈ N · mean loss``."""
        self._check_whole()
        curvature = self.curvature_estimate() if curvature is None else curvature
        return log_marginal_likelihood(self.prior, curvature, LazyParams(self.model, self.modules),
                                       loss_sum=self._n() * self.mean_loss(), temperature=self.temperature,
                                       modules=self.owned_modules)

    # ------------------------------------------------------------------ verbs
    def optimize_prior_precision(self, n_steps: Optional[int] = None, lr: Optional[float] = None,
                                 progress: bool = False) -> float:
        """Sum the curvature and losses over processes (:meth:`all_reduce`), take Adam steps on ``log δ``;
        returns ``log Z``. Every process takes the identical step. ``progress``: progress bars (with an ETA)
        over the eigendecompositions and the hyper-steps.

        Afterwards the live sums are reset and their diagonal is retained for pruning.
        """
        self._check_whole()
        self.all_reduce()
        t0 = time.perf_counter()
        curv = self.curvature_estimate(progress=progress)
        t1 = time.perf_counter()
        self.timings["eigh_s"] += t1 - t0
        res = optimize_prior(self.prior, curv, LazyParams(self.model, self.modules),
                             n_steps=n_steps or self.n_hypersteps, lr=lr or self.hyper_lr,
                             loss_sum=self._n() * self.mean_loss(), temperature=self.temperature,
                             optimizer_state=self.hyper_state, progress=progress, modules=self.owned_modules)
        self.timings["hypersteps_s"] += time.perf_counter() - t1
        self.retained_rows = self.live_rows
        self.retained = self.curvature.diagonal_state()
        if self.curvature.owners is not None:  # each owner's diagonals, for every process (small: out + in each)
            self.retained = {k: v for part in all_gather_object(self.retained) for k, v in part.items()}
        self.curvature.reset()
        self.loss_sum, self.loss_count = 0.0, 0
        return res.final

    def all_reduce(self) -> None:
        """Data parallel: sum the live curvature over processes and average the recorded mean losses (every
        process records as many), once per batch of accumulations; a no-op in a single process."""
        if not is_distributed() or self.curvature.reduced:
            return
        world = torch.distributed.get_world_size()
        total = all_reduce_sum(torch.tensor(float(self.loss_sum), dtype=torch.float64))
        self.loss_sum = float(total) / world
        self.curvature.all_reduce()

    def collect(self, dataloader: Iterable[Dict[str, torch.Tensor]], max_batches: Optional[int] = None,
                progress: bool = True) -> None:
        """Reset, then accumulate curvature and loss over ``dataloader`` (up to ``max_batches``) in eval mode,
        without touching the priors: calibration statistics for :meth:`factors`, group damage and
        compensation. Batches are moved to the model's device; ``N`` defaults to ``len(dataloader.dataset)`` (the
        rows of the batches read, for a plain list of batches).
        Data parallel: each process reads its shard and the sums are then summed over processes."""
        from tqdm.auto import tqdm

        count_rows = not self.n_data and not hasattr(dataloader, "dataset")  # a plain list of batches: its rows
        if not self.n_data and not count_rows:
            self.n_data = float(len(dataloader.dataset))
        rows = 0
        model = self.model
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        self.curvature.reset()
        self.loss_sum, self.loss_count = 0.0, 0
        try:
            total = len(dataloader) if max_batches is None else min(max_batches, len(dataloader))
            for i, batch in enumerate(tqdm(dataloader, total=total, desc="curvature", disable=not progress)):
                if max_batches is not None and i >= max_batches:
                    break
                rows += len(batch["input_ids"]) if "input_ids" in batch else 0
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                with torch.enable_grad(), self.capture(model, batch.get("attention_mask")):
                    out = model(**batch)
                    self.accumulate(out.logits, batch.get("labels"))
                self.add_loss(float(out.loss.detach()) if out.loss is not None else 0.0)
        finally:
            model.train(was_training)
        if count_rows:
            self.n_data = float(all_reduce_sum(torch.tensor(float(rows), dtype=torch.float64)))
        self.all_reduce()

    def fit(self, dataloader: Iterable[Dict[str, torch.Tensor]], max_batches: Optional[int] = None,
            n_steps: int = 200, progress: bool = True) -> float:
        """Post hoc: :meth:`collect` over ``dataloader`` (no weight updates), then
        :meth:`optimize_prior_precision` with ``n_steps``. Returns ``log Z``.

        The model runs in eval mode (deterministic curvature) and is put back in the mode it was in.
        """
        self.collect(dataloader, max_batches=max_batches, progress=progress)
        return self.optimize_prior_precision(n_steps=n_steps, progress=progress)

    def carry_over(self, old: "SpamLaplace", keep: Dict[str, torch.Tensor], same_groups: bool = False,
                   layer_map: Optional[Dict[int, int]] = None) -> None:
        """Take ``old``'s precisions after the model changed shape.

        Unit priors: the kept groups' precisions (``keep[spec.name]`` indexes ``old``'s specs; specs not
        in ``keep`` kept every group), matched by layer and the name after ``layer{i}.`` (``head``,
        ``expert3.neuron``); ``layer_map`` (``{old layer: new layer}``, when whole blocks were removed) renumbers
        the layers, and layers it does not name are gone. With
        ``same_groups`` (only modules outside the prior changed, e.g. the base under a LoRA adapter) every entry
        whose key and shape match is copied, whatever the prior kind.
        """
        with torch.no_grad():
            if old.prior.kind == "unit" and self.prior.kind == "unit":
                by_key = {(s.layer, _within_layer(s)): s for s in self.specs}
                for s in old.specs:
                    layer = layer_map.get(s.layer) if layer_map else s.layer
                    new = by_key.get((layer, _within_layer(s))) if layer is not None else None
                    if new is None:
                        continue
                    value = old.prior.log_delta[f"unit:{s.name}"]
                    if s.name in keep:
                        value = value[keep[s.name]]
                    target = self.prior.log_delta[f"unit:{new.name}"]
                    if target.shape == value.shape:
                        target.copy_(value)
            elif same_groups:
                for key, value in old.prior.log_delta.items():
                    if key in self.prior.log_delta and self.prior.log_delta[key].shape == value.shape:
                        self.prior.log_delta[key].copy_(value)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        """``(tensors, meta)``: every tensor (prior, live sums, retained diagonal, Adam moments, generator
        state) flat and safetensors-friendly, and the JSON-able rest (counts, options, param groups). The live sums of
        a sharded model (FSDP2) are left out: each process holds only the modules it owns."""
        tensors: Dict[str, torch.Tensor] = {f"prior.{k}": v for k, v in self.prior.state_dict().items()}
        # live sums, unless each process holds its own modules' only (FSDP2): the retained diagonal has every module
        live = self.live_rows > 0 and self.curvature.owners is None
        if live:
            tensors.update({f"curvature.{k}": v for k, v in self.curvature.state_dict().items()})
        tensors.update({f"{RETAINED_PREFIX}{k}": v for k, v in (self.retained or {}).items()})
        tensors["generator"] = self.curvature.generator.get_state()
        adam = self.hyper_state.get("adam")
        groups = None
        if adam:
            for idx, st in adam["state"].items():
                for k, v in st.items():
                    tensors[f"adam.{idx}.{k}"] = torch.as_tensor(v).reshape(-1) if k == "step" else v
            groups = adam["param_groups"]
        meta = {"prior": self.prior.kind, "curvature": self.curvature.kind, "n_data": self.n_data,
                "likelihood": self.likelihood, "kfac_reduction": self.curvature.reduction,
                "fisher": self.curvature.fisher, "temperature": self.temperature,
                "kfac_diagonal_from": self.curvature.diagonal_from, "live_curvature": live, "loss_sum": float(self.loss_sum), "loss_count": self.loss_count,
                "retained_rows": self.retained_rows, "adam_param_groups": groups, "marglik_history": self.history}
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, meta

    def load_state_dict(self, tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; clear errors when it does not fit this model."""
        self.prior.load_state_dict({k[len("prior."):]: v for k, v in tensors.items() if k.startswith("prior.")})
        if "curvature" in meta:  # the saved sums' layout wins (files written before the setting had whole factors)
            self.curvature.diagonal_from = meta.get("kfac_diagonal_from")
        live = {k[len("curvature."):]: v for k, v in tensors.items() if k.startswith("curvature.")}
        if live:
            self.curvature.load_state_dict(live)
        else:
            self.curvature.reset()
        retained = {k[len(RETAINED_PREFIX):]: v for k, v in tensors.items() if k.startswith(RETAINED_PREFIX)}
        if retained:
            expected = _required_keys(self.curvature.diagonal_state_keys())
            if _required_keys(retained) != expected:
                raise ValueError(f"the retained curvature does not match this model's prunable modules "
                                 f"({len(_required_keys(retained))} entries, expected {len(expected)})")
            self.retained = retained
            self.retained_rows = float(meta.get("retained_rows") or retained["n"].reshape(()))
        if "generator" in tensors:
            self.curvature.generator.set_state(tensors["generator"].to(torch.uint8))
        groups = meta.get("adam_param_groups")
        if groups:
            state: Dict[int, Dict[str, torch.Tensor]] = {}
            for k, v in tensors.items():
                if k.startswith("adam."):
                    _, idx, name = k.split(".", 2)
                    state.setdefault(int(idx), {})[name] = v.reshape(()) if name == "step" else v
            self.hyper_state = {"adam": {"state": state, "param_groups": groups}}
        if meta.get("n_data") and not self.n_data:
            self.n_data = float(meta["n_data"])
        self.loss_sum = float(meta.get("loss_sum", 0.0))
        self.loss_count = int(meta.get("loss_count", 0))
        self.history = list(meta.get("marglik_history", []))

    def save(self, directory: str) -> None:
        """Write ``spam_prior`` / ``spam_curvature`` / ``spam_hyper`` (safetensors) and ``spam_state.json``."""
        os.makedirs(directory, exist_ok=True)
        tensors, meta = self.state_dict()
        self.prior.save(os.path.join(directory, PRIOR_FILE))
        curv = {k: v for k, v in tensors.items() if k.startswith(("curvature.", RETAINED_PREFIX))}
        # the curvature file keeps its historical layout: live sums unprefixed, retained ones prefixed
        curv = {(k[len("curvature."):] if k.startswith("curvature.") else k): v for k, v in curv.items()}
        if curv:
            save_file(curv, os.path.join(directory, CURVATURE_FILE),
                      metadata={"kind": self.curvature.kind, "reduction": self.curvature.reduction,
                                "fisher": self.curvature.fisher})
        hyper = {k: v for k, v in tensors.items() if k.startswith("adam.") or k == "generator"}
        save_file(hyper, os.path.join(directory, HYPER_FILE))
        with open(os.path.join(directory, STATE_FILE), "w") as f:
            json.dump(meta, f, indent=2)

    def save_live(self, path: str) -> None:
        """This process's live curvature sums and loss record (before any all-reduce), for a data-parallel
        checkpoint: every process writes its own file (:data:`LIVE_FILE`)."""
        tensors = dict(self.curvature.state_dict())
        tensors["loss_sum"] = torch.tensor([float(self.loss_sum)], dtype=torch.float64)
        tensors["loss_count"] = torch.tensor([self.loss_count], dtype=torch.float64)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path)

    def load_live(self, path: str) -> None:
        """Restore what :meth:`save_live` wrote (replacing the live sums :meth:`load` took from the main process)."""
        tensors = load_file(path)
        self.loss_sum = float(tensors.pop("loss_sum").reshape(()))
        self.loss_count = int(tensors.pop("loss_count").reshape(()))
        self.curvature.load_state_dict(tensors)

    def load(self, directory: str) -> None:
        """Restore what :meth:`save` wrote to ``directory`` (files it lacks are treated as empty)."""
        prior_path = os.path.join(directory, PRIOR_FILE)
        if not os.path.exists(prior_path):
            raise FileNotFoundError(f"{directory} has no {PRIOR_FILE}; was it written by spam-hf?")
        tensors = {f"prior.{k}": v for k, v in load_file(prior_path).items()}
        meta: Dict[str, Any] = {}
        if os.path.exists(os.path.join(directory, STATE_FILE)):
            with open(os.path.join(directory, STATE_FILE)) as f:
                meta = json.load(f)
        curv_path = os.path.join(directory, CURVATURE_FILE)
        if os.path.exists(curv_path):
            for k, v in load_file(curv_path).items():
                tensors[k if k.startswith(RETAINED_PREFIX) else f"curvature.{k}"] = v
        hyper_path = os.path.join(directory, HYPER_FILE)
        if os.path.exists(hyper_path):
            tensors.update(load_file(hyper_path))
        self.load_state_dict(tensors, meta)
