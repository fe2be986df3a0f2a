"""Recovery by distillation: fine-tune the pruned model towards the unpruned one.

The loss of a batch is

    L = (1 − α) · CE(student, labels) + α · τ² · KL(p_teacher^τ ‖ p_student^τ) + β · mean_l MSE(h_l^s, h_l^t)

with ``p^τ = softmax(logits / τ)`` (Hinton et al. 2015; the ``τ²`` keeps the gradient scale of the
soft term independent of ``τ``), the KL averaged over examples (over real tokens for per-token logits
``[B, T, V]``), and the optional hidden-state term over every layer's output (pruning removes heads and
neurons, never the hidden size, so teacher and student states have the same shape).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from .checks import check_distillation


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0,
                    mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``τ² · mean KL(softmax(t/τ) ‖ softmax(s/τ))`` over the rows of ``[B, C]`` logits, or over the real
    positions (``mask`` ``[B, T]``, 1 = real) of ``[B, T, V]`` logits. A scalar."""
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_row = (t.exp() * (t - s)).sum(-1)  # [B] or [B, T]
    if per_row.dim() == 2 and mask is not None:
        m = mask.to(per_row.dtype)
        return temperature ** 2 * (per_row * m).sum() / m.sum().clamp_min(1.0)
    return temperature ** 2 * per_row.mean()


def hidden_state_mse(student_states, teacher_states, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over layers of the mean squared difference of the hidden states (``[B, T, d]`` each), over the
    real positions of ``mask``; the embedding output (index 0) is included as the models return it."""
    if len(student_states) != len(teacher_states):
        raise ValueError(f"student has {len(student_states)} hidden states, teacher {len(teacher_states)}")
    terms = []
    for hs, ht in zip(student_states, teacher_states):
        sq = (hs.float() - ht.float()).square().mean(-1)  # [B, T]
        if mask is not None and sq.dim() == 2:
            m = mask.to(sq.dtype)
            terms.append((sq * m).sum() / m.sum().clamp_min(1.0))
        else:
            terms.append(sq.mean())
    return torch.stack(terms).mean()


class DistillationTrainer(Trainer):
    """A plain :class:`~transformers.Trainer` whose loss is the distillation loss of the module docstring.

    Args:
        teacher: the unpruned model (frozen; moved to the training device, kept in eval mode).
        alpha: weight ``α`` in ``[0, 1]`` of the soft term (0 = plain fine-tune).
        temperature: ``τ`` > 0.
        hidden_weight: ``β`` ≥ 0 of the hidden-state term (0 = off).
    """

    def __init__(self, *args, teacher: nn.Module, alpha: float = 0.5, temperature: float = 2.0,
                 hidden_weight: float = 0.0, **kwargs) -> None:
        check_distillation(alpha, temperature, hidden_weight)
        super().__init__(*args, **kwargs)
        self.teacher = freeze(teacher.to(self.args.device))
        self.alpha, self.temperature, self.hidden_weight = alpha, temperature, hidden_weight
        # our loss is a per-batch mean: let the Trainer divide it by the accumulation steps
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        want_hidden = self.hidden_weight > 0
        out = model(**inputs, output_hidden_states=want_hidden)
        if out.loss is None:
            raise ValueError("distillation needs labels in the batch (the student's own loss)")
        teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        with torch.no_grad():
            t = self.teacher(**teacher_inputs, output_hidden_states=want_hidden)
        mask = inputs.get("attention_mask")
        kl = distillation_kl(out.logits, t.logits, self.temperature, mask)
        loss = (1.0 - self.alpha) * out.loss + self.alpha * kl
        if want_hidden:
            loss = loss + self.hidden_weight * hidden_state_mse(out.hidden_states, t.hidden_states, mask)
        return (loss, out) if return_outputs else loss


def freeze(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with no parameter requiring gradients (in place); returns it."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` for use as a teacher (eval mode, no gradients)."""
    return freeze(copy.deepcopy(model))
