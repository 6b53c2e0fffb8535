"""Guards of local_search: a move the loss accepts is undone when a validation metric gets worse."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from routing_search.gates import TopK
from routing_search.layers import MoE, make_experts
from routing_search.search import MetricGuard, SearchOptions, local_search
from routing_search.search.guards import check_guards
from routing_search.search.moves import insertion_moves
from routing_search.training.task_metrics import mse as mse_metric

METHODS = ["swap", "insertion", "rotation", "ils", "exhaustive", "callable"]


class Constant(nn.Module):
    """An expert that returns the same output on every row."""

    def __init__(self, value: list[float]) -> None:
        super().__init__()
        self.register_buffer("value", torch.tensor(value, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value.expand(x.shape[0], -1)


def rows_mse(pred, y):
    return ((pred - y) ** 2).mean(dim=1)


def column_mse(column: int):
    def metric(pred, y):
        return float(((pred[:, column] - y[:, column]) ** 2).mean())

    metric.__name__ = f"mse{column}"
    return metric


def _method(method: str):
    if method == "callable":
        return lambda row, rng: list(insertion_moves(row, rng)) + [row[::-1].copy()]
    return method


def _options(method: str) -> dict:
    return {"perturbations": 3, "strength": 2} if method == "ils" else {}


def conflict_case():
    """All weight on gate slot 0. Expert 1 is the loss-best (0.08) but worsens column 1; expert 2 is next
    (0.125) and leaves column 1 exact; expert 0 (the start) has loss 2."""
    gate = TopK(3, 1, 3).double()
    with torch.no_grad():
        gate.router.weight.zero_()
        gate.router.bias.copy_(torch.tensor([5.0, 0.0, 0.0]))
    moe = MoE([Constant([0.0, 0.0]), Constant([2.0, 0.4]), Constant([1.5, 0.0])], gate)
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([[2.0, 0.0]], dtype=torch.float64).expand(32, 2).clone()
    return moe, x, y


def slot0_expert(res) -> int:
    return int(res.x[0][0][0])


@pytest.mark.parametrize("method", METHODS)
def test_guard_rejects_the_loss_best_move_and_takes_another(method):
    moe, x, y = conflict_case()
    plain = local_search(copy.deepcopy(moe), (x, y), rows_mse, _method(method), rng=0, **_options(method))
    assert slot0_expert(plain) == 1 and plain.fun == pytest.approx(0.08)
    assert plain.guard_rejections == 0 and plain.guard is None
    guard = MetricGuard(column_mse(1), greater_is_better=False)
    res = local_search(moe, (x, y), rows_mse, _method(method), rng=0, guard=guard, **_options(method))
    assert slot0_expert(res) == 2 and res.fun == pytest.approx(0.125)
    assert res.guard_rejections >= 1
    assert res.guard["mse1"]["start"] == 0.0 and res.guard["mse1"]["end"] == 0.0
    assert np.array_equal(moe.permutation.get(), res.x[0])  # written back


def test_a_tolerance_lets_a_small_loss_of_the_metric_through():
    moe, x, y = conflict_case()
    res = local_search(moe, (x, y), rows_mse, "swap", guard=MetricGuard(column_mse(1), greater_is_better=False, tolerance=0.2))
    assert slot0_expert(res) == 1 and res.guard_rejections == 0
    assert res.guard["mse1"]["end"] == pytest.approx(0.16)


def random_case(seed: int = 3):
    torch.manual_seed(seed)  # the router's initialisation
    moe = MoE(make_experts(4, 3, [6], 2, generator=torch.Generator().manual_seed(seed)), TopK(4, 2, 3)).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(60, 3, generator=g, dtype=torch.float64)
    return moe, x, torch.randn(60, 2, generator=g, dtype=torch.float64)


def full_mse(pred, y):
    return float(((pred - y) ** 2).mean())


@pytest.mark.parametrize("method", METHODS)
def test_a_guard_opposed_to_the_loss_blocks_every_move_and_an_aligned_one_changes_nothing(method):
    moe, x, y = random_case()
    plain = local_search(copy.deepcopy(moe), (x, y), rows_mse, _method(method), rng=0, **_options(method))
    assert plain.nit >= 1  # the case has something to find
    start = moe.permutation.get().copy()
    blocked = local_search(copy.deepcopy(moe), (x, y), rows_mse, _method(method), rng=0, guard=full_mse, **_options(method))
    assert blocked.moves == [] and blocked.fun == blocked.fun0 and blocked.guard_rejections >= 1
    assert blocked.nit == 0 or method == "ils"  # ils counts the moves of descents from kicks it discarded
    np.testing.assert_array_equal(blocked.x[0], start)
    aligned = local_search(copy.deepcopy(moe), (x, y), rows_mse, _method(method), rng=0, **_options(method),
                           guard=MetricGuard(full_mse, greater_is_better=False))
    np.testing.assert_array_equal(aligned.x[0], plain.x[0])
    assert aligned.fun == plain.fun and aligned.nit == plain.nit and aligned.guard_rejections == 0


@pytest.mark.parametrize("strategy", ["best", "first"])
@pytest.mark.parametrize("method", METHODS)
def test_invariants_with_a_partly_conflicting_guard(method, strategy):
    moe, x, y = random_case(seed=7)
    start = moe.permutation.get().copy()
    guard = MetricGuard(column_mse(0), greater_is_better=False, tolerance=1e-3)
    # the descents' options (a method that would ignore one refuses it)
    descent = ({"strategy": strategy} if method != "exhaustive" else {}) | ({"screen": 2} if method in ("swap", "ils") else {})
    res = local_search(moe, (x, y), rows_mse, _method(method), rng=1, guard=guard, **descent, **_options(method))
    assert res.fun <= res.fun0
    with torch.no_grad():
        out = moe(x).output
    assert float(rows_mse(out, y).mean()) == pytest.approx(res.fun, rel=1e-12)
    end = column_mse(0)(out, y)
    assert res.guard["mse0"]["end"] == pytest.approx(end, rel=1e-12)
    assert end <= res.guard["mse0"]["start"] + 1e-3  # never violated at the end
    state = start.copy()  # the moves replay to x
    for move in res.moves:
        assert move.fun_after < move.fun_before
        if "state" in move.extra:
            state = np.asarray(move.extra["state"][0])
        else:
            assert list(state[move.selector]) == move.before
            state[move.selector] = move.after
    np.testing.assert_array_equal(state, res.x[0])


def test_code_moves_are_guarded(make_gate):
    torch.manual_seed(0)
    moe = MoE(make_experts(4, 3, [6], 2, generator=torch.Generator().manual_seed(1)), make_gate("dselect_static", 4, 3, seed=2, binary=True)).double()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(40, 3, generator=g, dtype=torch.float64), torch.randn(40, 2, generator=g, dtype=torch.float64)
    plain = local_search(copy.deepcopy(moe), (x, y), rows_mse, "codes")
    assert plain.nit >= 1
    before = {k: v.clone() for k, v in moe.gate.state_dict().items()}
    blocked = local_search(moe, (x, y), rows_mse, "codes", guard=full_mse)
    assert blocked.nit == 0 and blocked.guard_rejections >= 1 and blocked.fun == blocked.fun0
    for k, v in moe.gate.state_dict().items():  # every rejected code move was undone
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_a_task_metric_is_a_guard_by_duck_typing():
    moe, x, y = conflict_case()
    metric = mse_metric(task=None)
    assert check_guards(metric) == (metric,)
    guard = MetricGuard(column_mse(1), greater_is_better=False)
    res = local_search(moe, (x, y), rows_mse, "swap", guard=[metric, guard])
    # the whole-output MSE agrees with the loss; column 1 vetoes expert 1
    assert slot0_expert(res) == 2 and set(res.guard) == {repr(metric), "mse1"}


class Wrapper(nn.Module):
    def __init__(self, moe: MoE) -> None:
        super().__init__()
        self.moe = moe
        self.scale = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    def forward(self, x):
        return self.moe(x).output * self.scale


def test_a_wrapping_model_is_guarded_through_its_own_forward():
    moe, x, y = conflict_case()
    y = y * 2
    model = Wrapper(moe)
    plain = local_search(copy.deepcopy(model), (x, y), rows_mse, "swap")
    assert slot0_expert(plain) == 1
    res = local_search(model, (x, y), rows_mse, "swap", guard=MetricGuard(column_mse(1), greater_is_better=False))
    assert slot0_expert(res) == 2 and res.guard_rejections >= 1 and res.guard["mse1"]["end"] == 0.0


def test_guard_option_errors_name_guard():
    with pytest.raises(TypeError, match="guard"):
        SearchOptions(guard=5)
    with pytest.raises(TypeError, match="guard"):
        local_search(*_moe_data(), rows_mse, "swap", guard=[full_mse, "auc"])
    with pytest.raises(ValueError, match="guard tolerance"):
        MetricGuard(full_mse, tolerance=-0.1)
    with pytest.raises(TypeError, match="greater_is_better"):
        MetricGuard(full_mse, greater_is_better=1)
    with pytest.raises(ValueError, match="guard: the guards' names must differ"):
        SearchOptions(guard=[full_mse, full_mse])
    with pytest.raises(ValueError, match="guard: the metric"):
        local_search(*_moe_data(), rows_mse, "swap", guard=lambda p, y: float("nan"))
    assert SearchOptions(guard=full_mse).guard[0].name == "full_mse"


def _moe_data():
    moe, x, y = conflict_case()
    return moe, (x, y)


# ------------------------------------------------------------------------- a process group of one


@pytest.mark.parametrize("method", ["swap", "ils"])
def test_guard_in_a_group_of_one_process_equals_the_guard_alone(group_of_one, method):
    moe, x, y = conflict_case()
    guard = MetricGuard(column_mse(1), greater_is_better=False)
    alone = local_search(copy.deepcopy(moe), (x, y), rows_mse, method, rng=0, guard=guard, process_group=False, **_options(method))
    grouped = local_search(moe, (x, y), rows_mse, method, rng=0, guard=guard, **_options(method))  # the world group
    np.testing.assert_array_equal(alone.x[0], grouped.x[0])
    assert slot0_expert(grouped) == 2 and grouped.guard == alone.guard
    assert grouped.guard_rejections == alone.guard_rejections >= 1
