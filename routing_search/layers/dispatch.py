"""Combining expert outputs with expert-space weights: dense and sparse dispatch.

Both functions compute ``y_b = Σ_e w[b, e] · expert_e(x_b)`` for one or several weight matrices over
the same experts (several tasks share the experts in a multi-gate MoE). The sparse path runs each
expert only on the rows where some weight matrix gives it a non-zero weight; the dense path runs every
expert on every row and is kept for soft gates. They agree to floating-point rounding when each expert
treats rows independently.

Two things make sparse dispatch differ from dense, and :func:`choose_dispatch` handles both:

* experts whose output or state depends on the other rows of the batch (:func:`depends_on_batch`:
  BatchNorm in training mode, InstanceNorm updating running statistics, or any module with
  ``batch_dependent = True``): sparse dispatch would normalise each expert over only its own rows
  (and fail on a single row). ``'auto'`` runs dense for them; ``'sparse'`` refuses.
* gates whose exact zeros carry gradient (``zeros_carry_gradient``, e.g. ``GumbelSoftmax(hard=True)``):
  sparse dispatch drops that gradient. ``'auto'`` runs dense while gradients are recorded;
  ``'sparse'`` warns.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from ..gates.protocol import zeros_carry_gradient

__all__ = [
    "DISPATCH_MODES",
    "Experts",
    "all_expert_outputs",
    "as_expert_list",
    "combine",
    "combine_dense",
    "combine_sparse",
    "choose_dispatch",
    "depends_on_batch",
]

DISPATCH_MODES = ("auto", "sparse", "dense")

#: Experts as a list or ``nn.ModuleList`` (which typing does not count as a ``Sequence``).
Experts = Sequence[nn.Module] | nn.ModuleList

_BATCH_NORMS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
    nn.SyncBatchNorm,
)
_INSTANCE_NORMS = (
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LazyInstanceNorm1d,
    nn.LazyInstanceNorm2d,
    nn.LazyInstanceNorm3d,
)


def depends_on_batch(module: nn.Module) -> bool:
    """True when ``module`` (or a submodule) computes with statistics of the whole batch right now.

    That is: a BatchNorm in training mode or without running statistics, an InstanceNorm updating
    running statistics (training mode with ``track_running_stats``), or any module with the attribute
    ``batch_dependent = True`` (set it on your own batch-dependent modules).

    >>> expert = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU())
    >>> depends_on_batch(expert), depends_on_batch(expert.eval())
    (True, False)
    """
    for m in module.modules():
        if isinstance(m, _BATCH_NORMS):
            if m.training or m.running_mean is None:
                return True
        elif isinstance(m, _INSTANCE_NORMS):
            if m.training and m.track_running_stats:
                return True
        # Read the flag without Module.__getattr__ (slow for a missing attribute): instance, then class.
        if m.__dict__.get("batch_dependent", getattr(type(m), "batch_dependent", False)):
            return True
    return False


def as_expert_list(experts: Experts, name: str = "experts") -> nn.ModuleList:
    """The experts as an ``nn.ModuleList`` after checking they are a non-empty sequence of modules."""
    if isinstance(experts, nn.Module) and not isinstance(experts, nn.ModuleList):
        raise TypeError(f"{name} must be a sequence of nn.Module experts (e.g. a list or nn.ModuleList), got one module")
    experts = list(experts)
    if not experts or not all(isinstance(e, nn.Module) for e in experts):
        raise TypeError(f"{name} must be a non-empty sequence of nn.Module experts")
    return nn.ModuleList(experts)


def all_expert_outputs(experts: Experts, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every row: ``[batch, num_experts, *out]``."""
    return torch.stack([expert(x) for expert in experts], dim=1)


