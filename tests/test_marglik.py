"""Laplace log marginal likelihood against a dense-Hessian computation by hand; hyper-gradients; Occam."""

import re

import pytest
import torch
from torch import nn

from spam_hf.architectures import group_specs, prunable_modules
from spam_hf.architectures.base import GroupSpec, contiguous_blocks
from spam_hf.curvature import CurvatureAccumulator
from spam_hf.marglik import log_marginal_likelihood, optimize_prior
from spam_hf.priors import PriorPrecision, params_aug

from conftest import tiny_batch, tiny_classifier


def tiny_setup(kind="kfac", hidden=16, inter=12, reduction="reduce", n_batches=3, batch_size=4, seq=6,
               pad_last=2):
    model = tiny_classifier("bert", hidden_size=hidden, intermediate_size=inter, num_attention_heads=2,
                            num_hidden_layers=1)
    specs = group_specs(model)
    # float64 sums: these tests compare against dense float64 references and finite differences
    acc = CurvatureAccumulator(model, prunable_modules(specs), kind=kind, reduction=reduction, fisher="mc", seed=0,
                               accumulate_dtype=torch.float64)
    for s in range(n_batches):
        batch = tiny_batch(batch=batch_size, seq=seq, pad_last=pad_last, seed=s)
        with acc.capture(model, batch["attention_mask"]):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        acc.accumulate(out.logits, batch["labels"])
    return model, specs, acc


def random_prior(model, specs, kind="unit", spread=1.0):
    """A prior of ``kind`` whose log precisions are drawn uniformly from ``[-spread, spread]``."""
    prior = PriorPrecision(model, specs, kind=kind)
    with torch.no_grad():
        for v in prior.parameters():
            v.uniform_(-spread, spread)
    return prior


def dense_laplace(prior, blocks, params, loss_sum, T):
    """By hand: −L/T − ½θᵀΔθ + ½Σlog δ − ½ log det(H/T + Δ), H block-diagonal, dense logdet."""
    theta = torch.cat([params[m].reshape(-1) for m in prior.modules])
    delta = torch.cat([prior.precision(m).matrix().reshape(-1) for m in prior.modules])
    H = torch.block_diag(*[blocks[m] for m in prior.modules])
    P = H / T + torch.diag(delta)
    return -loss_sum / T - 0.5 * (delta * theta**2).sum() + 0.5 * delta.log().sum() - 0.5 * torch.logdet(P)


@pytest.mark.parametrize("prior_kind", ["scalar", "layer"])
@pytest.mark.parametrize("T", [1.0, 0.5])
def test_kfac_marglik_equals_dense_laplace(prior_kind, T):
    model, specs, acc = tiny_setup("kfac")
    N = 1000.0
    kron = acc.kron(N, keep_vectors=True)
    params = params_aug(model, acc.module_names)
    prior = PriorPrecision(model, specs, kind=prior_kind)
    with torch.no_grad():
        for i, v in enumerate(prior.parameters()):
            v.fill_(0.3 * i - 1.0)
    ours = log_marginal_likelihood(prior, kron, params, loss_sum=123.4, temperature=T)
    ref = dense_laplace(prior, {m: k.dense() for m, k in kron.items()}, params, 123.4, T)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)


def test_diag_marglik_equals_dense_laplace_with_unit_prior():
    model, specs, acc = tiny_setup("diag")
    N = 500.0
    diag = acc.diagonal(N)
    params = params_aug(model, acc.module_names)
    prior = random_prior(model, specs, spread=2)
    ours = log_marginal_likelihood(prior, diag, params, loss_sum=5.0)
    ref = dense_laplace(prior, {m: torch.diag(d.reshape(-1)) for m, d in diag.items()}, params, 5.0, 1.0)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)


def test_unit_prior_kfac_marglik_is_bounded_by_dense():
    model, specs, acc = tiny_setup("kfac")
    kron = acc.kron(1000.0, keep_vectors=True)
    params = params_aug(model, acc.module_names)
    prior = random_prior(model, specs, spread=2)
    ours = log_marginal_likelihood(prior, kron, params)
    ref = dense_laplace(prior, {m: k.dense() for m, k in kron.items()}, params, 0.0, 1.0)
    print(f"unit prior: projected log Z {float(ours):.3f}, dense {float(ref):.3f}")
    assert float(ours) <= float(ref) + 1e-6


