"""Tests for routing_search.exact.subset_solver: exactness against independent brute force, certificates, errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from routing_search.exact.subset_solver import _Squared, solve_subset, subset_objective
from routing_search.losses import bce_with_logits_loss, mse_loss


def _instance(seed: int, B: int, n: int, u: int, *, loss: str = "squared"):
    rng = np.random.default_rng(seed)
    F = rng.normal(size=(B, n, u))
    if loss == "squared":
        y = rng.normal(size=(B, u))
    else:
        F = F[:, :, :1]
        w = rng.dirichlet(np.ones(n))
        logits = 2.0 * np.einsum("i,bi->b", w, F[:, :, 0])
        y = (rng.random(B) < 1.0 / (1.0 + np.exp(-logits))).astype(float)
    return F, y


def _slsqp_face(F: np.ndarray, y: np.ndarray, support: tuple[int, ...], loss: str) -> float:
    """Independent face solve: SLSQP from several starts on the objective evaluated from the data."""
    m = len(support)

    def f(v: np.ndarray) -> float:
        w = np.zeros(F.shape[1])
        w[list(support)] = v
        return subset_objective(w, F, y, loss)

    best = np.inf
    starts = [np.full(m, 1.0 / m)] + [np.eye(m)[i] * 0.9 + 0.1 / m for i in range(m)]
    for x0 in starts:
        res = minimize(
            f, x0, method="SLSQP", bounds=[(0.0, 1.0)] * m,
            constraints=[{"type": "eq", "fun": lambda v: v.sum() - 1.0}],
            options={"ftol": 1e-14, "maxiter": 500},
        )
        v = np.clip(res.x, 0.0, None)
        best = min(best, f(v / v.sum()))
    return best


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_exhaustive_matches_independent_brute_force_squared(seed: int, k: int) -> None:
    n = 6
    F, y = _instance(seed, 40, n, 2)
    res = solve_subset(F, y, k, method="exhaustive")
    face_values = {}
    for support in itertools.combinations(range(n), k):
        exact = solve_subset(F[:, list(support)], y, k, method="exhaustive")  # the face problem alone
        ref = _slsqp_face(F, y, support, "squared")
        assert exact.fun <= ref + 1e-9
        assert exact.fun == pytest.approx(ref, abs=1e-6)
        face_values[support] = exact.fun
    assert res.fun == pytest.approx(min(face_values.values()), abs=1e-12)
    assert res.gap == 0.0 and res.bound == res.fun
    assert res.nit == res.nodes_explored == len(face_values)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_exhaustive_matches_independent_brute_force_logistic(k: int) -> None:
    n = 6
    F, y = _instance(3, 60, n, 1, loss="logistic")
    res = solve_subset(F, y, k, loss="logistic", method="exhaustive")
    ref = min(_slsqp_face(F, y, s, "logistic") for s in itertools.combinations(range(n), k))
    assert res.fun <= ref + 1e-9
    assert res.fun == pytest.approx(ref, abs=1e-6)
    assert 0.0 <= res.gap <= 1e-8 and res.bound <= res.fun


@pytest.mark.parametrize("loss", ["squared", "logistic"])
@pytest.mark.parametrize("seed, n", [(0, 5), (1, 8), (2, 10)])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_branch_and_bound_equals_exhaustive(loss: str, seed: int, n: int, k: int) -> None:
    F, y = _instance(10 + seed, 60, n, 2 if loss == "squared" else 1, loss=loss)
    enum = solve_subset(F, y, k, loss=loss, method="exhaustive")
    bnb = solve_subset(F, y, k, loss=loss, method="branch_and_bound")
    assert bnb.success
    assert bnb.fun == pytest.approx(enum.fun, rel=1e-8, abs=1e-10)
    assert bnb.bound <= bnb.fun and 0.0 <= bnb.gap <= 1e-8 * max(1.0, abs(bnb.fun))
    assert bnb.bound <= enum.fun + 1e-12  # a proven lower bound cannot exceed the optimum


def test_branch_and_bound_random_targets_several_seeds() -> None:
    """Harder (unplanted, many useful experts) squared instances, n = 10, k = 3."""
    for seed in range(4):
        rng = np.random.default_rng(100 + seed)
        F = rng.normal(size=(30, 10, 3)) + rng.normal(size=(1, 10, 3))
        y = rng.normal(size=(30, 3))
        enum = solve_subset(F, y, 3)
        bnb = solve_subset(F, y, 3, method="branch_and_bound")
        assert bnb.fun == pytest.approx(enum.fun, rel=1e-9)
        assert np.array_equal(bnb.support, enum.support)


@pytest.mark.parametrize("method", ["exhaustive", "branch_and_bound"])
def test_planted_sparse_instance_is_recovered(method: str) -> None:
    rng = np.random.default_rng(7)
    n, k = 12, 3
    w_star = np.zeros(n)
    w_star[[2, 5, 9]] = [0.5, 0.3, 0.2]
    F = rng.normal(size=(80, n, 2))
    y = np.einsum("i,biu->bu", w_star, F)
    res = solve_subset(F, y, k, method=method)
    assert res.support.tolist() == [2, 5, 9]
    assert res.fun == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(res.x, w_star, atol=1e-8)


@pytest.mark.parametrize("method", ["exhaustive", "branch_and_bound"])
@pytest.mark.parametrize("loss", ["squared", "logistic"])
def test_result_fields(method: str, loss: str) -> None:
    F, y = _instance(5, 50, 7, 1, loss=loss)
    res = solve_subset(F, y, 2, loss=loss, method=method)
    assert res.x.shape == (7,)
    assert np.all(res.x >= 0) and res.x.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.count_nonzero(res.x) <= 2
    assert res.support.tolist() == sorted(np.flatnonzero(res.x).tolist())
    assert np.all(res.x[np.setdiff1d(np.arange(7), res.support)] == 0.0)
    assert res.fun == pytest.approx(subset_objective(res.x, F, y, loss), abs=1e-14)
    for field in ("nit", "nfev", "nodes_explored"):
        assert isinstance(res[field], int) and res[field] >= 1
    assert res.success and isinstance(res.message, str)
    assert res.bound <= res.fun and res.gap >= 0.0


def test_k_equals_n_and_duplicate_experts() -> None:
    rng = np.random.default_rng(2)
    F = rng.normal(size=(30, 4, 2))
    F = np.concatenate([F, F[:, :1]], axis=1)  # expert 4 duplicates expert 0: singular KKT systems
    y = rng.normal(size=(30, 2))
    for k in (1, 2, 5):
        enum = solve_subset(F, y, k)
        bnb = solve_subset(F, y, k, method="branch_and_bound")
        assert bnb.fun == pytest.approx(enum.fun, rel=1e-9, abs=1e-12)
        assert np.count_nonzero(enum.x) <= k
    for seed in range(3):  # fewer data dimensions than experts: rank-deficient Gram matrix
        rng = np.random.default_rng(seed)
        F_low, y_low = rng.normal(size=(2, 8, 1)), rng.normal(size=(2, 1))
        for k in (2, 3):
            enum = solve_subset(F_low, y_low, k)
            bnb = solve_subset(F_low, y_low, k, method="branch_and_bound")
            assert bnb.fun == pytest.approx(enum.fun, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_active_set_relaxation_is_exact(seed: int) -> None:
    """The simplex-QP active-set solve (B&B bounds) equals exhaustive sub-face KKT enumeration."""
    rng = np.random.default_rng(seed)
    n = 9
    F = rng.normal(size=(40, n, 2)) + rng.normal(size=(1, n, 2))
    y = rng.normal(size=(40, 2))
    problem = _Squared(F, y, 1e-12, 500)
    every = np.arange(n)
    w = problem.active_set(every)
    assert w is not None  # the exact path ran (no SLSQP fallback)
    exact = problem.solve_face(every)
    assert problem.value(every, w) == pytest.approx(exact.value, rel=1e-12, abs=1e-14)
    relax = problem.solve_relaxation(every)
    assert relax.value - relax.lower <= 1e-12  # certified tight
    # k = n: branch and bound closes at the root with the same optimum
    assert solve_subset(F, y, n, method="branch_and_bound").fun == pytest.approx(
        solve_subset(F, y, n).fun, rel=1e-12
    )


def test_two_dimensional_inputs_and_torch() -> None:
    rng = np.random.default_rng(4)
    F2 = rng.normal(size=(25, 5))
    y1 = rng.normal(size=25)
    a = solve_subset(F2, y1, 2)
    b = solve_subset(F2[:, :, None], y1[:, None], 2)
    c = solve_subset(torch.tensor(F2), torch.tensor(y1), 2)
    assert a.fun == b.fun == c.fun
    np.testing.assert_array_equal(a.x, c.x)


def test_errors_name_the_argument() -> None:
    F, y = _instance(0, 20, 5, 2)
    with pytest.raises(ValueError, match="k must be in"):
        solve_subset(F, y, 6)
    with pytest.raises(ValueError, match="k must be in"):
        solve_subset(F, y, 0)
    with pytest.raises(TypeError, match="k must be an integer"):
        solve_subset(F, y, 1.5)
    with pytest.raises(ValueError, match="y must have shape"):
        solve_subset(F, y[:, :1], 2)
    with pytest.raises(ValueError, match="F must have shape"):
        solve_subset(F[None], y, 2)
    bad = F.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="F contains 1 NaN/inf"):
        solve_subset(bad, y, 2)
    with pytest.raises(ValueError, match="y contains"):
        solve_subset(F, np.full_like(y, np.inf), 2)
    with pytest.raises(ValueError, match="method must be one of"):
        solve_subset(F, y, 2, method="magic")
    with pytest.raises(ValueError, match="loss must be one of"):
        solve_subset(F, y, 2, loss="hinge")
    with pytest.raises(ValueError, match="u=1"):
        solve_subset(F, y, 2, loss="logistic")
    with pytest.raises(ValueError, match="binary targets"):
        solve_subset(F[:, :, 0], y[:, 0], 2, loss="logistic")
    with pytest.raises(TypeError, match="accepted options are: ftol, max_nodes, maxiter, tol"):
        solve_subset(F, y, 2, method="branch_and_bound", max_supports=3)
    with pytest.raises(TypeError, match="unknown option"):
        solve_subset(F, y, 2, tol=1e-3)
    with pytest.raises(TypeError, match="rng must be"):
        solve_subset(F, y, 2, rng="seed")
    with pytest.raises(ValueError, match="max_supports"):
        solve_subset(F, y, 2, max_supports=3)


def test_max_nodes_returns_valid_bound() -> None:
    rng = np.random.default_rng(9)
    F = rng.normal(size=(30, 10, 2)) + rng.normal(size=(1, 10, 2))
    y = rng.normal(size=(30, 2))
    enum = solve_subset(F, y, 3)
    capped = solve_subset(F, y, 3, method="branch_and_bound", max_nodes=1)
    assert capped.nit == 1
    assert capped.bound <= enum.fun + 1e-12 <= capped.fun + 1e-12
    assert capped.status == 1 and capped.success is False  # a budget stop is not a success
    assert "max_nodes" in capped.message


# ----------------------------------------------------------------------------- one vocabulary
def test_enumerate_is_a_deprecated_alias_of_exhaustive() -> None:
    F, y = _instance(0, 30, 5, 2)
    new = solve_subset(F, y, 2, method="exhaustive")
    with pytest.warns(DeprecationWarning, match="method='enumerate' is deprecated; use method='exhaustive'"):
        old = solve_subset(F, y, 2, method="enumerate")
    assert old.fun == new.fun and old.method == "exhaustive"
    np.testing.assert_array_equal(old.x, new.x)


@pytest.mark.parametrize("u", [1, 3])
def test_squared_is_exactly_mse_loss(u: int) -> None:
    """'squared' is the mean over examples of the mean over output units of (ŷ − y)² (not ½‖·‖²)."""
    F, y = _instance(6, 40, 5, u)
    w = np.array([0.1, 0.0, 0.6, 0.3, 0.0])
    pred = torch.tensor(np.einsum("i,biu->bu", w, F))
    expected = float(mse_loss(pred, torch.tensor(y)).mean())
    assert subset_objective(w, F, y) == pytest.approx(expected, rel=1e-12)
    for method in ("exhaustive", "branch_and_bound"):
        res = solve_subset(F, y, 2, method=method)
        best_pred = torch.tensor(np.einsum("i,biu->bu", res.x, F))
        assert res.fun == pytest.approx(float(mse_loss(best_pred, torch.tensor(y)).mean()), rel=1e-12)
        assert res.bound <= res.fun + 1e-15
    # ... and 'logistic' is bce_with_logits_loss
    Fb, yb = _instance(7, 40, 5, 1, loss="logistic")
    z = torch.tensor(np.einsum("i,bi->b", w, Fb[:, :, 0]))
    assert subset_objective(w, Fb, yb, "logistic") == pytest.approx(float(bce_with_logits_loss(z, torch.tensor(yb)).mean()), rel=1e-12)


def test_result_status_and_rng_checked() -> None:
    F, y = _instance(1, 30, 6, 2)
    res = solve_subset(F, y, 2, rng=np.random.default_rng(0))
    assert res.status == 0 and res.success is True
    assert solve_subset(F, y, 2, rng=3).fun == res.fun  # rng is unused: deterministic
    with pytest.raises(ValueError, match="rng must be a non-negative integer seed"):
        solve_subset(F, y, 2, rng=-1)


def test_callable_loss_is_refused_with_the_alternative() -> None:
    F, y = _instance(1, 30, 6, 2)
    with pytest.raises(TypeError, match="loss NAME.*optimality_gap"):
        solve_subset(F, y, 2, loss=lambda p, t: ((p - t) ** 2).mean())


@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_outputs_and_targets_with_a_large_common_offset_are_solved_exactly(offset):
    """With F and y near 1e4 (± 1) the squared loss' Gram form cancelled: both methods certified (gap 0) a
    support whose loss was 0.08–0.35 above the optimum on the segment between two experts."""
    rng = np.random.default_rng(1)
    B, n, k = 30, 5, 2
    F, y = offset + rng.normal(size=(B, n, 1)), offset + rng.normal(size=(B, 1))
    grid = np.linspace(0.0, 1.0, 401)
    best = np.inf
    for a, b in itertools.combinations(range(n), 2):
        for t in grid:
            w = np.zeros(n)
            w[a], w[b] = t, 1.0 - t
            best = min(best, subset_objective(w, F, y))
    for method in ("exhaustive", "branch_and_bound"):
        res = solve_subset(F, y, k, method=method)
        assert res.fun <= best + 1e-9 and res.bound <= res.fun and res.status == 0
