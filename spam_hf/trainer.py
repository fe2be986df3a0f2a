"""``SpamTrainer``: a ``transformers.Trainer`` that learns prior precisions by marginal likelihood.

Per optimiser step the loss is ``mean_b ℓ_b + (T / 2N) Σ_i δ_i θ_i²`` (the prior replaces weight
decay on covered parameters). On every ``curvature_every``-th step the training forward also feeds
the curvature hooks (one extra backward of a sampled loss from the same graph, no extra data pass).
After ``marglik_burn_in`` steps and then every ``marglik_frequency`` steps, the factors are
all-reduced across processes and ``n_hypersteps`` Adam steps on ``log δ`` maximise the Laplace
log marginal likelihood. ``prune()`` then scores groups with OPD and removes them for real.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from typing import Any, Dict, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from .architectures import get_family, group_specs, is_peft_model, prunable_modules
from .arguments import SpamTrainingArguments
from .curvature import CurvatureAccumulator, diagonal_from_state
from .export.save import save_pruned
from .marglik import optimize_prior
from .priors import PriorPrecision, params_aug
from .scoring import group_scores
from .selection import Selection, select_groups
from .surgery import prune_groups

logger = logging.get_logger(__name__)

PRIOR_FILE = "spam_prior.safetensors"
CURVATURE_FILE = "spam_curvature.safetensors"
STATE_FILE = "spam_state.json"
RETAINED_PREFIX = "retained."


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def likelihood_of(model: nn.Module) -> str:
    """``classification`` / ``regression`` / ``causal_lm`` from the model class and config."""
    name = type(_unwrap(model)).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "causal_lm"
    if getattr(getattr(model, "config", None), "problem_type", None) == "regression" or \
            getattr(getattr(model, "config", None), "num_labels", 2) == 1:
        return "regression"
    return "classification"


class _MarglikCallback(TrainerCallback):
    def __init__(self, trainer: "SpamTrainer") -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        t._steps_since_update += 1
        step = state.global_step
        if args.marglik_frequency and step >= args.marglik_burn_in and \
                (step - args.marglik_burn_in) % args.marglik_frequency == 0 and float(t.curvature.n) > 0:
            t.update_priors()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        t = self.trainer
        # a last update when the tail since the previous one is long enough to estimate curvature from;
        # otherwise the previous update's curvature stays the one used for pruning
        if args.marglik_frequency and float(t.curvature.n) > 0 and \
                (t._steps_since_update * 2 >= args.marglik_frequency or not t.has_curvature(retained_only=True)):
            t.update_priors()
        return control


class SpamTrainer(Trainer):
    """A ``Trainer`` that fits Gaussian prior precisions by Laplace marginal likelihood (SpaM).

    Args are those of ``transformers.Trainer``; ``args`` must be a :class:`SpamTrainingArguments`.
    ``model`` may be any model whose ``config.model_type`` has a registered architecture family.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, SpamTrainingArguments):
            raise TypeError("SpamTrainer needs SpamTrainingArguments (got "
                            f"{type(self.args).__name__}); the SpaM options live there")
        self._setup_spam_state()
        if self.likelihood != "causal_lm":
            # sequence-level heads return a per-micro-batch mean and ignore `num_items_in_batch`; make the
            # Trainer divide by the accumulation steps so GA k×b equals one batch of k·b
            self.model_accepts_loss_kwargs = False
        self._pruned = False
        self.add_callback(_MarglikCallback(self))
        self.timings = {"curvature_s": 0.0, "eigh_s": 0.0, "hypersteps_s": 0.0}

    # ------------------------------------------------------------------ set-up
    def _setup_spam_state(self) -> None:
        model = _unwrap(self.model)
        self.specs = group_specs(model, kv_groups_only=self.args.kv_groups_only)
        self.modules = prunable_modules(self.specs)
        self.likelihood = likelihood_of(model)
        reduction = self.args.kfac_reduction
        if reduction == "auto":
            reduction = "expand" if self.likelihood == "causal_lm" else "reduce"
        self.prior = PriorPrecision(model, self.specs, kind=self.args.prior, init=self.args.prior_init)
        self.curvature = CurvatureAccumulator(model, self.modules, kind=self.args.curvature, reduction=reduction,
                                              fisher=self.args.fisher_type, likelihood=self.likelihood,
                                              max_rows_per_batch=self.args.curvature_max_rows or None,
                                              seed=self.args.seed)
        self._hyper_state: Dict[str, Any] = {}
        self._loss_sum = 0.0
        self._loss_count = 0
        self._steps_since_update = 0
        self._log_sums = {"nll": 0.0, "prior_term": 0.0, "n": 0}
        # raw sums (and row count) of the curvature used by the last prior update: kept for pruning and saving
        self._retained: Optional[Dict[str, torch.Tensor]] = None
        self._last_curvature_rows = 0.0
        self.marglik_history: list = []

    @property
    def n_data(self) -> float:
        """N: training examples (or label tokens for causal LM), unless ``args.n_data`` is set."""
        if self.args.n_data:
            return float(self.args.n_data)
        if self.train_dataset is None:
            raise ValueError("SpamTrainer needs a train_dataset (or args.n_data) to know N")
        if self.likelihood == "causal_lm" and "input_ids" in getattr(self.train_dataset, "column_names", []):
            if not hasattr(self, "_n_tokens"):
                self._n_tokens = float(sum(max(len(x) - 1, 0) for x in self.train_dataset["input_ids"]))
            return self._n_tokens
        return float(len(self.train_dataset))

    def get_decay_parameter_names(self, model: nn.Module) -> list:
        """Weight decay everywhere the Trainer would put it, except on prior-covered parameters."""
        names = super().get_decay_parameter_names(model)
        prefix = "module." if hasattr(model, "module") and not hasattr(model, "config") else ""
        covered = {f"{prefix}{m}.{p}" for m in self.modules for p in ("weight", "bias")}
        return [n for n in names if n not in covered]

    # ------------------------------------------------------------------ training step
    def _curvature_step(self) -> bool:
        return self.state.global_step % self.args.curvature_every == 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training or not torch.is_grad_enabled():
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        labels = inputs.get("labels")
        collect = self._curvature_step()
        if collect:
            with self.curvature.capture(_unwrap(model), inputs.get("attention_mask")):
                loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                     num_items_in_batch=num_items_in_batch)
        else:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
        if not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(f"non-finite training loss ({float(loss.detach().mean())}) at step "
                                     f"{self.state.global_step}; the last good checkpoint is kept")
        if collect:
            t0 = time.perf_counter()
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[1]
            self.curvature.accumulate(logits, labels)
            self.timings["curvature_s"] += time.perf_counter() - t0
        # tempered posterior p(D|θ)^(1/T) p(θ), divided by N/T: mean ℓ + (T / 2N) Σ δ θ²
        penalty = self.prior.penalty(_unwrap(model), self.n_data) * self.args.temperature
        nll = loss.detach().mean()
        self._loss_sum = self._loss_sum + nll  # tensors: no host sync per step
        self._loss_count += 1
        self._log_sums["nll"] = self._log_sums["nll"] + nll
        self._log_sums["prior_term"] = self._log_sums["prior_term"] + penalty.detach()
        self._log_sums["n"] += 1
        if self._loss_scaled_for_ga(num_items_in_batch):
            penalty = penalty / self.current_gradient_accumulation_steps
        loss = loss + penalty.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        """Adds the data term (``nll``) and the prior term of the logged ``loss`` since the last log."""
        if "loss" in logs and self._log_sums["n"]:
            n = self._log_sums["n"]
            logs = {**logs, "nll": round(float(self._log_sums["nll"]) / n, 4),
                    "prior_term": round(float(self._log_sums["prior_term"]) / n, 4)}
            self._log_sums = {"nll": 0.0, "prior_term": 0.0, "n": 0}
        super().log(logs, *args, **kwargs)

    def _loss_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Mirror ``Trainer.training_step``: True when it will *not* divide the loss by the GA steps."""
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:  # transformers >= 5.2x
            return bool(self.loss_is_scaled_for_ga)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                    or self.compute_loss_func is not None)

    # ------------------------------------------------------------------ priors
    def update_priors(self, n_steps: Optional[int] = None) -> float:
        """All-reduce the curvature, take ``n_hypersteps`` Adam steps on ``log δ``; returns log marglik."""
        model = _unwrap(self.model)
        self.curvature.all_reduce()
        N = self.n_data
        t0 = time.perf_counter()
        curv = self.curvature.kron(N) if self.curvature.kind == "kfac" else self.curvature.diagonal(N)
        t1 = time.perf_counter()
        self.timings["eigh_s"] += t1 - t0
        mean_loss = float(self._loss_sum) / max(self._loss_count, 1)
        res = optimize_prior(self.prior, curv, params_aug(model, self.modules), n_steps=n_steps or self.args.n_hypersteps,
                             lr=self.args.hyper_lr, loss_sum=N * mean_loss, temperature=self.args.temperature,
                             optimizer_state=self._hyper_state)
        self.timings["hypersteps_s"] += time.perf_counter() - t1
        self._last_curvature_rows = float(self.curvature.n)
        logs = {"log_marglik": res.final / N, **self.prior.summary()}
        self.marglik_history.append({"step": self.state.global_step, "log_marglik": res.final})
        self.log(logs)
        # what pruning needs of this curvature (its diagonal), kept compactly after the reset
        self._retained = self.curvature.diagonal_state()
        self.curvature.reset()
        self._loss_sum, self._loss_count, self._steps_since_update = 0.0, 0, 0
        return res.final

    def fit_priors_posthoc(self, dataset=None, max_batches: Optional[int] = None, n_steps: int = 200) -> float:
        """Post-hoc SpaM: curvature from one pass over ``dataset`` (no weight updates), then fit ``log δ``.

        The model is run in eval mode (deterministic curvature) and put back in the mode it was in.
        """
        from tqdm.auto import tqdm

        model = _unwrap(self.model)
        was_training = model.training
        model.eval()
        loader = self.get_train_dataloader() if dataset is None else self.get_eval_dataloader(dataset)
        self.curvature.reset()
        self._loss_sum, self._loss_count = 0.0, 0
        try:
            total = len(loader) if max_batches is None else min(max_batches, len(loader))
            for i, batch in enumerate(tqdm(loader, total=total, desc="post-hoc curvature",
                                           disable=not self.is_local_process_zero())):
                if max_batches is not None and i >= max_batches:
                    break
                batch = self._prepare_inputs(batch)
                labels = batch.get("labels")
                with torch.enable_grad(), self.curvature.capture(model, batch.get("attention_mask")):
                    out = model(**batch)
                    self.curvature.accumulate(out.logits, labels)
                self._loss_sum = self._loss_sum + (float(out.loss.detach()) if out.loss is not None else 0.0)
                self._loss_count += 1
        finally:
            model.train(was_training)
        return self.update_priors(n_steps=n_steps)

    # ------------------------------------------------------------------ pruning
    def has_curvature(self, retained_only: bool = False) -> bool:
        live = float(self.curvature.n) > 0 and not retained_only
        return live or self._retained is not None

    def retained_curvature(self) -> Dict[str, torch.Tensor]:
        """Diagonal curvature for pruning scores (``out × (in+1)`` per module): from the live sums when they
        hold at least as many rows as those of the last prior update (or there was none), else from those."""
        N = self.n_data
        if float(self.curvature.n) > 0 and float(self.curvature.n) >= self._last_curvature_rows:
            return self.curvature.diagonal(N)
        if self._retained is not None:
            return diagonal_from_state(self._retained, N)
        raise RuntimeError("no curvature yet: train with SpamTrainer or call fit_priors_posthoc() before pruning")

    def prune(self, sparsity: float, budget: str = "params", method: str = "opd", seq_len: int = 128,
              seed: int = 0, min_keep: float = 0.0) -> Selection:
        """Score groups (OPD by default), select them under the budget, remove them physically.

        Returns the :class:`~spam_hf.selection.Selection` (``to_dict()`` is the JSON report). SpaM state
        is rebuilt for the smaller model (unit precisions of kept groups carried over).
        """
        model = _unwrap(self.model)
        curv = None if method in ("magnitude", "random") else self.retained_curvature()
        scores = group_scores(model, self.specs, method, prior=self.prior, curvature=curv,
                              temperature=self.args.temperature, seed=seed)
        selection = select_groups(model, self.specs, scores, sparsity, budget=budget, seq_len=seq_len,
                                  min_keep=min_keep)
        old_prior, old_specs = self.prior, self.specs
        prune_groups(model, selection.keep, kv_groups_only=self.args.kv_groups_only)
        self._pruned = True
        self.model_wrapped = self.model
        self.optimizer, self.lr_scheduler = None, None
        self._setup_spam_state()
        self._carry_unit_precisions(old_prior, old_specs, selection)
        logger.info(f"pruned {selection.achieved:.1%} of prunable {budget} (target {sparsity:.1%}) with {method}")
        return selection

    def prune_base(self, sparsity: float, budget: str = "params", seq_len: int = 128, min_keep: float = 0.0,
                   max_batches: Optional[int] = None) -> Selection:
        """LoRA runs: also remove heads/neurons of the frozen base model, keeping the adapter aligned.

        Scores are OPD on the *merged* weights ``W + s·B A``: a copy of the model with the adapter merged
        in gets base-layer curvature and unit priors fitted post hoc (one pass over the training data,
        or ``max_batches``). The selected groups are then removed from the base layers and the same rows
        (``B``) and columns (``A``) from the adapters; ranks and their priors are unchanged.
        """
        model = _unwrap(self.model)
        if not is_peft_model(model):
            raise ValueError("prune_base() is for peft LoRA models; prune() already prunes a plain model's base")
        merged = copy.deepcopy(model).merge_and_unload()
        merged.requires_grad_(True)  # peft froze the base; curvature hooks need gradients w.r.t. its outputs
        args = copy.deepcopy(self.args)
        # whole KV groups: uneven query heads per KV head would wrap the adapted k/v projections
        args.marglik_frequency, args.prior, args.kv_groups_only = 0, "unit", True
        args.output_dir = tempfile.mkdtemp(prefix="spam-hf-base-")
        helper = SpamTrainer(model=merged, args=args, train_dataset=self.train_dataset,
                             data_collator=self.data_collator)
        helper.fit_priors_posthoc(max_batches=max_batches)
        selection = helper.prune(sparsity, budget=budget, method="opd", seq_len=seq_len, min_keep=min_keep)
        base = model.get_base_model()
        get_family(base).shrink(base, selection.keep, kv_groups_only=True)
        old_prior = self.prior
        self.model_wrapped = self.model
        self.optimizer, self.lr_scheduler = None, None
        self._setup_spam_state()
        with torch.no_grad():  # the ranks did not change: keep their learned precisions
            for key, value in old_prior.log_delta.items():
                if key in self.prior.log_delta and self.prior.log_delta[key].shape == value.shape:
                    self.prior.log_delta[key].copy_(value)
        self._pruned = True  # save_model() now writes the export (the smaller base + the adapter)
        logger.info(f"pruned {selection.achieved:.1%} of the base model's prunable {budget} with OPD on merged weights")
        return selection

    def _carry_unit_precisions(self, old: PriorPrecision, old_specs, selection: Selection) -> None:
        if old.kind != "unit" or self.prior.kind != "unit":
            return
        by_key = {(s.kind, s.layer): s for s in self.specs}
        with torch.no_grad():
            for s in old_specs:
                new = by_key.get((s.kind, s.layer))
                if new is None:
                    continue
                self.prior.log_delta[f"unit:{new.name}"].copy_(old.log_delta[f"unit:{s.name}"][selection.keep[s.name]])

    # ------------------------------------------------------------------ state I/O
    def save_spam_state(self, output_dir: str) -> None:
        """Write priors, curvature sums and hyper-optimiser bookkeeping into ``output_dir``."""
        os.makedirs(output_dir, exist_ok=True)
        self.prior.save(os.path.join(output_dir, PRIOR_FILE))
        # live sums (for resuming the next prior update) and the retained diagonal (for pruning), one file
        curv = self.curvature.state_dict() if float(self.curvature.n) > 0 else {}
        curv.update({f"{RETAINED_PREFIX}{k}": v for k, v in (self._retained or {}).items()})
        if curv:
            save_file({k: v.contiguous() for k, v in curv.items()}, os.path.join(output_dir, CURVATURE_FILE),
                      metadata={"kind": self.curvature.kind, "reduction": self.curvature.reduction,
                                "fisher": self.curvature.fisher})
        meta = {"prior": self.prior.kind, "curvature": self.curvature.kind, "n_data": self.n_data,
                "likelihood": self.likelihood, "kfac_reduction": self.curvature.reduction,
                "temperature": self.args.temperature, "live_curvature": float(self.curvature.n) > 0,
                "loss_sum": float(self._loss_sum), "loss_count": self._loss_count,
                "marglik_history": self.marglik_history}
        with open(os.path.join(output_dir, STATE_FILE), "w") as f:
            json.dump(meta, f, indent=2)

    def load_spam_state(self, directory: str) -> None:
        """Restore what :meth:`save_spam_state` wrote (a clear error on structural mismatch)."""
        prior_path = os.path.join(directory, PRIOR_FILE)
        if not os.path.exists(prior_path):
            raise FileNotFoundError(f"{directory} has no {PRIOR_FILE}; was it written by SpamTrainer?")
        self.prior.load(prior_path)
        meta = {}
        if os.path.exists(os.path.join(directory, STATE_FILE)):
            with open(os.path.join(directory, STATE_FILE)) as f:
                meta = json.load(f)
        curv_path = os.path.join(directory, CURVATURE_FILE)
        if os.path.exists(curv_path):
            state = load_file(curv_path)
            retained = {k[len(RETAINED_PREFIX):]: v for k, v in state.items() if k.startswith(RETAINED_PREFIX)}
            live = {k: v for k, v in state.items() if not k.startswith(RETAINED_PREFIX)}
            if live:
                self.curvature.load_state_dict(live)
            if retained:
                expected = set(self.curvature.diagonal_state())
                if set(retained) != expected:
                    raise ValueError(f"{curv_path}: the retained curvature does not match this model's prunable "
                                     f"modules ({len(retained)} entries, expected {len(expected)})")
                self._retained = retained
                self._last_curvature_rows = float(retained["n"].reshape(()))
        self._loss_sum = float(meta.get("loss_sum", 0.0))
        self._loss_count = int(meta.get("loss_count", 0))
        self.marglik_history = list(meta.get("marglik_history", []))

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """The Trainer's save, plus the SpaM state; after :meth:`prune` the model is saved with
        :func:`spam_hf.export.save_pruned` (per-layer sizes + remote code) so that it reloads."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self._pruned:
            if self.args.should_save:
                save_pruned(_unwrap(self.model), output_dir, tokenizer=self.processing_class)
        else:
            super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save:
            self.save_spam_state(output_dir)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint:
            ckpt = resume_from_checkpoint
            if ckpt is True:
                ckpt = get_last_checkpoint(self.args.output_dir)
                if ckpt is None:
                    raise ValueError(f"no checkpoint found in {self.args.output_dir} to resume from")
            if os.path.exists(os.path.join(ckpt, PRIOR_FILE)):
                self.load_spam_state(ckpt)
                logger.info(f"restored SpaM priors and curvature from {ckpt}")
            resume_from_checkpoint = ckpt
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        best = self.state.best_model_checkpoint
        if self.args.load_best_model_at_end and best and os.path.exists(os.path.join(best, PRIOR_FILE)):
            self.load_spam_state(best)
        return output
