"""SpamTrainer on a tiny BERT: priors learned during ordinary steps, checkpoints, resume, post-hoc, prune."""

import os

import pytest
import torch
from datasets import Dataset
from transformers import DataCollatorWithPadding, TrainingArguments

from spam_hf import SpamTrainer, SpamTrainingArguments
from spam_hf.posterior import CURVATURE_FILE, HYPER_FILE, PRIOR_FILE

from conftest import tiny_classifier


class ToyTokenizer:
    """Enough of a tokenizer for DataCollatorWithPadding."""

    pad_token_id = 0
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "right"

    def save_pretrained(self, directory, **kw):
        return ()

    def pad(self, features, **kw):
        L = max(len(f["input_ids"]) for f in features)
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            n = len(f["input_ids"])
            out["input_ids"].append(list(f["input_ids"]) + [0] * (L - n))
            out["attention_mask"].append([1] * n + [0] * (L - n))
            out["labels"].append(f["labels"])
        return {k: torch.tensor(v) for k, v in out.items()}


def toy_dataset(n=64, seed=0):
    """Label = whether token 7 occurs; variable lengths so padding is exercised."""
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "labels": []}
    for i in range(n):
        L = int(torch.randint(4, 12, (1,), generator=g))
        ids = torch.randint(10, 100, (L,), generator=g).tolist()
        label = i % 2
        if label:
            ids[int(torch.randint(0, L, (1,), generator=g))] = 7
        rows["input_ids"].append(ids)
        rows["labels"].append(label)
    return Dataset.from_dict(rows)


def make_trainer(tmp_path, **kw):
    model = tiny_classifier("bert", num_labels=2)
    model.train()
    defaults = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, num_train_epochs=2,
                    learning_rate=1e-3, report_to=[], logging_steps=2, marglik_frequency=4, marglik_burn_in=4,
                    curvature_every=1, n_hypersteps=5, save_strategy="no", use_cpu=True, seed=0,
                    disable_tqdm=True)
    defaults.update(kw)
    args = SpamTrainingArguments(**defaults)
    return SpamTrainer(model=model, args=args, train_dataset=toy_dataset(), eval_dataset=toy_dataset(16, 1),
                       data_collator=DataCollatorWithPadding(ToyTokenizer()))


def test_priors_are_updated_and_logged(tmp_path):
    trainer = make_trainer(tmp_path)
    before = {k: v.detach().clone() for k, v in trainer.prior.log_delta.items()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "log_marglik" in h]
    assert len(logs) >= 3
    assert all(k in logs[0] for k in ("prior/head_mean", "prior/head_min", "prior/neuron_max"))
    assert any(not torch.equal(before[k], v) for k, v in trainer.prior.log_delta.items())
    assert trainer.model.training  # dropout mode left as the user set it
    assert trainer.timings["curvature_s"] > 0 and trainer.timings["hypersteps_s"] > 0


def test_prior_replaces_weight_decay_on_covered_parameters(tmp_path):
    trainer = make_trainer(tmp_path, weight_decay=0.1)
    names = trainer.get_decay_parameter_names(trainer.model)
    assert not any(".attention.self.query." in n or ".intermediate.dense." in n for n in names)
    assert any("word_embeddings" in n for n in names) or any("classifier" in n for n in names)


