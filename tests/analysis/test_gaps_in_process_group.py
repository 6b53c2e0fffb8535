"""Model-level analysis is a single-process computation, also inside an initialised process group."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from routing_search.analysis import frozen_arrays, optimality_gap
from routing_search.gates import Softmax
from routing_search.layers import MoE, make_experts
from routing_search.losses import mse_loss




def _case() -> tuple[MoE, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(3)  # the gate's own initialisation
    g = torch.Generator().manual_seed(3)
    model = MoE(make_experts(4, 3, [5], 2, generator=g), Softmax(4, 3), per_selector=False).double()
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    return model, (x, torch.randn(40, 2, generator=g, dtype=torch.float64))


def _analyses() -> tuple:
    model, data = _case()
    return (
        frozen_arrays(model, data),
        optimality_gap(model, data, mse_loss, kind="permutation", method="exhaustive"),
        optimality_gap(model, data, mse_loss, kind="permutation", method="ils", rng=0),
    )


@pytest.fixture
def alone() -> tuple:
    """The analyses in a plain process (computed before the group fixture starts)."""
    assert not dist.is_initialized()
    return _analyses()


@pytest.mark.multiprocess
def test_frozen_arrays_and_gaps_inside_a_group_equal_a_plain_process(alone, group_of_one) -> None:
    (G0, W0, F0), gap0, ils0 = alone
    (G, W, F), gap, ils = _analyses()
    np.testing.assert_array_equal(G, G0)
    np.testing.assert_array_equal(W, W0)
    np.testing.assert_array_equal(F, F0)
    assert gap.optimum == gap0.optimum and gap.fun == gap0.fun
    assert ils.optimum == ils0.optimum
