"""Compensation toward the unpruned model (``reference``) against an explicit stacked least-squares solve."""

import copy

import pytest
import torch

from spam_hf import SpamLaplace, apply, plan
from spam_hf.architectures import group_specs
from spam_hf.architectures.base import weight_out_in
from spam_hf.pruning import compensate, geometric_targets, prune_in_rounds, refit_to_reference

from conftest import random_keep, tiny_batch, tiny_classifier

BATCHES = [tiny_batch(batch=8, seq=12, seed=s, pad_last=4) for s in range(6)]


def _logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _rows(model, name, output: bool):
    """Explicitly: the inputs (``output=False``) or outputs of module ``name`` at real tokens over ``BATCHES``."""
    mod = dict(model.named_modules())[name]
    got = []

    def hook(m, args, out):
        t = out if output else args[0]
        got.append(t[mask].double())

    h = mod.register_forward_hook(hook)
    try:
        for b in BATCHES:
            mask = b["attention_mask"].bool()
            _logits(model, b)
    finally:
        h.remove()
    return torch.cat(got)


def _weights(module):
    w = weight_out_in(module).detach().double()
    return torch.cat([w, module.bias.detach().double().unsqueeze(1)], 1) if module.bias is not None else w


@pytest.mark.parametrize("model_type", ["bert", "gpt2"])
def test_every_layer_is_the_damped_least_squares_fit_to_the_reference_outputs(model_type):
    """After ``refit_to_reference`` every consuming layer equals ``argmin ‖X_R Wᵀ − Y⁰‖² + λ‖W − W_R‖²`` solved
    as one stacked ``lstsq``, with ``X`` its inputs in the *refitted* model (the layers below already refitted:
    the fit is sequential), ``Y⁰`` the reference's outputs at the same real tokens, and its removed columns zero."""
    reference = tiny_classifier(model_type, seed=1, pad_token_id=0)
    model = copy.deepcopy(reference)
    specs = group_specs(model)
    keep = random_keep(specs, seed=3)
    mods = dict(model.named_modules())
    before = {m: _weights(mods[m]) for s in specs for m in s.col_index}
    done = refit_to_reference(model, reference, specs, keep, BATCHES)
    assert done and list(done) == [n for n, _ in model.named_modules() if n in done]  # forward order
    removed = {}
    for s in specs:
        dropped = [g for g in range(s.count) if g not in set(keep[s.name].tolist())]
        for m, idx in s.col_index.items():
            removed.setdefault(m, []).extend(idx[dropped].reshape(-1).tolist() if dropped else [])
    for m, cols in removed.items():
        X, Y = _rows(model, m, output=False), _rows(reference, m, output=True)
        W0, module = before[m], dict(model.named_modules())[m]
        if module.bias is not None:
            X = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], 1)
        R = torch.tensor([c for c in range(X.shape[1]) if c not in set(cols)])
        lam = 0.01 * float((X[:, R] ** 2).sum(0).mean())
        lhs = torch.cat([X[:, R], lam ** 0.5 * torch.eye(len(R), dtype=X.dtype)])
        rhs = torch.cat([Y, lam ** 0.5 * W0[:, R].T])
        expected = torch.zeros_like(W0)
        expected[:, R] = torch.linalg.lstsq(lhs, rhs).solution.T
        assert done[m] == len(set(cols))
        torch.testing.assert_close(_weights(module), expected, rtol=1e-4, atol=1e-5)


def test_nothing_removed_and_nothing_changed_leaves_the_model_as_it_was():
    """With the reference's own weights and inputs, ``y⁰ = W x``: the damped fit returns ``W`` itself."""
    reference = tiny_classifier("bert", seed=2)
    model = copy.deepcopy(reference)
    specs = group_specs(model)
    done = refit_to_reference(model, reference, specs, {s.name: torch.arange(s.count) for s in specs}, BATCHES)
    assert done and set(done.values()) == {0}
    x = tiny_batch(batch=4, seed=11)
    torch.testing.assert_close(_logits(model, x), _logits(reference, x), rtol=1e-4, atol=1e-5)


def test_refit_brings_the_pruned_logits_closer_to_the_reference():
    reference = tiny_classifier("bert", seed=4)
    specs = group_specs(reference)
    keep = random_keep(specs, seed=5)
    plain, refitted = copy.deepcopy(reference), copy.deepcopy(reference)
    refit_to_reference(refitted, reference, specs, keep, BATCHES)
    from spam_hf.pruning import prune_groups

    prune_groups(plain, keep)
    prune_groups(refitted, keep)
    x = tiny_batch(batch=16, seed=9)
    ref = _logits(reference, x)
    assert (_logits(refitted, x) - ref).square().mean() < 0.5 * (_logits(plain, x) - ref).square().mean()


def test_rounds_with_reference_compensation():
    """``prune_in_rounds(..., compensation="reference")`` keeps a frozen copy of the model it was given, and
    its pruned logits are closer to that model's than pruning the same way without compensation."""
    dense = tiny_classifier("bert", seed=6)

    class Loader(list):
        dataset = range(48)

    def make(m):
        return SpamLaplace(m, reduction="expand", n_data=48, mask_fisher=True)

    results = {}
    for comp in (False, True):
        model = copy.deepcopy(dense)
        res = prune_in_rounds(model, make, Loader(BATCHES), geometric_targets(0.5, 2), method="damage-exact",
                              compensate=comp, compensation="reference")
        assert res.achieved >= 0.5
        if comp:
            assert len(res.compensated) == len(res.plans) and all(res.compensated)
        x = tiny_batch(batch=16, seed=9)
        results[comp] = (_logits(model, x) - _logits(dense, x)).square().mean()
    assert results[True] < results[False]


def test_factor_compensation_refuses_reference():
    model = tiny_classifier("bert")
    la = SpamLaplace(model, reduction="expand", n_data=8)
    with pytest.raises(ValueError, match="refit_to_reference"):
        compensate(model, la.specs, {}, {}, kind="reference")
    with pytest.raises(ValueError, match="compensation"):
        prune_in_rounds(model, lambda m: la, [], [0.5], compensation="nope")
    p = plan(model, None, 0.3, method="magnitude")
    apply(model, p)  # the model still prunes normally afterwards


def test_lora_ranks_refit_lora_b_to_the_unpruned_adapter():
    """On a peft adapter the consuming modules are the ``lora_B`` Linears: their remaining columns are refitted to
    the unpruned adapter's ``B·A x`` and the pruned logits move closer to the unpruned model's."""
    from test_lora import lora_bert

    model = lora_bert()
    specs = group_specs(model)
    keep = random_keep(specs, seed=2)
    refitted, plain = copy.deepcopy(model), copy.deepcopy(model)
    done = refit_to_reference(refitted, model, specs, keep, BATCHES)
    assert done and all(".lora_B." in m for m in done)
    from spam_hf.pruning import prune_groups

    prune_groups(plain, keep)
    prune_groups(refitted, keep)
    x = tiny_batch(batch=16, seed=9)
    ref = _logits(model, x)
    assert (_logits(refitted, x) - ref).square().mean() < (_logits(plain, x) - ref).square().mean()


def test_reference_compensation_is_refused_data_parallel(monkeypatch):
    import spam_hf.pruning.rounds as rounds

    monkeypatch.setattr(rounds, "is_distributed", lambda: True)
    model = tiny_classifier("bert")
    with pytest.raises(ValueError, match="one process"):
        prune_in_rounds(model, lambda m: None, [], [0.5], compensate=True, compensation="reference")
