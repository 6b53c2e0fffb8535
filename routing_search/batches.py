"""Batch plumbing shared by the search and the trainer.

A *batch* is a pair ``(inputs, targets)``. ``inputs`` is the model's input tensor or a dict of its
keyword arguments (``{'x': x, 'task': t, 'key': k}`` or any names the user's model takes);
``targets`` is a tensor, or a list / tuple / dict of tensors (one per task). Every tensor with a batch
dimension has the same number of rows; 0-dim tensors and plain Python values pass through row
selection unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .layers.moe import MoEOutput
from .layers.multigate import MultiGateOutput

__all__ = [
    "as_batch",
    "call_model",
    "eval_mode",
    "num_rows",
    "take_rows",
    "tensors_of",
    "to_device",
    "unwrap_prediction",
]


def unwrap_prediction(out: Any) -> Any:
    """What the loss sees: ``.output`` of an MoE, ``.outputs`` of a multi-gate MoE, else the value itself."""
    if isinstance(out, MoEOutput):
        return out.output
    if isinstance(out, MultiGateOutput):
        return out.outputs
    return out


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a dict of keyword arguments, else ``model(inputs)``."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def tensors_of(obj: Any) -> list[torch.Tensor]:
    """Every tensor inside ``obj`` (a tensor, or nested lists / tuples / dicts of them)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in tensors_of(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in tensors_of(v)]
    return []


def num_rows(batch: tuple[Any, Any]) -> int:
    """Number of rows of a batch ``(inputs, targets)`` (the first dimension of its tensors)."""
    for t in tensors_of(batch[0]) + tensors_of(batch[1]):
        if t.dim() > 0:
            return int(t.shape[0])
    raise ValueError("the batch holds no tensor with a batch dimension")


def take_rows(obj: Any, rows: torch.Tensor) -> Any:
    """Select rows of a tensor, or of every tensor in a list/tuple/dict (other values pass through)."""
    if isinstance(obj, torch.Tensor):
        return obj.index_select(0, rows.to(obj.device)) if obj.dim() > 0 else obj
    if isinstance(obj, Mapping):
        return {key: take_rows(value, rows) for key, value in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(take_rows(v, rows) for v in obj)
    return obj


def to_device(obj: Any, device: torch.device | str) -> Any:
    """Move every tensor inside ``obj`` to ``device`` (other values pass through)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def as_batch(data: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` from a pair or an iterable of pairs (concatenated along the rows)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data[0], (tuple, list)):
        return data[0], data[1]
    if isinstance(data, Mapping):
        raise TypeError("data must be (inputs, targets) or an iterable of such pairs, got a mapping")
    try:
        batches = list(data)
    except TypeError:
        raise TypeError(f"data must be (inputs, targets) or an iterable of such pairs, got {type(data).__name__}") from None
    if not batches or not all(isinstance(b, (tuple, list)) and len(b) == 2 for b in batches):
        raise TypeError("data must be (inputs, targets) or a non-empty iterable of (inputs, targets) pairs")
    return _concat([b[0] for b in batches]), _concat([b[1] for b in batches])


def _concat(items: Sequence[Any]) -> Any:
    first = items[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(items), dim=0)
    if isinstance(first, Mapping):
        return {key: _concat([it[key] for it in items]) if first[key] is not None and not isinstance(first[key], int) else first[key] for key in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_concat([it[i] for it in items]) for i in range(len(first)))
    raise TypeError(f"cannot concatenate batches of type {type(first).__name__}")


@contextlib.contextmanager
def eval_mode(model: nn.Module, modules: Sequence[nn.Module] | None = None) -> Iterator[None]:
    """Put every submodule in eval mode (dropout off, no noisy gating) and restore each one's mode after.

    ``modules`` may pass ``list(model.modules())`` computed once, for callers on a hot path.
    """
    modes = [(m, m.training) for m in (model.modules() if modules is None else modules)]
    if not any(mode for _, mode in modes):
        yield  # already in eval mode: nothing to toggle (this runs once per candidate chunk)
        return
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
