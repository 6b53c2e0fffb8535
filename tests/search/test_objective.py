"""RoutingObjective: closed-form candidate losses against re-running the permuted model, for every gate,
for MoE / MultiGateMoE / a model wrapping an MoE, per-example and scalar losses; the first-order screen."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from routing_search.layers import MoE, MoEOutput, MultiGateMoE, MultiGateOutput, make_experts
from routing_search.search import Candidate, RoutingObjective, insertion_moves, rotation_moves, swap_moves

D, U, B, N = 3, 2, 32, 4
KINDS = [
    "softmax", "softmax_static", "topk1", "topk2", "topk2_static", "hash", "gumbel",
    "dselect_static", "dselect", "comet_static", "comet", "task_aware",
]


# ----------------------------------------------------------------------------- builders
def experts_for(n: int, seed: int = 0) -> nn.ModuleList:
    return make_experts(n, D, [5], U, generator=torch.Generator().manual_seed(seed)).double()


def random_rows(rows: int, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.stack([rng.permutation(n) for _ in range(rows)])


def scramble(model: nn.Module, seed: int) -> None:
    """Random starting permutations for every permutation module of the (only) MoE layer."""
    rng = np.random.default_rng(seed)
    layer = next(m for m in model.modules() if isinstance(m, (MoE, MultiGateMoE)))
    for perm in layer.permutations:
        perm.set(random_rows(perm.num_selectors, perm.num_experts, rng))


def make_inputs(make_extras, kind: str, batch: int = B, seed: int = 0, width: int = D):
    x = torch.randn(batch, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    extras = make_extras(kind, batch, N, seed=seed)
    return ({"x": x, **extras} if extras else x), extras


def mse_rows(pred, y):
    return ((pred - y) ** 2).reshape(y.shape[0], -1).sum(dim=1)


def mse_scalar(pred, y):
    # Deliberately not a mean of per-row terms.
    return torch.log1p(((pred - y) ** 2).mean())


def multitask_rows(preds, y):
    bce = F.binary_cross_entropy_with_logits(preds[0].squeeze(1), y[:, 0], reduction="none")
    mse = (preds[1].squeeze(1) - y[:, 1]) ** 2
    return bce + 0.5 * mse


def multitask_scalar(preds, y):
    return F.binary_cross_entropy_with_logits(preds[0].squeeze(1), y[:, 0]) + torch.sqrt(((preds[1].squeeze(1) - y[:, 1]) ** 2).mean())


def build_moe(make_gate, kind: str, *, per_selector: bool = True, seed: int = 0) -> MoE:
    moe = MoE(experts_for(N, seed), make_gate(kind, N, D, seed=seed), per_selector=per_selector)
    scramble(moe, seed + 1)
    return moe


def build_multigate(make_gate, kind: str, *, share: bool, seed: int = 0) -> MultiGateMoE:
    gates = [make_gate(kind, N, D, seed=seed + 10 * t) for t in range(2)]
    torch.manual_seed(seed)
    towers = [nn.Linear(U, 1).double() for _ in range(2)]
    model = MultiGateMoE(experts_for(N, seed), gates, towers, share_permutation=share)
    scramble(model, seed + 1)
    return model


class Wrapper(nn.Module):
    """A user model around an MoE layer: a pre-layer, the MoE, then a head."""

    def __init__(self, layer: nn.Module, width: int = 4) -> None:
        super().__init__()
        torch.manual_seed(123)
        self.pre = nn.Linear(width, D).double()
        self.moe = layer
        self.head = nn.Linear(U, U).double()

    def forward(self, x, task=None, key=None):
        h = torch.tanh(self.pre(x))
        out = self.moe(h, task=task, key=key)
        if isinstance(out, MultiGateOutput):
            return [torch.tanh(o) for o in out.outputs]
        return self.head(torch.relu(out.output))


# ----------------------------------------------------------------------------- the reference
def unwrap(out):
    if isinstance(out, MoEOutput):
        return out.output
    if isinstance(out, MultiGateOutput):
        return out.outputs
    return out


def layer_of(model: nn.Module) -> nn.Module:
    return next(m for m in model.modules() if isinstance(m, (MoE, MultiGateMoE)))


@torch.no_grad()
def rerun(model: nn.Module, inputs, targets, loss, state=None) -> float:
    """Set the permutation modules to ``state``, run the model in eval mode, compute the mean loss."""
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


def all_candidates(obj: RoutingObjective) -> list[Candidate]:
    cands = []
    for p, index in enumerate(obj.current()):
        for s, row in enumerate(index):
            for kind, moves in (("swap", swap_moves), ("insertion", insertion_moves), ("rotation", rotation_moves)):
                cands += [Candidate(p, s, tuple(new), kind) for new in moves(row)]
    return cands


def check_candidates_match_rerun(model, inputs, targets, loss, **kwargs) -> RoutingObjective:
    start = [p.get() for p in layer_of(model).permutations]
    obj = RoutingObjective(model, (inputs, targets), loss, **kwargs)
    assert obj.fun0 == pytest.approx(rerun(model, inputs, targets, loss), rel=1e-12, abs=1e-12)
    cands = all_candidates(obj)
    values = obj.evaluate(cands)
    expected = []
    for c in cands:
        state = [s.copy() for s in obj.current()]
        state[c.slot][c.selector] = np.asarray(c.row)
        expected.append(rerun(model, inputs, targets, loss, state))
    np.testing.assert_allclose(values, expected, rtol=1e-10, atol=1e-12)
    # The losses really depend on the permutation (otherwise the comparison proves nothing).
    assert np.ptp(expected) > 1e-6
    # Evaluating candidates changes neither the objective's state nor the model.
    for a, b in zip(obj.current(), start):
        np.testing.assert_array_equal(a, b)
    for p, s in zip(layer_of(model).permutations, start):
        np.testing.assert_array_equal(p.get(), s)
    return obj


# ----------------------------------------------------------------------------- MoE
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("loss", [mse_rows, mse_scalar], ids=["per_example", "scalar"])
def test_moe_candidates_equal_rerunning_the_model(make_gate, make_extras, kind, loss):
    model = build_moe(make_gate, kind, seed=1)
    inputs, _ = make_inputs(make_extras, kind, seed=2)
    targets = torch.randn(B, U, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    obj = check_candidates_match_rerun(model, inputs, targets, loss)
    assert obj.row_restricted == (loss is mse_rows)


@pytest.mark.parametrize("kind", ["dselect_static", "dselect", "comet_static", "comet"])
def test_moe_single_row_permutation_of_a_selector_gate(make_gate, make_extras, kind):
    model = build_moe(make_gate, kind, per_selector=False, seed=4)
    assert model.permutation.num_selectors == 1
    inputs, _ = make_inputs(make_extras, kind, seed=5)
    targets = torch.randn(B, U, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    check_candidates_match_rerun(model, inputs, targets, mse_rows)


@pytest.mark.parametrize("mode", ["per_task_selectors", "embedding"])
def test_task_aware_variants_with_per_selector_permutations(make_extras, mode):
    from routing_search.gates import COMET, DSelectK, TaskAware

    torch.manual_seed(13)
    if mode == "per_task_selectors":
        gate = TaskAware.per_task([DSelectK(N, 2, D), COMET(N, 2, D)])
    else:
        gate = TaskAware.with_task_embedding(DSelectK(N, 2, D + 2), num_tasks=2, task_embedding_dim=2, input_dim=D)
    gate = gate.double()
    with torch.no_grad():
        for name, p in gate.named_parameters():
            if "alpha" in name or "leaf" in name or "embedding" in name:
                p.normal_()
    model = MoE(experts_for(N, 13), gate)
    assert model.permutation.num_selectors == 2
    scramble(model, 14)
    inputs, _ = make_inputs(make_extras, "task_aware", seed=15)
    targets = torch.randn(B, U, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    check_candidates_match_rerun(model, inputs, targets, mse_rows)


def test_binary_selector_gates_with_repeated_selectors(make_gate, make_extras):
    """Saturated DSelect-k / COMET: at most k experts per row, candidates touch only their rows."""
    for kind in ("dselect_static", "comet_static"):
        model = MoE(experts_for(N, 7), make_gate(kind, N, D, seed=7, binary=True))
        scramble(model, 8)
        inputs, _ = make_inputs(make_extras, kind, seed=9)
        targets = torch.randn(B, U, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        check_candidates_match_rerun(model, inputs, targets, mse_rows)


def test_small_max_rows_chunks_give_the_same_values(make_gate, make_extras):
    model = build_moe(make_gate, "topk2", seed=10)
    inputs, _ = make_inputs(make_extras, "topk2", seed=11)
    targets = torch.randn(B, U, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    check_candidates_match_rerun(model, inputs, targets, mse_rows, max_rows=5)


# ----------------------------------------------------------------------------- MultiGateMoE
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("share", [False, True], ids=["per_task", "shared"])
def test_multigate_candidates_equal_rerunning_the_model(make_gate, make_extras, kind, share):
    model = build_multigate(make_gate, kind, share=share, seed=20)
    inputs, _ = make_inputs(make_extras, kind, seed=21)
    g = torch.Generator().manual_seed(22)
    targets = torch.stack([torch.randint(0, 2, (B,), generator=g).double(), torch.randn(B, generator=g, dtype=torch.float64)], dim=1)
    obj = check_candidates_match_rerun(model, inputs, targets, multitask_rows)
    assert len(obj.current()) == (1 if share else 2)


@pytest.mark.parametrize("kind", ["topk2", "hash", "dselect_static", "comet", "task_aware"])
def test_multigate_scalar_loss_candidates_equal_rerunning_the_model(make_gate, make_extras, kind):
    model = build_multigate(make_gate, kind, share=True, seed=23)
    inputs, _ = make_inputs(make_extras, kind, seed=24)
    g = torch.Generator().manual_seed(25)
    targets = torch.stack([torch.randint(0, 2, (B,), generator=g).double(), torch.randn(B, generator=g, dtype=torch.float64)], dim=1)
    check_candidates_match_rerun(model, inputs, targets, multitask_scalar)


# ----------------------------------------------------------------------------- nested
@pytest.mark.parametrize("kind", KINDS)
def test_model_wrapping_an_moe_finds_the_layer_and_matches_rerunning(make_gate, make_extras, kind):
    model = Wrapper(build_moe(make_gate, kind, seed=30))
    inputs, _ = make_inputs(make_extras, kind, seed=31, width=4)
    targets = torch.randn(B, U, generator=torch.Generator().manual_seed(32), dtype=torch.float64)
    obj = check_candidates_match_rerun(model, inputs, targets, mse_rows)
    assert obj.nested and obj.layer is model.moe
    assert not obj.row_restricted


def test_model_wrapping_a_multigate_moe(make_gate, make_extras):
    model = Wrapper(build_multigate(make_gate, "dselect", share=False, seed=33))
    inputs, _ = make_inputs(make_extras, "dselect", seed=34, width=4)
    g = torch.Generator().manual_seed(35)
    targets = torch.stack([torch.randint(0, 2, (B,), generator=g).double(), torch.randn(B, generator=g, dtype=torch.float64)], dim=1)
    check_candidates_match_rerun(model, inputs, targets, multitask_scalar)


# ----------------------------------------------------------------------------- state handling
def test_accept_set_state_value_of_and_write_back(make_gate, make_extras):
    model = build_moe(make_gate, "dselect", seed=40)
    model.train()
    inputs, _ = make_inputs(make_extras, "dselect", seed=41)
    targets = torch.randn(B, U, generator=torch.Generator().manual_seed(42), dtype=torch.float64)
    obj = RoutingObjective(model, (inputs, targets), mse_rows)
    assert model.training and all(m.training for m in model.modules())  # modes restored
    cand = all_candidates(obj)[3]
    predicted = obj.evaluate([cand])[0]
    state = [s.copy() for s in obj.current()]
    state[cand.slot][cand.selector] = np.asarray(cand.row)
    assert obj.value_of(state) == pytest.approx(predicted, rel=1e-12)
    assert obj.accept(cand) == pytest.approx(predicted, rel=1e-12)
    np.testing.assert_array_equal(obj.current()[0], state[0])
    obj.write_back()
    np.testing.assert_array_equal(model.permutation.get(), state[0])
    assert rerun(model, inputs, targets, mse_rows) == pytest.approx(obj.fun, rel=1e-12)
    with pytest.raises(ValueError, match="permutation arrays"):
        obj.set_state([])


def test_data_as_an_iterable_of_batches_equals_the_concatenated_pair(make_gate, make_extras):
    model = build_moe(make_gate, "hash", seed=50)
    inputs, extras = make_inputs(make_extras, "hash", seed=51)
    targets = torch.randn(B, U, generator=torch.Generator().manual_seed(52), dtype=torch.float64)
    whole = RoutingObjective(model, (inputs, targets), mse_rows)
    halves = [({"x": inputs["x"][s], "key": extras["key"][s]}, targets[s]) for s in (slice(0, 10), slice(10, B))]
    split = RoutingObjective(model, halves, mse_rows)
    assert split.fun == pytest.approx(whole.fun, rel=1e-12)
    cands = all_candidates(whole)
    np.testing.assert_allclose(split.evaluate(cands), whole.evaluate(cands), rtol=1e-12)


# ----------------------------------------------------------------------------- first-order screen
def _directional_derivative(loss_of_mixtures, mixtures, deltas) -> tuple[float, float]:
    """⟨∇L, Δm⟩ by autograd and by a central finite difference."""
    ms = [m.clone().requires_grad_(True) for m in mixtures]
    value = loss_of_mixtures(ms)
    grads = torch.autograd.grad(value, ms)
    auto = sum(float((g * d).sum()) for g, d in zip(grads, deltas))
    h = 1e-6
    with torch.no_grad():
        plus = loss_of_mixtures([m + h * d for m, d in zip(mixtures, deltas)])
        minus = loss_of_mixtures([m - h * d for m, d in zip(mixtures, deltas)])
    return auto, float(plus - minus) / (2 * h)


@torch.no_grad()
def _mixtures(model, x, state) -> list[torch.Tensor]:
    """Each task's mixture Σ_e w_e f_e(x), from a forward pass of the model at ``state``."""
    perms = model.permutations
    saved = [p.get() for p in perms]
    for p, s in zip(perms, state):
        p.set(s)
    model.eval()
    out = model(x)
    for p, s in zip(perms, saved):
        p.set(s)
    F_all = model.expert_outputs(x)
    weights = [out.weights] if isinstance(out, MoEOutput) else out.weights
    return [torch.einsum("bn,bnu->bu", w, F_all) for w in weights]


