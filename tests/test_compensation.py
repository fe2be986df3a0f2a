"""Compensation against the dense conditional Gaussian mean, and its least-squares effect on a real layer."""

import copy

import pytest
import torch

from spam_hf import SpamLaplace, apply, plan
from spam_hf.priors import PriorPrecision
from spam_hf.pruning import compensate, conditional_mean, kron_conditional_mean

from conftest import tiny_batch, tiny_classifier


def _dense_conditional(W, P, removed):
    out, k = W.shape
    is_removed = torch.zeros(out, k, dtype=torch.bool)
    is_removed[:, removed] = True
    S, R = is_removed.reshape(-1).nonzero().squeeze(1), (~is_removed).reshape(-1).nonzero().squeeze(1)
    mu = W.reshape(-1)
    expected = mu.clone()
    expected[R] = mu[R] + torch.linalg.solve(P[R][:, R], P[R][:, S] @ mu[S])
    expected[S] = 0
    return expected.reshape(out, k)


def test_conditional_mean_equals_the_dense_gaussian_conditional():
    """With ``G = g·I`` and a uniform prior δ, ``G ⊗ A / T + δ I`` is what the damping λ = Tδ/g encodes: the
    compensated weights equal ``μ_R + P_RR⁻¹ P_RS μ_S`` (the mean given θ_S = 0) computed densely."""
    g = torch.Generator().manual_seed(0)
    out, k, T, gval, delta = 3, 6, 0.5, 2.0, 0.3
    W = torch.randn(out, k, generator=g, dtype=torch.float64)
    X = torch.randn(k, 20, generator=g, dtype=torch.float64)
    A = X @ X.T / 20
    removed = torch.tensor([1, 4])
    got = conditional_mean(W, A, removed, damping=T * delta / gval)
    P = torch.kron(gval * torch.eye(out, dtype=torch.float64), A) / T + delta * torch.eye(out * k, dtype=torch.float64)
    torch.testing.assert_close(got, _dense_conditional(W, P, removed), rtol=1e-9, atol=1e-12)


def test_kron_conditional_mean_equals_the_dense_gaussian_conditional_for_any_g():
    """A skewed ``G`` (one large, one tiny, one zero eigenvalue): the compensated weights equal the dense
    conditional mean under ``G ⊗ A / T + δ I``; the isotropic shortcut (λ = Tδ / mean g) does not."""
    gen = torch.Generator().manual_seed(3)
    out, k, T, delta = 3, 6, 0.5, 0.3
    W = torch.randn(out, k, generator=gen, dtype=torch.float64)
    X = torch.randn(k, 20, generator=gen, dtype=torch.float64)
    A = X @ X.T / 20
    Q, _ = torch.linalg.qr(torch.randn(out, out, generator=gen, dtype=torch.float64))
    G = Q @ torch.diag(torch.tensor([50.0, 0.05, 0.0], dtype=torch.float64)) @ Q.T
    removed = torch.tensor([0, 4])
    P = torch.kron(G, A) / T + delta * torch.eye(out * k, dtype=torch.float64)
    expected = _dense_conditional(W, P, removed)
    got = kron_conditional_mean(W, A, G, removed, prior=T * delta)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)
    iso = conditional_mean(W, A, removed, damping=T * delta / float(G.diagonal().mean()))
    assert (iso - expected).norm() > 1e-2 * expected.norm()
    # no prior: plain least squares in every direction (= conditional_mean without damping)
    torch.testing.assert_close(kron_conditional_mean(W, A, G, removed), conditional_mean(W, A, removed))


