"""LLaMA-layout family (llama, mistral, qwen2, qwen3): grouped-query attention and the gated MLP."""

import pytest
import torch

from spam_hf.architectures import group_specs, supported_model_types

from conftest import tiny_causal_lm, tiny_lm_batch
from test_architectures import zero_group

LLAMA_TYPES = ["llama", "mistral", "qwen2", "qwen3"]


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


@pytest.mark.parametrize("model_type", LLAMA_TYPES)
def test_kv_groups_own_their_query_heads(model_type):
    assert model_type in supported_model_types()
    model = tiny_causal_lm(model_type)
    head, neuron = group_specs(model)[:2]
    d, r = 8, 2  # 4 query heads share 2 KV heads
    assert head.count == 2 and head.attn_dim == r * d
    assert head.row_index["model.layers.0.self_attn.k_proj"][1].tolist() == list(range(8, 16))
    assert head.row_index["model.layers.0.self_attn.q_proj"][1].tolist() == list(range(16, 32))
    assert head.col_index["model.layers.0.self_attn.o_proj"][1].tolist() == list(range(16, 32))
    assert set(neuron.row_index) == {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"}
    assert neuron.count == 48


def test_without_gqa_a_group_is_one_head():
    model = tiny_causal_lm("llama", num_key_value_heads=4)
    head = group_specs(model)[0]
    assert head.count == 4 and head.row_index["model.layers.0.self_attn.q_proj"].shape == (4, 8)


@pytest.mark.parametrize("model_type", LLAMA_TYPES)
def test_zeroing_kv_group_equals_masking_its_query_heads(model_type):
    batch = tiny_lm_batch()
    model, ref = tiny_causal_lm(model_type), tiny_causal_lm(model_type)
    zero_group(model, group_specs(model)[2], 1)  # layer 1, KV group 1 = query heads 2, 3

    def pre_hook(module, args):
        x = args[0].clone()
        x[..., 16:32] = 0
        return (x,)

    ref.get_submodule("model.layers.1.self_attn.o_proj").register_forward_pre_hook(pre_hook)
    torch.testing.assert_close(logits(model, batch), logits(ref, batch), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(logits(model, batch), logits(tiny_causal_lm(model_type), batch), atol=1e-6)


@pytest.mark.parametrize("model_type", LLAMA_TYPES)
def test_zeroing_neuron_equals_zeroing_gated_activation(model_type):
    batch = tiny_lm_batch()
    model, ref = tiny_causal_lm(model_type), tiny_causal_lm(model_type)
    zero_group(model, group_specs(model)[1], 7)

    def pre_hook(module, args):
        x = args[0].clone()
        x[..., 7] = 0
        return (x,)

    ref.get_submodule("model.layers.0.mlp.down_proj").register_forward_pre_hook(pre_hook)
    torch.testing.assert_close(logits(model, batch), logits(ref, batch), atol=1e-6, rtol=1e-5)
