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
from routing_search.analysis import frozen_arrays, optimality_gap
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

    res = optimality_gap(model, data, "squared", kind="subset", method="exhaustive")
    bnb = optimality_gap(model, data, "squared", kind="subset", method="branch_and_bound")
    auto = optimality_gap(model, data, "squared", kind="subset")
    assert res.kind == "subset" and res.certified is True
    assert res.method == "exhaustive" and bnb.method == "branch_and_bound" and auto.method == "exhaustive"
    assert len(res.per_task) == 2
    for t in range(2):
        G, W, Ft = frozen_arrays(model, data, task=t)
        np.testing.assert_allclose(Ft, F, rtol=0, atol=1e-12)
        np.testing.assert_allclose(W[0], static[t], rtol=0, atol=1e-12)
        expected = solve_subset(Ft, y[:, t].numpy(), 2, method="exhaustive")
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
        # Direct check of the squared-loss convention: the mean squared error (as mse_loss), not ½‖ŷ − y‖².
        pred = F[:, :, 0] @ static[t]
        assert p["current"] == pytest.approx(np.mean((pred - y[:, t].numpy()) ** 2), rel=1e-12)
    # Totals are the sum over tasks, as multitask_loss(['mse', 'mse']) would report.
    assert res.fun == pytest.approx(np.sum([p["current"] for p in res.per_task]), rel=1e-12)
    assert res.optimum == pytest.approx(np.sum([p["optimum"] for p in res.per_task]), rel=1e-12)
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
    with pytest.raises(ValueError, match="method must be one of 'auto', 'exhaustive', 'branch_and_bound'"):
        optimality_gap(model, data, "squared", kind="subset", method="ils")
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


