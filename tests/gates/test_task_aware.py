import pytest
import torch
from torch import nn
from torch.autograd import gradcheck
from torch.func import functional_call

from routing_search.gates import GateOutput, GumbelSoftmax, Hash, Softmax, TaskAware, TopK


def assert_simplex(w: torch.Tensor) -> None:
    assert torch.isfinite(w).all()
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(dim=1), torch.ones(w.shape[0], dtype=w.dtype))


class TwoSelectorGate(nn.Module):
    """A user-written gate (not a BaseGate) with two selectors, each a softmax over the experts."""

    def __init__(self, num_experts: int, input_dim: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.num_selectors = 2
        self.input_dim = input_dim
        self.selectors = nn.Linear(input_dim, 2 * num_experts)
        self.mix = nn.Linear(input_dim, 2)

    def forward(self, x, task=None, key=None):
        sel = torch.softmax(self.selectors(x).view(-1, 2, self.num_experts), dim=-1)
        mix = torch.softmax(self.mix(x), dim=-1)
        weights = torch.einsum("bk,bkn->bn", mix, sel)
        return GateOutput(weights, (weights**2).mean(), sel, mix)


def make_gates(n=6, d=4):
    torch.manual_seed(0)
    return [
        Softmax(n),
        TopK(n, 2, d, z_loss_weight=0.1),
        GumbelSoftmax(n, d).eval(),
        TopK(n, 1, load_balance_weight=0.5),
    ]


@pytest.mark.parametrize("n", [2, 3, 5, 8, 16])
def test_rows_routed_like_their_own_gate(n):
    gates = make_gates(n)
    router = TaskAware(gates=gates)
    assert router.num_experts == n and router.num_tasks == 4
    torch.manual_seed(n)
    x = torch.randn(20, 4)
    task = torch.randint(0, 4, (20,))
    task[:4] = torch.arange(4)  # every task present
    out = router(x, task=task)
    assert_simplex(out.weights)
    loss = torch.zeros(())
    for t, gate in enumerate(gates):
        rows = task == t
        alone = gate(x[rows])
        torch.testing.assert_close(out.weights[rows], alone.weights)
        loss = loss + alone.loss * rows.sum() / 20
    torch.testing.assert_close(out.loss, loss)


def test_int_task_equals_that_gate():
    gates = make_gates()
    router = TaskAware.per_task(gates)
    x = torch.randn(5, 4)
    for t, gate in enumerate(gates):
        out = router(x, task=t)
        alone = gate(x)
        torch.testing.assert_close(out.weights, alone.weights)
        torch.testing.assert_close(out.loss, alone.loss)
        out_0d = router(x, task=torch.tensor(t))
        torch.testing.assert_close(out_0d.weights, alone.weights)


def test_gradients_reach_only_called_gates():
    gates = make_gates()
    router = TaskAware(gates=gates)
    x = torch.randn(6, 4)
    task = torch.tensor([1, 1, 2, 2, 1, 2])
    out = router(x, task=task)
    (out.weights * torch.randn(6, 6)).sum().backward()
    assert gates[1].router.weight.grad.abs().sum() > 0
    assert gates[2].router.weight.grad.abs().sum() > 0
    assert gates[0].logits.grad is None and gates[3].logits.grad is None


def test_key_is_passed_through():
    gates = [Hash(4, 10, seed=0), Hash(4, 10, seed=1)]
    router = TaskAware(gates=gates)
    key = torch.arange(10)
    task = torch.tensor([0, 1] * 5)
    w = router(torch.zeros(10, 1), task=task, key=key).weights
    expected = torch.where(task == 0, gates[0].table[key], gates[1].table[key])
    assert torch.equal(w.argmax(dim=1), expected)
    assert list(router.parameters()) == []


def test_selector_outputs_concatenated_or_omitted():
    torch.manual_seed(4)
    gates = [TwoSelectorGate(5, 3), TwoSelectorGate(5, 3)]
    router = TaskAware(gates=gates)
    assert router.num_selectors == 2 and router.input_dim == 3
    x = torch.randn(7, 3)
    task = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    out = router(x, task=task)
    assert out.has_selectors
    for t in (0, 1):
        rows = task == t
        alone = gates[t](x[rows])
        torch.testing.assert_close(out.selector_weights[rows], alone.selector_weights)
        torch.testing.assert_close(out.selector_mix[rows], alone.selector_mix)
    mixture = torch.einsum("bk,bkn->bn", out.selector_mix, out.selector_weights)
    torch.testing.assert_close(out.weights, mixture)

    mixed = TaskAware(gates=[TwoSelectorGate(5, 3), Softmax(5)])
    assert mixed.num_selectors == 1
    out = mixed(x, task=task)
    assert not out.has_selectors and out.selector_weights is None
    assert_simplex(out.weights)


def test_embedding_mode_matches_inner_gate_and_trains_embedding():
    torch.manual_seed(5)
    inner = TopK(6, 2, 4 + 3)
    router = TaskAware(gate=inner, num_tasks=3, task_embedding_dim=3, input_dim=4)
    assert router.num_experts == 6 and router.input_dim == 4
    x = torch.randn(8, 4)
    task = torch.tensor([0, 1, 2, 0, 1, 2, 2, 2])
    out = router(x, task=task)
    expected = inner(torch.cat([x, router.task_embedding.weight[task]], dim=1))
    torch.testing.assert_close(out.weights, expected.weights)
    assert ((out.weights != 0).sum(dim=1) == 2).all()
    (out.weights * torch.randn(8, 6)).sum().backward()
    assert router.task_embedding.weight.grad[[0, 1, 2]].abs().sum() > 0
    same = router(x, task=1).weights
    torch.testing.assert_close(same, inner(torch.cat([x, router.task_embedding.weight[[1] * 8]], 1)).weights)


def test_embedding_mode_gradcheck_float64():
    torch.manual_seed(6)
    router = TaskAware.with_task_embedding(
        Softmax(4, 2 + 2), num_tasks=3, task_embedding_dim=2, input_dim=2
    ).double()
    names = [name for name, _ in router.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in router.parameters()]
    task = torch.tensor([2, 0, 1, 2])

    def fn(x, *ps):
        return functional_call(router, dict(zip(names, ps)), (x,), {"task": task}).weights

    x = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert gradcheck(fn, (x, *params))


def test_per_task_gradcheck_float64():
    torch.manual_seed(7)
    router = TaskAware(gates=[Softmax(3, 2), Softmax(3, temperature=2.0)]).double()
    with torch.no_grad():
        router.gates[1].logits.normal_()
    names = [name for name, _ in router.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in router.parameters()]
    task = torch.tensor([1, 0, 0, 1, 0])

    def fn(x, *ps):
        return functional_call(router, dict(zip(names, ps)), (x,), {"task": task}).weights

    x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    assert gradcheck(fn, (x, *params))


def test_dtypes():
    for dtype in (torch.float32, torch.float64):
        per_task = TaskAware(gates=[Softmax(3, 2), TopK(3, 2)]).to(dtype)
        out = per_task(torch.randn(4, 2, dtype=dtype), task=torch.tensor([0, 1, 1, 0]))
        assert out.weights.dtype == dtype and out.loss.dtype == dtype
        emb = TaskAware(gate=Softmax(3, 5), num_tasks=2, task_embedding_dim=3, input_dim=2).to(dtype)
        assert emb(torch.randn(4, 2, dtype=dtype), task=1).weights.dtype == dtype


def test_task_errors():
    router = TaskAware(gates=make_gates()[:3])
    x = torch.randn(4, 4)
    with pytest.raises(ValueError, match="task="):
        router(x)
    with pytest.raises(ValueError, match=r"task must be in \[0, num_tasks=3\), got 3"):
        router(x, task=3)
    with pytest.raises(ValueError, match=r"task must be in \[0, num_tasks=3\), got -1"):
        router(x, task=-1)
    with pytest.raises(ValueError, match=r"task values must be in \[0, num_tasks=3\), got 5"):
        router(x, task=torch.tensor([0, 1, 5, 2]))
    with pytest.raises(ValueError, match="task must be"):
        router(x, task=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="task must have an integer dtype"):
        router(x, task=torch.tensor([0.0, 1.0, 1.0, 2.0]))
    with pytest.raises(TypeError, match="task"):
        router(x, task="a")
    emb = TaskAware(gate=Softmax(3, 5), num_tasks=2, task_embedding_dim=3, input_dim=2)
    with pytest.raises(ValueError, match=r"num_tasks=2"):
        emb(torch.randn(2, 2), task=2)


def test_input_checks():
    router = TaskAware(gate=Softmax(3, 5), num_tasks=2, task_embedding_dim=3, input_dim=2)
    with pytest.raises(ValueError, match="input_dim=2"):
        router(torch.randn(2, 5), task=0)
    bad = torch.randn(2, 2)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        router(bad, task=0)
    TaskAware(gate=Softmax(3, 5, validate=False), num_tasks=2, task_embedding_dim=3, input_dim=2,
              validate=False)(bad, task=0)


def test_constructor_checks():
    with pytest.raises(ValueError, match="exactly one of gates= .* or gate="):
        TaskAware()
    with pytest.raises(ValueError, match="exactly one"):
        TaskAware(gates=[Softmax(3)], gate=Softmax(3))
    with pytest.raises(ValueError, match="num_experts"):
        TaskAware(gates=[Softmax(3), Softmax(4)])
    with pytest.raises(ValueError, match="input_dim"):
        TaskAware(gates=[Softmax(3, 2), Softmax(3, 5)])
    with pytest.raises(ValueError, match="at least one"):
        TaskAware(gates=[])
    with pytest.raises(TypeError, match="gates"):
        TaskAware(gates=Softmax(3))
    with pytest.raises(TypeError, match=r"gates\[1\]"):
        TaskAware(gates=[Softmax(3), "not a gate"])
    with pytest.raises(ValueError, match="num_tasks"):
        TaskAware(gates=[Softmax(3)], num_tasks=1)
    with pytest.raises(ValueError, match=r"input_dim \+ task_embedding_dim = 2 \+ 3 = 5, got 4"):
        TaskAware(gate=Softmax(3, 4), num_tasks=2, task_embedding_dim=3, input_dim=2)
    with pytest.raises(ValueError, match="static gate"):
        TaskAware(gate=Softmax(3), num_tasks=2, task_embedding_dim=3, input_dim=2)
    with pytest.raises(ValueError, match="num_tasks, task_embedding_dim and input_dim"):
        TaskAware(gate=Softmax(3, 5), num_tasks=2)
    with pytest.raises(ValueError, match="num_tasks"):
        TaskAware(gate=Softmax(3, 5), num_tasks=0, task_embedding_dim=3, input_dim=2)


def test_wraps_selector_gates_dselect_k_and_comet():
    from routing_search.gates import COMET, DSelectK

    torch.manual_seed(8)
    gates = [DSelectK(5, 2), DSelectK(5, 2, 3), COMET(5, 2, 3)]
    router = TaskAware(gates=gates)
    assert router.num_selectors == 2
    x = torch.randn(9, 3)
    task = torch.tensor([0, 1, 2] * 3)
    out = router(x, task=task)
    assert_simplex(out.weights)
    assert out.has_selectors
    for t, gate in enumerate(gates):
        rows = task == t
        alone = gate(x[rows])
        torch.testing.assert_close(out.weights[rows], alone.weights)
        torch.testing.assert_close(out.selector_weights[rows], alone.selector_weights)

    emb = TaskAware(gate=COMET(5, 2, 3 + 2), num_tasks=3, task_embedding_dim=2, input_dim=3)
    out = emb(x, task=task)
    assert_simplex(out.weights)
    assert out.has_selectors and out.selector_weights.shape == (9, 2, 5)


def test_every_gate_follows_the_protocol():
    from routing_search.gates import Gate

    for gate in (Softmax(3), TopK(3, 1), Hash(3), GumbelSoftmax(3), TaskAware(gates=[Softmax(3)])):
        assert isinstance(gate, Gate)


def test_per_task_key_of_the_wrong_length_is_refused_and_a_0dim_key_passes():
    # Regression: a key shorter than the batch raised an IndexError from inside the row split, and a
    # 0-dim key (which the protocol lets through) raised one too.
    torch.manual_seed(0)
    gate = TaskAware([Softmax(4, 3), Softmax(4, 3)])
    x = torch.randn(3, 3)
    task = torch.tensor([0, 1, 1])
    with pytest.raises(ValueError, match=r"key must have one entry per row \(\[batch\]=\[3\]"):
        gate(x, task=task, key=torch.tensor([0, 1]))
    out = gate(x, task=task, key=torch.tensor(2))
    expected = torch.cat([gate.gates[0](x[:1]).weights, gate.gates[1](x[1:]).weights])
    torch.testing.assert_close(out.weights, expected)
