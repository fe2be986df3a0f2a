"""``SpamTrainer``: a ``transformers.Trainer`` that learns prior precisions by marginal likelihood.

The Laplace state lives in a :class:`~spam_hf.posterior.SpamLaplace` (``trainer.posterior``); the trainer
only adds Trainer hooks around it. Per optimiser step the loss is ``mean_b ℓ_b + (T / 2N) Σ_i δ_i θ_i²``
(the prior replaces weight decay on covered parameters). On every ``curvature_every``-th step the
training forward also feeds the curvature (one extra backward of a sampled loss from the same graph,
no extra data pass). After ``marglik_burn_in`` steps and then every ``marglik_frequency`` steps the
posterior takes ``n_hypersteps`` Adam steps on ``log δ``. ``prune()`` is a call into the pruning engine,
:func:`spam_hf.pruning.prune`; the posterior is rebuilt for the smaller model.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from typing import Dict, Optional

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME

try:  # transformers 5.2x: a module function; older ones rotate through Trainer._rotate_checkpoints
    from transformers.trainer import rotate_checkpoints
except ImportError:  # pragma: no cover - depends on the installed transformers
    rotate_checkpoints = None
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput
from transformers.utils import logging

from .architectures import is_peft_model
from .training_arguments import SpamTrainingArguments
from .distributed import all_reduce_sum, check_process_count, is_distributed, rank
from .export import gather_for_main, save_pruned
from .posterior import LIVE_FILE, PRIOR_FILE, SpamLaplace, likelihood_of, unwrap
from .sharding import is_sharded_model
from .pruning import PruningConfig, PruningPlan, Selection, apply, compensate, mask_groups, plan, prune
from .pruning.selection import prunable_cost, removed_cost
from .pruning.schedule import SCHEDULE_FILE, SparsitySchedule, kept_count, monotone_keep, read_keep, write_keep

logger = logging.get_logger(__name__)


STEPS_FILE = "spam_steps.json"
"""The trainer's step bookkeeping (steps since the last prior update), in checkpoints and in ``dense/``."""
COMPLETE_FILE = "spam_checkpoint_complete.json"
"""Written into a training checkpoint after every other file of it: the checkpoint is whole."""


def mark_complete(folder: str, step: int) -> None:
    """Write :data:`COMPLETE_FILE` into ``folder`` by an atomic rename (a half-written mark never exists)."""
    tmp = os.path.join(folder, f".{COMPLETE_FILE}.tmp")
    with open(tmp, "w") as f:
        json.dump({"step": int(step)}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, COMPLETE_FILE))


def is_complete(folder: str) -> bool:
    return os.path.exists(os.path.join(folder, COMPLETE_FILE))


def check_complete(folder: str) -> None:
    """``ValueError`` for a checkpoint that was never finished (no :data:`COMPLETE_FILE`)."""
    if os.path.isdir(folder) and not is_complete(folder):
        raise ValueError(f"checkpoint {folder!r} was never finished (the run stopped while writing it, or it was "
                         f"written before spam-hf marked complete checkpoints): resume from an earlier one")


def last_complete_checkpoint(output_dir: str) -> Optional[str]:
    """The newest ``checkpoint-N`` in ``output_dir`` that was finished; newer unfinished ones are named in a
    warning and skipped."""
    if not os.path.isdir(output_dir):
        return None
    found = sorted((int(m.group(1)), name) for name in os.listdir(output_dir)
                   if (m := re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name))
                   and os.path.isdir(os.path.join(output_dir, name)))
    for _, name in reversed(found):
        path = os.path.join(output_dir, name)
        if is_complete(path):
            return path
        logger.warning(f"skipping {path}: it was never finished (the run stopped while writing it)")
    return None


def per_batch_mean_loss(trainer: Trainer) -> Trainer:
    """Sequence-level heads return a per-micro-batch mean loss and ignore ``num_items_in_batch``; tell ``trainer``
    so: it then divides by the accumulation steps (GA k×b equals one batch of k·b) and, with several
    processes, does not multiply that mean by the process count (the loss doubled on two)."""
    if likelihood_of(unwrap(trainer.model)) != "causal_lm":
        trainer.model_accepts_loss_kwargs = False
    return trainer