# ----------------------------------------------------------------------------- one vocabulary and units
def test_squared_subset_and_mse_permutation_report_the_same_fun() -> None:
    """The same model shows the same loss under kind='subset' ('squared') and kind='permutation' (mse_loss).

    Before, the exact side used ½·squared error: the subset fun was half the permutation fun.
    """
    from routing_search.losses import mse_loss, multitask_loss

    gate = _static_topk(3)
    moe = MoE(_experts(2, seed=11), gate).eval()
    moe.permutation.set(START)
    x = _x(12)
    y = torch.randn(B, 2, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    sub = optimality_gap(moe, (x, y), "squared", kind="subset")
    per = optimality_gap(moe, (x, y), mse_loss, kind="permutation")
    named = optimality_gap(moe, (x, y), "squared", kind="permutation")
    with torch.no_grad():
        direct = float(mse_loss(moe(x).output, y).mean())
    assert sub.fun == pytest.approx(direct, rel=1e-12)
    assert per.fun == pytest.approx(direct, rel=1e-12)
    assert named.fun == per.fun and named.optimum == per.optimum
    # A multi-gate MoE (identity towers): 'squared' is the sum over tasks, as multitask_loss(['mse'] * T).
    model, data = make_subset_model("dselect")
    sub = optimality_gap(model, data, "squared", kind="subset")
    per = optimality_gap(model, data, multitask_loss(["mse", "mse"]), kind="permutation")
    named = optimality_gap(model, data, "squared", kind="permutation")
    assert sub.fun == pytest.approx(per.fun, rel=1e-12)
    assert named.fun == pytest.approx(per.fun, rel=1e-12) and named.optimum == pytest.approx(per.optimum, rel=1e-12)
    # multitask_loss weights are kept by kind='subset'; mse_loss is recognised for a single MoE.
    weighted = optimality_gap(model, data, multitask_loss(["mse", "mse"], [0.25, 1.0]), kind="subset")
    assert weighted.fun == pytest.approx(0.25 * sub.per_task[0]["current"] + sub.per_task[1]["current"], rel=1e-12)
    assert optimality_gap(moe, (x, y), mse_loss, kind="subset").fun == pytest.approx(direct, rel=1e-12)


def test_result_vocabulary_and_deprecated_method_names() -> None:
    model, data = make_subset_model("topk")
    res = optimality_gap(model, data, "squared", kind="subset")
    assert res.status == 0 and res.success is True and res.nit >= 1 and res.nfev >= 1
    with pytest.warns(DeprecationWarning, match="method='enumerate' is deprecated; use method='exhaustive'"):
        old = optimality_gap(model, data, "squared", kind="subset", method="enumerate")
    assert old.method == "exhaustive" and old.optimum == res.optimum
    moe, moe_data = make_moe()
    with pytest.warns(DeprecationWarning, match="method='brute_force' is deprecated"):
        perm = optimality_gap(moe, moe_data, mse_rows, method="brute_force")
    assert perm.method == "exhaustive" and perm.status == 0 and perm.success and perm.nit == perm.nfev == 120
    with pytest.raises(TypeError, match="rng must be None, a non-negative integer seed"):
        optimality_gap(moe, moe_data, mse_rows, method="ils", rng="seed")
    with pytest.raises(TypeError, match="loss must be one of 'squared', 'logistic' or a torch per-example callable"):
        optimality_gap(moe, moe_data, 3.0)
    with pytest.raises(TypeError, match="kind='subset' solves problem \\(2\\) for a named loss"):
        optimality_gap(model, data, two_task_rows, kind="subset")


def test_subset_gap_refuses_a_model_containing_the_layer() -> None:
    """Nothing computed wrong silently: a head after the MoE makes the mixture differ from the prediction."""
    moe = MoE(_experts(2, seed=11), _static_topk(3)).eval()
    wrapped = nn.Sequential(moe, _Output(), nn.Linear(2, 2).double())
    x = _x(12)
    y = torch.randn(B, 2, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    with pytest.raises(ValueError, match="must be the model itself"):
        optimality_gap(wrapped, (x, y), "squared", kind="subset")


class _Output(nn.Module):
    def forward(self, out):
        return out.output


# ----------------------------------------------------------------------------- per-task and per-selector
def make_per_task(num_tasks: int = 3):
    torch.manual_seed(0)
    gates = [TopK(N, 2, D) for _ in range(num_tasks)]
    for i, g in enumerate(gates):
        _spread(g, 30 + i)
    model = MultiGateMoE(_experts(1, seed=5), [g.double() for g in gates], per_selector=False).eval()
    assert len(model.permutations) == num_tasks
    for slot in model.permutations:
        slot.set(START)
    x = _x(6)
    y = torch.randn(B, num_tasks, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return model, (x, y)


@torch.no_grad()
def per_task_brute_force(model, data) -> tuple[np.ndarray, np.ndarray]:
    """Each task's current MSE and its best over the task's 5! rows, re-running the model for each."""
    x, y = data
    now, best = [], []
    for t, slot in enumerate(model.permutations):
        saved = slot.get()
        values = []
        for perm in itertools.permutations(range(N)):
            slot.set(list(perm))
            values.append(float(((model(x).outputs[t].squeeze(1) - y[:, t]) ** 2).mean()))
        slot.set(saved)
        now.append(float(((model(x).outputs[t].squeeze(1) - y[:, t]) ** 2).mean()))
        best.append(min(values))
    return np.array(now), np.array(best)


def test_per_task_permutations_are_solved_exactly_task_by_task() -> None:
    """3 tasks × 5 experts: 120³ ≈ 1.7M joint states, but the loss is a sum over tasks: 3 × 120 suffice."""
    from routing_search.losses import multitask_loss

    model, data = make_per_task()
    weights = [1.0, 0.5, 2.0]
    loss = multitask_loss(["mse"] * 3, weights)
    now, best = per_task_brute_force(model, data)
    res = optimality_gap(model, data, loss)  # auto: exact because separable
    assert res.method == "exhaustive" and res.certified and res.nit == 360
    assert "separately" in res.message
    assert res.fun == pytest.approx(float(np.dot(weights, now)), rel=1e-10)
    assert res.optimum == pytest.approx(float(np.dot(weights, best)), rel=1e-10)
    named = optimality_gap(model, data, "squared", method="exhaustive")
    assert named.optimum == pytest.approx(float(best.sum()), rel=1e-10)
    # The reported state attains the optimum when written into the model.
    with torch.no_grad():
        for slot, rows in zip(model.permutations, res.x):
            slot.set(rows)
        assert float(loss(model(data[0]).outputs, data[1]).mean()) == pytest.approx(res.optimum, rel=1e-10)


def test_a_loss_not_known_to_be_separable_is_said_so() -> None:
    model, data = make_per_task()
    weights = [1.0, 0.5, 2.0]

    def my_loss(preds, y):
        return sum(w * (p.squeeze(1) - y[:, t]) ** 2 for t, (p, w) in enumerate(zip(preds, weights)))

    with pytest.raises(ValueError, match=r"1728000 permutation states.*not known to be a sum over tasks.*separable=True.*360"):
        optimality_gap(model, data, my_loss, method="exhaustive")
    res = optimality_gap(model, data, my_loss, separable=True)
    assert res.certified and res.optimum == pytest.approx(float(np.dot(weights, per_task_brute_force(model, data)[1])), rel=1e-10)
    heuristic = optimality_gap(model, data, my_loss, rng=0, perturbations=1)  # auto: too many joint states
    assert heuristic.method == "ils" and not heuristic.certified and "1728000" in heuristic.message
    with pytest.raises(TypeError, match="separable must be"):
        optimality_gap(model, data, my_loss, separable="yes")


def test_per_selector_permutations_enumerate_the_product_exactly() -> None:
    """Per-example DSelect-k, k = 2 selectors, one permutation each: (4!)² = 576 joint states, brute-forced."""
    torch.manual_seed(1)
    n = 4
    gate = DSelectK(n, 2, D).double()
    _spread(gate, 41)
    moe = MoE(make_experts(n, D, [4], 2, generator=torch.Generator().manual_seed(2)).double(), gate).eval()
    assert moe.permutation.num_selectors == 2
    x, y = _x(3), torch.randn(B, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    res = optimality_gap(moe, (x, y), mse_rows)
    assert res.method == "exhaustive" and res.certified and res.nit == 576
    saved = moe.permutation.get()
    best = np.inf
    with torch.no_grad():
        for a in itertools.permutations(range(n)):
            for b in itertools.permutations(range(n)):
                moe.permutation.set([list(a), list(b)])
                best = min(best, float(mse_rows(moe(x).output, y).mean()))
        moe.permutation.set(saved)
    assert res.optimum == pytest.approx(best, rel=1e-10)


def test_per_selector_binary_gate_assigns_only_active_slots() -> None:
    """A static binary DSelect-k gate: each selector has one active slot, so n² states instead of (n!)²."""
    n = 8
    gate = DSelectK(n, 2)
    with torch.no_grad():
        gate.alpha_logits.copy_(torch.tensor([0.3, -0.2]))
    set_selector_slot(gate, 0, 1)
    set_selector_slot(gate, 1, 6)
    moe = MoE(make_experts(n, D, [4], 2, generator=torch.Generator().manual_seed(8)).double(), gate.double()).eval()
    x, y = _x(9), torch.randn(B, 2, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    res = optimality_gap(moe, (x, y), mse_rows)
    assert res.certified and res.nit == n * n
    # Every choice of the two selected experts (each selector has its own row: they may coincide).
    with torch.no_grad():
        F = torch.stack([e(x) for e in moe.experts], dim=1)
        w = moe.gate(x).selector_mix[0]
        best = min(float(mse_rows(w[0] * F[:, a] + w[1] * F[:, b], y).mean()) for a in range(n) for b in range(n))
        for slot, rows in zip(moe.permutations, res.x):
            slot.set(rows)
        assert float(mse_rows(moe(x).output, y).mean()) == pytest.approx(res.optimum, rel=1e-10)
    assert res.optimum == pytest.approx(best, rel=1e-10)
    # A per-example gate with every slot active: (6!)² states, refused with the size and the option to raise.
    torch.manual_seed(0)
    big = MoE(make_experts(6, D, [4], 2).double(), DSelectK(6, 2, D).double()).eval()
    with pytest.raises(ValueError, match=r"518400 permutation states.*max_states=50000; raise max_states"):
        optimality_gap(big, (x, y), mse_rows, method="exhaustive")


def test_permutation_gap_with_a_non_finite_loss_is_status_2_not_certified() -> None:
    """A NaN target gave status 0, success and certified=True with fun = optimum = gap = nan."""
    torch.manual_seed(0)
    moe = MoE(make_experts(4, 3, [8], 2), TopK(num_experts=4, k=2, input_dim=3)).eval()
    x, y = torch.randn(32, 3), torch.randn(32, 2)
    y[0, 0] = float("nan")
    for method in ("exhaustive", "ils", "auto"):
        with pytest.warns(RuntimeWarning, match="not finite"):
            res = optimality_gap(moe, (x, y), "squared", method=method, rng=0)
        assert res.status == 2 and not res.success and not res.certified
        assert np.isnan(res.gap) and np.isnan(res.optimum) and res.nit == 0


def test_subset_gap_uses_each_task_gates_own_k() -> None:
    """The default k was the first task gate's k for every task (k=1 for a k=3 gate here)."""
    torch.manual_seed(1)
    model = MultiGateMoE(make_experts(5, 3, [8], 1), [DSelectK(num_experts=5, k=1), DSelectK(num_experts=5, k=3)]).eval()
    x, y = torch.randn(48, 3), torch.randn(48, 2)
    res = optimality_gap(model, (x, y), "squared", kind="subset")
    F = frozen_arrays(model, (x, y))[2]
    for t, k in enumerate((1, 3)):
        assert res.per_task[t]["k"] == k
        assert np.isclose(res.per_task[t]["optimum"], solve_subset(F, y[:, t].numpy(), k).fun)
    fixed = optimality_gap(model, (x, y), "squared", kind="subset", k=2)
    assert [p["k"] for p in fixed.per_task] == [2, 2]
