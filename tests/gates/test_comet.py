"""Tests of the COMET tree gate."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from routing_search.gates.comet import COMET
from routing_search.gates.protocol import GateOutput

D = 3  # input width of per-example gates
CASES = [(n, k) for n in (2, 3, 5, 8, 16) for k in sorted({1, 2, n})]


def make_gate(n: int, k: int, static: bool, seed: int = 0, **kwargs) -> COMET:
    torch.manual_seed(seed)
    return COMET(n, k, None if static else D, **kwargs)


def saturate_(gate: COMET, seed: int = 0) -> None:
    """Put every node logit at ±10γ (per-example: ±10γ per weight, with inputs in {±1}^D below)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if gate.is_static:
            signs = torch.randint(0, 2, gate.node_logits.shape, generator=g) * 2 - 1
            gate.node_logits.copy_(10 * gate.gamma * signs)
        else:
            signs = torch.randint(0, 2, gate.node_weight.shape, generator=g) * 2 - 1
            gate.node_weight.copy_(10 * gate.gamma * signs)
            gate.node_bias.zero_()


def sign_inputs(batch: int, seed: int = 0) -> torch.Tensor:
    """Inputs in {±1}^D with D odd: w.x is an odd multiple of 10γ, never inside the cubic region."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (batch, D), generator=g) * 2 - 1).float()


def naive_weights(pi: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """g_i = sum_j pi_ji e^{a_ji} / sum_{j,l} pi_jl e^{a_jl}, straight from the definition."""
    num = (pi * a.exp()).sum(-2)
    return num / num.sum(-1, keepdim=True)


# ---------------------------------------------------------------- tree layout
@pytest.mark.parametrize(
    ("n", "order"),
    [(2, (1, 2)), (3, (3, 4, 2)), (4, (3, 4, 5, 6)), (5, (7, 8, 4, 5, 6)), (6, (7, 8, 9, 10, 5, 6))],
)
def test_left_to_right_leaf_order(n: int, order: tuple[int, ...]) -> None:
    assert COMET(n, 1).leaf_order == order


def test_reach_probabilities_by_hand_n3() -> None:
    gate = make_gate(3, 1, True)
    with torch.no_grad():
        gate.node_logits.copy_(torch.tensor([[0.1, -0.2]]))
    s0, s1 = gate.node_outputs()[0]
    expected = torch.stack([s0 * s1, s0 * (1 - s1), 1 - s0])  # heap leaves 3, 4, 2
    assert torch.allclose(gate.reach_probabilities()[0], expected, atol=1e-7)


def test_reach_probabilities_by_hand_n5() -> None:
    gate = make_gate(5, 2, True)
    s = gate.node_outputs()
    pi = gate.reach_probabilities()
    assert pi.shape == (2, 5)
    s0, s1, s2, s3 = s[1]
    expected = torch.stack(
        [
            s0 * s1 * s3,  # heap 7: left, left, left
            s0 * s1 * (1 - s3),  # heap 8
            s0 * (1 - s1),  # heap 4
            (1 - s0) * s2,  # heap 5
            (1 - s0) * (1 - s2),  # heap 6
        ]
    )
    assert torch.allclose(pi[1], expected, atol=1e-7)


@pytest.mark.parametrize(("n", "d", "k"), [(2, 1, 1), (3, 4, 2), (5, 3, 3), (16, 7, 2)])
def test_parameter_counts(n: int, d: int, k: int) -> None:
    assert sum(p.numel() for p in COMET(n, k, d).parameters()) == k * (2 * n - 1) * (d + 1)
    assert sum(p.numel() for p in COMET(n, k).parameters()) == k * (2 * n - 1)


def test_initialisation() -> None:
    gate = make_gate(8, 2, False, gamma=2.0)
    assert bool((gate.node_weight.abs() <= 0.02).all() and (gate.node_bias.abs() <= 0.02).all())
    assert bool((gate.leaf_weight.abs() <= 0.05).all() and (gate.leaf_bias.abs() <= 0.05).all())


# ---------------------------------------------------------------- basic contract
@pytest.mark.parametrize(("n", "k"), CASES)
@pytest.mark.parametrize("static", [True, False])
def test_rows_on_simplex_and_selector_identity(n: int, k: int, static: bool) -> None:
    gate = make_gate(n, k, static, entropy_weight=0.1)
    x = torch.randn(7, D)
    out = gate(x)
    assert isinstance(out, GateOutput) and gate.num_selectors == k
    assert out.weights.shape == (7, n) and out.selector_weights.shape == (7, k, n)
    assert out.selector_mix.shape == (7, k) and out.loss.shape == ()
    for t in (out.weights, out.loss, out.selector_weights, out.selector_mix):
        assert bool(torch.isfinite(t).all())
    assert bool((out.weights > 0).all())
    assert torch.allclose(out.weights.sum(-1), torch.ones(7), atol=1e-6)
    assert torch.allclose(out.selector_weights.sum(-1), torch.ones(7, k), atol=1e-6)
    assert torch.allclose(out.selector_mix.sum(-1), torch.ones(7), atol=1e-6)
    assert torch.allclose(out.weights, torch.einsum("bk,bkn->bn", out.selector_mix, out.selector_weights))
    pi = gate.reach_probabilities(x)
    assert pi.shape == (7, k, n) and torch.allclose(pi.sum(-1), torch.ones(7, k), atol=1e-6)
    _, leaves = gate._logits(x)
    assert torch.allclose(out.weights, naive_weights(pi, leaves), atol=1e-6)
    if static:
        assert torch.equal(out.weights, out.weights[:1].expand(7, n))
    assert not gate.is_binary(None if static else x)
    assert out.loss.item() > 0


def test_static_gate_accepts_any_width_and_follows_dtype() -> None:
    gate = make_gate(5, 2, True).double()
    out = gate(torch.randn(3, 11, dtype=torch.float64))
    assert out.weights.dtype == torch.float64 and out.loss.dtype == torch.float64
    assert gate.reach_probabilities().shape == (2, 5)
    assert gate.reach_probabilities(torch.zeros(4, 1, dtype=torch.float64)).shape == (4, 2, 5)


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("n", [3, 5])
@pytest.mark.parametrize("static", [True, False])
def test_gradcheck_parameters_and_input(n: int, static: bool) -> None:
    gate = make_gate(n, 2, static, entropy_weight=0.3).double()
    with torch.no_grad():  # spread the logits over the fractional region for non-trivial gradients
        for name, p in gate.named_parameters():
            p.uniform_(-0.15, 0.15) if name.startswith("node") else p.normal_()
    names = [name for name, _ in gate.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in gate.named_parameters())
    x = (0.5 * torch.randn(3, D, dtype=torch.float64)).requires_grad_(not static)
    s = gate.node_outputs(x)
    assert 0 < s.min().item() and s.max().item() < 1

    def f(x: torch.Tensor, *ps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = functional_call(gate, dict(zip(names, ps)), (x,))
        return out.weights, out.loss, out.selector_mix

    assert torch.autograd.gradcheck(f, (x, *params))


def test_no_nan_gradients_when_some_leaves_are_unreachable() -> None:
    gate = make_gate(5, 2, True, entropy_weight=0.5)
    with torch.no_grad():
        gate.node_logits[0, 0] = 10.0  # tree 0 never goes right at the root: leaves 3, 4 get pi = 0
    out = gate(torch.zeros(4, 1))
    assert bool((out.selector_weights[:, 0, 3:] == 0).all())
    assert bool((out.selector_weights[:, 1] > 0).all())
    (out.weights[:, 0].sum() + out.loss).backward()
    for p in gate.parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all())
    assert gate.node_logits.grad[0, 0] == 0  # saturated node is frozen
    assert bool((gate.node_logits.grad[1] != 0).any())


# ---------------------------------------------------------------- binary trees and the hard gate
@pytest.mark.parametrize(("n", "k"), CASES)
@pytest.mark.parametrize("static", [True, False])
def test_saturated_gate_selects_at_most_k_and_equals_hard_gate(n: int, k: int, static: bool) -> None:
    gate = make_gate(n, k, static, entropy_weight=1.0)
    saturate_(gate, seed=n + k)
    x = sign_inputs(16, seed=n)
    assert gate.is_binary(x)
    pi = gate.reach_probabilities(x)
    assert bool(((pi == 0) | (pi == 1)).all()) and bool((pi.sum(-1) == 1).all())
    soft, hard = gate(x), gate.hard(x)
    chosen = pi.argmax(-1)  # [B, k] leaf reached by each tree
    distinct = torch.tensor([len(set(row.tolist())) for row in chosen])
    nnz = (soft.weights != 0).sum(-1)
    assert torch.equal(nnz, distinct) and bool((nnz <= k).all())
    assert torch.equal(soft.weights, hard.weights)
    assert torch.equal(soft.selector_weights, hard.selector_weights)
    assert torch.equal(soft.selector_mix, hard.selector_mix)
    assert torch.equal(soft.selector_weights, pi)
    assert abs(soft.loss.item()) < 1e-5 * k  # entropy of one-hot pi (eps 1e-6 inside the log)
    assert torch.allclose(soft.weights.sum(-1), torch.ones(16), atol=1e-6)


@pytest.mark.parametrize("static", [True, False])
def test_hard_gate_rounds_node_decisions(static: bool) -> None:
    gate = make_gate(5, 2, static)
    x = torch.randn(6, D)
    out = gate.hard(x)
    assert bool(((out.weights != 0).sum(-1) <= 2).all())
    assert torch.allclose(out.weights.sum(-1), torch.ones(6), atol=1e-6)
    s = gate.node_outputs(x)
    pi_hard = gate._reach((s > 0.5).to(s.dtype))
    assert torch.equal(out.selector_weights, pi_hard.expand(6, 2, 5) if static else pi_hard)


# ---------------------------------------------------------------- regulariser and schedule
def test_entropy_matches_definition_and_vanishes_when_binary() -> None:
    gate = make_gate(6, 3, False, entropy_weight=0.7)
    x = sign_inputs(5)
    out = gate(x)
    pi = gate.reach_probabilities(x)
    expected = 0.7 * (-(pi * torch.log(pi + 1e-6)).sum(-1)).sum(-1).mean()
    assert torch.allclose(out.loss, expected, atol=1e-6) and out.loss.item() > 0.1
    saturate_(gate)
    assert abs(gate(x).loss.item()) < 1e-5


def test_entropy_weight_schedule_receives_call_count() -> None:
    seen: list[int] = []

    def schedule(calls: int) -> float:
        seen.append(calls)
        return 0.0 if calls < 2 else 1.0

    gate = make_gate(4, 2, True, entropy_weight=schedule)
    x = torch.zeros(2, 1)
    losses = [gate(x).loss.item() for _ in range(3)]
    assert seen == [0, 1, 2]
    assert losses[0] == losses[1] == 0.0 and losses[2] > 0
    gate.eval()
    gate(x)
    assert seen[-1] == 3 and int(gate.calls) == 3
    assert gate.hard(x).loss.item() == 0.0 and int(gate.calls) == 3


# ---------------------------------------------------------------- bad input
def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="k must be in"):
        COMET(4, 5, D)
    with pytest.raises(ValueError, match="k must be in"):
        COMET(4, 0, D)
    with pytest.raises(ValueError, match="num_experts"):
        COMET(1, 1, D)
    with pytest.raises(ValueError, match="gamma"):
        COMET(4, 2, D, gamma=-1.0)
    with pytest.raises(ValueError, match="input_dim"):
        COMET(4, 2, 0)
    with pytest.raises(ValueError, match="entropy_weight"):
        COMET(4, 2, D, entropy_weight=-0.5)
    gate = COMET(4, 2, D)
    with pytest.raises(ValueError, match="input_dim"):
        gate(torch.randn(2, D + 1))
    with pytest.raises(ValueError, match="x contains"):
        gate(torch.tensor([[0.0, float("inf"), 1.0]]))
    with pytest.raises(ValueError, match="x is required"):
        gate.reach_probabilities()


def _naive_comet(gate: COMET, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reach probabilities as products along each root path, then one softmax over the k*n scores."""
    from routing_search.gates.comet import leaf_paths
    from routing_search.gates.smooth_step import smooth_step

    n, k = gate.num_experts, gate.num_selectors
    rows_w, rows_loss = [], []
    for b in range(x.shape[0]):
        if gate.is_static:
            nodes, leaves = gate.node_logits, gate.leaf_logits
        else:
            nodes = torch.einsum("kqd,d->kq", gate.node_weight, x[b]) + gate.node_bias
            leaves = torch.einsum("kld,d->kl", gate.leaf_weight, x[b]) + gate.leaf_bias
        s = smooth_step(nodes, gate.gamma)
        pis = []
        for j in range(k):
            pi = []
            for _, path in leaf_paths(n):
                p = torch.ones((), dtype=x.dtype)
                for q, went_left in path:
                    p = p * (s[j, q] if went_left else 1 - s[j, q])
                pi.append(p)
            pis.append(torch.stack(pi))
        pi = torch.stack(pis)  # [k, n]
        unnorm = pi * torch.exp(leaves)
        rows_w.append(unnorm.sum(0) / unnorm.sum())
        rows_loss.append(-gate.entropy_weight * (pi * torch.log(pi + 1e-6)).sum())
    return torch.stack(rows_w), torch.stack(rows_loss).mean()


