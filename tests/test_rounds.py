"""Pruning in rounds: cumulative targets of the original cost, fresh statistics per round, compensation."""

import pytest
import torch

from spam_hf import SpamLaplace
from spam_hf.architectures import group_specs
from spam_hf.pruning import geometric_targets, prune_in_rounds, rounds_for_sparsity
from spam_hf.pruning.selection import prunable_cost

from conftest import BatchList as Loader, tiny_batch, tiny_causal_lm, tiny_classifier, tiny_lm_batch


def test_geometric_targets():
    t = geometric_targets(0.75, 2)
    assert t == pytest.approx([0.5, 0.75])
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        geometric_targets(0.5, 0)


def test_rounds_for_sparsity_keep_every_round_under_the_share():
    assert [rounds_for_sparsity(s) for s in (0.1, 0.3, 0.5, 0.7, 0.9)] == [1, 1, 2, 4, 7]
    for s in (0.05, 0.42, 0.75, 0.9, 0.99):
        k = rounds_for_sparsity(s)
        left = [1.0] + [1.0 - t for t in geometric_targets(s, k)]
        shares = [1 - b / a for a, b in zip(left, left[1:])]
        assert max(shares) <= 0.3 + 1e-9  # no round removes more than 30% of what is left
        if k > 1:  # and one round fewer would
            assert 1 - (1 - s) ** (1 / (k - 1)) > 0.3
    with pytest.raises(ValueError):
        rounds_for_sparsity(0.5, max_share=1.0)


@pytest.mark.parametrize("method,compensate", [("damage", True), ("damage-out", False), ("magnitude", True),
                                               ("damage-obs", True)])
def test_rounds_reach_the_target_of_the_original_cost(method, compensate):
    model = tiny_classifier("bert", num_labels=3)
    total0 = prunable_cost(model, group_specs(model), "params", 128)
    calib = Loader([tiny_batch(batch=8, seed=s) for s in range(2)])
    calls = []

    def make(m):
        calls.append(sum(p.numel() for p in m.parameters()))
        return SpamLaplace(m, reduction="expand", n_data=16)

    res = prune_in_rounds(model, make, calib, geometric_targets(0.7, 3), method=method, compensate=compensate)
    assert len(res.plans) == 3 and calls == sorted(calls, reverse=True) and len(set(calls)) == 3
    assert res.achieved >= 0.7
    assert res.achieved == pytest.approx(1 - prunable_cost(model, group_specs(model), "params", 128) / total0)
    assert bool(res.compensated) == compensate and all(res.compensated)
    with torch.no_grad():
        assert torch.isfinite(model(**tiny_batch()).logits).all()
    with pytest.raises(ValueError, match="increasing"):
        prune_in_rounds(model, make, calib, [0.9, 0.8])


def test_min_keep_is_a_floor_of_the_original_count_in_every_round():
    """The per-layer floor holds of each layer's original heads / neurons: it used to be re-applied to what the
    earlier rounds had left, so it shrank round after round and layers fell below it (at 90% in 7 rounds a
    5% floor of 1,536 neurons, 77, ended at 10)."""
    import math

    model = tiny_classifier("bert", num_labels=3)
    counts = {s.name: s.count for s in group_specs(model)}
    calib = Loader([tiny_batch(batch=8, seed=s) for s in range(2)])
    make = lambda m: SpamLaplace(m, reduction="expand", n_data=16)  # noqa: E731
    res = prune_in_rounds(model, make, calib, geometric_targets(0.7, 4), method="magnitude", min_keep=0.5)
    for name, kept in res.selection.keep.items():
        assert kept.numel() >= math.ceil(0.5 * counts[name]), name
    assert res.achieved < 0.7  # the floor caps the removal, rounds do not get round it
    with pytest.raises(ValueError, match="min_keep"):
        prune_in_rounds(model, make, calib, [0.5], min_keep=1.0)


@pytest.mark.parametrize("model_type,kv_groups_only", [("gpt2", False), ("llama", False), ("llama", True)])
def test_default_damage_obs_rounds_on_decoders(model_type, kv_groups_only):
    """The default full-model pruning (``damage-obs`` in rounds with least-squares compensation) on decoders: GPT-2's
    ``Conv1D`` and LLaMA's grouped-query attention (query heads, or whole KV groups) reach the target, and the
    pruned model still computes finite logits."""
    model = tiny_causal_lm(model_type)
    total0 = prunable_cost(model, group_specs(model, kv_groups_only), "params", 128)
    calib = Loader([tiny_lm_batch(seed=s) for s in range(2)])

    def make(m):
        return SpamLaplace(m, reduction="expand", n_data=6, kv_groups_only=kv_groups_only)

    res = prune_in_rounds(model, make, calib, geometric_targets(0.6, 2), method="damage-obs", compensate=True,
                          kv_groups_only=kv_groups_only)
    assert res.achieved >= 0.6 and all(res.compensated)
    assert res.achieved == pytest.approx(1 - prunable_cost(model, group_specs(model, kv_groups_only), "params", 128)
                                         / total0)
    with torch.no_grad():
        assert torch.isfinite(model(**tiny_lm_batch(seed=5)).logits).all()
