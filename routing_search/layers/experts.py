"""Ready-made expert and tower networks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._validation import check_int, check_positive_float

__all__ = ["MLP", "make_experts"]


class MLP(nn.Sequential):
    """``Linear → ReLU → (Dropout) → … → Linear``; ``hidden`` may be empty for a linear map."""

    def __init__(self, input_dim: int, hidden: Sequence[int], output_dim: int, *, dropout: float = 0.0) -> None:
        check_int("input_dim", input_dim, minimum=1)
        check_int("output_dim", output_dim, minimum=1)
        dropout = check_positive_float("dropout", dropout, allow_zero=True)
        if dropout >= 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        width = input_dim
        for h in hidden:
            check_int("hidden width", h, minimum=1)
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, output_dim))
        super().__init__(*layers)


def make_experts(
    num_experts: int,
    input_dim: int,
    hidden: Sequence[int],
    output_dim: int,
    *,
    dropout: float = 0.0,
    generator: torch.Generator | None = None,
) -> nn.ModuleList:
    """``num_experts`` independent :class:`MLP` experts (seeded through ``generator`` when given)."""
    check_int("num_experts", num_experts, minimum=1)
    experts = nn.ModuleList(MLP(input_dim, hidden, output_dim, dropout=dropout) for _ in range(num_experts))
    if generator is not None:
        with torch.no_grad():
            for p in experts.parameters():
                bound = 1.0 / max(1, p.shape[-1]) ** 0.5
                p.copy_(torch.rand(p.shape, generator=generator) * 2 * bound - bound)
    return experts
