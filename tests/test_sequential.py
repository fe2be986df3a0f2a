"""Block-sequential pruning: the all-at-once choice on dense statistics, compensation on each block's inputs."""

import copy

import pytest
import torch

from spam_hf import SpamLaplace
from spam_hf.architectures import group_specs
from spam_hf.pruning import PruningConfig, plan, prune, prune_groups
from spam_hf.pruning.sequential import prune_sequential

from conftest import BatchList, tiny_batch, tiny_causal_lm, tiny_classifier, tiny_lm_batch


#: blocks of two kinds: a 4-token sliding window under 12-token batches (Gemma 3: its own rotary base too)
MIXED = dict(num_hidden_layers=4, sliding_window=4,
             layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])


def _model_and_batches(kind, n=3, batch=None):
    if kind in ("bert", "modernbert"):
        return tiny_classifier(kind, num_labels=3), BatchList([tiny_batch(batch=batch or 8, seed=s)
                                                               for s in range(n)])
    model = tiny_causal_lm(kind, **(MIXED if kind.startswith("gemma") else {}))
    return model, BatchList([tiny_lm_batch(batch=batch or 3, seed=s) for s in range(n)])


def _held_out(kind):
    return tiny_batch(batch=8, seed=11) if kind == "bert" else tiny_lm_batch(seed=11)


def _keep(keep):
    return {k: torch.as_tensor(v).tolist() for k, v in keep.items()}


@pytest.mark.parametrize("kind,kv_groups_only", [("bert", False), ("gpt2", False), ("llama", False),
                                                 ("llama", True), ("gemma2", False), ("gemma3_text", False),
                                                 ("modernbert", False)])
def test_dense_statistics_give_the_all_at_once_selection(kind, kv_groups_only):
    """Without re-scoring, the block-sequential choice is the one-shot damage-obs plan on the dense model's
    calibration statistics (KFAC factors of every module at once, collected by SpamLaplace): the same groups.
    Gemma's and ModernBERT's sliding and full blocks each get their own mask (and Gemma 3 and ModernBERT their
    own rotary embedding)."""
    model, batches = _model_and_batches(kind)
    model = model.double()  # both paths in float64: the same numbers, so the same choice even at near-ties
    rows = float(sum(len(b["input_ids"]) for b in batches))
    la = SpamLaplace(copy.deepcopy(model), reduction="expand", n_data=rows, kv_groups_only=kv_groups_only)
    la.collect(batches, progress=False)
    reference = plan(la.model, la, 0.5, method="damage-obs")
    config = PruningConfig(sparsity=0.5, method="damage-obs", compensate=False, sequential=True).resolved(False)
    result = prune_sequential(model, None, config, batches, rescore=False, kv_groups_only=kv_groups_only)
    assert _keep(result.plans[0].keep) == _keep(reference.keep)
    assert _keep(result.selection.keep) == _keep(reference.keep)
    for name, scores in reference.scores.items():
        torch.testing.assert_close(torch.tensor(result.plans[0].scores[name]), torch.tensor(scores), rtol=1e-4,
                                   atol=1e-9)
    assert result.achieved == pytest.approx(reference.achieved)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_compensation_on_block_inputs_keeps_logits_closer_than_cutting(kind):
    """The same groups cut with and without the least-squares refit on each block's (compressed-prefix) inputs: the
    compensated model's logits are closer to the dense model's on held-out inputs (calibration rows many times
    the widest refitted input, as a least-squares fit needs)."""
    dense, batches = _model_and_batches(kind, n=8, batch=16)
    compensated = copy.deepcopy(dense)
    config = PruningConfig(sparsity=0.5, sequential=True, calibration_batches=8).resolved(False)
    assert config.method == "damage-obs" and config.compensate and config.rounds == 1
    result = prune_sequential(compensated, None, config, batches)
    assert result.achieved >= 0.5 and result.compensated and result.compensated[0]
    cut = prune_groups(copy.deepcopy(dense), result.selection.keep)
    b = _held_out(kind)
    with torch.no_grad():
        ref, comp, plain = (m.eval()(**b).logits for m in (dense, compensated, cut))
    assert (comp - ref).norm() < (plain - ref).norm()


def test_through_the_engine_with_a_posterior_and_refusals():
    model, batches = _model_and_batches("llama")
    la = SpamLaplace(model, n_data=100, temperature=0.5)
    result = prune(model, la, PruningConfig(sparsity=0.4, sequential=True, calibration_batches=2), batches)
    assert result.config.sequential and result.achieved >= 0.4
    specs = {s.name: s.count for s in group_specs(model)}
    assert all(specs[k] == len(v) for k, v in result.selection.keep.items() if k in specs)
    with torch.no_grad():
        assert torch.isfinite(model(**tiny_lm_batch(seed=4)).logits).all()
    fresh, _ = _model_and_batches("llama")
    for config, message in ((PruningConfig(method="damage-exact", sequential=True), "needs every module"),
                            (PruningConfig(method="damage", sequential=True), "needs every module"),
                            (PruningConfig(compensation="reference", sequential=True), "least squares"),
                            (PruningConfig(method="opd", sequential=True), "needs a posterior")):
        with pytest.raises(ValueError, match=message):
            prune(fresh, None, config, batches)
    with pytest.raises(ValueError, match="needs calibration batches"):
        prune(fresh, None, PruningConfig(sequential=True))


def test_float32_statistics_score_like_float64():
    """The block-by-block path computes in the model's float32 on its device (float64 only for float64 models):
    its scores match the float64 ones to 1e-4 relative, so float32 costs nothing a choice can see here."""
    model, batches = _model_and_batches("llama")
    config = PruningConfig(sparsity=0.5, compensate=False, sequential=True).resolved(False)
    single = prune_sequential(copy.deepcopy(model), None, config, batches, rescore=False).plans[0]
    double = prune_sequential(model.double(), None, config, batches, rescore=False).plans[0]
    for name, scores in double.scores.items():
        torch.testing.assert_close(torch.tensor(single.scores[name]), torch.tensor(scores), rtol=1e-4, atol=1e-8)


def test_a_bfloat16_model_stays_bfloat16():
    """The model keeps its dtype: statistics, scores and refits run in float32 beside it, the weights are written
    back in bfloat16, and the pruned model still computes finite logits."""
    model, batches = _model_and_batches("llama", n=4, batch=8)
    model = model.to(torch.bfloat16)
    result = prune(model, None, PruningConfig(sparsity=0.5, sequential=True, calibration_batches=4), batches)
    assert result.achieved >= 0.5 and all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(model(**tiny_lm_batch(seed=9)).logits.float()).all()
