"""LLaMA-layout family (llama, mistral, qwen2, qwen3, granite, smollm3, gemma2, gemma3_text): grouped-query attention
and the gated MLP."""

import json
import os

import pytest
import torch
from torch import nn

from spam_hf.architectures import group_specs, supported_model_types
from spam_hf.export import from_pretrained
from spam_hf.architectures.llama import HeadGatherLinear
from spam_hf.export import save_pruned
from spam_hf.pruning import mask_groups, prune_groups

from conftest import tiny_causal_lm, tiny_lm_batch
from conftest import zero_group
from conftest import dense_ggn_block, expected_kfac
from conftest import close_parents

LLAMA_TYPES = ["llama", "mistral", "qwen2", "qwen3", "granite", "smollm3", "gemma2", "gemma3_text"]
D = 8  # head_dim of the tiny configs: 4 query heads read 2 KV heads (query heads 0, 1 -> KV 0; 2, 3 -> KV 1)


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


def greedy(model, ids):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids),
                              pad_token_id=0)


def spec(model, name, **kw):
    return next(s for s in group_specs(model, **kw) if s.name == name)


def keep_heads(model, heads_per_layer):
    """``keep`` that keeps the given query heads per layer (and their KV heads), every neuron."""
    specs = group_specs(model)
    keep = {s.name: torch.arange(s.count) for s in specs}
    for layer, heads in heads_per_layer.items():
        keep[f"layer{layer}.head"] = torch.tensor(heads, dtype=torch.long)
    return specs, close_parents(specs, keep)


