"""Physical removal of heads and neurons == zeroing the same groups."""

import pytest
import torch

from spam_hf.architectures import ZeroHeadAttention, group_specs
from spam_hf.pruning import mask_groups, prune_groups

from conftest import DECODER_TYPES, ENCODER_TYPES, close_parents, random_keep, tiny_batch, tiny_causal_lm, tiny_classifier, tiny_lm_batch


@pytest.mark.parametrize("model_type", ENCODER_TYPES)
@pytest.mark.parametrize("drop_all_layer", [None, 0])
def test_pruned_logits_equal_masked_logits(model_type, drop_all_layer):
    batch = tiny_batch()
    masked = tiny_classifier(model_type)
    pruned = tiny_classifier(model_type)
    specs = group_specs(masked)
    keep = random_keep(specs, seed=3, drop_all_layer=drop_all_layer)
    mask_groups(masked, specs, keep)
    prune_groups(pruned, keep)
    n_masked = sum(p.numel() for p in masked.parameters())
    n_pruned = sum(p.numel() for p in pruned.parameters())
    assert n_pruned < n_masked
    with torch.no_grad():
        a = masked(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = pruned(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    # specs of the pruned model reflect the kept counts
    after = {(s.kind, s.layer): s.count for s in group_specs(pruned)}
    for s in specs:
        k = int(keep[s.name].numel())
        assert after.get((s.kind, s.layer), 0) == k


def test_pruned_model_trains(bert):
    specs = group_specs(bert)
    prune_groups(bert, random_keep(specs, seed=1, drop_all_layer=1))
    bert.train()
    batch = tiny_batch()
    loss = bert(**batch).loss
    loss.backward()
    assert all(p.grad is not None for p in bert.parameters() if p.requires_grad and p.numel())


@pytest.mark.parametrize("model_type", DECODER_TYPES)
def test_every_other_group_removed_equals_masked(model_type):
    """Heads 0 and 2 kept (of 4) in every layer: a fused projection (GPT-2's c_attn) keeps its [q | k | v] layout.
    One kept head per layer, as random keeps often give, cannot tell that from a group-major order."""
    batch = tiny_lm_batch()
    masked, pruned = tiny_causal_lm(model_type), tiny_causal_lm(model_type)
    specs = group_specs(masked)
    keep = close_parents(specs, {s.name: torch.arange(0, s.count, 2) for s in specs if not s.parent and
                                 s.kind != "kv_head"} | {s.name: torch.tensor([0, 2]) for s in specs if s.parent})
    assert all(keep[s.name].numel() >= 2 for s in specs if s.kind == "head" and s.count >= 4)
    mask_groups(masked, specs, keep)
    prune_groups(pruned, keep)
    with torch.no_grad():
        torch.testing.assert_close(pruned(batch["input_ids"]).logits, masked(batch["input_ids"]).logits,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", DECODER_TYPES)
def test_decoder_pruned_logits_and_greedy_generation_equal_masked(model_type):
    """Layer 0 loses every head (its ZeroHeadAttention must keep the KV cache aligned for generate())."""
    batch = tiny_lm_batch()
    masked, pruned = tiny_causal_lm(model_type), tiny_causal_lm(model_type)
    specs = group_specs(masked)
    keep = random_keep(specs, seed=4)
    keep[specs[0].name] = torch.tensor([], dtype=torch.long)
    close_parents(specs, keep)
    mask_groups(masked, specs, keep)
    prune_groups(pruned, keep)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in masked.parameters())
    with torch.no_grad():
        torch.testing.assert_close(pruned(batch["input_ids"]).logits, masked(batch["input_ids"]).logits,
                                   atol=1e-5, rtol=1e-5)
        kw = dict(max_new_tokens=6, do_sample=False, attention_mask=batch["attention_mask"], pad_token_id=0)
        assert torch.equal(pruned.generate(batch["input_ids"], **kw), masked.generate(batch["input_ids"], **kw))
    pruned.train()
    pruned(**batch).loss.backward()
    no_grad = {n for n, p in pruned.named_parameters() if p.requires_grad and p.numel() and p.grad is None}
    # only the norms feeding an empty (now constant) attention are unused: layer 0's, and others the random keep
    # emptied
    empty = [name.rsplit(".", 1)[0] for name, m in pruned.named_modules() if isinstance(m, ZeroHeadAttention)]
    assert "model.layers.0" in empty or "transformer.h.0" in empty
    assert no_grad <= {f"{layer}.{norm}" for layer in empty
                       for norm in ("ln_1.weight", "ln_1.bias", "input_layernorm.weight")}, no_grad


def test_kept_groups_out_of_range_or_repeated_are_refused():
    """A keep naming a group the layer does not have (once silently read as 'all kept') is an error."""
    model = tiny_causal_lm("llama")
    spec = group_specs(model)[-1]
    for kept in ([0, spec.count], [1, 1], [-1]):
        with pytest.raises(ValueError, match=r"must be distinct indices in \[0, "):
            prune_groups(model, {spec.name: torch.tensor(kept)})
