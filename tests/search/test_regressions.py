"""Regression tests for the search's silent wrong results (issue 9), each failing before its fix, and the
one-vocabulary rules of the search's front door (options, results, rng, module names)."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import pkgutil
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import routing_search.search as search_pkg
from routing_search.analysis import permutation_objective
from routing_search.batches import as_batch
from routing_search.gates import Softmax, TaskAware, TopK
from routing_search.layers import MoE, Permutation, make_experts
from routing_search.result import STATUS_BUDGET, STATUS_NONFINITE
from routing_search.search import METHODS, RoutingObjective, SearchOptions, local_search, option_names
from routing_search.search.codes import set_selector_slot
from routing_search.training import LocalSearcher

D, U, B, N = 3, 2, 48, 5


def mse_rows(pred, y):
    return ((pred - y) ** 2).sum(dim=1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_moe(seed: int = 0, n: int = N, gate: nn.Module | None = None) -> MoE:
    torch.manual_seed(seed)
    gate = gate if gate is not None else TopK(num_experts=n, k=2, input_dim=D)
    return MoE(make_experts(n, D, [6], U, generator=_gen(seed)).double(), gate.double())


def scrambled_problem(seed: int = 0, n: int = N):
    """A layer, data from a teacher with a hidden permutation, and a scrambled start."""
    layer = make_moe(seed, n)
    x = torch.randn(B, D, generator=_gen(seed + 1), dtype=torch.float64)
    teacher = copy.deepcopy(layer)
    teacher.permutation.set(np.random.default_rng(seed + 2).permutation(n))
    with torch.no_grad():
        y = teacher(x).output + 0.05 * torch.randn(B, U, generator=_gen(seed + 3), dtype=torch.float64)
    layer.permutation.set(np.random.default_rng(seed + 4).permutation(n))
    return layer, x, y


@torch.no_grad()
def loss_of(model: nn.Module, x, y) -> float:
    model.eval()
    out = model(x)
    return float(mse_rows(out.output if hasattr(out, "output") else out, y).mean())


def replay(start: list[np.ndarray], moves) -> list[np.ndarray]:
    """Apply a result's moves to the starting permutations."""
    state = [s.copy() for s in start]
    for m in moves:
        if m.kind in ("ils", "exhaustive"):
            state = [np.asarray(s) for s in m.extra["state"]]
        else:
            assert state[m.slot][m.selector].tolist() == m.before
            state[m.slot][m.selector] = m.after
    return state


# ----------------------------------------------------------------------------- batches
def test_dict_batches_with_different_integer_tasks_get_one_task_per_row():
    x1, x2 = torch.randn(3, D), torch.randn(2, D)
    y1, y2 = torch.randn(3, U), torch.randn(2, U)
    inputs, targets = as_batch([({"x": x1, "task": 0}, y1), ({"x": x2, "task": 1}, y2)])
    assert torch.equal(inputs["task"], torch.tensor([0, 0, 0, 1, 1]))
    assert torch.equal(inputs["x"], torch.cat([x1, x2])) and torch.equal(targets, torch.cat([y1, y2]))
    same, _ = as_batch([({"x": x1, "task": 1}, y1), ({"x": x2, "task": 1}, y2)])
    assert same["task"] == 1  # equal values stay plain
    mixed, _ = as_batch([({"x": x1, "task": torch.tensor(0)}, y1), ({"x": x2, "task": 1}, y2)])
    assert torch.equal(mixed["task"], torch.tensor([0, 0, 0, 1, 1]))
    with pytest.raises(TypeError, match="different keys"):
        as_batch([({"x": x1, "task": 0}, y1), ({"x": x2}, y2)])


def test_objective_on_batches_with_different_tasks_equals_the_per_row_task_tensor():
    n = 4
    gate = TaskAware.per_task([Softmax(n, D), TopK(n, 2, D)])
    layer = make_moe(3, n, gate)
    x = torch.randn(10, D, generator=_gen(4), dtype=torch.float64)
    y = torch.randn(10, U, generator=_gen(5), dtype=torch.float64)
    task = torch.tensor([0] * 6 + [1] * 4)
    whole = RoutingObjective(layer, ({"x": x, "task": task}, y), mse_rows, process_group=False)
    split = RoutingObjective(layer, [({"x": x[:6], "task": 0}, y[:6]), ({"x": x[6:], "task": 1}, y[6:])], mse_rows, process_group=False)
    assert split.fun == pytest.approx(whole.fun, rel=1e-12)
    first_task_only = RoutingObjective(layer, ({"x": x, "task": 0}, y), mse_rows, process_group=False)
    assert split.fun != pytest.approx(first_task_only.fun, rel=1e-9)


