"""Model-level analysis is a single-process computation, also inside an initialised process group."""

from __future__ import annotations

import socket
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist

from routing_search.analysis import frozen_arrays, optimality_gap
from routing_search.gates import Softmax
from routing_search.layers import MoE, make_experts
from routing_search.losses import mse_loss


@pytest.fixture
def group_of_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=timedelta(seconds=60))
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _case() -> tuple[MoE, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    model = MoE(make_experts(4, 3, [5], 2, generator=g), Softmax(4, 3), per_selector=False).double()
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    return model, (x, torch.randn(40, 2, generator=g, dtype=torch.float64))


@pytest.mark.multiprocess
def test_frozen_arrays_and_gaps_inside_a_group_equal_a_plain_process(group_of_one) -> None:
    model, data = _case()
    G, W, F = frozen_arrays(model, data)
    gap = optimality_gap(model, data, mse_loss, kind="permutation", method="exhaustive")
    ils = optimality_gap(model, data, mse_loss, kind="permutation", method="ils", rng=0)
    dist.destroy_process_group()
    try:
        G0, W0, F0 = frozen_arrays(model, data)
        gap0 = optimality_gap(model, data, mse_loss, kind="permutation", method="exhaustive")
        ils0 = optimality_gap(model, data, mse_loss, kind="permutation", method="ils", rng=0)
    finally:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=timedelta(seconds=60))
    np.testing.assert_array_equal(G, G0)
    np.testing.assert_array_equal(W, W0)
    np.testing.assert_array_equal(F, F0)
    assert gap.optimum == gap0.optimum and gap.fun == gap0.fun
    assert ils.optimum == ils0.optimum
