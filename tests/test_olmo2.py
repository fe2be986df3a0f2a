"""OLMo 2: q_norm / k_norm span every head of a layer; a pruned layer keeps the original width in their
denominator (KeptRowsRMSNorm), so pruning equals masking."""

import copy
import json
import os

import torch

from spam_hf.architectures import group_specs
from spam_hf.architectures.llama import KeptRowsRMSNorm
from spam_hf.export import from_pretrained, save_pruned
from spam_hf.pruning import mask_groups, prune_groups

from conftest import assert_remote_load, greedy, lm_logits, tiny_causal_lm, tiny_lm_batch

D = 8


def test_q_norm_couples_the_heads_where_qwen3s_does_not():
    """Why OLMo 2 needs its own norm after pruning: zeroing head 0's query rows changes head 1's normalised
    queries through OLMo 2's layer-wide q_norm, not through Qwen 3's per-head one."""
    x = torch.randn(1, 5, 32)
    for model_type, others_change in (("olmo2", True), ("qwen3", False)):
        attn = tiny_causal_lm(model_type).model.layers[0].self_attn
        q = attn.q_proj(x)
        masked = q.clone()
        masked[..., :D] = 0
        norm = (lambda t: attn.q_norm(t)) if model_type == "olmo2" else \
            (lambda t: attn.q_norm(t.unflatten(-1, (-1, D))).flatten(-2))
        with torch.no_grad():
            assert (not torch.allclose(norm(q)[..., D:], norm(masked)[..., D:])) == others_change


def test_heads_go_in_whole_kv_groups():
    specs = group_specs(tiny_causal_lm("olmo2"))
    assert [(s.kind, s.count) for s in specs[:2]] == [("head", 2), ("neuron", 48)]
    assert group_specs(tiny_causal_lm("olmo2"), kv_groups_only=False)[0].count == 2


def test_pruned_equals_masked_exports_with_remote_code_and_generates_the_same(tmp_path):
    """Layer 0 keeps KV group 1, layer 1 all; every other neuron; then layer 0 is pruned again (the width in the
    norm stays the original one)."""
    model, masked = tiny_causal_lm("olmo2"), tiny_causal_lm("olmo2")
    specs = group_specs(model)
    keep = {"layer0.head": torch.tensor([1]), "layer1.neuron": torch.arange(0, 48, 2)}
    mask_groups(masked, specs, keep)
    prune_groups(model, keep)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_norm, KeptRowsRMSNorm) and (attn.q_norm.weight.numel(), attn.q_norm.width) == (16, 32)
    assert (attn.k_norm.weight.numel(), attn.k_norm.width) == (8, 16)
    ids = tiny_lm_batch()["input_ids"]
    expected = lm_logits(masked, ids)
    torch.testing.assert_close(lm_logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(greedy(model, ids), greedy(masked, ids))
    out = str(tmp_path / "export")
    assert save_pruned(copy.deepcopy(model), out) == "remote_code"
    entry = json.load(open(os.path.join(out, "config.json")))["spam_pruning"]["kept_rows_rms_norm"]
    assert entry["model.layers.0.self_attn.q_norm"]["width"] == 32
    torch.testing.assert_close(lm_logits(from_pretrained(out).eval(), ids), expected, atol=1e-5, rtol=1e-5)
    assert_remote_load(out, "AutoModelForCausalLM", tiny_lm_batch(), expected, tmp_path, gen=greedy(model, ids))
    # the layer's last group: the attention goes, the norms with it
    prune_groups(model, {"layer0.head": torch.tensor([], dtype=torch.long)})
    mask_groups(masked, group_specs(masked), {"layer0.head": torch.tensor([], dtype=torch.long)})
    torch.testing.assert_close(lm_logits(model, ids), lm_logits(masked, ids), atol=1e-5, rtol=1e-5)


def test_neurons_alone_export_as_stock(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_causal_lm("olmo2")
    prune_groups(model, {s.name: torch.arange(0, s.count, 2) for s in group_specs(model) if s.kind == "neuron"})
    out = str(tmp_path / "stock")
    assert save_pruned(model, out) == "stock"
    ids = tiny_lm_batch()["input_ids"]
    torch.testing.assert_close(lm_logits(AutoModelForCausalLM.from_pretrained(out).eval(), ids), lm_logits(model, ids),
                               atol=1e-5, rtol=1e-5)


def test_default_pruning_in_rounds_and_block_by_block():
    from spam_hf.pruning import PruningConfig, prune

    from conftest import BatchList

    batches = BatchList([tiny_lm_batch(seed=s) for s in range(3)])
    for sequential in (False, True):
        model = tiny_causal_lm("olmo2")
        result = prune(model, None, PruningConfig(sparsity=0.5, sequential=sequential, calibration_batches=3),
                       calibration=batches)
        assert result.achieved >= 0.5 and torch.isfinite(lm_logits(model, batches[0]["input_ids"])).all()
