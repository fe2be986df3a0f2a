"""Global selection under parameter / FLOP budgets, per-layer floors, bad input."""

import pytest
import torch

from spam_hf.architectures import group_specs
from spam_hf.pruning import group_scores
from spam_hf.pruning.selection import prunable_cost, select_groups

from conftest import tiny_classifier


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


def _tiny_llama():
    from conftest import tiny_causal_lm

    return tiny_causal_lm("llama")  # per layer: 4 query heads on 2 KV heads (0, 1 -> 0; 2, 3 -> 1)


@pytest.mark.parametrize("seed", range(4))
def test_gqa_selection_keeps_a_query_head_for_every_kept_kv_head(seed):
    from spam_hf.pruning import prune_groups

    model = _tiny_llama()
    specs = group_specs(model)
    scores = group_scores(model, specs, "random", seed=seed)
    for sparsity in (0.1, 0.3, 0.5, 0.7, 0.9):
        sel = select_groups(model, specs, scores, sparsity)
        assert sel.achieved >= sparsity
        for s in specs:
            if s.parent:  # exactly the KV heads that some kept query head reads
                assert sel.keep[s.parent].tolist() == s.parent_index[sel.keep[s.name]].unique().tolist()
        rep = sel.layers[0]
        assert (rep.total["heads"], rep.total["kv_heads"]) == (4, 2)
    prune_groups(model, sel.keep)  # a consistent selection is accepted by surgery


def test_kv_head_leaves_only_with_its_last_query_head():
    model = _tiny_llama()
    specs = group_specs(model)
    costs = {s.name: s.params_per_group(model).double() for s in specs}
    q_cost = float(costs["layer0.head"][0])
    total = prunable_cost(model, specs, "params", 128)
    scores = {s.name: torch.full((s.count,), 1e6, dtype=torch.float64) for s in specs}
    scores["layer0.head"][:2] = 0.0  # query heads 0 and 1 are free to remove ...
    scores["layer0.kv_head"][0] = 1e12  # ... but the KV head they read is not
    sel = select_groups(model, specs, scores, 2 * q_cost / total)
    assert 0 not in sel.keep["layer0.head"] and 1 in sel.keep["layer0.head"]  # one goes, the last one stays
    assert sel.keep["layer0.kv_head"].tolist() == [0, 1]
    scores["layer0.kv_head"][0] = 0.0  # now the whole group is cheapest
    kv_cost = float(costs["layer0.kv_head"][0])
    sel = select_groups(model, specs, scores, (2 * q_cost + kv_cost - 1) / total)
    assert sel.keep["layer0.head"].tolist() == [2, 3] and sel.keep["layer0.kv_head"].tolist() == [1]
    assert sel.removed_cost == pytest.approx(2 * q_cost + kv_cost)


def test_gqa_min_keep_floor_counts_query_heads():
    model = _tiny_llama()
    specs = group_specs(model)
    scores = {s.name: torch.full((s.count,), 1.0 if s.layer == 0 else 1e6, dtype=torch.float64) for s in specs}
    sel = select_groups(model, specs, scores, 0.45, min_keep=0.5)
    assert sel.keep["layer0.head"].numel() >= 2 and sel.keep["layer0.kv_head"].numel() >= 1


def test_removable_fraction_and_reachability(caplog):
    """The largest removable fraction is every group's cost over the prunable total (biases stay); a target at
    or above it is refused, and a floor that caps the removal below the target is logged."""
    from spam_hf.pruning import check_reachable, removable_fraction

    model = tiny_classifier("bert")
    specs = group_specs(model)
    total = prunable_cost(model, specs, "params", 128)
    groups = sum(float(s.params_per_group(model).sum()) for s in specs)
    assert removable_fraction(model, specs) == pytest.approx(groups / total)
    assert removable_fraction(model, specs, min_keep=0.5) < removable_fraction(model, specs)
    with pytest.raises(ValueError, match="would remove every head and neuron"):
        check_reachable(model, specs, 0.999)
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    with caplog.at_level("WARNING"):
        check_reachable(model, specs, 0.9, min_keep=0.5)
    assert "caps the removal" in caplog.text
    sel = select_groups(model, specs, {s.name: torch.rand(s.count) for s in specs}, 0.9, min_keep=0.5)
    assert sel.achieved == pytest.approx(removable_fraction(model, specs, min_keep=0.5))


def _counts(selection, specs, kind):
    return {int(selection.keep[s.name].numel()) for s in specs if s.kind == kind}


