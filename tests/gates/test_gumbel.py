import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

from routing_search.gates import GumbelSoftmax
from routing_search.gates.gumbel import sample_gumbel

SIZES = [2, 3, 5, 8, 16]


def assert_simplex(w: torch.Tensor) -> None:
    assert torch.isfinite(w).all()
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(dim=1), torch.ones(w.shape[0], dtype=w.dtype))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("input_dim", [None, 3])
@pytest.mark.parametrize("hard", [False, True])
def test_simplex_in_both_modes(n, input_dim, hard):
    torch.manual_seed(n)
    gate = GumbelSoftmax(n, input_dim, hard=hard, generator=torch.Generator().manual_seed(n))
    x = torch.randn(8, 3)
    for training in (True, False):
        gate.train(training)
        w = gate(x).weights
        assert w.shape == (8, n)
        assert_simplex(w)
        if hard:
            assert ((w != 0).sum(dim=1) == 1).all()


def test_eval_is_deterministic_softmax():
    gate = GumbelSoftmax(4, temperature=0.5).eval()
    with torch.no_grad():
        gate.logits.copy_(torch.tensor([1.0, 0.0, -1.0, 0.5]))
    w = gate(torch.zeros(3, 1)).weights
    expected = torch.softmax(torch.tensor([2.0, 0.0, -2.0, 1.0]), dim=0)
    torch.testing.assert_close(w, expected.expand(3, -1))
    assert torch.equal(w, gate(torch.zeros(3, 1)).weights)


def test_training_samples_per_row_and_generator_reproducible():
    gate = GumbelSoftmax(5, generator=torch.Generator().manual_seed(1))
    x = torch.zeros(4, 1)
    w1 = gate(x).weights
    assert not torch.allclose(w1[0], w1[1])
    gate.generator.manual_seed(1)
    assert torch.equal(gate(x).weights, w1)


def test_hard_argmax_frequencies_follow_softmax():
    # Gumbel-max: argmax(logits + G) ~ softmax(logits).
    logits = torch.tensor([1.0, 0.0, -0.5, 0.3])
    gate = GumbelSoftmax(4, hard=True, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gate.logits.copy_(logits)
    w = gate(torch.zeros(40000, 1)).weights
    torch.testing.assert_close(w.mean(dim=0).detach(), torch.softmax(logits, dim=0), atol=0.01, rtol=0)


def test_hard_straight_through_gradient():
    gate = GumbelSoftmax(4, hard=True).eval()
    with torch.no_grad():
        gate.logits.copy_(torch.tensor([0.2, 1.0, -0.3, 0.0]))
    w = gate(torch.zeros(2, 1)).weights
    assert torch.equal(w, torch.tensor([[0.0, 1.0, 0.0, 0.0]] * 2))
    (w * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert gate.logits.grad.abs().sum() > 0


def test_gumbel_noise_is_finite_and_standard():
    g = sample_gumbel((200000,), dtype=torch.float64, device=torch.device("cpu"),
                      generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(g).all()
    assert abs(g.mean().item() - 0.5772156649) < 0.01  # Euler-Mascheroni constant
    assert abs(g.var().item() - torch.pi**2 / 6) < 0.03


@pytest.mark.parametrize("input_dim", [None, 3])
@pytest.mark.parametrize("training", [False, True])
def test_gradcheck_float64(input_dim, training):
    torch.manual_seed(2)
    gate = GumbelSoftmax(5, input_dim, temperature=0.8).double().train(training)
    with torch.no_grad():
        for p in gate.parameters():
            p.normal_()
    names = [name for name, _ in gate.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in gate.parameters()]

    def fn(x, *ps):
        gate.generator = torch.Generator().manual_seed(7)  # same noise on every evaluation
        return functional_call(gate, dict(zip(names, ps)), (x,)).weights

    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=input_dim is not None)
    assert gradcheck(fn, (x, *params))


def test_dtypes():
    for dtype in (torch.float32, torch.float64):
        gate = GumbelSoftmax(3, 2, hard=True).to(dtype)
        out = gate(torch.randn(4, 2, dtype=dtype))
        assert out.weights.dtype == dtype and out.loss.dtype == dtype


def test_checks():
    with pytest.raises(ValueError, match="num_experts"):
        GumbelSoftmax(1)
    with pytest.raises(ValueError, match="temperature"):
        GumbelSoftmax(3, temperature=-1.0)
    with pytest.raises(TypeError, match="generator"):
        GumbelSoftmax(3, generator=1)
    gate = GumbelSoftmax(3, 2)
    with pytest.raises(ValueError, match="input_dim=2"):
        gate(torch.randn(2, 3))
    bad = torch.full((2, 2), float("inf"))
    with pytest.raises(ValueError, match="NaN/inf"):
        gate(bad)
    GumbelSoftmax(3, 2, validate=False)(bad)


@pytest.mark.parametrize("input_dim", [None, 3])
def test_hard_straight_through_gradient_survives_default_dispatch(input_dim):
    """Regression: with the default dispatch the zeros of the hard sample carried no gradient."""
    from routing_search.layers import MoE, make_experts

    n = 5
    torch.manual_seed(0)
    gate = GumbelSoftmax(n, input_dim, hard=True)
    experts = make_experts(n, 3, [4], 2, generator=torch.Generator().manual_seed(1))
    x = torch.randn(16, 3)
    assert gate.zeros_carry_gradient and not GumbelSoftmax(n, input_dim).zeros_carry_gradient
    grads = {}
    for dispatch in ("auto", "dense"):
        model = MoE(experts, gate, dispatch=dispatch).train()
        gate.generator = torch.Generator().manual_seed(2)  # same Gumbel noise for both runs
        gate.zero_grad()
        out = model(x)
        assert bool(((out.weights == 0) | (out.weights == 1)).all())
        out.output.square().sum().backward()
        grads[dispatch] = [p.grad.clone() for p in gate.parameters()]
    for auto, dense in zip(grads["auto"], grads["dense"]):
        assert dense.abs().sum() > 0
        torch.testing.assert_close(auto, dense)
