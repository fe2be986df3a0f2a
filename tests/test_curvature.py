"""KFAC / diagonal curvature from hooks against dense Gauss-Newton matrices computed with torch.func."""

import pytest
import torch
from torch import nn

from spam_hf.architectures import group_specs, prunable_modules
from spam_hf.curvature import CurvatureAccumulator, sampled_loss

from conftest import dense_ggn_block, expected_kfac, tiny_batch, tiny_classifier


def tiny_mlp(d_in=4, d_hidden=5, n_classes=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.Tanh(), nn.Linear(d_hidden, n_classes)).double()


@pytest.mark.parametrize("layer", ["0", "2"])
def test_kfac_equals_exact_ggn_for_one_example(layer):
    model = tiny_mlp()
    x = torch.randn(1, 4, dtype=torch.float64)
    torch.testing.assert_close(expected_kfac(model, layer, x), dense_ggn_block(model, layer, x), atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_mc_fisher_approaches_exact_ggn():
    """Averaged over 4000 label draws, the MC Fisher's diagonal and KFAC match the dense GGN (one example: KFAC exact)."""
    model = tiny_mlp()
    x = torch.randn(6, 4, dtype=torch.float64)
    dense = dense_ggn_block(model, "0", x)
    diag = CurvatureAccumulator(model, ["0"], kind="diag", fisher="mc", seed=1)
    for _ in range(4000):
        with diag.capture(model):
            out = model(x)
        diag.accumulate(out)
    D = diag.diagonal(n_data=6)["0"]
    rel = (D.reshape(-1) - dense.diagonal()).norm() / dense.diagonal().norm()
    print(f"MC diag vs exact GGN diag, 4000 samples: relative error {rel:.4f}")
    assert rel < 0.05
    x1 = x[:1]
    kfac = CurvatureAccumulator(model, ["0"], kind="kfac", fisher="mc", seed=2)
    for _ in range(4000):
        with kfac.capture(model):
            out = model(x1)
        kfac.accumulate(out)
    dense1 = dense_ggn_block(model, "0", x1)
    rel = (kfac.kron(n_data=1, keep_vectors=True)["0"].dense() - dense1).norm() / dense1.norm()
    print(f"MC KFAC vs exact GGN block, one example, 4000 samples: relative error {rel:.4f}")
    assert rel < 0.05


def _accumulate(model, batch, **kw):
    names = prunable_modules(group_specs(model))
    acc = CurvatureAccumulator(model, names, fisher="empirical", **kw)
    with acc.capture(model, batch["attention_mask"]):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    acc.accumulate(out.logits, batch["labels"])
    return acc


@pytest.mark.parametrize("reduction", ["reduce", "expand"])
@pytest.mark.parametrize("kind", ["kfac", "diag"])
def test_padding_positions_change_nothing(reduction, kind):
    """A padded batch gives the same sums as its sequences run one by one without padding."""
    model = tiny_classifier("bert")
    batch = tiny_batch(batch=3, seq=10, pad_last=4)
    padded = _accumulate(model, batch, kind=kind, reduction=reduction)
    lengths = batch["attention_mask"].sum(1).tolist()
    singles = None
    for i, L in enumerate(lengths):
        one = {k: v[i:i + 1, :L] if v.dim() == 2 else v[i:i + 1] for k, v in batch.items()}
        acc = _accumulate(model, one, kind=kind, reduction=reduction)
        if singles is None:
            singles = acc
        else:
            for m in acc.sums:
                for k in acc.sums[m]:
                    singles.sums[m][k] += acc.sums[m][k]
            singles.n += acc.n
    assert float(padded.n) == float(singles.n) == (sum(lengths) if reduction == "expand" else 3)
    for m in padded.sums:
        for k in padded.sums[m]:
            torch.testing.assert_close(padded.sums[m][k], singles.sums[m][k], atol=1e-4, rtol=1e-4)
    # and without the mask the pads would have counted
    unmasked = CurvatureAccumulator(model, list(padded.sums), fisher="empirical", kind=kind, reduction=reduction)
    with unmasked.capture(model, None):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    unmasked.accumulate(out.logits, batch["labels"])
    first = next(iter(padded.sums))
    key = "A" if kind == "kfac" else "D"
    u, p = unmasked.sums[first][key] / unmasked.n, padded.sums[first][key] / padded.n
    assert (u - p).norm() / p.norm() > 1e-2


def test_every_prunable_weight_gets_curvature_and_state_round_trips(tmp_path):
    model = tiny_classifier("bert")
    model.train()
    batch = tiny_batch()
    acc = _accumulate(model, batch, kind="kfac")
    for m, s in acc.sums.items():
        assert s["A"].abs().sum() > 0 and s["G"].abs().sum() > 0, m
    state = acc.state_dict()
    other = CurvatureAccumulator(model, acc.module_names)
    other.load_state_dict(state)
    assert all(torch.equal(other.sums[m]["A"], acc.sums[m]["A"]) for m in acc.sums)
    bad = dict(state)
    first = next(iter(acc.sums))
    bad[f"{first}.A"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="has shape"):
        other.load_state_dict(bad)
    with pytest.raises(ValueError, match="has no factor"):
        other.load_state_dict({"n": state["n"]})
    other.reset()
    assert float(other.n) == 0


@pytest.mark.slow
def test_row_subsampling_is_unbiased_estimate():
    model = tiny_classifier("bert")
    batch = tiny_batch(batch=4, seq=12, pad_last=0)
    full = _accumulate(model, batch, kind="kfac", reduction="expand")
    sub = _accumulate(model, batch, kind="kfac", reduction="expand", max_rows_per_batch=24)
    assert float(sub.n) == 24 and float(full.n) == 48
    m = next(iter(full.sums))
    rel = (sub.sums[m]["A"] / 24 - full.sums[m]["A"] / 48).norm() / (full.sums[m]["A"] / 48).norm()
    assert rel < 0.5


def test_bad_inputs_are_clear_errors():
    model = tiny_classifier("bert")
    with pytest.raises(ValueError, match="not in the model"):
        CurvatureAccumulator(model, ["bert.encoder.layer.9.intermediate.dense"])
    with pytest.raises(ValueError, match="unsupported layer type"):
        CurvatureAccumulator(model, ["bert.embeddings.word_embeddings"])
    with pytest.raises(ValueError, match="curvature must be one of kfac, diag; got .full."):
        CurvatureAccumulator(model, ["classifier"], kind="full")
    with pytest.raises(ValueError, match="no modules"):
        CurvatureAccumulator(model, [])
    acc = CurvatureAccumulator(model, ["classifier"])
    with pytest.raises(RuntimeError, match="no forward captured"):
        acc.accumulate(torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="no curvature"):
        acc.kron(10)


def test_sampled_loss_causal_lm_ignores_masked_labels():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5))
    labels[1, 3:] = -100
    loss = sampled_loss(logits, labels, "causal_lm", "empirical")
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), reduction="sum",
                                            ignore_index=-100)
    torch.testing.assert_close(loss, ref)


