"""ModernBERT: heads in the fused Wqkv, gated neurons in Wi, local and global attention."""

import copy
import json
import os

import pytest
import torch
from torch import nn

from spam_hf.architectures import group_specs
from spam_hf.export import from_pretrained, save_pruned
from spam_hf.pruning import PruningConfig, mask_groups, prune, prune_groups

from conftest import (BatchList, LogitsOf, assert_remote_load, dense_ggn_block, expected_kfac, tiny_batch,
                      tiny_classifier, uneven_keep)


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_groups_own_their_rows_of_the_fused_projections():
    model = tiny_classifier("modernbert")
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    heads, neurons = group_specs(model)[:2]
    assert heads.row_index["model.layers.0.attn.Wqkv"][1].tolist() == \
        list(range(8, 16)) + list(range(40, 48)) + list(range(72, 80))
    assert neurons.row_index["model.layers.0.mlp.Wi"][5].tolist() == [5, 53]


def test_uneven_heads_and_neurons_equal_masked_and_export_with_remote_code(tmp_path):
    """Layer 0 (global) keeps heads 1 and 3, layer 1 (local) none; every other neuron. The attention infers its
    head count from Wqkv's width, so only shapes are recorded."""
    model = tiny_classifier("modernbert").eval()
    specs = group_specs(model)
    keep = uneven_keep(specs)
    masked, pruned = mask_groups(copy.deepcopy(model), specs, keep), copy.deepcopy(model)
    prune_groups(pruned, keep)
    batch = tiny_batch()
    expected = logits(masked, batch)
    assert not torch.allclose(expected, logits(model, batch), atol=1e-4)
    torch.testing.assert_close(logits(pruned, batch), expected, atol=1e-6, rtol=1e-5)
    out = str(tmp_path / "export")
    assert save_pruned(pruned, out) == "remote_code"
    spec = json.load(open(os.path.join(out, "config.json")))["spam_pruning"]
    assert spec["linear_shapes"]["model.layers.0.attn.Wqkv"] == [32, 48] and not spec.get("module_attrs")
    torch.testing.assert_close(logits(from_pretrained(out).eval(), batch), expected, atol=1e-6, rtol=1e-5)
    assert_remote_load(out, "AutoModelForSequenceClassification", batch, expected, tmp_path)


def test_the_same_neurons_in_every_layer_export_as_stock(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = tiny_classifier("modernbert").eval()
    prune_groups(model, {s.name: torch.arange(0, s.count, 3) for s in group_specs(model) if s.kind == "neuron"})
    out = str(tmp_path / "stock")
    assert save_pruned(model, out) == "stock"
    assert json.load(open(os.path.join(out, "config.json")))["intermediate_size"] == 16
    batch = tiny_batch()
    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layer", ["model.layers.1.attn.Wqkv", "model.layers.1.mlp.Wi"])
def test_kfac_through_a_fused_projection_equals_the_exact_ggn(layer):
    """One token (KFAC is exact for one input vector per example): the GGN of the fused layer's [W | b] through
    the q/k/v view and the gated chunk equals its Kronecker factors (a zero bias is added)."""
    torch.manual_seed(0)
    model = tiny_classifier("modernbert").double().eval()
    module = model.get_submodule(layer)
    module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=torch.float64))
    wrapped, x = LogitsOf(model), torch.tensor([[7]])
    exact = dense_ggn_block(wrapped, "model." + layer, x)
    assert exact.abs().max() > 1e-6
    torch.testing.assert_close(expected_kfac(wrapped, "model." + layer, x), exact, atol=1e-10, rtol=1e-6)


@pytest.mark.parametrize("sequential", [False, True])
def test_default_pruning_reaches_the_target(sequential):
    model = tiny_classifier("modernbert")
    batches = BatchList([tiny_batch(batch=8, seed=s) for s in range(3)])
    result = prune(model, None, PruningConfig(sparsity=0.5, sequential=sequential, calibration_batches=3),
                   calibration=batches)
    assert result.achieved >= 0.5 and torch.isfinite(logits(model, batches[0])).all()