@pytest.mark.parametrize("setup", ["moe_dselect", "multigate_shared", "multigate_per_task"])
def test_swap_screen_is_the_directional_derivative_of_each_swap(make_gate, setup):
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(60), dtype=torch.float64)
    if setup == "moe_dselect":
        model = build_moe(make_gate, "dselect", seed=61)
        targets = torch.randn(B, U, generator=torch.Generator().manual_seed(62), dtype=torch.float64)
        loss = mse_rows

        def loss_of(ms):
            return loss(ms[0], targets).mean()
    else:
        model = build_multigate(make_gate, "comet", share=setup == "multigate_shared", seed=63)
        g = torch.Generator().manual_seed(64)
        targets = torch.stack([torch.randint(0, 2, (B,), generator=g).double(), torch.randn(B, generator=g, dtype=torch.float64)], dim=1)
        loss = multitask_rows

        def loss_of(ms):
            return loss([tower(m) for tower, m in zip(model.towers, ms)], targets).mean()

    obj = RoutingObjective(model, (x, targets), loss)
    grads = obj.mixture_gradients()
    state = obj.current()
    base = _mixtures(model, x, state)
    for p in range(len(state)):
        for s in range(state[p].shape[0]):
            screen = obj.swap_screen(p, s, grads).numpy()
            assert screen.shape == (N, N)
            np.testing.assert_allclose(np.diag(screen), 0.0, atol=1e-14)
            np.testing.assert_allclose(screen, screen.T, rtol=1e-12, atol=1e-14)
            for a in range(N):
                for b in range(a + 1, N):
                    swapped = [st.copy() for st in state]
                    row = swapped[p][s]
                    row[a], row[b] = row[b], row[a]
                    deltas = [new - old for new, old in zip(_mixtures(model, x, swapped), base)]
                    auto, fd = _directional_derivative(loss_of, base, deltas)
                    assert screen[a, b] == pytest.approx(auto, rel=1e-9, abs=1e-12)
                    assert screen[a, b] == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_screening_needs_the_layer_itself(make_gate, make_extras):
    model = Wrapper(build_moe(make_gate, "softmax", seed=70))
    inputs, _ = make_inputs(make_extras, "softmax", seed=71, width=4)
    obj = RoutingObjective(model, (inputs, torch.zeros(B, U, dtype=torch.float64)), mse_rows)
    with pytest.raises(ValueError, match="first-order screening"):
        obj.mixture_gradients()


