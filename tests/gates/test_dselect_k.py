"""Tests of the DSelect-k gate and the smooth-step function it is built on."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from routing_search.gates.binary_encoding import num_bits, selector
from routing_search.gates.dselect_k import DSelectK
from routing_search.gates.protocol import GateOutput
from routing_search.gates.smooth_step import GammaAnnealing, smooth_step

D = 3  # input width of per-example gates
CASES = [(n, k) for n in (2, 3, 5, 8, 16) for k in sorted({1, 2, n})]


def make_gate(n: int, k: int, static: bool, seed: int = 0, **kwargs) -> DSelectK:
    torch.manual_seed(seed)
    return DSelectK(n, k, None if static else D, **kwargs)


def saturate_(gate: DSelectK, seed: int = 0) -> None:
    """Put every z logit at ±10γ (per-example: ±10γ per weight, with inputs in {±1}^D below)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if gate.is_static:
            signs = torch.randint(0, 2, gate.z_logits.shape, generator=g) * 2 - 1
            gate.z_logits.copy_(10 * gate.gamma * signs)
        else:
            signs = torch.randint(0, 2, gate.z_weight.shape, generator=g) * 2 - 1
            gate.z_weight.copy_(10 * gate.gamma * signs)
            gate.z_bias.zero_()


def sign_inputs(batch: int, seed: int = 0) -> torch.Tensor:
    """Inputs in {±1}^D with D odd: W x is an odd multiple of 10γ, never inside the cubic region."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (batch, D), generator=g) * 2 - 1).float()


# ---------------------------------------------------------------- smooth step
@pytest.mark.parametrize("gamma", [0.5, 1.0, 3.0])
def test_smooth_step_values_and_slopes_match_at_the_joins(gamma: float) -> None:
    h = 1e-9
    for edge, value in ((-gamma / 2, 0.0), (gamma / 2, 1.0)):
        t = torch.tensor([edge - h, edge, edge + h], dtype=torch.float64, requires_grad=True)
        s = smooth_step(t, gamma)
        (grad,) = torch.autograd.grad(s.sum(), t)
        assert torch.allclose(s, torch.full_like(s, value), atol=1e-12)
        assert torch.allclose(grad, torch.zeros_like(grad), atol=1e-6)
    t = torch.tensor([-gamma, 0.0, gamma], dtype=torch.float64, requires_grad=True)
    s = smooth_step(t, gamma)
    (grad,) = torch.autograd.grad(s.sum(), t)
    assert s.tolist() == [0.0, 0.5, 1.0]
    assert grad[0] == 0 and grad[2] == 0
    assert torch.isclose(grad[1], torch.tensor(1.5 / gamma, dtype=torch.float64))


# ---------------------------------------------------------------- basic contract
@pytest.mark.parametrize(("n", "k"), CASES)
@pytest.mark.parametrize("static", [True, False])
def test_rows_on_simplex_and_selector_identity(n: int, k: int, static: bool) -> None:
    gate = make_gate(n, k, static, entropy_weight=0.1)
    x = torch.randn(7, D)
    out = gate(x)
    assert isinstance(out, GateOutput)
    m = num_bits(n)
    assert gate.num_selectors == k and gate.num_bits == m
    assert out.weights.shape == (7, n) and out.selector_weights.shape == (7, k, n)
    assert out.selector_mix.shape == (7, k) and out.loss.shape == ()
    for t in (out.weights, out.loss, out.selector_weights, out.selector_mix):
        assert bool(torch.isfinite(t).all())
    assert bool((out.weights >= 0).all())
    assert torch.allclose(out.weights.sum(-1), torch.ones(7), atol=1e-6)
    assert torch.allclose(out.selector_weights.sum(-1), torch.ones(7, k), atol=1e-6)
    assert torch.allclose(out.selector_mix.sum(-1), torch.ones(7), atol=1e-6)
    assert torch.allclose(out.weights, torch.einsum("bk,bkn->bn", out.selector_mix, out.selector_weights))
    if static:
        assert torch.equal(out.weights, out.weights[:1].expand(7, n))
    # Initialised inside the fractional region: everything is nonzero, loss is positive.
    assert not gate.is_binary(None if static else x)
    assert bool((out.weights > 0).all()) and out.loss.item() > 0


@pytest.mark.parametrize("unreachable", ["renormalize", "fold"])
@pytest.mark.parametrize("static", [True, False])
def test_unreachable_policies_stay_on_simplex(unreachable: str, static: bool) -> None:
    gate = make_gate(5, 2, static, unreachable=unreachable, reachability_weight=1.0)
    x = torch.randn(4, D)
    out = gate(x)
    assert torch.allclose(out.selector_weights.sum(-1), torch.ones(4, 2), atol=1e-6)
    s = gate.smooth_codes(x)
    full = selector(s, 8)
    if unreachable == "renormalize":
        expected = full[..., :5] / full[..., :5].sum(-1, keepdim=True)
    else:  # codes 5, 6, 7 fold onto experts 1, 2, 3
        expected = full[..., :5].clone()
        expected[..., 1:4] += full[..., 5:]
    assert torch.allclose(out.selector_weights, expected, atol=1e-6)
    # penalty: sum over selectors of -log((mass+eps)/(1+eps)), positive while mass is lost
    no_penalty = make_gate(5, 2, static, unreachable=unreachable, reachability_weight=0.0)
    assert no_penalty(x).loss.item() == 0.0
    mass = full[..., :5].sum(-1)
    expected_pen = -torch.log((mass + 1e-6) / (1 + 1e-6)).sum(-1).mean()
    assert torch.allclose(out.loss, expected_pen, atol=1e-6)


def test_power_of_two_has_no_reachability_penalty() -> None:
    gate = make_gate(8, 2, True, reachability_weight=5.0)
    assert gate(torch.zeros(3, 1)).loss.item() == 0.0


@pytest.mark.parametrize(("n", "d", "k"), [(3, 4, 2), (8, 5, 3), (16, 2, 16)])
def test_parameter_counts(n: int, d: int, k: int) -> None:
    m = num_bits(n)
    assert sum(p.numel() for p in DSelectK(n, k).parameters()) == k + k * m
    assert sum(p.numel() for p in DSelectK(n, k, d).parameters()) == k * (d + 1) + k * m * (d + 1)


def test_static_gate_accepts_any_width_and_follows_dtype() -> None:
    gate = make_gate(5, 2, True).double()
    out = gate(torch.randn(3, 11, dtype=torch.float64))
    assert out.weights.dtype == torch.float64 and out.loss.dtype == torch.float64
    assert gate.smooth_codes().shape == (2, 3)
    assert gate.smooth_codes(torch.zeros(4, 1, dtype=torch.float64)).shape == (4, 2, 3)


def test_initialisation_inside_fractional_region() -> None:
    gate = make_gate(8, 4, True, gamma=2.0)
    assert bool((gate.z_logits.abs() <= 2.0 / 100).all())
    s = gate.smooth_codes()
    assert bool(((s > 0) & (s < 1)).all())


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize(("n", "unreachable"), [(3, "renormalize"), (5, "fold"), (8, "renormalize")])
@pytest.mark.parametrize("static", [True, False])
def test_gradcheck_parameters_and_input(n: int, unreachable: str, static: bool) -> None:
    gate = make_gate(n, 2, static, gamma=1.0, entropy_weight=0.3, unreachable=unreachable).double()
    with torch.no_grad():  # spread the logits over the fractional region for non-trivial gradients
        for name, p in gate.named_parameters():
            p.uniform_(-0.15, 0.15) if name.startswith("z") else p.normal_()
    names = [name for name, _ in gate.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in gate.named_parameters())
    x = (0.5 * torch.randn(3, D, dtype=torch.float64)).requires_grad_(not static)
    assert 0 < gate.smooth_codes(x).min().item() and gate.smooth_codes(x).max().item() < 1

    def f(x: torch.Tensor, *ps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = functional_call(gate, dict(zip(names, ps)), (x,))
        return out.weights, out.loss, out.selector_weights

    assert torch.autograd.gradcheck(f, (x, *params))


# ---------------------------------------------------------------- binary codes and the hard gate
@pytest.mark.parametrize(("n", "k"), CASES)
@pytest.mark.parametrize("static", [True, False])
def test_saturated_gate_selects_at_most_k_and_equals_hard_gate(n: int, k: int, static: bool) -> None:
    gate = make_gate(n, k, static, entropy_weight=1.0, reachability_weight=0.0)
    saturate_(gate, seed=n + k)
    x = sign_inputs(16, seed=n)
    assert gate.is_binary(x)
    soft, hard = gate(x), gate.hard(x)
    nnz = (soft.weights != 0).sum(-1)
    chosen = gate.selected_experts(x)  # [B, k]
    assert bool((chosen < n).all())
    distinct = torch.tensor([len(set(row.tolist())) for row in chosen])
    assert torch.equal(nnz, distinct) and bool((nnz <= k).all())
    assert torch.equal(soft.weights, hard.weights)
    assert torch.equal(soft.selector_weights, hard.selector_weights)
    assert torch.equal(soft.selector_mix, hard.selector_mix)
    assert torch.equal(soft.selector_weights.argmax(-1), chosen)
    assert torch.equal(soft.selector_weights, torch.nn.functional.one_hot(chosen, n).float())
    assert abs(soft.loss.item()) < 1e-5 * k  # entropy of one-hot rows (eps 1e-6 inside the log)
    assert torch.allclose(soft.weights.sum(-1), torch.ones(16), atol=1e-6)


@pytest.mark.parametrize("static", [True, False])
def test_hard_gate_rounds_fractional_codes(static: bool) -> None:
    gate = make_gate(5, 2, static)
    x = torch.randn(6, D)
    out = gate.hard(x)
    assert bool(((out.weights != 0).sum(-1) <= 2).all())
    assert torch.allclose(out.weights.sum(-1), torch.ones(6), atol=1e-6)
    # rounding each bit picks the most probable code of r(S(z)) over all 2^m codes (then folded)
    s = gate.smooth_codes(x)
    mode = selector(s, 8).argmax(-1)
    folded = torch.where(mode >= 5, mode - 4, mode)
    expected = gate.selected_experts(x)
    if static:
        expected = expected.expand(6, 2)
    assert torch.equal(folded, expected)
    assert torch.equal(out.selector_weights.argmax(-1), expected)


def test_binary_unreachable_code_is_folded_in_soft_and_hard_gate() -> None:
    gate = make_gate(3, 1, True, reachability_weight=1.0)
    with torch.no_grad():
        gate.z_logits.copy_(torch.tensor([[5.0, 5.0]]))  # code 3 names no expert -> folds to 1
    x = torch.zeros(2, 1)
    soft = gate(x)
    assert torch.equal(soft.weights, torch.tensor([[0.0, 1.0, 0.0]] * 2))
    assert torch.equal(gate.hard(x).weights, soft.weights)
    assert gate.selected_experts().tolist() == [1]
    # a selector stuck on unreachable codes pays -log(eps / (1 + eps)) (bounded, unlike 1/eps)
    assert soft.loss.item() == pytest.approx(-torch.log(torch.tensor(1e-6 / (1 + 1e-6))).item(), rel=1e-5)
    assert gate.binary_codes().tolist() == [[1.0, 1.0]]


# ---------------------------------------------------------------- regulariser and schedule
def test_entropy_zero_when_binary_positive_when_fractional() -> None:
    gate = make_gate(8, 3, False, entropy_weight=0.5)
    x = sign_inputs(5)
    fractional = gate(x).loss
    assert fractional.item() > 0.1
    saturate_(gate)
    assert abs(gate(x).loss.item()) < 1e-5


def test_entropy_matches_definition() -> None:
    gate = make_gate(4, 2, False, entropy_weight=0.7)
    x = torch.randn(5, D)
    out = gate(x)
    r = out.selector_weights
    expected = 0.7 * (-(r * torch.log(r + 1e-6)).sum(-1)).sum(-1).mean()
    assert torch.allclose(out.loss, expected, atol=1e-6)


def test_entropy_weight_schedule_receives_call_count() -> None:
    seen: list[int] = []

    def schedule(calls: int) -> float:
        seen.append(calls)
        return 0.0 if calls < 2 else 1.0

    gate = make_gate(8, 2, True, entropy_weight=schedule)
    x = torch.zeros(2, 1)
    losses = [gate(x).loss.item() for _ in range(3)]
    assert seen == [0, 1, 2]
    assert losses[0] == losses[1] == 0.0 and losses[2] > 0
    gate.eval()
    gate(x)
    gate(x)
    assert seen[-2:] == [3, 3] and int(gate.calls) == 3  # no advance in eval mode
    assert gate.hard(x).loss.item() == 0.0 and int(gate.calls) == 3


# ---------------------------------------------------------------- bad input
def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="k must be in"):
        DSelectK(4, 5)
    with pytest.raises(ValueError, match="k must be in"):
        DSelectK(4, 0)
    with pytest.raises(ValueError, match="num_experts"):
        DSelectK(1, 1)
    with pytest.raises(ValueError, match="gamma"):
        DSelectK(4, 2, gamma=0.0)
    with pytest.raises(ValueError, match="unreachable"):
        DSelectK(5, 2, unreachable="penalize")
    with pytest.raises(ValueError, match="input_dim"):
        DSelectK(4, 2, 0)
    with pytest.raises(ValueError, match="entropy_weight"):
        DSelectK(4, 2, entropy_weight=-1.0)
    with pytest.raises(ValueError, match="reachability_weight"):
        DSelectK(5, 2, reachability_weight=-1.0)
    gate = DSelectK(4, 2, D)
    with pytest.raises(ValueError, match="input_dim"):
        gate(torch.randn(2, D + 1))
    with pytest.raises(ValueError, match="x contains"):
        gate(torch.tensor([[0.0, float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="x must have shape"):
        gate(torch.randn(D))
    with pytest.raises(ValueError, match="x is required"):
        gate.smooth_codes()
    DSelectK(4, 2, D, validate=False)(torch.tensor([[0.0, float("nan"), 1.0]]))  # check switched off


# ---------------------------------------------------------------- unreachable codes near saturation
def _approach_unreachable(gate: DSelectK, t0: float) -> None:
    """n = 3 (codes 0..3, code 3 names no expert): bit 1 saturated at 1, bit 0 at logit t0 -> gamma/2."""
    with torch.no_grad():
        gate.z_logits.copy_(torch.tensor([[t0, 0.6]], dtype=gate.z_logits.dtype))


def test_renormalize_is_continuous_where_reachable_mass_reaches_zero() -> None:
    """Regression: the soft gate jumped from expert 2 to expert 1 when the mass hit exactly 0."""
    gate = DSelectK(3, 1).double()
    x = torch.zeros(1, 1, dtype=torch.float64)
    _approach_unreachable(gate, 0.5)  # binary: code 3, folded onto expert 1
    at_limit = gate(x).weights.detach()
    assert at_limit.tolist() == [[0.0, 1.0, 0.0]] == gate.hard(x).weights.tolist()
    for u in (1e-6, 1e-7, 1e-9):
        _approach_unreachable(gate, 0.5 - u)
        near = gate(x).weights.detach()
        assert float((near - at_limit).abs().max()) < 1e-2
        # hard() is the soft gate's limit at the rounded binary point
        assert torch.equal(gate.hard(x).weights, at_limit)


def test_renormalize_gradients_bounded_near_zero_reachable_mass() -> None:
    """Regression: gradients of about 5e8 (the 1/mass penalty) just before the mass reached 0."""
    gate = DSelectK(3, 1, reachability_weight=1.0).double()
    x = torch.zeros(1, 1, dtype=torch.float64)
    worst = 0.0
    for t0 in torch.linspace(0.3, 0.5, 2001, dtype=torch.float64).tolist():
        _approach_unreachable(gate, t0)
        out = gate(x)
        for value in (out.loss, *out.weights[0]):
            (grad,) = torch.autograd.grad(value, gate.z_logits, retain_graph=True)
            worst = max(worst, float(grad.abs().max()))
    assert worst < 1e4


def test_renormalize_differs_from_plain_division_by_less_than_eps() -> None:
    gate = make_gate(5, 2, False)
    x = torch.randn(64, D)
    full = selector(gate.smooth_codes(x), 8)
    plain = full[..., :5] / full[..., :5].sum(-1, keepdim=True)
    torch.testing.assert_close(gate(x).selector_weights, plain, atol=2e-6, rtol=0)


# ---------------------------------------------------------------- dtype and naive reference
def test_float64_input_to_float32_gate_names_x_and_both_dtypes() -> None:
    gate = make_gate(5, 2, False)
    with pytest.raises(TypeError, match=r"x has dtype torch\.float64 but the gate DSelectK has dtype torch\.float32"):
        gate(torch.randn(3, D, dtype=torch.float64))
    with pytest.raises(TypeError, match="float64"):
        gate.hard(torch.randn(3, D, dtype=torch.float64))


def _naive_dselect(gate: DSelectK, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's formulas term by term (loops over selectors, experts and bits): (weights, loss)."""
    n, k, m = gate.num_experts, gate.num_selectors, gate.num_bits
    eps = 1e-6
    rows_w, rows_loss = [], []
    for b in range(x.shape[0]):
        if gate.is_static:
            alpha, z = gate.alpha_logits, gate.z_logits
        else:
            alpha = gate.alpha_weight @ x[b] + gate.alpha_bias
            z = torch.einsum("kmd,d->km", gate.z_weight, x[b]) + gate.z_bias
        s = smooth_step(z, gate.gamma)
        mix = torch.softmax(alpha, dim=0)
        weights = torch.zeros(n, dtype=x.dtype)
        loss = torch.zeros((), dtype=x.dtype)
        for i in range(k):
            r = []
            for code in range(2**m):
                p = torch.ones((), dtype=x.dtype)
                for j in range(m):
                    p = p * (s[i, j] if (code >> j) & 1 else 1 - s[i, j])
                r.append(p)
            reach = torch.stack(r[:n])
            if 2**m > n:
                mass = reach.sum()
                folded = reach.clone()
                for code in range(n, 2**m):
                    folded[code - 2 ** (m - 1)] = folded[code - 2 ** (m - 1)] + r[code]
                reach = (reach + eps * folded) / (mass + eps)
                loss = loss - gate.reachability_weight * torch.log((mass + eps) / (1 + eps))
            loss = loss - gate.entropy_weight * (reach * torch.log(reach + eps)).sum()
            weights = weights + mix[i] * reach
        rows_w.append(weights)
        rows_loss.append(loss)
    return torch.stack(rows_w), torch.stack(rows_loss).mean()


