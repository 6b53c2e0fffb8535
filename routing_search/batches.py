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

import numpy as np
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
    """``(inputs, targets)`` from a pair or an iterable of pairs (concatenated along the rows).

    Tensors are concatenated. A plain value (an ``int`` task index, a 0-dim tensor) that is the same in
    every batch is kept as it is; integers or 0-dim tensors that differ between batches become one entry
    per row (e.g. ``task=0`` for a batch of 3 rows and ``task=1`` for 2 rows: ``tensor([0, 0, 0, 1, 1])``).
    """
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
    if len(batches) == 1:
        return batches[0][0], batches[0][1]
    rows = [num_rows((b[0], b[1])) for b in batches]
    devices = [next(iter(tensors_of(b[0]) + tensors_of(b[1]))).device for b in batches]
    return _concat([b[0] for b in batches], rows, devices, "inputs"), _concat([b[1] for b in batches], rows, devices, "targets")


def _concat(items: Sequence[Any], rows: Sequence[int], devices: Sequence[torch.device], where: str) -> Any:
    first = items[0]
    if isinstance(first, torch.Tensor) and first.dim() > 0:
        if not all(isinstance(it, torch.Tensor) and it.dim() > 0 for it in items):
            raise TypeError(f"{where}: a tensor with rows in one batch but not in another; batches must have the same structure")
        return torch.cat(list(items), dim=0)
    if isinstance(first, Mapping):
        keys = list(first)
        if not all(isinstance(it, Mapping) and list(it) == keys for it in items):
            raise TypeError(f"{where}: the batches' dicts have different keys; every batch must have keys {keys}")
        return {key: _concat([it[key] for it in items], rows, devices, f"{where}[{key!r}]") for key in keys}
    if isinstance(first, (tuple, list)):
        if not all(type(it) is type(first) and len(it) == len(first) for it in items):
            raise TypeError(f"{where}: the batches' sequences differ in type or length; batches must have the same structure")
        return type(first)(_concat([it[i] for it in items], rows, devices, f"{where}[{i}]") for i in range(len(first)))
    return _concat_plain(items, rows, devices, where)


def _concat_plain(items: Sequence[Any], rows: Sequence[int], devices: Sequence[torch.device], where: str) -> Any:
    """Values without rows: kept when equal in every batch, else integers / 0-dim tensors become per-row tensors."""
    first = items[0]
    if first is None or isinstance(first, (str, bytes)):
        if all(it == first if not isinstance(it, torch.Tensor) else False for it in items):
            return first
        raise TypeError(f"{where}: {first!r} in one batch but {next(it for it in items if it != first)!r} in another; batches must agree")
    scalars = []
    for it in items:
        if isinstance(it, torch.Tensor) and it.dim() == 0:
            scalars.append(it)
        elif isinstance(it, (bool, int, float, np.integer, np.floating)):
            scalars.append(torch.as_tensor(it))
        else:
            raise TypeError(f"{where}: cannot concatenate batches holding {type(it).__name__}")
    if all(bool(s == scalars[0]) and s.dtype == scalars[0].dtype for s in scalars):
        return first
    return torch.cat([s.to(device).reshape(1).expand(r) for s, r, device in zip(scalars, rows, devices)])


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