class _MarglikCallback(TrainerCallback):
    def __init__(self, trainer: "SpamTrainer") -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        t._steps_since_update += 1
        step = state.global_step
        if args.marglik_frequency and step >= args.marglik_burn_in and \
                (step - args.marglik_burn_in) % args.marglik_frequency == 0 and t.posterior.live_rows > 0:
            t.update_priors()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.final_prior_update()
        return control


class _ScheduleCallback(TrainerCallback):
    """Pruning during training (``schedule_sparsity``): masks on the cubic ramp, re-zeroed after every step."""

    def __init__(self, trainer: "SpamTrainer") -> None:
        self.trainer = trainer
        self.schedule: Optional[SparsitySchedule] = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.schedule = SparsitySchedule.from_fractions(args.schedule_sparsity, args.schedule_start, args.schedule_end,
                                                        state.max_steps, args.schedule_every)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        if self.schedule is not None and self.schedule.due(state.global_step):
            t.update_schedule_mask(self.schedule.target(state.global_step))
        elif t.schedule_keep:
            mask_groups(unwrap(t.model), t.specs, t.schedule_keep)  # the optimiser step moved masked weights
        return control


def engine(world_size: int, sharded: bool = False) -> str:
    """The engine a SpamTrainer runs under, in words (logged once at the start)."""
    if sharded:
        return (f"FSDP2: {world_size} processes, weights, gradients and optimiser state sharded; curvature sums "
                "owned per module (each process keeps its modules' sums only)")
    if world_size > 1:
        return (f"DDP: {world_size} processes, each with the whole model and its curvature sums (summed over the "
                "processes before every prior update)")
    return "in one process"