@pytest.mark.parametrize("model_type", LLAMA_TYPES)
def test_query_heads_and_kv_heads_are_groups(model_type):
    assert model_type in supported_model_types()
    model = tiny_causal_lm(model_type)
    head, kv, neuron = group_specs(model)[:3]
    assert (head.kind, head.count, head.attn_dim, kv.kind, kv.count) == ("head", 4, D, "kv_head", 2)
    assert head.parent == kv.name and head.parent_index.tolist() == [0, 0, 1, 1]
    assert head.row_index["model.layers.0.self_attn.q_proj"][3].tolist() == list(range(24, 32))
    assert head.col_index["model.layers.0.self_attn.o_proj"][3].tolist() == list(range(24, 32))
    assert set(kv.row_index) == {"model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"}
    assert kv.row_index["model.layers.0.self_attn.k_proj"][1].tolist() == list(range(8, 16))
    assert not kv.col_index and kv.attn_dim == 0
    assert set(neuron.row_index) == {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"}
    assert neuron.count == 48


@pytest.mark.parametrize("model_type", LLAMA_TYPES)
def test_kv_groups_only_owns_whole_groups(model_type):
    head = group_specs(tiny_causal_lm(model_type), kv_groups_only=True)[0]
    assert head.count == 2 and head.attn_dim == 2 * D and not head.parent
    assert head.row_index["model.layers.0.self_attn.k_proj"][1].tolist() == list(range(8, 16))
    assert head.row_index["model.layers.0.self_attn.q_proj"][1].tolist() == list(range(16, 32))
    assert head.col_index["model.layers.0.self_attn.o_proj"][1].tolist() == list(range(16, 32))


def test_without_gqa_a_group_is_one_head():
    model = tiny_causal_lm("llama", num_key_value_heads=4)
    specs = group_specs(model)
    assert [s.kind for s in specs[:2]] == ["head", "neuron"]
    assert specs[0].count == 4 and specs[0].row_index["model.layers.0.self_attn.q_proj"].shape == (4, 8)


def _masked_context(ref, layer, cols):
    def pre_hook(module, args):
        x = args[0].clone()
        x[..., cols] = 0
        return (x,)

    ref.get_submodule(f"model.layers.{layer}.self_attn.o_proj").register_forward_pre_hook(pre_hook)


@pytest.mark.parametrize("model_type", LLAMA_TYPES)
def test_zeroing_query_head_equals_masking_its_context(model_type):
    batch = tiny_lm_batch()
    model, ref = tiny_causal_lm(model_type), tiny_causal_lm(model_type)
    zero_group(model, spec(model, "layer1.head"), 2)
    _masked_context(ref, 1, slice(16, 24))
    torch.testing.assert_close(logits(model, batch), logits(ref, batch), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(logits(model, batch), logits(tiny_causal_lm(model_type), batch), atol=1e-6)


@pytest.mark.parametrize("model_type", LLAMA_TYPES)
def test_zeroing_kv_group_equals_masking_its_query_heads(model_type):
    batch = tiny_lm_batch()
    model, ref = tiny_causal_lm(model_type), tiny_causal_lm(model_type)
    zero_group(model, spec(model, "layer1.head", kv_groups_only=True), 1)  # query heads 2, 3
    _masked_context(ref, 1, slice(16, 32))
    torch.testing.assert_close(logits(model, batch), logits(ref, batch), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("model_type", LLAMA_TYPES)
def test_zeroing_neuron_equals_zeroing_gated_activation(model_type):
    batch = tiny_lm_batch()
    model, ref = tiny_causal_lm(model_type), tiny_causal_lm(model_type)
    zero_group(model, spec(model, "layer0.neuron"), 7)

    def pre_hook(module, args):
        x = args[0].clone()
        x[..., 7] = 0
        return (x,)

    ref.get_submodule("model.layers.0.mlp.down_proj").register_forward_pre_hook(pre_hook)
    torch.testing.assert_close(logits(model, batch), logits(ref, batch), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("model_type", LLAMA_TYPES)
def test_uneven_query_heads_per_kv_head_prune_exactly(model_type):
    """Layer 0 keeps query heads 0, 1, 3 (KV head 0 read twice, KV head 1 once): gathered K/V projections."""
    batch = tiny_lm_batch()
    masked, pruned = tiny_causal_lm(model_type), tiny_causal_lm(model_type)
    specs, keep = keep_heads(masked, {0: [0, 1, 3], 1: [1, 2]})
    mask_groups(masked, specs, keep)
    prune_groups(pruned, keep)
    attn0, attn1 = pruned.model.layers[0].self_attn, pruned.model.layers[1].self_attn
    assert isinstance(attn0.k_proj, HeadGatherLinear) and isinstance(attn0.v_proj, HeadGatherLinear)
    assert attn0.k_proj.kv_heads == [0, 0, 1] and attn0.num_key_value_groups == 1
    assert attn0.k_proj.linear.weight.shape == (2 * D, 32) and attn0.q_proj.weight.shape == (3 * D, 32)
    # layer 1: one query head per KV head is repeat_kv's pattern: plain K/V with one group
    assert isinstance(attn1.k_proj, nn.Linear) and attn1.num_key_value_groups == 1
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in masked.parameters())
    torch.testing.assert_close(logits(pruned, batch), logits(masked, batch), atol=1e-5, rtol=1e-5)
    assert torch.equal(greedy(pruned, batch["input_ids"]), greedy(masked, batch["input_ids"]))
    after = {s.name: s for s in group_specs(pruned)}
    assert after["layer0.head"].parent_index.tolist() == [0, 0, 1]
    assert "model.layers.0.self_attn.k_proj.linear" in after["layer0.kv_head"].row_index
    assert "layer1.kv_head" not in after and after["layer1.head"].count == 2  # r = 1: plain heads again


def test_gathered_layer_prunes_again_and_rejects_whole_groups():
    batch = tiny_lm_batch()
    masked, pruned = tiny_causal_lm("llama"), tiny_causal_lm("llama")
    for m in (masked, pruned):  # both gathered: layer 0 keeps query heads 0, 1, 3
        prune_groups(m, keep_heads(m, {0: [0, 1, 3]})[1])
    specs, keep = keep_heads(pruned, {0: [1, 2]})  # of [0, 1, 3]: heads 1 (KV 0) and 3 (KV 1) remain
    mask_groups(masked, specs, keep)
    prune_groups(pruned, keep)
    assert not isinstance(pruned.model.layers[0].self_attn.k_proj, HeadGatherLinear)
    torch.testing.assert_close(logits(pruned, batch), logits(masked, batch), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="query heads per KV head"):  # still gathered: no equal groups
        group_specs(masked, kv_groups_only=True)


def test_inconsistent_kv_keep_is_a_clear_error_and_a_missing_one_is_derived():
    model = tiny_causal_lm("llama")
    specs, keep = keep_heads(model, {0: [0, 1]})
    keep["layer0.kv_head"] = torch.tensor([0, 1])  # KV head 1 has no query head left
    with pytest.raises(ValueError, match="a KV head goes with its last query head"):
        prune_groups(model, keep)
    prune_groups(model, {"layer0.head": torch.tensor([0, 1])})  # KV heads not given: KV head 0 only
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (D, 32)
    assert model.model.layers[0].self_attn.num_key_value_groups == 2


def test_kfac_through_gathered_kv_projection_equals_exact_ggn():
    """Curvature of a gathered K/V projection is that of its stored weights (duplicated heads summed)."""
    torch.manual_seed(0)
    model = nn.Sequential(HeadGatherLinear(nn.Linear(4, 4), [0, 0, 1], head_dim=2), nn.Tanh(),
                          nn.Linear(6, 3)).double()
    x = torch.randn(1, 4, dtype=torch.float64)
    torch.testing.assert_close(expected_kfac(model, "0.linear", x), dense_ggn_block(model, "0.linear", x),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("model_type", LLAMA_TYPES)
def test_uneven_query_heads_export_with_remote_code(tmp_path, model_type):
    model = tiny_causal_lm(model_type)
    prune_groups(model, keep_heads(model, {0: [0, 1, 3], 1: [2]})[1])
    ids = tiny_lm_batch()["input_ids"]
    out = str(tmp_path / "export")
    assert save_pruned(model, out) == "remote_code"
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["spam_pruning"]["kv_gather"]["model.layers.0.self_attn.k_proj"]["kv_heads"] == [0, 0, 1]
    loaded = from_pretrained(out).eval()
    torch.testing.assert_close(logits(loaded, {"input_ids": ids}), logits(model, {"input_ids": ids}),
                               atol=1e-5, rtol=1e-5)
    assert torch.equal(greedy(loaded, ids), greedy(model, ids))


def test_same_query_heads_per_kv_head_in_every_layer_exports_as_stock(tmp_path):
    """One query head per KV head everywhere: num_attention_heads = num_key_value_heads = 2, no remote code."""
    from transformers import AutoModelForCausalLM

    model = tiny_causal_lm("llama")
    prune_groups(model, keep_heads(model, {0: [1, 2], 1: [0, 3]})[1])
    out = str(tmp_path / "stock")
    assert save_pruned(model, out) == "stock"
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (2, 2, D)
    ids = tiny_lm_batch()["input_ids"]
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(loaded, {"input_ids": ids}), logits(model, {"input_ids": ids}),
                               atol=1e-5, rtol=1e-5)


def test_lora_on_gathered_projection_is_a_clear_error():
    from spam_hf.arguments import LoraArguments
    from spam_hf.jobs.loading import wrap_lora

    model = tiny_causal_lm("llama")
    prune_groups(model, keep_heads(model, {0: [0, 1, 3]})[1])
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.k_proj repeats KV heads .* \('linear'\)"):
        wrap_lora(model, LoraArguments(lora_r=2, lora_target_modules="q_proj,k_proj"))
    ids = tiny_lm_batch()["input_ids"]
    expected = logits(model, {"input_ids": ids})
    peft_model = wrap_lora(model, LoraArguments(lora_r=2, lora_target_modules="q_proj,linear"))
    assert hasattr(peft_model.get_submodule("base_model.model.model.layers.0.self_attn.k_proj.linear"), "lora_A")
    torch.testing.assert_close(logits(peft_model, {"input_ids": ids}), expected)  # B = 0 at init
