"""Helpers shared by the gate tests (the tests are not a package: helpers are fixtures)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.func import functional_call

OutputsFn = Callable[..., tuple[torch.Tensor, ...]]


def all_outputs_of(gate: nn.Module, x: torch.Tensor) -> tuple[OutputsFn, tuple[torch.Tensor, ...]]:
    """A function of the gate's parameters returning every output (weights, selector weights, selector
    mix, loss) on ``x``, and a detached copy of the parameters requiring grad: the arguments of
    ``torch.autograd.gradcheck``."""
    names = [name for name, _ in gate.named_parameters()]

    def run(*params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = functional_call(gate, dict(zip(names, params)), (x,))
        return out.weights, out.selector_weights, out.selector_mix, out.loss

    return run, tuple(p.detach().clone().requires_grad_() for p in gate.parameters())


@pytest.fixture(scope="session")
def all_outputs() -> Callable[[nn.Module, torch.Tensor], tuple[OutputsFn, tuple[torch.Tensor, ...]]]:
    """The :func:`all_outputs_of` factory: ``run, params = all_outputs(gate, x)`` for gradcheck."""
    return all_outputs_of
