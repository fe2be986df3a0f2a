"""OPD and baseline scores against an explicit per-group sum of θ² (H_ii/T + δ_i)."""

import pytest
import torch

from spam_hf.architectures import group_specs, prunable_modules
from spam_hf.architectures.base import weight_out_in
from spam_hf.curvature import CurvatureAccumulator
from spam_hf.priors import PriorPrecision, params_aug
from spam_hf.pruning import group_damage, group_damage_exact, group_scores

from conftest import tiny_batch, tiny_classifier


def setup(bert):
    specs = group_specs(bert)
    acc = CurvatureAccumulator(bert, prunable_modules(specs), fisher="empirical")
    batch = tiny_batch()
    with acc.capture(bert, batch["attention_mask"]):
        out = bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    acc.accumulate(out.logits, batch["labels"])
    prior = PriorPrecision(bert, specs, kind="unit")
    with torch.no_grad():
        for v in prior.parameters():
            v.uniform_(-1, 3)
    return specs, acc, prior


def explicit(bert, spec, g, diag, prior, T, use_prior=True, use_h=True):
    """Loop over the group's slices element by element."""
    mods = dict(bert.named_modules())
    total = 0.0
    for m, idx in spec.row_index.items():
        W = weight_out_in(mods[m]).detach().double()
        b = mods[m].bias.detach().double()
        D = prior.precision(m).matrix().detach()
        for r in idx[g].tolist():
            for j in range(W.shape[1] + 1):
                theta = W[r, j] if j < W.shape[1] else b[r]
                total += float(theta**2 * ((diag[m][r, j] / T if use_h else 0) + (D[r, j] if use_prior else 0)))
    for m, idx in spec.col_index.items():
        W = weight_out_in(mods[m]).detach().double()
        D = prior.precision(m).matrix().detach()
        for c in idx[g].tolist():
            for i in range(W.shape[0]):
                total += float(W[i, c] ** 2 * ((diag[m][i, c] / T if use_h else 0) + (D[i, c] if use_prior else 0)))
    return total


@pytest.mark.parametrize("method", ["opd", "fisher", "magnitude"])
def test_scores_equal_explicit_sums(bert, method):
    specs, acc, prior = setup(bert)
    diag = acc.diagonal(100.0)
    T = 0.5
    scores = group_scores(bert, specs, method, prior=prior, curvature=diag, temperature=T)
    for spec in (specs[0], specs[1]):
        for g in (0, spec.count - 1):
            if method == "magnitude":
                ones = {m: torch.ones_like(d) for m, d in diag.items()}
                ref = explicit(bert, spec, g, ones, prior, 1.0, use_prior=False)
            else:
                # OPD uses the tempered posterior precision H/T + δ; the Fisher baseline is θ² F (no T, no prior)
                ref = explicit(bert, spec, g, diag, prior, T if method == "opd" else 1.0, use_prior=(method == "opd"))
            assert float(scores[spec.name][g]) == pytest.approx(ref, rel=1e-9)


def test_random_scores_are_seeded_and_bad_input(bert):
    specs = group_specs(bert)
    a = group_scores(bert, specs, "random", seed=1)
    b = group_scores(bert, specs, "random", seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="method must be one of damage, damage-exact, damage-obs, damage-out, fisher, flap, magnitude, opd, random, wanda-sp; got .taylor."):
        group_scores(bert, specs, "taylor")
    with pytest.raises(ValueError, match="needs curvature"):
        group_scores(bert, specs, "opd")


def _random_factors(model, modules, seed=0):
    """SPD ``(A, G)`` per module with the shapes of its augmented weight (float64)."""
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    out = {}
    for m in modules:
        w = mods[m].weight
        k, o = w.shape[1] + int(mods[m].bias is not None), w.shape[0]
        X, Y = torch.randn(k, k + 3, generator=g, dtype=torch.float64), torch.randn(o, o + 3, generator=g, dtype=torch.float64)
        out[m] = (X @ X.T / k, Y @ Y.T / o)
    return out


