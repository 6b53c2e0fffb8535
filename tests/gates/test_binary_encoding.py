"""Tests of the binary-encoding building blocks (DSelect-k §3.1.1–3.1.2, Prop. 1 and 2)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from routing_search.gates.binary_encoding import code_matrix, hard_gate, hard_selector, num_bits, reachable_mass, selector


def bits_of(code: int, m: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor([(code >> j) & 1 for j in range(m)], dtype=dtype)


@pytest.mark.parametrize(
    ("n", "m"), [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (8, 3), (9, 4), (16, 4), (17, 5)]
)
def test_num_bits(n: int, m: int) -> None:
    assert num_bits(n) == m
    assert code_matrix(n).shape == (n, m)


def test_code_matrix_by_hand() -> None:
    expected = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.float64)
    got = code_matrix(5, dtype=torch.float64)
    assert got.dtype == torch.float64
    assert torch.equal(got, expected)
    assert code_matrix(5).dtype == torch.get_default_dtype()
    assert code_matrix(5, dtype=torch.long, device=torch.device("cpu")).dtype == torch.long


def test_selector_matches_eq3_for_four_experts() -> None:
    z = torch.tensor([0.3, 0.8], dtype=torch.float64)
    z1, z2 = z
    expected = torch.stack([(1 - z1) * (1 - z2), z1 * (1 - z2), (1 - z1) * z2, z1 * z2])
    assert torch.allclose(selector(z, 4), expected, atol=0, rtol=1e-15)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8, 11, 16])
def test_selector_one_hot_for_binary_codes(n: int) -> None:
    m = num_bits(n)
    for code in range(2**m):
        r = selector(bits_of(code, m), n)
        expected = torch.zeros(n, dtype=torch.float64)
        if code < n:
            expected[code] = 1.0
        assert torch.equal(r, expected)
        assert float(reachable_mass(bits_of(code, m), n)) == float(code < n)


@pytest.mark.parametrize("n", [2, 4, 8, 16])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_selector_on_simplex_for_power_of_two(n: int, data: st.DataObject) -> None:
    m = num_bits(n)
    z = torch.tensor(
        data.draw(st.lists(st.floats(0.0, 1.0), min_size=m, max_size=m)), dtype=torch.float64
    )
    r = selector(z, n)
    assert bool((r >= 0).all())
    assert torch.allclose(r.sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("n", [3, 5, 6, 7, 9])
def test_reachable_mass_is_sum_of_first_n_codes(n: int) -> None:
    torch.manual_seed(0)
    m = num_bits(n)
    z = torch.rand(10, m, dtype=torch.float64)
    full = selector(z, 2**m)
    assert torch.allclose(full.sum(-1), torch.ones(10, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(reachable_mass(z, n), full[:, :n].sum(-1), atol=1e-12)
    assert torch.equal(selector(z, n), full[:, :n])
    assert bool((reachable_mass(z, n) < 1).all())


def test_selector_batched_shape_and_dtype() -> None:
    z = torch.rand(2, 3, 4, 3)
    r = selector(z, 6)
    assert r.shape == (2, 3, 4, 6) and r.dtype == z.dtype


def test_selector_gradcheck() -> None:
    torch.manual_seed(1)
    z = torch.rand(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: selector(t, 5), (z,))


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_hard_selector_equals_selector_on_binary(n: int) -> None:
    m = num_bits(n)
    Z = torch.stack([bits_of(c, m) for c in range(n)])
    assert torch.equal(hard_selector(Z, n), selector(Z, n))
    assert torch.equal(hard_selector(Z, n), torch.eye(n, dtype=torch.float64))
    # default num_experts = 2^m
    assert hard_selector(bits_of(3, 2)).shape == (4,)
    # integer codes give the default float dtype
    assert hard_selector(Z.long(), n).dtype == torch.get_default_dtype()


@pytest.mark.parametrize(("n", "k"), [(4, 1), (5, 2), (8, 3), (8, 8)])
def test_hard_gate_prop1(n: int, k: int) -> None:
    torch.manual_seed(2)
    m = num_bits(n)
    alpha = torch.randn(k, dtype=torch.float64)
    for codes in itertools.islice(itertools.product(range(n), repeat=k), 60):
        Z = torch.stack([bits_of(c, m) for c in codes])
        q = hard_gate(alpha, Z, n)
        assert torch.allclose(q.sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-12)
        assert bool((q >= 0).all())
        assert int((q != 0).sum()) == len(set(codes)) <= k
        expected = (torch.softmax(alpha, 0)[:, None] * selector(Z, n)).sum(0)
        assert torch.allclose(q, expected, atol=1e-15)


def test_hard_gate_batched_and_differentiable_in_alpha() -> None:
    alpha = torch.zeros(6, 2, dtype=torch.float64, requires_grad=True)
    Z = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64).expand(6, 2, 3)
    q = hard_gate(alpha, Z, 5)
    assert q.shape == (6, 5)
    assert torch.equal(q[0], torch.tensor([0.0, 0.5, 0.0, 0.0, 0.5], dtype=torch.float64))
    (q[:, 1]).sum().backward()
    assert alpha.grad is not None and bool((alpha.grad != 0).all())


def test_hard_gate_errors() -> None:
    alpha = torch.zeros(2)
    with pytest.raises(ValueError, match="Z must be binary"):
        hard_gate(alpha, torch.tensor([[0.0, 0.5], [1.0, 0.0]]), 4)
    with pytest.raises(ValueError, match="Z encodes code 3"):
        hard_gate(alpha, torch.tensor([[1.0, 1.0], [1.0, 0.0]]), 3)
    with pytest.raises(ValueError, match="Z must have last dimension"):
        hard_gate(alpha, torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]), 4)
    with pytest.raises(ValueError, match="alpha must have shape"):
        hard_gate(torch.zeros(3), torch.tensor([[1.0, 1.0], [1.0, 0.0]]), 4)
    with pytest.raises(ValueError, match="z_binary must be binary"):
        hard_selector(torch.tensor([0.0, 2.0]), 4)
    with pytest.raises(ValueError, match="z_binary encodes code"):
        hard_selector(torch.tensor([1.0, 1.0]), 3)
    with pytest.raises(ValueError, match="z must have last dimension"):
        selector(torch.rand(4), 5)
    with pytest.raises(ValueError, match="num_experts"):
        code_matrix(0)


@pytest.mark.parametrize("n", [2, 3, 5, 8, 16])
def test_selector_fast_equals_the_reference_product(n):
    from routing_search.gates.binary_encoding import selector_fast

    m = num_bits(n)
    g = torch.Generator().manual_seed(n)
    z = torch.rand(7, 3, m, generator=g, dtype=torch.float64)
    z[0] = (z[0] > 0.5).double()  # binary rows: exact one-hot in both
    z[1, 0, 0] = 0.0  # a single zero factor: exact zeros in both
    fast, ref = selector_fast(z, n), selector(z, n)
    torch.testing.assert_close(fast, ref, atol=1e-15, rtol=1e-13)
    assert torch.equal(fast[0], ref[0]) and torch.equal(fast[1, 0] == 0, ref[1, 0] == 0)


def test_selector_softmax_and_mix_selectors_match_the_plain_forms() -> None:
    from routing_search.gates.binary_encoding import mix_selectors, selector_softmax

    g = torch.Generator().manual_seed(0)
    alpha = torch.randn(6, 3, generator=g, dtype=torch.float64) * 20
    rows = torch.rand(6, 3, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(selector_softmax(alpha), torch.softmax(alpha, -1), atol=1e-15, rtol=1e-14)
    mix = selector_softmax(alpha)
    torch.testing.assert_close(mix_selectors(mix, rows), (mix.unsqueeze(-1) * rows).sum(-2), atol=1e-15, rtol=1e-14)
    assert mix_selectors(torch.ones(1), torch.eye(4)[:1]).tolist() == [1.0, 0.0, 0.0, 0.0]  # k = 1, no batch
