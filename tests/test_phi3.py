"""Phi-3: KV groups and neurons in the fused qkv_proj and gate_up_proj."""

import json
import os

import pytest
import torch
from torch import nn

from spam_hf.architectures import group_specs, supported_model_types
from spam_hf.export import from_pretrained, save_pruned
from spam_hf.pruning import PruningConfig, mask_groups, prune, prune_groups

from conftest import (BatchList, LogitsOf, dense_ggn_block, expected_kfac, greedy, lm_logits, tiny_causal_lm,
                      tiny_decoder_config, tiny_lm_batch, zero_group)

D = 8  # head_dim of the tiny config: 4 query heads on 2 KV heads, hidden 32, MLP 48


def _spec(model, name):
    return next(s for s in group_specs(model) if s.name == name)


def test_groups_own_their_rows_of_the_fused_projections():
    assert "phi3" in supported_model_types()
    model = tiny_causal_lm("phi3")
    heads, neurons = _spec(model, "layer0.head"), _spec(model, "layer0.neuron")
    assert (heads.count, heads.attn_dim, neurons.count) == (2, 2 * D, 48)
    qkv = heads.row_index["model.layers.0.self_attn.qkv_proj"]
    # group 1: query heads 2, 3 (rows 16:32), key head 1 (32 + 8:16), value head 1 (32 + 16 + 8:16)
    assert qkv[1].tolist() == list(range(16, 32)) + list(range(40, 48)) + list(range(56, 64))
    assert heads.col_index["model.layers.0.self_attn.o_proj"][1].tolist() == list(range(16, 32))
    assert neurons.row_index["model.layers.0.mlp.gate_up_proj"][7].tolist() == [7, 55]


def test_zeroing_a_kv_group_equals_masking_its_query_heads_context():
    ids = tiny_lm_batch()["input_ids"]
    model, ref = tiny_causal_lm("phi3"), tiny_causal_lm("phi3")
    zero_group(model, _spec(model, "layer1.head"), 1)

    def pre_hook(module, args):
        x = args[0].clone()
        x[..., 16:32] = 0
        return (x,)

    ref.get_submodule("model.layers.1.self_attn.o_proj").register_forward_pre_hook(pre_hook)
    torch.testing.assert_close(lm_logits(model, ids), lm_logits(ref, ids), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(lm_logits(model, ids), lm_logits(tiny_causal_lm("phi3"), ids), atol=1e-6)


def test_zeroing_a_neuron_equals_zeroing_its_gated_activation():
    ids = tiny_lm_batch()["input_ids"]
    model, ref = tiny_causal_lm("phi3"), tiny_causal_lm("phi3")
    zero_group(model, _spec(model, "layer0.neuron"), 7)

    def pre_hook(module, args):
        x = args[0].clone()
        x[..., 7] = 0
        return (x,)

    ref.get_submodule("model.layers.0.mlp.down_proj").register_forward_pre_hook(pre_hook)
    torch.testing.assert_close(lm_logits(model, ids), lm_logits(ref, ids), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layer", ["model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj"])
def test_kfac_through_a_fused_projection_equals_the_exact_ggn(layer):
    """One token of a Phi-3 classifier (KFAC is exact for one input vector per example): the GGN of the fused
    layer's [W | b] through the split (chunk / q-k-v slicing) equals its Kronecker factors (a zero bias is added
    to the fused layer, which has none)."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_decoder_config("phi3")).double().eval()
    module = model.get_submodule(layer)
    module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=torch.float64))
    x = torch.tensor([[7]])

    wrapped = LogitsOf(model)
    exact = dense_ggn_block(wrapped, "model." + layer, x)
    assert exact.abs().max() > 1e-4  # the layer matters to the logits
    torch.testing.assert_close(expected_kfac(wrapped, "model." + layer, x), exact, atol=1e-8, rtol=1e-6)


def test_uneven_groups_export_with_remote_code_and_generate_the_same(tmp_path):
    """Layer 0 keeps one KV group, layer 1 both, layer 1 fewer neurons: each attention gets its own head count
    (config.num_attention_heads on its own config copy), recorded in spam_pruning and restored on load."""
    model, masked = tiny_causal_lm("phi3"), tiny_causal_lm("phi3")
    specs = group_specs(model)
    keep = {"layer0.head": torch.tensor([1]), "layer1.neuron": torch.arange(0, 48, 3)}
    mask_groups(masked, specs, keep)
    prune_groups(model, keep)
    attn0 = model.model.layers[0].self_attn
    assert (attn0.config.num_attention_heads, attn0.num_key_value_heads) == (2, 1)
    assert model.config.num_attention_heads == 4 and model.model.layers[1].self_attn.config.num_attention_heads == 4
    ids = tiny_lm_batch()["input_ids"]
    torch.testing.assert_close(lm_logits(model, ids), lm_logits(masked, ids), atol=1e-5, rtol=1e-5)
    assert torch.equal(greedy(model, ids), greedy(masked, ids))
    out = str(tmp_path / "export")
    assert save_pruned(model, out) == "remote_code"
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["spam_pruning"]["module_attrs"]["model.layers.0.self_attn"] == {
        "num_key_value_heads": 1, "config.num_attention_heads": 2}
    loaded = from_pretrained(out).eval()
    torch.testing.assert_close(lm_logits(loaded, ids), lm_logits(model, ids), atol=1e-5, rtol=1e-5)
    assert torch.equal(greedy(loaded, ids), greedy(model, ids))


def test_the_same_groups_in_every_layer_export_as_stock(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_causal_lm("phi3")
    prune_groups(model, {s.name: torch.tensor([1]) if s.kind == "head" else torch.arange(0, s.count, 2)
                         for s in group_specs(model)})
    out = str(tmp_path / "stock")
    assert save_pruned(model, out) == "stock"
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["intermediate_size"]) == \
        (2, 1, D, 24)
    ids = tiny_lm_batch()["input_ids"]
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(lm_logits(loaded, ids), lm_logits(model, ids), atol=1e-5, rtol=1e-5)


def test_default_pruning_in_rounds_and_block_by_block():
    """The default score (damage-obs, rounds, least-squares compensation) and the block-sequential path both run
    through the fused projections and reach the target."""
    batches = BatchList([tiny_lm_batch(seed=s) for s in range(3)])
    for sequential in (False, True):
        model = tiny_causal_lm("phi3")
        result = prune(model, None, PruningConfig(sparsity=0.5, sequential=sequential, calibration_batches=3),
                       calibration=batches)
        assert result.achieved >= 0.5
        assert torch.isfinite(lm_logits(model, batches[0]["input_ids"])).all()


@pytest.mark.parametrize("model_type,suffixes", [("phi3", ("qkv_proj",)), ("granite", ("q_proj", "v_proj")),
                                                  ("mixtral", ("q_proj", "v_proj"))])
def test_lora_without_target_modules_uses_the_family_default(model_type, suffixes):
    """peft 0.21 has no default LoRA targets for phi3 or granite ('Please specify target_modules') and resolves
    mixtral's to none ('No `target_modules` passed'); the family's own (peft's q/v default, fused for Phi-3) is
    used."""
    from spam_hf.arguments import LoraArguments
    from spam_hf.jobs.loading import wrap_lora

    model = wrap_lora(tiny_causal_lm(model_type), LoraArguments(lora_r=2))
    adapted = [n for n, m in model.named_modules() if hasattr(m, "lora_A")]
    assert adapted and all(n.endswith(suffixes) for n in adapted)
    assert {n.rsplit(".", 1)[-1] for n in adapted} == set(suffixes)