def test_compensate_uses_the_prior_damping():
    """``compensate`` with a scalar prior and isotropic G equals ``conditional_mean`` with λ = Tδ/g."""
    model = tiny_classifier("bert").double()
    from spam_hf.architectures import group_specs

    specs = [s for s in group_specs(model) if s.kind == "neuron" and s.layer == 0]
    down = "bert.encoder.layer.0.output.dense"
    prior = PriorPrecision(model, specs, kind="scalar", init=0.25)
    k = 48 + 1
    X = torch.randn(k, 60, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    A, G = X @ X.T / 60, 3.0 * torch.eye(32, dtype=torch.float64)
    keep = {specs[0].name: torch.arange(0, 48, 3)}
    mod = model.get_submodule(down)
    W = torch.cat([mod.weight.detach(), mod.bias.detach().unsqueeze(1)], 1).clone()
    compensate(model, specs, keep, {down: (A, G)}, prior=prior, temperature=2.0, kind="posterior")
    removed = torch.tensor([j for j in range(48) if j % 3])
    expected = conditional_mean(W, A, removed, damping=2.0 * 0.25 / 3.0)
    torch.testing.assert_close(mod.weight.detach(), expected[:, :48])
    torch.testing.assert_close(mod.bias.detach(), expected[:, 48])


def test_least_squares_compensation_is_the_ridge_refit_of_the_outputs():
    """``kind="least-squares"`` (the default) against brute force: the kept columns (bias included) that minimise
    ``Σ_t ‖W x_t − W' x_{t,R}‖² + λ n ‖W' − W_R‖²`` (the damping holds the update, not the weights, small)
    over the rows ``x_t`` behind ``A = Σ x xᵀ / n``, with ``λ`` 1% of
    the mean diagonal of ``A_RR``, solved as one stacked least-squares problem by ``torch.linalg.lstsq``."""
    from spam_hf.architectures import group_specs

    model = tiny_classifier("bert").double()
    specs = [s for s in group_specs(model) if s.kind == "neuron" and s.layer == 0]
    down = "bert.encoder.layer.0.output.dense"
    n = 60
    X = torch.randn(n, 48, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    X = torch.cat([X, torch.ones(n, 1, dtype=torch.float64)], 1)  # [x | 1]
    A = X.T @ X / n
    mod = model.get_submodule(down)
    W = torch.cat([mod.weight.detach(), mod.bias.detach().unsqueeze(1)], 1).clone()
    keep = {specs[0].name: torch.arange(0, 48, 2)}
    compensate(model, specs, keep, {down: (A, torch.eye(32, dtype=torch.float64))})
    R = torch.tensor(list(range(0, 48, 2)) + [48])
    lam = 0.01 * float(A.diagonal()[R].mean())
    design = torch.cat([X[:, R], (lam * n) ** 0.5 * torch.eye(len(R), dtype=torch.float64)])
    target = torch.cat([X @ W.T, (lam * n) ** 0.5 * W[:, R].T])
    expected = torch.linalg.lstsq(design, target).solution.T  # out × |R|
    torch.testing.assert_close(mod.weight.detach()[:, R[:-1]], expected[:, :-1], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(mod.bias.detach(), expected[:, -1], rtol=1e-8, atol=1e-10)
    assert mod.weight.detach()[:, 1::2].abs().max() == 0


def test_compensation_is_least_squares_on_the_calibration_inputs():
    """Without a prior and with token-level statistics ("expand": A = Σ x xᵀ over every real token),
    compensation minimises Σ ‖W x − W' x‖² over the layer's calibration inputs (bias included): its error is
    below plain removal's for every consuming layer, and so is the calibration loss."""
    model = tiny_classifier("bert", num_labels=2)
    batches = [tiny_batch(batch=8, seed=s, n_labels=2, pad_last=0) for s in range(4)]
    la = SpamLaplace(model, n_data=32, fisher="empirical", reduction="expand")
    la.collect(batches_loader(batches), progress=False)
    p = plan(model, la, 0.6, method="magnitude")
    plain, comp = copy.deepcopy(model), copy.deepcopy(model)
    compensate(comp, la.specs, p.keep, la.factors())
    inputs = {}
    hooks = [model.get_submodule(m).register_forward_hook(
        lambda mod, i, o, m=m: inputs.setdefault(m, []).append(i[0].detach().reshape(-1, i[0].shape[-1])))
        for m in ("bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.1.output.dense")]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    for m, xs in inputs.items():
        x = torch.cat(xs)
        ref = model.get_submodule(m)(x)
        spec = next(s for s in la.specs if m in s.col_index)
        dropped = [g for g in range(spec.count) if g not in set(p.keep[spec.name].tolist())]
        cols = spec.col_index[m][dropped].reshape(-1)
        x_cut = x.clone()
        x_cut[:, cols] = 0
        with torch.no_grad():
            err_plain = (plain.get_submodule(m)(x_cut) - ref).square().sum()
            err_comp = (comp.get_submodule(m)(x_cut) - ref).square().sum()
        assert err_comp < err_plain, m
    apply(plain, p)
    apply(comp, p)
    with torch.no_grad():
        loss = [sum(float(m_(**b).loss) for b in batches) for m_ in (plain, comp)]
    assert loss[1] < loss[0]


def batches_loader(batches):
    class Loader(list):
        dataset = range(sum(len(b["labels"]) for b in batches))

    return Loader(batches)


def test_bias_compensation_moves_the_removed_inputs_mean_into_the_bias(tmp_path):
    """FLAP's bias compensation on a LLaMA (no biases): at the calibration mean input, every consuming layer
    computes exactly what it did (``W x̄ + b = W_R x̄_R + b'``); O and down get biases through the config flags
    (``attention_bias`` / ``mlp_bias``, zero on q/k/v and gate/up), and the export loads with the stock class."""
    from transformers import AutoModelForCausalLM

    from spam_hf.export import save_pruned
    from spam_hf.pruning import PruningConfig, compensate_bias, prune, removed_columns
    from spam_hf.architectures import group_specs

    from conftest import BatchList, tiny_causal_lm

    model = tiny_causal_lm("llama", num_hidden_layers=2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (4, 12), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    specs = group_specs(model)
    la = SpamLaplace(model, reduction="expand", n_data=48, input_means=True)
    la.collect(BatchList([batch]), progress=False)
    moments = la.input_moments()
    keep = {s.name: torch.arange(0, s.count, 2) if s.kind == "neuron" else torch.arange(s.count) for s in specs}
    keep[specs[0].name] = torch.tensor([0, 1])  # layer 0 loses query heads 2 and 3 (KV head 1 keeps none)
    before = {m: (dict(model.named_modules())[m].weight.detach().clone()) for m in removed_columns(specs, keep)}
    done = compensate_bias(model, specs, keep, moments)
    assert model.config.attention_bias and model.config.mlp_bias
    mods = dict(model.named_modules())
    assert torch.equal(mods["model.layers.0.self_attn.q_proj"].bias, torch.zeros(32))
    for m, cols in removed_columns(specs, keep).items():
        if not cols:
            continue
        assert done[m] == len(cols)
        x = moments[m][0].float()
        kept = torch.ones(x.numel(), dtype=torch.bool)
        kept[cols] = False
        torch.testing.assert_close(mods[m].weight[:, kept] @ x[kept] + mods[m].bias, before[m] @ x, rtol=1e-5, atol=1e-6)
    # end to end through the engine: flap prunes with bias compensation by default, and the export is stock
    model = tiny_causal_lm("llama", num_hidden_layers=2)
    result = prune(model, None, PruningConfig(sparsity=0.4, method="flap", calibration_batches=1),
                   calibration=BatchList([batch]))
    assert result.config.compensate and result.config.compensation == "bias" and result.compensated
    assert save_pruned(model, str(tmp_path / "flap")) in ("stock", "remote_code")
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "flap"), trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot load one"):
        compensate_bias(tiny_causal_lm("qwen2"), group_specs(tiny_causal_lm("qwen2")),
                        {s.name: torch.arange(s.count - 1) for s in group_specs(tiny_causal_lm("qwen2"))
                         if s.kind == "neuron"}, moments)