# ----------------------------------------------------------------------------- errors
def test_objective_input_errors(make_gate, make_extras):
    model = build_moe(make_gate, "softmax", seed=80)
    x = torch.randn(B, D, dtype=torch.float64)
    y = torch.zeros(B, U, dtype=torch.float64)
    with pytest.raises(TypeError, match="loss must be a callable"):
        RoutingObjective(model, (x, y), "mse")
    with pytest.raises(TypeError, match="data must be"):
        RoutingObjective(model, {"x": x}, mse_rows)
    with pytest.raises(TypeError, match="data must be"):
        RoutingObjective(model, 3, mse_rows)
    with pytest.raises(TypeError, match="data must be"):
        RoutingObjective(model, [(x,)], mse_rows)
    with pytest.raises(ValueError, match="per-example losses of shape"):
        RoutingObjective(model, (x, y), lambda p, t: ((p - t) ** 2))
    with pytest.raises(TypeError, match="loss must return a tensor"):
        RoutingObjective(model, (x, y), lambda p, t: 1.0)
    with pytest.raises(ValueError, match="dict with keys 'x' and optionally 'task', 'key'"):
        RoutingObjective(model, ({"x": x, "mask": x}, y), mse_rows)
    with pytest.raises(ValueError, match="no MoE"):
        RoutingObjective(nn.Linear(D, U), (x, y), mse_rows)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        RoutingObjective(lambda v: v, (x, y), mse_rows)

    class TwoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = build_moe(make_gate, "softmax", seed=81)
            self.second = build_moe(make_gate, "topk2", seed=82)

        def forward(self, x):
            return self.second(self.first(x).output[:, :1].expand(-1, D).contiguous()).output

    two = TwoLayers()
    with pytest.raises(ValueError, match="layer="):
        RoutingObjective(two, (x, y), mse_rows)
    with pytest.raises(ValueError, match="not an MoE layer"):
        RoutingObjective(two, (x, y), mse_rows, layer="nope")
    with pytest.raises(ValueError, match="not a submodule"):
        RoutingObjective(two, (x, y), mse_rows, layer=copy.deepcopy(two.first))
    obj = RoutingObjective(two, (x, y), mse_rows, layer="second")
    assert obj.layer is two.second and obj.nested
    obj = RoutingObjective(two, (x, y), mse_rows, layer=two.first)
    assert obj.layer is two.first

    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = build_moe(make_gate, "softmax", seed=83)

        def forward(self, x):
            return x[:, :U]

    with pytest.raises(ValueError, match="did not call the chosen MoE layer"):
        RoutingObjective(Skips(), (x, y), mse_rows)