@pytest.mark.parametrize("n", [2, 3, 5, 8, 16])
@pytest.mark.parametrize("static", [True, False])
def test_vectorised_forward_and_gradients_equal_naive_reference(n: int, static: bool) -> None:
    torch.manual_seed(n)
    gate = COMET(n, 2, None if static else 4, entropy_weight=0.3).double()
    with torch.no_grad():
        for name, p in gate.named_parameters():
            p.uniform_(-0.3, 0.3) if name.startswith("node") else p.normal_()
    x = torch.randn(5, 4, dtype=torch.float64)
    out = gate(x)
    ref_w, ref_loss = _naive_comet(gate, x)
    torch.testing.assert_close(out.weights, ref_w, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out.loss, ref_loss, atol=1e-12, rtol=1e-12)
    probe = torch.randn(n, dtype=torch.float64)
    params = list(gate.parameters())
    fast = torch.autograd.grad((out.weights @ probe).sum() + out.loss, params)
    slow = torch.autograd.grad((ref_w @ probe).sum() + ref_loss, params)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_float64_input_to_float32_gate_names_x_and_both_dtypes() -> None:
    gate = COMET(5, 2, 4)
    with pytest.raises(TypeError, match=r"x has dtype torch\.float64 but the gate COMET has dtype torch\.float32"):
        gate(torch.randn(3, 4, dtype=torch.float64))