# ----------------------------------------------------------------------------- code moves, apply=False
def test_code_moves_with_apply_false_leave_the_gate_untouched_and_report_the_codes(make_gate):
    n = 4
    layer = MoE(make_experts(n, D, [5], U, generator=_gen(34)).double(), make_gate("dselect_static", n, D, seed=34, binary=True))
    x = torch.randn(B, D, generator=_gen(35), dtype=torch.float64)
    teacher = copy.deepcopy(layer)
    with torch.no_grad():
        for j in range(layer.gate.num_selectors):
            set_selector_slot(teacher.gate, j, (n - 1 - j) % n)
            set_selector_slot(layer.gate, j, j)
        y = teacher(x).output
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    res = local_search(layer, (x, y), mse_rows, "codes", apply=False)
    assert res.nit > 0 and res.fun < res.fun0
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert len(res.codes) == layer.gate.num_selectors
    applied = local_search(layer, (x, y), mse_rows, "codes")
    assert applied.codes == res.codes and applied.fun == pytest.approx(res.fun, rel=1e-12)
    assert loss_of(layer, x, y) == pytest.approx(res.fun, rel=1e-12)


# ----------------------------------------------------------------------------- ILS budget stop
@pytest.mark.parametrize("max_iter", [3, 7, 8, 9, 10, 11, 12, 40])
def test_ils_stopped_inside_a_kick_keeps_the_best_state_and_moves_lead_to_x(max_iter):
    # seed 24, n = 8: the first descent stops in a local optimum at 7 moves and a kick improves on it.
    layer, x, y = scrambled_problem(seed=24, n=8)
    start = [p.get() for p in layer.permutations]
    seen: list[float] = []
    res = local_search(
        layer, (x, y), mse_rows, "ils", rng=3, max_iter=max_iter, perturbations=30, strength=3,
        callback=lambda r: seen.append(r.fun),
    )
    for got, want in zip(replay(start, res.moves), res.x):
        np.testing.assert_array_equal(got, want)
    assert res.fun <= min(seen + [res.fun0]) + 1e-15  # no state visited was better than the returned one
    assert loss_of(layer, x, y) == pytest.approx(res.fun, rel=1e-12)
    if res.status == STATUS_BUDGET:
        assert not res.success and res.message == "max_iter reached"


# ----------------------------------------------------------------------------- nested models
class Wrapper(nn.Module):
    def __init__(self, moe: MoE, calls: int = 1) -> None:
        super().__init__()
        self.pre = nn.Linear(D, D).double()
        self.moe = moe
        self.calls = calls

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.pre(features))
        out = self.moe(x=h).output
        for _ in range(self.calls - 1):
            out = self.moe(torch.tanh(out @ torch.ones(U, D, dtype=out.dtype))).output
        return out


def test_nested_search_keeps_the_users_instance_forward_and_hooks():
    torch.manual_seed(11)
    moe = make_moe(11)
    net = Wrapper(moe)
    original = moe.forward
    seen = []

    def spy(*args, **kwargs):
        seen.append(1)
        return original(*args, **kwargs)

    moe.forward = spy  # a user's instance forward (e.g. installed by a hook library)
    moe.register_forward_hook(lambda m, a, out: dataclasses.replace(out, output=out.output * 2.0))
    x = torch.randn(B, D, generator=_gen(12), dtype=torch.float64)
    y = torch.randn(B, U, generator=_gen(13), dtype=torch.float64)
    res = local_search(net, ({"features": x}, y), mse_rows, "swap")
    assert moe.__dict__.get("forward") is spy
    assert seen  # the user's forward still ran
    with torch.no_grad():
        assert float(mse_rows(net(x), y).mean()) == pytest.approx(res.fun, rel=1e-12)  # hooks included


def test_a_model_calling_the_layer_twice_is_refused():
    net = Wrapper(make_moe(14), calls=2)
    x = torch.randn(B, D, generator=_gen(15), dtype=torch.float64)
    y = torch.randn(B, U, generator=_gen(16), dtype=torch.float64)
    before = net.moe.permutation.get()
    with pytest.raises(ValueError, match="calls the chosen MoE layer 2 times"):
        local_search(net, (x, y), mse_rows, "swap")
    np.testing.assert_array_equal(net.moe.permutation.get(), before)


def test_nested_inputs_with_the_users_own_keyword_names():
    net = Wrapper(make_moe(17))
    x = torch.randn(B, D, generator=_gen(18), dtype=torch.float64)
    y = torch.randn(B, U, generator=_gen(19), dtype=torch.float64)
    searcher = LocalSearcher(net, mse_rows, method="swap")
    res = searcher(({"features": x}, y))
    with torch.no_grad():
        assert float(mse_rows(net(x), y).mean()) == pytest.approx(res.fun, rel=1e-12)


# ----------------------------------------------------------------------------- permutations checked
@pytest.mark.parametrize("bad", [[0, 0, 1, 2, 3], [0, 1, 2, 3, 5], [0, 1, 2, 3], [-1, 0, 1, 2, 3]])
def test_non_permutations_are_refused_everywhere(bad):
    layer, x, y = scrambled_problem(seed=20)
    f = permutation_objective(layer, (x, y), mse_rows)
    assert np.isfinite(f(list(range(N))))
    with pytest.raises(ValueError, match="perm"):
        f(bad)
    obj = RoutingObjective(layer, (x, y), mse_rows)
    with pytest.raises(ValueError, match="state"):
        obj.value_of([np.asarray(bad)])
    with pytest.raises(ValueError, match="state"):
        obj.set_state([np.asarray(bad)])