def combine_dense(experts: Experts, x: torch.Tensor, weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Mixtures for each weight matrix ``[batch, n]`` by running all experts on all rows."""
    outputs = all_expert_outputs(experts, x)
    batch, n, out_shape = outputs.shape[0], outputs.shape[1], tuple(outputs.shape[2:])
    flat = outputs.reshape(batch, n, math.prod(out_shape))  # explicit width: also right for 0 rows
    return [torch.einsum("bn,bnu->bu", w.to(flat.dtype), flat).reshape((batch,) + out_shape) for w in weights]


def combine_sparse(experts: Experts, x: torch.Tensor, weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Mixtures for each weight matrix, running each expert only on the rows that use it.

    One host synchronisation and a fixed number of gather/scatter operations for all experts and all
    weight matrices: the used (expert, row) pairs are gathered in one ``index_select``, each expert runs
    on its contiguous slice, and the weighted outputs of every matrix are added back in one
    ``index_add_``.
    """
    batch = x.shape[0]
    if batch == 0:
        return combine_dense(experts, x, weights)
    n = len(experts)
    stacked = torch.stack(list(weights), dim=0)  # [T, B, n]
    used = stacked[0] != 0 if stacked.shape[0] == 1 else (stacked != 0).any(dim=0)  # [B, n]
    pairs = used.t().nonzero()  # (expert, row), sorted by expert
    if pairs.shape[0] == 0:  # no weight anywhere (only an off-protocol gate): all mixtures are 0
        return combine_dense(experts, x, weights)
    expert_of, rows = pairs[:, 0], pairs[:, 1]
    counts = torch.bincount(expert_of, minlength=n).tolist()  # the one host synchronisation
    chunks = x.index_select(0, rows).split(counts)
    outs = [expert(chunk) for expert, chunk, c in zip(experts, chunks, counts) if c]
    out_shape = tuple(outs[0].shape[1:])
    flat = torch.cat([o.reshape(o.shape[0], -1) for o in outs])  # [P, u], pairs in order
    # Weight of each pair under every matrix, [P, T]; contributions laid out [P, T * u] so that one
    # index_add_ along rows (the fast path) accumulates every matrix at once.
    tasks = stacked.shape[0]
    pair_weights = stacked.reshape(tasks, batch * n).index_select(1, rows * n + expert_of).to(flat.dtype).t()
    contrib = (pair_weights.unsqueeze(2) * flat.unsqueeze(1)).reshape(flat.shape[0], tasks * flat.shape[1])
    mixed = flat.new_zeros((batch, tasks * flat.shape[1])).index_add_(0, rows, contrib)
    return list(mixed.reshape((batch, tasks) + out_shape).unbind(1))


def choose_dispatch(
    mode: str,
    weights: Sequence[torch.Tensor],
    *,
    max_density: float = 0.5,
    experts: Experts = (),
    gates: Sequence[nn.Module] = (),
) -> str:
    """Resolve the dispatch mode to ``'sparse'`` or ``'dense'`` for this call.

    ``'auto'`` is dense when an expert :func:`depends_on_batch`, when a gate's zeros carry gradient
    (:func:`~routing_search.gates.protocol.zeros_carry_gradient`) while gradients are recorded, or when
    more than ``max_density`` of the (row, expert) pairs are used; sparse otherwise. ``'sparse'`` with a
    batch-dependent expert raises ``ValueError`` (each expert would normalise over only its own rows);
    with a gate whose zeros carry gradient it warns (that gradient is dropped).
    """
    if mode == "dense":
        return mode
    if mode == "auto":
        # Dense whenever the weights are too dense: then the (Python-heavy) module scans below cannot
        # change the answer and are skipped.
        used = weights[0].ne(0)
        for w in weights[1:]:
            used = used.logical_or_(w.ne(0))
        if not float(used.float().mean()) <= max_density:  # also NaN (no rows): dense, as before
            return "dense"
    batch_dependent = any(depends_on_batch(e) for e in experts)
    grad_through_zeros = torch.is_grad_enabled() and any(w.requires_grad for w in weights) and any(
        zeros_carry_gradient(g) for g in gates
    )
    if mode == "sparse":
        if batch_dependent:
            raise ValueError(
                "dispatch='sparse' runs each expert on only the rows routed to it, so an expert whose output "
                "depends on the batch (BatchNorm in training mode, or batch_dependent=True) would normalise "
                "over a different set of rows than dense dispatch (and fail on a single row); use "
                "dispatch='auto' or 'dense' while training, or put the experts in eval mode"
            )
        if grad_through_zeros:
            warnings.warn(
                "dispatch='sparse' with a gate whose exact zeros carry gradient (zeros_carry_gradient, e.g. "
                "GumbelSoftmax(hard=True)) drops that part of the gate's gradient; use dispatch='auto' or "
                "'dense' for the full straight-through gradient",
                UserWarning,
                stacklevel=3,
            )
        return mode
    if mode != "auto":
        return mode
    return "dense" if batch_dependent or grad_through_zeros else "sparse"


def combine(
    mode: str,
    experts: Experts,
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    *,
    gates: Sequence[nn.Module] = (),
) -> list[torch.Tensor]:
    """Mixtures for each weight matrix with dispatch ``mode`` resolved by :func:`choose_dispatch`."""
    resolved = choose_dispatch(mode, weights, experts=experts, gates=gates)
    return combine_sparse(experts, x, weights) if resolved == "sparse" else combine_dense(experts, x, weights)