def test_selector_weights_stay_distributions_when_one_tree_outweighs_the_other() -> None:
    gate = COMET(4, 2)
    with torch.no_grad():
        gate.leaf_logits[0].fill_(300.0)  # tree 1's share exp(-300) underflows to 0 in float32
    out = gate(torch.zeros(2, 1))
    assert bool(torch.isfinite(out.selector_weights).all())
    torch.testing.assert_close(out.selector_weights.sum(-1), torch.ones(2, 2))
    assert out.selector_mix[0, 1].item() == 0.0


def test_is_binary_ignores_nodes_behind_a_zero_branch() -> None:
    gate = COMET(4, 1)  # nodes 0 (root), 1 (left child), 2 (right child)
    with torch.no_grad():
        gate.node_logits.copy_(torch.tensor([[1.0, -1.0, 0.001]]))  # root goes left: node 2 is off the path
    assert gate.reach_probabilities().tolist() == [[0.0, 1.0, 0.0, 0.0]]
    assert gate.is_binary()
    with torch.no_grad():
        gate.node_logits[0, 1] = 0.001  # a fractional node on the path
    assert not gate.is_binary()


# ---------------------------------------------------------------- fused forward/backward and the hard walk
@pytest.mark.parametrize(("n", "k"), [(2, 1), (5, 2), (8, 3)])
@pytest.mark.parametrize("static", [True, False])
@pytest.mark.parametrize("entropy_weight", [0.0, 0.3])
def test_fused_gate_passes_gradcheck_on_every_output(n: int, k: int, static: bool, entropy_weight: float, all_outputs) -> None:
    """The hand-written backward (one autograd Function for the whole gate) against finite differences,
    output by output (so the paths where the other outputs get no gradient are checked too)."""
    gate = make_gate(n, k, static, seed=n + k, entropy_weight=entropy_weight, anneal=None).double()
    with torch.no_grad():
        for name, p in gate.named_parameters():
            p.uniform_(-0.3, 0.3) if name.startswith("node") else p.normal_()
    run, params = all_outputs(gate, torch.randn(4, D, dtype=torch.float64))
    assert torch.autograd.gradcheck(run, params, eps=1e-6, atol=1e-7)


