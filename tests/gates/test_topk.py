import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

from routing_search.gates import GumbelSoftmax, Softmax, TopK
from routing_search.gates.topk import cv_squared

SIZES = [2, 3, 5, 8, 16]


def assert_simplex(w: torch.Tensor) -> None:
    assert torch.isfinite(w).all()
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(dim=1), torch.ones(w.shape[0], dtype=w.dtype))


def ks_for(n):
    return sorted({1, max(1, n // 2), n})


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("input_dim", [None, 6])
@pytest.mark.parametrize("noisy", [False, True])
def test_exactly_k_nonzeros_on_simplex(n, input_dim, noisy):
    torch.manual_seed(n)
    x = torch.randn(9, 6)
    for k in ks_for(n):
        gate = TopK(n, k, input_dim, noisy=noisy)
        for training in (True, False):
            gate.train(training)
            w = gate(x).weights
            assert w.shape == (9, n)
            assert_simplex(w)
            assert ((w != 0).sum(dim=1) == k).all()


@pytest.mark.parametrize("n", SIZES)
def test_matches_softmax_over_kept_logits(n):
    torch.manual_seed(10 + n)
    k = max(2, n // 2)
    gate = TopK(n, k, 4)
    x = torch.randn(6, 4)
    logits = gate.router(x)
    values, index = logits.topk(k, dim=1)
    expected = torch.zeros_like(logits).scatter(1, index, torch.softmax(values, dim=1))
    torch.testing.assert_close(gate(x).weights, expected)


def test_selected_logit_exactly_zero_keeps_its_weight():
    # Static: logits [0, -1, -2, 3, -5], k = 2 selects experts 3 and 0; expert 0's logit is exactly 0.
    gate = TopK(5, 2)
    with torch.no_grad():
        gate.logits.copy_(torch.tensor([0.0, -1.0, -2.0, 3.0, -5.0]))
    w = gate(torch.zeros(3, 1)).weights
    assert ((w != 0).sum(dim=1) == 2).all()
    expected = torch.softmax(torch.tensor([3.0, 0.0]), dim=0)
    torch.testing.assert_close(w[:, 3], expected[0].expand(3))
    torch.testing.assert_close(w[:, 0], expected[1].expand(3))

    # Per-example: zero weight matrix, the bias gives the logits; here all selected logits are 0.
    gate = TopK(4, 3, 2)
    with torch.no_grad():
        gate.router.weight.zero_()
        gate.router.bias.copy_(torch.tensor([0.0, -1.0, 0.0, 0.0]))
    w = gate(torch.randn(5, 2)).weights
    torch.testing.assert_close(w, torch.tensor([1 / 3, 0.0, 1 / 3, 1 / 3]).expand(5, -1))
    assert (w[:, 1] == 0).all()


def test_ties_are_deterministic_and_keep_k():
    gate = TopK(6, 3)
    with torch.no_grad():
        gate.logits.zero_()
    w1 = gate(torch.zeros(4, 1)).weights
    w2 = gate(torch.zeros(4, 1)).weights
    assert torch.equal(w1, w2)
    assert ((w1 != 0).sum(dim=1) == 3).all()
    torch.testing.assert_close(w1[w1 != 0], torch.full((12,), 1 / 3))


def test_support_survives_exp_underflow():
    gate = TopK(3, 2)
    with torch.no_grad():
        gate.logits.copy_(torch.tensor([0.0, -500.0, -1000.0]))
    w = gate(torch.zeros(2, 1)).weights
    assert ((w != 0).sum(dim=1) == 2).all()
    assert (w[:, 2] == 0).all()
    assert_simplex(w)


@pytest.mark.parametrize("n,k", [(3, 2), (5, 3), (8, 8)])
@pytest.mark.parametrize("input_dim", [None, 3])
def test_gradcheck_weights_and_loss_float64(n, k, input_dim):
    torch.manual_seed(n * 7 + k)
    gate = TopK(n, k, input_dim, load_balance_weight=0.3, z_loss_weight=0.2).double()
    with torch.no_grad():
        for p in gate.parameters():
            p.normal_()  # random logits: ties are far beyond the finite-difference step
    names = [name for name, _ in gate.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in gate.parameters()]

    def fn(x, *ps):
        out = functional_call(gate, dict(zip(names, ps)), (x,))
        return out.weights, out.loss

    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=input_dim is not None)
    assert gradcheck(fn, (x, *params))


@pytest.mark.parametrize("input_dim", [None, 4])
def test_k1_one_hot_with_router_gradient(input_dim):
    torch.manual_seed(3)
    n = 5
    gate = TopK(n, 1, input_dim)
    x = torch.randn(6, 4)
    w = gate(x).weights
    assert ((w == 1.0).sum(dim=1) == 1).all()
    assert ((w == 0.0).sum(dim=1) == n - 1).all()
    upstream = torch.randn(6, n)
    (w * upstream).sum().backward()
    grads = [p.grad for p in gate.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_k1_gradient_is_that_of_log_probability():
    gate = TopK(4, 1).double()
    logits = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    with torch.no_grad():
        gate.logits.copy_(logits)
    upstream = torch.tensor([[0.3, -0.7, 1.5, 2.0]], dtype=torch.float64)
    (gate(torch.zeros(1, 1, dtype=torch.float64)).weights * upstream).sum().backward()
    p = torch.softmax(logits, dim=0)
    expected = upstream[0, 2] * (torch.nn.functional.one_hot(torch.tensor(2), 4).double() - p)
    torch.testing.assert_close(gate.logits.grad, expected)


def test_noise_only_in_training_and_reproducible_with_generator():
    torch.manual_seed(0)
    gate = TopK(8, 2, 3, noisy=True, generator=torch.Generator().manual_seed(5))
    x = torch.randn(50, 3)
    gate.eval()
    clean = TopK(8, 2, 3)
    clean.router.load_state_dict(gate.router.state_dict())
    torch.testing.assert_close(gate(x).weights, clean(x).weights)
    gate.train()
    gate.generator.manual_seed(5)
    w1 = gate(x).weights
    gate.generator.manual_seed(5)
    w2 = gate(x).weights
    assert torch.equal(w1, w2)
    assert not torch.equal(w1 != 0, clean(x).weights != 0)  # noise std >= 0.69 changes some choices


def test_noisy_load_balance_trains_noise_router():
    torch.manual_seed(1)
    gate = TopK(6, 2, 4, noisy=True, load_balance_weight=1.0)
    out = gate(torch.randn(32, 4))
    assert out.loss > 0
    out.loss.backward()
    assert gate.noise_router.weight.grad.abs().sum() > 0
    assert gate.router.weight.grad.abs().sum() > 0


def test_load_balance_value_hand_computed():
    # Every example picks expert 2 of 4: importance = load = [0, 0, B, 0] -> cv² = 3 each.
    gate = TopK(4, 1, load_balance_weight=0.5)
    with torch.no_grad():
        gate.logits.copy_(torch.tensor([0.0, 0.0, 1.0, 0.0]))
    out = gate(torch.zeros(4, 1))
    torch.testing.assert_close(out.loss, torch.tensor(0.5 * (3.0 + 3.0)))
    torch.testing.assert_close(cv_squared(torch.tensor([1.0, 1.0, 1.0])), torch.tensor(0.0))


def test_z_loss_value():
    torch.manual_seed(2)
    gate = TopK(5, 2, 3, z_loss_weight=0.1)
    x = torch.randn(7, 3)
    expected = 0.1 * torch.logsumexp(gate.router(x), dim=1).square().mean()
    torch.testing.assert_close(gate(x).loss, expected)


def test_weight_schedule_by_call_count():
    gate = TopK(4, 1, z_loss_weight=lambda calls: 0.0 if calls < 1 else 1.0)
    x = torch.zeros(2, 1)
    assert gate(x).loss.item() == 0.0
    assert gate(x).loss.item() > 0.0


def test_dtypes():
    for dtype in (torch.float32, torch.float64):
        gate = TopK(5, 2, 3, noisy=True, load_balance_weight=0.1).to(dtype)
        out = gate(torch.randn(4, 3, dtype=dtype))
        assert out.weights.dtype == dtype and out.loss.dtype == dtype


def test_input_checks():
    gate = TopK(4, 2, 3)
    with pytest.raises(ValueError, match="input_dim=3"):
        gate(torch.randn(2, 4))
    bad = torch.randn(2, 3)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gate(bad)
    TopK(4, 2, 3, validate=False)(bad)


def test_constructor_checks():
    with pytest.raises(ValueError, match="k must be in"):
        TopK(4, 0)
    with pytest.raises(ValueError, match="k must be in"):
        TopK(4, 5)
    with pytest.raises(ValueError, match="num_experts"):
        TopK(1, 1)
    with pytest.raises(ValueError, match="load_balance_weight"):
        TopK(4, 2, load_balance_weight=-1.0)
    with pytest.raises(ValueError, match="z_loss_weight"):
        TopK(4, 2, z_loss_weight=-0.1)
    with pytest.raises(ValueError, match="noise_epsilon"):
        TopK(4, 2, noisy=True, noise_epsilon=-1.0)
    with pytest.raises(TypeError, match="generator"):
        TopK(4, 2, generator=0)
    with pytest.raises(TypeError):
        TopK(4, 2, renormalise=False)


@pytest.mark.parametrize("make", [lambda: TopK(4, 2, 3), lambda: Softmax(4, 3), lambda: GumbelSoftmax(4, 3)])
def test_float64_input_to_float32_gate_names_x_and_both_dtypes(make) -> None:
    gate = make()
    name = type(gate).__name__
    with pytest.raises(TypeError, match=rf"x has dtype torch\.float64 but the gate {name} has dtype torch\.float32"):
        gate(torch.randn(2, 3, dtype=torch.float64))
    assert gate.double()(torch.randn(2, 3, dtype=torch.float64)).weights.dtype == torch.float64


@pytest.mark.parametrize("input_dim", [None, 3])
def test_z_loss_of_an_empty_batch_is_zero_not_nan(input_dim):
    # Regression: the z-loss was the mean over no rows, NaN, which poisons the training loss.
    torch.manual_seed(0)
    gate = TopK(4, 2, input_dim, load_balance_weight=1.0, z_loss_weight=1.0)
    out = gate(torch.zeros(0, 3))
    assert out.weights.shape == (0, 4)
    assert out.loss.item() == 0.0
    # Rows still get the batch mean of logsumexp(logits)^2.
    x = torch.randn(5, 3)
    gate.load_balance_weight = 0.0
    logits = gate.compute_logits(x)
    torch.testing.assert_close(gate(x).loss, torch.logsumexp(logits, dim=-1).square().mean())
