"""SpamLaplace: post-hoc fit without a Trainer, log Z against the dense Laplace formula, state round trips."""

import re

import pytest
import torch
from torch.utils.data import DataLoader

from spam_hf import SpamLaplace
from spam_hf.curvature import diagonal_from_state
from spam_hf.marglik import log_marginal_likelihood
from spam_hf.priors import params_aug

from conftest import tiny_batch, tiny_classifier


def loader(n_batches=3, batch=4, seed=0):
    data = [tiny_batch(batch=batch, seed=seed + i) for i in range(n_batches)]
    rows = [{k: v[j] for k, v in b.items()} for b in data for j in range(batch)]
    return DataLoader(rows, batch_size=batch, shuffle=False)


def feed(la, model, batches, add_loss=True):
    """What the trainer's hooks do per batch: capture the forward, accumulate curvature (and the loss)."""
    for b in batches:
        with la.capture(model, b["attention_mask"]):
            out = model(**b)
        la.accumulate(out.logits, b["labels"])
        if add_loss:
            la.add_loss(float(out.loss))


def test_fit_without_a_trainer_equals_the_manual_assembly():
    """fit(): one eval pass, curvature of every batch, N = dataset size, Σℓ = N · mean loss, then Adam on log δ.
    The value equals log Z assembled by hand from the same sums, and the weights do not move."""
    model = tiny_classifier("bert").double()
    model.train()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    la = SpamLaplace(model, curvature="kfac", fisher="empirical", n_hypersteps=5)
    ref = SpamLaplace(model, curvature="kfac", fisher="empirical")
    losses = []
    for b in loader():
        with torch.enable_grad(), ref.capture(model, b["attention_mask"]):
            model.eval()
            out = model(**b)
            ref.accumulate(out.logits, b["labels"])
        losses.append(float(out.loss))
    model.train()
    kron = ref.curvature.kron(12.0)
    value = la.fit(loader(), n_steps=7, progress=False)
    assert la.n_data == 12.0 and model.training
    for n, p in model.named_parameters():
        assert torch.equal(p, w0[n]), n
    expected = log_marginal_likelihood(la.prior, kron, params_aug(model, la.modules),
                                       loss_sum=12.0 * sum(losses) / len(losses))
    assert value == pytest.approx(float(expected), rel=1e-9)
    # the live sums were consumed; their diagonal is retained for pruning and equals the reference's
    assert la.live_rows == 0 and la.has_curvature()
    for m, d in ref.curvature.diagonal(12.0).items():
        torch.testing.assert_close(la.diagonal()[m], d, rtol=1e-6, atol=1e-12)


def test_optimize_raises_log_marglik():
    model = tiny_classifier("bert")
    la = SpamLaplace(model, n_data=100, n_hypersteps=30)
    feed(la, model, loader())
    before = float(la.log_marginal_likelihood())
    after = la.optimize_prior_precision()
    assert after > before


def test_state_round_trip_continues_exactly(tmp_path):
    """save → load into a fresh object: the next prior update (Adam moments, MC labels) is identical."""
    def run_update(la, model, seed):
        feed(la, model, loader(seed=seed))
        return la.optimize_prior_precision()

    model = tiny_classifier("bert")
    a = SpamLaplace(model, n_data=50, n_hypersteps=4, seed=3)
    run_update(a, model, 0)
    feed(a, model, loader(n_batches=1, seed=9))  # live sums pending at save time
    a.save(str(tmp_path / "state"))
    b_ = SpamLaplace(model, n_data=50, n_hypersteps=4, seed=0)  # another seed: the generator state must come back
    b_.load(str(tmp_path / "state"))
    assert b_.live_rows == a.live_rows and b_.loss_count == a.loss_count
    va, vb = run_update(a, model, 1), run_update(b_, model, 1)
    assert va == vb
    for k, v in a.prior.log_delta.items():
        assert torch.equal(b_.prior.log_delta[k], v), k


def test_errors_are_clear(tmp_path):
    model = tiny_classifier("bert")
    la = SpamLaplace(model)
    with pytest.raises(ValueError, match="needs N"):
        la.penalty(model)
    with pytest.raises(RuntimeError, match="no curvature yet"):
        SpamLaplace(model, n_data=10).diagonal()
    with pytest.raises(FileNotFoundError, match="has no spam_prior.safetensors"):
        la.load(str(tmp_path))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SpamLaplace(model, temperature=0)
    with pytest.raises(ValueError, match="curvature must be one of kfac, diag"):
        SpamLaplace(model, curvature="full")


