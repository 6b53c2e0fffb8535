"""Tests of the multi-gate MoE (shared experts, one gate and tower per task) and SharedBottom."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from routing_search.gates import GateOutput
from routing_search.layers import MoE, MultiGateMoE, SharedBottom, make_experts

D, U, B = 3, 2, 24
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def experts_for(n: int, seed: int = 0) -> nn.ModuleList:
    return make_experts(n, D, [5], U, generator=torch.Generator().manual_seed(seed)).double()


def towers_for(tasks: int, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [nn.Linear(U, 1).double() for _ in range(tasks)]


def inputs(batch: int = B, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, D, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)


def random_rows(rows: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(n) for _ in range(rows)])


def set_random_permutations(model: MultiGateMoE, seed: int) -> None:
    for p, perm in enumerate(model.permutations):
        perm.set(random_rows(perm.num_selectors, model.num_experts, seed + p))


class UserGate(nn.Module):
    """A user-written gate: softmax of a linear map with everything but the top 2 zeroed."""

    def __init__(self, num_experts: int, input_dim: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.proj = nn.Linear(input_dim, num_experts)

    def forward(self, x, task=None, key=None) -> GateOutput:
        logits = self.proj(x)
        top = logits.topk(2, dim=-1)
        w = torch.zeros_like(logits).scatter(1, top.indices, torch.softmax(top.values, dim=-1))
        return GateOutput(weights=w, loss=x.new_zeros(()))


# Gate mixtures (every gate also receives key=, which the non-hash gates ignore).
SPARSE_MIXES = {
    "sparse": [("topk1", False), ("hash", False), ("dselect_static", True), ("comet_static", True)],
    "with_dense": [("topk2", False), ("softmax", False)],
}


def _build(make_gate, spec, n: int, seed: int, **kwargs) -> MultiGateMoE:
    gates = [make_gate(kind, n, D, seed=seed + t, binary=binary) for t, (kind, binary) in enumerate(spec)]
    return MultiGateMoE(experts_for(n, seed), gates, towers_for(len(gates), seed), **kwargs)


def _key(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 3 * n, (B,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mix", sorted(SPARSE_MIXES))
def test_sparse_dispatch_equals_dense_outputs_and_gradients(make_gate, mix):
    n = 4
    sparse = _build(make_gate, SPARSE_MIXES[mix], n, seed=1, dispatch="sparse")
    set_random_permutations(sparse, seed=2)
    dense = copy.deepcopy(sparse)
    dense.dispatch = "dense"
    key = _key(n)
    probes = [torch.randn(B, 1, generator=torch.Generator().manual_seed(10 + t), dtype=torch.float64) for t in range(sparse.num_tasks)]

    def run(model):
        x = inputs().requires_grad_(True)
        out = model(x, key=key)
        loss = sum((o * p).sum() for o, p in zip(out.outputs, probes)) + out.loss
        loss.backward()
        grads = {name: (p.grad if p.grad is not None else torch.zeros_like(p)).clone() for name, p in model.named_parameters()}
        return out, grads, x.grad.clone()

    out_s, grads_s, gx_s = run(sparse)
    out_d, grads_d, gx_d = run(dense)
    for a, b in zip(out_s.outputs, out_d.outputs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for name in grads_s:
        torch.testing.assert_close(grads_s[name], grads_d[name], rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(gx_s, gx_d, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dispatch", ["sparse", "dense"])
def test_shared_experts_run_once_for_all_tasks(make_gate, dispatch):
    n = 4
    model = _build(make_gate, SPARSE_MIXES["sparse"], n, seed=3, dispatch=dispatch)
    set_random_permutations(model, seed=4)
    calls: dict[int, list[int]] = {e: [] for e in range(n)}
    for e, expert in enumerate(model.experts):
        expert.register_forward_hook(lambda m, a, o, e=e: calls[e].append(a[0].shape[0]))
    out = model(inputs(), key=_key(n))
    used = torch.stack(out.weights).ne(0).any(dim=0)  # [B, n]: rows that some task sends to e
    for e in range(n):
        assert len(calls[e]) <= 1, f"expert {e} ran {len(calls[e])} times"
        expected = int(used[:, e].sum()) if dispatch == "sparse" else B
        assert sum(calls[e]) == expected


@pytest.mark.parametrize("share", [False, True])
def test_each_task_equals_a_single_gate_moe_with_its_tower(make_gate, share):
    n = 4
    spec = [("dselect", False), ("comet", False)]  # both k = 2: shareable per-selector permutations
    model = _build(make_gate, spec, n, seed=5, share_permutation=share)
    set_random_permutations(model, seed=6)
    x = inputs()
    out = model(x)
    assert len(model.permutations) == (1 if share else 2)
    for t in range(model.num_tasks):
        single = MoE(model.experts, model.gates[t], dispatch="dense")
        single.permutation.set(model.permutation_for(t).get())
        expected = model.towers[t](single(x).output)
        torch.testing.assert_close(out.outputs[t], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, sum(g.loss for g in out.gate_outputs))


@pytest.mark.parametrize("dispatch", ["sparse", "dense"])
def test_identical_experts_give_that_expert_for_every_task(make_gate, dispatch):
    n = 5
    expert = experts_for(1, seed=8)[0]
    kinds = ["softmax", "topk1", "hash", "gumbel", "dselect", "comet_static"]
    gates = [make_gate(k, n, D, seed=t) for t, k in enumerate(kinds)]
    model = MultiGateMoE([copy.deepcopy(expert) for _ in range(n)], gates, dispatch=dispatch).train()
    set_random_permutations(model, seed=9)
    x = inputs()
    out = model(x, key=torch.randint(0, 3 * n, (B,), generator=torch.Generator().manual_seed(1)))
    for t in range(len(kinds)):
        torch.testing.assert_close(out.outputs[t], expert(x), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- equivariance
EQUIV_SETUPS = {
    # name: (gate specs, share_permutation, per_selector)
    "per_task_mixed": ([("softmax", False), ("topk2", False), ("dselect", False), ("comet_static", False)], False, True),
    "shared_per_selector": ([("dselect_static", False), ("comet", False)], True, True),
    "shared_single_row": ([("topk2", False), ("dselect", False), ("hash", False)], True, False),
}


@functools.lru_cache(maxsize=None)
def _equiv_base(make_gate, name: str, n: int):
    spec, share, per_selector = EQUIV_SETUPS[name]
    base = _build(make_gate, spec, n, seed=20, share_permutation=share, per_selector=per_selector).eval()
    set_random_permutations(base, seed=21)
    x, key = inputs(seed=22), _key(n, seed=22)
    with torch.no_grad():
        ref = base(x, key=key)
    return base, x, key, ref


@pytest.mark.parametrize("name", sorted(EQUIV_SETUPS))
@SETTINGS
@given(data=st.data())
def test_relabelling_shared_experts_and_inverting_permutations_changes_nothing(make_gate, name, data):
    n = 5
    base, x, key, ref = _equiv_base(make_gate, name, n)
    sigma = np.asarray(data.draw(st.permutations(range(n)), label="sigma"))
    _, share, per_selector = EQUIV_SETUPS[name]
    moved = MultiGateMoE(
        [base.experts[int(s)] for s in sigma], base.gates, base.towers, share_permutation=share, per_selector=per_selector
    ).eval()
    for old, new in zip(base.permutations, moved.permutations):
        new.set(np.argsort(sigma)[old.get()])
    with torch.no_grad():
        out = moved(x, key=key)
    for t in range(base.num_tasks):
        torch.testing.assert_close(out.outputs[t], ref.outputs[t], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.weights[t], ref.weights[t][:, sigma], rtol=0, atol=1e-15)


# ----------------------------------------------------------------------------- errors
def test_construction_errors(make_gate):
    n = 4
    with pytest.raises(ValueError, match="at least one"):
        MultiGateMoE(experts_for(n), [])
    with pytest.raises(ValueError, match=r"gates\[1\].num_experts=3 but 4 experts"):
        MultiGateMoE(experts_for(n), [make_gate("softmax", 4, D), make_gate("softmax", 3, D)])
    with pytest.raises(ValueError, match="one module per task"):
        MultiGateMoE(experts_for(n), [make_gate("softmax", 4, D)] * 2, towers_for(3))
    with pytest.raises(ValueError, match="equal numbers of selectors"):
        MultiGateMoE(experts_for(n), [make_gate("dselect", 4, D), make_gate("topk2", 4, D)], share_permutation=True)
    # Sharing one row per gate works for any gates.
    model = MultiGateMoE(
        experts_for(n), [make_gate("dselect", 4, D), make_gate("topk2", 4, D)], share_permutation=True, per_selector=False
    )
    assert len(model.permutations) == 1 and model.permutations[0].num_selectors == 1
    assert model.permutation_for(0) is model.permutation_for(1)
    with pytest.raises(ValueError, match="dispatch must be one of"):
        MultiGateMoE(experts_for(n), [make_gate("softmax", 4, D)], dispatch="nope")
    with pytest.raises(TypeError, match="num_experts"):
        MultiGateMoE(experts_for(n), [nn.Linear(3, 4)])


def test_nan_input_is_rejected(make_gate):
    model = MultiGateMoE(experts_for(4), [make_gate("softmax", 4, D)])
    x = inputs()
    x[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/inf"):
        model(x)


def test_usage_meters_per_task_in_training_only(make_gate):
    n = 4
    model = MultiGateMoE(experts_for(n), [make_gate("topk1", n, D), make_gate("softmax", n, D)])
    x = inputs()
    model.eval()
    model(x)
    assert all(float(m.rows) == 0 for m in model.usage_meters)
    model.train()
    out = model(x)
    for t in range(2):
        usage = model.expert_usage(t)
        torch.testing.assert_close(usage.soft, out.weights[t].mean(dim=0))
        torch.testing.assert_close(usage.hard, (out.weights[t] != 0).double().mean(dim=0))
        torch.testing.assert_close(out.usage(t).soft, usage.soft)
    torch.testing.assert_close(model.expert_usage(0).hard.sum(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(model.expert_usage(1).hard, torch.ones(n, dtype=torch.float64))
    with pytest.raises(ValueError, match="task must be in"):
        model.expert_usage(2)
    model.reset_usage()
    assert all(float(m.rows) == 0 for m in model.usage_meters)


def test_user_gate_works_in_multigate_moe(make_gate):
    n = 4
    model = MultiGateMoE(experts_for(n), [UserGate(n, D).double(), make_gate("topk2", n, D)], towers_for(2))
    set_random_permutations(model, seed=1)
    x = inputs()
    out = model(x)
    assert [o.shape for o in out.outputs] == [(B, 1), (B, 1)]
    single = MoE(model.experts, model.gates[0])
    single.permutation.set(model.permutation_for(0).get())
    torch.testing.assert_close(out.outputs[0], model.towers[0](single(x).output), rtol=1e-12, atol=1e-12)
    sum(o.sum() for o in out.outputs).backward()
    assert model.gates[0].proj.weight.grad.abs().sum() > 0


def test_shared_bottom_baseline():
    torch.manual_seed(0)
    bottom = nn.Linear(D, U).double()
    towers = towers_for(2)
    model = SharedBottom(bottom, towers)
    x = inputs()
    out = model(x)
    assert model.num_tasks == 2
    for t in range(2):
        torch.testing.assert_close(out.outputs[t], towers[t](bottom(x)))
    assert float(out.loss) == 0.0 and out.weights == []
    with pytest.raises(ValueError, match="at least one"):
        SharedBottom(bottom, [])