@pytest.mark.parametrize(("n", "k"), [(3, 2), (8, 2), (16, 3), (6, 1)])
@pytest.mark.parametrize("static", [True, False])
def test_vectorised_forward_and_gradients_equal_naive_reference(n: int, k: int, static: bool) -> None:
    gate = make_gate(n, k, static, entropy_weight=0.3).double()
    with torch.no_grad():
        for name, p in gate.named_parameters():
            p.uniform_(-0.3, 0.3) if name.startswith("z") else p.normal_()
    x = torch.randn(5, D, dtype=torch.float64)
    out = gate(x)
    ref_w, ref_loss = _naive_dselect(gate, x)
    torch.testing.assert_close(out.weights, ref_w, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out.loss, ref_loss, atol=1e-12, rtol=1e-12)
    probe = torch.randn(n, dtype=torch.float64)
    params = list(gate.parameters())
    fast = torch.autograd.grad((out.weights @ probe).sum() + out.loss, params)
    slow = torch.autograd.grad((ref_w @ probe).sum() + ref_loss, params)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_gamma_schedule_anneals_in_training_only_and_forces_binary_codes() -> None:
    gate = make_gate(8, 2, True, gamma=lambda calls: 1.0 * 0.5**calls)
    assert gate.gamma == 1.0 and gate.gamma_schedule is not None
    x = torch.zeros(2, 1)
    assert not gate.is_binary()
    gate.eval()
    gate(x)
    assert gate.gamma == 1.0  # eval calls neither count nor anneal
    gate.train()
    for _ in range(12):
        gate(x)
    assert gate.gamma == 0.5**11
    # |z| >= 1/(2*100)... init is U(-0.01, 0.01); gamma/2 < 2.5e-4 saturates every code not that close to 0
    s = gate.smooth_codes()
    assert bool(((s == 0) | (s == 1) | (gate.z_logits.abs() < gate.gamma / 2)).all())
    with pytest.raises(ValueError, match="gamma"):
        make_gate(8, 2, True, gamma=lambda calls: -1.0)


