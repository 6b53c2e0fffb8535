import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

from routing_search.gates import GateOutput, Softmax

SIZES = [2, 3, 5, 8, 16]


def assert_simplex(w: torch.Tensor) -> None:
    assert torch.isfinite(w).all()
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(dim=1), torch.ones(w.shape[0], dtype=w.dtype))


def gate_weights_fn(gate, **kwargs):
    names = [name for name, _ in gate.named_parameters()]

    def fn(x, *params):
        return functional_call(gate, dict(zip(names, params)), (x,), kwargs).weights

    params = [p.detach().clone().requires_grad_(True) for p in gate.parameters()]
    return fn, params


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("input_dim", [None, 4])
def test_rows_on_simplex_and_dense(n, input_dim):
    torch.manual_seed(n)
    gate = Softmax(n, input_dim)
    x = torch.randn(7, 4)
    out = gate(x)
    assert isinstance(out, GateOutput)
    assert out.weights.shape == (7, n)
    assert_simplex(out.weights)
    assert (out.weights > 0).all()
    assert out.loss.dim() == 0 and out.loss.item() == 0.0
    assert out.selector_weights is None and out.selector_mix is None


def test_static_starts_uniform_and_ignores_input():
    gate = Softmax(5)
    assert gate.is_static
    out = gate(torch.randn(3, 11))
    torch.testing.assert_close(out.weights, torch.full((3, 5), 0.2))


def test_temperature_divides_logits():
    gate = Softmax(4, temperature=0.5)
    with torch.no_grad():
        gate.logits.copy_(torch.tensor([1.0, 0.0, -1.0, 2.0]))
    out = gate(torch.zeros(2, 1))
    expected = torch.softmax(torch.tensor([2.0, 0.0, -2.0, 4.0]), dim=0)
    torch.testing.assert_close(out.weights, expected.expand(2, -1))


def test_per_example_matches_linear():
    torch.manual_seed(0)
    gate = Softmax(3, 2)
    x = torch.randn(5, 2)
    expected = torch.softmax(gate.router(x), dim=1)
    torch.testing.assert_close(gate(x).weights, expected)


@pytest.mark.parametrize("input_dim", [None, 3])
def test_gradcheck_float64(input_dim):
    torch.manual_seed(1)
    gate = Softmax(5, input_dim, temperature=0.7).double()
    if input_dim is None:
        with torch.no_grad():
            gate.logits.normal_()
    fn, params = gate_weights_fn(gate)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=input_dim is not None)
    assert gradcheck(fn, (x, *params))


def test_float32_and_float64():
    for dtype in (torch.float32, torch.float64):
        gate = Softmax(3, 2).to(dtype)
        out = gate(torch.randn(4, 2, dtype=dtype))
        assert out.weights.dtype == dtype and out.loss.dtype == dtype


def test_input_checks():
    gate = Softmax(4, 3)
    with pytest.raises(ValueError, match="input_dim=3"):
        gate(torch.randn(2, 5))
    with pytest.raises(ValueError, match="shape"):
        gate(torch.randn(3))
    bad = torch.randn(2, 3)
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gate(bad)
    bad[1, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/inf"):
        Softmax(4)(bad)
    # validate=False skips the finiteness check (the output may then be non-finite).
    out = Softmax(4, 3, validate=False)(bad)
    assert out.weights.shape == (2, 4)


def test_constructor_checks():
    with pytest.raises(ValueError, match="num_experts"):
        Softmax(1)
    with pytest.raises(TypeError, match="num_experts"):
        Softmax(2.5)
    with pytest.raises(ValueError, match="input_dim"):
        Softmax(3, 0)
    with pytest.raises(ValueError, match="temperature"):
        Softmax(3, temperature=0.0)
    with pytest.raises(TypeError):
        Softmax(3, tempreature=1.0)


def test_training_counter_advances_only_in_training():
    gate = Softmax(3)
    x = torch.zeros(1, 1)
    gate(x)
    gate(x)
    assert int(gate.calls) == 2
    gate.eval()
    gate(x)
    assert int(gate.calls) == 2