def test_fused_backward_gives_no_gradient_through_a_zero_branch() -> None:
    """A node whose branch has probability exactly 0 (saturated parent) passes no gradient, finite everywhere."""
    gate = make_gate(5, 2, True, entropy_weight=0.5, anneal=None).double()
    with torch.no_grad():
        gate.node_logits.uniform_(-0.2, 0.2)
        gate.node_logits[0, 0] = 10.0  # tree 0 always goes left at the root: the right subtree is unreachable
    out = gate(torch.zeros(3, 1, dtype=torch.float64))
    total = out.weights[:, 1].sum() + out.selector_weights.sum() * 0.1 + out.selector_mix[:, 0].sum() + out.loss
    total.backward()
    grad = gate.node_logits.grad
    assert grad is not None and bool(torch.isfinite(grad).all())
    assert grad[0, 0] == 0 and grad[0, 2] == 0  # saturated root; node 2 is behind the zero branch


def path_matrix(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[2(n-1), n]``: row ``q`` (``n - 1 + q``) marks the leaves (expert order) whose path goes left (right) at node ``q``."""
    from routing_search.gates.comet import leaf_paths

    paths = torch.zeros(2 * (n - 1), n, dtype=dtype)
    for i, (_, path) in enumerate(leaf_paths(n)):
        for q, went_left in path:
            paths[q + (0 if went_left else n - 1), i] = 1.0
    return paths


def _rounded_reference(gate: COMET, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hard gate as the soft formula with the rounded node decisions plugged in: ``pi`` as the product of
    the rounded branches (``exp`` of the path matrix times their logs), merged by the soft gate's combination."""
    from routing_search.gates.binary_encoding import log_factors
    from routing_search.gates.comet import _combine

    k, n = gate.num_selectors, gate.num_experts
    leaves = gate._logits_t(x)[k * (n - 1) :].view(k, n, -1)
    s = gate.node_outputs(x)
    bits = (s > 0.5).to(s.dtype)
    pi = torch.exp(log_factors(torch.cat([bits, 1 - bits], dim=-1)) @ path_matrix(n, s.dtype))  # [B, k, n], 0 / 1
    _, weights, sel, mix = _combine(pi.permute(1, 2, 0).contiguous(), leaves)
    return weights, sel, mix


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("n", "k"), [(2, 1), (3, 2), (5, 3), (7, 2), (16, 2), (16, 4)])
@pytest.mark.parametrize("scale", [0.0, 1e-12, 1e-3, 1.0, 30.0])
def test_hard_walk_equals_the_rounded_soft_formula_bit_for_bit(dtype: torch.dtype, n: int, k: int, scale: float) -> None:
    """hard() walks each tree by its rounded node decisions; the result is bit for bit the soft formula with
    the rounded reach plugged in, on random inputs with ties (logits exactly 0, or so small that S rounds to 1/2)."""
    torch.manual_seed(n * 10 + k)
    gate = COMET(n, k, D, gamma=0.7, anneal=None).to(dtype)
    with torch.no_grad():
        for p in gate.parameters():
            p.normal_().mul_(scale)
            p.view(-1)[::4] = 0.0
    x = torch.randn(300, D, dtype=dtype)
    x[::3] = 0.0  # every node logit is its bias: many exact zeros
    x[1::7] *= 1e-30
    hard = gate.hard(x)
    ref_w, ref_sel, ref_mix = _rounded_reference(gate, x)
    assert torch.equal(hard.weights, ref_w)
    assert torch.equal(hard.selector_weights, ref_sel)
    assert torch.equal(hard.selector_mix, ref_mix)
    assert torch.equal(gate.reached_leaves(x), ref_sel.argmax(-1))
    probe = torch.randn(n, dtype=dtype)
    leaf_params = [gate.leaf_weight, gate.leaf_bias]
    got = torch.autograd.grad((hard.weights @ probe).sum(), leaf_params)
    want = torch.autograd.grad((ref_w @ probe).sum(), leaf_params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6 if dtype == torch.float32 else 1e-12, rtol=1e-6)


