"""Tests of hardening DSelect-k / COMET gates to their exact binary form (Prop. 1)."""

from __future__ import annotations

import copy

import pytest
import torch

from routing_search.analysis import HardenCertificate, HardGate, certify, harden, snap_codes_
from routing_search.gates import COMET, DSelectK, Softmax, TaskAware
from routing_search.layers import MLP, MoE, MultiGateMoE
from routing_search.layers.dispatch import choose_dispatch

D = 3  # input width of per-example gates; odd, see sign_inputs
GATES = {"dselect": DSelectK, "comet": COMET}


def make_gate(kind: str, n: int, k: int, static: bool, seed: int = 0) -> DSelectK | COMET:
    torch.manual_seed(seed)
    return GATES[kind](n, k, None if static else D)


def sign_inputs(batch: int, seed: int = 0) -> torch.Tensor:
    """Inputs in {±1}^D with D odd, so a sum of ±10γ weights is never inside the cubic region."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (batch, D), generator=g) * 2 - 1).float()


def saturate_(gate: DSelectK | COMET, seed: int = 0) -> None:
    """Make every code / node output binary: static logits ±10γ; per-example weights ±10γ, bias 0."""
    g = torch.Generator().manual_seed(seed)
    static = gate.is_static
    if isinstance(gate, DSelectK):
        param, bias = (gate.z_logits, None) if static else (gate.z_weight, gate.z_bias)
    else:
        param, bias = (gate.node_logits, None) if static else (gate.node_weight, gate.node_bias)
    with torch.no_grad():
        signs = torch.randint(0, 2, param.shape, generator=g) * 2 - 1
        param.copy_(10 * gate.gamma * signs)
        if bias is not None:
            bias.zero_()


def codes(gate: DSelectK | COMET, x: torch.Tensor | None) -> torch.Tensor:
    return gate.smooth_codes(x) if isinstance(gate, DSelectK) else gate.node_outputs(x)


def num_code_entries(gate: DSelectK | COMET) -> int:
    per_selector = gate.num_bits if isinstance(gate, DSelectK) else gate.num_experts - 1
    return gate.num_selectors * per_selector


CASES = [(kind, n, static) for kind in GATES for n in (3, 5, 8) for static in (True, False)]
IDS = [f"{kind}-n{n}-{'static' if static else 'per_example'}" for kind, n, static in CASES]


# --------------------------------------------------------------------------- certify / Prop. 1
@pytest.mark.parametrize(("kind", "n", "static"), CASES, ids=IDS)
def test_hard_equals_soft_when_codes_binary(kind: str, n: int, static: bool) -> None:
    gate = make_gate(kind, n, 2, static)
    saturate_(gate, seed=n)
    x = sign_inputs(16, seed=n)
    assert gate.is_binary(None if static else x)
    soft, hard = gate(x), gate.hard(x)
    assert torch.equal(soft.weights, hard.weights)
    cert = certify(gate, x)
    assert cert.agree and cert.is_binary
    assert cert.num_fractional_entries == 0 and cert.max_fractional_distance == 0.0
    assert cert.hard_soft_max_abs_diff == 0.0 and cert.examples_over_k == 0
    assert cert.max_support_size <= 2 and cert.num_examples == 16
    hardened, _ = harden(gate, x)
    assert torch.equal(hardened(x).weights, soft.weights)


@pytest.mark.parametrize(("kind", "n", "static"), CASES, ids=IDS)
def test_certificate_reports_fractional_init_and_harden_fixes_it(kind: str, n: int, static: bool) -> None:
    gate = make_gate(kind, n, 2, static)
    x = torch.randn(12, D, generator=torch.Generator().manual_seed(1))
    cert = certify(gate, x)
    per_example = 1 if static else 12
    assert cert.num_entries == num_code_entries(gate) * per_example
    assert cert.num_fractional_entries == cert.num_entries  # init is inside the fractional region
    assert cert.fraction_fractional == 1.0
    assert 0.4 < cert.max_fractional_distance < 0.5
    assert not cert.agree and cert.hard_soft_max_abs_diff > 0
    assert cert.examples_over_k == 12 and cert.max_support_size > 2

    hardened, before = harden(gate, x)
    assert before.num_fractional_entries == cert.num_fractional_entries  # computed before snapping
    after = before.after
    assert after is not None and after.agree and after.num_fractional_entries == 0
    assert after.hard_soft_max_abs_diff == 0.0 and after.examples_over_k == 0
    assert type(hardened) is (type(gate) if static else HardGate)
    # The hard output is unchanged by hardening, and it has at most k exact non-zeros per row.
    out = hardened(x)
    assert torch.equal(out.weights, gate.hard(x).weights)
    assert int((out.weights != 0).sum(dim=-1).max()) <= 2
    assert torch.allclose(out.weights.sum(dim=-1), torch.ones(12))
    if not static:
        assert float(out.loss.detach()) == 0.0  # HardGate: loss 0
    if static:  # the snapped soft gate equals its hard form exactly, on any input
        assert torch.equal(hardened(x).weights, hardened.hard(x).weights)
        assert certify(hardened).agree


def test_static_dselect_certificate_counts_k_times_m() -> None:
    torch.manual_seed(0)
    gate = DSelectK(5, 3)
    cert = certify(gate)  # no data: one-row dummy
    assert cert.num_fractional_entries == 3 * 3 and cert.num_examples == 1 and not cert.agree
    assert "fractional entries 9/9" in cert.summary()
    _, cert = harden(gate)
    assert cert.num_fractional_entries == 9 and cert.after.num_fractional_entries == 0
    assert cert.after.agree and "after hardening" in cert.summary()


def test_atol_tolerates_near_binary_entries() -> None:
    torch.manual_seed(0)
    gate = DSelectK(4, 2)
    with torch.no_grad():
        gate.z_logits.copy_(torch.tensor([[0.49, -0.49], [0.49, 0.49]]))  # S within ~1e-4 of binary
    assert certify(gate).num_fractional_entries == 4
    loose = certify(gate, atol=1e-3)
    assert loose.num_fractional_entries == 0 and loose.agree


def test_certify_does_not_advance_the_training_counter() -> None:
    torch.manual_seed(0)
    gate = DSelectK(5, 2, entropy_weight=lambda calls: float(calls))
    gate.train()
    certify(gate)
    assert int(gate.calls) == 0 and gate.training


# --------------------------------------------------------------------------- snapping
def test_snap_folds_unreachable_codes() -> None:
    gate = DSelectK(5, 2)  # m = 3; codes 5, 6, 7 name no expert
    with torch.no_grad():
        gate.z_logits.copy_(torch.tensor([[0.1, 0.2, 0.3], [0.1, -0.2, 0.3]]))  # rounds to 7 and 5
    assert gate.selected_experts().tolist() == [3, 1]  # folded by the hard gate
    hard_before = gate.hard(torch.zeros(1, 1)).weights
    snap_codes_(gate)
    assert torch.equal(gate.z_logits, torch.tensor([[1.0, 1.0, -1.0], [1.0, -1.0, -1.0]]))
    unsnapped_penalty = float(DSelectK(5, 2, reachability_weight=1.0)(torch.zeros(1, 1)).loss.detach())
    out = gate(torch.zeros(1, 1))
    assert torch.equal(out.weights, hard_before)
    # All mass is reachable, so the reachability penalty vanishes (up to float rounding of its constant).
    assert abs(float(out.loss.detach())) < 1e-6 < unsnapped_penalty


def test_snap_comet_nodes() -> None:
    gate = COMET(5, 2)
    with torch.no_grad():
        gate.node_logits.copy_(torch.tensor([[0.1, -0.1, 0.2, -0.3], [-0.1, 0.1, 0.0, 0.3]]))
    snap_codes_(gate)
    assert torch.equal(gate.node_logits, torch.tensor([[1.0, -1.0, 1.0, -1.0], [-1.0, 1.0, -1.0, 1.0]]))
    assert torch.equal(gate.reach_probabilities().sum(dim=-1), torch.ones(2))
    with pytest.raises(ValueError, match="static"):
        snap_codes_(COMET(5, 2, D))


def test_snap_false_wraps_static_gate_and_shares_parameters() -> None:
    gate = make_gate("dselect", 8, 2, True)
    hardened, cert = harden(gate, snap=False, inplace=True)
    assert isinstance(hardened, HardGate) and hardened.gate is gate
    assert cert.after.agree
    assert HardGate(gate).gate is gate
    copied = HardGate(gate, copy=True)
    assert copied.gate is not gate and torch.equal(copied.gate.z_logits, gate.z_logits)


# --------------------------------------------------------------------------- layers
def experts(n: int, out: int = 2, seed: int = 0) -> list[MLP]:
    torch.manual_seed(seed)
    return [MLP(D, [4], out) for _ in range(n)]


@pytest.mark.parametrize("kind", list(GATES))
@pytest.mark.parametrize("static", [True, False])
def test_hardened_moe_equals_soft_moe_when_gate_binary(kind: str, static: bool) -> None:
    gate = make_gate(kind, 5, 2, static)
    saturate_(gate, seed=3)
    moe = MoE(experts(5), gate)
    x = sign_inputs(20, seed=4)
    hardened, cert = harden(moe, x)
    assert isinstance(hardened, MoE) and cert.agree and cert.num_gates == 1
    assert cert.parts[0].name == "gate"
    assert torch.equal(hardened(x).output, moe(x).output)


@pytest.mark.parametrize("kind", list(GATES))
@pytest.mark.parametrize("static", [True, False])
def test_hardened_moe_n16_k2_uses_sparse_dispatch(kind: str, static: bool) -> None:
    moe = MoE(experts(16), make_gate(kind, 16, 2, static, seed=5))
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(6))
    assert choose_dispatch("auto", [moe(x).weights]) == "dense"  # soft gate at init: dense
    hardened, cert = harden(moe, x)
    assert not cert.agree and cert.after.agree
    out = hardened(x)
    assert int((out.weights != 0).sum(dim=-1).max()) <= 2
    assert choose_dispatch(hardened.dispatch, [out.weights]) == "sparse"
    dense = copy.deepcopy(hardened)
    dense.dispatch = "dense"
    assert torch.allclose(out.output, dense(x).output, atol=1e-6)


def test_harden_multigate_hardens_every_gate() -> None:
    torch.manual_seed(7)
    gates = [
        DSelectK(8, 2),
        COMET(8, 2, D),
        Softmax(8, D),
        TaskAware.per_task([DSelectK(8, 2, D), COMET(8, 1)]),
    ]
    model = MultiGateMoE(experts(8), gates)
    x = torch.randn(10, D, generator=torch.Generator().manual_seed(8))
    hardened, cert = harden(model, x)
    assert cert.num_gates == 4
    assert [p.name for p in cert.parts] == ["gates.0", "gates.1", "gates.3.gates.0", "gates.3.gates.1"]
    assert cert.after.agree and cert.after.num_fractional_entries == 0 and not cert.agree
    g = hardened.gates
    assert isinstance(g[0], DSelectK) and g[0].is_binary()
    assert isinstance(g[1], HardGate)
    assert isinstance(g[2], Softmax)  # other gates unchanged
    assert isinstance(g[3].gates[0], HardGate) and isinstance(g[3].gates[1], COMET) and g[3].gates[1].is_binary()
    out = hardened(x, task=0)
    for t in (0, 1, 3):
        assert int((out.weights[t] != 0).sum(dim=-1).max()) <= 2
    assert torch.equal(out.weights[2], model(x, task=0).weights[2])


def test_harden_task_embedding_gate() -> None:
    torch.manual_seed(9)
    inner = DSelectK(5, 2, D + 2)
    wrapper = TaskAware.with_task_embedding(inner, num_tasks=3, task_embedding_dim=2, input_dim=D)
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(10))
    hardened, cert = harden(wrapper, x)
    assert isinstance(hardened.gate, HardGate) and cert.num_gates == 1
    assert cert.parts[0].num_examples == 18  # every row with every task
    task = torch.tensor([0, 1, 2, 0, 1, 2])
    _, by_task = harden(wrapper, x, task=task)
    assert by_task.parts[0].num_examples == 6
    out = hardened(x, task=task)
    assert int((out.weights != 0).sum(dim=-1).max()) <= 2
    assert torch.equal(out.weights, wrapper.gate.hard(torch.cat([x, wrapper.task_embedding(task)], 1)).weights)


def test_inplace_false_leaves_original_untouched() -> None:
    moe = MoE(experts(5), make_gate("dselect", 5, 2, True))
    state = copy.deepcopy(moe.state_dict())
    hardened, _ = harden(moe)
    assert hardened is not moe and hardened.gate is not moe.gate
    for key, value in moe.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert not moe.gate.is_binary() and hardened.gate.is_binary()

    gate = make_gate("comet", 5, 2, False)
    x = torch.randn(4, D)
    wrapped, _ = harden(gate, x)
    assert wrapped.gate is not gate
    wrapped_inplace, _ = harden(gate, x, inplace=True)
    assert wrapped_inplace.gate is gate

    same, _ = harden(moe, inplace=True)
    assert same is moe and moe.gate.is_binary()


def test_harden_moe_without_selector_gate_is_a_no_op() -> None:
    moe = MoE(experts(4), Softmax(4, D))
    hardened, cert = harden(moe)
    assert isinstance(hardened.gate, Softmax) and cert.num_gates == 0 and cert.agree
    assert "nothing to harden" in cert.summary()


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kind", list(GATES))
def test_per_example_gate_needs_x(kind: str) -> None:
    gate = make_gate(kind, 5, 2, False)
    with pytest.raises(ValueError, match="x is required"):
        certify(gate)
    with pytest.raises(ValueError, match="x is required"):
        harden(gate)
    moe = MoE(experts(5), gate)
    with pytest.raises(ValueError, match="x is required.*'gate'"):
        harden(moe, inplace=True)
    assert moe.gate is gate  # nothing was changed before the error


def test_unsupported_types_are_rejected_with_accepted_types() -> None:
    with pytest.raises(TypeError, match="DSelectK or COMET.*MultiGateMoE, or a model containing any of them; got Softmax"):
        harden(Softmax(4, D))
    with pytest.raises(TypeError, match="got Linear"):
        harden(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="DSelectK or COMET.*HardGate; got Softmax"):
        certify(Softmax(4, D))
    with pytest.raises(TypeError, match="DSelectK or COMET"):
        HardGate(Softmax(4, D))
    with pytest.raises(ValueError, match="atol"):
        certify(make_gate("dselect", 4, 2, True), atol=-1.0)


def test_aggregate_of_nothing_is_vacuous() -> None:
    empty = HardenCertificate.aggregate([])
    assert empty.num_gates == 0 and empty.agree and empty.fraction_fractional == 0.0


# --------------------------------------------------------------------------- models containing MoE layers
class TwoLayerModel(torch.nn.Module):
    """A user's model: a linear stem, an MoE, and a multi-gate MoE on top (the MoE is called twice)."""

    def __init__(self, stem_out: int = D) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.stem = torch.nn.Linear(D, D)
        self.block = torch.nn.ModuleDict({"moe": MoE(experts(5, out=D), make_gate("dselect", 5, 2, False, seed=4))})
        static = make_gate("comet", 5, 2, True, seed=5)
        self.head = MultiGateMoE(experts(5, seed=6), [static, Softmax(5, D)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.stem(x)
        h = self.block["moe"](h).output + self.block["moe"](h.flip(0)).output
        return self.head(h).outputs


def test_harden_model_containing_moe_layers() -> None:
    """harden accepts what local_search accepts: every selector gate of every MoE layer, one certificate each."""
    model = TwoLayerModel().eval()
    x = sign_inputs(24, seed=1)
    hard, cert = harden(model, x)
    assert [p.name for p in cert.parts] == ["block.moe.gate", "head.gates.0"]
    assert cert.num_gates == 2
    # The MoE's gate is certified on what the MoE receives (the stem's output, both calls concatenated).
    with torch.no_grad():
        h = model.stem(x)
        seen = torch.cat([h, h.flip(0)])
    expected = certify(model.block["moe"].gate, seen, name="block.moe.gate")
    assert cert.parts[0] == expected and cert.parts[0].num_examples == 48
    # A static gate ignores its input: certified once per row the head sees.
    assert cert.parts[1] == certify(model.head.gates[0], torch.zeros(24, D), name="head.gates.0")
    # The hardened copy: per-example gate wrapped, static gate snapped in place of the copy; original untouched.
    assert isinstance(hard.block["moe"].gate, HardGate) and isinstance(hard.head.gates[0], COMET)
    assert isinstance(model.block["moe"].gate, DSelectK)
    assert isinstance(hard.head.gates[1], Softmax)  # other gates unchanged
    assert cert.after is not None and cert.after.agree and cert.after.is_binary
    with torch.no_grad():  # the hardened model runs its gates' hard forms
        moe_hard = copy.deepcopy(model.block["moe"])
        moe_hard.gate = HardGate(moe_hard.gate)
        h = hard.stem(x)
        ref = moe_hard(h).output + moe_hard(h.flip(0)).output
        got = hard.block["moe"](h).output + hard.block["moe"](h.flip(0)).output
    torch.testing.assert_close(got, ref)


def test_harden_model_inplace_and_errors() -> None:
    model = TwoLayerModel().eval()
    with pytest.raises(ValueError, match="x is required.*'block.moe.gate'"):
        harden(model)  # a per-example gate inside: certificates need data
    hard, cert = harden(model, sign_inputs(8), inplace=True)
    assert hard is model and isinstance(model.block["moe"].gate, HardGate)
    with pytest.raises(TypeError, match="or a model containing any of them; got Sequential"):
        harden(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))


def test_harden_model_with_dict_inputs_and_a_static_gate_only() -> None:
    class KeywordModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.moe = MoE(experts(4), make_gate("dselect", 4, 2, True, seed=2))

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.moe(features).output

    model = KeywordModel()
    hard, cert = harden(model, {"features": sign_inputs(6)})
    assert [p.name for p in cert.parts] == ["moe.gate"] and cert.after.agree
    hard_static, _ = harden(model)  # static gates need no data
    torch.testing.assert_close(hard_static.moe.gate.z_logits, hard.moe.gate.z_logits)


def test_comet_nodes_behind_a_zero_branch_do_not_count_as_fractional() -> None:
    # Regression: certify counted every COMET node, so a tree that picks one leaf but keeps a fractional
    # node in a subtree it never enters was reported non-binary (and fit warned about a binary gate).
    gate = COMET(num_experts=4, k=1)
    with torch.no_grad():
        big = 10.0 * float(gate.gamma)
        gate.node_logits.copy_(torch.tensor([[big, big, 0.0]]))  # root: left; node 1: left; node 2 (right subtree): 1/2
    assert bool(gate.node_outputs()[0, 2] == 0.5)
    assert gate.is_binary()
    cert = certify(gate)
    assert cert.is_binary and cert.num_fractional_entries == 0 and cert.agree
    with torch.no_grad():
        gate.node_logits[0, 0] = 0.0  # now the root is fractional: both subtrees are entered
    cert = certify(gate)
    assert not cert.is_binary and cert.num_fractional_entries == 2  # the root and node 2 (node 1 is binary)


def test_harden_token_shaped_input_certifies_every_token() -> None:
    """A model whose MoE routes [batch, tokens, d] was refused ('x must have shape [batch, features]')."""
    torch.manual_seed(11)

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(D, D)
            self.moe = MoE(experts(5), make_gate("comet", 5, 2, False))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.moe(self.proj(x)).output

    model = Block()
    x = torch.randn(3, 4, D, generator=torch.Generator().manual_seed(12))
    hardened, cert = harden(model, x)
    assert cert.num_gates == 1 and cert.parts[0].num_examples == 12 and cert.after.agree
    assert hardened(x).shape == (3, 4, model.moe.experts[0](torch.zeros(1, D)).shape[-1])
    flat, flat_cert = harden(model.moe, model.proj(x).detach().reshape(12, D))
    assert flat_cert.hard_soft_max_abs_diff == cert.hard_soft_max_abs_diff

    gate = HardGate(make_gate("dselect", 5, 2, False))
    out = gate(x)
    assert out.weights.shape == (3, 4, 5) and out.selector_weights.shape == (3, 4, 2, 5)
    assert torch.equal(out.weights.reshape(12, 5), gate(x.reshape(12, D)).weights)

    # Per-task gates with a [batch, tokens] task: each gate is certified on its own tokens exactly once.
    router = TaskAware.per_task([DSelectK(5, 2, D), COMET(5, 1, D)])
    task = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    _, by_task = harden(router, x, task=task)
    assert [p.num_examples for p in by_task.parts] == [6, 6]


@pytest.mark.parametrize("atol", [float("nan"), -1.0, float("inf")])
def test_certificate_tolerance_must_be_finite_and_non_negative(atol: float) -> None:
    """atol=nan made every code entry count as binary (nan comparisons are False): is_binary was True."""
    gate = make_gate("dselect", 5, 2, True)
    with pytest.raises(ValueError, match="atol"):
        certify(gate, atol=atol)
    with pytest.raises(ValueError, match="atol"):
        harden(gate, atol=atol)
