"""Regression tests for the per-step fast paths of the layers: the cached inverse permutation (every way
of changing a permutation is seen by the next forward), the identity shortcut, the batched usage
meters, the fused output check and the reordered dispatch choice (same answers as before)."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn

from routing_search.gates import GateOutput, Softmax
from routing_search.gates.protocol import check_gate_outputs
from routing_search.layers import MLP, MoE, MultiGateMoE, Permutation, apply_permutation
from routing_search.layers.dispatch import choose_dispatch
from routing_search.layers.moe import UsageMeter


def gate_output(rows: int = 5, n: int = 4, seed: int = 0) -> GateOutput:
    gen = torch.Generator().manual_seed(seed)
    w = torch.softmax(torch.randn(rows, n, generator=gen), dim=-1)
    return GateOutput(weights=w, loss=w.new_zeros(()))


def expected(g: GateOutput, perm: Permutation) -> torch.Tensor:
    """The uncached reference: argsort of the current buffer."""
    return apply_permutation(g, perm.index.clone())


WRITES = {
    "set": lambda p, new: p.set(new),
    "index.copy_": lambda p, new: p.index.copy_(torch.as_tensor(new).expand_as(p.index)),
    "item assignment": lambda p, new: p.index.__setitem__((slice(None), slice(None)), torch.as_tensor(new)),
    "one element at a time": lambda p, new: [p.index[0, i].fill_(int(v)) for i, v in enumerate(new)],
    "load_state_dict": lambda p, new: p.load_state_dict({"index": torch.as_tensor(new).repeat(p.num_selectors, 1)}),
    "new tensor assigned": lambda p, new: setattr(p, "index", torch.as_tensor(new).repeat(p.num_selectors, 1)),
}


@pytest.mark.parametrize("how", sorted(WRITES))
def test_cached_inverse_follows_every_write(how: str) -> None:
    p = Permutation(4)
    g = gate_output()
    torch.testing.assert_close(p.apply(g), g.weights)  # identity, cache filled
    for new in ([2, 0, 3, 1], [1, 2, 3, 0], [0, 1, 2, 3], [3, 2, 1, 0]):
        WRITES[how](p, new)
        torch.testing.assert_close(p.apply(g), expected(g, p), rtol=0, atol=0)
        inverse, identity = p.inverse()
        assert identity == (new == [0, 1, 2, 3])
        assert torch.equal(torch.as_tensor(new)[inverse[0]], torch.arange(4))


def test_cache_follows_reset_and_module_copies() -> None:
    p = Permutation(4, num_selectors=2)
    p.set([[1, 0, 3, 2], [3, 2, 1, 0]])
    assert not p.inverse()[1]
    p.reset()
    assert p.inverse()[1]
    p.set([[1, 0, 3, 2], [3, 2, 1, 0]])
    twin = copy.deepcopy(p)
    twin.reset()  # the copy's cache is its own
    assert twin.inverse()[1] and not p.inverse()[1]
    buffer = io.BytesIO()
    torch.save(p.state_dict(), buffer)
    buffer.seek(0)
    fresh = Permutation(4, num_selectors=2)
    assert fresh.inverse()[1]
    fresh.load_state_dict(torch.load(buffer))
    np.testing.assert_array_equal(fresh.inverse()[0].numpy(), [[1, 0, 3, 2], [3, 2, 1, 0]])


def test_cache_under_inference_mode() -> None:
    with torch.inference_mode():
        p = Permutation(3)  # an inference tensor has no version counter: computed every call
        g = gate_output(n=3)
        p.index.copy_(torch.tensor([[2, 0, 1]]))
        torch.testing.assert_close(p.apply(g), g.weights[:, [1, 2, 0]])


def small_mmoe(tasks: int = 2, n: int = 4, d: int = 6) -> MultiGateMoE:
    torch.manual_seed(0)
    return MultiGateMoE(
        [MLP(d, [8], 3) for _ in range(n)], [Softmax(n, d) for _ in range(tasks)], [nn.Linear(3, 1) for _ in range(tasks)]
    )


def test_multigate_forward_sees_a_permutation_written_like_the_search_does() -> None:
    model = small_mmoe()
    x = torch.randn(7, 6)
    before = model(x)
    outs = [g.weights for g in before.gate_outputs]
    for t in range(2):
        torch.testing.assert_close(before.weights[t], outs[t], rtol=0, atol=0)
    model.permutation_for(0).set([3, 1, 0, 2])  # as the searches write (Permutation.set)
    model.permutation_for(1).index.copy_(torch.tensor([[1, 0, 3, 2]]))  # a direct buffer write
    after = model(x)
    torch.testing.assert_close(after.weights[0], outs[0][:, torch.argsort(torch.tensor([3, 1, 0, 2]))], rtol=0, atol=0)
    torch.testing.assert_close(after.weights[1], outs[1][:, [1, 0, 3, 2]], rtol=0, atol=0)
    state = model.state_dict()
    other = small_mmoe()
    other(x)  # fills its caches with the identity
    other.load_state_dict(state)
    for t in range(2):
        torch.testing.assert_close(other(x).outputs[t], after.outputs[t], rtol=0, atol=0)


def test_moe_forward_sees_reset_after_a_cached_call() -> None:
    torch.manual_seed(1)
    moe = MoE([MLP(5, [4], 2) for _ in range(3)], Softmax(3, 5))
    x = torch.randn(4, 5)
    moe.permutation.set([2, 0, 1])
    permuted = moe(x).weights
    moe.permutation.reset()
    out = moe(x)
    torch.testing.assert_close(out.weights, out.gate_output.weights, rtol=0, atol=0)
    torch.testing.assert_close(permuted, out.weights[:, [1, 2, 0]], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_usage_update_matches_one_meter_at_a_time(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    one = [UsageMeter(5) for _ in range(3)]
    many = [UsageMeter(5) for _ in range(3)]
    for rows in (7, 0, 33):
        weights = [torch.softmax(torch.randn(rows, 5, generator=gen, dtype=dtype), dim=-1) for _ in range(3)]
        weights[1] = weights[1] * (weights[1] > 0.2)  # some exact zeros for the hard counts
        for meter, w in zip(one, weights):
            meter.update(w)
        UsageMeter.update_all(many, weights)
    for a, b in zip(one, many):
        for name in ("soft_sum", "hard_sum", "rows"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
            assert getattr(b, name).dtype == torch.float64
    with pytest.raises(ValueError, match="one weight matrix per meter"):
        UsageMeter.update_all(many, [torch.ones(2, 5)])


def test_multigate_usage_equals_per_task_usage() -> None:
    model = small_mmoe(tasks=3)
    x = torch.randn(9, 6)
    out = model(x)
    for t in range(3):
        reference = UsageMeter(4)
        reference.update(out.weights[t])
        assert torch.equal(model.meter_for(t).soft_sum, reference.soft_sum)
        assert torch.equal(model.meter_for(t).hard_sum, reference.hard_sum)


def test_fused_output_check_names_the_bad_gate() -> None:
    gates = [Softmax(3), Softmax(3), Softmax(3)]
    good = torch.full((4, 3), 1 / 3)
    bad = good.clone()
    bad[2, 0] = -0.1
    outs = [GateOutput(weights=w, loss=w.new_zeros(())) for w in (good, bad, good)]
    with pytest.raises(ValueError, match=r"gates\[1\] \(Softmax\) returned a negative weight"):
        check_gate_outputs(outs, gates, 4)
    outs[1] = GateOutput(weights=good * 1.01, loss=good.new_zeros(()))
    with pytest.raises(ValueError, match=r"gates\[1\].*away from 1"):
        check_gate_outputs(outs, gates, 4)
    # Different widths and dtypes take the per-gate path and pass when valid.
    mixed = [GateOutput(weights=good, loss=good.new_zeros(())), GateOutput(weights=torch.full((4, 2), 0.5, dtype=torch.float64), loss=good.new_zeros(()))]
    assert check_gate_outputs(mixed, [Softmax(3), Softmax(2)], 4) == mixed
    nan = good.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"gates\[0\].*NaN/inf"):
        check_gate_outputs([GateOutput(weights=nan, loss=good.new_zeros(())), outs[0]], gates[:2], 4)


def test_dispatch_choice_unchanged() -> None:
    dense = [torch.full((4, 4), 0.25, requires_grad=True)]
    sparse = [torch.eye(4)[[0, 1, 2, 3]]]
    bn_expert = [nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))]
    assert choose_dispatch("auto", dense) == "dense"
    assert choose_dispatch("auto", sparse) == "sparse"
    assert choose_dispatch("auto", sparse, experts=bn_expert) == "dense"
    assert choose_dispatch("auto", [torch.zeros(0, 4)]) == "dense"  # no rows: dense, as before
    shifted = [torch.eye(4)[[1, 2, 3, 0]], torch.eye(4)[[2, 3, 0, 1]]]
    assert choose_dispatch("auto", [sparse[0], shifted[0]]) == "sparse"  # union: 8 of 16 pairs, at the threshold
    assert choose_dispatch("auto", [sparse[0], *shifted]) == "dense"  # union: 12 of 16
    with pytest.raises(ValueError, match="dispatch='sparse'"):
        choose_dispatch("sparse", dense, experts=bn_expert)
    assert choose_dispatch("dense", sparse, experts=bn_expert) == "dense"