def test_reached_leaves_static_and_in_expert_order() -> None:
    gate = COMET(3, 2)  # heap leaves 3, 4 (under node 1) and 2; experts in left-to-right order (3, 4, 2)
    with torch.no_grad():
        gate.node_logits.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))  # tree 0: left, right -> heap 4
    assert gate.reached_leaves().tolist() == [1, 2]  # tree 1: right at the root -> heap 2 = expert 2


# ---------------------------------------------------------------- level-wise reach, fused gate against the composed form
def _path_product_reach(s: torch.Tensor, n: int) -> torch.Tensor:
    """``pi`` ``[..., n]`` as the product of the branches along each leaf's root path (expert order)."""
    from routing_search.gates.comet import leaf_paths

    columns = []
    for _, path in leaf_paths(n):
        p = torch.ones_like(s[..., 0])
        for q, went_left in path:
            p = p * (s[..., q] if went_left else 1 - s[..., q])
        columns.append(p)
    return torch.stack(columns, dim=-1)


def _log_reach(s: torch.Tensor, n: int) -> torch.Tensor:
    """The former implementation: the path matrix times the branch logs (``log 0`` a large negative constant)."""
    from routing_search.gates.binary_encoding import log_factors

    return log_factors(torch.cat([s, 1 - s], dim=-1)) @ path_matrix(n, s.dtype)