def test_default_annealing_and_set_annealing() -> None:
    gate = make_gate(4, 1, True)
    assert gate.anneal is not None and gate.gamma == 1.0
    gate.set_annealing(GammaAnnealing(begin=1, end=3, final_ratio=0.01))
    x = torch.zeros(1, 1)
    for _ in range(4):
        gate(x)
    assert gate.gamma == pytest.approx(0.01)
    gate.set_annealing(None)
    assert gate.gamma == 1.0
    with pytest.raises(TypeError, match="anneal"):
        gate.set_annealing(0.5)  # type: ignore[arg-type]


# ---------------------------------------------------------------- fused forward/backward
def test_smooth_step_gradcheck_and_exact_ends() -> None:
    """The one-Function smooth step against finite differences, exactly 0/1 with zero slope at and beyond ±γ/2."""
    t = torch.tensor([-0.4, -0.1, 0.0, 0.05, 0.3, 0.44], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u: smooth_step(u, 0.9), (t,))
    ends = torch.tensor([-5.0, -0.45, 0.45, 5.0], dtype=torch.float64, requires_grad=True)
    s = smooth_step(ends, 0.9)
    assert s.tolist() == [0.0, 0.0, 1.0, 1.0]
    (grad,) = torch.autograd.grad(s.sum(), ends)
    assert grad.tolist() == [0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize(("n", "k", "unreachable"), [(2, 1, "renormalize"), (8, 2, "renormalize"), (16, 3, "fold"), (6, 2, "renormalize"), (5, 2, "fold")])
@pytest.mark.parametrize("static", [True, False])
@pytest.mark.parametrize("entropy_weight", [0.0, 0.3])
def test_fused_gate_passes_gradcheck_on_every_output(n: int, k: int, unreachable: str, static: bool, entropy_weight: float, all_outputs) -> None:
    """The hand-written backward (the whole gate for n = 2^m, the selector table otherwise) against finite
    differences, output by output (so the paths where the other outputs get no gradient are checked too)."""
    gate = make_gate(
        n, k, static, seed=n + k, entropy_weight=entropy_weight, unreachable=unreachable,
        reachability_weight=0.5, anneal=None,
    ).double()
    with torch.no_grad():
        for name, p in gate.named_parameters():
            p.uniform_(-0.3, 0.3) if name.startswith("z") else p.normal_()
    run, params = all_outputs(gate, torch.randn(4, D, dtype=torch.float64))
    assert torch.autograd.gradcheck(run, params, eps=1e-6, atol=1e-7)


def test_fused_backward_through_zero_factors_equals_the_composed_autograd() -> None:
    """Saturated bits (a factor exactly 0), and S rounding to 1 inside the cubic region (a slope that is not 0
    next to a factor 1 - s that is): the fused backward is finite and equals autograd through the composed
    ops (smooth step, selector_fast, softmax), where a zero factor passes no gradient."""
    from routing_search.gates.binary_encoding import mix_selectors, selector_fast, selector_softmax

    gate = make_gate(8, 2, True, anneal=None).double()
    with torch.no_grad():
        gate.z_logits.uniform_(-0.2, 0.2)
        gate.z_logits[0, 0] = 10.0
        gate.z_logits[1, 1] = 0.5 - 1e-9  # S = 1 - 6e-18 rounds to 1 in float64, slope about 6e-9
    assert gate.smooth_codes()[1, 1] == 1.0
    out = gate(torch.zeros(3, 1, dtype=torch.float64))
    r = selector_fast(smooth_step(gate.z_logits, gate.gamma), 8)
    mix = selector_softmax(gate.alpha_logits)
    probe_w, probe_r = torch.randn(8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    params = [gate.alpha_logits, gate.z_logits]
    got = torch.autograd.grad(
        (out.weights[0] @ probe_w) + (out.selector_weights[0] * probe_r).sum() + out.selector_mix[0, 0], params
    )
    want = torch.autograd.grad((mix_selectors(mix, r) @ probe_w) + (r * probe_r).sum() + mix[0], params)
    for a, b in zip(got, want):
        assert bool(torch.isfinite(a).all())
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    assert got[1][0, 0] == 0  # the saturated bit


# ---------------------------------------------------------------- the fast forward's pieces
@pytest.mark.parametrize("gamma", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_smooth_step_and_slope_gives_the_bits_of_smooth_step_slope(gamma: float, dtype: torch.dtype) -> None:
    from routing_search.gates.smooth_step import smooth_step_and_slope, smooth_step_slope

    g = torch.Generator().manual_seed(3)
    t = (torch.rand(4, 3, 2000, generator=g, dtype=torch.float64) - 0.5).to(dtype) * 1.5 * gamma
    t[0, 0, :4] = torch.tensor([-gamma / 2, gamma / 2, 0.0, gamma / 2 - 1e-9], dtype=dtype)
    s_ref, slope_ref = smooth_step_slope(t, gamma)
    buf = torch.empty(4, 6, 2000, dtype=dtype)  # S written into a strided view, as the gate does
    slope = smooth_step_and_slope(t, gamma, out=buf[:, 3:])
    assert torch.equal(buf[:, 3:], s_ref) and torch.equal(s_ref, smooth_step(t, gamma))
    torch.testing.assert_close(slope, slope_ref, atol=0, rtol=0)


def test_stacked_logits_t_is_the_transposed_stacked_product() -> None:
    from routing_search.gates.smooth_step import stacked_logits_t

    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 5, generator=g, dtype=torch.float64)
    ws = [torch.randn(2, 5, generator=g, dtype=torch.float64), torch.randn(8, 5, generator=g, dtype=torch.float64)]
    bs = [torch.randn(2, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)]
    out = stacked_logits_t(x, ws, bs)
    assert out.shape == (10, 9)
    separate = [torch.nn.functional.linear(x, w, b) for w, b in zip(ws, bs)]
    torch.testing.assert_close(out.t(), torch.cat(separate, dim=-1), atol=1e-13, rtol=1e-13)


def _table_of(s: torch.Tensor) -> torch.Tensor:
    """The gate's selector table for codes ``s`` ``[rows, k, m]`` in ``[0, 1]`` (factor layout and gather as in the forward)."""
    from routing_search.gates.dselect_k import _gather_matrix, _half_products

    rows, k, m = s.shape
    factors = torch.cat([1 - s, s], dim=-1).permute(1, 2, 0).contiguous()  # [k, 2m, rows]
    halves = _half_products(factors)
    gather = _gather_matrix(m).to(s.dtype)
    high = 2 ** (m - m // 2)
    return torch.stack([(halves[i, :high].t() @ gather[:high]) * (halves[i, high:].t() @ gather[high:]) for i in range(k)], dim=1)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kronecker_selector_table_equals_the_code_matrix_form(m: int, dtype: torch.dtype) -> None:
    """The probability-domain Kronecker table against the reference product and the log/code-matrix form:
    values to rounding, exact one-hot rows for binary codes, exact zeros behind a zero factor."""
    from routing_search.gates.binary_encoding import selector_fast

    n = 2**m
    g = torch.Generator().manual_seed(m)
    s = torch.rand(6, 3, m, generator=g, dtype=torch.float64).to(dtype)
    s[0] = (s[0] > 0.5).to(dtype)  # binary codes
    s[1, 0, 0], s[1, 1, m - 1] = 0.0, 1.0  # one factor exactly 0 (and its partner exactly 1)
    table, ref, fast = _table_of(s), selector(s, n), selector_fast(s, n)
    tol = {"atol": 1e-15, "rtol": 1e-13} if dtype == torch.float64 else {"atol": 1e-7, "rtol": 1e-5}
    torch.testing.assert_close(table, ref, **tol)
    torch.testing.assert_close(table, fast, **tol)
    assert torch.equal(table[0], ref[0]) and torch.equal(table[0], fast[0])  # one-hot, bit for bit
    assert torch.equal(table[1] == 0, ref[1] == 0)
    assert torch.allclose(table.sum(-1), torch.ones(6, 3, dtype=dtype), atol=1e-6)


@pytest.mark.parametrize(("n", "k"), [(2, 2), (4, 3), (8, 2), (16, 2), (32, 3)])
@pytest.mark.parametrize("static", [True, False])
def test_fused_gate_with_saturated_bits_equals_the_composed_form_in_float64(n: int, k: int, static: bool) -> None:
    """m = 1..5 with some bits saturated (factors exactly 0 and 1) and the rest fractional: every output and
    the float64 gradients of the fused gate equal the composed form (reference product selector, softmax,
    entropy) to 1e-12."""
    from routing_search.gates.binary_encoding import mix_selectors

    gate = make_gate(n, k, static, seed=n + k, entropy_weight=0.3, anneal=None).double()
    m = num_bits(n)
    with torch.no_grad():
        for name, p in gate.named_parameters():
            p.uniform_(-0.3, 0.3) if name.startswith("z") else p.normal_()
        z_bias = gate.z_logits if static else gate.z_bias
        z_bias[0, 0] = 10.0  # S = 1: the factor 1 - s is exactly 0
        z_bias[k - 1, m - 1] = -10.0  # S = 0
    x = torch.randn(5, D, dtype=torch.float64)
    out = gate(x)
    alpha, z = gate._logits(x)
    s = smooth_step(z, gate.gamma)
    assert bool((s == 0).any()) and bool((s == 1).any())
    assert k * m == 2 or bool(((s > 0) & (s < 1)).any())
    r = selector(s, n)
    mix = torch.softmax(alpha, dim=-1)
    weights = mix_selectors(mix, r)
    loss = 0.3 * (-(r * torch.log(r + 1e-6)).sum(dim=(-2, -1))).mean()
    for got, want in ((out.weights, weights), (out.selector_weights, r), (out.selector_mix, mix), (out.loss, loss)):
        torch.testing.assert_close(got, want.expand_as(got), atol=1e-12, rtol=1e-12)
    params = list(gate.parameters())
    probe_w, probe_r = torch.randn(n, dtype=torch.float64), torch.randn(k, n, dtype=torch.float64)
    got = torch.autograd.grad((out.weights @ probe_w).sum() + (out.selector_weights * probe_r).sum() + out.loss, params)
    want = torch.autograd.grad((weights @ probe_w).sum() + (r * probe_r).expand_as(out.selector_weights).sum() + loss, params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("n", [8, 6])
@pytest.mark.parametrize("static", [True, False])
def test_zero_rows_tokens_and_no_grad(n: int, static: bool) -> None:
    gate = make_gate(n, 2, static, entropy_weight=0.1)
    empty = gate(torch.zeros(0, D))
    assert empty.weights.shape == (0, n) and empty.selector_weights.shape == (0, 2, n) and empty.loss.item() == 0.0
    empty.loss.backward()  # no rows: a zero loss that still backpropagates
    x = torch.randn(3, 4, D)
    tokens, rows = gate(x), gate(x.reshape(12, D))
    torch.testing.assert_close(tokens.weights, rows.weights.reshape(3, 4, n), atol=0, rtol=0)
    torch.testing.assert_close(tokens.selector_weights, rows.selector_weights.reshape(3, 4, 2, n), atol=0, rtol=0)
    with torch.no_grad():
        plain = gate(x.reshape(12, D))
    torch.testing.assert_close(plain.weights, rows.weights, atol=0, rtol=0)
    torch.testing.assert_close(plain.loss, rows.loss, atol=0, rtol=0)


def test_smooth_step_second_derivative_is_right():
    # Regression: the fused backward kept the slope as a constant, so Hessians of S were silently 0.
    t = torch.tensor([0.1, 0.7, -0.2, 0.05], dtype=torch.float64, requires_grad=True)
    hessian = torch.autograd.functional.hessian(lambda v: smooth_step(v, 0.8).sum(), t.detach())
    u = (t.detach() / 0.8).clamp(-0.5, 0.5)
    expected = torch.where(t.detach().abs() < 0.4, -12.0 * u / 0.8**2, torch.zeros_like(u))
    torch.testing.assert_close(hessian, torch.diag(expected))
    assert torch.autograd.gradgradcheck(lambda v: smooth_step(v, 0.8), (t,))


@pytest.mark.parametrize("n", [4, 5])  # the fused gate (n = 2^m) and the selector Function (n not a power of two)
def test_double_backward_is_refused_not_wrong(n):
    # Regression: the hand-written backward is first-order only; a Hessian through it was silently wrong
    # (n = 5: 8.5 where finite differences give 7.6) or failed inside an out= operation.
    gate = DSelectK(n, 2, anneal=None, entropy_weight=0.1).double()
    params = dict(gate.named_parameters())
    x = torch.zeros(2, 3, dtype=torch.float64)

    def first_weight(z: torch.Tensor) -> torch.Tensor:
        out = functional_call(gate, {**params, "z_logits": z}, (x,))
        return out.weights[0, 0] + out.loss

    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.functional.hessian(first_weight, params["z_logits"].detach())
    z = params["z_logits"].detach().requires_grad_()
    (grad,) = torch.autograd.grad(first_weight(z), z)  # first order still works
    assert bool(torch.isfinite(grad).all())


@pytest.mark.parametrize("gate_class", ["DSelectK", "COMET"])
def test_state_dict_round_trip_keeps_the_fitted_annealing(gate_class):
    # Regression: the budget annealing fitted by fit / fit_annealing was not in the state dict, so a gate
    # restored from it fell back to before_fit: gamma 1.0 instead of 0.002, weights off by ~0.74.
    from routing_search.gates import COMET

    cls = DSelectK if gate_class == "DSelectK" else COMET
    torch.manual_seed(0)
    gate = cls(4, 2, 3)
    assert gate.fit_annealing(100)["status"] == "fitted"
    for _ in range(100):
        gate(torch.randn(8, 3))
    restored = cls(4, 2, 3)
    restored.load_state_dict(gate.state_dict())
    assert restored.gamma == gate.gamma == pytest.approx(0.002)
    assert restored.fitted_annealing == gate.fitted_annealing
    x = torch.randn(5, 3)
    assert torch.equal(restored.eval()(x).weights, gate.eval()(x).weights)
    # An unfitted gate's state drops a fit in the receiving gate; a state dict without the entry loads.
    restored.load_state_dict(cls(4, 2, 3).state_dict())
    assert restored.annealing_pending
    old = gate.state_dict()
    del old["_extra_state"]
    cls(4, 2, 3).load_state_dict(old)
    from routing_search.training.checkpoint import check_compatible

    check_compatible({"model": old}, cls(4, 2, 3))  # fit can still resume from such a checkpoint
    # .double() does not cast the annealing record; an explicit annealing is never replaced by a load.
    assert gate.double().state_dict()["_extra_state"].tolist() == [50.0, 80.0, 0.002]
    explicit = cls(4, 2, 3, anneal=GammaAnnealing(begin=5, end=10)).double()
    explicit.load_state_dict(gate.state_dict())
    assert explicit.anneal == GammaAnnealing(begin=5, end=10) and explicit.fitted_annealing is None
