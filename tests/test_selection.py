"""Global selection under parameter / FLOP budgets, per-layer floors, bad input."""

import pytest
import torch

from spam_hf.architectures import group_specs
from spam_hf.scoring import group_scores
from spam_hf.selection import prunable_cost, select_groups


def test_budget_is_met_with_cheapest_score_per_cost_first(bert):
    specs = group_specs(bert)
    scores = group_scores(bert, specs, "magnitude")
    for budget in ("params", "flops"):
        sel = select_groups(bert, specs, scores, 0.5, budget=budget, seq_len=16)
        assert 0.5 <= sel.achieved < 0.6
        assert sel.total_cost == prunable_cost(bert, specs, budget, 16)
    # brute force on the ordering: every removed group has score/params <= every kept one
    sel = select_groups(bert, specs, scores, 0.3)
    removed, kept = [], []
    for s in specs:
        ratio = scores[s.name] / s.params_per_group(bert).double()
        keep = set(sel.keep[s.name].tolist())
        for g in range(s.count):
            (kept if g in keep else removed).append(float(ratio[g]))
    assert max(removed) <= min(kept)


def test_min_keep_floor_per_layer(bert):
    specs = group_specs(bert)
    scores = {s.name: torch.full((s.count,), 1.0 if s.layer == 0 else 100.0, dtype=torch.float64) for s in specs}
    no_floor = select_groups(bert, specs, scores, 0.4)
    assert any(no_floor.keep[s.name].numel() == 0 for s in specs if s.layer == 0)
    floor = select_groups(bert, specs, scores, 0.4, min_keep=0.25)
    for s in specs:
        assert floor.keep[s.name].numel() >= -(-s.count // 4)
    assert floor.achieved >= 0.4
    with pytest.raises(ValueError, match="min_keep"):
        select_groups(bert, specs, scores, 0.4, min_keep=1.0)


def test_bad_selection_input(bert):
    specs = group_specs(bert)
    scores = group_scores(bert, specs, "random")
    with pytest.raises(ValueError, match="sparsity must be in"):
        select_groups(bert, specs, scores, 1.0)
    with pytest.raises(ValueError, match="budget must be one of"):
        select_groups(bert, specs, scores, 0.5, budget="latency")
    with pytest.raises(ValueError, match="no scores"):
        select_groups(bert, specs, {}, 0.5)
    bad = dict(scores)
    bad[specs[0].name] = torch.full((specs[0].count,), float("nan"), dtype=torch.float64)
    with pytest.raises(ValueError, match="NaN"):
        select_groups(bert, specs, bad, 0.5)