def test_gradient_weighted_reduce_is_exact_when_one_token_carries_the_gradient():
    """'reduce-gw' averages inputs with weights ∝ ‖g_t‖: when only one position has a gradient (the
    [CLS] row of a last layer), ĝ âᵀ equals the exact Σ_t g_t a_tᵀ, where plain 'reduce' uses the token mean."""
    torch.manual_seed(0)
    lin = nn.Linear(5, 3).double()
    x = torch.randn(1, 4, 5, dtype=torch.float64)  # one sequence (KFAC is exact per example), one pad
    mask = torch.ones(1, 4)
    mask[0, 3] = 0

    class OnlyFirstToken(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(x)[:, 0]  # logits from the first position only

    model = OnlyFirstToken()
    res = {}
    for red in ("reduce", "reduce-gw"):
        acc = CurvatureAccumulator(model, ["lin"], fisher="empirical", reduction=red)
        with acc.capture(model, mask):
            out = model(x)
        acc.accumulate(out, torch.tensor([2]))
        res[red] = acc.kron(n_data=1, keep_vectors=True)["lin"].dense()
    loss = nn.functional.cross_entropy(model(x), torch.tensor([2]), reduction="sum")
    gw, gb = torch.autograd.grad(loss, [lin.weight, lin.bias])
    grad = torch.cat([gw, gb.unsqueeze(1)], 1).reshape(-1)
    exact = torch.outer(grad, grad)
    torch.testing.assert_close(res["reduce-gw"], exact, rtol=1e-6, atol=1e-9)
    assert (res["reduce"] - exact).norm() / exact.norm() > 0.1


def test_expanded_sequence_loss_extrapolates_per_example():
    """A sequence-level loss expanded into token rows: ``G`` is extrapolated by examples, not by tokens
    (``N / B`` for a batch of ``B`` examples; with row subsampling, times rows seen / rows kept), so
    ``tr(G ⊗ A)`` stays the size of the exact per-example empirical Fisher's trace (old code: ~T× too small)."""
    model = tiny_classifier("bert").double()
    batch = tiny_batch(batch=4, seq=12, pad_last=0)
    full = _accumulate(model, batch, kind="kfac", reduction="expand")
    sub = _accumulate(model, batch, kind="kfac", reduction="expand", max_rows_per_batch=24)
    N = 100.0
    m = next(iter(full.sums))
    def rel(a, b):
        return float((a - b).norm() / b.norm())

    kron = full.kron(N, keep_vectors=True)[m].dense()
    assert rel(kron, torch.kron(full.sums[m]["G"] * N / 4, full.sums[m]["A"] / 48)) < 1e-6
    assert rel(sub.kron(N, keep_vectors=True)[m].dense(),
               torch.kron(sub.sums[m]["G"] * N / 4 * 48 / 24, sub.sums[m]["A"] / 24)) < 1e-6
    diag = CurvatureAccumulator(model, full.module_names, kind="diag", fisher="empirical", reduction="expand")
    with diag.capture(model, batch["attention_mask"]):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    diag.accumulate(out.logits, batch["labels"])
    assert rel(diag.diagonal(N)[m], diag.sums[m]["D"].double() * N / 4) < 1e-6
    # brute force: per-example gradients of the true loss, Σ_n ‖∂ℓ_n/∂W‖² · N / B
    w = dict(model.named_modules())[m]
    exact = 0.0
    for i in range(4):
        model.zero_grad()
        out = model(input_ids=batch["input_ids"][i:i + 1], attention_mask=batch["attention_mask"][i:i + 1])
        torch.nn.functional.cross_entropy(out.logits, batch["labels"][i:i + 1]).backward()
        exact += float(w.weight.grad.square().sum() + w.bias.grad.square().sum())
    exact *= N / 4
    kfac_trace = float(kron.trace())
    print(f"{m}: tr(G⊗A) {kfac_trace:.4g}, exact empirical Fisher trace {exact:.4g}")
    assert exact / 4 < kfac_trace < exact * 4


def test_factors_are_allocated_by_the_first_rows_and_output_factors_alone():
    """An accumulator that never sees a batch holds no factor memory (a Trainer that only prunes a large model),
    and its empty state round-trips; ``sides=("G",)`` keeps only the out × out factors, equal to the full ones."""
    model = tiny_classifier("bert")
    modules = prunable_modules(group_specs(model))
    acc = CurvatureAccumulator(model, modules, fisher="empirical")
    assert len(acc.sums) == 0
    empty = CurvatureAccumulator(model, modules, fisher="empirical")
    empty.load_state_dict(acc.state_dict())
    assert len(empty.sums) == 0
    g_only = CurvatureAccumulator(model, modules, fisher="empirical", sides=("G",))
    b = tiny_batch()
    for a in (acc, g_only):
        with a.capture(model, b["attention_mask"]):
            out = model(**b)
        a.accumulate(out.logits, b["labels"])
    assert set(acc.sums) == set(modules) and all(set(s) == {"G"} for s in g_only.sums.values())
    for m in modules:
        torch.testing.assert_close(g_only.sums[m]["G"], acc.sums[m]["G"])
    with pytest.raises(ValueError, match="sides"):
        CurvatureAccumulator(model, modules, sides=("B",))


def test_wide_factors_keep_exactly_their_diagonal():
    """``diagonal_from=48`` (the tiny BERT's MLP width): the intermediate's input factor (output dense) and output
    factor (intermediate dense) become vectors equal to the whole factors' diagonals, the narrower ones stay whole,
    the state round-trips, ``kron`` and the diagonal of H are unchanged where defined, and whole factors are refused."""
    model = tiny_classifier("bert")
    modules = prunable_modules(group_specs(model))
    whole = _accumulate(model, tiny_batch(), kind="kfac", seed=3)
    wide = _accumulate(model, tiny_batch(), kind="kfac", seed=3, diagonal_from=48)
    assert whole.whole_factors and not wide.whole_factors
    n_vectors = 0
    for m in modules:
        for k in ("A", "G"):
            full, kept = whole.sums[m][k], wide.sums[m][k]
            if full.shape[0] >= 48:
                assert kept.dim() == 1
                torch.testing.assert_close(kept, full.diagonal(), rtol=1e-5, atol=1e-6)
                n_vectors += 1
            else:
                torch.testing.assert_close(kept, full)
    assert n_vectors == 4  # per layer: intermediate's G (48) and output's A (48 + bias)
    for m, d in wide.diagonal(n_data=100).items():
        torch.testing.assert_close(d, whole.diagonal(n_data=100)[m], rtol=1e-5, atol=1e-8)
    eig = wide.kron(n_data=100)
    m = next(m for m in modules if m.endswith("output.dense") and "attention" not in m)
    assert eig[m]._QA2 is None and eig[m].a.shape == (49,)
    other = CurvatureAccumulator(model, modules, diagonal_from=48)
    other.load_state_dict(wide.state_dict())
    assert all(torch.equal(other.sums[m][k], wide.sums[m][k]) for m in modules for k in ("A", "G"))
    with pytest.raises(ValueError, match="has shape"):
        CurvatureAccumulator(model, modules).load_state_dict(wide.state_dict())
    with pytest.raises(ValueError, match="diagonal_from"):
        CurvatureAccumulator(model, modules, diagonal_from=0)