@pytest.mark.parametrize("budget", ["params", "flops"])
def test_uniform_selection_is_the_least_damage_with_equal_counts(budget):
    """--uniform: every layer loses the same number of heads and of neurons, each layer its lowest-scoring ones,
    and the counts are the brute-force minimum of the summed scores removed among all count pairs that meet the
    budget (every count pair enumerated; scores random, so the greedy global choice is not uniform)."""
    model = tiny_classifier("bert", num_hidden_layers=3)
    specs = group_specs(model)
    g = torch.Generator().manual_seed(0)
    scores = {s.name: torch.rand(s.count, generator=g, dtype=torch.float64) for s in specs}
    total = prunable_cost(model, specs, budget, 16)
    for sparsity in (0.2, 0.45, 0.7):
        sel = select_groups(model, specs, scores, sparsity, budget=budget, seq_len=16, uniform_kinds=("head", "neuron"))
        assert len(_counts(sel, specs, "head")) == len(_counts(sel, specs, "neuron")) == 1
        assert sel.achieved >= sparsity and sel.removed_cost == pytest.approx(sel.achieved * total)
        best = None
        heads, neurons = specs[0].count, specs[1].count
        for rh in range(heads):  # every layer keeps one of each
            for rn in range(neurons):
                r = {"head": rh, "neuron": rn}
                drop = {s.name: scores[s.name].argsort()[: r[s.kind]] for s in specs}
                cost = sum(float(s.params_per_group(model).double()[drop[s.name]].sum()) if budget == "params"
                           else float(s.flops_per_group(model, 16)[drop[s.name]].sum()) for s in specs)
                if cost >= sparsity * total:
                    damage = sum(float(scores[s.name][drop[s.name]].sum()) for s in specs)
                    best = damage if best is None else min(best, damage)
        removed = sum(float(scores[s.name][sorted(set(range(s.count)) - set(sel.keep[s.name].tolist()))].sum())
                      for s in specs)
        assert removed == pytest.approx(best, rel=1e-12)
        for s in specs:  # within a layer, its lowest scores go
            dropped = set(range(s.count)) - set(sel.keep[s.name].tolist())
            if dropped:
                assert max(float(scores[s.name][i]) for i in dropped) <= min(
                    float(scores[s.name][i]) for i in sel.keep[s.name].tolist())


def test_uniform_keeps_other_kinds_and_refuses_what_it_cannot_do(bert):
    """Kinds outside uniform_kinds stay whole (BERT's heads: the stock class ties head size to hidden / heads), a
    target beyond what the uniform kinds hold is refused before any work, and so are layers that differ already
    and query heads that hang off KV heads."""
    from conftest import tiny_causal_lm
    from spam_hf.pruning.selection import check_reachable, check_uniform

    specs = group_specs(bert)
    scores = group_scores(bert, specs, "magnitude")
    sel = select_groups(bert, specs, scores, 0.3, uniform_kinds=("neuron",))
    assert _counts(sel, specs, "head") == {4} and len(_counts(sel, specs, "neuron")) == 1 and sel.achieved >= 0.3
    with pytest.raises(ValueError, match="out of reach of --uniform here: it removes only neurons"):
        check_reachable(bert, specs, 0.5, uniform_kinds=("neuron",))  # the MLP is 43% of this block
    check_reachable(bert, specs, 0.3, uniform_kinds=("neuron",))
    from spam_hf.pruning import prune_groups

    uneven = tiny_classifier("bert")
    prune_groups(uneven, {group_specs(uneven)[2].name: torch.tensor([0, 1, 2])})  # layer 1 keeps 3 of 4 heads
    with pytest.raises(ValueError, match=r"same number of heads in every layer, this model has \[3, 4\]"):
        check_uniform(group_specs(uneven), ("head",))
    llama = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match="--kv-groups-only True"):
        check_uniform(group_specs(llama), ("head", "neuron"))
    assert set(check_uniform(group_specs(llama, kv_groups_only=True), ("head", "neuron"))) == {"head", "neuron"}


def _damage(sel, specs, scores):
    return sum(float(scores[s.name][sorted(set(range(s.count)) - set(sel.keep[s.name].tolist()))].sum())
               for s in specs)


