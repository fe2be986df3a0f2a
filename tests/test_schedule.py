"""Pruning during training: the cubic ramp, masks that only grow and stay zero, the surgery at the end,
the masks in checkpoints."""

import copy
import os

import pytest
import torch

from spam_hf import SpamTrainingArguments
from spam_hf.architectures import group_specs
from spam_hf.architectures.base import weight_out_in
from spam_hf.pruning import prune_groups
from spam_hf.pruning.schedule import SCHEDULE_FILE, SparsitySchedule, monotone_keep
from spam_hf.pruning.selection import prunable_cost

from test_trainer import make_trainer


def test_cubic_ramp_and_update_steps():
    s = SparsitySchedule(0.8, start_step=10, end_step=30, every=5)
    assert s.target(0) == s.target(10) == 0.0 and s.target(30) == s.target(99) == 0.8
    assert s.target(20) == pytest.approx(0.8 * (1 - 0.5 ** 3))
    assert [t for t in range(40) if s.due(t)] == [15, 20, 25, 30]
    assert all(s.target(a) <= s.target(b) for a, b in zip(range(40), range(1, 41)))
    f = SparsitySchedule.from_fractions(0.5, 0.25, 0.75, total_steps=16, every=2)
    assert (f.start_step, f.end_step) == (4, 12)
    with pytest.raises(ValueError, match="start"):
        SparsitySchedule.from_fractions(0.5, 0.8, 0.2, 16, 2)
    with pytest.raises(ValueError, match="pruning schedule"):
        SpamTrainingArguments(output_dir="x", schedule_sparsity=0.5, schedule_start=0.9, schedule_end=0.5)
    with pytest.raises(ValueError, match="sparsity must be in"):
        SpamTrainingArguments(output_dir="x", schedule_sparsity=1.5)


def test_monotone_keep():
    new = {"a": torch.tensor([0, 1, 3]), "b": torch.tensor([2])}
    assert monotone_keep(new, None)["a"].tolist() == [0, 1, 3]
    out = monotone_keep(new, {"a": torch.tensor([1, 2, 3]), "b": torch.tensor([0, 1, 2])})
    assert out["a"].tolist() == [1, 3] and out["b"].tolist() == [2]


def _masked_groups_are_zero(trainer):
    model = trainer.model
    mods = dict(model.named_modules())
    for s in trainer.specs:
        dropped = sorted(set(range(s.count)) - set(trainer.schedule_keep[s.name].tolist()))
        for m, idx in s.col_index.items():
            if dropped and weight_out_in(mods[m])[:, idx[dropped].reshape(-1)].abs().max() != 0:
                return False
    return True


def test_training_masks_on_the_ramp_and_the_final_prune_removes_exactly_those(tmp_path):
    trainer = make_trainer(tmp_path, schedule_sparsity=0.5, schedule_start=0.25, schedule_end=0.75, schedule_every=2,
                           save_strategy="steps", save_steps=10)
    history = []
    update = trainer.update_schedule_mask

    def recording(target):
        p = update(target)
        history.append({k: v.tolist() for k, v in trainer.schedule_keep.items()})
        return p

    trainer.update_schedule_mask = recording
    total0 = prunable_cost(trainer.model, trainer.specs, "params", 128)
    trainer.train()  # 16 steps: updates after steps 6, 8, 10, 12
    assert len(history) == 4
    for a, b in zip(history, history[1:]):  # masks only grow
        assert all(set(b[k]) <= set(a[k]) for k in a)
    assert _masked_groups_are_zero(trainer)  # re-zeroed after every optimiser step, through step 16
    shrunk = prune_groups(copy.deepcopy(trainer.model), trainer.schedule_keep)
    assert 1 - prunable_cost(shrunk, group_specs(shrunk), "params", 128) / total0 >= 0.5
    # the mask of the last update is in the checkpoint saved after step 10 (and loads back)
    ckpt = os.path.join(tmp_path, "run", "checkpoint-10")
    assert os.path.exists(os.path.join(ckpt, SCHEDULE_FILE))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    trainer.model.eval()
    with torch.no_grad():
        masked_logits = trainer.model(**batch).logits
    keep = {k: v.tolist() for k, v in trainer.schedule_keep.items()}
    sel = trainer.prune(0.5, method="fisher")
    assert {k: v for k, v in sel.to_dict()["keep"].items()} == keep  # the surgery removes what was masked
    with torch.no_grad():
        torch.testing.assert_close(trainer.model(**batch).logits, masked_logits, rtol=1e-5, atol=1e-6)


