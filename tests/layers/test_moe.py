"""Tests of the MoE layer: sparse vs dense dispatch, degenerate mixtures, permutation equivariance,
errors and usage meters. Everything in float64."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from routing_search.gates import GateOutput, Softmax, TopK
from routing_search.layers import MoE, make_experts

D, U, B = 3, 2, 24
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def experts_for(n: int, seed: int = 0, out: int = U) -> nn.ModuleList:
    return make_experts(n, D, [5], out, generator=torch.Generator().manual_seed(seed)).double()


def inputs(batch: int = B, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, D, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)


def random_rows(rows: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(n) for _ in range(rows)])


class OneHotGate(nn.Module):
    """A user gate (not a BaseGate): everything to gate slot ``slot``."""

    def __init__(self, num_experts: int, slot: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.slot = slot

    def forward(self, x, task=None, key=None) -> GateOutput:
        w = torch.zeros(x.shape[0], self.num_experts, dtype=x.dtype)
        w[:, self.slot] = 1.0
        return GateOutput(weights=w, loss=x.new_zeros(()))


class FixedGate(nn.Module):
    """A user gate returning the first ``batch`` rows of a fixed weight matrix."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.num_experts = weights.shape[1]
        self.register_buffer("w", weights)

    def forward(self, x, task=None, key=None) -> GateOutput:
        return GateOutput(weights=self.w[: x.shape[0]], loss=x.new_zeros(()))


