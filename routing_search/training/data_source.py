"""Where ``fit`` gets its batches: in-memory tensor pairs, a ``Dataset`` or a ``DataLoader``.

Every form becomes a :class:`BatchSource` that yields ``(inputs, targets, rows)`` already moved to the
training device. Randomness lives in ``torch.Generator`` objects that :meth:`BatchSource.generators`
exposes, so that a checkpoint can store and restore them (exact resume).

* Tensor pairs ``(inputs, targets)`` are shuffled every epoch by ``torch.randperm(n, generator=g)``.
* A map-style ``Dataset`` (items ``(inputs, targets)``) is wrapped by :func:`make_loader`, whose sampler
  draws the same ``torch.randperm(n, generator=g)``: with the same seed and batch size a ``Dataset`` (or
  ``make_loader(dataset, seed=...)``) gives exactly the batches of the equivalent tensor pair.
* A ``DataLoader`` is used as it is (its own sampler decides the order); its items must be batches:
  each is checked by :func:`~routing_search.batches.check_batch`, and a ``DataLoader(TensorDataset(...),
  batch_size=None)``, which yields single rows, is refused (:func:`~routing_search.batches.check_loader`).

A list of pairs is not a training set: it is refused with a message saying how to pass rows (one
stacked pair, a ``Dataset``, or a ``DataLoader`` with ``batch_size``). Only held-out data read whole
(:func:`materialize`) takes a list, as batches (:func:`~routing_search.batches.as_batch`).
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, SequentialSampler

from .._validation import check_int
from ..batches import ROWS_HINT, as_batch, check_batch, check_loader, num_rows, take_rows, tensors_of, to_device

__all__ = ["BatchSource", "TensorSource", "LoaderSource", "PermutationSampler", "as_source", "make_loader", "materialize", "search_subset", "check_finite_targets"]

Batch = tuple[Any, Any, int]


def check_finite_targets(targets: Any, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` when a floating target holds NaN/inf."""
    for t in tensors_of(targets):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{where}: targets contain {bad} NaN/inf value(s); fit trains only on finite targets")


def _check_pair(name: str, data: Any) -> tuple[Any, Any]:
    if isinstance(data, (tuple, list)) and data and all(isinstance(item, (tuple, list)) and len(item) == 2 for item in data):
        raise TypeError(
            f"{name} must be a pair (inputs, targets) of tensors, a torch Dataset of (inputs, targets) rows or a DataLoader, "
            f"got a {type(data).__name__} of {len(data)} pair{'' if len(data) == 1 else 's'} (rows and batches cannot be told apart there); {ROWS_HINT}"
        )
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(
            f"{name} must be a pair (inputs, targets) of tensors, a torch Dataset of (inputs, targets) rows or a "
            f"DataLoader, got {type(data).__name__}"
        )
    inputs, targets = data
    if not isinstance(inputs, (torch.Tensor, Mapping)):
        raise TypeError(f"{name}: inputs must be a tensor or a dict of tensors (e.g. {{'x', 'task', 'key'}}), got {type(inputs).__name__}")
    if not tensors_of(targets):
        raise TypeError(f"{name}: targets must be a tensor or a list/dict of tensors, got {type(targets).__name__}")
    if check_batch((inputs, targets), name=name) == 0:  # one row count for every tensor, scalar targets refused
        raise ValueError(f"{name} holds no rows")
    check_finite_targets(targets, name)
    return inputs, targets


class BatchSource(abc.ABC):
    """One data argument of ``fit`` as batches ``(inputs, targets, rows)`` on a device.

    Attributes:
        name: the argument's name (for messages).
    """

    name: str

    @abc.abstractmethod
    def batches(self, device: torch.device, *, shuffle: bool) -> Iterator[Batch]:
        """One pass over the data (shuffled when ``shuffle`` and the source shuffles at all)."""

    def num_batches(self) -> int | None:
        """Batches per pass, when known."""
        return None

    def generators(self) -> dict[str, torch.Generator]:
        """The ``torch.Generator`` objects the source draws from (checkpointed for exact resume)."""
        return {}


