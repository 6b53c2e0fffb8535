"""The logits of the simple gates: a learned vector (static gate) or a linear map of the input."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["make_router", "router_logits", "check_input_dtype"]


def make_router(input_dim: int | None, static_init: torch.Tensor) -> tuple[nn.Parameter | None, nn.Linear | None]:
    """``(logits, router)``: a static logits vector when ``input_dim`` is None, else ``nn.Linear(input_dim, n)``."""
    if input_dim is None:
        return nn.Parameter(static_init), None
    return None, nn.Linear(input_dim, static_init.shape[0])


def check_input_dtype(x: torch.Tensor, weight: torch.Tensor, gate: nn.Module, *, name: str = "x") -> None:
    """Refuse an input whose floating dtype differs from the gate's parameters, naming both dtypes.

    Gates never cast silently: a float64 batch fed to a float32 gate would otherwise fail inside a
    matrix product with a message that names neither the argument nor the gate.

    >>> gate = nn.Linear(3, 2)
    >>> check_input_dtype(torch.zeros(1, 3, dtype=torch.float64), gate.weight, gate)
    Traceback (most recent call last):
    ...
    TypeError: x has dtype torch.float64 but the gate Linear has dtype torch.float32; cast the input (x.to(torch.float32)) or the gate (gate.to(torch.float64))
    """
    if x.dtype != weight.dtype:
        raise TypeError(
            f"{name} has dtype {x.dtype} but the gate {type(gate).__name__} has dtype {weight.dtype}; "
            f"cast the input ({name}.to({weight.dtype})) or the gate (gate.to({x.dtype}))"
        )


def router_logits(
    logits: nn.Parameter | None, router: nn.Linear | None, x: torch.Tensor, *, gate: nn.Module | None = None
) -> torch.Tensor:
    """Logits ``[batch, n]``: the router applied to ``x``, or the static vector broadcast over the batch.

    ``gate`` (the module that owns the router) only names the gate in the dtype error.
    """
    if router is not None:
        check_input_dtype(x, router.weight, router if gate is None else gate)
        return router(x)
    assert logits is not None
    return logits.unsqueeze(0).expand(x.shape[0], -1)