def _log_domain_reach(s: torch.Tensor, n: int) -> torch.Tensor:
    """``exp`` of :func:`_log_reach` (exact zeros behind a zero branch, no gradient through it)."""
    return torch.exp(_log_reach(s, n))


@pytest.mark.parametrize("n", range(2, 18))
def test_tree_levels_cover_the_internal_nodes_in_heap_order(n: int) -> None:
    from routing_search.gates.comet import tree_levels

    levels = tree_levels(n)
    assert [q for first, end in levels for q in range(first, end)] == list(range(n - 1))
    for depth, (first, end) in enumerate(levels):
        assert first == 2**depth - 1 and end <= 2 ** (depth + 1) - 1
        assert depth == len(levels) - 1 or end == 2 ** (depth + 1) - 1  # only the deepest level may be partial


@pytest.mark.parametrize("n", range(2, 18))
def test_level_wise_reach_equals_the_path_products_in_value_and_gradient(n: int) -> None:
    """Reach probabilities level by level equal the product along each path, for any n (non powers of two
    included), in value and float64 gradient; with nodes exactly 0 or 1 the gradient is that of the former
    log-domain form (a branch of probability 0 passes no gradient, the other branch does)."""
    gate = COMET(n, 1)  # _reach depends only on n; the 3 trees below are a leading dimension
    g = torch.Generator().manual_seed(n)
    s = torch.rand(4, 3, n - 1, dtype=torch.float64, generator=g)
    probe = torch.randn(4, 3, n, dtype=torch.float64, generator=g)
    s_in = s.clone().requires_grad_()
    pi = gate._reach(s_in)
    ref_in = s.clone().requires_grad_()
    ref = _path_product_reach(ref_in, n)
    torch.testing.assert_close(pi, ref, atol=1e-15, rtol=1e-14)
    (grad,) = torch.autograd.grad((pi * probe).sum(), s_in)
    (grad_ref,) = torch.autograd.grad((ref * probe).sum(), ref_in)
    torch.testing.assert_close(grad, grad_ref, atol=1e-13, rtol=1e-12)

    s[0, :, ::2] = 0.0  # saturated nodes: whole subtrees unreachable
    s[1, :, 1::3] = 1.0
    s_in = s.clone().requires_grad_()
    pi = gate._reach(s_in)
    ref_in = s.clone().requires_grad_()
    ref = _log_domain_reach(ref_in, n)
    torch.testing.assert_close(pi, _path_product_reach(s, n), atol=1e-15, rtol=1e-14)
    torch.testing.assert_close(pi, ref, atol=1e-15, rtol=1e-14)
    assert bool((pi[0][_path_product_reach(s, n)[0] == 0] == 0).all())  # exact zeros behind a zero branch
    (grad,) = torch.autograd.grad((pi * probe).sum(), s_in)
    (grad_ref,) = torch.autograd.grad((ref * probe).sum(), ref_in)
    torch.testing.assert_close(grad, grad_ref, atol=1e-13, rtol=1e-12)