# --------------------------------------------------------------- incremental swap scan
def _fresh_swap_values(model, data, loss, slot, selector):
    return RoutingObjective(model, data, loss).swap_values(slot, selector)


@pytest.mark.parametrize("share", [False, True])
def test_incremental_swap_scan_equals_a_fresh_scan_after_any_state_change(share):
    """After accepted swaps, kicks and arbitrary states, the cached scan equals one built from scratch."""
    from routing_search.gates import DSelectK, TopK

    torch.manual_seed(0)
    n = 6
    gates = [TopK(num_experts=n, k=2, input_dim=D).double(), DSelectK(num_experts=n, k=2, input_dim=D).double()]
    towers = [nn.Linear(U, 1).double(), nn.Linear(U, 1).double()]
    model = MultiGateMoE(experts_for(n), gates, towers, share_permutation=share, per_selector=False).eval()
    x, y = torch.randn(40, D, dtype=torch.float64), torch.randn(40, 2, dtype=torch.float64)
    obj = RoutingObjective(model, (x, y), multitask_rows)
    rng = np.random.default_rng(1)
    slots = len(obj.state)
    for _ in range(6):
        for p in range(slots):
            obj.swap_values(p, 0)  # build / refresh every cache before the state changes
        state = obj.current()
        p = int(rng.integers(slots))
        if rng.random() < 0.5:
            a, c = rng.choice(n, size=2, replace=False)
            state[p][0][[a, c]] = state[p][0][[c, a]]
        else:
            state[p][0] = rng.permutation(n)
        obj.set_state(state)
        for q in range(slots):
            model.permutations[q].set(state[q])
        for q in range(slots):
            expected = _fresh_swap_values(model, (x, y), multitask_rows, q, 0)
            torch.testing.assert_close(obj.swap_values(q, 0), expected, rtol=0, atol=1e-12)


