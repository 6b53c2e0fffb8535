"""The logits of the simple gates: a learned vector (static gate) or a linear map of the input."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["make_router", "router_logits"]


def make_router(input_dim: int | None, static_init: torch.Tensor) -> tuple[nn.Parameter | None, nn.Linear | None]:
    """``(logits, router)``: a static logits vector when ``input_dim`` is None, else ``nn.Linear(input_dim, n)``."""
    if input_dim is None:
        return nn.Parameter(static_init), None
    return None, nn.Linear(input_dim, static_init.shape[0])


def router_logits(logits: nn.Parameter | None, router: nn.Linear | None, x: torch.Tensor) -> torch.Tensor:
    """Logits ``[batch, n]``: the router applied to ``x``, or the static vector broadcast over the batch."""
    if router is not None:
        return router(x)
    assert logits is not None
    return logits.unsqueeze(0).expand(x.shape[0], -1)