def test_lora_ranks_follow_the_schedule_and_export_as_a_stock_adapter(tmp_path):
    """The same ramp on a PeftModel: ranks are masked during training (no extra call), the final prune
    removes them, and the result is a peft adapter with a rank pattern."""
    from transformers import DataCollatorWithPadding

    from spam_hf import SpamTrainer
    from test_lora import lora_bert
    from test_trainer import ToyTokenizer, toy_dataset

    model = lora_bert()
    model.train()
    args = SpamTrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, max_steps=12,
                                 report_to=[], marglik_frequency=3, marglik_burn_in=3, curvature_every=1,
                                 n_hypersteps=2, save_strategy="no", use_cpu=True, disable_tqdm=True,
                                 schedule_sparsity=0.5, schedule_start=0.25, schedule_end=0.75, schedule_every=3)
    trainer = SpamTrainer(model=model, args=args, train_dataset=toy_dataset(),
                          data_collator=DataCollatorWithPadding(ToyTokenizer()))
    trainer.train()
    assert trainer.schedule_keep is not None and _masked_groups_are_zero(trainer)
    assert trainer.masked_fraction() >= 0.5
    r0 = sum(s.count for s in trainer.specs)
    survivors = sum(len(v) for v in trainer.schedule_keep.values())
    trainer.prune(0.5, method="fisher")
    kept = sum(s.count for s in group_specs(trainer.model))
    assert kept == survivors and kept < r0
    assert trainer.schedule_keep is None  # indices of the old groups: dropped with them, the ramp is over
    trainer.save_model(str(tmp_path / "adapter"))
    cfg = __import__("json").load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert cfg["rank_pattern"]


def test_lora_schedule_with_rank_damage_uses_the_live_kronecker_factors(tmp_path):
    """``schedule_method="damage"`` scores ranks by the rescale-invariant rank damage whenever live KFAC sums
    exist (between prior updates), ``fisher`` right after an update; the masked ranks stay zero."""
    from transformers import DataCollatorWithPadding

    from spam_hf import SpamTrainer
    from spam_hf.posterior import unwrap
    from spam_hf.priors import params_aug
    from spam_hf.pruning.damage import lora_rank_damage
    from test_lora import lora_bert
    from test_trainer import ToyTokenizer, toy_dataset

    model = lora_bert()
    model.train()
    args = SpamTrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, max_steps=12,
                                 report_to=[], marglik_frequency=3, marglik_burn_in=3, curvature_every=1,
                                 n_hypersteps=2, save_strategy="no", use_cpu=True, disable_tqdm=True,
                                 schedule_sparsity=0.5, schedule_start=0.25, schedule_end=0.75, schedule_every=2,
                                 schedule_method="damage")
    trainer = SpamTrainer(model=model, args=args, train_dataset=toy_dataset(),
                          data_collator=DataCollatorWithPadding(ToyTokenizer()))
    update, used = trainer.update_schedule_mask, []

    def recording(target):
        live = trainer.posterior.live_rows > 0
        expected = None
        if live:  # the rank damage of the first module, by hand, from the factors before this update
            spec = trainer.specs[0]
            with torch.no_grad():
                params = params_aug(unwrap(trainer.model), list(spec.modules))
            expected = lora_rank_damage(params, spec, trainer.posterior.factors())
        p = update(target)
        used.append((p.method if p is not None else None, live))
        if expected is not None and p is not None:
            torch.testing.assert_close(torch.tensor(p.scores[spec.name], dtype=torch.float64), expected.double(),
                                       rtol=1e-5, atol=1e-10)
        return p

    trainer.update_schedule_mask = recording
    trainer.train()
    assert ("damage", True) in used and all(m == "fisher" for m, live in used if m is not None and not live)
    assert _masked_groups_are_zero(trainer) and trainer.masked_fraction() >= 0.5


def test_schedule_compensation_refits_the_consuming_columns_by_least_squares(tmp_path):
    """``schedule_compensate``: at a mask update with live KFAC sums, the kept columns of O / down (bias included)
    become :func:`conditional_mean` of the weights before the update on the live ``A`` (1% damping), every masked
    column zero; without live sums nothing moves but the mask. Off by default."""
    from spam_hf.posterior import unwrap
    from spam_hf.pruning import conditional_mean
    from spam_hf.pruning.compensation import (LEAST_SQUARES_DAMPING, _kept_diag_mean, augmented_weight,
                                              removed_columns)

    assert not SpamTrainingArguments(output_dir="x").schedule_compensate
    trainer = make_trainer(tmp_path, schedule_sparsity=0.5, schedule_start=0.25, schedule_end=0.75, schedule_every=2,
                           schedule_compensate=True)
    update, checked = trainer.update_schedule_mask, []

    def recording(target):
        live = trainer.posterior.live_rows > 0
        mods = dict(unwrap(trainer.model).named_modules())
        factors = trainer.posterior.factors(extrapolate=False) if live else None
        before = {m: augmented_weight(mod) for m, mod in mods.items() if m in (factors or {})}
        p = update(target)
        if live and p is not None:
            for m, cols in removed_columns(trainer.specs, trainer.schedule_keep).items():
                if not cols:
                    continue
                A = factors[m][0]
                S = torch.tensor(sorted(set(cols)))
                expected = conditional_mean(before[m], A, S, damping=LEAST_SQUARES_DAMPING * _kept_diag_mean(A, S))
                torch.testing.assert_close(augmented_weight(mods[m]), expected.to(torch.float32).double(),
                                           rtol=1e-4, atol=1e-6)
                checked.append(m)
        return p

    trainer.update_schedule_mask = recording
    trainer.train()
    assert checked  # at least one update ran with live sums and moved the consuming columns
    assert _masked_groups_are_zero(trainer)