def _composed_comet(gate: COMET, x: torch.Tensor, lam: float) -> tuple[torch.Tensor, ...]:
    """The gate composed from autograd operations, as the former implementation computed it: smooth step,
    log-domain reach, one softmax over all k n scores, a per-tree softmax, the entropy with eps inside the log."""
    from routing_search.gates.smooth_step import smooth_step

    nodes, leaves = gate._logits(x)
    s = smooth_step(nodes, gate.gamma)
    log_pi = _log_reach(s, gate.num_experts)
    pi = torch.exp(log_pi)
    scores = leaves + log_pi
    joint = torch.softmax(scores.flatten(-2), dim=-1).view_as(scores)
    ent = -(pi * torch.log(pi + 1e-6)).sum(dim=(-2, -1))
    return joint.sum(-2), torch.softmax(scores, dim=-1), joint.sum(-1), lam * ent.mean()


@pytest.mark.parametrize("n", [2, 3, 6, 11, 16, 17])
@pytest.mark.parametrize("static", [True, False])
def test_fused_gate_equals_the_composed_form_with_saturated_nodes(n: int, static: bool) -> None:
    """Value and float64 gradient of every output against the composed autograd form, with some nodes
    saturated (outputs exactly 0 or 1: unreachable subtrees, frozen nodes) and the others fractional."""
    torch.manual_seed(n)
    gate = COMET(n, 2, None if static else D, gamma=0.8, anneal=None, entropy_weight=0.3).double()
    with torch.no_grad():
        for name, p in gate.named_parameters():
            p.uniform_(-0.2, 0.2) if name.startswith("node") else p.normal_()
        nodes = gate.node_logits if static else gate.node_bias
        nodes[:, ::3] = 5.0  # saturated left
        nodes[:, 1::4] = -5.0  # saturated right
        if not static:
            gate.node_weight[:, ::3] = 0.0
            gate.node_weight[:, 1::4] = 0.0
    x = torch.randn(6, D, dtype=torch.float64)
    s = gate.node_outputs(x)
    assert bool(((s == 0) | (s == 1)).any()) and (n < 6 or bool((s == 0).any() and (s == 1).any() and ((s > 0) & (s < 1)).any()))
    out = gate(x)
    ref = _composed_comet(gate, x, 0.3)
    got = (out.weights, out.selector_weights, out.selector_mix, out.loss)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b.expand_as(a), atol=1e-12, rtol=1e-10)
    g = torch.Generator().manual_seed(n)
    probes = [torch.randn(t.shape, dtype=torch.float64, generator=g) for t in got[:3]]
    params = list(gate.parameters())
    for with_probe in range(4):  # each output alone, so paths without incoming gradient are covered too
        total_got = (got[with_probe] * probes[with_probe]).sum() if with_probe < 3 else got[3]
        total_ref = (ref[with_probe].expand_as(got[with_probe]) * probes[with_probe]).sum() if with_probe < 3 else ref[3]
        fast = torch.autograd.grad(total_got, params, retain_graph=True, allow_unused=True, materialize_grads=True)
        slow = torch.autograd.grad(total_ref, params, retain_graph=True, allow_unused=True, materialize_grads=True)
        for a, b in zip(fast, slow):
            torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize("static", [True, False])
def test_zero_row_batch(static: bool) -> None:
    gate = make_gate(5, 2, static, entropy_weight=0.2)
    x = torch.zeros(0, D)
    out = gate(x)
    assert out.weights.shape == (0, 5) and out.selector_weights.shape == (0, 2, 5) and out.selector_mix.shape == (0, 2)
    assert out.loss.item() == 0.0
    (out.weights.sum() + out.loss).backward()
    assert all(p.grad is not None and bool((p.grad == 0).all()) for p in gate.parameters())
    hard = gate.hard(x)
    assert hard.weights.shape == (0, 5) and gate.reached_leaves(x).shape == (0, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [-1e3, 1e3])
def test_extreme_leaf_logits_fall_back_to_the_log_domain(dtype: torch.dtype, scale: float) -> None:
    """``e^a`` under- or overflows (every leaf logit far below or above 0): the same numbers as the
    composed softmax, finite gradients."""
    gate = COMET(6, 2, gamma=1.0, anneal=None).to(dtype)
    with torch.no_grad():
        gate.node_logits.uniform_(-0.3, 0.3)
        gate.leaf_logits.normal_().add_(scale)
    x = torch.zeros(3, 1, dtype=dtype)
    out = gate(x)
    ref = _composed_comet(gate, x, 0.0)
    for a, b in zip((out.weights, out.selector_weights, out.selector_mix), ref[:3]):
        assert bool(torch.isfinite(a).all())
        torch.testing.assert_close(a, b.expand_as(a), atol=1e-6 if dtype == torch.float32 else 1e-12, rtol=1e-5)
    (out.weights[:, 0].sum() + out.selector_weights[:, 1, 2].sum()).backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in gate.parameters())