def test_loading_a_corrupt_permutation_buffer_raises_naming_the_key():
    layer = make_moe(21)
    state = layer.state_dict()
    state["permutation.index"] = torch.tensor([[0, 0, 1, 2, 3]])
    fresh = make_moe(21)
    with pytest.raises(ValueError, match="'permutation.index'"):
        fresh.load_state_dict(state)
    assert fresh.permutation.is_identity
    good = Permutation(4, 2)
    good.load_state_dict({"index": torch.tensor([[3, 2, 1, 0], [1, 0, 3, 2]])})
    np.testing.assert_array_equal(good.get(), [[3, 2, 1, 0], [1, 0, 3, 2]])


# ----------------------------------------------------------------------------- empty and non-finite data
def test_zero_rows_are_refused_naming_data():
    layer, x, y = scrambled_problem(seed=22)
    with pytest.raises(ValueError, match="data holds 0 rows"):
        local_search(layer, (x[:0], y[:0]), mse_rows)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_warns_and_returns_status_2_with_the_model_unchanged(bad):
    layer, x, y = scrambled_problem(seed=23)
    y = y.clone()
    y[5, 0] = bad
    before = layer.permutation.get()
    with pytest.warns(RuntimeWarning, match="not finite"):
        res = local_search(layer, (x, y), mse_rows, "ils", rng=0)
    assert res.status == STATUS_NONFINITE and not res.success and res.nit == 0
    np.testing.assert_array_equal(layer.permutation.get(), before)


# ----------------------------------------------------------------------------- vocabulary
def test_budget_stops_are_not_success():
    layer, x, y = scrambled_problem(seed=24)
    res = local_search(layer, (x, y), mse_rows, "swap", max_iter=1)
    assert res.status == STATUS_BUDGET and res.success is False and res.nit == 1
    done = local_search(layer, (x, y), mse_rows, "swap")
    assert done.status == 0 and done.success is True


def test_rng_is_checked_by_the_one_rng_helper():
    layer, x, y = scrambled_problem(seed=25)
    with pytest.raises(TypeError, match="rng must be None, a non-negative integer seed"):
        local_search(layer, (x, y), mse_rows, "ils", rng="seed")
    with pytest.raises(ValueError, match="rng must be a non-negative"):
        LocalSearcher(layer, mse_rows, method="ils", rng=-1)


def test_typed_options_and_the_public_option_table():
    layer, x, y = scrambled_problem(seed=26)
    assert option_names("ils")[-4:] == ("neighbourhood", "perturbations", "strength", "restart_every")
    assert set(option_names("callable")) <= set(option_names("ils"))
    with pytest.raises(ValueError, match="method must be one of"):
        option_names("annealing")
    a = local_search(copy.deepcopy(layer), (x, y), mse_rows, "ils", rng=1, perturbations=3)
    b = local_search(copy.deepcopy(layer), (x, y), mse_rows, "ils", rng=1, options=SearchOptions(perturbations=3))
    assert a.fun == b.fun and [m.after for m in a.moves] == [m.after for m in b.moves]
    with pytest.raises(TypeError, match="not both"):
        local_search(layer, (x, y), mse_rows, options=SearchOptions(), tol=0.1)
    with pytest.raises(TypeError, match="'perturbations' are not used by method='swap'"):
        local_search(layer, (x, y), mse_rows, "swap", options=SearchOptions(perturbations=3))
    with pytest.raises(TypeError, match="unknown option"):
        local_search(layer, (x, y), mse_rows, "swap", perturbations=3)
    with pytest.raises(ValueError, match="strategy must be one of"):
        SearchOptions(strategy="worst")
    with pytest.raises(TypeError, match="apply must be True or False"):
        SearchOptions(apply=1)
    with pytest.raises(ValueError, match="max_iter must be >= 0"):
        LocalSearcher(layer, mse_rows, max_iter=-1)  # values are checked when the searcher is built


def test_no_search_module_is_shadowed_by_a_name_the_package_exports():
    for info in pkgutil.iter_modules(search_pkg.__path__):
        module = importlib.import_module(f"routing_search.search.{info.name}")
        attr = getattr(search_pkg, info.name)
        assert attr is module, f"routing_search.search.{info.name} is not the module of that name"
    assert callable(search_pkg.local_search) and search_pkg.descent.local_search is search_pkg.local_search
    assert "codes" in METHODS and "exhaustive" in METHODS


def test_doctest_of_the_front_door_runs():
    import doctest

    from routing_search.search import descent, options

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for module in (descent, options):
            result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
            assert result.failed == 0 and result.attempted > 0
