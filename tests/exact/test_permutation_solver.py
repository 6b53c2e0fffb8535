"""Tests for routing_search.exact.permutation_solver: exhaustive enumeration, branch and bound, QAP form, heuristics, errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import quadratic_assignment

from routing_search.exact.permutation_solver import (
    _Lawler,
    _permutation_blocks,
    permutation_loss,
    qap_matrices,
    solve_permutation,
)


def _instance(
    seed: int, n: int, *, B: int = 32, u: int = 2, gate: str = "per_example", planted: bool = False
):
    rng = np.random.default_rng(seed)
    if gate == "per_example":
        G = rng.dirichlet(np.ones(n), size=B)
    elif gate == "static":
        G = np.broadcast_to(rng.dirichlet(np.ones(n)), (B, n)).copy()
    else:  # static sparse: ties between the zero-weight slots
        g = np.zeros(n)
        g[:2] = rng.dirichlet(np.ones(2))
        G = np.broadcast_to(g, (B, n)).copy()
    F = rng.normal(size=(B, n, u)) + rng.normal(size=(1, n, u))
    if planted:
        y = np.einsum("bi,biu->bu", G, F[:, rng.permutation(n)]) + 0.3 * rng.normal(size=(B, u))
    else:
        y = rng.normal(size=(B, u))
    return G, F, y


def _direct_loss(perm, G, F, y, loss="squared") -> float:
    """Loop-based reference: ŷ_b = Σ_i G_bi F_b,perm[i]."""
    B, n, u = F.shape
    total = 0.0
    for b in range(B):
        pred = np.zeros(u)
        for i in range(n):
            pred += G[b, i] * F[b, perm[i]]
        if loss == "squared":
            total += np.mean((pred - y[b]) ** 2)  # mean over output units, as mse_loss
        else:
            z = pred[0]
            total += np.log1p(np.exp(z)) - y[b, 0] * z
    return total / B


def _reference_best(G, F, y, loss="squared") -> float:
    n = F.shape[1]
    return min(permutation_loss(np.array(p), G, F, y, loss) for p in itertools.permutations(range(n)))


def test_permutation_loss_matches_loop() -> None:
    G, F, y = _instance(0, 5)
    rng = np.random.default_rng(1)
    for _ in range(5):
        p = rng.permutation(5)
        assert permutation_loss(p, G, F, y) == pytest.approx(_direct_loss(p, G, F, y), rel=1e-12)
    yb = (rng.random(32) < 0.5).astype(float)
    p = rng.permutation(5)
    assert permutation_loss(p, G, F[:, :, 0], yb, "logistic") == pytest.approx(
        _direct_loss(p, G, F[:, :, :1], yb[:, None], "logistic"), rel=1e-12
    )


@pytest.mark.parametrize("n", [3, 5, 6])
@pytest.mark.parametrize("gate", ["per_example", "static"])
def test_exhaustive_matches_independent_loop(n: int, gate: str) -> None:
    G, F, y = _instance(n, n, gate=gate)
    res = solve_permutation(G, F, y, method="exhaustive")
    assert res.fun == pytest.approx(_reference_best(G, F, y), rel=1e-12)
    assert res.nfev == res.nit == len(list(itertools.permutations(range(n))))
    assert res.gap == 0.0 and res.bound == res.fun and res.success


def test_exhaustive_logistic_and_callable_refused() -> None:
    G, F, y = _instance(3, 5, u=1)
    yb = (y[:, 0] > 0).astype(float)
    res = solve_permutation(G, F, yb, loss="logistic", method="exhaustive")
    assert res.fun == pytest.approx(_reference_best(G, F, yb, "logistic"), rel=1e-12)

    def l1(pred, target):
        return np.abs(pred - target).mean()

    # The array solvers take a loss NAME; the error names the model-level alternative.
    with pytest.raises(TypeError, match="loss NAME.*optimality_gap"):
        solve_permutation(G, F, y, loss=l1, method="exhaustive")
    with pytest.raises(TypeError, match="loss NAME"):
        permutation_loss(np.arange(5), G, F, y, l1)


@pytest.mark.parametrize("n", [4, 5, 6, 7])
@pytest.mark.parametrize("gate", ["per_example", "static", "static_sparse"])
@pytest.mark.parametrize("seed", [0, 1])
def test_branch_and_bound_equals_brute_force(n: int, gate: str, seed: int) -> None:
    G, F, y = _instance(100 * seed + n, n, gate=gate, planted=seed == 1)
    brute = solve_permutation(G, F, y, method="exhaustive")
    bnb = solve_permutation(G, F, y, method="branch_and_bound")
    assert bnb.success
    assert bnb.fun == pytest.approx(brute.fun, rel=1e-9)
    assert bnb.bound <= bnb.fun and 0.0 <= bnb.gap <= 1e-9 * max(1.0, bnb.fun)
    assert bnb.bound <= brute.fun + 1e-12
    assert sorted(bnb.x.tolist()) == list(range(n))
    assert permutation_loss(bnb.x, G, F, y) == bnb.fun


@pytest.mark.parametrize("gate", ["per_example", "static"])
def test_gilmore_lawler_bound_is_valid_for_every_partial_assignment(gate: str) -> None:
    """The node bound never exceeds the best completion (exhaustive check); the Lawler form is exact."""
    n = 5
    G, F, y = _instance(31, n, gate=gate)
    lawler = _Lawler(G, F, y)
    slots = np.array([3, 0, 4, 1, 2])
    completions = {}
    for p in itertools.permutations(range(n)):
        perm = np.array(p)
        value = lawler.value(perm)
        assert value == pytest.approx(permutation_loss(perm, G, F, y), rel=1e-12)
        completions[p] = value
    for depth in range(n + 1):
        for assigned in itertools.permutations(range(n), depth):
            free = np.array([e for e in range(n) if e not in assigned])
            bound, completion, _ = lawler.gilmore_lawler(slots, free, np.array(assigned, dtype=np.intp))
            best = min(
                v for p, v in completions.items() if all(p[slots[d]] == assigned[d] for d in range(depth))
            )
            assert bound <= best + 1e-12
            assert all(completion[slots[d]] == assigned[d] for d in range(depth))
            assert sorted(completion.tolist()) == list(range(n))
            if depth >= n - 1:
                assert bound == pytest.approx(best, rel=1e-12)  # one completion left: the bound is exact


def test_branch_and_bound_respects_x0_and_max_nodes() -> None:
    G, F, y = _instance(11, 7, gate="per_example")
    brute = solve_permutation(G, F, y, method="exhaustive")
    warm = solve_permutation(G, F, y, method="branch_and_bound", x0=brute.x)
    assert warm.fun == pytest.approx(brute.fun, rel=1e-12)
    capped = solve_permutation(G, F, y, method="branch_and_bound", max_nodes=1)
    assert capped.nit <= 1 and capped.bound <= brute.fun + 1e-12 <= capped.fun + 1e-12


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_qap_objective_equals_direct_loss(seed: int) -> None:
    G, F, y = _instance(seed, 6, gate="static", u=3)
    g = G[0]
    A, Bm, const = qap_matrices(g, F, y)
    rng = np.random.default_rng(seed)
    for _ in range(10):
        p = rng.permutation(6)
        qap_value = float(np.sum(A * Bm[np.ix_(p, p)])) + const
        assert qap_value == pytest.approx(_direct_loss(p, G, F, y), rel=1e-10, abs=1e-12)
    # scipy's own objective value agrees with ours on its returned permutation
    res = quadratic_assignment(A, Bm, method="faq", options={"rng": np.random.default_rng(0)})
    assert res.fun + const == pytest.approx(permutation_loss(res.col_ind, g, F, y), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_exact_never_worse_than_scipy_qap(seed: int) -> None:
    G, F, y = _instance(50 + seed, 7, gate="static", planted=seed % 2 == 0)
    A, Bm, const = qap_matrices(G[0], F, y)
    exact = solve_permutation(G[0], F, y, method="branch_and_bound")
    brute = solve_permutation(G[0], F, y, method="exhaustive")
    assert exact.fun == pytest.approx(brute.fun, rel=1e-9)
    for method in ("faq", "2opt"):
        res = quadratic_assignment(A, Bm, method=method, options={"rng": np.random.default_rng(seed)})
        assert exact.fun <= permutation_loss(res.col_ind, G, F, y) + 1e-12


@pytest.mark.parametrize("method", ["faq", "2opt"])
def test_heuristic_methods(method: str) -> None:
    G, F, y = _instance(21, 6, gate="static", planted=True)
    res = solve_permutation(G, F, y, method=method, rng=0, n_init=3)
    assert sorted(res.x.tolist()) == list(range(6))
    assert res.fun == pytest.approx(permutation_loss(res.x, G, F, y), rel=1e-12)
    assert res.message.startswith("heuristic") and res.success
    assert np.isnan(res.bound) and np.isnan(res.gap)
    again = solve_permutation(G, F, y, method=method, rng=0, n_init=3)
    np.testing.assert_array_equal(res.x, again.x)  # seeded → reproducible
    best = solve_permutation(G, F, y, method="exhaustive")
    started = solve_permutation(G, F, y, method=method, x0=best.x)
    assert started.fun <= best.fun + 1e-9 * max(1.0, best.fun) or method == "faq"


def test_static_gate_forms_agree_and_torch_inputs() -> None:
    G, F, y = _instance(8, 6, gate="static")
    a = solve_permutation(G[0], F, y, method="branch_and_bound")
    b = solve_permutation(torch.tensor(G), torch.tensor(F), torch.tensor(y), method="branch_and_bound")
    assert a.fun == pytest.approx(b.fun, rel=1e-12)


def test_permutation_blocks_are_lexicographic_and_complete() -> None:
    for n, tail in [(1, 8), (4, 2), (6, 3), (5, 8)]:
        got = np.vstack(list(_permutation_blocks(n, tail=tail)))
        np.testing.assert_array_equal(got, np.array(list(itertools.permutations(range(n)))))


def test_exhaustive_n9_uses_several_blocks() -> None:
    rng = np.random.default_rng(0)
    g = rng.dirichlet(np.ones(9))
    F = rng.normal(size=(16, 9, 1))
    y = rng.normal(size=(16, 1))
    brute = solve_permutation(g, F, y, method="exhaustive")
    bnb = solve_permutation(g, F, y, method="branch_and_bound")
    assert brute.nit == 362880
    assert bnb.fun == pytest.approx(brute.fun, rel=1e-9)


def test_errors_name_the_argument() -> None:
    G, F, y = _instance(0, 4)
    with pytest.raises(ValueError, match="G must have shape"):
        solve_permutation(G[:, :3], F, y)
    with pytest.raises(ValueError, match="y must have shape"):
        solve_permutation(G, F, y[:5])
    bad = G.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="G contains"):
        solve_permutation(bad, F, y)
    with pytest.raises(ValueError, match="method must be one of"):
        solve_permutation(G, F, y, method="anneal")
    with pytest.raises(ValueError, match="loss must be one of"):
        solve_permutation(G, F, y, loss="hinge")
    with pytest.raises(ValueError, match="use method='exhaustive'"):
        solve_permutation(G, F[:, :, :1], (y[:, 0] > 0).astype(float), loss="logistic", method="faq")
    with pytest.raises(ValueError, match="static-gate"):
        solve_permutation(G, F, y, method="faq")
    with pytest.raises(ValueError, match="x0 must be a permutation"):
        solve_permutation(G, F, y, x0=[0, 0, 1, 2])
    with pytest.raises(ValueError, match="x0 must be a 1-D permutation"):
        solve_permutation(G, F, y, x0=[0, 1, 2])
    with pytest.raises(TypeError, match="accepted options are: max_n"):
        solve_permutation(G, F, y, method="exhaustive", tol=1.0)
    with pytest.raises(TypeError, match="accepted options are: maxiter, n_init, tol"):
        solve_permutation(G[0], F, y, method="faq", P0="barycenter")
    big_G, big_F, big_y = _instance(0, 11, B=4)
    with pytest.raises(ValueError, match="max_n=10"):
        solve_permutation(big_G, big_F, big_y, method="exhaustive")
    with pytest.raises(ValueError, match="max_n=16"):
        solve_permutation(np.ones(17) / 17, np.ones((2, 17)), np.ones(2), method="branch_and_bound")
    with pytest.raises(ValueError, match="perm must be a permutation"):
        permutation_loss([0, 1, 1, 3], G, F, y)
    with pytest.raises(ValueError, match="g must have shape"):
        qap_matrices(G[0, :3], F, y)


# ----------------------------------------------------------------------------- one vocabulary
def test_brute_force_is_a_deprecated_alias_of_exhaustive() -> None:
    G, F, y = _instance(4, 5)
    new = solve_permutation(G, F, y, method="exhaustive")
    with pytest.warns(DeprecationWarning, match="method='brute_force' is deprecated; use method='exhaustive'"):
        old = solve_permutation(G, F, y, method="brute_force")
    assert old.fun == new.fun and old.method == "exhaustive"
    np.testing.assert_array_equal(old.x, new.x)


@pytest.mark.parametrize("gate", ["per_example", "static"])
def test_squared_is_exactly_mse_loss(gate: str) -> None:
    """Every reported fun / bound is in mse_loss units: mean over examples and output units of (ŷ − y)²."""
    from routing_search.losses import mse_loss

    G, F, y = _instance(9, 5, u=3, gate=gate)
    for method in ("exhaustive", "branch_and_bound"):
        res = solve_permutation(G, F, y, method=method)
        pred = torch.tensor(np.einsum("bi,biu->bu", G, F[:, res.x]))
        assert res.fun == pytest.approx(float(mse_loss(pred, torch.tensor(y)).mean()), rel=1e-12)
        assert res.bound <= res.fun + 1e-12
    A, Bm, const = qap_matrices(G[0], F, y)
    p = np.array([4, 2, 0, 1, 3])
    pred = torch.tensor(np.einsum("i,biu->bu", G[0], F[:, p]))
    qap_value = float(np.sum(A * Bm[np.ix_(p, p)])) + const
    if gate == "static":
        assert qap_value == pytest.approx(float(mse_loss(pred, torch.tensor(y)).mean()), rel=1e-10)


def test_budget_stop_is_not_a_success_and_rng_is_checked() -> None:
    G, F, y = _instance(11, 7, gate="per_example")
    capped = solve_permutation(G, F, y, method="branch_and_bound", max_nodes=1)
    assert capped.status == 1 and capped.success is False and "max_nodes" in capped.message
    full = solve_permutation(G, F, y, method="branch_and_bound")
    assert full.status == 0 and full.success is True
    with pytest.raises(TypeError, match="rng must be None, a non-negative integer seed"):
        solve_permutation(G[0], F, y, method="faq", rng="seed")


def test_faq_that_runs_out_of_maxiter_reports_a_budget_stop():
    rng = np.random.default_rng(3)
    g = rng.dirichlet(np.ones(9))
    F, y = rng.normal(size=(50, 9, 2)), rng.normal(size=(50, 2))
    short = solve_permutation(g, F, y, method="faq", maxiter=1, rng=0)
    assert short.status == 1 and not short.success and "maxiter=1" in short.message
    assert np.isclose(short.fun, permutation_loss(short.x, g, F, y))
    done = solve_permutation(g, F, y, method="faq", rng=0)
    assert done.status == 0 and done.success and done.nit < 30


def test_faq_refuses_a_zero_sum_gate_naming_G():
    rng = np.random.default_rng(0)
    F, y = rng.normal(size=(20, 4, 1)), rng.normal(size=20)
    with pytest.raises(ValueError, match="gate weights G with a nonzero sum"):
        solve_permutation(np.zeros(4), F, y, method="2opt")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_outputs_and_targets_with_a_large_common_offset_are_solved_exactly(seed):
    """With F and y near 1e6 (± 1) the Gram form cancelled catastrophically: branch and bound certified a worse
    permutation (gap 0) or raised IndexError on a leaf it failed to close."""
    rng = np.random.default_rng(seed)
    B, n = 30, 5
    off = 10.0 ** [6, 4, 5][seed]
    F, y = off + rng.normal(size=(B, n, 1)), off + rng.normal(size=(B, 1))
    G = rng.dirichlet(np.ones(n), size=B) if seed % 2 else rng.dirichlet(np.ones(n))
    brute = min(permutation_loss(p, G, F, y) for p in itertools.permutations(range(n)))
    for method in ("exhaustive", "branch_and_bound"):
        res = solve_permutation(G, F, y, method=method)
        assert res.fun <= brute + 1e-9 * max(1.0, brute) and res.bound <= brute + 1e-9 * max(1.0, brute)
        assert res.status == 0 and np.isclose(res.fun, permutation_loss(res.x, G, F, y), rtol=0, atol=1e-12)