def _check_optimizer_sees_split_experts(trainer: "SpamTrainer") -> None:
    """A mixture of experts' blocks were just split into Linear layers (new parameters): an optimizer passed to the
    trainer was built over the old ones and would train nothing there."""
    from .architectures.moe import RoutedExperts

    optimizer = getattr(trainer, "optimizer", None)
    split = [p for m in trainer.model.modules() if isinstance(m, RoutedExperts) for p in m.parameters()
             if p.requires_grad]
    if optimizer is None or not split:
        return
    known = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not any(id(p) in known for p in split):
        raise ValueError("the optimizer passed to SpamTrainer was built before spam-hf split the mixture-of-experts "
                         "blocks into Linear layers, so it holds none of the experts' new parameters; leave "
                         "`optimizers` out, or build it from trainer.model after SpamTrainer(...)")


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
        if getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False):
            raise ValueError("SpamTrainer does not run under accelerate's FSDP or DeepSpeed plugins: shard the model "
                             "with transformers' FSDP2 instead (spam-hf compress --fsdp2 under torchrun, or "
                             "from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=N)))")
        if self.args.fsdp:  # asked for, yet not enabled: the Trainer on the CPU (use_cpu) silently runs DDP instead
            raise ValueError(f"fsdp={self.args.fsdp!r} was asked for, but this Trainer would run "
                             f"{'DDP' if self.args.world_size > 1 else 'one process'} (on the CPU accelerate drops "
                             "FSDP without a word); for sharded training load the model with FSDP2 (spam-hf "
                             "compress --fsdp2, or from_pretrained(..., distributed_config=DistributedConfig("
                             "fsdp_size=N))) and leave --fsdp out")
        check_process_count(self.args.world_size)
        self.sharded = is_distributed() and is_sharded_model(self.model)
        if self.sharded and getattr(self.args.save_strategy, "value", self.args.save_strategy) != "no":
            raise ValueError("checkpoints of an FSDP2-sharded SpaM run are not supported yet (each process owns part "
                             "of the curvature); set --save_strategy no")
        logger.info(f"spam-hf runs {engine(self.args.world_size, self.sharded)}")
        self.posterior = SpamLaplace.from_args(self.model, self.args)
        _check_optimizer_sees_split_experts(self)
        self._steps_since_update = 0
        self._log_sums = {"nll": 0.0, "prior_term": 0.0, "n": 0}
        # sequence-level heads: GA k×b equals one batch of k·b, and no ×processes on the mean loss
        per_batch_mean_loss(self)
        self._pruned = False
        self.schedule_keep: Optional[Dict[str, torch.Tensor]] = None  # groups kept by the pruning schedule so far
        self.add_callback(_MarglikCallback(self))
        if self.args.schedule_sparsity:
            self.add_callback(_ScheduleCallback(self))

    # ------------------------------------------------------------------ views of the posterior
    @property
    def prior(self):
        return self.posterior.prior

    @property
    def specs(self):
        return self.posterior.specs

    @property
    def likelihood(self) -> str:
        return self.posterior.likelihood

    @property
    def marglik_history(self) -> list:
        return self.posterior.history

    @property
    def timings(self) -> Dict[str, float]:
        return self.posterior.timings

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

    def _sync_n(self) -> SpamLaplace:
        self.posterior.n_data = self.n_data
        return self.posterior

    def get_decay_parameter_names(self, model: nn.Module) -> list:
        """Weight decay everywhere the Trainer would put it, except on prior-covered parameters."""
        names = super().get_decay_parameter_names(model)
        prefix = "module." if hasattr(model, "module") and not hasattr(model, "config") else ""
        covered = {f"{prefix}{m}.{p}" for m in self.posterior.modules for p in ("weight", "bias")}
        return [n for n in names if n not in covered]

    # ------------------------------------------------------------------ training step
    def _curvature_step(self) -> bool:
        return self.state.global_step % self.args.curvature_every == 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training or not torch.is_grad_enabled():
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        posterior = self._sync_n()
        labels = inputs.get("labels")
        collect = self._curvature_step()
        if collect:
            with posterior.capture(model, inputs.get("attention_mask")):
                loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                     num_items_in_batch=num_items_in_batch)
        else:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
        if not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(f"non-finite training loss ({float(loss.detach().mean())}) at step "
                                     f"{self.state.global_step}; the last good checkpoint is kept")
        if collect:
            posterior.accumulate(outputs["logits"] if isinstance(outputs, dict) else outputs[1], labels)
        # tempered posterior p(D|θ)^(1/T) p(θ), divided by N/T: mean ℓ + (T / 2N) Σ δ θ²
        penalty = posterior.penalty(model)
        nll = loss.detach().mean()
        posterior.add_loss(nll)  # tensors: no host sync per step
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
            prior_term = self._log_sums["prior_term"]
            if self.sharded:  # each process's penalty covers its rows only
                prior_term = all_reduce_sum(torch.as_tensor(prior_term, dtype=torch.float64))
            logs = {**logs, "nll": round(float(self._log_sums["nll"]) / n, 4),
                    "prior_term": round(float(prior_term) / n, 4)}
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
        """One marginal-likelihood update of the priors (:meth:`SpamLaplace.optimize_prior_precision`),
        logged through the Trainer; returns ``log Z``."""
        posterior = self._sync_n()
        value = posterior.optimize_prior_precision(n_steps=n_steps, progress=self._progress())
        posterior.history.append({"step": self.state.global_step, "log_marglik": value})
        self._log_prior_fit(value)
        self._steps_since_update = 0
        return value

    def _progress(self) -> bool:
        """Progress bars on this process: the main one, unless the Trainer's are off."""
        return self.is_local_process_zero() and not self.args.disable_tqdm

    def _log_prior_fit(self, value: float) -> None:
        """The prior fit through the Trainer's logs (``log_marglik``, ``prior/*``), with one line, the first time,
        that says what those numbers are."""
        if not self.posterior.history[:-1] and self.is_world_process_zero():
            logger.info("prior fits are logged as log_marglik (the Laplace log evidence per data point; higher = the "
                        "priors explain the data better) and prior/<group>_mean|min|max (the prior precisions: a "
                        "group pulled harder towards zero has a larger one, and is likelier to be removed)")
        self.log({"log_marglik": value / self.posterior.n_data, **self.posterior.prior.summary()})

    def final_prior_update(self) -> None:
        """What ends training: a last prior update when the tail since the previous one is long enough to estimate
        curvature from; otherwise the previous update's curvature stays the one used for pruning."""
        freq = self.args.marglik_frequency
        if freq and self.posterior.live_rows > 0 and \
                (self._steps_since_update * 2 >= freq or not self.posterior.has_curvature(retained_only=True)):
            self.update_priors()

    def fit_priors_posthoc(self, dataset=None, max_batches: Optional[int] = None, n_steps: int = 200) -> float:
        """Post-hoc SpaM: :meth:`SpamLaplace.fit` on the training data (or ``dataset``), no weight updates."""
        loader = self.get_train_dataloader() if dataset is None else self.get_eval_dataloader(dataset)
        value = self._sync_n().fit(loader, max_batches=max_batches, n_steps=n_steps, progress=self._progress())
        self.posterior.history.append({"step": self.state.global_step, "log_marglik": value})
        self._log_prior_fit(value)
        return value

    # ------------------------------------------------------------------ pruning
    def has_curvature(self, retained_only: bool = False) -> bool:
        return self.posterior.has_curvature(retained_only)

    def plan(self, sparsity: Optional[float] = None, *, config: Optional[PruningConfig] = None,
             **options) -> PruningPlan:
        """:func:`spam_hf.pruning.plan` with this trainer's model (untouched): what one round of :meth:`prune`
        would remove. Scores of the trained posterior (``opd``, ``fisher``) read it; scores of calibration
        statistics (the default ``damage-obs``) get them from ``calibration_batches`` training batches first, in a
        posterior like the trained one. ``config`` / ``options``: a :class:`~spam_hf.pruning.PruningConfig`."""
        config = PruningConfig.build(sparsity, config, **options)
        model, posterior = unwrap(self.model), self._sync_n()
        score = config.resolved(is_peft_model(model)).score
        if score.calibrated:
            trained = posterior
            posterior = trained.calibration_posterior(model, mask_fisher="mask_fisher" in score.needs,
                                                      consuming_only=score.collects_consuming_only,
                                                      input_means="input_moments" in score.needs)
            posterior.carry_over(trained, {})
            posterior.collect(self.get_train_dataloader(), max_batches=config.calibration_batches,
                              progress=self._progress())
        return plan(model, posterior, config=config)

    def update_schedule_mask(self, target: float) -> Optional[PruningPlan]:
        """Mask (zero) the groups beyond ``target`` of the prunable parameters, scored on the current model with
        ``schedule_method`` (magnitude until the first prior update gives curvature; ``damage`` needs live KFAC
        sums and uses ``fisher`` without them); masks only grow."""
        method = self.args.schedule_method
        if method == "damage" and (not self.posterior.curvature.whole_factors or self.posterior.live_rows <= 0):
            method = "fisher"  # no live Kronecker factors (diagonal curvature or wide factors, or right after an update)
        if method != "magnitude" and not self.posterior.has_curvature():
            method = "magnitude"
        if target <= 0:
            return None
        # the live training sums, not calibration batches: the schedule scores between optimiser steps
        p = plan(unwrap(self.model), self._sync_n(), target, method=method)
        keep = monotone_keep(p.keep, self.schedule_keep)
        if self.args.schedule_compensate and kept_count(keep, self.specs) < kept_count(self.schedule_keep, self.specs):
            self._compensate_schedule(keep)
        self.schedule_keep = keep
        mask_groups(unwrap(self.model), self.specs, self.schedule_keep)
        masked = kept_count(None, self.specs) - kept_count(self.schedule_keep, self.specs)
        logger.info(f"pruning schedule: {masked} groups masked (target {target:.1%} of prunable params, {method})")
        return p

    def _compensate_schedule(self, keep: Dict[str, torch.Tensor]) -> Dict[str, int]:
        """``schedule_compensate``: before the groups that ``keep`` drops are masked, refit the remaining columns
        of their consuming layers by least squares (:func:`~spam_hf.pruning.compensate`) on ``A`` of the live KFAC
        sums (the inputs ``[x | 1]`` of O / down on the batches since the last prior update; averaged over
        processes, so every process moves its weights alike). Columns masked earlier are zero already, so only
        the new ones move the rest. Skipped (``{}``) for LoRA, diagonal curvature, wide factors kept as diagonals or no live sums."""
        model, post = unwrap(self.model), self.posterior
        if is_peft_model(model) or not post.curvature.whole_factors or post.live_rows <= 0:
            return {}
        factors = post.factors(extrapolate=False)
        if is_distributed():
            world = torch.distributed.get_world_size()
            factors = {m: (all_reduce_sum(A) / world, G) for m, (A, G) in factors.items()}
        return compensate(model, self.specs, keep, factors, kind="least-squares")

    def masked_fraction(self, budget: str = "params", seq_len: int = 128) -> float:
        """The fraction of the prunable ``budget`` that the pruning schedule has masked (0 without a schedule)."""
        if not self.schedule_keep:
            return 0.0
        model = unwrap(self.model)
        removed = sum(removed_cost(model, s, self.schedule_keep.get(s.name, torch.arange(s.count)), budget, seq_len)
                      for s in self.specs)
        return removed / prunable_cost(model, self.specs, budget, seq_len)

    def prune(self, sparsity: Optional[float] = None, *, config: Optional[PruningConfig] = None,
              **options) -> Selection:
        """Remove groups for real with :func:`spam_hf.pruning.prune`: this trainer's model, its posterior as the
        statistics, and its training batches as calibration (each process its shard).

        ``config`` (a :class:`~spam_hf.pruning.PruningConfig`; default: its defaults, so ``method="auto"``) with
        ``sparsity`` and any of its fields in ``options`` replaced, e.g. ``trainer.prune(0.7, method="opd")``.
        By default (the score registry's): the damage left after compensation, in rounds with least-squares
        compensation, for a full model; OPD in one shot for LoRA ranks.

        Returns the :class:`~spam_hf.pruning.Selection` (``to_dict()`` is the JSON report, indices of the
        original groups); the whole result is ``trainer.last_result``, a one-shot plan ``trainer.last_plan``. The
        posterior is rebuilt for the smaller model (unit precisions of kept groups carried over).
        """
        config = PruningConfig.build(sparsity, config, **options)
        if self.schedule_keep:  # every group the schedule masked goes (they score zero, so they go first)
            masked = self.masked_fraction(config.budget, config.flops_seq_len)
            if masked > config.sparsity:
                logger.info(f"the pruning schedule masked {masked:.1%} of prunable {config.budget}; removing all of it")
                config = config.replace(sparsity=masked)
        result = prune(unwrap(self.model), self._sync_n(), config, self.get_train_dataloader(),
                       progress=self._progress())
        self._after_surgery(result.selection.keep, layer_map=result.layer_map)
        self.last_result = result
        if len(result.plans) == 1 and not result.config.in_rounds:
            self.last_plan = result.plans[0]
        used = result.config
        logger.info(f"pruned {result.achieved:.1%} of prunable {used.budget} (target {used.sparsity:.1%}) with "
                    f"{used.method} in {len(result.plans)} round(s){' with compensation' if used.compensate else ''}")
        return result.selection

    def _after_surgery(self, keep: Dict[str, torch.Tensor], same_groups: bool = False,
                       layer_map: Optional[Dict[int, int]] = None) -> None:
        """The model changed shape: a posterior for it (precisions of kept groups carried over, see
        :meth:`SpamLaplace.carry_over`; ``layer_map`` when whole blocks were removed), a fresh optimiser, and
        ``save_model()`` writes the export."""
        old = self.posterior
        self.posterior = SpamLaplace.from_args(unwrap(self.model), self.args, n_data=old.n_data)
        self.posterior.carry_over(old, keep, same_groups=same_groups, layer_map=layer_map)
        self._pruned = True
        self.model_wrapped = self.model
        self.optimizer, self.lr_scheduler = None, None
        if not same_groups and self.schedule_keep is not None:  # the masked groups are gone; the ramp is done
            self.schedule_keep = None
            self.remove_callback(_ScheduleCallback)

    def prune_base(self, sparsity: float, budget: str = "params", seq_len: int = 128, min_keep: float = 0.0,
                   max_batches: Optional[int] = None) -> Selection:
        """LoRA runs: also remove heads/neurons of the frozen base model, keeping the adapter aligned.

        Scores are OPD on the *merged* weights ``W + s·B A``: a copy of the model with the adapter merged
        in gets base-layer curvature and unit priors fitted post hoc (:meth:`SpamLaplace.fit`, one pass
        over the training data or ``max_batches``). The selected groups are then removed from the base
        layers and the same rows (``B``) and columns (``A``) from the adapters; ranks and their priors
        are unchanged.
        """
        model = unwrap(self.model)
        if not is_peft_model(model):
            raise ValueError("prune_base() is for peft LoRA models; prune() already prunes a plain model's base")
        merged = copy.deepcopy(model).merge_and_unload()
        merged.requires_grad_(True)  # peft froze the base; curvature hooks need gradients w.r.t. its outputs
        # whole KV groups: uneven query heads per KV head would wrap the adapted k/v projections
        base_posterior = SpamLaplace(merged, prior="unit", prior_init=self.args.prior_init,
                                     curvature=self.args.curvature, reduction=self.args.kfac_reduction,
                                     fisher=self.args.fisher_type, n_data=self.n_data,
                                     temperature=self.args.temperature,
                                     max_rows_per_batch=self.args.curvature_max_rows or None, seed=self.args.seed,
                                     kv_groups_only=True, hyper_lr=self.args.hyper_lr,
                                     diagonal_from=self.args.kfac_diagonal_from or None)
        base_posterior.fit(self.get_train_dataloader(), max_batches=max_batches,
                           progress=self._progress())
        pruning_plan = plan(merged, base_posterior, sparsity, method="opd", budget=budget, flops_seq_len=seq_len,
                            min_keep=min_keep)
        del merged
        apply(model.get_base_model(), pruning_plan)
        self._after_surgery({}, same_groups=True)
        logger.info(f"pruned {pruning_plan.achieved:.1%} of the base model's prunable {budget} with OPD on merged weights")
        return pruning_plan.selection

    # ------------------------------------------------------------------ state I/O
    def save_spam_state(self, output_dir: str) -> None:
        """Write the posterior (:meth:`SpamLaplace.save`) and the step bookkeeping into ``output_dir``."""
        if self.args.n_data or self.train_dataset is not None:
            self._sync_n()
        self.posterior.save(output_dir)
        if self.schedule_keep is not None:
            write_keep(os.path.join(output_dir, SCHEDULE_FILE), self.schedule_keep)
        with open(os.path.join(output_dir, STEPS_FILE), "w") as f:
            json.dump({"steps_since_update": self._steps_since_update}, f)

    def load_spam_state(self, directory: str) -> None:
        """Restore what :meth:`save_spam_state` wrote (a clear error on structural mismatch)."""
        self.posterior.load(directory)
        path = os.path.join(directory, SCHEDULE_FILE)
        if os.path.exists(path):
            self.schedule_keep = read_keep(path)
        path = os.path.join(directory, STEPS_FILE)
        if os.path.exists(path):
            with open(path) as f:
                self._steps_since_update = int(json.load(f)["steps_since_update"])

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """The Trainer's save, plus the SpaM state; after :meth:`prune` the model is saved with
        :func:`spam_hf.export.save_pruned` (per-layer sizes + remote code) so that it reloads."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self._pruned:
            if self.args.should_save:
                save_pruned(unwrap(self.model), output_dir, tokenizer=self.processing_class)
            elif self.sharded:  # FSDP2: the main process's save gathers the weights from every process
                gather_for_main(unwrap(self.model))
        else:
            super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save:
            self.save_spam_state(output_dir)
        if _internal_call and is_distributed():  # a checkpoint: each process's own live sums (main's are not all)
            os.makedirs(output_dir, exist_ok=True)
            self.posterior.save_live(os.path.join(output_dir, LIVE_FILE.format(rank=rank())))

    def unsharded(self, model: nn.Module) -> "SpamTrainer":
        """After FSDP2 training: a trainer of the same job on ``model``, an unsharded copy of this one's model (read
        back from the saved dense checkpoint, on every process), with this trainer's priors, the retained curvature
        diagonal (every owner's, gathered at each prior update), the hyper-step state and the Trainer state; what
        pruning runs on, data parallel. Live curvature sums are left behind: each process holds its modules' only,
        and pruning reads calibration statistics or the retained diagonal."""
        if not self.sharded:
            raise ValueError("unsharded(): this trainer's model is not sharded")
        tensors, meta = self.posterior.state_dict()  # without the live sums: each process holds its own modules'
        self.optimizer = self.lr_scheduler = None  # the sharded training state goes before the copy settles in
        trainer = SpamTrainer(model=model, args=self.args, train_dataset=self.train_dataset,
                              eval_dataset=self.eval_dataset, data_collator=self.data_collator,
                              processing_class=self.processing_class, compute_metrics=self.compute_metrics)
        trainer.posterior.load_state_dict(tensors, meta)
        trainer.posterior.n_data = self.posterior.n_data
        trainer.state = self.state
        logger.info("spam-hf prunes the FSDP2-trained model data parallel: every process holds an unsharded copy")
        return trainer

    @staticmethod
    def _finished_state(ckpt: str) -> Optional[TrainerState]:
        """The checkpoint's Trainer state when it was taken at the last step (training had finished), else None."""
        path = os.path.join(ckpt, TRAINER_STATE_NAME)
        if not os.path.exists(path):
            return None
        state = TrainerState.load_from_json(path)
        return state if state.max_steps and state.global_step >= state.max_steps else None

    def _resume_finished(self, ckpt: str, state: TrainerState) -> TrainOutput:
        """Resume from the checkpoint of the last step: no step is trained (the Trainer would train one past
        ``max_steps``); the weights, the random state and the SpaM state are the checkpoint's, and what ended the
        uninterrupted run after that checkpoint (the final prior update) happens again."""
        self._load_from_checkpoint(ckpt)
        self._load_rng_state(ckpt)
        self.state = state
        self.final_prior_update()
        logger.info(f"{ckpt} was taken at the last step ({state.global_step}): training had finished")
        return TrainOutput(state.global_step, float("nan"), {})

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, then :data:`COMPLETE_FILE` written into it (by an atomic rename) once every
        file is there, then the rotation of older checkpoints. A checkpoint without the mark was never finished
        (killed, disk full) and is never resumed from (:func:`last_complete_checkpoint`); one that fails while
        being written is removed."""
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        existed = os.path.exists(folder)
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # rotation waits until the new checkpoint is marked complete
        try:
            super()._save_checkpoint(model, trial)
        except BaseException:
            if not existed and self.args.should_save:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save:
            mark_complete(folder, self.state.global_step)
            if rotate_checkpoints is not None:
                rotate_checkpoints(output_dir=os.path.dirname(folder), save_total_limit=limit,
                                   best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
            else:
                self._rotate_checkpoints(use_mtime=False, output_dir=os.path.dirname(folder))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint:
            ckpt = resume_from_checkpoint
            if ckpt is True:
                ckpt = last_complete_checkpoint(self.args.output_dir)
                if ckpt is None:
                    raise ValueError(f"no complete checkpoint found in {self.args.output_dir} to resume from")
            check_complete(ckpt)
            if os.path.exists(os.path.join(ckpt, PRIOR_FILE)):
                self.load_spam_state(ckpt)
                live = os.path.join(ckpt, LIVE_FILE.format(rank=rank()))
                if is_distributed() and os.path.exists(live):
                    self.posterior.load_live(live)
                logger.info(f"restored SpaM priors and curvature from {ckpt}")
            resume_from_checkpoint = ckpt
            finished = self._finished_state(ckpt)
            if finished is not None:
                return self._resume_finished(ckpt, finished)
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        best = self.state.best_model_checkpoint
        if self.args.load_best_model_at_end and best and os.path.exists(os.path.join(best, PRIOR_FILE)):
            self.load_spam_state(best)
        return output
