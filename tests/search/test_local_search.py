"""local_search: never worse, exact results, true local/global optima, determinism, budgets, code moves,
user gates and argument errors. Every claim is checked by re-running the model."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from routing_search.gates import GateOutput
from routing_search.layers import MoE, MoEOutput, MultiGateMoE, MultiGateOutput, make_experts
from routing_search.search import RoutingObjective, local_search
from routing_search.search.codes import moved_gate_output, selector_slot, set_selector_slot

D, U, B = 3, 2, 40


# ----------------------------------------------------------------------------- builders
def experts_for(n: int, seed: int = 0) -> nn.ModuleList:
    return make_experts(n, D, [5], U, generator=torch.Generator().manual_seed(seed)).double()


def scramble(layer: nn.Module, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for perm in layer.permutations:
        perm.set(np.stack([rng.permutation(perm.num_experts) for _ in range(perm.num_selectors)]))


def mse_rows(pred, y):
    return ((pred - y) ** 2).sum(dim=1)


def multitask_rows(preds, y):
    bce = F.binary_cross_entropy_with_logits(preds[0].squeeze(1), y[:, 0], reduction="none")
    return bce + 0.5 * (preds[1].squeeze(1) - y[:, 1]) ** 2


def _x(seed: int) -> torch.Tensor:
    return torch.randn(B, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _teacher_targets(layer: nn.Module, x, extras: dict) -> torch.Tensor:
    """Targets produced by the same layer under a hidden permutation, plus noise: a landscape with structure."""
    teacher = copy.deepcopy(layer).eval()
    scramble(teacher, 999)
    with torch.no_grad():
        out = teacher(x, **extras)
    g = torch.Generator().manual_seed(5)
    if isinstance(out, MultiGateOutput):
        z = torch.cat(out.outputs, dim=1)
        return torch.stack([(z[:, 0] > 0).double(), z[:, 1] + 0.1 * torch.randn(B, generator=g, dtype=torch.float64)], dim=1)
    return out.output + 0.1 * torch.randn(out.output.shape, generator=g, dtype=torch.float64)


def setup(make_gate, make_extras, name: str):
    """(model, inputs, targets, loss) for a named small problem."""
    if name == "moe_topk2":
        n, kind = 5, "topk2"
        layer = MoE(experts_for(n, 1), make_gate(kind, n, D, seed=1))
    elif name == "moe_dselect_static":
        n, kind = 4, "dselect_static"
        layer = MoE(experts_for(n, 2), make_gate(kind, n, D, seed=2))
    elif name == "moe_hash":
        n, kind = 6, "hash"
        layer = MoE(experts_for(n, 3), make_gate(kind, n, D, seed=3))
    elif name == "multigate_shared_softmax":
        n, kind = 4, "softmax"
        torch.manual_seed(4)
        layer = MultiGateMoE(
            experts_for(n, 4), [make_gate(kind, n, D, seed=40), make_gate(kind, n, D, seed=41)],
            [nn.Linear(U, 1).double() for _ in range(2)], share_permutation=True,
        )
    elif name == "multigate_per_task_comet":
        n, kind = 4, "comet"
        torch.manual_seed(5)
        layer = MultiGateMoE(
            experts_for(n, 5), [make_gate(kind, n, D, seed=50), make_gate(kind, n, D, seed=51)],
            [nn.Linear(U, 1).double() for _ in range(2)],
        )
    else:
        raise ValueError(name)
    x = _x(10)
    extras = make_extras(kind, B, n, seed=10)
    targets = _teacher_targets(layer, x, extras)
    scramble(layer, 11)
    inputs = {"x": x, **extras} if extras else x
    loss = multitask_rows if isinstance(layer, MultiGateMoE) else mse_rows
    return layer, inputs, targets, loss


def unwrap(out):
    if isinstance(out, MoEOutput):
        return out.output
    if isinstance(out, MultiGateOutput):
        return out.outputs
    return out


def layer_of(model: nn.Module) -> nn.Module:
    return next(m for m in model.modules() if isinstance(m, (MoE, MultiGateMoE)))


@torch.no_grad()
def rerun(model, inputs, targets, loss, state=None) -> float:
    perms = layer_of(model).permutations
    saved = [p.get() for p in perms]
    if state is not None:
        for p, s in zip(perms, state):
            p.set(s)
    was_training = model.training
    model.eval()
    try:
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        value = loss(unwrap(out), targets)
    finally:
        model.train(was_training)
        for p, s in zip(perms, saved):
            p.set(s)
    return float(value.mean()) if value.dim() > 0 else float(value)


def current_state(model) -> list[np.ndarray]:
    return [p.get() for p in layer_of(model).permutations]


def reversal_moves(row, rng):
    """A user move operator: reverse a segment of the row (2-opt in the TSP sense)."""
    row = [int(v) for v in row]
    for a in range(len(row)):
        for b in range(a + 2, len(row) + 1):
            yield row[:a] + row[a:b][::-1] + row[b:]


class UserGate(nn.Module):
    """A user-written sparse gate (top 2 of a linear map)."""

    def __init__(self, num_experts: int, input_dim: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.proj = nn.Linear(input_dim, num_experts)

    def forward(self, x, task=None, key=None) -> GateOutput:
        logits = self.proj(x)
        top = logits.topk(2, dim=-1)
        w = torch.zeros_like(logits).scatter(1, top.indices, torch.softmax(top.values, dim=-1))
        return GateOutput(weights=w, loss=x.new_zeros(()))


def check_result(model, inputs, targets, loss, res, start, fun_start=None) -> None:
    """Never worse, fun0 is the start, and the written-back permutation re-runs to ``fun``.

    ``fun_start`` is the loss measured before a search that changes the gate itself (code moves).
    """
    assert res.fun <= res.fun0
    if fun_start is None:
        fun_start = rerun(model, inputs, targets, loss, start)
    assert res.fun0 == pytest.approx(fun_start, rel=1e-12, abs=1e-12)
    assert rerun(model, inputs, targets, loss) == pytest.approx(res.fun, rel=1e-12, abs=1e-12)
    for got, perm in zip(res.x, layer_of(model).permutations):
        np.testing.assert_array_equal(got, perm.get())
        for row in got:
            np.testing.assert_array_equal(np.sort(row), np.arange(perm.num_experts))
    for move in res.moves:
        assert move.fun_after < move.fun_before


# ----------------------------------------------------------------------------- never worse
SETUPS = ["moe_topk2", "moe_dselect_static", "multigate_shared_softmax"]
METHODS = ["swap", "insertion", "rotation", "ils", "exhaustive", "callable"]


@pytest.mark.parametrize("strategy", ["best", "first"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", SETUPS)
def test_search_is_never_worse_and_its_result_reruns_exactly(make_gate, make_extras, name, method, strategy):
    model, inputs, targets, loss = setup(make_gate, make_extras, name)
    start = current_state(model)
    # the descents' options (a method that would ignore one refuses it)
    options: dict = ({"strategy": strategy} if method != "exhaustive" else {}) | ({"screen": 2} if method in ("swap", "ils") else {})
    if method == "ils":
        options.update(perturbations=4, strength=2)
    res = local_search(model, (inputs, targets), loss, reversal_moves if method == "callable" else method, rng=0, **options)
    check_result(model, inputs, targets, loss, res, start)
    assert res.success and res.method == method
    if method != "ils":
        assert res.nit == len(res.moves)
    if method in ("swap", "exhaustive"):
        assert res.fun < res.fun0  # the scrambled start is improvable on these problems


def test_apply_false_leaves_the_model_alone(make_gate, make_extras):
    model, inputs, targets, loss = setup(make_gate, make_extras, "moe_topk2")
    start = current_state(model)
    res = local_search(model, (inputs, targets), loss, "swap", apply=False)
    assert res.fun < res.fun0
    for a, b in zip(current_state(model), start):
        np.testing.assert_array_equal(a, b)
    assert rerun(model, inputs, targets, loss, res.x) == pytest.approx(res.fun, rel=1e-12)


# ----------------------------------------------------------------------------- optimality
@pytest.mark.parametrize("screen", [None, 2])
@pytest.mark.parametrize("name", ["moe_dselect_static", "moe_hash", "multigate_per_task_comet"])
def test_swap_search_ends_in_a_true_two_opt_local_optimum(make_gate, make_extras, name, screen):
    model, inputs, targets, loss = setup(make_gate, make_extras, name)
    start = current_state(model)
    res = local_search(model, (inputs, targets), loss, "swap", screen=screen)
    check_result(model, inputs, targets, loss, res, start)
    assert res.status == 0 and res.nit > 0
    state = current_state(model)
    checked = 0
    for p, index in enumerate(state):
        for s in range(index.shape[0]):
            n = index.shape[1]
            for a, b in itertools.combinations(range(n), 2):
                other = [t.copy() for t in state]
                other[p][s, a], other[p][s, b] = other[p][s, b], other[p][s, a]
                assert rerun(model, inputs, targets, loss, other) >= res.fun - 1e-12
                checked += 1
    assert checked == sum(t.shape[0] for t in state) * n * (n - 1) // 2


@pytest.mark.parametrize("n,kind", [(5, "topk2"), (6, "softmax")])
def test_exhaustive_finds_the_global_optimum_of_one_row(make_gate, make_extras, n, kind):
    layer = MoE(experts_for(n, 20), make_gate(kind, n, D, seed=20))
    x = _x(21)
    targets = _teacher_targets(layer, x, {})
    scramble(layer, 22)
    start = current_state(layer)
    brute = min(
        (rerun(layer, x, targets, mse_rows, [np.asarray(perm)[None, :]]), perm)
        for perm in itertools.permutations(range(n))
    )
    res = local_search(layer, (x, targets), mse_rows, "exhaustive")
    check_result(layer, x, targets, mse_rows, res, start)
    assert res.fun == pytest.approx(brute[0], rel=1e-10, abs=1e-12)
    assert res.fun < res.fun0


def test_exhaustive_over_several_rows_and_its_state_limit(make_gate, make_extras):
    model, inputs, targets, loss = setup(make_gate, make_extras, "moe_dselect_static")  # 2 rows of 4: 576 states
    with pytest.raises(ValueError, match="max_states"):
        local_search(copy.deepcopy(model), (inputs, targets), loss, "exhaustive", max_states=100)
    start = current_state(model)
    res = local_search(model, (inputs, targets), loss, "exhaustive")
    check_result(model, inputs, targets, loss, res, start)
    best = min(
        rerun(model, inputs, targets, loss, [np.stack([np.asarray(a), np.asarray(b)])])
        for a in itertools.permutations(range(4))
        for b in itertools.permutations(range(4))
    )
    assert res.fun == pytest.approx(best, rel=1e-10, abs=1e-12)


# ----------------------------------------------------------------------------- determinism and budgets
def test_ils_with_a_seed_is_deterministic(make_gate, make_extras):
    model, inputs, targets, loss = setup(make_gate, make_extras, "moe_hash")
    results = []
    for rng in (7, 7, np.random.default_rng(7)):
        m = copy.deepcopy(model)
        results.append(local_search(m, (inputs, targets), loss, "ils", rng=rng, perturbations=6, restart_every=3))
    for r in results[1:]:
        assert r.fun == results[0].fun and r.nfev == results[0].nfev and r.nit == results[0].nit
        for a, b in zip(r.x, results[0].x):
            np.testing.assert_array_equal(a, b)


def test_callback_returning_true_stops_after_the_first_accepted_move(make_gate, make_extras):
    model, inputs, targets, loss = setup(make_gate, make_extras, "moe_hash")
    start = current_state(model)
    seen = []

    def callback(intermediate):
        seen.append((intermediate.fun, intermediate.nit, [s.copy() for s in intermediate.x]))
        return True

    res = local_search(model, (inputs, targets), loss, "swap", callback=callback)
    check_result(model, inputs, targets, loss, res, start)
    assert len(seen) == 1 and res.nit == 1 and res.status == 1 and "callback" in res.message
    assert seen[0][0] == res.fun
    # A callback returning None lets the search run to the local optimum.
    full = local_search(copy.deepcopy(model), (inputs, targets), loss, "swap", callback=lambda r: None)
    assert full.status == 0


def test_max_iter_zero_returns_the_start(make_gate, make_extras):
    model, inputs, targets, loss = setup(make_gate, make_extras, "moe_topk2")
    start = current_state(model)
    res = local_search(model, (inputs, targets), loss, "swap", max_iter=0)
    assert res.nit == 0 and res.fun == res.fun0 and res.moves == [] and res.status == 1
    for a, b in zip(res.x, start):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(current_state(model), start):
        np.testing.assert_array_equal(a, b)
    res = local_search(model, (inputs, targets), loss, "swap", max_iter=1)
    assert res.nit == 1 and len(res.moves) == 1


@pytest.mark.parametrize("strategy", ["best", "first"])
def test_max_evals_is_respected(make_gate, make_extras, strategy):
    model, inputs, targets, loss = setup(make_gate, make_extras, "moe_hash")  # 15 swaps per scan
    start = current_state(model)
    unlimited = local_search(copy.deepcopy(model), (inputs, targets), loss, "swap", strategy=strategy)
    assert unlimited.nfev > 40
    res = local_search(model, (inputs, targets), loss, "swap", strategy=strategy, max_evals=20)
    check_result(model, inputs, targets, loss, res, start)
    assert res.status == 1 and "max_evals" in res.message
    assert res.nfev <= 20 + 15 + 2  # at most one neighbourhood scan (and its verification) past the budget


# ----------------------------------------------------------------------------- code moves
def _binary_static_moe(make_gate, kind: str, n: int, seed: int):
    layer = MoE(experts_for(n, seed), make_gate(kind, n, D, seed=seed, binary=True))
    x = _x(seed + 1)
    targets = _teacher_targets(layer, x, {})
    with torch.no_grad():  # a different (bad) start for the codes
        g = layer.gate
        for j in range(g.num_selectors):
            set_selector_slot(g, j, j)
    return layer, x, targets


@pytest.mark.parametrize("kind,n", [("dselect_static", 4), ("dselect_static", 5), ("comet_static", 4), ("comet_static", 5)])
def test_code_moves_are_never_worse_exact_and_keep_the_gate_binary(make_gate, kind, n):
    layer, x, targets = _binary_static_moe(make_gate, kind, n, seed=30 + n)
    start = current_state(layer)
    before = {k: v.clone() for k, v in layer.gate.state_dict().items()}
    fun_start = rerun(layer, x, targets, mse_rows)
    res = local_search(layer, (x, targets), mse_rows, "codes")
    check_result(layer, x, targets, mse_rows, res, start, fun_start)
    assert layer.gate.is_binary()
    assert res.nit == len(res.moves) and all(m.kind == "code" for m in res.moves)
    if res.nit:
        assert any(not torch.equal(before[k], v) for k, v in layer.gate.state_dict().items())
    for a, b in zip(current_state(layer), start):  # code moves leave the permutation alone
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", ["dselect_static", "comet_static"])
def test_code_move_predictions_equal_the_rewritten_gate(make_gate, kind):
    """The candidate loss of moving a selector equals the loss after really rewriting its codes."""
    layer, x, targets = _binary_static_moe(make_gate, kind, 5, seed=40)
    obj = RoutingObjective(layer, (x, targets), mse_rows)
    gate = layer.gate
    for j in range(gate.num_selectors):
        g = obj.gate_outs[0]
        current = selector_slot(g, j)
        for slot in range(gate.num_experts):
            if slot == current:
                continue
            predicted = obj.value_with_gate_outputs({0: moved_gate_output(g, j, slot, gate)})
            saved = {k: v.clone() for k, v in gate.state_dict().items()}
            set_selector_slot(gate, j, slot)
            assert gate.is_binary()
            assert predicted == pytest.approx(rerun(layer, x, targets, mse_rows), rel=1e-12, abs=1e-12)
            gate.load_state_dict(saved)


def test_code_moves_in_a_multigate_moe(make_gate):
    n = 4
    torch.manual_seed(0)
    gates = [make_gate("dselect_static", n, D, seed=60, binary=True), make_gate("comet_static", n, D, seed=61, binary=True)]
    layer = MultiGateMoE(experts_for(n, 60), gates, [nn.Linear(U, 1).double() for _ in range(2)], share_permutation=True)
    x = _x(62)
    targets = _teacher_targets(layer, x, {})
    for g in gates:
        for j in range(g.num_selectors):
            set_selector_slot(g, j, 0)
    start = current_state(layer)
    fun_start = rerun(layer, x, targets, multitask_rows)
    res = local_search(layer, (x, targets), multitask_rows, "codes")
    check_result(layer, x, targets, multitask_rows, res, start, fun_start)
    assert res.fun < res.fun0
    assert all(g.is_binary() for g in gates)


def test_code_moves_need_a_static_binary_gate(make_gate):
    n = 4
    for gate in (make_gate("dselect_static", n, D), make_gate("comet_static", n, D), make_gate("dselect", n, D, binary=False),
                 make_gate("topk2", n, D)):
        layer = MoE(experts_for(n), gate)
        x = _x(70)
        with pytest.raises(ValueError, match="method='codes' needs a static DSelectK or COMET gate whose codes are binary"):
            local_search(layer, (x, torch.zeros(B, U, dtype=torch.float64)), mse_rows, "codes")
    with pytest.raises(TypeError, match="static DSelectK or COMET"):
        set_selector_slot(make_gate("dselect", n, D), 0, 1)
    with pytest.raises(ValueError, match="slot must be in"):
        set_selector_slot(make_gate("comet_static", n, D), 0, n)


# ----------------------------------------------------------------------------- user gates and nesting
def test_user_gate_in_moe_and_multigate_moe_is_searchable():
    n = 5
    torch.manual_seed(0)
    moe = MoE(experts_for(n, 80), UserGate(n, D).double())
    x = _x(81)
    targets = _teacher_targets(moe, x, {})
    scramble(moe, 82)
    start = current_state(moe)
    res = local_search(moe, (x, targets), mse_rows, "swap", screen=3)
    check_result(moe, x, targets, mse_rows, res, start)
    assert res.fun < res.fun0

    multi = MultiGateMoE(experts_for(n, 83), [UserGate(n, D).double(), UserGate(n, D).double()],
                         [nn.Linear(U, 1).double() for _ in range(2)])
    targets = _teacher_targets(multi, x, {})
    scramble(multi, 84)
    start = current_state(multi)
    res = local_search(multi, (x, targets), multitask_rows, "insertion")
    check_result(multi, x, targets, multitask_rows, res, start)


def test_search_through_a_wrapping_model_with_layer_chosen_by_name(make_gate):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.pre = nn.Linear(4, D).double()
            self.first = MoE(experts_for(4, 90), make_gate("topk2", 4, D, seed=90))
            self.second = MoE(experts_for(4, 91), make_gate("dselect", 4, D, seed=91))
            self.mid = nn.Linear(U, D).double()

        def forward(self, x):
            h = self.first(torch.tanh(self.pre(x))).output
            return self.second(torch.tanh(self.mid(h))).output

    net = Net()
    x = torch.randn(B, 4, generator=torch.Generator().manual_seed(92), dtype=torch.float64)
    targets = torch.randn(B, U, generator=torch.Generator().manual_seed(93), dtype=torch.float64)
    with pytest.raises(ValueError, match="layer="):
        local_search(net, (x, targets), mse_rows)
    before_second = net.second.permutation.get()
    res = local_search(net, (x, targets), mse_rows, "swap", layer="first")
    assert res.fun <= res.fun0
    np.testing.assert_array_equal(net.second.permutation.get(), before_second)
    with torch.no_grad():
        assert float(mse_rows(net(x), targets).mean()) == pytest.approx(res.fun, rel=1e-12)


# ----------------------------------------------------------------------------- errors
def test_argument_errors(make_gate, make_extras):
    model, inputs, targets, loss = setup(make_gate, make_extras, "moe_topk2")
    data = (inputs, targets)
    with pytest.raises(ValueError, match="method"):
        local_search(model, data, loss, "simulated_annealing")
    with pytest.raises(TypeError, match="bogus_option"):
        local_search(model, data, loss, "swap", bogus_option=1)
    with pytest.raises(TypeError, match="perturbations"):
        local_search(model, data, loss, "swap", perturbations=3)  # an ILS option given to another method
    with pytest.raises(TypeError, match="max_states"):
        local_search(model, data, loss, "ils", max_states=3)
    with pytest.raises(TypeError, match="loss must be a callable"):
        local_search(model, data, None)
    with pytest.raises(TypeError, match="data must be"):
        local_search(model, {"x": inputs, "y": targets}, loss)
    with pytest.raises(TypeError, match="data must be"):
        local_search(model, 42, loss)
    with pytest.raises(ValueError, match="no MoE"):
        local_search(nn.Sequential(nn.Linear(D, U)), data, loss)
    with pytest.raises(ValueError, match="strategy"):
        local_search(model, data, loss, strategy="random")
    with pytest.raises(ValueError, match="tol"):
        local_search(model, data, loss, tol=-1.0)
    with pytest.raises(ValueError, match="max_iter"):
        local_search(model, data, loss, max_iter=-1)
    with pytest.raises(ValueError, match="screen"):
        local_search(model, data, loss, screen=0)
    with pytest.raises(TypeError, match="callback"):
        local_search(model, data, loss, callback=3)
    with pytest.raises(ValueError, match="neighbourhood"):
        local_search(model, data, loss, "ils", neighbourhood="3-opt")

    def bad_moves(row, rng):
        yield [0] * len(row)

    with pytest.raises(ValueError, match="row returned by the move"):
        local_search(model, data, loss, bad_moves)

    def short_moves(row, rng):
        yield list(row)[:-1]

    with pytest.raises(ValueError, match="row returned by the move"):
        local_search(model, data, loss, short_moves)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = MoE(experts_for(5), make_gate("topk2", 5, D))
            self.b = MoE(experts_for(5), make_gate("softmax", 5, D))

        def forward(self, x):
            return self.a(x).output + self.b(x).output

    with pytest.raises(ValueError, match="choose one with layer="):
        local_search(Two(), data, loss)


def test_errors_leave_the_model_unchanged(make_gate, make_extras):
    model, inputs, targets, loss = setup(make_gate, make_extras, "moe_topk2")
    start = current_state(model)

    def bad_moves(row, rng):
        yield [0] * len(row)

    with pytest.raises(ValueError):
        local_search(model, (inputs, targets), loss, bad_moves)
    for a, b in zip(current_state(model), start):
        np.testing.assert_array_equal(a, b)



def test_best_strategy_takes_the_best_swap_over_every_permutation_row():
    """With per-task permutations the first move is the global best swap, not the first row's best."""
    from routing_search.gates import TopK
    from routing_search.layers import MLP, MultiGateMoE, make_experts
    from routing_search.search import RoutingObjective

    torch.manual_seed(5)
    n = 6
    model = MultiGateMoE(
        make_experts(n, 4, [6], 2).double(),
        [TopK(num_experts=n, k=2, input_dim=4).double() for _ in range(3)],
        [MLP(2, [3], 1).double() for _ in range(3)],
    )
    x, y = torch.randn(80, 4, dtype=torch.float64), torch.randn(80, 3, dtype=torch.float64)

    def loss(preds, t):
        return sum(((p.squeeze(-1) - t[:, i]) ** 2) for i, p in enumerate(preds))

    obj = RoutingObjective(model, (x, y), loss)
    a_idx, c_idx = np.triu_indices(n, k=1)
    best = min(
        (float(obj.swap_values(p, 0)[a, c]), p, int(a), int(c)) for p in range(3) for a, c in zip(a_idx, c_idx)
    )
    result = local_search(model, (x, y), loss, "swap", max_iter=1, apply=False)
    (move,) = result.moves
    assert move.slot == best[1]
    assert sorted(i for i in range(n) if move.before[i] != move.after[i]) == [best[2], best[3]]
    assert move.fun_after == pytest.approx(best[0], abs=1e-12)
