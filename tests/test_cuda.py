"""CUDA paths against the CPU reference (skipped without a CUDA device; select with -m gpu)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from routing_search import COMET, DSelectK, MoE, MultiGateMoE, TopK, fit, local_search, make_experts
from routing_search.layers import MLP
from routing_search.training import multitask_loss

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def mse_rows(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((pred - y) ** 2).mean(dim=1)


@pytest.mark.parametrize("make_gate", [lambda: TopK(num_experts=6, k=2, input_dim=4), lambda: DSelectK(num_experts=6, k=2, input_dim=4)])
@pytest.mark.parametrize("dispatch", ["sparse", "dense"])
def test_moe_on_cuda_equals_cpu(make_gate, dispatch):
    torch.manual_seed(0)
    cpu = MoE(make_experts(6, 4, [8], 3), make_gate(), dispatch=dispatch).double().eval()
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(64, 4, dtype=torch.float64)
    torch.testing.assert_close(gpu(x.cuda()).output.cpu(), cpu(x).output)


def test_local_search_on_cuda_equals_cpu():
    torch.manual_seed(1)
    experts = make_experts(6, 4, [8], 1)
    cpu = MultiGateMoE(experts, [COMET(num_experts=6, k=2, input_dim=4), TopK(num_experts=6, k=2, input_dim=4)],
                       [MLP(1, [4], 1), MLP(1, [4], 1)]).double()
    gpu = copy.deepcopy(cpu).cuda()
    x, y = torch.randn(128, 4, dtype=torch.float64), torch.randn(128, 2, dtype=torch.float64)
    loss = multitask_loss(["mse", "mse"])
    a = local_search(cpu, (x, y), loss, "swap")
    b = local_search(gpu, (x.cuda(), y.cuda()), loss, "swap")
    assert all(np.array_equal(p, q) for p, q in zip(a.x, b.x))
    assert b.fun == pytest.approx(a.fun, rel=1e-9)


def test_fit_with_search_on_cuda_runs_and_never_worsens_the_search_loss():
    torch.manual_seed(2)
    model = MoE(make_experts(4, 4, [8], 2), TopK(num_experts=4, k=2, input_dim=4))
    x, y = torch.randn(256, 4), torch.randn(256, 2)
    result = fit(model, (x[:192], y[:192]), mse_rows, val_data=(x[192:], y[192:]), epochs=2, batch_size=64,
                 search={}, device="cuda", progress=False)
    assert next(model.parameters()).is_cuda
    assert all(s["fun"] <= s["fun0"] for s in result.history.searches)