def test_double_backward_is_refused_not_wrong() -> None:
    gate = make_gate(4, 2, False, entropy_weight=0.1).double()
    x = torch.randn(3, D, dtype=torch.float64)
    out = gate(x)
    # The hand-written backward is not differentiable: an error, never a wrong number. Regression: the
    # error came only when differentiating the gradient w.r.t. the same tensor; a Hessian through
    # torch.autograd.functional.hessian got silent zeros.
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.weights[:, 0].sum() + out.loss, gate.node_bias, create_graph=True)
    static = COMET(4, 2, anneal=None).double()
    params = dict(static.named_parameters())

    def first_weight(node_logits: torch.Tensor) -> torch.Tensor:
        return functional_call(static, {**params, "node_logits": node_logits}, (x,)).weights[0, 0]

    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.functional.hessian(first_weight, params["node_logits"].detach())


def test_node_outputs_are_the_smooth_step_to_the_last_bit_and_exact_at_the_ends() -> None:
    """COMET's node function (fused multiply-adds) is the shared smooth step to one unit in the last place,
    exactly 0 / 1 once saturated, and the same numbers in the soft gate, node_outputs and the walk."""
    from routing_search.gates.comet import _smooth_step
    from routing_search.gates.smooth_step import smooth_step

    t = torch.linspace(-1.0, 1.0, 2001, dtype=torch.float64)
    s, _ = _smooth_step(t, 0.7)
    torch.testing.assert_close(s, smooth_step(t, 0.7), atol=torch.finfo(torch.float64).eps, rtol=0)
    assert bool((s[t <= -0.35] == 0).all() and (s[t >= 0.35] == 1).all())
    gate = COMET(4, 1, gamma=0.7, anneal=None).double()
    with torch.no_grad():
        gate.node_logits.copy_(t[995:998].view(1, 3))
    assert torch.equal(gate.node_outputs(), s[995:998].view(1, 3))


def test_overflowing_logit_of_an_unreachable_leaf_gives_no_nan() -> None:
    """Regression: ``e^a = inf`` at a leaf with ``pi = 0`` made ``inf * 0 = NaN`` slip past the fallback check."""
    gate = COMET(4, 2, gamma=1.0, anneal=None)
    with torch.no_grad():
        gate.node_logits.copy_(torch.tensor([[5.0, 0.1, -0.2], [0.05, -0.1, 0.3]]))  # tree 0 never goes right
        gate.leaf_logits.zero_()
        gate.leaf_logits[0, 3] = 200.0  # e^200 overflows float32; that leaf is unreachable
    x = torch.zeros(2, 1)
    out = gate(x)
    assert bool(torch.isfinite(out.weights).all() and torch.isfinite(out.selector_weights).all())
    ref = _composed_comet(gate, x, 0.0)
    torch.testing.assert_close(out.weights, ref[0].expand_as(out.weights), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.selector_weights, ref[1].expand_as(out.selector_weights), atol=1e-6, rtol=1e-5)
    out.weights[:, 0].sum().backward()
    assert bool(torch.isfinite(gate.leaf_logits.grad).all() and torch.isfinite(gate.node_logits.grad).all())


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("entropy_weight", [0.0, 1e-2])
def test_backward_twice_with_retained_graph_gives_the_same_gradients(k: int, entropy_weight: float) -> None:
    """The backward writes into scratch buffers (the node rows of its own gradient, the entropy-adjusted
    leaf gradient): never into what the forward saved, so a retained graph can be differentiated again."""
    torch.manual_seed(0)
    gate = COMET(9, k, 5, entropy_weight=entropy_weight, anneal=None)
    x = torch.randn(11, 5)
    out = gate(x)
    loss = (out.weights * torch.arange(9.0)).sum() + out.selector_mix[:, 0].sum() + out.loss
    first = torch.autograd.grad(loss, list(gate.parameters()), retain_graph=True)
    second = torch.autograd.grad(loss, list(gate.parameters()))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
