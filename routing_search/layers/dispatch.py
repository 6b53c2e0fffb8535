"""Combining expert outputs with expert-space weights: dense and sparse dispatch.

Both functions compute ``y_b = Σ_e w[b, e] · expert_e(x_b)`` for one or several weight matrices over
the same experts (several tasks share the experts in a multi-gate MoE). The sparse path runs each
expert only on the rows where some weight matrix gives it a non-zero weight; the dense path runs every
expert on every row and is kept for soft gates. They agree to floating-point rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["all_expert_outputs", "combine_dense", "combine_sparse", "choose_dispatch"]

DISPATCH_MODES = ("auto", "sparse", "dense")


def all_expert_outputs(experts: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Every expert on every row: ``[batch, num_experts, *out]``."""
    return torch.stack([expert(x) for expert in experts], dim=1)


def combine_dense(experts: Sequence[nn.Module], x: torch.Tensor, weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Mixtures for each weight matrix ``[batch, n]`` by running all experts on all rows."""
    outputs = all_expert_outputs(experts, x)
    flat = outputs.reshape(outputs.shape[0], outputs.shape[1], -1)
    mixed = [torch.einsum("bn,bnu->bu", w.to(flat.dtype), flat).reshape(outputs.shape[:1] + outputs.shape[2:]) for w in weights]
    return mixed


def combine_sparse(experts: Sequence[nn.Module], x: torch.Tensor, weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Mixtures for each weight matrix, running each expert only on the rows that use it."""
    batch = x.shape[0]
    if batch == 0:
        return combine_dense(experts, x, weights)
    stacked = torch.stack(list(weights), dim=0)  # [T, B, n]
    used = (stacked != 0).any(dim=0)  # [B, n]
    # One host sync for all experts: (expert, row) pairs sorted by expert.
    pairs = used.t().nonzero()
    counts = torch.bincount(pairs[:, 0], minlength=len(experts)).tolist()
    rows_per_expert = torch.split(pairs[:, 1], counts)
    results: list[torch.Tensor | None] = [None] * len(weights)
    for e, (expert, rows) in enumerate(zip(experts, rows_per_expert)):
        if rows.numel() == 0:
            continue
        out_e = expert(x.index_select(0, rows))
        flat_e = out_e.reshape(out_e.shape[0], -1)
        for t in range(len(weights)):
            w_e = stacked[t].index_select(0, rows)[:, e].to(flat_e.dtype)
            contrib = w_e.unsqueeze(1) * flat_e
            if results[t] is None:
                results[t] = flat_e.new_zeros((batch, flat_e.shape[1]))
                out_shape = out_e.shape[1:]
            results[t] = results[t].index_add(0, rows, contrib)
    if all(r is None for r in results):  # no weight anywhere (only an off-protocol gate): all mixtures are 0
        return combine_dense(experts, x, weights)
    template = next(r for r in results if r is not None)
    return [(template.new_zeros(template.shape) if r is None else r).reshape((batch,) + tuple(out_shape)) for r in results]


def choose_dispatch(mode: str, weights: Sequence[torch.Tensor], *, max_density: float = 0.5) -> str:
    """Resolve ``'auto'``: sparse when at most ``max_density`` of the (row, expert) pairs are used."""
    if mode != "auto":
        return mode
    used = torch.stack(list(weights), dim=0).ne(0).any(dim=0)
    return "sparse" if float(used.float().mean()) <= max_density else "dense"
