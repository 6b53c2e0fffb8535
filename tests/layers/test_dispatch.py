"""Dispatch choices that keep sparse dispatch exact: batch-dependent experts (BatchNorm), gates whose
zeros carry gradient, zero-row batches, float64 usage meters and the one-scan input check."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import routing_search._validation as validation
from routing_search import metrics
from routing_search.gates import GateOutput, TopK
from routing_search.layers import MoE, MultiGateMoE, choose_dispatch, combine_dense, combine_sparse, depends_on_batch, make_experts
from routing_search.layers.moe import ExpertUsage, expert_usage

D, U = 6, 3


def bn_experts(n: int, seed: int = 0) -> nn.ModuleList:
    torch.manual_seed(seed)
    return nn.ModuleList(nn.Sequential(nn.Linear(D, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, U)) for _ in range(n))


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


class FixedGate(nn.Module):
    """A user gate returning the first rows of a fixed weight matrix."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.num_experts = weights.shape[1]
        self.register_buffer("w", weights)

    def forward(self, x, task=None, key=None) -> GateOutput:
        return GateOutput(weights=self.w[: x.shape[0]].to(x.dtype), loss=x.new_zeros(()))


class StraightThroughTop1(nn.Module):
    """A user gate: one-hot forward, softmax gradient (its zeros carry gradient)."""

    zeros_carry_gradient = True

    def __init__(self, n: int, d: int) -> None:
        super().__init__()
        self.num_experts = n
        self.router = nn.Linear(d, n)

    def forward(self, x, task=None, key=None) -> GateOutput:
        soft = torch.softmax(self.router(x), dim=-1)
        hard = torch.zeros_like(soft).scatter(1, soft.argmax(dim=1, keepdim=True), 1.0)
        return GateOutput(weights=(hard - soft.detach()) + soft, loss=x.new_zeros(()))


# ------------------------------------------------------------------ batch-dependent experts
def test_mmoe_with_batchnorm_experts_trains_exactly_like_dense() -> None:
    """The common MMoE expert Linear+BatchNorm+ReLU with a sparse gate (auto would pick sparse)."""
    torch.manual_seed(0)
    n = 8  # at most 3 of 8 experts per row: 'auto' would choose sparse without the batch check
    gates = [TopK(n, 2, D), TopK(n, 1, D)]
    towers = [nn.Linear(U, 1), nn.Linear(U, 1)]
    auto = MultiGateMoE(bn_experts(n), gates, towers, dispatch="auto").train()
    dense = copy.deepcopy(auto)
    dense.dispatch = "dense"
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(1))
    out_a, out_d = auto(x), dense(x)
    for a, d in zip(out_a.outputs, out_d.outputs):
        torch.testing.assert_close(a, d)
    sum(o.sum() for o in out_a.outputs).backward()
    sum(o.sum() for o in out_d.outputs).backward()
    ga, gd = grads(auto), grads(dense)
    assert ga.keys() == gd.keys() and any(k.startswith("gates.") for k in ga)
    for k in ga:
        torch.testing.assert_close(ga[k], gd[k], msg=k)
    for (name, a), (_, d) in zip(auto.named_buffers(), dense.named_buffers()):
        torch.testing.assert_close(a, d, msg=name)  # running statistics too


def test_expert_receiving_one_row_does_not_crash_in_training() -> None:
    n, batch = 4, 7
    w = torch.zeros(batch, n)  # density 1/2: 'auto' would choose sparse without the batch check
    w[0, 2] = 1.0  # expert 2 gets exactly one row
    w[1:, 0] = 0.5
    w[1:, 1] = 0.5
    auto = MoE(bn_experts(n), FixedGate(w)).train()
    dense = copy.deepcopy(auto)
    dense.dispatch = "dense"
    x = torch.randn(batch, D, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(auto(x).output, dense(x).output)


def test_explicit_sparse_with_batchnorm_in_training_is_refused_and_exact_in_eval() -> None:
    n = 4
    model = MoE(bn_experts(n), TopK(n, 2, D), dispatch="sparse").train()
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="BatchNorm"):
        model(x)
    model.eval()
    dense = copy.deepcopy(model)
    dense.dispatch = "dense"
    torch.testing.assert_close(model(x).output, dense(x).output)


def test_depends_on_batch() -> None:
    assert depends_on_batch(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    assert not depends_on_batch(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).eval())
    assert depends_on_batch(nn.BatchNorm1d(2, track_running_stats=False).eval())  # batch statistics in eval too
    assert not depends_on_batch(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2), nn.Dropout(0.1)))
    assert depends_on_batch(nn.InstanceNorm1d(2, track_running_stats=True))
    assert not depends_on_batch(nn.InstanceNorm1d(2))
    custom = nn.Linear(2, 2)
    custom.batch_dependent = True
    assert depends_on_batch(nn.Sequential(custom))
    sparse_w = [torch.eye(4)]
    assert choose_dispatch("auto", sparse_w) == "sparse"
    assert choose_dispatch("auto", sparse_w, experts=[nn.BatchNorm1d(2)]) == "dense"


# ------------------------------------------------------------------ zeros that carry gradient
def test_auto_dispatch_keeps_the_gradient_of_straight_through_zeros() -> None:
    torch.manual_seed(0)
    n = 4
    experts = make_experts(n, D, [5], U, generator=torch.Generator().manual_seed(4))
    auto = MoE(experts, StraightThroughTop1(n, D)).train()
    dense = copy.deepcopy(auto)
    dense.dispatch = "dense"
    x = torch.randn(20, D, generator=torch.Generator().manual_seed(5))
    out_a, out_d = auto(x), dense(x)
    torch.testing.assert_close(out_a.output, out_d.output)
    out_a.output.pow(2).sum().backward()
    out_d.output.pow(2).sum().backward()
    ga = auto.gate.router.weight.grad
    torch.testing.assert_close(ga, dense.gate.router.weight.grad)
    assert ga.abs().sum() > 0
    with torch.no_grad():  # no gradient to keep: sparse is exact and cheaper
        assert choose_dispatch("auto", [out_a.weights.detach()], gates=[auto.gate]) == "sparse"


