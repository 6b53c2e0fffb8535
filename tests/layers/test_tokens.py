"""Token-shaped input ``[batch, tokens, d]`` in the layers equals the flattened computation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from routing_search.layers import MoE, MultiGateMoE, make_experts

N, D, U = 4, 3, 2
BATCH, TOKENS = 3, 5


def side_inputs(kind: str, per_token: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    shape = (BATCH, TOKENS) if per_token else (BATCH,)
    if kind == "hash":
        return {"key": torch.randint(0, 3 * N, shape, generator=g)}
    if kind == "task_aware":
        return {"task": torch.randint(0, 2, shape, generator=g)}
    return {}


def flat(side: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v if v.dim() == 2 else v[:, None].expand(BATCH, TOKENS)).reshape(-1) for k, v in side.items()}


@pytest.mark.parametrize("kind", ["softmax", "topk2", "hash", "dselect", "comet", "task_aware"])
@pytest.mark.parametrize("dispatch", ["sparse", "dense"])
@pytest.mark.parametrize("per_token", [False, True])
def test_moe_on_tokens_equals_flattened_rows(make_gate, kind, dispatch, per_token) -> None:
    experts = make_experts(N, D, [5], U, generator=torch.Generator().manual_seed(1)).double()
    moe = MoE(experts, make_gate(kind, N, D), dispatch=dispatch).train()
    moe.permutation.set([2, 0, 3, 1])
    ref = copy.deepcopy(moe)
    x = torch.randn(BATCH, TOKENS, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    side = side_inputs(kind, per_token)
    out = moe(x, **side)
    expected = ref(x.reshape(-1, D), **flat(side))
    assert out.output.shape == (BATCH, TOKENS, U) and out.weights.shape == (BATCH, TOKENS, N)
    torch.testing.assert_close(out.output, expected.output.reshape(BATCH, TOKENS, U))
    torch.testing.assert_close(out.weights, expected.weights.reshape(BATCH, TOKENS, N))
    torch.testing.assert_close(out.gate_output.weights, expected.gate_output.weights.reshape(BATCH, TOKENS, N))
    (out.output.sum() + out.loss).backward()
    (expected.output.sum() + expected.loss).backward()
    for (name, p), q in zip(moe.named_parameters(), ref.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)
    torch.testing.assert_close(moe.expert_usage().hard, ref.expert_usage().hard)
    assert float(moe.usage.rows) == BATCH * TOKENS
    torch.testing.assert_close(moe.gate_outputs(x, **side)[0].weights, out.gate_output.weights)


@pytest.mark.parametrize("dispatch", ["auto", "sparse", "dense"])
def test_multigate_on_tokens_equals_flattened_rows(make_gate, dispatch) -> None:
    experts = make_experts(N, D, [5], U, generator=torch.Generator().manual_seed(1)).double()
    gates = [make_gate("topk2", N, D, seed=0), make_gate("dselect", N, D, seed=1)]
    towers = [nn.Linear(U, 1).double(), nn.Identity()]
    model = MultiGateMoE(experts, gates, towers, dispatch=dispatch).train()
    ref = copy.deepcopy(model)
    x = torch.randn(BATCH, TOKENS, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = model(x)
    expected = ref(x.reshape(-1, D))
    assert [tuple(o.shape) for o in out.outputs] == [(BATCH, TOKENS, 1), (BATCH, TOKENS, U)]
    for o, e in zip(out.outputs, expected.outputs):
        torch.testing.assert_close(o, e.reshape(o.shape))
    for w, e in zip(out.weights, expected.weights):
        torch.testing.assert_close(w, e.reshape(BATCH, TOKENS, N))
    torch.testing.assert_close(out.loss, expected.loss)
    assert out.usage(0).soft.shape == (N,)


def test_image_like_input_is_not_read_as_tokens(make_gate) -> None:
    moe = MoE(make_experts(N, D, [5], U).double(), make_gate("topk2", N, D))
    with pytest.raises(ValueError, match=r"\[batch, features\] or \[batch, tokens, features\], got shape \(2, 4, 5, 3\)"):
        moe(torch.zeros(2, 4, 5, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="got shape"):
        moe.gate(torch.zeros(2, 4, 5, D, dtype=torch.float64))