class TensorSource(BatchSource):
    """In-memory ``(inputs, targets)``, cut into batches of ``batch_size`` rows in a seeded random order.

    Args:
        name: the argument's name.
        data: ``(inputs, targets)``; ``inputs`` a tensor or a dict of tensors, ``targets`` a tensor or a
            list/dict of tensors, all with the same number of rows.
        batch_size: rows per batch (the last batch may be smaller).
        generator: draws the order of every shuffled pass.
        shuffle: False for data that is always read in order (validation): ``batches`` then never
            shuffles and the source has no generator to checkpoint.
    """

    def __init__(self, name: str, data: Any, batch_size: int, generator: torch.Generator, *, shuffle: bool = True) -> None:
        self.name = name
        self.data = _check_pair(name, data)
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.generator = generator
        self.shuffle = bool(shuffle)
        self.rows = num_rows(self.data)

    def batches(self, device: torch.device, *, shuffle: bool) -> Iterator[Batch]:
        order = torch.randperm(self.rows, generator=self.generator) if shuffle and self.shuffle else torch.arange(self.rows)
        for start in range(0, self.rows, self.batch_size):
            index = order[start : start + self.batch_size]
            yield to_device(take_rows(self.data[0], index), device), to_device(take_rows(self.data[1], index), device), int(index.numel())

    def num_batches(self) -> int:
        return -(-self.rows // self.batch_size)

    def generators(self) -> dict[str, torch.Generator]:
        return {"shuffle": self.generator} if self.shuffle else {}


class LoaderSource(BatchSource):
    """A ``DataLoader`` whose batches are ``(inputs, targets)`` pairs (its sampler fixes the order).

    Every batch is checked as it is read (:func:`~routing_search.batches.check_batch`): an item that is a
    single row (a scalar target, inputs and targets of different lengths) is refused, never trained on.
    """

    def __init__(self, name: str, loader: DataLoader) -> None:
        check_loader(loader, name=name)
        self.name = name
        self.loader = loader

    def batches(self, device: torch.device, *, shuffle: bool) -> Iterator[Batch]:
        for index, batch in enumerate(self.loader):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError(
                    f"{self.name}: every batch must be a pair (inputs, targets), got {type(batch).__name__}"
                    f"{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''} at batch {index}"
                )
            inputs, targets = batch
            if not isinstance(inputs, (torch.Tensor, Mapping)):
                raise TypeError(f"{self.name}: batch inputs must be a tensor or a dict of tensors, got {type(inputs).__name__}")
            rows = check_batch((inputs, targets), name=f"{self.name}: batch {index}",
                               hint=f"a DataLoader must yield batches (inputs, targets); {ROWS_HINT}")
            yield to_device(inputs, device), to_device(targets, device), rows

    def num_batches(self) -> int | None:
        try:
            return len(self.loader)
        except TypeError:  # an IterableDataset without __len__
            return None

    def generators(self) -> dict[str, torch.Generator]:
        found: dict[str, torch.Generator] = {}
        seen: set[int] = set()
        candidates = {
            "loader": getattr(self.loader, "generator", None),
            "sampler": getattr(self.loader.sampler, "generator", None),
            "batch_sampler.sampler": getattr(getattr(self.loader.batch_sampler, "sampler", None), "generator", None),
        }
        for where, g in candidates.items():
            if isinstance(g, torch.Generator) and id(g) not in seen:
                seen.add(id(g))
                found[where] = g
        return found


class PermutationSampler(Sampler[int]):
    """Every pass a new order ``torch.randperm(n, generator=generator)``: one draw per pass, exactly what
    ``fit`` does for tensor pairs (``RandomSampler`` draws a second permutation per pass)."""

    def __init__(self, num_rows: int, generator: torch.Generator) -> None:
        self.num_rows = check_int("num_rows", num_rows, minimum=0)
        self.generator = generator

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.num_rows, generator=self.generator).tolist())

    def __len__(self) -> int:
        return self.num_rows


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int = 256,
    seed: int = 0,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
    **loader_options: Any,
) -> DataLoader:
    """The ``DataLoader`` ``fit`` builds for a ``Dataset``: seeded order, same batches as tensor pairs.

    Args:
        dataset: a map-style dataset whose items are ``(inputs, targets)`` (an ``IterableDataset`` is
            read in its own order).
        batch_size: rows per batch.
        seed: seeds the order (unless ``generator`` is given) and the loader's worker seeds.
        shuffle: a new random order every pass, ``torch.randperm(len(dataset), generator=...)``, exactly
            the order ``fit`` gives tensor pairs with the same seed; otherwise in index order.
        generator: the shuffling generator to use (``fit`` passes its own).
        **loader_options: other ``DataLoader`` options (``num_workers``, ``pin_memory``, ...).

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> loader = make_loader(TensorDataset(torch.arange(6.0), torch.zeros(6)), batch_size=4, seed=0)
        >>> [batch[0].tolist() for batch in loader] == [torch.arange(6.0)[i].tolist() for i in
        ...     torch.randperm(6, generator=torch.Generator().manual_seed(0)).split(4)]
        True
    """
    batch_size = check_int("batch_size", batch_size, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    clash = sorted(set(loader_options) & {"sampler", "batch_sampler", "shuffle", "generator", "batch_size"})
    if clash:
        raise TypeError(f"make_loader chooses {clash} itself; build your own DataLoader to set them")
    # The loader's own generator only draws worker seeds: kept apart from the shuffling generator, and
    # never the global RNG (which would shift dropout noise between a Dataset run and a tensor run).
    base = torch.Generator().manual_seed(seed)
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, batch_size=batch_size, generator=base, **loader_options)
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    if not isinstance(dataset, Sized):
        raise TypeError(f"dataset must be a map-style Dataset with __len__ (or an IterableDataset), got {type(dataset).__name__}")
    sampler: Sampler[int] = PermutationSampler(len(dataset), generator) if shuffle else SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, generator=base, **loader_options)


