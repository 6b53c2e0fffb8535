"""The gate protocol shared by every gate, built-in or user-written.

A gate is a ``torch.nn.Module`` with an integer attribute ``num_experts`` whose call
``gate(x, task=None, key=None)`` returns a :class:`GateOutput`. Gates that do not use ``task`` or
``key`` ignore them, so layers can pass both uniformly.

Gates built from ``k`` selectors or trees (DSelect-k, COMET) also set ``num_selectors = k`` and fill
``selector_weights`` / ``selector_mix`` so that a permutation can act on each selector separately.

Optional attributes a gate may set (read through the helpers here, which supply the defaults):

``num_selectors`` (int, default 1)
    See above; read with :func:`num_selectors_of`.
``zeros_carry_gradient`` (bool, default False)
    True when an exact zero in ``weights`` can still carry gradient to the gate's parameters (e.g. a
    straight-through estimator such as ``GumbelSoftmax(hard=True)``). Sparse dispatch never runs an
    expert on a row whose weight is exactly zero, so it would drop that gradient: layers with
    ``dispatch='auto'`` use dense dispatch for such gates while gradients are recorded. Read with
    :func:`zeros_carry_gradient`; a gate may make it a property (e.g. depending on ``hard``). A gate
    that wraps other gates carries gradient through zeros when any gate inside it does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from .._validation import check_input, check_int, check_positive_float

__all__ = [
    "GateOutput",
    "Gate",
    "BaseGate",
    "WeightSchedule",
    "resolve_weight",
    "check_gate",
    "check_weight_schedule",
    "num_selectors_of",
    "zeros_carry_gradient",
    "entropy",
]

# A regulariser weight: a constant, or a function of the number of training calls made so far.
WeightSchedule = float | Callable[[int], float]


@dataclass
class GateOutput:
    """What a gate returns.

    Attributes:
        weights: ``[batch, num_experts]``; every row on the probability simplex with exact zeros off
            the support.
        loss: 0-dim tensor holding the gate's regularisers / auxiliary losses, already weighted.
        selector_weights: ``[batch, k, num_experts]`` per-selector distributions (selector gates only).
        selector_mix: ``[batch, k]`` mixing weights of the selectors (selector gates only), such that
            ``weights = einsum('bk,bkn->bn', selector_mix, selector_weights)``.
    """

    weights: torch.Tensor
    loss: torch.Tensor
    selector_weights: torch.Tensor | None = None
    selector_mix: torch.Tensor | None = None

    @property
    def has_selectors(self) -> bool:
        """True when the gate returned per-selector distributions and their mixing weights."""
        return self.selector_weights is not None and self.selector_mix is not None


@runtime_checkable
class Gate(Protocol):
    """Structural type of a gate: ``num_experts`` and a call returning :class:`GateOutput`."""

    num_experts: int

    def __call__(
        self, x: torch.Tensor, task: torch.Tensor | int | None = None, key: torch.Tensor | None = None
    ) -> GateOutput: ...


def num_selectors_of(gate: nn.Module) -> int:
    """Number of selectors a gate exposes for per-selector permutations (1 for plain gates)."""
    return int(getattr(gate, "num_selectors", 1))


def zeros_carry_gradient(gate: nn.Module) -> bool:
    """True when ``gate`` (or a gate inside it) declares ``zeros_carry_gradient = True``.

    Such a gate's exact zeros still carry gradient, so sparse dispatch would drop part of its gradient.

    >>> from torch import nn
    >>> zeros_carry_gradient(nn.Linear(2, 2))
    False
    """
    return any(bool(getattr(m, "zeros_carry_gradient", False)) for m in gate.modules())


def check_gate(gate: Any, *, name: str = "gate") -> nn.Module:
    """Check that ``gate`` follows the protocol well enough to be used by layers and searches."""
    if not isinstance(gate, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module following the gate protocol, got {type(gate).__name__}")
    n = getattr(gate, "num_experts", None)
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise TypeError(f"{name} must have an integer attribute num_experts >= 2, got {n!r}")
    k = num_selectors_of(gate)
    if k < 1:
        raise ValueError(f"{name}.num_selectors must be >= 1, got {k}")
    return gate


def entropy(p: torch.Tensor, dim: int = -1, eps: float = 1e-6) -> torch.Tensor:
    """Shannon entropy along ``dim`` with ``eps`` inside the log (as in the official DSelect-k code)."""
    return -(p * torch.log(p + eps)).sum(dim=dim)


def resolve_weight(weight: WeightSchedule, calls: int) -> float:
    """Value of a constant or scheduled regulariser weight after ``calls`` training calls."""
    value = weight(calls) if callable(weight) else weight
    return float(value)


class BaseGate(nn.Module):
    """Convenience base for built-in gates: input checking and a training-call counter.

    Subclasses implement ``forward(x, task=None, key=None) -> GateOutput``. The counter ``calls``
    (a buffer, so it is saved in checkpoints) drives regulariser schedules; it advances once per call
    in training mode.
    """

    num_experts: int
    num_selectors: int = 1
    #: See the module docstring; subclasses with straight-through zeros set it (or a property) to True.
    zeros_carry_gradient: bool = False

    def __init__(self, num_experts: int, input_dim: int | None, *, validate: bool = True) -> None:
        super().__init__()
        self.num_experts = check_int("num_experts", num_experts, minimum=2)
        self.input_dim = None if input_dim is None else check_int("input_dim", input_dim, minimum=1)
        self.validate = bool(validate)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    @property
    def is_static(self) -> bool:
        """True when the gate ignores the input (same weights for every example)."""
        return self.input_dim is None

    def _check_x(self, x: torch.Tensor) -> torch.Tensor:
        # A static gate only needs the batch size, so any width is accepted.
        return check_input(x, self.input_dim, validate=self.validate)

    def _tick(self) -> int:
        """Return the number of training calls so far and advance the counter when training."""
        calls = int(self.calls)
        if self.training:
            self.calls += 1
        return calls

    def _zero_loss(self, like: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), dtype=like.dtype, device=like.device)


def check_weight_schedule(name: str, weight: WeightSchedule) -> WeightSchedule:
    """Accept a non-negative constant or a callable schedule."""
    if callable(weight):
        return weight
    return check_positive_float(name, weight, allow_zero=True)
