"""Eigen log-determinants of G ⊗ A + Δ against torch.logdet of the dense matrix."""

import torch

from spam_hf.kron import KronEigen, Precision


def random_psd(n, seed, rank=None):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, rank or n + 2, generator=g, dtype=torch.float64)
    return X @ X.T / X.shape[1]


def test_constant_precision_logdet_is_exact():
    G, A = random_psd(5, 0), random_psd(4, 1, rank=2)  # A singular: only δ keeps it PD
    k = KronEigen(G, A, keep_vectors=True)
    for delta, T in [(0.3, 1.0), (1e-6, 1.0), (1e6, 1.0), (2.0, 0.1)]:
        prec = Precision(u=torch.full((5,), delta, dtype=torch.float64), v=torch.ones(4, dtype=torch.float64))
        dense = torch.logdet(torch.kron(G, A) / T + delta * torch.eye(20, dtype=torch.float64))
        torch.testing.assert_close(k.logdet(prec, T), dense, rtol=1e-10, atol=1e-8)


def test_projected_logdet_bounds_dense_logdet():
    """Hadamard: Σ log(g a + δ̃) ≥ log det(G⊗A + diag Δ), with the gap printed for a random layer."""
    G, A = random_psd(6, 2), random_psd(5, 3)
    k = KronEigen(G, A, keep_vectors=True)
    g = torch.Generator().manual_seed(4)
    cases = {
        "unit rows": Precision(u=torch.rand(6, generator=g, dtype=torch.float64) * 3 + 0.01, v=torch.ones(5, dtype=torch.float64)),
        "unit cols": Precision(u=torch.ones(6, dtype=torch.float64), v=torch.rand(5, generator=g, dtype=torch.float64) + 0.1),
        "parameter": Precision(dense=torch.rand(6, 5, generator=g, dtype=torch.float64) * 5 + 0.01),
    }
    for name, prec in cases.items():
        dense = torch.logdet(torch.kron(G, A) + torch.diag(prec.matrix().reshape(-1)))
        approx = k.logdet(prec)
        gap = float(approx - dense)
        print(f"{name}: projected log-det {float(approx):.4f}, dense {float(dense):.4f}, gap {gap:.4f} ({gap / abs(float(dense)):.2%})")
        assert gap >= -1e-9


def test_rank_one_projection_equals_dense_projection():
    G, A = random_psd(4, 5), random_psd(3, 6)
    k = KronEigen(G, A, keep_vectors=True)
    u = torch.rand(4, dtype=torch.float64) + 0.1
    v = torch.rand(3, dtype=torch.float64) + 0.1
    torch.testing.assert_close(k.project(Precision(u=u, v=v)), k.project(Precision(dense=torch.outer(u, v))))
    torch.testing.assert_close(k.dense(), torch.kron(G, A))
    torch.testing.assert_close(k.diag().reshape(-1), torch.kron(G, A).diagonal())


def test_precision_helpers_match_dense():
    u, v = torch.rand(4, dtype=torch.float64) + 0.1, torch.rand(3, dtype=torch.float64) + 0.1
    w2 = torch.rand(4, 3, dtype=torch.float64)
    r1, d = Precision(u=u, v=v), Precision(dense=torch.outer(u, v))
    torch.testing.assert_close(r1.quadratic(w2), d.quadratic(w2))
    torch.testing.assert_close(r1.log_sum(), d.log_sum())


def _masked_psd(n, dead, seed):
    """A PSD factor whose rows and columns ``dead`` are exactly zero (a masked group's inputs or outputs)."""
    F = random_psd(n, seed)
    F[dead, :] = 0
    F[:, dead] = 0
    return F


