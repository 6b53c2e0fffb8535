"""The annealing-and-rounding schedule of learned Sinkhorn permutations (COMET+), for any training loop.

Call :func:`anneal_sinkhorn` once at the start of every epoch (schedule step): each
:class:`~routing_search.search.SinkhornPermutation` in the model gets the temperature and iteration count of
that step while ``epoch < anneal_steps``; at ``epoch == anneal_steps`` it is rounded to a hard permutation
(Hungarian) and frozen. Frozen modules are left alone, so the call is idempotent per epoch and safe to
repeat after a resume. :func:`~routing_search.training.fit` calls it for you.

Example (your own loop)::

    for epoch in range(epochs):
        events = anneal_sinkhorn(model, epoch)
        for x, y in loader:
            ...  # ordinary training steps
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .._validation import check_int
from ..search.sinkhorn import sinkhorn_modules

__all__ = ["anneal_sinkhorn"]


def anneal_sinkhorn(model: nn.Module, epoch: int, *, process_group: Any = None) -> list[dict[str, Any]]:
    """Anneal (``set_progress(epoch)``) or round (once, at ``epoch >= anneal_steps``) every learned permutation.

    Args:
        model: any module; every :class:`~routing_search.search.SinkhornPermutation` inside is scheduled.
        epoch: the schedule step (0-based), normally the epoch about to start.
        process_group: as for :meth:`~routing_search.search.SinkhornPermutation.round_`: under a process
            group rank 0 rounds and every rank freezes its permutation (every rank calls this at the same epoch).

    Returns:
        One event per module not frozen before the call: ``{'epoch', 'module', 'event': 'progress',
        'tau', 'iters'}`` or ``{'epoch', 'module', 'event': 'round', 'permutation'}`` (the module's
        name in ``model``; ``''`` for the model itself).

    Example:
        >>> import torch
        >>> from routing_search import MoE, Softmax, SinkhornPermutation
        >>> gate = SinkhornPermutation(Softmax(3), anneal_steps=2, generator=torch.Generator().manual_seed(0))
        >>> moe = MoE([torch.nn.Linear(2, 1) for _ in range(3)], gate)
        >>> [e["event"] for epoch in range(3) for e in anneal_sinkhorn(moe, epoch)]
        ['progress', 'progress', 'round']
        >>> anneal_sinkhorn(moe, 3)
        []
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    epoch = check_int("epoch", epoch, minimum=0)
    names = {id(m): name for name, m in model.named_modules()}
    events: list[dict[str, Any]] = []
    for module in sinkhorn_modules(model):
        if module.frozen:
            continue
        name = names[id(module)]
        if epoch < module.anneal_steps:
            module.set_progress(epoch)
            events.append({"epoch": epoch, "module": name, "event": "progress", "tau": float(module.tau), "iters": int(module.num_iters)})
        else:
            perm = module.round_(process_group=process_group)
            events.append({"epoch": epoch, "module": name, "event": "round", "permutation": [int(v) for v in perm]})
    return events
