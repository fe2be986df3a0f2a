"""LoRA rank groups (peft): masking == pruning, curvature on the adapter Linears, stock peft export."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from spam_hf.architectures import group_specs, prunable_modules
from spam_hf.curvature import CurvatureAccumulator
from spam_hf.export import save_pruned
from spam_hf.pruning import apply, mask_groups, prune_groups

from conftest import tiny_batch, tiny_causal_lm, tiny_classifier, tiny_lm_batch
from conftest import random_keep

TARGETS = ["query", "value", "intermediate.dense"]


def lora_bert(seed=0, r=4, alpha=8, targets=TARGETS, base_dir=None):
    from peft import LoraConfig, get_peft_model

    base = tiny_classifier("bert", seed=seed)
    if base_dir:
        base.save_pretrained(base_dir)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, task_type="SEQ_CLS"))
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # B starts at zero; give it values so that every rank matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    return model.eval()


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_every_rank_of_every_adapted_module_is_a_group():
    model = lora_bert()
    specs = group_specs(model)
    assert len(specs) == 2 * 3 and {s.kind for s in specs} == {"lora_rank"} and all(s.count == 4 for s in specs)
    s = specs[0]
    assert s.row_index == {"base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default": s.row_index[
        "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default"]}
    # a rank owns one row of A (in = 32) and one column of B (out = 32 for query, 48 for intermediate)
    assert s.params_per_group(model).tolist() == [32 + 32] * 4
    assert specs[2].params_per_group(model).tolist() == [32 + 48] * 4


def test_pruned_ranks_equal_masked_ranks_and_scaling_is_kept():
    masked, pruned = lora_bert(), lora_bert()
    specs = group_specs(masked)
    keep = random_keep(specs, seed=2)
    keep[specs[1].name] = torch.tensor([], dtype=torch.long)
    keep[specs[0].name] = torch.tensor([1, 3])
    mask_groups(masked, specs, keep)
    prune_groups(pruned, keep)
    batch = tiny_batch()
    torch.testing.assert_close(logits(pruned, batch), logits(masked, batch), atol=1e-5, rtol=1e-5)
    layer = pruned.get_submodule("base_model.model.bert.encoder.layer.0.attention.self.query")
    assert layer.r["default"] == 2 and layer.scaling["default"] == pytest.approx(2.0)
    assert layer.lora_alpha["default"] == pytest.approx(4.0)


def test_curvature_on_adapter_linears_only():
    model = lora_bert().train()
    modules = prunable_modules(group_specs(model))
    assert all(".lora_A." in m or ".lora_B." in m for m in modules)
    acc = CurvatureAccumulator(model, modules)
    batch = tiny_batch()
    with acc.capture(model, batch["attention_mask"]):
        out = model(**batch)
    acc.accumulate(out.logits, batch["labels"])
    for m, s in acc.sums.items():
        assert s["A"].abs().sum() > 0 and s["G"].abs().sum() > 0, m
    assert acc.sums[modules[0]]["A"].shape == (32, 32) and acc.sums[modules[0]]["G"].shape == (4, 4)


def test_export_is_a_stock_peft_adapter_loaded_without_spam_hf(tmp_path):
    base_dir = str(tmp_path / "base")
    model = lora_bert(base_dir=base_dir)
    specs = group_specs(model)
    keep = {s.name: torch.arange(s.count)[: (i % 4)] for i, s in enumerate(specs)}  # 0..3 ranks, some modules none
    prune_groups(model, keep)
    batch = tiny_batch()
    expected = logits(model, batch)
    out = str(tmp_path / "adapter")
    assert save_pruned(model, out) == "peft_adapter"
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    kept = [s for i, s in enumerate(specs) if i % 4]
    assert len(cfg["target_modules"]) == len(kept)
    assert "bert.encoder.layer.0.attention.self.query" not in cfg["target_modules"]  # lost every rank
    assert sorted(cfg["rank_pattern"].values()) == sorted(i % 4 for i in range(len(specs)) if i % 4)
    assert all(a / r == pytest.approx(2.0) for a, r in zip(cfg["alpha_pattern"].values(), cfg["rank_pattern"].values()))
    torch.save({"batch": batch, "expected": expected}, str(tmp_path / "io.pt"))
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "spam_hf" or name.startswith("spam_hf."):
                    raise ImportError("blocked")
        sys.meta_path.insert(0, Block())
        import torch
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification
        base = AutoModelForSequenceClassification.from_pretrained({base_dir!r})
        m = PeftModel.from_pretrained(base, {out!r}).eval()
        io = torch.load({str(tmp_path / 'io.pt')!r})
        b = io["batch"]
        with torch.no_grad():
            got = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        torch.testing.assert_close(got, io["expected"], atol=1e-5, rtol=1e-5)
        print("PEFT_OK", sum(p.numel() for n, p in m.named_parameters() if "lora_" in n))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert "PEFT_OK" in res.stdout, res.stderr[-3000:]
    n_adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert res.stdout.split("PEFT_OK")[1].split()[0] == str(n_adapter)


def test_merged_export_equals_adapter(tmp_path):
    from spam_hf.export.lora import save_lora_adapter
    from transformers import AutoModelForSequenceClassification

    model = lora_bert()
    prune_groups(model, random_keep(group_specs(model), seed=3))
    batch = tiny_batch()
    expected = logits(model, batch)
    save_lora_adapter(model, str(tmp_path / "a"), merged_dir=str(tmp_path / "merged"))
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged")).eval()
    torch.testing.assert_close(logits(merged, batch), expected, atol=1e-5, rtol=1e-5)


def test_causal_lm_lora_ranks():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_causal_lm("llama"), LoraConfig(r=2, target_modules=["q_proj", "down_proj"],
                                                               task_type="CAUSAL_LM"))
    specs = group_specs(model)
    assert len(specs) == 4 and all(s.count == 2 for s in specs)
    prune_groups(model, {specs[0].name: torch.tensor([0])})
    batch = tiny_lm_batch()
    assert model(**batch).loss.isfinite()


def test_other_peft_methods_are_rejected():
    from peft import IA3Config, get_peft_model

    model = get_peft_model(tiny_classifier("bert"), IA3Config(target_modules=["query", "value"],
                                                              feedforward_modules=[], task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="peft method IA3 is not supported"):
        group_specs(model)


def _zero_base_groups(model, keep):
    """Reference for base pruning under an adapter: zero the dropped groups' rows/cols in the base layers and
    the same rows of every B / columns of every A."""
    from spam_hf.architectures import get_family

    base = model.get_base_model()
    merged_view = get_family(base)
    with torch.no_grad():
        for s in merged_view.group_specs(base):
            drop = sorted(set(range(s.count)) - set(keep[s.name].tolist()))
            if not drop:
                continue
            d = torch.tensor(drop)
            for m, idx in s.row_index.items():
                layer, rows = base.get_submodule(m), idx[d].reshape(-1)
                tgt = getattr(layer, "base_layer", layer)
                tgt.weight[rows] = 0
                if tgt.bias is not None:
                    tgt.bias[rows] = 0
                for b in getattr(layer, "lora_B", {}).values():
                    b.weight[rows] = 0
            for m, idx in s.col_index.items():
                layer, cols = base.get_submodule(m), idx[d].reshape(-1)
                getattr(layer, "base_layer", layer).weight[:, cols] = 0
                for a in getattr(layer, "lora_A", {}).values():
                    a.weight[:, cols] = 0


def test_prune_base_keeps_adapter_aligned_and_exports_base_with_adapter(tmp_path):
    """SpamTrainer.prune_base: OPD on merged weights picks base heads/neurons; base rows/cols and the matching
    adapter slices go; pruned == zeroed; export = smaller base (model/base) + adapter that loads onto it."""
    from peft import PeftModel
    from transformers import DataCollatorWithPadding

    from spam_hf import SpamTrainer, SpamTrainingArguments
    from spam_hf.export import from_pretrained
    from test_trainer import ToyTokenizer

    model = lora_bert()
    ref = lora_bert()
    rows = [dict(input_ids=[2] + [int(x) for x in torch.randint(5, 100, (8,))] + [3], labels=i % 3) for i in range(24)]
    args = SpamTrainingArguments(output_dir=str(tmp_path / "t"), per_device_train_batch_size=8, report_to=[],
                                 use_cpu=True, num_train_epochs=1, marglik_frequency=1, marglik_burn_in=1,
                                 curvature_every=1, n_hypersteps=2, disable_tqdm=True, save_strategy="no")
    trainer = SpamTrainer(model=model, args=args, train_dataset=rows, data_collator=DataCollatorWithPadding(ToyTokenizer()))
    trainer.train()
    ref.load_state_dict(model.state_dict())
    ranks_before = {k: v.clone() for k, v in trainer.prior.log_delta.items()}
    selection = trainer.prune_base(0.4, seq_len=16)
    assert selection.achieved >= 0.4
    assert all(torch.equal(trainer.prior.log_delta[k], v) for k, v in ranks_before.items())  # rank priors kept
    _zero_base_groups(ref, selection.keep)
    batch = tiny_batch()
    model.eval()
    torch.testing.assert_close(logits(model, batch), logits(ref.eval(), batch), atol=1e-5, rtol=1e-5)
    out = str(tmp_path / "export")
    trainer.save_model(out)
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert cfg["base_model_name_or_path"] == os.path.abspath(os.path.join(out, "base"))
    base = from_pretrained(os.path.join(out, "base"))
    assert sum(p.numel() for p in base.parameters()) < sum(p.numel() for p in tiny_classifier("bert").parameters())
    loaded = PeftModel.from_pretrained(base, out).eval()
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=1e-5, rtol=1e-5)


def _lora_posterior(model):
    from spam_hf import SpamLaplace

    la = SpamLaplace(model, n_data=40, fisher="empirical", reduction="expand")
    for seed in range(2):
        b = tiny_batch(batch=4, seed=seed)
        with la.capture(model, b["attention_mask"]):
            out = model(**b)
        la.accumulate(out.logits, b["labels"])
    return la


def test_rank_damage_is_the_merged_update_damage_and_rescaling_invariant():
    """``damage`` of LoRA rank k = ½ vec(s b_k a_kᵀ)ᵀ (G ⊗ A) vec(s b_k a_kᵀ) with the base layer's factors
    (``G = G_B / s²``, written out densely); rescaling a_k → c a_k, b_k → b_k / c changes neither the model nor
    this score, while OPD/magnitude-style sums over the entries do change."""
    from spam_hf.pruning import group_scores

    model = lora_bert()
    la = _lora_posterior(model)
    factors = la.factors()
    specs = group_specs(model)
    scores = group_scores(model, specs, "damage", factors=factors)
    spec = specs[2]  # intermediate.dense: out 48, in 32
    (a_name, _), = spec.row_index.items()
    (b_name, _), = spec.col_index.items()
    layer = model.get_submodule(a_name.rsplit(".lora_A", 1)[0])
    s = layer.scaling["default"]
    A_in, _ = factors[a_name]
    G_base = factors[b_name][1] / s ** 2
    lora_A, lora_B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    for k in range(spec.count):
        dW = s * torch.outer(lora_B[:, k], lora_A[k])  # out × in, row-major vec matches kron(G, A)
        dense = 0.5 * dW.reshape(-1) @ torch.kron(G_base, A_in) @ dW.reshape(-1)
        assert float(scores[spec.name][k]) == pytest.approx(float(dense), rel=1e-6)
    x = tiny_batch(batch=4, seed=5)
    before = logits(model, x)
    mags = group_scores(model, specs, "magnitude")
    with torch.no_grad():
        layer.lora_A["default"].weight[1] *= 5.0
        layer.lora_B["default"].weight[:, 1] /= 5.0
    torch.testing.assert_close(logits(model, x), before, rtol=1e-4, atol=1e-5)
    rescaled = group_scores(model, specs, "damage", factors=la.factors())
    torch.testing.assert_close(rescaled[spec.name], scores[spec.name], rtol=1e-6, atol=0)
    new, old = float(group_scores(model, specs, "magnitude")[spec.name][1]), float(mags[spec.name][1])
    assert abs(new - old) > 0.2 * old  # an entry-wise score is not invariant


def test_trainer_prunes_lora_ranks_with_rank_damage(tmp_path):
    from transformers import DataCollatorWithPadding

    from spam_hf import SpamTrainer, SpamTrainingArguments
    from test_trainer import ToyTokenizer, toy_dataset

    model = lora_bert()
    model.train()
    args = SpamTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=4, report_to=[],
                                 marglik_frequency=2, marglik_burn_in=2, curvature_every=1, n_hypersteps=2,
                                 save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = SpamTrainer(model=model, args=args, train_dataset=toy_dataset(),
                          data_collator=DataCollatorWithPadding(ToyTokenizer()))
    trainer.train()
    r0 = sum(s.count for s in group_specs(trainer.model))
    sel = trainer.prune(0.5, method="damage", calibration_batches=2)
    assert sel.achieved >= 0.5 and sum(s.count for s in group_specs(trainer.model)) < r0
    r1 = sum(s.count for s in group_specs(trainer.model))
    sel = trainer.prune(0.3, method="damage-exact", rounds=2, compensate=True, calibration_batches=2)
    assert sel.achieved >= 0.3 and sum(s.count for s in group_specs(trainer.model)) < r1
    out = str(tmp_path / "export")
    trainer.save_model(out)  # still a stock peft adapter
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(tiny_classifier("bert"), out).eval()
    x = tiny_batch(batch=4, seed=2)
    torch.testing.assert_close(logits(reloaded, x), logits(trainer.model.eval(), x), rtol=1e-5, atol=1e-6)


def test_lora_rank_compensation_refits_the_remaining_ranks():
    """Removing ranks from ``B·A``: compensation refits the remaining columns of ``lora_B`` to the rank
    activations ``z = A x`` (least squares): the logits stay closer to the unpruned adapter's than after
    plain removal."""
    from spam_hf import SpamLaplace
    from spam_hf.pruning import compensate, plan

    batches = [tiny_batch(batch=8, seed=s, pad_last=2) for s in range(4)]

    class Loader(list):
        dataset = range(32)

    model = lora_bert()
    la = SpamLaplace(model, reduction="expand", n_data=32)
    la.collect(Loader(batches), progress=False)
    p = plan(model, la, 0.4, method="damage")
    plain, comp = copy.deepcopy(model), copy.deepcopy(model)
    done = compensate(comp, la.specs, p.keep, la.factors(extrapolate=False))
    assert done and all(".lora_B." in m for m in done)
    x = tiny_batch(batch=16, seed=9)
    ref = logits(model, x)
    apply(plain, p)
    apply(comp, p)
    assert (logits(comp, x) - ref).square().mean() < (logits(plain, x) - ref).square().mean()


def test_rank_damage_after_compensation_is_lora_B_s_schur_form_and_rescaling_invariant(monkeypatch):
    """``damage-obs`` of rank k = ½ b_kᵀ G_B b_k · S_k with ``S_k = 1 / ((Ā⁻¹)_kk)`` from lora_B's input factor (the rank
    activations, ``Ā`` damped as the compensation's refit), written out; re-collected after ``a_k → c a_k``,
    ``b_k → b_k / c`` the undamped score is unchanged (the isotropic damping ``λ I`` is the one part that is not
    invariant; it moves the score by a few per cent here)."""
    import spam_hf.pruning.damage as damage
    from spam_hf.pruning import group_scores
    from spam_hf.pruning.damage import LEAST_SQUARES_DAMPING

    model = lora_bert()
    la = _lora_posterior(model)
    factors = la.factors()
    specs = group_specs(model)
    scores = group_scores(model, specs, "damage-obs", factors=factors)
    spec = specs[2]
    (b_name, _), = spec.col_index.items()
    A_B, G_B = factors[b_name]
    lora_B = model.get_submodule(b_name).weight.double()
    A_bar = A_B + LEAST_SQUARES_DAMPING * float(A_B.diagonal().mean()) * torch.eye(A_B.shape[0], dtype=A_B.dtype)
    inv = torch.linalg.inv(A_bar)
    for k in range(spec.count):
        expected = 0.5 * float(lora_B[:, k] @ G_B @ lora_B[:, k]) / float(inv[k, k])
        assert float(scores[spec.name][k]) == pytest.approx(expected, rel=1e-8)
    monkeypatch.setattr(damage, "LEAST_SQUARES_DAMPING", 0.0)
    undamped = group_scores(model, specs, "damage-obs", factors=factors)
    layer = model.get_submodule(b_name.rsplit(".lora_B", 1)[0])
    with torch.no_grad():
        layer.lora_A["default"].weight[1] *= 5.0
        layer.lora_B["default"].weight[:, 1] /= 5.0
    rescaled = group_scores(model, specs, "damage-obs", factors=_lora_posterior(model).factors())
    torch.testing.assert_close(rescaled[spec.name], undamped[spec.name], rtol=1e-6, atol=0)
    torch.testing.assert_close(undamped[spec.name], scores[spec.name], rtol=5e-2, atol=0)
