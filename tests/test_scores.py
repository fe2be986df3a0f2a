"""The score registry: every score declares its statistics and its default, and a new score is one registration."""

import copy

import pytest
import torch

from spam_hf import SpamLaplace
from spam_hf.architectures import group_specs
from spam_hf.pruning import PruningConfig, Score, Statistics, get_score, group_scores, plan, prune, register, \
    score_names
from spam_hf.pruning.scores.base import REGISTRY, STATISTICS

from conftest import BatchList, tiny_batch, tiny_classifier


def test_every_score_declares_statistics_and_rounds():
    from spam_hf.choices import score_names as score_files

    assert score_names() == ("damage", "damage-exact", "damage-obs", "damage-out", "fisher", "flap", "magnitude",
                             "opd", "random", "wanda-sp")
    assert score_names() == score_files()  # each file registers the score it is named after, and only that
    for name in score_names():
        score = get_score(name)
        assert set(score.needs) <= set(STATISTICS) and score.summary, name
        assert score.rounds == name.startswith("damage"), name  # the damage scores prune in rounds by default
        assert score.calibrated == bool({"factors", "mask_fisher", "input_moments"} & set(score.needs)), name
    assert get_score("opd").needs == ("diagonal",) and get_score("damage-obs").needs == ("factors",)
    assert get_score("damage-exact").needs == ("mask_fisher",) and get_score("magnitude").needs == ()
    assert get_score("flap").needs == ("input_moments",) and get_score("flap").compensation == "bias"
    with pytest.raises(ValueError, match="method must be one of damage, damage-exact"):
        get_score("taylor")


def test_a_score_refuses_missing_statistics_by_name():
    model = tiny_classifier("bert")
    specs = group_specs(model)
    for name, message in (("opd", "needs curvature"), ("damage-obs", "needs Kronecker factors"),
                          ("damage-exact", "needs the mask Fisher")):
        with pytest.raises(ValueError, match=message):
            get_score(name)(model, specs, Statistics())


def test_statistics_of_a_posterior_compute_only_what_is_needed(monkeypatch):
    model = tiny_classifier("bert")
    la = SpamLaplace(model, n_data=8)
    calls = []
    monkeypatch.setattr(la, "factors", lambda: calls.append("factors") or {})
    monkeypatch.setattr(la, "diagonal", lambda: calls.append("diagonal") or {})
    stats = Statistics.of(la, ("diagonal",))
    assert calls == ["diagonal"] and stats.factors is None and stats.prior is la.prior
    assert Statistics.of(None, ("factors",)) == Statistics()


def _norm_score(model, specs, statistics, seed):
    """A peer's score in one function: the Frobenius norm of each group's consuming columns."""
    from spam_hf.priors import params_aug

    params = params_aug(model, [m for s in specs for m in s.col_index])
    return {s.name: sum(params[m][:, idx].square().sum(dim=(0, 2)) for m, idx in s.col_index.items()).double()
            for s in specs}


@pytest.fixture
def norm_score():
    score = register(Score("test-col-norm", _norm_score, summary="consuming columns' norm"))
    yield score
    del REGISTRY[score.name]


def test_a_new_score_is_one_registration(norm_score):
    """Registered, a score is a --method choice of the config, of plan and of the engine (rounds included), with
    no other change; a name may be registered once."""
    model = tiny_classifier("bert", num_labels=3)
    specs = group_specs(model)
    expected = _norm_score(model, specs, Statistics(), 0)
    scores = group_scores(model, specs, "test-col-norm")
    assert all(torch.equal(scores[k], expected[k]) for k in expected)
    p = plan(model, None, 0.5, method="test-col-norm")
    assert p.method == "test-col-norm" and p.achieved >= 0.5
    pruned = copy.deepcopy(model)
    result = prune(pruned, None, PruningConfig(sparsity=0.5, method="test-col-norm", rounds=2),
                   BatchList([tiny_batch(batch=8, seed=s) for s in range(2)]))
    assert len(result.plans) == 2 and result.achieved >= 0.5 and result.config.method == "test-col-norm"
    with pytest.raises(ValueError, match="already registered"):
        register(Score("test-col-norm", _norm_score))
    with pytest.raises(ValueError, match="statistics of score"):
        Score("bad", _norm_score, needs=("hessian",))


def test_wanda_sp_is_the_explicit_sum_over_consuming_columns():
    """wanda-sp against a brute-force loop: Σ_i Σ_{j∈C} |W_ij| · √(mean over tokens of x_j²), from the inputs of the
    consuming modules recorded by hooks (bias column: 1); the same through a calibration posterior's factors."""
    model = tiny_classifier("bert", num_labels=3).eval()
    specs = group_specs(model)
    b = tiny_batch(batch=4)
    mods = dict(model.named_modules())
    inputs = _consuming_inputs(model, specs, b)
    la = SpamLaplace(model, reduction="expand", n_data=4)
    la.collect(BatchList([b]), progress=False)
    scores = group_scores(model, specs, "wanda-sp", factors=la.factors())
    for s in specs:
        for g in range(s.count):
            expected = 0.0
            for m, idx in s.col_index.items():
                x = inputs[m]  # non-padding tokens × in
                W = mods[m].weight.detach().double()
                for j in idx[g].tolist():
                    rms = float(x[:, j].square().mean().sqrt()) if j < W.shape[1] else 1.0
                    expected += float(W[:, j].abs().sum()) * rms
            assert float(scores[s.name][g]) == pytest.approx(expected, rel=1e-5), (s.name, g)


def _consuming_inputs(model, specs, batch):
    """The inputs of every consuming module on ``batch``, recorded by hooks (tokens × in)."""
    mods = dict(model.named_modules())
    inputs = {}
    hooks = [mods[m].register_forward_hook(lambda mod, a, o, m=m: inputs.__setitem__(m, a[0].detach()))
             for m in {m for s in specs for m in s.col_index}]
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    mask = batch["attention_mask"].bool()
    return {m: x[mask].double() for m, x in inputs.items()}


def test_flap_is_the_variance_times_column_norm_normalised_per_layer_and_kind():
    """flap against a brute-force loop: Σ_{j∈C} Var_tokens(x_j) · ‖W_:,j‖², divided by the mean over the spec's
    groups (one spec = one layer's heads or neurons), from a calibration posterior with input means."""
    model = tiny_classifier("bert", num_labels=3).eval()
    specs = group_specs(model)
    b = tiny_batch(batch=4)
    x = _consuming_inputs(model, specs, b)
    la = SpamLaplace(model, reduction="expand", n_data=4, input_means=True,
                     curvature_modules=sorted({m for s in specs for m in s.col_index}))
    la.collect(BatchList([b]), progress=False)
    scores = get_score("flap")(model, specs, Statistics.of(la, ("input_moments",)))
    mods = dict(model.named_modules())
    for s in specs:
        raw = torch.zeros(s.count, dtype=torch.float64)
        for g in range(s.count):
            for m, idx in s.col_index.items():
                W = mods[m].weight.detach().double()
                for j in idx[g].tolist():
                    raw[g] += x[m][:, j].var(unbiased=False) * W[:, j].square().sum()
        torch.testing.assert_close(scores[s.name], raw / raw.mean(), rtol=1e-4, atol=1e-8)
    with pytest.raises(ValueError, match="needs input means"):
        get_score("flap")(model, specs, Statistics())
    with pytest.raises(ValueError, match="input_means=True"):
        SpamLaplace(model, n_data=4).input_moments()