class LinearUserGate(nn.Module):
    """A user gate with parameters: softmax of a linear map, sparsified to its top 2 by hand."""

    def __init__(self, num_experts: int, input_dim: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.proj = nn.Linear(input_dim, num_experts)

    def forward(self, x, task=None, key=None) -> GateOutput:
        logits = self.proj(x)
        top = logits.topk(2, dim=-1)
        w = torch.zeros_like(logits).scatter(1, top.indices, torch.softmax(top.values, dim=-1))
        return GateOutput(weights=w, loss=logits.square().mean() * 0.0)


# ----------------------------------------------------------------------------- sparse == dense
SPARSE_CASES = [
    ("topk1", False),
    ("topk2", False),
    ("topk2_static", False),
    ("hash", False),
    ("dselect_static", True),
    ("comet_static", True),
    ("softmax", False),  # dense gate forced through the sparse path
]


def _loss_and_grads(moe: MoE, x: torch.Tensor, extras: dict, probe: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = moe(x, **extras)
    loss = (out.output * probe).sum() + out.loss
    loss.backward()
    grads = {name: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for name, p in moe.named_parameters()}
    return out, grads, x.grad.clone()


@pytest.mark.parametrize("kind,binary", SPARSE_CASES)
def test_sparse_dispatch_equals_dense_outputs_and_gradients(make_gate, make_extras, kind, binary):
    n = 4
    gate = make_gate(kind, n, D, seed=3, binary=binary)
    sparse = MoE(experts_for(n, seed=3), gate, dispatch="sparse")
    dense = MoE(copy.deepcopy(sparse.experts), copy.deepcopy(sparse.gate), dispatch="dense")
    perm = random_rows(sparse.permutation.num_selectors, n, seed=4)
    sparse.permutation.set(perm)
    dense.permutation.set(perm)
    x = inputs(seed=5)
    extras = make_extras(kind, B, n, seed=5)
    probe = torch.randn(B, U, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    rows_seen: list[int] = []
    hooks = [e.register_forward_hook(lambda m, a, o: rows_seen.append(a[0].shape[0])) for e in sparse.experts]
    out_s, grads_s, gx_s = _loss_and_grads(sparse, x, extras, probe)
    for h in hooks:
        h.remove()
    out_d, grads_d, gx_d = _loss_and_grads(dense, x, extras, probe)

    torch.testing.assert_close(out_s.weights, out_d.weights, rtol=0, atol=0)
    torch.testing.assert_close(out_s.output, out_d.output, rtol=1e-12, atol=1e-12)
    assert grads_s.keys() == grads_d.keys()
    for name in grads_s:
        torch.testing.assert_close(grads_s[name], grads_d[name], rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(gx_s, gx_d, rtol=1e-10, atol=1e-12)
    # The sparse path really ran each expert only on the rows that give it weight.
    used = int((out_s.weights != 0).sum())
    assert sum(rows_seen) == used
    if kind != "softmax":
        assert used < n * B


def test_auto_dispatch_picks_sparse_for_sparse_gates_and_dense_for_softmax(make_gate):
    n = 4
    for kind, expected_calls in (("topk1", None), ("softmax", n * B)):
        moe = MoE(experts_for(n), make_gate(kind, n, D), dispatch="auto")
        rows_seen: list[int] = []
        for e in moe.experts:
            e.register_forward_hook(lambda m, a, o: rows_seen.append(a[0].shape[0]))
        moe(inputs())
        if expected_calls is None:
            assert sum(rows_seen) == B  # k = 1: every row goes to exactly one expert
        else:
            assert sum(rows_seen) == expected_calls


def test_sparse_dispatch_with_multi_dimensional_expert_outputs(make_gate):
    n = 4

    class Reshape(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x).reshape(x.shape[0], 2, 3)

    experts = [Reshape(e) for e in experts_for(n, out=6)]
    sparse = MoE(experts, make_gate("topk2", n, D), dispatch="sparse")
    dense = copy.deepcopy(sparse)
    dense.dispatch = "dense"
    x = inputs()
    out_s, out_d = sparse(x).output, dense(x).output
    assert out_s.shape == (B, 2, 3)
    torch.testing.assert_close(out_s, out_d, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- degenerate mixtures
@pytest.mark.parametrize("dispatch", ["sparse", "dense", "auto"])
@pytest.mark.parametrize("slot", [0, 2])
def test_static_top1_gate_equals_the_one_expert_it_selects(dispatch, slot):
    n = 4
    torch.manual_seed(0)
    gate = TopK(n, 1).double()
    with torch.no_grad():
        gate.logits.copy_(torch.tensor([0.0, 0.1, 0.2, 0.3], dtype=torch.float64))
        gate.logits[slot] = 5.0
    moe = MoE(experts_for(n), gate, dispatch=dispatch)
    perm = [3, 0, 1, 2]
    moe.permutation.set(perm)
    x = inputs()
    expected = moe.experts[perm[slot]](x)
    torch.testing.assert_close(moe(x).output, expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("dispatch", ["sparse", "dense"])
def test_user_one_hot_gate_equals_the_expert_it_picks(dispatch):
    n = 5
    moe = MoE(experts_for(n), OneHotGate(n, slot=1), dispatch=dispatch)
    moe.permutation.set([4, 2, 0, 1, 3])
    x = inputs()
    torch.testing.assert_close(moe(x).output, moe.experts[2](x), rtol=0, atol=0)


@pytest.mark.parametrize("dispatch", ["sparse", "dense"])
@pytest.mark.parametrize(
    "kind",
    ["softmax", "softmax_static", "topk1", "topk2", "topk2_static", "hash", "gumbel",
     "dselect_static", "dselect", "comet_static", "comet", "task_aware"],
)
def test_identical_experts_give_that_expert_for_any_gate(make_gate, make_extras, kind, dispatch):
    n = 5  # not a power of two: DSelect-k renormalises its reachable mass
    expert = experts_for(1, seed=9)[0]
    gate = make_gate(kind, n, D, seed=2)
    moe = MoE([copy.deepcopy(expert) for _ in range(n)], gate, dispatch=dispatch)
    moe.permutation.set(random_rows(moe.permutation.num_selectors, n, seed=1))
    x = inputs(seed=3)
    moe.train()  # Gumbel noise and everything else still give rows on the simplex
    out = moe(x, **make_extras(kind, B, n, seed=3))
    torch.testing.assert_close(out.weights.sum(dim=1), torch.ones(B, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.output, expert(x), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- equivariance
EQUIV_KINDS = ["softmax", "topk2", "hash", "dselect_static", "dselect", "comet_static", "comet", "task_aware"]


@functools.lru_cache(maxsize=None)
def _equiv_base(build_gate, gate_extras, kind: str, n: int, per_selector: bool):
    gate = build_gate(kind, n, D, seed=11)
    base = MoE(experts_for(n, seed=12), gate, per_selector=per_selector).eval()
    base.permutation.set(random_rows(base.permutation.num_selectors, n, seed=13))
    x = inputs(seed=14)
    extras = gate_extras(kind, B, n, seed=14)
    with torch.no_grad():
        ref = base(x, **extras)
    return base, x, extras, ref


@pytest.mark.parametrize(
    "kind,per_selector", [(k, True) for k in EQUIV_KINDS] + [("dselect_static", False), ("comet", False)]
)
@SETTINGS
@given(data=st.data())
def test_relabelling_experts_and_inverting_the_permutation_changes_nothing(make_gate, make_extras, kind, per_selector, data):
    n = 5
    base, x, extras, ref = _equiv_base(make_gate, make_extras, kind, n, per_selector)
    sigma = np.asarray(data.draw(st.permutations(range(n)), label="sigma"))
    # new_experts[j] = experts[sigma[j]]: expert e now sits at position argsort(sigma)[e].
    moved = MoE([base.experts[int(s)] for s in sigma], base.gate, per_selector=per_selector).eval()
    old = base.permutation.get()
    moved.permutation.set(np.argsort(sigma)[old])
    with torch.no_grad():
        out = moved(x, **extras)
    torch.testing.assert_close(out.output, ref.output, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.weights, ref.weights[:, sigma], rtol=0, atol=1e-15)


def test_equivariance_convention_on_a_hand_example():
    """σ = (2, 0, 1): new expert 0 is old expert 2, etc.; identity π becomes σ⁻¹ = (1, 2, 0)."""
    n = 3
    experts = experts_for(n)
    w = torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64)
    base = MoE(experts, FixedGate(w), dispatch="dense")
    sigma = [2, 0, 1]
    moved = MoE([experts[s] for s in sigma], FixedGate(w), dispatch="dense")
    moved.permutation.set([1, 2, 0])
    x = inputs(batch=1)
    expected = 0.2 * experts[0](x) + 0.3 * experts[1](x) + 0.5 * experts[2](x)
    torch.testing.assert_close(base(x).output, expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(moved(x).output, expected, rtol=1e-14, atol=1e-14)


# ----------------------------------------------------------------------------- errors
def test_gate_and_expert_count_must_agree(make_gate):
    with pytest.raises(ValueError, match=r"gate.num_experts=4 but 3 experts"):
        MoE(experts_for(3), make_gate("softmax", 4, D))


def test_unknown_dispatch_is_rejected(make_gate):
    with pytest.raises(ValueError, match="dispatch must be one of"):
        MoE(experts_for(4), make_gate("softmax", 4, D), dispatch="scatter")


def test_experts_must_be_a_sequence_of_modules(make_gate):
    with pytest.raises(TypeError, match="sequence of nn.Module"):
        MoE(experts_for(4)[0], make_gate("softmax", 4, D))
    with pytest.raises(TypeError, match="non-empty"):
        MoE([], make_gate("softmax", 4, D))
    with pytest.raises(TypeError, match="num_experts"):
        MoE(experts_for(4), nn.Linear(3, 4))


def test_nan_input_is_rejected_unless_validation_is_off():
    n = 4
    x = inputs()
    x[3, 1] = float("nan")
    moe = MoE(experts_for(n), Softmax(n, D).double())
    with pytest.raises(ValueError, match="NaN"):
        moe(x)
    # The gate checks with its own flag too: both must be off to let NaN through.
    with pytest.raises(ValueError, match="NaN"):
        MoE(experts_for(n), Softmax(n, D).double(), validate=False)(x)
    out = MoE(experts_for(n), Softmax(n, D, validate=False).double(), validate=False)(x)
    assert torch.isnan(out.output[3]).all()
    assert torch.isfinite(out.output[torch.arange(B) != 3]).all()
    with pytest.raises(ValueError, match=r"shape \[batch, features\]"):
        moe(x[0])


# ----------------------------------------------------------------------------- usage
G = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.25, 0.0, 0.0, 0.75]], dtype=torch.float64)
PERM = [1, 2, 3, 0]
# w[:, PERM[i]] = G[:, i]  ->  [[0, .5, .5, 0], [0, 0, 0, 1], [.75, .25, 0, 0]]
SOFT = torch.tensor([0.25, 0.25, 1 / 6, 1 / 3], dtype=torch.float64)
HARD = torch.tensor([1 / 3, 2 / 3, 1 / 3, 1 / 3], dtype=torch.float64)


def _usage_moe(**kwargs) -> MoE:
    moe = MoE(experts_for(4), FixedGate(G), **kwargs)
    moe.permutation.set(PERM)
    return moe


def test_usage_of_one_batch_on_a_hand_computed_example():
    moe = _usage_moe().train()
    out = moe(inputs(batch=3))
    expected_w = torch.tensor([[0, 0.5, 0.5, 0], [0, 0, 0, 1], [0.75, 0.25, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(out.weights, expected_w, rtol=0, atol=0)
    torch.testing.assert_close(out.usage.soft, SOFT)
    torch.testing.assert_close(out.usage.hard, HARD)
    usage = moe.expert_usage()
    torch.testing.assert_close(usage.soft, SOFT)
    torch.testing.assert_close(usage.hard, HARD)


def test_usage_meter_accumulates_in_training_only_and_resets():
    moe = _usage_moe()
    moe.eval()
    moe(inputs(batch=3))
    torch.testing.assert_close(moe.expert_usage().soft, torch.zeros(4, dtype=torch.float64))
    assert float(moe.usage.rows) == 0
    moe.train()
    moe(inputs(batch=3))
    moe(inputs(batch=1))  # first row only: w = [0, .5, .5, 0]
    usage = moe.expert_usage()
    torch.testing.assert_close(usage.soft, (SOFT * 3 + torch.tensor([0, 0.5, 0.5, 0], dtype=torch.float64)) / 4)
    torch.testing.assert_close(usage.hard, (HARD * 3 + torch.tensor([0, 1, 1, 0], dtype=torch.float64)) / 4)
    assert "usage.soft_sum" in moe.state_dict()
    moe.reset_usage()
    torch.testing.assert_close(moe.expert_usage().hard, torch.zeros(4, dtype=torch.float64))
    assert float(moe.usage.rows) == 0


def test_usage_tracking_can_be_switched_off():
    moe = _usage_moe(track_usage=False).train()
    moe(inputs(batch=3))
    assert float(moe.usage.rows) == 0


# ----------------------------------------------------------------------------- user gate
def test_user_gate_works_in_moe_and_trains():
    n = 4
    gate = LinearUserGate(n, D).double()
    moe = MoE(experts_for(n), gate)
    x = inputs()
    out = moe(x)
    assert out.output.shape == (B, U)
    assert int((out.weights != 0).sum(dim=1).max()) == 2
    dense = copy.deepcopy(moe)
    dense.dispatch = "dense"
    torch.testing.assert_close(out.output, dense(x).output, rtol=1e-12, atol=1e-12)
    out.output.square().sum().backward()
    assert gate.proj.weight.grad is not None and gate.proj.weight.grad.abs().sum() > 0
