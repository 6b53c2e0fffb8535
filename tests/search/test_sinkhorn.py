"""Tests for the learned Sinkhorn permutation (COMET+) in routing_search.search.sinkhorn."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from routing_search.gates.protocol import GateOutput, check_gate
from routing_search.layers.moe import MoE
from routing_search.layers.permutation import apply_permutation, check_permutation
from routing_search.search.sinkhorn import (
    SinkhornPermutation,
    log_sinkhorn,
    permutation_entropy,
    sinkhorn_modules,
)

# --------------------------------------------------------------------------- user gates for the tests


class SoftmaxGate(nn.Module):
    """Dense softmax router: a minimal user gate following the protocol."""

    def __init__(self, num_experts: int, input_dim: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.router = nn.Linear(input_dim, num_experts)

    def forward(self, x: torch.Tensor, task=None, key=None) -> GateOutput:
        logits = self.router(x)
        return GateOutput(weights=torch.softmax(logits, dim=-1), loss=(logits**2).mean() * 1e-3)


class SparseGate(nn.Module):
    """k-sparse softmax router with exact zeros off the support."""

    def __init__(self, num_experts: int, input_dim: int, k: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.k = k
        self.router = nn.Linear(input_dim, num_experts)

    def forward(self, x: torch.Tensor, task=None, key=None) -> GateOutput:
        logits = self.router(x)
        values, index = logits.topk(self.k, dim=-1)
        weights = torch.zeros_like(logits).scatter(1, index, torch.softmax(values, dim=-1))
        return GateOutput(weights=weights, loss=logits.new_zeros(()))


class SelectorGate(nn.Module):
    """k softmax selectors mixed by a softmax (DSelect-k-like shape)."""

    def __init__(self, num_experts: int, input_dim: int, k: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.num_selectors = k
        self.sel = nn.Linear(input_dim, k * num_experts)
        self.mix = nn.Linear(input_dim, k)

    def forward(self, x: torch.Tensor, task=None, key=None) -> GateOutput:
        sel = torch.softmax(self.sel(x).view(x.shape[0], self.num_selectors, self.num_experts), dim=-1)
        mix = torch.softmax(self.mix(x), dim=-1)
        weights = torch.einsum("bk,bkn->bn", mix, sel)
        return GateOutput(weights=weights, loss=x.new_zeros(()), selector_weights=sel, selector_mix=mix)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _wrap(gate: nn.Module, seed: int = 0, **kwargs) -> SinkhornPermutation:
    kwargs.setdefault("anneal_steps", 5)
    return SinkhornPermutation(gate, generator=_gen(seed), **kwargs)


def _perm_matrix(perm: list[int] | np.ndarray, dtype=torch.float64) -> torch.Tensor:
    n = len(perm)
    m = torch.zeros(n, n, dtype=dtype)
    m[torch.arange(n), torch.as_tensor(perm)] = 1.0
    return m


# --------------------------------------------------------------------------- log_sinkhorn


@pytest.mark.parametrize("n", [2, 5, 9])
@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_log_sinkhorn_doubly_stochastic_random(n: int, tau: float) -> None:
    # Scores of spread 2 / tau; at much smaller tau on unstructured scores Sinkhorn converges only
    # sublinearly (see the near-permutation test for small tau).
    g = _gen(n)
    log_alpha = torch.rand(3, n, n, generator=g, dtype=torch.float64) * 2 - 1  # batched input
    p = log_sinkhorn(log_alpha / tau, 400).exp()
    assert p.shape == (3, n, n)
    assert torch.isfinite(p).all() and (p >= 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(3, n, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(p.sum(-2), torch.ones(3, n, dtype=torch.float64), atol=1e-4, rtol=0)


@pytest.mark.parametrize("tau", [1e-3, 1e-5, 1e-7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_sinkhorn_small_tau_converges_to_the_permutation(tau: float, dtype: torch.dtype) -> None:
    g = _gen(1)
    n = 6
    perm = torch.randperm(n, generator=g)
    log_alpha = (0.05 * _perm_matrix(perm) + 0.01 * torch.rand(n, n, generator=g, dtype=torch.float64)).to(dtype)
    p = log_sinkhorn(log_alpha / tau, 20).exp()
    assert torch.isfinite(p).all()
    ones = torch.ones(n, dtype=dtype)
    torch.testing.assert_close(p.sum(-1), ones, atol=1e-4, rtol=0)
    torch.testing.assert_close(p.sum(-2), ones, atol=1e-4, rtol=0)
    torch.testing.assert_close(p, _perm_matrix(perm, dtype), atol=1e-4, rtol=0)


def test_log_sinkhorn_tiny_tau_random_is_finite_with_finite_gradients() -> None:
    # At tau = 1e-7 on U(+-0.05) scores 150 iterations need not converge; what must hold is: no NaN/inf,
    # columns exactly normalised (last step) and finite gradients.
    g = _gen(2)
    log_alpha = ((torch.rand(8, 8, generator=g) * 2 - 1) * 0.05).requires_grad_()
    log_p = log_sinkhorn(log_alpha / 1e-7, 150)
    assert torch.isfinite(log_p).all()
    torch.testing.assert_close(log_p.exp().sum(-2), torch.ones(8), atol=1e-5, rtol=0)
    (log_p.exp() * torch.randn(8, 8, generator=g)).sum().backward()
    assert torch.isfinite(log_alpha.grad).all()
    h = permutation_entropy(log_p)
    assert torch.isfinite(h)


def test_log_sinkhorn_bad_args() -> None:
    with pytest.raises(ValueError, match="num_iters"):
        log_sinkhorn(torch.zeros(3, 3), 0)
    with pytest.raises(TypeError, match="num_iters"):
        log_sinkhorn(torch.zeros(3, 3), 2.5)
    with pytest.raises(ValueError, match="log_alpha"):
        log_sinkhorn(torch.zeros(3, 4), 5)
    with pytest.raises(TypeError, match="log_alpha"):
        log_sinkhorn(torch.zeros(3, 3, dtype=torch.long), 5)


# --------------------------------------------------------------------------- rounding


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_round_is_the_hungarian_solution(n: int, seed: int) -> None:
    module = _wrap(SoftmaxGate(n, 3), seed=seed, tau_start=0.5, tau_end=0.5, init_scale=1.0)
    p = module.soft_permutation().to(torch.float64).numpy()
    perm = module.round_()
    check_permutation(perm, n)
    best = max(itertools.permutations(range(n)), key=lambda q: sum(p[i, q[i]] for i in range(n)))
    assert math.isclose(sum(p[i, perm[i]] for i in range(n)), sum(p[i, best[i]] for i in range(n)), rel_tol=1e-12)
    assert perm.tolist() == list(best)  # continuous random scores: the optimum is unique
    assert np.array_equal(module.permutation(), perm)


def test_round_freezes_once() -> None:
    module = _wrap(SoftmaxGate(5, 3), tau_start=0.5, tau_end=0.5)
    assert not module.frozen
    with pytest.raises(RuntimeError, match="round_"):
        module.permutation()
    assert module.log_alpha.requires_grad
    perm = module.round_()
    assert module.frozen and not module.log_alpha.requires_grad
    with torch.no_grad():
        module.log_alpha.copy_(-10 * _perm_matrix(perm, torch.float32))  # would round differently
    assert np.array_equal(module.round_(), perm)  # no re-rounding
    assert np.array_equal(module.permutation(), perm)


def test_round_of_a_peaked_log_alpha_recovers_the_permutation() -> None:
    n = 7
    perm = torch.randperm(n, generator=_gen(3))
    module = _wrap(SoftmaxGate(n, 3))
    with torch.no_grad():
        module.log_alpha.copy_(0.05 * _perm_matrix(perm, torch.float32))
    module.set_progress(4)  # tau = 1e-7
    assert module.round_().tolist() == perm.tolist()


# --------------------------------------------------------------------------- hard phase


def _frozen(gate: nn.Module, seed: int = 0) -> SinkhornPermutation:
    module = _wrap(gate, seed=seed, tau_start=0.5, tau_end=0.5, init_scale=1.0)
    module.round_()
    assert module.permutation().tolist() != list(range(gate.num_experts))  # a non-trivial test
    return module


def _all_gates(n: int, d: int) -> list[nn.Module]:
    torch.manual_seed(0)
    gates: list[nn.Module] = [SoftmaxGate(n, d), SparseGate(n, d, 2)]
    try:
        from routing_search.gates.topk import TopK
    except ImportError:  # written concurrently
        return gates
    return gates + [TopK(n, 2, d), TopK(n, 1, d), TopK(n, 3, None)]


@pytest.mark.parametrize("which", range(5))
def test_hard_phase_equals_apply_permutation(which: int) -> None:
    n, d = 6, 4
    gates = _all_gates(n, d)
    if which >= len(gates):
        pytest.skip("routing_search.gates.topk is not available")
    gate = gates[which]
    module = _frozen(gate, seed=which)
    x = torch.randn(16, d, generator=_gen(5))
    inner = gate(x)
    out = module(x)
    index = torch.as_tensor(module.permutation()).unsqueeze(0)
    assert torch.equal(out.weights, apply_permutation(inner, index))
    assert torch.equal(out.loss, inner.loss)  # no entropy term after freezing
    assert out.selector_weights is None and out.selector_mix is None


def test_hard_phase_with_selectors() -> None:
    n, d, k = 5, 4, 3
    gate = SelectorGate(n, d, k)
    module = _frozen(gate, seed=1)
    assert module.num_selectors == k
    x = torch.randn(8, d, generator=_gen(6))
    inner, out = gate(x), module(x)
    perm = torch.as_tensor(module.permutation())
    inverse = torch.argsort(perm)
    assert torch.equal(out.selector_weights, inner.selector_weights[:, :, inverse])
    assert torch.equal(out.selector_mix, inner.selector_mix)
    assert torch.equal(out.weights, inner.weights[:, inverse])
    per_selector = apply_permutation(inner, perm.repeat(k, 1))
    torch.testing.assert_close(out.weights, per_selector)


def test_exact_zeros_are_kept_after_freezing() -> None:
    n, d = 8, 4
    gate = SparseGate(n, d, 2)
    module = _frozen(gate, seed=2)
    x = torch.randn(32, d, generator=_gen(7))
    g = gate(x).weights
    w = module(x).weights
    perm = torch.as_tensor(module.permutation())
    assert int((w == 0).sum()) == int((g == 0).sum()) == 32 * (n - 2)
    assert torch.equal(w[:, perm], g)  # slot i lands on expert perm[i]


# --------------------------------------------------------------------------- soft phase


@pytest.mark.parametrize("step", [0, 2, 4])
@pytest.mark.parametrize("kind", ["softmax", "sparse", "selector"])
def test_soft_rows_on_simplex_and_loss(step: int, kind: str) -> None:
    n, d = 6, 4
    torch.manual_seed(0)
    gate = {"softmax": SoftmaxGate(n, d), "sparse": SparseGate(n, d, 2), "selector": SelectorGate(n, d, 3)}[kind]
    module = _wrap(gate, entropy_weight=1e-2)
    module.set_progress(step)  # step 4 is tau = 1e-7, 150 iterations
    x = torch.randn(16, d, generator=_gen(8))
    inner, out = gate(x), module(x)
    assert torch.isfinite(out.weights).all() and (out.weights >= 0).all()
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(16), atol=1e-6, rtol=0)
    expected_loss = inner.loss + 1e-2 * permutation_entropy(module.log_soft_permutation())
    torch.testing.assert_close(out.loss, expected_loss)
    if kind == "selector":
        torch.testing.assert_close(out.selector_weights.sum(-1), torch.ones(16, 3), atol=1e-6, rtol=0)
        torch.testing.assert_close(out.weights, torch.einsum("bk,bkn->bn", out.selector_mix, out.selector_weights))
        assert torch.equal(out.selector_mix, inner.selector_mix)
    out.weights.pow(2).sum().add(out.loss).backward()
    assert torch.isfinite(module.log_alpha.grad).all()
    for p in gate.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


def test_soft_weights_follow_p() -> None:
    # At a moderate tau with enough iterations, P is doubly stochastic and w' = g @ P exactly.
    n, d = 5, 3
    gate = SoftmaxGate(n, d)
    module = _wrap(gate, tau_start=0.3, tau_end=0.3, iters_start=300, iters_end=300, init_scale=1.0)
    x = torch.randn(10, d, generator=_gen(9))
    p = module.soft_permutation()
    assert not p.requires_grad
    torch.testing.assert_close(module(x).weights, gate(x).weights @ p, atol=1e-5, rtol=0)


def test_gradcheck_soft_phase() -> None:
    n, d = 4, 3
    gate = SelectorGate(n, d, 2).double()
    module = _wrap(gate, tau_start=0.5, tau_end=0.5, iters_start=5, iters_end=5, entropy_weight=0.1).double()
    x = torch.randn(5, d, generator=_gen(10), dtype=torch.float64)
    log_alpha = module.log_alpha.detach().clone().requires_grad_()

    def f(la: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.func.functional_call(module, {"state.log_alpha": la}, (x,))
        return out.weights, out.loss

    assert torch.autograd.gradcheck(f, (log_alpha,))
    weights, loss = f(log_alpha)
    (grad,) = torch.autograd.grad((weights * torch.randn(5, n, generator=_gen(11), dtype=torch.float64)).sum() + loss, log_alpha)
    assert torch.isfinite(grad).all() and grad.abs().max() > 1e-6


def test_gradcheck_log_sinkhorn_and_entropy() -> None:
    log_alpha = torch.randn(4, 4, generator=_gen(12), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda la: log_sinkhorn(la / 0.5, 4), (log_alpha,))
    assert torch.autograd.gradcheck(lambda la: permutation_entropy(log_sinkhorn(la / 0.5, 4)), (log_alpha,))


# --------------------------------------------------------------------------- schedule


def test_schedule_endpoints_and_shape() -> None:
    module = _wrap(SoftmaxGate(4, 2), anneal_steps=10)
    assert float(module.tau) == 1e-3 and int(module.num_iters) == 20  # state at construction
    module.set_progress(0)
    assert float(module.tau) == 1e-3 and int(module.num_iters) == 20
    module.set_progress(9)
    assert float(module.tau) == 1e-7 and int(module.num_iters) == 150
    taus, iters = zip(*(module.schedule(s) for s in range(10)))
    ratios = np.diff(np.log(taus))
    np.testing.assert_allclose(ratios, np.full(9, math.log(1e-4) / 9), rtol=1e-9)  # log-linear
    np.testing.assert_allclose(np.diff(iters), 130 / 9, atol=1.0)  # linear up to rounding
    assert module.schedule(25) == module.schedule(9)  # clamped past the end
    module.set_progress(4)
    assert int(module.schedule_step) == 4
    assert float(module.tau) == pytest.approx(1e-3 * (1e-4) ** (4 / 9), rel=1e-12)
    with pytest.raises(ValueError, match="step"):
        module.set_progress(-1)


def test_schedule_single_step() -> None:
    module = _wrap(SoftmaxGate(4, 2), anneal_steps=1)
    module.set_progress(0)
    assert (float(module.tau), int(module.num_iters)) == (1e-3, 20)


# --------------------------------------------------------------------------- entropy


def test_entropy_penalty_decreases_as_log_alpha_peaks() -> None:
    n = 6
    perm = torch.randperm(n, generator=_gen(13))
    base = _perm_matrix(perm) + 0.1 * torch.rand(n, n, generator=_gen(14), dtype=torch.float64)
    values = [float(permutation_entropy(log_sinkhorn(c * base, 50))) for c in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 30.0)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert values[0] == pytest.approx(3 * math.log(n), rel=1e-9)  # uniform P: 2 log n + log n
    assert values[-1] == pytest.approx(math.log(n), abs=1e-6)  # permutation: log n + 0

    # Through the module: the loss term falls as tau falls for a fixed peaked log_alpha.
    gate = SparseGate(n, 3, 2)
    module = _wrap(gate, tau_start=1.0, tau_end=1e-2, anneal_steps=4, entropy_weight=1.0)
    with torch.no_grad():
        module.log_alpha.copy_(0.05 * base.float())
    x = torch.randn(4, 3, generator=_gen(15))
    penalties = []
    for step in range(4):
        module.set_progress(step)
        penalties.append(float((module(x).loss - gate(x).loss).detach()))
    assert all(a > b for a, b in zip(penalties, penalties[1:]))


# --------------------------------------------------------------------------- protocol, MoE, checkpoints


def test_follows_the_gate_protocol() -> None:
    module = _wrap(SelectorGate(5, 3, 2))
    assert check_gate(module) is module
    assert module.num_experts == 5 and module.num_selectors == 2
    assert _wrap(SoftmaxGate(5, 3)).num_selectors == 1


@pytest.mark.parametrize("kind", ["softmax", "sparse", "selector"])
def test_inside_moe_forward_backward_soft_then_hard(kind: str) -> None:
    n, d, u = 5, 4, 3
    torch.manual_seed(0)
    gate = {"softmax": SoftmaxGate(n, d), "sparse": SparseGate(n, d, 2), "selector": SelectorGate(n, d, 2)}[kind]
    module = _wrap(gate, tau_start=0.5, tau_end=0.5, init_scale=1.0)
    experts = [nn.Linear(d, u) for _ in range(n)]
    moe = MoE(experts, module)
    assert sinkhorn_modules(moe) == [module]
    x = torch.randn(12, d, generator=_gen(16))
    target = torch.randn(12, u, generator=_gen(17))

    out = moe(x)
    ((out.output - target) ** 2).mean().add(out.loss).backward()
    assert torch.isfinite(module.log_alpha.grad).all() and module.log_alpha.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in moe.parameters() if p.grad is not None)

    perm = module.round_()
    moe.zero_grad(set_to_none=True)
    out = moe(x)
    ((out.output - target) ** 2).mean().add(out.loss).backward()
    assert module.log_alpha.grad is None
    # Same as the inner gate in an MoE whose explicit permutation is the rounded one.
    reference = MoE(experts, gate)
    reference.permutation.set(perm)
    torch.testing.assert_close(out.output, reference(x).output, atol=1e-6, rtol=1e-6)


def test_state_dict_round_trip() -> None:
    n, d = 6, 3
    torch.manual_seed(0)
    a = _wrap(SparseGate(n, d, 2), seed=0, anneal_steps=6)
    a.set_progress(3)
    b = _wrap(SparseGate(n, d, 2), seed=1, anneal_steps=6)
    b.load_state_dict(a.state_dict())
    assert {f"state.{k}" for k in ("log_alpha", "tau", "num_iters", "schedule_step", "frozen_flag", "index")} <= set(a.state_dict())
    assert float(b.tau) == float(a.tau) and int(b.num_iters) == int(a.num_iters) and not b.frozen
    x = torch.randn(7, d, generator=_gen(18))
    torch.testing.assert_close(b(x).weights, a(x).weights)

    perm = a.round_()
    c = _wrap(SparseGate(n, d, 2), seed=2, anneal_steps=6)
    c.load_state_dict(a.state_dict())
    assert c.frozen and np.array_equal(c.permutation(), perm)
    assert not c.log_alpha.requires_grad
    assert torch.equal(c(x).weights, a(x).weights)


def test_sinkhorn_modules_finds_each_once() -> None:
    shared = _wrap(SoftmaxGate(4, 2))
    other = _wrap(SparseGate(4, 2, 1))
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(nn.Linear(2, 2)), "c": nn.ModuleList([other, shared])})
    found = sinkhorn_modules(model)
    assert len(found) == 2 and found[0] is shared and found[1] is other
    assert sinkhorn_modules(nn.Linear(2, 2)) == []


# --------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"tau_start": 1e-5, "tau_end": 1e-3}, ValueError, "tau_start"),
        ({"tau_end": 0.0}, ValueError, "tau_end"),
        ({"tau_start": -1.0}, ValueError, "tau_start"),
        ({"tau_end": float("nan")}, ValueError, "tau_end"),
        ({"iters_start": 0}, ValueError, "iters_start"),
        ({"iters_end": 0}, ValueError, "iters_end"),
        ({"iters_end": 1.5}, TypeError, "iters_end"),
        ({"anneal_steps": 0}, ValueError, "anneal_steps"),
        ({"entropy_weight": -1e-4}, ValueError, "entropy_weight"),
        ({"init_scale": -0.1}, ValueError, "init_scale"),
        ({"generator": 3}, TypeError, "generator"),
    ],
)
def test_bad_args(kwargs: dict, error: type, name: str) -> None:
    kwargs.setdefault("anneal_steps", 3)
    with pytest.raises(error, match=name):
        SinkhornPermutation(SoftmaxGate(4, 2), **kwargs)


def test_bad_gate() -> None:
    with pytest.raises(TypeError, match="gate"):
        SinkhornPermutation(nn.Linear(2, 2), anneal_steps=2)
    with pytest.raises(TypeError, match="gate"):
        SinkhornPermutation("not a gate", anneal_steps=2)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="anneal_steps"):
        SinkhornPermutation(SoftmaxGate(4, 2))  # type: ignore[call-arg]


def test_shared_permutation_across_task_gates() -> None:
    """COMET+ multi-task: one learned permutation for all task gates, one penalty, one rounding."""
    from routing_search.layers.multigate import MultiGateMoE

    n, d = 5, 3
    gates = [SelectorGate(n, d, 2), SelectorGate(n, d, 2)]
    wrapped = SinkhornPermutation.shared(gates, anneal_steps=2, tau_start=0.5, tau_end=0.5, entropy_weight=0.1)
    assert wrapped[0].state is wrapped[1].state
    assert wrapped[0].owns_state and not wrapped[1].owns_state
    model = MultiGateMoE([torch.nn.Linear(d, 2) for _ in range(n)], wrapped)
    assert sum(p is wrapped[0].log_alpha for p in model.parameters()) == 1  # registered once for optimisers
    x = torch.randn(7, d, generator=_gen(3))
    out = model(x)
    inner_losses = sum(g(x).loss for g in gates)
    penalty = 0.1 * permutation_entropy(wrapped[0].log_soft_permutation())
    torch.testing.assert_close(out.loss, inner_losses + penalty)  # the penalty counted once
    out.loss.backward()
    assert wrapped[0].log_alpha.grad is not None and torch.isfinite(wrapped[0].log_alpha.grad).all()
    perm = wrapped[0].round_()
    assert wrapped[1].frozen and np.array_equal(wrapped[1].permutation(), perm)
    fresh = MultiGateMoE(
        [torch.nn.Linear(d, 2) for _ in range(n)],
        SinkhornPermutation.shared([SelectorGate(n, d, 2), SelectorGate(n, d, 2)], anneal_steps=2),
    )
    fresh.load_state_dict(model.state_dict())
    assert fresh.gates[1].frozen and np.array_equal(fresh.gates[1].permutation(), perm)
    assert fresh.gates[0].state is fresh.gates[1].state


def test_share_rejects_mismatched_state() -> None:
    owner = _wrap(SelectorGate(4, 3, 2))
    with pytest.raises(ValueError, match="num_experts"):
        SinkhornPermutation(SelectorGate(5, 3, 2), anneal_steps=2, share=owner.state)
    with pytest.raises(TypeError, match="share"):
        SinkhornPermutation(SelectorGate(4, 3, 2), anneal_steps=2, share=owner)


def test_round_of_a_diverged_log_alpha_says_so_and_stays_soft() -> None:
    """A NaN log_alpha reached scipy's linear_sum_assignment: 'matrix contains invalid numeric entries'."""
    module = _wrap(SoftmaxGate(4, 3), tau_start=0.5, tau_end=0.5)
    with torch.no_grad():
        module.log_alpha[1, 2] = float("nan")
    with pytest.raises(ValueError, match="log_alpha holds NaN/inf"):
        module.round_()
    assert not module.frozen
