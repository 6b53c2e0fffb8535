"""Batch plumbing shared by the search and the trainer.

A *batch* is a pair ``(inputs, targets)``. ``inputs`` is the model's input tensor or a dict of its
keyword arguments (``{'x': x, 'task': t, 'key': k}`` or any names the user's model takes);
``targets`` is a tensor, or a list / tuple / dict of tensors (one per task). Every tensor with a batch
dimension has the same number of rows; 0-dim tensors and plain Python values pass through row
selection unchanged (in ``inputs`` only: every target has one row per example).

Where ``data=`` is taken (:func:`as_batch`), its forms are read so that rows and batches are never confused:

* a pair ``(inputs, targets)`` is one batch;
* a list / tuple / other iterable of pairs, or a ``DataLoader``, is a list of *batches* (concatenated);
* a torch ``Dataset`` holds *rows*, as ``fit`` reads it: its items are stacked (``default_collate``).

A list of single rows ``[(x_row, y_row), ...]`` is not taken as rows: it cannot be told apart from a
list of batches in general (a ``[T, d]`` token row is a batch of ``T`` rows too). Items that cannot be
batches (a target without a batch dimension, inputs and targets with different row counts), or a
``DataLoader(TensorDataset(...), batch_size=None)`` (which yields single rows), are refused with an
error naming the argument and the ways to pass rows: one stacked pair, a ``Dataset``, or a
``DataLoader`` with ``batch_size``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler, TensorDataset, default_collate

from .layers.moe import MoEOutput
from .layers.multigate import MultiGateOutput

__all__ = [
    "as_batch",
    "call_model",
    "check_batch",
    "check_loader",
    "ROWS_HINT",
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


ROWS_HINT = (
    "to pass single rows, stack them into one pair (inputs, targets), e.g. (torch.stack(xs), torch.stack(ys)), "
    "or pass a torch Dataset of (inputs, targets) rows or a DataLoader with batch_size=..."
)


def _scalar_targets(targets: Any) -> list[str]:
    """Descriptions of the values in ``targets`` that have no batch dimension (0-dim tensors, numbers)."""
    if isinstance(targets, torch.Tensor):
        return [] if targets.dim() > 0 else [f"a 0-dim tensor ({targets.item()!r})"]
    if isinstance(targets, (bool, int, float, np.integer, np.floating)):
        return [f"a {type(targets).__name__} ({targets!r})"]
    if isinstance(targets, Mapping):
        return [d for v in targets.values() for d in _scalar_targets(v)]
    if isinstance(targets, (tuple, list)):
        return [d for v in targets for d in _scalar_targets(v)]
    return []


def check_batch(batch: Any, *, name: str = "data", hint: str = ROWS_HINT) -> int:
    """Number of rows of one batch ``(inputs, targets)``, after checking that it is one.

    A batch's targets have one row per example (no 0-dim tensor or plain number among them), and every
    tensor with a batch dimension, in ``inputs`` and ``targets``, has the same number of rows. A single
    row ``(x_row, y_row)`` fails one of these in the common cases (a scalar label, or ``x_row`` of shape
    ``[d]`` with ``y_row`` of another length) and is refused with an error naming ``name`` and ``hint``.

    Example:
        >>> import torch
        >>> check_batch((torch.zeros(5, 3), torch.zeros(5)))
        5
        >>> check_batch((torch.zeros(3), torch.tensor(1.0)))  # one row, not a batch  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: data: targets hold a 0-dim tensor (1.0); a batch (inputs, targets) needs one target row per example; to pass single rows, ...
    """
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        got = f"{type(batch).__name__}{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}"
        raise TypeError(f"{name} must be a pair (inputs, targets), got {got}")
    inputs, targets = batch
    scalars = _scalar_targets(targets)
    if scalars:
        raise ValueError(f"{name}: targets hold {scalars[0]}; a batch (inputs, targets) needs one target row per example; {hint}")
    rows = {int(t.shape[0]) for t in tensors_of(inputs) + tensors_of(targets) if t.dim() > 0}
    if len(rows) > 1:
        shapes = [tuple(t.shape) for t in tensors_of(inputs) + tensors_of(targets)]
        raise ValueError(f"{name}: its tensors have different numbers of rows {sorted(rows)} (shapes {shapes}); every tensor of a "
                         f"batch (inputs, targets) has one row per example; {hint}")
    if not rows:
        raise ValueError(f"{name}: the batch holds no tensor with a batch dimension; {hint}")
    return rows.pop()


def check_loader(loader: DataLoader, *, name: str = "data") -> None:
    """Refuse a ``DataLoader`` that certainly yields single rows instead of batches.

    With ``batch_size=None`` a ``DataLoader`` yields its dataset's items as they are; the items of a
    ``TensorDataset`` read one index at a time are single rows. (Other datasets may well yield batches
    with ``batch_size=None``; each of their items is checked by :func:`check_batch` when read.)

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> rows = TensorDataset(torch.zeros(4, 3), torch.zeros(4))
        >>> check_loader(DataLoader(rows, batch_size=2))
        >>> check_loader(DataLoader(rows, batch_size=None))
        Traceback (most recent call last):
        ...
        ValueError: data: DataLoader(batch_size=None) over a TensorDataset yields single rows, not batches; pass batch_size=... (or the tensors themselves)
    """
    if not isinstance(loader, DataLoader):
        raise TypeError(f"{name} must be a torch DataLoader here, got {type(loader).__name__}")
    if (
        loader.batch_sampler is None
        and isinstance(loader.dataset, TensorDataset)
        and isinstance(loader.sampler, (SequentialSampler, RandomSampler))
    ):
        raise ValueError(f"{name}: DataLoader(batch_size=None) over a TensorDataset yields single rows, not batches; "
                         "pass batch_size=... (or the tensors themselves)")


def _dataset_rows(data: Dataset, name: str) -> tuple[Any, Any]:
    """Every item of a ``Dataset`` of ``(inputs, targets)`` rows, in order, stacked into one batch."""
    if isinstance(data, IterableDataset):
        items = list(data)
    else:
        try:
            count = len(data)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"{name}: a map-style Dataset needs __len__ to be read whole, got {type(data).__name__}") from None
        items = [data[i] for i in range(count)]
    if not items:
        raise ValueError(f"{name}: the Dataset holds no rows")
    for i, item in enumerate(items):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            got = f"{type(item).__name__}{f' of length {len(item)}' if isinstance(item, (tuple, list)) else ''}"
            raise TypeError(f"{name}: every Dataset item must be one row (inputs, targets), got {got} at index {i}")
    inputs, targets = default_collate(items)
    check_batch((inputs, targets), name=name, hint="every Dataset item must be one row (inputs, targets)")
    return inputs, targets


def as_batch(data: Any, *, name: str = "data") -> tuple[Any, Any]:
    """``(inputs, targets)`` from one batch, an iterable of batches, a ``DataLoader`` or a ``Dataset`` of rows.

    * ``(inputs, targets)``: one batch, returned as it is.
    * A list / tuple / iterable of ``(inputs, targets)`` batches, or a ``DataLoader``: concatenated along
      the rows. A plain value (an ``int`` task index, a 0-dim tensor) in ``inputs`` that is the same in
      every batch is kept as it is; integers or 0-dim tensors that differ between batches become one entry
      per row (e.g. ``task=0`` for a batch of 3 rows and ``task=1`` for 2 rows: ``tensor([0, 0, 0, 1, 1])``).
    * A torch ``Dataset`` (map-style or iterable): its items are single rows ``(inputs, targets)``, as
      ``fit`` reads them; they are stacked in order with ``default_collate``.

    Every batch is checked by :func:`check_batch` (and a ``DataLoader`` by :func:`check_loader`): a list
    of single rows ``[(x_row, y_row), ...]`` is refused with an error naming ``name`` and how to pass
    rows, never concatenated into wrong shapes.

    Example:
        >>> import torch
        >>> x, y = torch.arange(12.0).reshape(4, 3), torch.arange(4.0)
        >>> inputs, targets = as_batch([(x[:3], y[:3]), (x[3:], y[3:])])
        >>> torch.equal(inputs, x) and torch.equal(targets, y)
        True
        >>> as_batch(list(zip(x, y)))  # single rows are not batches  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: data[0]: targets hold a 0-dim tensor (0.0); a batch (inputs, targets) needs one target row per example; data is read as a list of batches (inputs, targets): to pass single rows, ...
    """
    if isinstance(data, Dataset) and not isinstance(data, DataLoader):
        return _dataset_rows(data, name)
    if isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data[0], (tuple, list)):
        check_batch(data, name=name)
        return data[0], data[1]
    if isinstance(data, Mapping):
        raise TypeError(f"{name} must be (inputs, targets) or an iterable of such pairs, got a mapping")
    if isinstance(data, DataLoader):
        check_loader(data, name=name)
    try:
        batches = list(data)
    except TypeError:
        raise TypeError(f"{name} must be (inputs, targets) or an iterable of such pairs, got {type(data).__name__}") from None
    if not batches or not all(isinstance(b, (tuple, list)) and len(b) == 2 for b in batches):
        raise TypeError(f"{name} must be (inputs, targets) or a non-empty iterable of (inputs, targets) pairs")
    hint = f"{name} is read as a list of batches (inputs, targets): {ROWS_HINT}"
    rows = [check_batch(b, name=f"{name}[{i}]", hint=hint) for i, b in enumerate(batches)]
    if len(batches) == 1:
        return batches[0][0], batches[0][1]
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
    modules = list(model.modules()) if modules is None else modules
    if not any(m.training for m in modules):
        yield  # already in eval mode: nothing to toggle (this runs once per candidate chunk: keep it cheap)
        return
    modes = [(m, m.training) for m in modules]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