def test_swap_scan_refreshes_rows_whose_mixture_a_tie_left_unchanged():
    """Swapping two slots with equal weight leaves the mixture as it was, but not the cached terms."""
    from routing_search.gates import TopK

    n = 5
    gate = TopK(num_experts=n, k=2).double()
    with torch.no_grad():
        gate.logits.copy_(torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0]))  # slots 0 and 1 get exactly 0.5 each
    model = MoE(experts_for(n), gate).eval()
    x, y = torch.randn(30, D, dtype=torch.float64), torch.randn(30, U, dtype=torch.float64)
    obj = RoutingObjective(model, (x, y), mse_rows)
    obj.swap_values(0, 0)
    state = obj.current()
    state[0][0][[0, 1]] = state[0][0][[1, 0]]
    obj.set_state(state)
    model.permutation.set(state[0])
    torch.testing.assert_close(obj.swap_values(0, 0), _fresh_swap_values(model, (x, y), mse_rows, 0, 0), rtol=0, atol=1e-12)


def testactive_pairs_in_row_chunks_equal_the_whole_mask():
    from routing_search.search.swap_scan import active_pairs

    active = torch.rand(37, 6, generator=torch.Generator().manual_seed(0)) < 0.4
    whole = torch.nonzero(active.unsqueeze(2) & active.unsqueeze(1) & torch.ones(6, 6, dtype=torch.bool).triu(1))
    for max_elements in (36, 5 * 36, 1 << 24):
        b, a, c = active_pairs(active, max_elements=max_elements)
        assert torch.equal(torch.stack([b, a, c], dim=1), whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["topk2", "softmax", "dselect"])