@pytest.mark.parametrize("prior_kind,kind", [("unit", "kfac"), ("layer", "kfac"), ("parameter", "diag"), ("unit", "diag")])
def test_gradient_matches_finite_differences(prior_kind, kind):
    model, specs, acc = tiny_setup(kind)
    curv = acc.kron(200.0) if kind == "kfac" else acc.diagonal(200.0)
    params = params_aug(model, acc.module_names)
    prior = random_prior(model, specs, kind=prior_kind)
    value = log_marginal_likelihood(prior, curv, params)
    value.backward()
    key = next(iter(prior.log_delta))
    leaf = prior.log_delta[key]
    grad = leaf.grad.reshape(-1).clone()
    eps = 1e-6
    for i in [0, leaf.numel() // 2, leaf.numel() - 1]:
        with torch.no_grad():
            leaf.view(-1)[i] += eps
            up = log_marginal_likelihood(prior, curv, params)
            leaf.view(-1)[i] -= 2 * eps
            down = log_marginal_likelihood(prior, curv, params)
            leaf.view(-1)[i] += eps
        fd = (up - down) / (2 * eps)
        torch.testing.assert_close(grad[i], fd, rtol=1e-5, atol=1e-6)


def test_optimize_prior_increases_marglik_and_never_nans():
    model, specs, acc = tiny_setup("kfac")
    kron = acc.kron(1000.0)
    params = params_aug(model, acc.module_names)
    for init in (1e-8, 1.0, 1e8):
        prior = PriorPrecision(model, specs, kind="unit", init=init)
        res = optimize_prior(prior, kron, params, n_steps=30, lr=0.1)
        assert res.final > res.log_marglik[0]
        assert all(torch.isfinite(v).all() for v in prior.parameters())


def test_bad_curvature_shapes_are_clear_errors():
    model, specs, acc = tiny_setup("kfac")
    params = params_aug(model, acc.module_names)
    prior = PriorPrecision(model, specs, kind="unit")
    with pytest.raises(ValueError, match="no curvature"):
        log_marginal_likelihood(prior, {}, params)
    diag = {m: torch.ones(2, 2) for m in prior.modules}
    with pytest.raises(ValueError, match="diagonal curvature"):
        log_marginal_likelihood(prior, diag, params)
    with pytest.raises(ValueError, match="temperature"):
        log_marginal_likelihood(prior, acc.kron(10.0), params, temperature=0.0)


class TwoLayerMLP(nn.Module):
    def __init__(self, d_in, hidden, n_out):
        super().__init__()
        self.up = nn.Linear(d_in, hidden)
        self.down = nn.Linear(hidden, n_out)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


@pytest.mark.slow
def test_occam_units_without_signal_get_large_precision():
    """SpaM on a tiny MLP: 8 hidden units, data from a 3-unit teacher, N=256, full-batch MAP steps with
    the unit prior alternating with marginal-likelihood hyper-steps (KFAC, MC Fisher).

    The marglik prunes: units whose weights the prior drove to ~0 (they carry no signal) end with
    precisions several times those of the units that carry the signal (measured: ~5.5x at seed 0).
    """
    torch.manual_seed(0)
    N, d_in, hidden = 256, 6, 8
    teacher = TwoLayerMLP(d_in, 3, 2)
    with torch.no_grad():
        teacher.up.weight.mul_(3)
        teacher.down.weight.mul_(3)
    X = torch.randn(N, d_in)
    y = torch.distributions.Categorical(logits=teacher(X)).sample()
    student = TwoLayerMLP(d_in, hidden, 2)
    spec = GroupSpec("neuron", 0, hidden, row_index={"up": contiguous_blocks(hidden, 1)},
                     col_index={"down": contiguous_blocks(hidden, 1)})
    prior = PriorPrecision(student, [spec], kind="unit", init=1.0)
    opt = torch.optim.Adam(student.parameters(), lr=0.02)
    adam_state: dict = {}
    for r in range(40):
        acc = CurvatureAccumulator(student, ["up", "down"], fisher="mc", seed=r)
        for _ in range(25):
            with acc.capture(student):
                logits = student(X)
            acc.accumulate(logits, y)
            loss = nn.functional.cross_entropy(logits, y) + prior.penalty(student, N)
            opt.zero_grad()
            loss.backward()
            opt.step()
        optimize_prior(prior, acc.kron(N), params_aug(student, ["up", "down"]), n_steps=20, lr=0.2,
                       optimizer_state=adam_state)
    delta = prior.group_precisions()[spec.name]
    norm2 = (student.up.weight.square().sum(1) + student.down.weight.square().sum(0)).detach()
    signal, silent = norm2 > 0.1, norm2 < 1e-3
    assert signal.any() and silent.sum() >= 4, norm2
    ratio = float(delta[silent].min() / delta[signal].max())
    print(f"unit precisions {delta.tolist()}; squared weight norms {norm2.tolist()}; "
          f"min silent / max signal = {ratio:.1f}")
    assert ratio > 4.0
    # and the data fit is kept
    assert (student(X).argmax(-1) == teacher(X).argmax(-1)).float().mean() > 0.9


def test_float32_curvature_state_changes_marglik_by_less_than_1e5():
    """The default float32 sums and float32 squared eigenvectors vs all-float64: same log Z to 1e-5 relative.

    Token-level rows (many more rows than factor dimensions): with rank-deficient factors the
    eigenbasis inside their null space is arbitrary and so is the projected bound, in any precision.
    """
    model, specs, acc64 = tiny_setup("kfac", reduction="expand", n_batches=4, batch_size=8, seq=10, pad_last=0)
    acc32 = CurvatureAccumulator(model, acc64.module_names, reduction="expand")
    assert acc32.dtype == torch.float32
    acc32.load_state_dict(acc64.state_dict())
    params = params_aug(model, acc64.module_names)
    prior = random_prior(model, specs)
    z64 = log_marginal_likelihood(prior, acc64.kron(200.0), params)
    z32 = log_marginal_likelihood(prior, acc32.kron(200.0), params)
    assert z32.dtype == torch.float64
    torch.testing.assert_close(z32, z64, rtol=1e-5, atol=0)


@pytest.mark.parametrize("kind", ["kfac", "diag"])
def test_streamed_backward_equals_full_backward(kind):
    """backward_log_marginal_likelihood (one module's graph at a time) == (-log Z).backward()."""
    from spam_hf.marglik import backward_log_marginal_likelihood

    model, specs, acc = tiny_setup(kind)
    curv = acc.kron(200.0) if kind == "kfac" else acc.diagonal(200.0)
    params = params_aug(model, acc.module_names)
    prior = random_prior(model, specs)
    full = log_marginal_likelihood(prior, curv, params, loss_sum=3.0)
    (-full).backward()
    grads = {k: v.grad.clone() for k, v in prior.log_delta.items()}
    for v in prior.parameters():
        v.grad = None
    value = backward_log_marginal_likelihood(prior, curv, params, loss_sum=3.0)
    assert value == pytest.approx(float(full), rel=1e-12)
    for k, v in prior.log_delta.items():
        torch.testing.assert_close(v.grad, grads[k], rtol=1e-10, atol=1e-12)


def test_a_process_share_of_the_terms():
    """``modules=`` (the modules a process owns under FSDP2; the sums over processes are identities in one): the
    value is the loss term plus those modules' terms, the gradient theirs alone, and a non-finite term among
    them stops the update with the module named."""
    from spam_hf.marglik import backward_log_marginal_likelihood, module_term

    model, specs, acc = tiny_setup("kfac")
    curv = acc.kron(200.0)
    params = params_aug(model, acc.module_names)
    prior = random_prior(model, specs)
    share = prior.modules[:2]
    value = backward_log_marginal_likelihood(prior, curv, params, loss_sum=3.0, modules=share)
    expected = sum(float(module_term(prior, curv, params, m)) for m in share) - 3.0
    assert value == pytest.approx(expected, rel=1e-12)
    assert float(log_marginal_likelihood(prior, curv, params, loss_sum=3.0, modules=share)) == pytest.approx(expected)
    grads = {k: v.grad.clone() for k, v in prior.log_delta.items()}  # zero where the share has no term
    for v in prior.parameters():
        v.grad = None
    sum(module_term(prior, curv, params, m) for m in share).backward()
    for k, g in grads.items():
        other = prior.log_delta[k].grad
        torch.testing.assert_close(g, -other if other is not None else torch.zeros_like(g), rtol=1e-10, atol=1e-12)
    bad = dict(params)
    bad[share[1]] = params[share[1]] * float("nan")
    with pytest.raises(FloatingPointError, match=re.escape(repr(share[1])) + ".*check curvature and weights for NaN"):
        backward_log_marginal_likelihood(prior, curv, bad, modules=share)
