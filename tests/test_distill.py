"""Recovery by distillation: the loss terms against explicit sums, the trainer's loss, the argument checks."""

import math

import pytest
import torch
from transformers import TrainingArguments

from spam_hf.arguments import FinishArguments
from spam_hf.distill import DistillationTrainer, distillation_kl, frozen_copy, hidden_state_mse
from spam_hf.pruning import apply, plan

from conftest import tiny_batch, tiny_classifier


def test_kl_equals_the_explicit_sum():
    torch.manual_seed(0)
    s, t, tau = torch.randn(5, 3), torch.randn(5, 3), 2.5
    ref = 0.0
    for i in range(5):
        p = [math.exp(v / tau) for v in t[i].tolist()]
        q = [math.exp(v / tau) for v in s[i].tolist()]
        p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
        ref += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert float(distillation_kl(s, t, tau)) == pytest.approx(tau ** 2 * ref / 5, rel=1e-5)
    assert float(distillation_kl(t, t, tau)) == pytest.approx(0.0, abs=1e-6)
    # per-token logits: padding positions do not count
    s3, t3 = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    rows = [distillation_kl(s3[b, i:i + 1], t3[b, i:i + 1], tau) for b in range(2) for i in range(4) if mask[b, i]]
    assert float(distillation_kl(s3, t3, tau, mask)) == pytest.approx(float(sum(rows) / len(rows)), rel=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        distillation_kl(s, t, 0.0)


def test_hidden_state_mse_over_real_positions():
    torch.manual_seed(1)
    hs = [torch.randn(2, 3, 4) for _ in range(3)]
    ht = [torch.randn(2, 3, 4) for _ in range(3)]
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    ref = sum(float(((a - b)[mask.bool()]).square().mean()) for a, b in zip(hs, ht)) / 3
    assert float(hidden_state_mse(hs, ht, mask)) == pytest.approx(ref, rel=1e-5)
    with pytest.raises(ValueError, match="hidden states"):
        hidden_state_mse(hs, ht[:2])


class _Rows(torch.utils.data.Dataset):
    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return len(self.batch["labels"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


def _trainer(student, teacher, batch, tmp_path, **kw):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=40, learning_rate=3e-3,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    return DistillationTrainer(model=student, args=args, train_dataset=_Rows(batch), teacher=teacher, **kw)


def test_trainer_loss_mixes_ce_kl_and_hidden_terms(tmp_path):
    teacher = tiny_classifier("bert", seed=0)
    student = tiny_classifier("bert", seed=0)
    apply(student, plan(student, None, 0.5, method="magnitude"))
    batch = tiny_batch(batch=8)
    with torch.no_grad():
        out = student(**batch, output_hidden_states=True)
        t = teacher(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
        kl = distillation_kl(out.logits, t.logits, 3.0, batch["attention_mask"])
        mse = hidden_state_mse(out.hidden_states, t.hidden_states, batch["attention_mask"])
        for alpha, beta in ((0.0, 0.0), (0.3, 0.0), (1.0, 0.5)):
            tr = _trainer(student, teacher, batch, tmp_path, alpha=alpha, temperature=3.0, hidden_weight=beta)
            loss = tr.compute_loss(student, dict(batch))
            expected = (1 - alpha) * out.loss + alpha * kl + beta * mse
            assert float(loss) == pytest.approx(float(expected), rel=1e-5), (alpha, beta)
    assert not any(p.requires_grad for p in tr.teacher.parameters())


def test_distillation_moves_the_pruned_model_towards_the_teacher(tmp_path):
    model = tiny_classifier("bert", seed=0)
    with torch.no_grad():  # a random tiny model predicts almost uniformly: sharpen it so the KL is not ~0
        model.classifier.weight.mul_(300.0)
    teacher = frozen_copy(model)
    student = tiny_classifier("bert", seed=1)  # another initialisation, pruned: far from the teacher
    apply(student, plan(student, None, 0.5, method="magnitude"))
    batch = tiny_batch(batch=8)

    def kl():
        with torch.no_grad():
            return float(distillation_kl(student(**batch).logits, teacher(**batch).logits, 1.0))

    before = kl()
    student.train()
    _trainer(student, teacher, batch, tmp_path, alpha=1.0, temperature=1.0).train()
    student.eval()
    assert kl() < 0.5 * before


def test_distillation_arguments_are_checked():
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        FinishArguments(distill=1.5, recovery_steps=10)
    with pytest.raises(ValueError, match="distill_temperature"):
        FinishArguments(distill=0.5, distill_temperature=0.0, recovery_steps=10)
    with pytest.raises(ValueError, match="--recovery-steps"):
        FinishArguments(distill=0.5)
    assert FinishArguments(distill=0.5, recovery_steps=10).distill == 0.5
