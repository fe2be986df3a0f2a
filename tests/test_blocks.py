"""Whole-block removal (spam_hf.pruning.blocks): which blocks go, that removing one is skipping it, and that the
smaller model exports and loads like any other."""

import copy
import json
import os

import pytest
import torch

from spam_hf.architectures import get_family, group_specs
from spam_hf.pruning import PruningConfig, prune
from spam_hf.pruning.blocks import calibration_loss, choose_idle_blocks, remove_blocks

from conftest import BatchList, tiny_batch, tiny_causal_lm, tiny_classifier, tiny_lm_batch


def _model(model_type, layers=4):
    if model_type in ("llama", "qwen2", "gpt2"):
        return tiny_causal_lm(model_type, num_hidden_layers=layers) if model_type != "gpt2" else \
            tiny_causal_lm(model_type, n_layer=layers)
    return tiny_classifier(model_type, num_hidden_layers=layers) if model_type != "distilbert" else \
        tiny_classifier(model_type, n_layers=layers)


def _batches(model_type, n=2):
    decoder = model_type in ("llama", "qwen2", "gpt2")
    return BatchList([tiny_lm_batch(seed=s) if decoder else tiny_batch(batch=8, seed=s) for s in range(n)])


def _empty_block(model, layer):
    """Cut every head and neuron of ``layer`` (the family's own surgery)."""
    keep = {s.name: (torch.arange(0) if s.layer == layer else torch.arange(s.count)) for s in group_specs(model)}
    get_family(model).shrink(model, keep)