@pytest.mark.parametrize("consuming_only", [False, True])
def test_group_damage_equals_the_dense_quadratic_form(consuming_only):
    """½ Δθᵀ (G ⊗ A / T) Δθ + ½ Σ δ θ² with Δθ = −θ_g, summed over the group's modules, by dense Kronecker
    products on a tiny BERT (every head and neuron of layer 0), to 1e-9 relative."""
    model = tiny_classifier("bert").double()
    specs = [s for s in group_specs(model) if s.layer == 0]
    modules = prunable_modules(specs)
    factors = _random_factors(model, modules)
    prior = PriorPrecision(model, specs, kind="unit")
    with torch.no_grad():
        for v in prior.log_delta.values():
            v.copy_(torch.randn(v.shape, dtype=torch.float64))
    T = 0.7
    got = group_damage(model, specs, factors, prior=prior, temperature=T, consuming_only=consuming_only)
    params = params_aug(model, modules)
    for s in specs:
        for g in range(s.count):
            expected = 0.0
            slices = [] if consuming_only else [(m, idx[g], "rows") for m, idx in s.row_index.items()]
            slices += [(m, idx[g], "cols") for m, idx in s.col_index.items()]
            for m, idx, where in slices:
                A, G = factors[m]
                W = params[m]
                delta = torch.zeros_like(W)
                if where == "rows":
                    delta[idx] = -W[idx]
                else:
                    delta[:, idx] = -W[:, idx]
                d = delta.reshape(-1)  # row-major vec: H = G ⊗ A
                with torch.no_grad():
                    prec = prior.precision(m).matrix().reshape(-1)
                expected += 0.5 * float(d @ torch.kron(G, A) @ d) / T + 0.5 * float((prec * d.square()).sum())
            assert float(got[s.name][g]) == pytest.approx(expected, rel=1e-9), (s.name, g)


def test_damage_through_plan_needs_live_factors():
    from spam_hf import SpamLaplace, plan

    model = tiny_classifier("bert")
    la = SpamLaplace(model, n_data=20)
    with pytest.raises(RuntimeError, match="no live curvature"):
        plan(model, la, 0.5, method="damage")
    b = tiny_batch()
    with la.capture(model, b["attention_mask"]):
        out = model(**b)
    la.accumulate(out.logits, b["labels"])
    p = plan(model, la, 0.5, method="damage")
    assert p.achieved >= 0.5 and p.method == "damage"


def test_damage_exact_is_the_per_example_fisher_of_the_group():
    """``damage-exact`` = ½ Σ_n (θ_Cᵀ ∇ℓ_n)² / T over a group's consuming columns (plus the prior), with the
    per-example gradients taken one example at a time by autograd (empirical Fisher: true labels)."""
    from spam_hf import SpamLaplace

    model = tiny_classifier("bert").double()
    batch = tiny_batch(batch=3)
    la = SpamLaplace(model, fisher="empirical", mask_fisher=True, n_data=3)
    with la.capture(model, batch["attention_mask"]):
        out = model(**batch)
    la.accumulate(out.logits, batch["labels"])
    T = 0.5
    got = group_damage_exact(model, la.specs, la.group_fisher(), prior=la.prior, temperature=T)
    for s in la.specs[:2]:  # layer 0: heads (columns of O), neurons (columns of down)
        (m, idx), = s.col_index.items()
        W = model.get_submodule(m).weight
        per_example = []
        for n in range(3):
            model.zero_grad()
            one = {k: v[n:n + 1] for k, v in batch.items()}
            logits = model(input_ids=one["input_ids"], attention_mask=one["attention_mask"]).logits
            torch.nn.functional.cross_entropy(logits, one["labels"], reduction="sum").backward()
            per_example.append((W.detach() * W.grad)[:, idx].sum(dim=(0, 2)))  # θ_Cᵀ ∇ℓ_n per group
        fisher = torch.stack(per_example).square().sum(0)
        with torch.no_grad():
            w2 = W.detach().square() * la.prior.precision(m).matrix()[:, :-1]
        expected = 0.5 * fisher / T + 0.5 * w2[:, idx].sum(dim=(0, 2))
        torch.testing.assert_close(got[s.name], expected, rtol=1e-8, atol=1e-12)


