"""The gate protocol: checked once with a clear message naming the gate, token-shaped input through
BaseGate, the ``checked=`` input mechanism and the ``zeros_carry_gradient`` attribute."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from routing_search.gates import GateOutput, GumbelSoftmax, Softmax, TaskAware, TopK
from routing_search.gates.protocol import (
    BaseGate,
    call_gate,
    check_gate,
    check_gate_outputs,
    flatten_leading,
    restore_leading,
    simplex_tolerance,
    zeros_carry_gradient,
)
from routing_search.layers import MoE, MultiGateMoE, make_experts

N, D = 4, 3


class UserGate(nn.Module):
    """A user gate whose output is chosen by the test."""

    def __init__(self, make) -> None:
        super().__init__()
        self.num_experts = N
        self.make = make

    def forward(self, x, task=None, key=None):
        return self.make(x)


def uniform(x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0], N), 1.0 / N, dtype=x.dtype)


def good(x):
    return GateOutput(weights=uniform(x), loss=x.new_zeros(()))


def experts():
    return make_experts(N, D, [5], 2)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda x: uniform(x), TypeError, r"gates\[1\] \(UserGate\) returned Tensor; a gate must return .*GateOutput"),
        (lambda x: GateOutput(weights=2 * uniform(x), loss=x.new_zeros(())), ValueError, r"gates\[1\] \(UserGate\).*sum is 1 away from 1"),
        (
            lambda x: GateOutput(weights=uniform(x) + torch.tensor([0.5, -0.5, 0.0, 0.0]), loss=x.new_zeros(())),
            ValueError,
            r"gates\[1\] \(UserGate\) returned a negative weight",
        ),
        (lambda x: GateOutput(weights=uniform(x) * float("nan"), loss=x.new_zeros(())), ValueError, "NaN/inf weights"),
        (lambda x: GateOutput(weights=uniform(x)[:, :3], loss=x.new_zeros(())), ValueError, r"shape \(5, 3\); expected \[batch, num_experts\] = \[5, 4\]"),
        (lambda x: GateOutput(weights=uniform(x), loss=0.0), TypeError, "loss that is not a 0-dim tensor"),
        (
            lambda x: GateOutput(weights=uniform(x), loss=x.new_zeros(()), selector_weights=uniform(x), selector_mix=x.new_ones(5, 1)),
            ValueError,
            "selector outputs",
        ),
    ],
)
def test_off_protocol_gate_output_is_refused_naming_the_gate(make, error, match) -> None:
    model = MultiGateMoE(experts(), [TopK(N, 2, D), UserGate(make)])
    with pytest.raises(error, match=match):
        model(torch.randn(5, D))


def test_off_protocol_output_of_a_single_gate_names_it() -> None:
    model = MoE(experts(), UserGate(lambda x: uniform(x)))
    with pytest.raises(TypeError, match=r"gate \(UserGate\) returned Tensor"):
        model(torch.randn(5, D))


def test_simplex_values_are_not_checked_without_validation() -> None:
    off = UserGate(lambda x: GateOutput(weights=2 * uniform(x), loss=x.new_zeros(())))
    out = MoE(experts(), off, validate=False)(torch.randn(5, D))
    assert out.weights.sum(dim=1).eq(2).all()
    with pytest.raises(TypeError, match="returned Tensor"):  # the type is always checked
        MoE(experts(), UserGate(lambda x: uniform(x)), validate=False)(torch.randn(5, D))


def test_gate_without_task_or_key_keywords_is_refused_at_construction() -> None:
    class NoKeywords(nn.Module):
        num_experts = N

        def forward(self, x):
            return good(x)

    class OnlyTask(nn.Module):
        num_experts = N

        def forward(self, x, task=None):
            return good(x)

    class AnyKeywords(nn.Module):
        num_experts = N

        def forward(self, x, **kwargs):
            return good(x)

    with pytest.raises(TypeError, match=r"gate \(NoKeywords\)\.forward must accept the keyword argument\(s\) task=, key="):
        MoE(experts(), NoKeywords())
    with pytest.raises(TypeError, match=r"gates\[0\] \(OnlyTask\)\.forward must accept the keyword argument\(s\) key="):
        MultiGateMoE(experts(), [OnlyTask()])
    MoE(experts(), AnyKeywords())(torch.randn(3, D))
    check_gate(TopK(N, 2, D))


BUILT_IN = ("softmax", "softmax_static", "topk1", "topk2", "topk2_static", "hash", "gumbel", "dselect_static", "dselect", "comet_static", "comet", "task_aware")


def test_built_in_gates_pass_the_output_check(make_gate, make_extras) -> None:
    x = torch.randn(9, D, dtype=torch.float64)
    for kind in BUILT_IN:
        for train in (True, False):
            gate = make_gate(kind, N, D).train(train)
            check_gate_outputs([gate(x, **make_extras(kind, 9, N))], [gate], 9, names=[kind])


def test_simplex_tolerance_follows_the_dtype() -> None:
    assert simplex_tolerance(torch.float64) == 1e-4
    assert simplex_tolerance(torch.bfloat16) > 0.05  # bfloat16 row sums are only good to ~2 digits


# ------------------------------------------------------------------ token-shaped input
@pytest.mark.parametrize("kind", ["softmax", "topk2", "hash", "dselect", "comet", "task_aware", "gumbel"])
def test_gate_on_tokens_equals_the_flattened_rows(make_gate, kind) -> None:
    gate = make_gate(kind, N, D).eval()
    batch, tokens = 3, 5
    x = torch.randn(batch, tokens, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    side = {}
    if kind == "hash":
        side = {"key": torch.randint(0, 3 * N, (batch, tokens), generator=g)}
    if kind == "task_aware":
        side = {"task": torch.randint(0, 2, (batch,), generator=g)}
    out = gate(x, **side)
    flat_side = {k: (v if v.shape == (batch, tokens) else v[:, None].expand(batch, tokens)).reshape(-1) for k, v in side.items()}
    ref = gate(x.reshape(-1, D), **flat_side)
    assert out.weights.shape == (batch, tokens, N)
    torch.testing.assert_close(out.weights, ref.weights.reshape(batch, tokens, N))
    torch.testing.assert_close(out.loss, ref.loss)
    if ref.has_selectors:
        k = ref.selector_mix.shape[1]
        torch.testing.assert_close(out.selector_weights, ref.selector_weights.reshape(batch, tokens, k, N))
        torch.testing.assert_close(out.selector_mix, ref.selector_mix.reshape(batch, tokens, k))


def test_flatten_leading_broadcasts_task_and_key_and_rejects_other_shapes() -> None:
    x = torch.zeros(2, 3, 4, D)
    rows, task, key, lead = flatten_leading(x, 1, torch.arange(6).reshape(2, 3))
    assert rows.shape == (24, D) and task == 1 and tuple(lead) == (2, 3, 4)
    assert key.tolist() == [v for v in range(6) for _ in range(4)]
    with pytest.raises(ValueError, match=r"task must have shape \[batch\]"):
        flatten_leading(x, torch.zeros(3, dtype=torch.long))
    two_d = torch.zeros(5, D)
    assert flatten_leading(two_d, "anything", None)[0] is two_d  # 2-D input: untouched
    out = restore_leading(GateOutput(weights=torch.ones(6, N) / N, loss=torch.zeros(())), (2, 3))
    assert out.weights.shape == (2, 3, N)


def test_gate_rejects_a_wrong_width_or_a_one_dimensional_input() -> None:
    gate = Softmax(N, D)
    with pytest.raises(ValueError, match="width 2 but the module was built with input_dim=3"):
        gate(torch.zeros(2, 5, 2))
    with pytest.raises(ValueError, match=r"shape \[batch, features\] or \[batch, tokens, features\]"):
        gate(torch.zeros(D))


# ------------------------------------------------------------------ checked input
def test_checked_call_skips_the_scan_only_when_asked() -> None:
    gate = Softmax(N, D)
    x = torch.randn(4, D)
    x[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/inf"):
        gate(x)
    with pytest.raises(ValueError, match="NaN/inf"):
        call_gate(gate, x)
    call_gate(gate, x, checked=True)  # the caller vouches for x
    with pytest.raises(ValueError, match="NaN/inf"):
        gate.forward(x)  # a direct forward still scans
    assert gate._input_checked is False  # restored after the call

    class Plain(nn.Module):
        num_experts = N

        def forward(self, x, task=None, key=None):
            return good(x)

    call_gate(Plain(), x, checked=True)  # a gate that does not know `checked` is not passed it


def test_base_gate_subclass_gets_tokens_and_hooks_see_rows() -> None:
    class Mine(BaseGate):
        def __init__(self) -> None:
            super().__init__(N, D)
            self.lin = nn.Linear(D, N)

        def forward(self, x, task=None, key=None):
            x = self._check_x(x)
            w = torch.softmax(self.lin(x), dim=-1)
            return GateOutput(weights=w, loss=w.new_zeros(()))

    gate = Mine()
    seen = []
    gate.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    out = gate(torch.randn(2, 3, D))
    assert out.weights.shape == (2, 3, N) and seen == [(6, D)]


# ------------------------------------------------------------------ zeros_carry_gradient
def test_zeros_carry_gradient_defaults_to_false_and_sees_inner_gates() -> None:
    assert not zeros_carry_gradient(TopK(N, 2, D))
    assert not zeros_carry_gradient(nn.Linear(2, 2))

    class Flagged(nn.Module):
        zeros_carry_gradient = True
        num_experts = N

        def forward(self, x, task=None, key=None):
            return good(x)

    assert zeros_carry_gradient(Flagged())
    wrapper = nn.Module()
    wrapper.inner = Flagged()
    assert zeros_carry_gradient(wrapper)
    assert zeros_carry_gradient(GumbelSoftmax(N, hard=True)) and not zeros_carry_gradient(GumbelSoftmax(N))
    assert zeros_carry_gradient(TaskAware.per_task([TopK(N, 1, D), GumbelSoftmax(N, D, hard=True)]))


def test_scheduled_regulariser_weights_must_be_finite_and_non_negative():
    # Regression: a schedule returning NaN made DSelectK's loss NaN, and a negative value was used by
    # DSelectK / COMET but silently ignored by TopK (constants are refused either way).
    from routing_search.gates import COMET, DSelectK, TopK

    x = torch.randn(4, 3)
    for bad in (float("nan"), -0.1):
        for gate in (DSelectK(4, 2, 3, entropy_weight=lambda c: bad), COMET(4, 2, 3, entropy_weight=lambda c: bad),
                     TopK(4, 2, 3, load_balance_weight=lambda c: bad), TopK(4, 2, 3, z_loss_weight=lambda c: bad)):
            with pytest.raises(ValueError, match=r"the regulariser weight schedule's value at call 0 must be (finite|>= 0)"):
                gate(x)
    assert torch.isfinite(DSelectK(4, 2, 3, entropy_weight=lambda c: 0.1 * c)(x).loss)