def test_mixtures_refreshed_on_changed_rows_are_bitwise_a_full_recomputation(make_gate, kind, dtype):
    """The objective recomputes a mixture only on rows whose weights a move changed (issue 8): every mixture,
    row loss and loss must be bitwise those of a recomputation from scratch at the same state."""
    torch.manual_seed(0)
    n = 7
    gates = [make_gate(kind, n, D, seed=0), make_gate(kind, n, D, seed=1)]
    model = MultiGateMoE(experts_for(n), gates, [nn.Linear(U, 1).double(), nn.Linear(U, 1).double()]).to(dtype).eval()
    x = torch.randn(300, D, generator=torch.Generator().manual_seed(2), dtype=dtype)
    y = torch.randn(300, 2, generator=torch.Generator().manual_seed(3), dtype=dtype)
    obj = RoutingObjective(model, (x, y), multitask_rows)
    rng = np.random.default_rng(4)
    for step in range(8):
        state = obj.current()
        p = int(rng.integers(len(state)))
        row = state[p][int(rng.integers(state[p].shape[0]))]
        if step % 3 == 2:
            row[:] = rng.permutation(n)
        else:
            a, c = rng.choice(n, size=2, replace=False)
            row[[a, c]] = row[[c, a]]
        fun = obj.set_state(state)
        for q in range(len(state)):
            model.permutations[q].set(state[q])
        fresh = RoutingObjective(model, (x, y), multitask_rows)
        assert fun == fresh.fun
        assert all(torch.equal(m, f) for m, f in zip(obj.mixtures, fresh.mixtures))
        assert obj.row_losses is not None and fresh.row_losses is not None and torch.equal(obj.row_losses, fresh.row_losses)