def test_damage_obs_is_the_minimum_of_the_quadratic_over_the_remaining_columns():
    """``damage-obs``: with ``Δθ_C = −θ_C`` on a group's consuming columns and every other entry of the consuming
    module free, ``min ½ Δθᵀ (G ⊗ Ā / T) Δθ`` (``Ā = A + λI``), by the dense conditional (Schur complement of the free
    block of the dense Kronecker product), plus ``½ Σ δ θ²`` over the removed columns; every head and neuron of
    layer 0 of a tiny BERT, to 1e-8 relative."""
    from spam_hf.pruning.damage import LEAST_SQUARES_DAMPING

    model = tiny_classifier("bert").double()
    specs = [s for s in group_specs(model) if s.layer == 0]
    factors = _random_factors(model, prunable_modules(specs), seed=3)
    prior = PriorPrecision(model, specs, kind="unit")
    T = 0.7
    got = group_damage(model, specs, factors, prior=prior, temperature=T, compensated=True)
    params = params_aug(model, prunable_modules(specs))
    for s in specs:
        (m, idx), = s.col_index.items()
        A, G = factors[m]
        W = params[m]
        A_bar = A + LEAST_SQUARES_DAMPING * float(A.diagonal().mean()) * torch.eye(A.shape[0], dtype=A.dtype)
        H = torch.kron(G, A_bar) / T  # row-major vec(ΔW)
        with torch.no_grad():
            prec = prior.precision(m).matrix()
        for g in range(s.count):
            fixed = torch.zeros_like(W, dtype=torch.bool)
            fixed[:, idx[g]] = True
            f, r = fixed.reshape(-1), ~fixed.reshape(-1)
            d = -W.reshape(-1)[f]
            schur = H[f][:, f] - H[f][:, r] @ torch.linalg.solve(H[r][:, r], H[r][:, f])
            expected = 0.5 * float(d @ schur @ d) + 0.5 * float((prec * W.square())[:, idx[g]].sum())
            assert float(got[s.name][g]) == pytest.approx(expected, rel=1e-8), (s.name, g)


def test_damage_obs_is_the_damage_left_after_least_squares_compensation():
    """Removing one group's columns and refitting the rest by :func:`conditional_mean` (the compensation's update,
    damping ``λ`` over the whole input factor) leaves ``½ tr(G ΔW Ā ΔWᵀ)`` = the ``damage-obs`` score, and no other
    update of the remaining columns leaves less (a random perturbation of the refit only adds damage)."""
    from spam_hf.pruning.compensation import conditional_mean
    from spam_hf.pruning.damage import LEAST_SQUARES_DAMPING

    model = tiny_classifier("bert").double()
    specs = [s for s in group_specs(model) if s.layer == 0 and s.kind == "head"]
    factors = _random_factors(model, prunable_modules(specs), seed=5)
    got = group_damage(model, specs, factors, compensated=True)
    s = specs[0]
    (m, idx), = s.col_index.items()
    A, G = factors[m]
    W = params_aug(model, [m])[m]
    lam = LEAST_SQUARES_DAMPING * float(A.diagonal().mean())
    A_bar = A + lam * torch.eye(A.shape[0], dtype=A.dtype)
    noise = torch.Generator().manual_seed(0)
    for g in range(s.count):
        dW = conditional_mean(W, A, idx[g], damping=lam) - W
        left = 0.5 * float(torch.trace(G @ dW @ A_bar @ dW.T))
        assert float(got[s.name][g]) == pytest.approx(left, rel=1e-8)
        other = dW + 1e-3 * torch.randn(W.shape, generator=noise, dtype=W.dtype)
        other[:, idx[g]] = -W[:, idx[g]]
        assert 0.5 * float(torch.trace(G @ other @ A_bar @ other.T)) > left
        uncompensated = torch.zeros_like(W)
        uncompensated[:, idx[g]] = -W[:, idx[g]]
        assert 0.5 * float(torch.trace(G @ uncompensated @ A_bar @ uncompensated.T)) > left