def test_explicit_sparse_with_straight_through_zeros_warns() -> None:
    n = 4
    model = MoE(make_experts(n, D, [5], U), StraightThroughTop1(n, D), dispatch="sparse").train()
    x = torch.randn(8, D)
    with pytest.warns(UserWarning, match="zeros_carry_gradient"):
        model(x)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)


# ------------------------------------------------------------------ zero-row batches
@pytest.mark.parametrize("dispatch", ["auto", "sparse", "dense"])
def test_zero_row_batch_gives_empty_outputs(make_gate, make_extras, dispatch) -> None:
    for kind in ("softmax", "topk2", "hash", "dselect", "comet", "task_aware"):
        experts = make_experts(4, 3, [5], U).double()
        moe = MoE(experts, make_gate(kind, 4, 3), dispatch=dispatch)
        x = torch.zeros(0, 3, dtype=torch.float64)
        out = moe(x, **make_extras(kind, 0))
        assert out.output.shape == (0, U) and out.weights.shape == (0, 4), kind
        mm = MultiGateMoE(experts, [make_gate(kind, 4, 3), make_gate(kind, 4, 3, seed=1)], [nn.Linear(U, 2).double(), nn.Identity()], dispatch=dispatch)
        outs = mm(x, **make_extras(kind, 0)).outputs
        assert [tuple(o.shape) for o in outs] == [(0, 2), (0, U)], kind
        tokens = moe(torch.zeros(0, 5, 3, dtype=torch.float64), **make_extras(kind, 0))
        assert tokens.output.shape == (0, 5, U) and tokens.weights.shape == (0, 5, 4), kind


def test_combine_on_zero_rows_keeps_multi_dimensional_outputs() -> None:
    experts = [nn.Sequential(nn.Linear(3, 6), nn.Unflatten(1, (2, 3))) for _ in range(3)]
    x, w = torch.zeros(0, 3), [torch.zeros(0, 3)]
    assert combine_dense(experts, x, w)[0].shape == (0, 2, 3)
    assert combine_sparse(experts, x, w)[0].shape == (0, 2, 3)


# ------------------------------------------------------------------ usage meters keep float64
@pytest.mark.parametrize("cast", ["bfloat16", "half", "float"])
def test_usage_counts_stay_exact_after_casting_the_model(cast) -> None:
    n, batch = 4, 257  # 257 is not a bfloat16 number, 9 * 257 = 2313 not a float16 one
    torch.manual_seed(0)
    moe = MoE(make_experts(n, D, [5], U), TopK(n, 1, D)).train()
    x = torch.randn(batch, D, generator=torch.Generator().manual_seed(6))
    for _ in range(9):
        moe(x)
    before = {k: v.clone() for k, v in moe.usage.named_buffers()}
    assert before["rows"].item() == 9 * batch
    moe = moe.to(torch.bfloat16) if cast == "bfloat16" else getattr(moe, cast)()
    for name, buf in moe.usage.named_buffers():
        assert buf.dtype == torch.float64, name
        torch.testing.assert_close(buf, before[name], rtol=0, atol=0, msg=name)
    dtype = {"bfloat16": torch.bfloat16, "half": torch.float16, "float": torch.float32}[cast]
    assert moe.gate.router.weight.dtype == dtype  # the rest of the model was cast
    mm = MultiGateMoE(make_experts(n, D, [5], U), [TopK(n, 1, D), TopK(n, 2, D)]).train()
    mm(x)
    mm = mm.to(torch.bfloat16)
    assert all(m.rows.dtype == torch.float64 and m.rows.item() == batch for m in mm.usage_meters)
    assert all(float(m.hard_sum.sum()) == batch * k for m, k in zip(mm.usage_meters, (1, 2)))


# ------------------------------------------------------------------ one scan per layer call
def test_input_is_scanned_once_per_multigate_call(monkeypatch) -> None:
    calls = []
    original = validation.check_finite

    def counting(name, tensor):
        calls.append(tuple(tensor.shape))
        return original(name, tensor)

    monkeypatch.setattr(validation, "check_finite", counting)
    n = 4
    model = MultiGateMoE(make_experts(n, D, [5], U), [TopK(n, 2, D) for _ in range(3)])
    x = torch.randn(10, D)
    model(x)
    assert calls == [(10, D)]
    calls.clear()
    model.gates[0](x)  # a gate called on its own still scans
    assert calls == [(10, D)]
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(x)
    with pytest.raises(ValueError, match="NaN"):
        model.gates[0](x)


# ------------------------------------------------------------------ one usage type
def test_metrics_expert_usage_returns_the_layers_type() -> None:
    w = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5], [1.0, 0.0, 0.0]], dtype=torch.float64)
    from_metrics = metrics.expert_usage(w.numpy())
    from_layers = expert_usage(w)
    assert isinstance(from_metrics, ExpertUsage) and isinstance(from_layers, ExpertUsage)
    torch.testing.assert_close(from_metrics.soft, from_layers.soft)
    torch.testing.assert_close(from_metrics.hard, from_layers.hard)
    soft, hard = metrics.expert_usage(w, threshold=0.25)
    torch.testing.assert_close(hard, torch.tensor([0.75, 0.5, 0.25], dtype=torch.float64))
    torch.testing.assert_close(expert_usage(w.reshape(2, 2, 3)).soft, from_layers.soft)  # leading dims