@pytest.mark.parametrize("budget", ["params", "flops"])
def test_round_to_keeps_multiples_within_the_budget_and_the_least_damage(budget):
    """--round-to 8: every layer keeps a multiple of 8 neurons (heads untouched), each layer still loses its
    lowest-scoring neurons, the budget still holds, and the up / down choice per layer is the brute-force best of
    all 2^layers choices from the unrounded selection (random scores, 4 layers of 48 neurons)."""
    import itertools

    model = tiny_classifier("bert", num_hidden_layers=4)
    specs = group_specs(model)
    g = torch.Generator().manual_seed(1)
    scores = {s.name: torch.rand(s.count, generator=g, dtype=torch.float64) for s in specs}
    total = prunable_cost(model, specs, budget, 16)
    neurons = [s for s in specs if s.kind == "neuron"]
    for sparsity in (0.2, 0.45, 0.7):
        plain = select_groups(model, specs, scores, sparsity, budget=budget, seq_len=16)
        sel = select_groups(model, specs, scores, sparsity, budget=budget, seq_len=16, round_to=8)
        assert all(int(sel.keep[s.name].numel()) % 8 == 0 for s in neurons)
        assert any(int(plain.keep[s.name].numel()) % 8 for s in neurons)  # rounding had work to do
        assert sel.achieved >= sparsity and sel.removed_cost == pytest.approx(sel.achieved * total)
        for s in specs:
            dropped = set(range(s.count)) - set(sel.keep[s.name].tolist())
            if s.kind == "head":
                assert sel.keep[s.name].tolist() == plain.keep[s.name].tolist()
            elif dropped and sel.keep[s.name].numel():
                assert max(float(scores[s.name][i]) for i in dropped) <= min(
                    float(scores[s.name][i]) for i in sel.keep[s.name].tolist())
        best = None
        costs = {s.name: (s.params_per_group(model).double() if budget == "params" else s.flops_per_group(model, 16))
                 for s in specs}
        for sides in itertools.product((-1, 1), repeat=len(neurons)):
            keep = {s.name: plain.keep[s.name] for s in specs}
            for s, side in zip(neurons, sides):
                k = int(plain.keep[s.name].numel())
                target_k = (k // 8) * 8 if side < 0 else min(-(-k // 8) * 8, s.count)
                keep[s.name] = scores[s.name].argsort(descending=True)[:target_k]
            removed = sum(float(costs[s.name][sorted(set(range(s.count)) - set(keep[s.name].tolist()))].sum())
                          for s in specs)
            if removed >= sparsity * total - 1e-6:
                damage = sum(float(scores[s.name][sorted(set(range(s.count)) - set(keep[s.name].tolist()))].sum())
                             for s in specs)
                best = damage if best is None else min(best, damage)
        assert _damage(sel, specs, scores) == pytest.approx(best, rel=1e-12)


def test_round_to_with_uniform_searches_only_multiples():
    """--uniform --round-to 16: one neuron count for every layer, a multiple of 16, the least summed score among
    such counts that meet the budget (brute force over every count)."""
    model = tiny_classifier("bert", num_hidden_layers=3)
    specs = group_specs(model)
    g = torch.Generator().manual_seed(2)
    scores = {s.name: torch.rand(s.count, generator=g, dtype=torch.float64) for s in specs}
    total = prunable_cost(model, specs, "params", 16)
    for sparsity in (0.05, 0.15, 0.25):  # keeping 16 of 48 neurons removes 28% of this block
        sel = select_groups(model, specs, scores, sparsity, seq_len=16, uniform_kinds=("neuron",), round_to=16)
        (kept,) = _counts(sel, specs, "neuron")
        assert kept % 16 == 0 and sel.achieved >= sparsity
        feasible = []
        for k in (16, 32, 48):
            drop = {s.name: scores[s.name].argsort()[: s.count - k] for s in specs if s.kind == "neuron"}
            cost = sum(float(s.params_per_group(model).double()[drop[s.name]].sum()) for s in specs
                       if s.kind == "neuron")
            if cost >= sparsity * total:
                feasible.append((sum(float(scores[n][d].sum()) for n, d in drop.items()), k))
        assert kept == min(feasible)[1]


def test_round_to_is_checked():
    from spam_hf.pruning import PruningConfig

    model = tiny_classifier("bert")
    specs = group_specs(model)
    scores = group_scores(model, specs, "magnitude")
    for bad in (0, -8, 2.5, True):
        with pytest.raises(ValueError, match="round_to must be a whole number >= 1"):
            select_groups(model, specs, scores, 0.3, round_to=bad)
        with pytest.raises(ValueError, match="round_to must be a whole number >= 1"):
            PruningConfig(round_to=bad)
