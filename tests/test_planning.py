"""plan / apply: the decision leaves the model untouched, round-trips through JSON, and apply = masking."""

import copy

import pytest
import torch

from spam_hf import SpamLaplace, apply, plan
from spam_hf.architectures import group_specs
from spam_hf.pruning import PruningPlan, group_scores, mask_groups, select_groups

from conftest import tiny_batch, tiny_classifier


def fitted(model):
    la = SpamLaplace(model, n_data=40)
    for seed in range(3):
        b = tiny_batch(seed=seed)
        with la.capture(model, b["attention_mask"]):
            out = model(**b)
        la.accumulate(out.logits, b["labels"])
    return la


@pytest.mark.parametrize("method", ["opd", "fisher", "magnitude", "random"])
def test_plan_is_select_of_scores_and_leaves_the_model(method):
    model = tiny_classifier("bert")
    la = fitted(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    p = plan(model, la, 0.5, method=method, prune_seed=3)
    for n, t in model.named_parameters():
        assert torch.equal(t, before[n]), n
    curv = la.diagonal() if method in ("opd", "fisher") else None
    scores = group_scores(model, la.specs, method, prior=la.prior, curvature=curv, seed=3)
    ref = select_groups(model, la.specs, scores, 0.5)
    assert {k: v.tolist() for k, v in p.keep.items()} == {k: v.tolist() for k, v in ref.keep.items()}
    assert p.achieved == ref.achieved >= 0.5
    assert p.scores == {k: v.tolist() for k, v in scores.items()}


def test_json_round_trip_and_apply_equals_masking(tmp_path):
    model = tiny_classifier("bert")
    p = plan(model, fitted(model), 0.6)
    p.save(str(tmp_path / "plan.json"))
    q = PruningPlan.load(str(tmp_path / "plan.json"))
    assert q.to_dict() == p.to_dict()
    masked = mask_groups(copy.deepcopy(model), group_specs(model), q.keep)
    pruned = apply(copy.deepcopy(model), q)
    assert sum(t.numel() for t in pruned.parameters()) < sum(t.numel() for t in model.parameters())
    b = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(pruned(**b).logits, masked(**b).logits, atol=1e-5, rtol=1e-5)


def test_apply_refuses_a_plan_for_other_groups():
    model = tiny_classifier("bert")
    p = plan(model, None, 0.5, method="magnitude")
    apply(model, p)
    with pytest.raises(ValueError, match="made for other groups"):
        apply(model, p)  # the model already lost those groups
    with pytest.raises(ValueError, match="needs a posterior"):
        plan(model, None, 0.5, method="opd")
    with pytest.raises(ValueError, match="method must be one of"):
        plan(model, None, 0.5, method="taylor")
