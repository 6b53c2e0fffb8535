"""Tests of the Permutation module and of how a permutation maps gate weights to experts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from routing_search.gates import GateOutput
from routing_search.layers import Permutation, apply_permutation, check_permutation, invert_permutation

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def plain(weights) -> GateOutput:
    w = torch.as_tensor(weights, dtype=torch.float64)
    return GateOutput(weights=w, loss=w.new_zeros(()))


def with_selectors(sel, mix) -> GateOutput:
    sel = torch.as_tensor(sel, dtype=torch.float64)
    mix = torch.as_tensor(mix, dtype=torch.float64)
    return GateOutput(weights=torch.einsum("bk,bkn->bn", mix, sel), loss=mix.new_zeros(()), selector_weights=sel, selector_mix=mix)


# ----------------------------------------------------------------------------- the module
def test_starts_at_identity_and_sets_gets_resets():
    p = Permutation(4, num_selectors=2)
    assert p.is_identity
    np.testing.assert_array_equal(p.get(), [[0, 1, 2, 3]] * 2)
    p.set([[1, 0, 3, 2], [3, 2, 1, 0]])
    assert not p.is_identity
    np.testing.assert_array_equal(p.get(), [[1, 0, 3, 2], [3, 2, 1, 0]])
    got = p.get()
    got[0, 0] = 99  # a copy, not a view of the buffer
    assert int(p.index[0, 0]) == 1
    p.set(np.array([2, 3, 0, 1]))  # one row broadcast to every selector
    np.testing.assert_array_equal(p.get(), [[2, 3, 0, 1]] * 2)
    p.set(torch.tensor([1.0, 0.0, 2.0, 3.0]))  # integral floats are accepted
    np.testing.assert_array_equal(p.get(), [[1, 0, 2, 3]] * 2)
    assert p.index.dtype == torch.int64
    p.reset()
    assert p.is_identity


def test_permutation_is_a_checkpointed_buffer_not_a_parameter():
    p = Permutation(3)
    p.set([2, 0, 1])
    assert list(p.parameters()) == []
    state = p.state_dict()
    q = Permutation(3)
    q.load_state_dict(state)
    np.testing.assert_array_equal(q.get(), [[2, 0, 1]])


@pytest.mark.parametrize(
    "bad,match",
    [
        ([0, 0, 1, 2], "each index once"),
        ([0, 1, 2, 4], "each index once"),
        ([-1, 0, 1, 2], "each index once"),
        ([0, 1, 2], r"shape \(3,\)"),
        ([[0, 1, 2, 3]] * 3, r"must have shape \[2, 4\]"),
        ([[[0, 1, 2, 3]]], r"must have shape \[2, 4\]"),
        ([0.5, 1, 2, 3], "integers"),
        ([[0, 1, 2, 3], [1, 1, 2, 3]], "permutation row 1"),
    ],
)
def test_set_rejects_non_permutations_and_wrong_shapes(bad, match):
    p = Permutation(4, num_selectors=2)
    p.set([[3, 2, 1, 0], [1, 0, 3, 2]])
    with pytest.raises(ValueError, match=match):
        p.set(bad)
    np.testing.assert_array_equal(p.get(), [[3, 2, 1, 0], [1, 0, 3, 2]])  # unchanged after a failed set


def test_constructor_checks():
    with pytest.raises(ValueError, match="num_experts must be >= 2"):
        Permutation(1)
    with pytest.raises(ValueError, match="num_selectors must be >= 1"):
        Permutation(3, num_selectors=0)
    with pytest.raises(TypeError, match="num_experts must be an integer"):
        Permutation(3.0)


def test_check_and_invert_permutation():
    np.testing.assert_array_equal(check_permutation(torch.tensor([2, 0, 1]), 3), [2, 0, 1])
    with pytest.raises(ValueError, match="my_perm"):
        check_permutation([0, 0, 1], 3, name="my_perm")
    np.testing.assert_array_equal(check_permutation([1.0, 0.0], 2), [1, 0])  # whole floats are indices


@pytest.mark.parametrize("perm", [[True, False], torch.tensor([True, False]), ["1", "0"], [1 + 0j, 0j]])
def test_check_permutation_refuses_booleans_and_non_numbers_by_name(perm):
    """Regression: [True, False] was read as [1, 0], and strings failed inside numpy."""
    with pytest.raises(TypeError, match=r"my_perm must hold integers 0\.\.1, got an array of"):
        check_permutation(perm, 2, name="my_perm")


def test_invert_permutation():
    perms = torch.tensor([[2, 0, 1], [0, 1, 2], [1, 2, 0]])
    inv = invert_permutation(perms)
    torch.testing.assert_close(torch.gather(perms, 1, inv), torch.arange(3).expand(3, 3))
    torch.testing.assert_close(inv[0], torch.tensor([1, 2, 0]))


# ----------------------------------------------------------------------------- the convention
def test_plain_gate_convention_on_a_hand_example():
    """perm[i] = expert receiving gate weight i: g = (.1, .2, .7), perm = (2, 0, 1) -> w = (.2, .7, .1)."""
    p = Permutation(3)
    p.set([2, 0, 1])
    w = p.apply(plain([[0.1, 0.2, 0.7]]))
    torch.testing.assert_close(w, torch.tensor([[0.2, 0.7, 0.1]], dtype=torch.float64))


def test_per_selector_convention_on_a_hand_example():
    # Two one-hot selectors (slot 0 and slot 2) mixed 0.3 / 0.7.
    g = with_selectors([[[1.0, 0, 0], [0, 0, 1.0]]], [[0.3, 0.7]])
    p = Permutation(3, num_selectors=2)
    p.set([[1, 0, 2], [2, 0, 1]])  # selector 0: slot 0 -> expert 1; selector 1: slot 2 -> expert 1
    torch.testing.assert_close(p.apply(g), torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64))
    p.set([[1, 0, 2], [0, 2, 1]])  # selector 1: slot 2 -> expert 1 again
    torch.testing.assert_close(p.apply(g), torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64))
    p.set([[1, 0, 2], [0, 1, 2]])  # selector 1: slot 2 -> expert 2
    torch.testing.assert_close(p.apply(g), torch.tensor([[0.0, 0.3, 0.7]], dtype=torch.float64))
    # One row for a selector gate permutes the combined weights.
    one = Permutation(3)
    one.set([1, 0, 2])
    torch.testing.assert_close(one.apply(g), torch.tensor([[0.0, 0.3, 0.7]], dtype=torch.float64))


def test_apply_errors():
    g = plain([[0.5, 0.5, 0.0]])
    with pytest.raises(ValueError, match="weights over 3 experts but the permutation has 4"):
        apply_permutation(g, torch.arange(4).unsqueeze(0))
    with pytest.raises(ValueError, match="selector_weights and selector_mix"):
        apply_permutation(g, torch.arange(3).repeat(2, 1))
    gs = with_selectors([[[1.0, 0, 0], [0, 0, 1.0]]], [[0.3, 0.7]])
    with pytest.raises(ValueError, match="2 selectors but the permutation has 3 rows"):
        apply_permutation(gs, torch.arange(3).repeat(3, 1))


@SETTINGS
@given(perm=st.permutations(range(6)), seed=st.integers(0, 2**16))
def test_plain_apply_is_column_indexing_by_the_inverse(perm, seed):
    g = torch.rand(4, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    p = Permutation(6)
    p.set(perm)
    w = p.apply(plain(g))
    torch.testing.assert_close(w, g[:, np.argsort(perm)], rtol=0, atol=0)
    for i, e in enumerate(perm):
        torch.testing.assert_close(w[:, e], g[:, i], rtol=0, atol=0)


@SETTINGS
@given(rows=st.lists(st.permutations(range(5)), min_size=3, max_size=3), seed=st.integers(0, 2**16))
def test_per_selector_apply_moves_each_selector_separately(rows, seed):
    gen = torch.Generator().manual_seed(seed)
    sel = torch.softmax(torch.randn(4, 3, 5, generator=gen, dtype=torch.float64), dim=-1)
    mix = torch.softmax(torch.randn(4, 3, generator=gen, dtype=torch.float64), dim=-1)
    p = Permutation(5, num_selectors=3)
    p.set(rows)
    w = p.apply(with_selectors(sel, mix))
    expected = sum(mix[:, s : s + 1] * sel[:, s][:, np.argsort(rows[s])] for s in range(3))
    torch.testing.assert_close(w, expected, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(4, dtype=torch.float64))
    # Equal rows act like a single permutation of the combined weights.
    p.set(rows[0])
    torch.testing.assert_close(p.apply(with_selectors(sel, mix)), (mix.unsqueeze(2) * sel).sum(1)[:, np.argsort(rows[0])])


def test_apply_permutation_with_a_1d_index_is_one_permutation_of_the_weights():
    # Regression: a 1-D index [n] was read as n per-selector rows; for a gate with k = n selectors the
    # einsum broadcast selector 0's distribution and returned wrong weights without an error, and for
    # other gates it raised a misleading "per selector" error.
    from routing_search.gates import DSelectK, Softmax
    from routing_search.layers import apply_permutation

    torch.manual_seed(0)
    perm = torch.tensor([1, 0, 3, 2])
    for gate in (DSelectK(4, 4, 3), Softmax(4, 3)):
        out = gate(torch.randn(2, 3))
        expected = out.weights[:, torch.argsort(perm)]
        torch.testing.assert_close(apply_permutation(out, perm), expected)
        torch.testing.assert_close(apply_permutation(out, perm.unsqueeze(0)), expected)
    with pytest.raises(ValueError, match=r"shape \[S, n\]"):
        apply_permutation(out, perm.view(1, 1, 4))


def test_a_forward_under_inference_mode_does_not_break_later_training():
    # Regression: the inverse permutation cached during a torch.inference_mode() forward was an
    # inference tensor; the next forward with autograd failed ("Inference tensors cannot be saved for backward").
    from torch import nn

    from routing_search.gates import TopK
    from routing_search.layers import MoE

    torch.manual_seed(0)
    moe = MoE([nn.Linear(3, 2) for _ in range(4)], TopK(4, 2, 3))
    moe.permutation.set([1, 0, 3, 2])
    with torch.inference_mode():
        moe(torch.randn(5, 3))
    out = moe(torch.randn(5, 3))
    out.output.sum().backward()
    assert all(p.grad is not None for p in moe.gate.parameters())
