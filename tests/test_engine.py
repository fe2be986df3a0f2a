"""The pruning engine, spam_hf.pruning.prune: one shot where the score allows it, rounds where it does not, the
same decisions as the verbs it calls."""

import copy

import pytest
import torch

from spam_hf import SpamLaplace
from spam_hf.architectures import consuming_modules, group_specs
from spam_hf.pruning import PruningConfig, apply, geometric_targets, plan, prune, prune_in_rounds

from conftest import BatchList, tiny_batch, tiny_classifier


def _fitted(model, batches):
    la = SpamLaplace(model, n_data=16)
    for b in batches:
        with la.capture(model, b["attention_mask"]):
            out = model(**b)
        la.accumulate(out.logits, b["labels"])
    la.optimize_prior_precision(n_steps=5)
    return la


def _keep(selection):
    return {k: v.tolist() for k, v in selection.keep.items()}


def test_one_shot_is_plan_then_apply():
    """A score of the trained posterior without rounds or compensation: the plan of `plan`, applied; no
    calibration batches needed."""
    model = tiny_classifier("bert", num_labels=3)
    batches = [tiny_batch(batch=8, seed=s) for s in range(2)]
    la = _fitted(model, batches)
    reference = plan(copy.deepcopy(model), la, 0.5, method="opd")
    result = prune(model, la, PruningConfig(sparsity=0.5, method="opd"))
    assert len(result.plans) == 1 and not result.compensated and result.config.rounds == 1
    assert _keep(result.selection) == _keep(reference.selection)
    planned = apply(tiny_classifier("bert", num_labels=3), reference)
    for (n, p), (_, q) in zip(model.named_parameters(), planned.named_parameters()):
        assert torch.equal(p, q), n


def test_default_is_damage_obs_rounds_with_compensation_as_prune_in_rounds():
    """The default config on a full model runs prune_in_rounds with damage-obs, the registry's rounds and
    least-squares compensation, starting from the trained posterior: the same groups and weights as calling it."""
    batches = [tiny_batch(batch=8, seed=s) for s in range(2)]
    a = tiny_classifier("bert", num_labels=3)
    b = copy.deepcopy(a)
    la_a, la_b = _fitted(a, batches), _fitted(b, batches)
    result = prune(a, la_a, PruningConfig(sparsity=0.5, calibration_batches=2), BatchList(batches))
    assert (result.config.method, result.config.rounds, result.config.compensate) == ("damage-obs", 2, True)
    assert len(result.plans) == 2 and all(result.compensated)
    ref = prune_in_rounds(b, lambda m: la_b.calibration_posterior(m), BatchList(batches), geometric_targets(0.5, 2),
                          method="damage-obs", compensate=True, max_batches=2, start_from=la_b)
    assert _keep(result.selection) == _keep(ref.selection)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


def test_calibration_posteriors_take_the_trained_settings():
    model = tiny_classifier("bert", num_labels=3)
    la = SpamLaplace(model, prior="layer", prior_init=3.0, fisher="empirical", n_data=77, temperature=0.5, seed=4)
    cal = la.calibration_posterior(copy.deepcopy(model), mask_fisher=True)
    assert (cal.prior.kind, cal.n_data, cal.temperature, cal.curvature.reduction) == ("layer", 77.0, 0.5, "expand")
    assert cal.curvature.fisher == "empirical" and cal.curvature.mask_modules
    # the damage scores read the consuming modules alone: their calibration posteriors hold nothing else
    lean = la.calibration_posterior(model, consuming_only=True)
    assert lean.curvature_modules == consuming_modules(group_specs(model))
    assert all(m.endswith(("attention.output.dense", "output.dense")) for m in lean.curvature_modules)
    lean.collect(BatchList([tiny_batch(batch=4)]), progress=False)
    assert set(lean.factors()) == set(lean.curvature_modules)
    with pytest.raises(ValueError, match="no marginal likelihood"):
        lean.optimize_prior_precision(n_steps=1)


