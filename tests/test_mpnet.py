"""MPNet (a position bias shared by every layer, read at each layer's kept heads) and DeBERTa-v2 (disentangled
attention through each layer's own projections)."""

import copy

import pytest
import torch

from spam_hf.architectures import group_specs
from spam_hf.export import from_pretrained, save_pruned
from spam_hf.pruning import PruningConfig, mask_groups, prune, prune_groups

from conftest import BatchList, assert_remote_load, tiny_batch, tiny_classifier, uneven_keep

DEBERTA = dict(relative_attention=True, pos_att_type=["c2p", "p2c"], max_relative_positions=16, position_buckets=8)


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _model(model_type, **overrides):
    if model_type == "mpnet":
        model = tiny_classifier("mpnet", **overrides).eval()
        with torch.no_grad():  # a position bias large enough that reading it at the wrong heads shows
            model.mpnet.encoder.relative_attention_bias.weight.mul_(200)
        return model
    return tiny_classifier("deberta-v2", **DEBERTA, **overrides).eval()


@pytest.mark.parametrize("model_type,overrides", [("mpnet", {}), ("deberta-v2", {"share_att_key": True}),
                                                  ("deberta-v2", {"share_att_key": False})])
def test_pruned_equals_masked_and_exports(tmp_path, model_type, overrides):
    model = _model(model_type, **overrides)
    specs = group_specs(model)
    if model_type == "deberta-v2" and not overrides["share_att_key"]:
        assert "deberta.encoder.layer.0.attention.self.pos_key_proj" in specs[0].row_index
    masked, pruned = mask_groups(copy.deepcopy(model), specs, uneven_keep(specs)), copy.deepcopy(model)
    prune_groups(pruned, uneven_keep(specs))
    batch = tiny_batch()
    expected = logits(masked, batch)
    assert not torch.allclose(expected, logits(model, batch), atol=1e-4)
    torch.testing.assert_close(logits(pruned, batch), expected, atol=1e-6, rtol=1e-5)
    out = str(tmp_path / "export")
    assert save_pruned(pruned, out) == "remote_code"
    torch.testing.assert_close(logits(from_pretrained(out).eval(), batch), expected, atol=1e-6, rtol=1e-5)
    assert_remote_load(out, "AutoModelForSequenceClassification", batch, expected, tmp_path)


def test_mpnet_layers_read_the_shared_position_bias_at_their_kept_heads():
    """The negative control: the same pruned MPNet reading the bias at heads 0, 1 instead of 1, 3 is wrong, and
    pruning again composes the indices (head 1 of the kept [1, 3] is original head 3)."""
    model = _model("mpnet")
    specs = group_specs(model)
    masked, pruned = mask_groups(copy.deepcopy(model), specs, uneven_keep(specs)), copy.deepcopy(model)
    prune_groups(pruned, uneven_keep(specs))
    attn = pruned.mpnet.encoder.layer[0].attention.attn
    assert attn.kept_heads == [1, 3] and attn.num_attention_heads == 2
    batch = tiny_batch()
    wrong = copy.deepcopy(pruned)
    wrong.mpnet.encoder.layer[0].attention.attn.kept_heads = [0, 1]
    assert not torch.allclose(logits(wrong, batch), logits(masked, batch), atol=1e-4)
    prune_groups(pruned, {"layer0.head": torch.tensor([1])})
    assert pruned.mpnet.encoder.layer[0].attention.attn.kept_heads == [3]


@pytest.mark.parametrize("model_type", ["mpnet", "deberta-v2"])
def test_default_pruning_runs_through_the_relative_attention(model_type):
    """The default score in rounds with least-squares compensation (KFAC factors of every projection, the
    position projections included) reaches the target."""
    model = _model(model_type)
    batches = BatchList([tiny_batch(batch=8, seed=s) for s in range(3)])
    result = prune(model, None, PruningConfig(sparsity=0.5, calibration_batches=3), calibration=batches)
    assert result.achieved >= 0.5 and torch.isfinite(logits(model, batches[0])).all()