def as_source(name: str, data: Any, batch_size: int, generator: torch.Generator, *, seed: int, shuffle: bool) -> BatchSource:
    """``data`` (tensor pair, ``Dataset`` or ``DataLoader``) as a :class:`BatchSource`."""
    if isinstance(data, DataLoader):
        return LoaderSource(name, data)
    if isinstance(data, Dataset):
        return LoaderSource(name, make_loader(data, batch_size=batch_size, seed=seed, shuffle=shuffle, generator=generator))
    return TensorSource(name, data, batch_size, generator, shuffle=shuffle)


def materialize(source_or_data: Any, batch_size: int = 1024, *, name: str = "data") -> tuple[Any, Any]:
    """All rows of one batch, a list of batches, a ``Dataset`` of rows, a ``DataLoader`` or a
    :class:`BatchSource` as one pair ``(inputs, targets)`` (``name``: the argument, for messages).

    A list of pairs is read as batches, a ``Dataset`` as rows (see :func:`~routing_search.batches.as_batch`):
    a list of single rows is refused rather than concatenated into wrong shapes.
    """
    if isinstance(source_or_data, BatchSource):
        return as_batch([(inputs, targets) for inputs, targets, _ in source_or_data.batches(torch.device("cpu"), shuffle=False)], name=name)
    if isinstance(source_or_data, Dataset) and not isinstance(source_or_data, DataLoader):
        return as_batch(make_loader(source_or_data, batch_size=batch_size, shuffle=False), name=name)
    return as_batch(source_or_data, name=name)


def search_subset(data: Any, rows: int | None, seed: int, *, name: str = "data") -> tuple[Any, Any]:
    """At most ``rows`` held-out rows, a fixed seeded subset in their original order (the same at every search).

    ``data`` may be anything :func:`materialize` takes; the row count comes from every tensor of the
    batch, whatever the model's keyword names are; ``name`` is the argument, for messages.
    """
    inputs, targets = materialize(data, name=name)
    total = num_rows((inputs, targets))
    if rows is None or total <= rows:
        return inputs, targets
    chosen = torch.randperm(total, generator=torch.Generator().manual_seed(seed + 1))[:rows].sort().values
    return take_rows(inputs, chosen), take_rows(targets, chosen)