def _check_decomposition(F, vals, Q):
    eye = torch.eye(F.shape[0], dtype=torch.float64)
    torch.testing.assert_close(Q @ torch.diag(vals) @ Q.T, F, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(Q.T @ Q, eye, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(vals.sort().values, torch.linalg.eigvalsh(F), rtol=1e-9, atol=1e-10)


def test_symmetric_eigh_splits_off_zero_rows_exactly():
    from spam_hf.kron import symmetric_eigh
    dead = [0, 3, 4, 7]
    F = _masked_psd(8, dead, 11)
    vals, Q = symmetric_eigh(F)
    _check_decomposition(F, vals, Q)
    assert (vals[:len(dead)] == 0).all()
    for F in (torch.zeros(5, 5, dtype=torch.float64), random_psd(5, 12)):  # all dead, none dead
        _check_decomposition(F, *symmetric_eigh(F))
    # and the log-determinant of a layer with masked rows and columns still equals the dense one
    G, A = _masked_psd(6, [1, 2], 13), _masked_psd(5, [0, 4], 14)
    k = KronEigen(G, A, keep_vectors=True)
    prec = Precision(u=torch.full((6,), 0.7, dtype=torch.float64), v=torch.ones(5, dtype=torch.float64))
    dense = torch.logdet(torch.kron(G, A) + 0.7 * torch.eye(30, dtype=torch.float64))
    torch.testing.assert_close(k.logdet(prec), dense, rtol=1e-10, atol=1e-8)


def test_symmetric_eigh_falls_back_when_lapack_fails(monkeypatch):
    """eigh failing once → jittered eigh; failing always → the SVD; both decompose F."""
    from spam_hf import kron
    real = torch.linalg.eigh
    F = _masked_psd(7, [2], 15)
    for fail_calls in (1, 2):
        calls = {"n": 0}

        def flaky(M, calls=calls, fail_calls=fail_calls):
            calls["n"] += 1
            if calls["n"] <= fail_calls:
                raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
            return real(M)

        monkeypatch.setattr(torch.linalg, "eigh", flaky)
        vals, Q = kron.symmetric_eigh(F)
        assert calls["n"] == min(fail_calls + 1, 2)
        _check_decomposition(F, vals, Q)
    monkeypatch.setattr(torch.linalg, "eigh", real)


def test_symmetric_eigh_refuses_non_finite_factors():
    import pytest
    from spam_hf.kron import symmetric_eigh
    F = random_psd(4, 16)
    F[1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        symmetric_eigh(F)


def _dense_diag_side(G, a, prec, T=1.0):
    """Brute force: log det(G ⊗ diag(a) / T + diag(vec Δ)) of the dense matrix."""
    return torch.logdet(torch.kron(G, torch.diag(a)) / T + torch.diag(prec.matrix().reshape(-1)))


def test_diagonal_wide_factor_is_exact_for_a_unit_prior_on_its_side():
    """``H ≈ G ⊗ diag(a)`` (a wide input factor kept as its diagonal): a prior per input column (down_proj's neurons)
    gives the exact log-determinant, and so does a prior per output row when ``G`` is the diagonal side (gate / up);
    a prior on the other side is still the Hadamard bound. Brute force: ``torch.logdet`` of the dense matrix."""
    g = torch.Generator().manual_seed(7)
    G, A = random_psd(5, 8), random_psd(6, 9)
    a = A.diagonal().clone()
    cols = Precision(u=torch.ones(5, dtype=torch.float64), v=torch.rand(6, generator=g, dtype=torch.float64) * 3 + 0.01)
    rows = Precision(u=torch.rand(5, generator=g, dtype=torch.float64) * 3 + 0.01, v=torch.ones(6, dtype=torch.float64))
    k = KronEigen(G, a)
    for T in (1.0, 0.1):
        torch.testing.assert_close(k.logdet(cols, T), _dense_diag_side(G, a, cols, T), rtol=1e-10, atol=1e-8)
        assert float(k.logdet(rows, T) - _dense_diag_side(G, a, rows, T)) >= -1e-9
    # the diagonal on the output side (gate / up: neurons are rows)
    g_diag = G.diagonal().clone()
    k_out = KronEigen(g_diag, A)
    dense = torch.logdet(torch.kron(torch.diag(g_diag), A) + torch.diag(rows.matrix().reshape(-1)))
    torch.testing.assert_close(k_out.logdet(rows), dense, rtol=1e-10, atol=1e-8)
    # the gradient in log δ too (what the hyper-steps follow): autograd of both against each other
    log_v = cols.v.log().clone().requires_grad_(True)
    ours = torch.autograd.grad(k.logdet(Precision(u=cols.u, v=log_v.exp())), log_v)[0]
    log_v2 = cols.v.log().clone().requires_grad_(True)
    brute = torch.autograd.grad(_dense_diag_side(G, a, Precision(u=cols.u, v=log_v2.exp())), log_v2)[0]
    torch.testing.assert_close(ours, brute, rtol=1e-8, atol=1e-10)


def test_diagonal_factor_dense_diag_and_projection():
    G, a = random_psd(4, 10), torch.rand(3, dtype=torch.float64) + 0.1
    k = KronEigen(G, a, keep_vectors=True)
    torch.testing.assert_close(k.dense(), torch.kron(G, torch.diag(a)))
    torch.testing.assert_close(k.diag().reshape(-1), torch.kron(G, torch.diag(a)).diagonal())
    u, v = torch.rand(4, dtype=torch.float64) + 0.1, torch.rand(3, dtype=torch.float64) + 0.1
    torch.testing.assert_close(k.project(Precision(u=u, v=v)), k.project(Precision(dense=torch.outer(u, v))))
    both = KronEigen(G.diagonal().clone(), a)  # both sides diagonal: the diagonal approximation of H, exactly
    dense = Precision(dense=torch.rand(4, 3, dtype=torch.float64) + 0.1)
    torch.testing.assert_close(both.logdet(dense), torch.log(torch.outer(G.diagonal(), a) + dense.dense).sum())
    with torch.no_grad():
        bad = a.clone()
        bad[0] = float("nan")
    import pytest
    with pytest.raises(FloatingPointError, match="diagonal Kronecker factor"):
        KronEigen(G, bad)
    with pytest.raises(ValueError, match="square matrices or diagonals"):
        KronEigen(G, torch.ones(2, 3, dtype=torch.float64))


def test_blocked_rank_one_logdet_and_gradient_equal_the_unblocked_formula(monkeypatch):
    """The row-blocked one-pass log-determinant (value, ∂/∂u, ∂/∂v) against autograd of the formula written out
    over the whole ``out × in`` matrix, with blocks that do not divide the rows; and equal factors are decomposed
    once when ``shared``."""
    import spam_hf.kron as kron

    monkeypatch.setattr(kron, "ROW_BLOCK", 3)
    G, A = random_psd(7, 11), random_psd(5, 12)
    k = KronEigen(G, A)
    g = torch.Generator().manual_seed(13)
    log_u = (torch.rand(7, generator=g, dtype=torch.float64) - 2).requires_grad_(True)
    log_v = (torch.rand(5, generator=g, dtype=torch.float64) - 1).requires_grad_(True)
    ours = k.logdet(Precision(u=log_u.exp(), v=log_v.exp()), 0.3)
    du, dv = torch.autograd.grad(ours, (log_u, log_v))
    lu, lv = log_u.detach().clone().requires_grad_(True), log_v.detach().clone().requires_grad_(True)
    written_out = torch.log(torch.outer(k.g, k.a) / 0.3 + k.project(Precision(u=lu.exp(), v=lv.exp()))).sum()
    ru, rv = torch.autograd.grad(written_out, (lu, lv))
    torch.testing.assert_close(ours, written_out, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(du, ru, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dv, rv, rtol=1e-10, atol=1e-12)
    calls = []
    real = KronEigen._eigh
    monkeypatch.setattr(KronEigen, "_eigh", staticmethod(lambda F, *a: calls.append(F.shape[0]) or real(F, *a)))
    shared = []
    first, second = KronEigen(G, A, shared=shared), KronEigen(G.clone(), A.clone(), shared=shared)
    assert calls == [7, 5] and torch.equal(first.a, second.a) and torch.equal(first.g, second.g)


def test_values_only_on_the_constant_side_is_exact():
    """A unit prior on rows leaves the columns' precision constant: the A side needs only its eigenvalues
    (``values_only``), and the log-determinant equals the fully decomposed one; both sides for a scalar prior."""
    G, A = random_psd(6, 14), random_psd(5, 15)
    full = KronEigen(G, A)
    g = torch.Generator().manual_seed(16)
    rows = Precision(u=torch.rand(6, generator=g, dtype=torch.float64) + 0.05, v=torch.ones(5, dtype=torch.float64))
    cols = Precision(u=torch.ones(6, dtype=torch.float64), v=torch.rand(5, generator=g, dtype=torch.float64) + 0.05)
    scalar = Precision(u=torch.full((6,), 0.3, dtype=torch.float64), v=torch.ones(5, dtype=torch.float64))
    for prec, sides in ((rows, (False, True)), (cols, (True, False)), (scalar, (True, True))):
        fast = KronEigen(G, A, values_only=sides)
        assert (fast._QG2 is None) == sides[0] and (fast._QA2 is None) == sides[1]
        torch.testing.assert_close(fast.logdet(prec, 0.5), full.logdet(prec, 0.5), rtol=1e-10, atol=1e-10)