def test_rounds_without_calibration_or_statistics():
    model = tiny_classifier("bert", num_labels=3)
    with pytest.raises(ValueError, match="needs calibration batches"):
        prune(model, None, PruningConfig(sparsity=0.5))
    with pytest.raises(ValueError, match="needs a posterior"):
        prune(model, None, PruningConfig(sparsity=0.5, method="opd"))
    # magnitude with compensation and no trained posterior: a default calibration posterior per round
    result = prune(model, None, PruningConfig(sparsity=0.5, method="magnitude", compensate=True, rounds=2),
                   BatchList([tiny_batch(batch=8, seed=s) for s in range(2)]))
    assert result.achieved >= 0.5 and all(result.compensated)
    with torch.no_grad():
        assert torch.isfinite(model(**tiny_batch()).logits).all()


def test_options_replace_config_fields():
    model = tiny_classifier("bert", num_labels=3)
    result = prune(model, None, PruningConfig(sparsity=0.3, method="magnitude"), sparsity=0.6, min_keep=0.25)
    assert result.config.sparsity == 0.6 and result.config.min_keep == 0.25 and result.achieved >= 0.5


@pytest.mark.parametrize("model_type", ["bert", "llama", "qwen2", "granite", "smollm3", "gemma2", "gemma3_text",
                                        "phi3"])
def test_uniform_pruning_in_rounds_exports_a_stock_checkpoint(tmp_path, model_type):
    """--uniform through the default score (damage-obs, 2 rounds, least-squares compensation): every layer ends
    with the same heads / KV groups and neurons, and the export is a stock checkpoint that plain transformers
    loads (no remote code) with the pruned model's logits. BERT keeps its heads (its stock class ties the head
    size to hidden / heads); LLaMA-layout decoders lose whole KV groups too."""
    import json
    import os

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from conftest import tiny_causal_lm, tiny_lm_batch
    from spam_hf.export import save_pruned

    decoder = model_type != "bert"
    model = tiny_causal_lm(model_type) if decoder else tiny_classifier("bert")
    batches = BatchList([tiny_lm_batch(seed=s) if decoder else tiny_batch(batch=8, seed=s) for s in range(3)])
    sparsity = 0.5 if decoder else 0.3
    config = PruningConfig(sparsity=sparsity, uniform=True, rounds=2, calibration_batches=3)
    result = prune(model, None, config, batches, kv_groups_only=decoder)
    assert result.config.method == "damage-obs" and len(result.plans) >= 2 and result.achieved >= sparsity
    specs = group_specs(model, kv_groups_only=decoder)
    for kind in ("head", "neuron"):
        assert len({s.count for s in specs if s.kind == kind}) == 1
    if not decoder:
        assert {s.count for s in specs if s.kind == "head"} == {4}
    out = str(tmp_path / "export")
    assert save_pruned(model, out) == "stock"
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert "auto_map" not in cfg and "spam_pruning" not in cfg and "modeling_spam.py" not in os.listdir(out)
    auto = AutoModelForCausalLM if decoder else AutoModelForSequenceClassification
    loaded = auto.from_pretrained(out).eval()
    batch = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=1e-5, rtol=1e-5)


def test_uniform_refuses_lora_ranks_and_block_by_block():
    from spam_hf.pruning.sequential import sequential_refusal

    with pytest.raises(ValueError, match="stock peft adapter already"):
        PruningConfig(uniform=True).resolved(lora=True)
    config = PruningConfig(uniform=True, sequential=True).resolved(False)
    assert "--uniform" in sequential_refusal(tiny_classifier("bert"), config)


@pytest.mark.parametrize("sequential", [False, True])
def test_round_to_holds_through_rounds_and_block_by_block(sequential):
    """--round-to 8 through the default score's rounds with compensation, and through the block-sequential path
    (whose per-block choice rounds too): every layer ends with a multiple of 8 neurons, at the target."""
    from conftest import tiny_causal_lm, tiny_lm_batch

    model = tiny_causal_lm("llama", num_hidden_layers=3)
    batches = BatchList([tiny_lm_batch(seed=s) for s in range(3)])
    config = PruningConfig(sparsity=0.4, round_to=8, calibration_batches=3, sequential=sequential,
                           rounds=1 if sequential else 2)
    result = prune(model, None, config, batches)
    counts = [s.count for s in group_specs(model) if s.kind == "neuron"]
    assert all(c % 8 == 0 for c in counts) and min(counts) < 48, counts
    assert result.achieved >= 0.4 - 1e-9
