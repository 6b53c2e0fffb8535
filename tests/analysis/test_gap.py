"""optimality_gap and frozen_arrays: the permutation gap against an independent brute force that re-runs
the model, ILS/auto behaviour, the subset gap against solve_subset/subset_objective, argument errors,
and the arrays handed to the exact solvers."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from routing_search.exact import solve_subset, subset_objective
from routing_search.analysis.gap import frozen_arrays, optimality_gap
from routing_search.gates import DSelectK, Softmax, TopK
from routing_search.layers import MoE, MultiGateMoE, make_experts
from routing_search.search.codes import set_selector_slot

D, B, N = 3, 40, 5
START = [3, 0, 4, 1, 2]  # a non-identity starting permutation


# ----------------------------------------------------------------------------- builders
def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(B, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _experts(u: int, seed: int = 0) -> nn.ModuleList:
    return make_experts(N, D, [4], u, generator=torch.Generator().manual_seed(seed)).double()


def _spread(module: nn.Module, seed: int) -> None:
    """Larger random parameters than the default init, so that permutations matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def mse_rows(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((pred - y) ** 2).sum(dim=1)


def two_task_rows(preds: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    return (preds[0].squeeze(1) - y[:, 0]) ** 2 + 0.5 * (preds[1].squeeze(1) - y[:, 1]) ** 2


def make_moe() -> tuple[MoE, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    gate = TopK(N, 2, D)
    _spread(gate, 1)
    moe = MoE(_experts(2), gate.double()).eval()
    moe.permutation.set(START)
    x = _x(0)
    y = torch.randn(B, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return moe, (x, y)


def make_multigate() -> tuple[MultiGateMoE, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    gates = [TopK(N, 2, D), Softmax(N, D)]
    for i, g in enumerate(gates):
        _spread(g, 10 + i)
    towers = [nn.Linear(2, 1), nn.Linear(2, 1)]
    for i, t in enumerate(towers):
        _spread(t, 20 + i)
    model = MultiGateMoE(
        _experts(2, seed=3), [g.double() for g in gates], [t.double() for t in towers], share_permutation=True, per_selector=False
    ).eval()
    assert len(model.permutations) == 1 and model.permutations[0].num_selectors == 1
    model.permutations[0].set(START)
    x = _x(4)
    y = torch.randn(B, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return model, (x, y)


CASES = {
    "moe": (make_moe, lambda out: out.output, mse_rows),
    "multigate": (make_multigate, lambda out: out.outputs, two_task_rows),
}


@torch.no_grad()
def brute_force(model: nn.Module, data, predict, loss) -> tuple[float, dict[tuple[int, ...], float]]:
    """Current loss and the loss of every single shared permutation row, by re-running the model."""
    x, y = data
    slot = model.permutations[0]
    saved = slot.get()
    current = float(loss(predict(model(x)), y).mean())
    values = {}
    try:
        for perm in itertools.permutations(range(N)):
            slot.set(list(perm))
            values[perm] = float(loss(predict(model(x)), y).mean())
    finally:
        slot.set(saved)
    return current, values


# ----------------------------------------------------------------------------- permutation gap
@pytest.mark.parametrize("case", sorted(CASES))
def test_permutation_gap_exhaustive_matches_brute_force(case):
    build, predict, loss = CASES[case]
    model, data = build()
    before = copy.deepcopy(model.state_dict())
    current, values = brute_force(model, data, predict, loss)
    best = min(values.values())
    assert current > best + 1e-6, "the starting permutation should not already be optimal"

    res = optimality_gap(model, data, loss, kind="permutation", method="exhaustive")
    assert res.certified is True
    assert res.method == "exhaustive"
    assert res.kind == "permutation"
    assert res.fun == pytest.approx(current, rel=1e-10, abs=1e-12)
    assert res.optimum == pytest.approx(best, rel=1e-10, abs=1e-12)
    assert res.gap == pytest.approx(current - best, rel=1e-9, abs=1e-12)
    assert res.gap >= 0
    assert res.relative_gap == pytest.approx(res.gap / abs(res.optimum), rel=1e-12)
    # The reported optimum is attained by the reported permutation, and the current one is reported.
    assert len(res.x) == 1 and res.x[0].shape == (1, N)
    assert values[tuple(int(v) for v in res.x[0][0])] == pytest.approx(best, rel=1e-10, abs=1e-12)
    np.testing.assert_array_equal(res.current_x[0], np.asarray([START]))
    # The model is untouched (apply=False inside).
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    # Moving the model onto the optimum closes the gap.
    model.permutations[0].set(res.x[0])
    again = optimality_gap(model, data, loss, kind="permutation", method="exhaustive")
    assert again.fun == pytest.approx(best, rel=1e-10, abs=1e-12)
    assert abs(again.gap) <= 1e-10
    assert again.optimum == pytest.approx(best, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("case", sorted(CASES))
def test_permutation_gap_ils_and_auto(case):
    build, _, loss = CASES[case]
    model, data = build()
    exact = optimality_gap(model, data, loss, method="exhaustive")

    ils = optimality_gap(model, data, loss, method="ils", rng=0, perturbations=3)
    assert ils.certified is False
    assert ils.method == "ils"
    assert ils.fun == pytest.approx(exact.fun, rel=1e-12)
    assert exact.optimum - 1e-12 <= ils.optimum <= ils.fun + 1e-12
    assert ils.gap == pytest.approx(ils.fun - ils.optimum, abs=1e-15)
    assert 0 <= ils.gap <= exact.gap + 1e-12  # a heuristic optimum gives a lower bound on the gap
    # Seeded ILS is deterministic.
    ils2 = optimality_gap(model, data, loss, method="ils", rng=0, perturbations=3)
    assert ils2.optimum == ils.optimum
    np.testing.assert_array_equal(ils2.x[0], ils.x[0])

    auto = optimality_gap(model, data, loss)  # 5! = 120 states <= max_states
    assert auto.method == "exhaustive" and auto.certified is True
    assert auto.optimum == pytest.approx(exact.optimum, rel=1e-12)
    small = optimality_gap(model, data, loss, method="auto", max_states=100, rng=0, perturbations=1)
    assert small.method == "ils" and small.certified is False
    with pytest.raises(ValueError, match="max_states"):
        optimality_gap(model, data, loss, method="exhaustive", max_states=100)


# ----------------------------------------------------------------------------- subset gap
def _static_dselect(slots: tuple[int, int], seed: int) -> DSelectK:
    gate = DSelectK(N, 2)
    with torch.no_grad():
        gate.alpha_logits.copy_(torch.randn(2, generator=torch.Generator().manual_seed(seed)))
    for selector, slot in enumerate(slots):
        set_selector_slot(gate, selector, slot)
    assert gate.is_binary()
    return gate.double()


def _static_topk(seed: int) -> TopK:
    gate = TopK(N, 2)
    with torch.no_grad():
        gate.logits.copy_(torch.randn(N, generator=torch.Generator().manual_seed(seed)))
    return gate.double()


def make_subset_model(kind: str, towers=None, gates=None) -> tuple[MultiGateMoE, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    if gates is None:
        gates = [_static_dselect((0, 3), 1), _static_dselect((4, 1), 2)] if kind == "dselect" else [_static_topk(1), _static_topk(2)]
    model = MultiGateMoE(_experts(1, seed=7), gates, towers).eval()
    for slot in model.permutations:  # non-identity permutations, so expert space != gate space
        slot.set(START)
    x = _x(8)
    with torch.no_grad():
        F = torch.cat([e(x) for e in model.experts], dim=1)  # [B, n]
    g = torch.Generator().manual_seed(9)
    y = torch.stack([0.6 * F[:, 2] + 0.4 * F[:, 4], 0.3 * F[:, 0] + 0.7 * F[:, 1]], dim=1)
    y = y + 0.1 * torch.randn(y.shape, generator=g, dtype=torch.float64)
    return model, (x, y)


@pytest.mark.parametrize("kind", ["dselect", "topk"])
def test_subset_gap_matches_exact_solvers(kind):
    model, data = make_subset_model(kind)
    x, y = data
    with torch.no_grad():
        static = [w[0].numpy() for w in model(x).weights]  # expert-space weights of each task
        F = torch.stack([e(x) for e in model.experts], dim=1).numpy()  # [B, n, 1]
    for w in static:
        assert int((w > 0).sum()) == 2

    res = optimality_gap(model, data, "squared", kind="subset", method="enumerate")
    bnb = optimality_gap(model, data, "squared", kind="subset", method="branch_and_bound")
    auto = optimality_gap(model, data, "squared", kind="subset")
    assert res.kind == "subset" and res.certified is True
    assert res.method == "enumerate" and bnb.method == "branch_and_bound" and auto.method == "enumerate"
    assert len(res.per_task) == 2
    for t in range(2):
        G, W, Ft = frozen_arrays(model, data, task=t)
        np.testing.assert_allclose(Ft, F, rtol=0, atol=1e-12)
        np.testing.assert_allclose(W[0], static[t], rtol=0, atol=1e-12)
        expected = solve_subset(Ft, y[:, t].numpy(), 2, method="enumerate")
        current = subset_objective(static[t], F, y[:, t].numpy())
        p = res.per_task[t]
        assert p["optimum"] == pytest.approx(expected.fun, rel=1e-9, abs=1e-12)
        assert p["current"] == pytest.approx(current, rel=1e-12, abs=1e-15)
        assert p["gap"] == pytest.approx(current - expected.fun, rel=1e-9, abs=1e-12)
        assert p["gap"] >= -1e-12 and p["feasible"] is True and p["current_support"] == 2
        assert p["optimal_support"] == [int(i) for i in expected.support]
        assert bnb.per_task[t]["optimum"] == pytest.approx(p["optimum"], rel=1e-8, abs=1e-10)
        np.testing.assert_allclose(res.x[t], expected.x, atol=1e-8)
        np.testing.assert_allclose(res.current_x[t], static[t], atol=1e-12)
        # Direct check of the squared-loss convention: ½‖ŷ − y‖² averaged over examples.
        pred = F[:, :, 0] @ static[t]
        assert p["current"] == pytest.approx(0.5 * np.mean((pred - y[:, t].numpy()) ** 2), rel=1e-12)
    assert res.fun == pytest.approx(np.mean([p["current"] for p in res.per_task]), rel=1e-12)
    assert res.optimum == pytest.approx(np.mean([p["optimum"] for p in res.per_task]), rel=1e-12)
    assert res.gap == pytest.approx(res.fun - res.optimum, abs=1e-15)
    assert bnb.optimum == pytest.approx(res.optimum, rel=1e-8, abs=1e-10)
    assert res.x.shape == (2, N) and res.current_x.shape == (2, N)


def test_subset_gap_logistic_and_k_option():
    model, (x, y) = make_subset_model("dselect")
    labels = (y > y.median(dim=0).values).double()
    res = optimality_gap(model, (x, labels), "logistic", kind="subset")
    with torch.no_grad():
        static = [w[0].numpy() for w in model(x).weights]
    for t in range(2):
        _, _, F = frozen_arrays(model, (x, labels), task=t)
        expected = solve_subset(F, labels[:, t].numpy(), 2, loss="logistic")
        assert res.per_task[t]["optimum"] == pytest.approx(expected.fun, rel=1e-7, abs=1e-9)
        assert res.per_task[t]["current"] == pytest.approx(subset_objective(static[t], F, labels[:, t].numpy(), loss="logistic"), rel=1e-12)
    # k=1: the current 2-expert weights are infeasible; the message says the gap may be negative.
    one = optimality_gap(model, (x, y), "squared", kind="subset", k=1)
    assert all(not p["feasible"] for p in one.per_task)
    assert "more than k" in one.message
    for p in one.per_task:
        assert len(p["optimal_support"]) == 1


def test_subset_gap_single_gate_moe():
    gate = _static_topk(3)
    moe = MoE(_experts(2, seed=11), gate).eval()
    moe.permutation.set(START)
    x = _x(12)
    y = torch.randn(B, 2, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    res = optimality_gap(moe, (x, y), "squared", kind="subset")
    with torch.no_grad():
        w = moe(x).weights[0].numpy()
        F = torch.stack([e(x) for e in moe.experts], dim=1).numpy()
    assert res.fun == pytest.approx(subset_objective(w, F, y.numpy()), rel=1e-12)
    assert res.optimum == pytest.approx(solve_subset(F, y.numpy(), 2).fun, rel=1e-9, abs=1e-12)
    assert res.gap >= -1e-12


def test_subset_gap_errors():
    model, data = make_subset_model("dselect")
    bad, _ = make_subset_model("dselect", towers=[nn.Linear(1, 1).double(), nn.Identity()])
    with pytest.raises(ValueError, match="identity"):
        optimality_gap(bad, data, "squared", kind="subset")
    optimality_gap(bad, data, two_task_rows, kind="permutation", method="ils", rng=0, perturbations=1)  # any towers
    torch.manual_seed(0)
    per_example = [Softmax(N, D).double(), _static_dselect((0, 1), 3)]
    dyn, _ = make_subset_model("dselect", gates=per_example)
    with pytest.raises(ValueError, match="static"):
        optimality_gap(dyn, data, "squared", kind="subset")
    with pytest.raises(ValueError, match="kind"):
        optimality_gap(model, data, "squared", kind="sets")
    with pytest.raises(ValueError, match="method"):
        optimality_gap(model, data, "squared", kind="subset", method="exhaustive")
    with pytest.raises(ValueError, match="method"):
        optimality_gap(model, data, two_task_rows, kind="permutation", method="branch_and_bound")
    with pytest.raises(ValueError, match="loss"):
        optimality_gap(model, data, "hinge", kind="subset")
    with pytest.raises(TypeError, match="bogus"):
        optimality_gap(model, data, two_task_rows, kind="permutation", bogus=1)
    with pytest.raises(TypeError, match="max_states"):  # a permutation-only option
        optimality_gap(model, data, "squared", kind="subset", max_states=10)
    with pytest.raises(TypeError, match="perturbations"):
        optimality_gap(model, data, "squared", kind="subset", perturbations=2)
    with pytest.raises(ValueError, match="k must be"):
        optimality_gap(model, data, "squared", kind="subset", k=N + 1)
    for task in (2, -1):
        with pytest.raises(ValueError, match="task"):
            frozen_arrays(model, data, task=task)


# ----------------------------------------------------------------------------- frozen_arrays
def test_frozen_arrays_plain_gate():
    moe, (x, y) = make_moe()
    G, W, F = frozen_arrays(moe, (x, y))
    with torch.no_grad():
        out = moe(x)
        gate_w = moe.gate(x).weights.numpy()
        stacked = torch.stack([e(x) for e in moe.experts], dim=1).numpy()
    assert G.shape == (B, N) and W.shape == (B, N) and F.shape == (B, N, 2)
    assert G.dtype == W.dtype == F.dtype == np.float64
    np.testing.assert_allclose(G, gate_w, rtol=0, atol=1e-14)
    for i, e in enumerate(START):
        np.testing.assert_array_equal(W[:, e], G[:, i])
    assert not np.array_equal(W, G)
    np.testing.assert_allclose(W, out.weights.numpy(), rtol=0, atol=1e-14)
    np.testing.assert_allclose(F, stacked, rtol=0, atol=1e-14)


def test_frozen_arrays_multigate_task():
    model, (x, y) = make_multigate()
    with torch.no_grad():
        out = model(x)
        stacked = torch.stack([e(x) for e in model.experts], dim=1).numpy()
    for t in range(2):
        G, W, F = frozen_arrays(model, (x, y), task=t)
        with torch.no_grad():
            np.testing.assert_allclose(G, model.gates[t](x).weights.numpy(), rtol=0, atol=1e-14)
        for i, e in enumerate(START):
            np.testing.assert_array_equal(W[:, e], G[:, i])
        np.testing.assert_allclose(W, out.weights[t].numpy(), rtol=0, atol=1e-14)
        np.testing.assert_allclose(F, stacked, rtol=0, atol=1e-14)


def test_permutation_objective_feeds_the_landscape() -> None:
    """The landscape of a real model: its global optimum is the exhaustive search's optimum."""
    from routing_search.analysis import permutation_objective
    from routing_search.exact import landscape
    from routing_search.search import local_search

    torch.manual_seed(3)
    n = 5
    moe = MoE(make_experts(n, 4, [6], 2), TopK(num_experts=n, k=2, input_dim=4))
    x, y = torch.randn(64, 4), torch.randn(64, 2)
    loss = lambda p, t: ((p - t) ** 2).mean(dim=1)  # noqa: E731
    f = permutation_objective(moe, (x, y), loss)
    before = moe.permutation.get().copy()
    summary = landscape(f, n, space="permutations", move="swap")
    assert np.array_equal(moe.permutation.get(), before)  # evaluating the landscape changes nothing
    best = local_search(moe, (x, y), loss, "exhaustive", apply=False)
    assert summary.global_loss == pytest.approx(best.fun, abs=1e-6)
    with torch.no_grad():
        moe.permutation.set(list(summary.global_optimum))
        assert float(loss(moe(x).output, y).mean()) == pytest.approx(summary.global_loss, abs=1e-6)
    assert sum(summary.basin_sizes.values()) == summary.num_nodes


def test_permutation_objective_needs_one_row() -> None:
    from routing_search.analysis import permutation_objective
    from routing_search.gates import DSelectK

    moe = MoE(make_experts(4, 3, [4], 1), DSelectK(num_experts=4, k=2))
    with pytest.raises(ValueError, match="one permutation row"):
        permutation_objective(moe, (torch.randn(8, 3), torch.randn(8, 1)), lambda p, t: ((p - t) ** 2).mean(1))
