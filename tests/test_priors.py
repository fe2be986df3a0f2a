"""Prior precisions: structure per kind, MAP penalty, NaN safety, disk round trip."""

import pytest
import torch

from spam_hf.architectures import group_specs
from spam_hf.architectures.base import weight_out_in
from spam_hf.priors import PriorPrecision

from conftest import tiny_classifier


@pytest.mark.parametrize("kind,expected", [("scalar", 1), ("layer", 12), ("unit", 2 * (4 + 48) + 4), ("parameter", None)])
def test_number_of_hyperparameters(bert, kind, expected):
    prior = PriorPrecision(bert, group_specs(bert), kind=kind)
    n = sum(p.numel() for p in prior.parameters())
    if expected is None:
        expected = sum(p.numel() for name, p in bert.named_parameters()
                       if ".encoder.layer." in name and "LayerNorm" not in name)
    assert n == expected


def test_unit_prior_gives_each_group_one_precision(bert):
    specs = group_specs(bert)
    prior = PriorPrecision(bert, specs, kind="unit")
    head = specs[0]
    with torch.no_grad():
        prior.log_delta[f"unit:{head.name}"][:] = torch.tensor([0.0, 1.0, 2.0, 3.0]).double()
    q = next(iter(head.row_index))
    o = next(iter(head.col_index))
    Dq = prior.precision(q).matrix()
    Do = prior.precision(o).matrix()
    for h in range(4):
        rows = head.row_index[q][h]
        assert torch.allclose(Dq[rows], torch.full_like(Dq[rows], float(torch.exp(torch.tensor(float(h))))))
        cols = head.col_index[o][h]
        assert torch.allclose(Do[:, cols], torch.full_like(Do[:, cols], float(torch.exp(torch.tensor(float(h))))))
    # the O bias (last column) belongs to no head: it has its own precision
    assert torch.allclose(Do[:, -1], torch.ones_like(Do[:, -1]))
    assert f"rest:{o}" in prior.log_delta


@pytest.mark.parametrize("family", ["bert", "gpt2"])
@pytest.mark.parametrize("kind", ["unit", "scalar", "layer", "parameter"])
def test_penalty_and_its_gradient_match_the_explicit_sum(family, kind):
    """``(1/2N) Σ δ θ²`` and ``∂/∂θ = δ θ / N`` for every covered weight and bias, against autograd of the sum
    written out over ``[W | b]`` (unit priors vary along rows for Q/K/V/up and along columns for O/down; GPT-2's
    Conv1D stores its weights transposed)."""
    model = tiny_classifier(family)
    specs = group_specs(model)
    prior = PriorPrecision(model, specs, kind=kind, init=0.5)
    torch.manual_seed(0)
    with torch.no_grad():
        for v in prior.parameters():
            v.uniform_(-1, 2)
    N = 37.0
    mods = dict(model.named_modules())
    weights = [p for m in prior.modules for p in (mods[m].weight, mods[m].bias) if p is not None]
    ref = 0.0
    for m in prior.modules:
        w = torch.cat([weight_out_in(mods[m]), mods[m].bias.unsqueeze(1)], 1)
        ref = ref + (prior.precision(m).matrix().detach() * w.double() ** 2).sum()
    ref = ref / (2 * N)
    expected = torch.autograd.grad(ref, weights)
    ours = prior.penalty(model, N)
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=1e-5, atol=0)
    for got, want in zip(torch.autograd.grad(ours, weights), expected):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-9)


def test_penalty_cache_follows_updates(bert):
    prior = PriorPrecision(bert, group_specs(bert), kind="scalar")
    p1 = prior.penalty(bert, 10.0)
    with torch.no_grad():
        prior.log_delta["scalar"].add_(1.0)
    p2 = prior.penalty(bert, 10.0)
    torch.testing.assert_close(p2, p1 * torch.e, rtol=1e-5, atol=0)


def test_extreme_precisions_stay_finite(bert):
    prior = PriorPrecision(bert, group_specs(bert), kind="unit")
    with torch.no_grad():
        for i, v in enumerate(prior.parameters()):
            v.fill_([-1e4, 1e4, float("nan")][i % 3])
    prior.clamp_()
    for v in prior.parameters():
        assert torch.isfinite(v).all()
    for m in prior.modules:
        assert torch.isfinite(prior.precision(m).matrix()).all()
    assert torch.isfinite(prior.penalty(bert, 1.0))


def test_round_trip_to_disk_and_errors(bert, tmp_path):
    specs = group_specs(bert)
    prior = PriorPrecision(bert, specs, kind="unit")
    with torch.no_grad():
        for v in prior.parameters():
            v.normal_()
    path = str(tmp_path / "prior.safetensors")
    prior.save(path)
    other = PriorPrecision(bert, specs, kind="unit")
    other.load(path)
    for k in prior.log_delta:
        assert torch.equal(prior.log_delta[k], other.log_delta[k])
    with pytest.raises(ValueError, match="has no entry"):
        PriorPrecision(bert, specs, kind="layer").load(path)
    with pytest.raises(ValueError, match="prior must be one of scalar, layer, unit, parameter; got 'group'"):
        PriorPrecision(bert, specs, kind="group")
    with pytest.raises(ValueError, match="positive"):
        PriorPrecision(bert, specs, init=0.0)
    bigger = tiny_classifier("bert", intermediate_size=64)
    with pytest.raises(ValueError, match="shape"):
        PriorPrecision(bigger, group_specs(bigger), kind="unit").load(path)