def test_penalty_is_in_the_loss(tmp_path):
    trainer = make_trainer(tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    model = trainer.model
    model.eval()  # same forward twice
    with torch.no_grad():
        plain = model(**batch).loss
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    with torch.no_grad():
        with torch.enable_grad():
            spam_loss = trainer.compute_loss(model, dict(batch))
    expected = plain + trainer.prior.penalty(model, trainer.n_data)
    torch.testing.assert_close(spam_loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_matches_big_batch(tmp_path):
    """Same global batches: GA 2×4 and 1×8 give the same curvature and (nearly) the same priors.

    Deterministic set-up: empirical Fisher, no dropout. Key projections are excluded from the exact
    comparison: with the 'reduce' approximation their G is ~0 (a key bias cannot change the softmax),
    i.e. pure round-off.
    """
    res = []
    for bs, ga in ((8, 1), (4, 2)):
        tr = make_trainer(tmp_path / f"ga{ga}", per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                          fisher_type="empirical", num_train_epochs=1, marglik_frequency=0)
        tr.train()
        res.append((tr.posterior.curvature.state_dict(), tr.state.log_history[0]["loss"]))
        tr2 = make_trainer(tmp_path / f"gb{ga}", per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                           fisher_type="empirical", num_train_epochs=1)
        tr2.train()
        res[-1] += ([h["log_marglik"] for h in tr2.state.log_history if "log_marglik" in h],)
    assert res[0][1] == pytest.approx(res[1][1], rel=1e-5)
    for k, v in res[0][0].items():
        if ".key." not in k:
            torch.testing.assert_close(v, res[1][0][k], rtol=1e-4, atol=1e-7 * float(v.abs().max()))
    # Adam's first steps are sign-like on near-flat directions, so compare the objective, not each δ
    assert res[0][2] == pytest.approx(res[1][2], rel=1e-2)


def test_resume_from_checkpoint_equals_the_uninterrupted_run(tmp_path):
    """A run resumed from a mid-training checkpoint ends with the uninterrupted run's weights, priors and
    pruning decision: the checkpoint holds the priors, live curvature sums, retained diagonal, the
    hyper-optimiser's Adam moments and the Monte-Carlo label generator."""
    full = make_trainer(tmp_path / "a", save_strategy="steps", save_steps=6, num_train_epochs=2)
    full.train()
    ckpt = os.path.join(tmp_path, "a", "run", "checkpoint-6")
    for f in (PRIOR_FILE, CURVATURE_FILE, HYPER_FILE):
        assert os.path.exists(os.path.join(ckpt, f)), f
    resumed = make_trainer(tmp_path / "b", save_strategy="steps", save_steps=6, num_train_epochs=2)
    resumed.train(resume_from_checkpoint=ckpt)
    for k, v in full.prior.log_delta.items():
        torch.testing.assert_close(resumed.prior.log_delta[k], v, rtol=1e-6, atol=1e-9)
    weights = dict(full.model.named_parameters())
    for n, p in resumed.model.named_parameters():
        torch.testing.assert_close(p, weights[n], rtol=1e-6, atol=1e-8)
    keep_full, keep_resumed = full.plan(0.5, method="opd").keep, resumed.plan(0.5, method="opd").keep
    assert {k: v.tolist() for k, v in keep_full.items()} == {k: v.tolist() for k, v in keep_resumed.items()}


def test_plan_defaults_to_the_engine_score_and_leaves_the_model(tmp_path):
    """trainer.plan() takes the engine's default (damage-obs on calibration batches it collects itself, in a
    posterior like the trained one) and changes neither the weights nor the trained posterior."""
    trainer = make_trainer(tmp_path)
    trainer.train()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    priors = {k: v.detach().clone() for k, v in trainer.prior.log_delta.items()}
    p = trainer.plan(0.5, calibration_batches=2)
    assert p.method == "damage-obs" and p.achieved >= 0.5
    for n, t in trainer.model.named_parameters():
        assert torch.equal(t, before[n]), n
    assert all(torch.equal(v, priors[k]) for k, v in trainer.prior.log_delta.items())


def test_posthoc_fit_without_weight_updates(tmp_path):
    trainer = make_trainer(tmp_path)
    w0 = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    before = {k: v.detach().clone() for k, v in trainer.prior.log_delta.items()}
    value = trainer.fit_priors_posthoc(n_steps=20)
    assert torch.isfinite(torch.tensor(value))
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p, w0[n]), n
    assert any(not torch.equal(before[k], v) for k, v in trainer.prior.log_delta.items())
    assert trainer.model.training


def test_prune_removes_groups_and_training_continues(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.train()
    n0 = sum(p.numel() for p in trainer.model.parameters())
    sel = trainer.prune(sparsity=0.5)
    n1 = sum(p.numel() for p in trainer.model.parameters())
    assert sel.achieved >= 0.5
    assert n1 < n0
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.eval()
    with torch.no_grad():
        assert trainer.model(**batch).logits.shape == (4, 2)
    # save_model after prune writes a checkpoint that reloads with its new sizes
    out = str(tmp_path / "pruned")
    trainer.save_model(out)
    from spam_hf import from_pretrained

    reloaded = from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, trainer.model(**batch).logits, atol=1e-5, rtol=1e-5)
    assert os.path.exists(os.path.join(out, PRIOR_FILE))
    # the old curvature belongs to the unpruned shapes: a second OPD prune needs new curvature first
    with pytest.raises(RuntimeError, match="no curvature yet"):
        trainer.prune(sparsity=0.5, method="opd")
    assert trainer.prune(sparsity=0.5, method="magnitude").achieved >= 0.5


def test_nan_loss_stops_with_step_number(tmp_path):
    trainer = make_trainer(tmp_path, learning_rate=1e30, max_steps=50, num_train_epochs=1)
    with pytest.raises(FloatingPointError, match="at step"):
        trainer.train()


def test_requires_spam_arguments(tmp_path):
    with pytest.raises(TypeError, match="SpamTrainingArguments"):
        SpamTrainer(model=tiny_classifier("bert"), args=TrainingArguments(output_dir=str(tmp_path), report_to=[]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="prior must be one of"):
        SpamTrainingArguments(output_dir="x", prior="group", report_to=[])
    with pytest.raises(ValueError, match="curvature must be one of"):
        SpamTrainingArguments(output_dir="x", curvature="full", report_to=[])


def test_bf16_autocast_eval_strategy_and_best_model(tmp_path):
    """bf16 autocast on the CPU, per-epoch evaluation and load_best_model_at_end: priors still update, the
    best checkpoint's SpaM state is restored with its weights."""
    from spam_hf.metrics import compute_metrics_fn

    trainer = make_trainer(tmp_path, bf16=True, eval_strategy="epoch", save_strategy="epoch",
                           load_best_model_at_end=True, metric_for_best_model="accuracy", num_train_epochs=2)
    trainer.compute_metrics = compute_metrics_fn("accuracy", use_evaluate=False)
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_accuracy" in h]
    assert len(evals) == 2
    assert [h for h in trainer.state.log_history if "log_marglik" in h]
    best = trainer.state.best_model_checkpoint
    assert best and os.path.exists(os.path.join(best, PRIOR_FILE))
    from safetensors.torch import load_file

    saved = load_file(os.path.join(best, PRIOR_FILE))
    for k, v in trainer.prior.log_delta.items():
        torch.testing.assert_close(v.detach(), saved[k])


@pytest.mark.parametrize("method", ["damage-exact", "damage-obs"])
def test_prune_in_rounds_with_compensation_reports_original_groups(tmp_path, method):
    """trainer.prune(rounds, compensate, a damage score): the selection names groups of the unpruned model,
    matches the shrunk model, and the export reloads with the same logits."""
    from spam_hf import from_pretrained
    from spam_hf.architectures import group_specs

    trainer = make_trainer(tmp_path)
    trainer.train()
    counts = {s.name: s.count for s in group_specs(trainer.model)}
    sel = trainer.prune(0.6, method=method, rounds=3, compensate=True, calibration_batches=2)
    assert sel.achieved >= 0.6
    after = {s.name: s.count for s in group_specs(trainer.model)}
    for name, kept in sel.keep.items():
        assert after.get(name, 0) == kept.numel() and all(0 <= k < counts[name] for k in kept.tolist())
    assert sum(r.to_dict()["heads_total"] for r in sel.layers) == sum(c for n, c in counts.items() if "head" in n)
    out = str(tmp_path / "pruned")
    trainer.save_model(out)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(out).eval()(**batch).logits, trainer.model(**batch).logits,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("flag", ["is_fsdp_enabled", "is_deepspeed_enabled"])
def test_sharded_training_is_refused_in_one_line(tmp_path, monkeypatch, flag):
    """accelerate's FSDP / DeepSpeed plugins (sharding that spam-hf does not see until training starts): refused at
    construction, in one line that names the FSDP2 route that works."""
    from transformers import Trainer

    original = Trainer.create_accelerator_and_postprocess

    def sharded(self):
        original(self)
        setattr(self, flag, True)  # what accelerate reports under an FSDP / DeepSpeed launch

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", sharded)
    with pytest.raises(ValueError, match="FSDP or DeepSpeed plugins.*--fsdp2"):
        make_trainer(tmp_path)


def test_unfinished_checkpoints_are_never_resumed_from(tmp_path, monkeypatch, caplog):
    """Every training checkpoint is marked complete after its last file; one whose writing fails (a full disk) is
    removed, and one without the mark (a kill while writing) is skipped by `resume_from_checkpoint=True` with a
    warning naming it and refused when named. Rotation keeps complete checkpoints only after the new one is marked."""
    import errno
    import logging

    from spam_hf.trainer import COMPLETE_FILE

    trainer = make_trainer(tmp_path, save_strategy="steps", save_steps=4, num_train_epochs=1, save_total_limit=2)
    trainer.train()
    run = tmp_path / "run"
    ckpts = sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-"))
    assert ckpts == ["checkpoint-4", "checkpoint-8"] and all((run / c / COMPLETE_FILE).exists() for c in ckpts)
    (run / "checkpoint-8" / COMPLETE_FILE).unlink()  # as if killed while checkpoint-8 was written
    resumed = make_trainer(tmp_path, save_strategy="no", num_train_epochs=1)
    with caplog.at_level(logging.WARNING):
        resumed.train(resume_from_checkpoint=True)
    assert f"skipping {run / 'checkpoint-8'}" in caplog.text
    assert resumed.state.global_step == 8
    with pytest.raises(ValueError, match="was never finished"):
        make_trainer(tmp_path).train(resume_from_checkpoint=str(run / "checkpoint-8"))
    full = make_trainer(tmp_path / "full", save_strategy="steps", save_steps=4, num_train_epochs=1)

    def disk_full(output_dir):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(full, "_save_rng_state", disk_full)
    with pytest.raises(OSError, match="No space left"):
        full.train()
    assert not (tmp_path / "full" / "run" / "checkpoint-4").exists()