@pytest.mark.parametrize("model_type", ["bert", "distilbert", "gpt2", "llama", "qwen2"])
def test_removing_a_block_computes_what_skipping_it_did(model_type):
    """``remove_blocks`` gives the same logits as the full model with the block skipped, renumbers ``layer_idx``
    and shrinks ``num_hidden_layers``; decoders still generate with their KV cache."""
    model = _model(model_type)
    batch = {k: v for k, v in _batches(model_type)[0].items() if k != "labels"}
    from spam_hf.pruning.blocks import _SkipBlocks

    with torch.no_grad(), _SkipBlocks(model, [1, 2]):
        skipped = model(**batch).logits
    mapping = remove_blocks(model, [2, 1])
    assert mapping == {0: 0, 3: 1} and model.config.num_hidden_layers == 2
    layers = get_family(model).layers(model)
    assert len(layers) == 2
    idx = [m.layer_idx for block in layers for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    assert sorted(set(idx)) == ([0, 1] if idx else [])
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, skipped)
    if model_type in ("llama", "qwen2", "gpt2"):
        out = model.generate(batch["input_ids"][:1, :5], max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert out.shape == (1, 8)


def test_an_emptied_pre_norm_block_costs_nothing_to_skip():
    """A LLaMA block with no heads, no neurons and no biases adds nothing to the residual stream: skipping it
    leaves the calibration loss where it was, so it goes at tolerance 0 (it is the emptiest, tried first)."""
    model = _model("llama")
    _empty_block(model, 2)
    batches = _batches("llama")
    base = calibration_loss(model, batches, 2)
    assert calibration_loss(model, batches, 2, skip=[2]) == pytest.approx(base, rel=1e-6)
    assert 2 in choose_idle_blocks(model, batches, 1e-6, max_batches=2)


def test_the_search_takes_the_least_harmful_candidate_first_and_stops_over_the_bound(monkeypatch):
    """The best-first search against a loss given per skipped set: only blocks keeping at most IDLE_SHARE of a
    dense block are candidates; each step tries every remaining candidate with the ones chosen and takes the lowest
    loss while it is within ``(1 + tolerance) × base``; never every block."""
    import spam_hf.pruning.blocks as blocks

    model = _model("bert")  # 4 blocks; 3 emptied, 1 and 2 down to two neurons: candidates 1, 2, 3; 0 is full
    _empty_block(model, 3)
    keep = {s.name: (torch.arange(2) if s.layer in (1, 2) and s.kind == "neuron" else
                     torch.arange(0) if s.layer in (1, 2) else torch.arange(s.count)) for s in group_specs(model)}
    get_family(model).shrink(model, keep)
    dense_block = blocks.layer_costs(_model("bert"), group_specs(_model("bert")))[0]
    single = {1: -0.04, 2: 0.001, 3: 0.02, 0: -0.5}
    pair_extra = {frozenset({1, 3}): 0.2}
    tried = []

    def fake_loss(model, batches, max_batches, skip=()):
        tried.append(sorted(skip))
        return 1.0 + sum(single[i] for i in skip) + sum(v for k, v in pair_extra.items() if k <= set(skip))

    monkeypatch.setattr(blocks, "calibration_loss", fake_loss)
    assert choose_idle_blocks(model, [], 0.01, max_batches=1, block_cost=dense_block) == [1, 2]
    assert [0] not in tried  # block 0 keeps everything: never a candidate
    assert tried[:4] == [[], [1], [2], [3]] and [1, 3] in tried and [1, 2, 3] in tried
    assert choose_idle_blocks(model, [], 1e9, max_batches=1) == [0, 1, 2]  # no cap: the last block stays
    single[3] = -1.0  # the last block is now the best to skip: it is a candidate like any other, one block stays
    assert choose_idle_blocks(model, [], 1e9, max_batches=1) == [0, 2, 3]


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_prune_with_drop_blocks_exports_fewer_layers_that_load(tmp_path, model_type, monkeypatch):
    """Through the engine: the default cut, then blocks dropped (every block a candidate, any loss allowed); the
    selection counts the dropped blocks' groups as removed and records them, and the export (uneven: remote code;
    ``--uniform`` LLaMA: stock) loads with the same logits as the pruned model."""
    import spam_hf.pruning.blocks as blocks
    from spam_hf.export import from_pretrained, save_pruned

    monkeypatch.setattr(blocks, "IDLE_SHARE", float("inf"))

    decoder = model_type == "llama"
    model = _model(model_type)
    batches = _batches(model_type, 3)
    config = PruningConfig(sparsity=0.5, rounds=1, calibration_batches=3, drop_blocks=1e9, uniform=decoder)
    result = prune(model, None, config, batches, kv_groups_only=decoder)
    assert result.dropped_blocks and len(result.dropped_blocks) == 3  # all but one: the tolerance lets any go
    assert result.selection.dropped_blocks == result.dropped_blocks
    assert result.achieved > 0.5 and model.config.num_hidden_layers == 1
    for name, idx in result.selection.keep.items():
        if int(name.split(".")[0][5:]) in result.dropped_blocks:
            assert idx.numel() == 0
    assert json.loads(json.dumps(result.selection.to_dict()))["dropped_blocks"] == result.dropped_blocks
    out = str(tmp_path / "export")
    kind = save_pruned(model, out)
    assert kind == ("stock" if decoder else "remote_code")
    loaded = from_pretrained(out).eval()
    assert loaded.config.num_hidden_layers == 1
    batch = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model.eval()(**batch).logits, atol=1e-5, rtol=1e-5)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["num_hidden_layers"] == 1


def test_drop_blocks_refusals():
    """Bad tolerances, LoRA models, missing calibration batches and every block are refused in one line each."""
    with pytest.raises(ValueError, match="drop_blocks must be a tolerance"):
        PruningConfig(sparsity=0.5, drop_blocks=-0.1)
    model = _model("bert")
    with pytest.raises(ValueError, match="needs calibration batches"):
        prune(model, None, PruningConfig(sparsity=0.5, method="magnitude", drop_blocks=0.01))
    with pytest.raises(ValueError, match="every block"):
        remove_blocks(copy.deepcopy(model), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="not all in"):
        remove_blocks(copy.deepcopy(model), [7])
    gpt2 = tiny_causal_lm("gpt2", scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(ValueError, match="inverse_layer_idx"):
        remove_blocks(gpt2, [0])