def test_a_posterior_saved_before_n_g_existed_loads_with_the_same_diagonal(tmp_path):
    """Run folders written before the per-example G count (``n_g``, ``n_seen``) and the per-module row counts
    (``.R``, ``.Arows``): the retained diagonal and the live sums load, and for one row per example (``reduce``)
    the curvature is what it was."""
    from safetensors.torch import load_file, save_file

    model = tiny_classifier("bert")
    a = SpamLaplace(model, n_data=50, n_hypersteps=2)
    feed(a, model, loader())
    a.optimize_prior_precision()
    feed(a, model, loader(n_batches=1, seed=7), add_loss=False)
    a.save(str(tmp_path / "state"))
    for f in (tmp_path / "state").glob("*.safetensors"):  # strip the new keys, as an old file has none
        t = load_file(str(f))
        old = {k: v for k, v in t.items() if not k.endswith(("n_g", "n_seen", "n_units", ".R", ".Arows"))}
        if len(old) != len(t):
            save_file(old, str(f))
    b_ = SpamLaplace(model, n_data=50)
    b_.load(str(tmp_path / "state"))
    fa, fb = a.factors(), b_.factors()
    for m in fa:
        assert torch.allclose(fa[m][0], fb[m][0]) and torch.allclose(fa[m][1], fb[m][1]), m
    assert set(b_.retained) == {k for k in a.retained if k != "n_g" and not k.endswith(".Arows")}
    diag_a, diag_b = diagonal_from_state(a.retained, 50), diagonal_from_state(b_.retained, 50)
    assert all(torch.allclose(diag_a[m], diag_b[m]) for m in diag_a)


def test_non_finite_curvature_stops_the_prior_update_with_the_module_named():
    """A NaN in the curvature sums (overflow in half precision, a bad batch) stops the prior update with a
    FloatingPointError naming the module, before any prior moves (the CLI maps it to exit 2)."""
    model = tiny_classifier("bert", num_labels=3)
    la = SpamLaplace(model, n_data=64)
    feed(la, model, [tiny_batch(seed=s) for s in range(2)])
    module = la.modules[0]
    la.curvature.sums[module]["G"][0, 0] = float("nan")
    before = {k: v.detach().clone() for k, v in la.prior.log_delta.items()}
    with pytest.raises(FloatingPointError, match=re.escape(repr(module)) + ".*check curvature and weights for NaN"):
        la.optimize_prior_precision(n_steps=3)
    for k, v in la.prior.log_delta.items():
        assert torch.equal(v, before[k]), k


def test_wide_factors_enter_log_z_as_diagonals_and_calibration_keeps_them_whole(tmp_path):
    """``diagonal_from=48``: log Z equals the one assembled from the whole factors with the wide ones replaced by
    their diagonals (float64 model: to round-off); group damage needs whole factors and says where to get them;
    a calibration posterior keeps them whole; save/load restores the layout whatever the loader's default."""
    from spam_hf.kron import KronEigen

    model = tiny_classifier("bert").double()
    batches = list(loader())
    # a small δ₀ and a large N, so that the curvature, not the prior, sets the log-determinant
    wide = SpamLaplace(model, fisher="empirical", n_data=10**5, prior_init=1e-3, diagonal_from=48)
    whole = SpamLaplace(model, fisher="empirical", n_data=10**5, prior_init=1e-3, diagonal_from=None)
    feed(wide, model, batches)
    feed(whole, model, batches)
    n, n_g = float(whole.curvature.n), whole.curvature.n_g
    approx = {}
    for m, s in whole.curvature.sums.items():
        A, G = s["A"] / n, s["G"] * (10**5 / n_g)
        approx[m] = KronEigen(G.diagonal().clone() if G.shape[0] >= 48 else G,
                              A.diagonal().clone() if A.shape[0] >= 48 else A)
    ours, ref = wide.log_marginal_likelihood(), whole.log_marginal_likelihood(approx)
    assert float(ours) == pytest.approx(float(ref), rel=1e-9)
    assert abs(float(ours) - float(whole.log_marginal_likelihood())) > 1.0  # it is an approximation
    with pytest.raises(ValueError, match="calibration_posterior"):
        wide.factors()
    calib = wide.calibration_posterior(model)
    assert calib.curvature.diagonal_from is None
    wide.save(str(tmp_path))
    loaded = SpamLaplace(model)  # default diagonal_from, larger than every width here
    loaded.load(str(tmp_path))
    assert loaded.curvature.diagonal_from == 48
    assert float(loaded.log_marginal_likelihood()) == pytest.approx(float(ours), rel=1e-12)


def test_prior_updates_decompose_only_the_varying_sides_exactly():
    """The unit prior's constant sides (columns of Q/K/V/intermediate, rows of O/output) are decomposed for their
    eigenvalues alone; log Z equals the one from fully decomposed factors."""
    model = tiny_classifier("bert").double()
    la = SpamLaplace(model, fisher="empirical", n_data=10**4, prior_init=1e-2)
    feed(la, model, list(loader()))
    assert la.prior.constant_sides("bert.encoder.layer.0.attention.self.query") == (False, True)
    assert la.prior.constant_sides("bert.encoder.layer.0.output.dense") == (True, False)
    fast = la.curvature_estimate()
    assert fast["bert.encoder.layer.0.attention.self.query"]._QA2 is None
    full = la.curvature.kron(10**4)
    assert float(la.log_marginal_likelihood(fast)) == pytest.approx(float(la.log_marginal_likelihood(full)), rel=1e-10)
