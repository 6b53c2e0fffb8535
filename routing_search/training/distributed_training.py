"""``fit`` under ``torch.distributed``: sharding, the DDP wrapper, reductions, and checkpoints at any world size.

:func:`~routing_search.training.fit` runs data-parallel when a process group is in use (``process_group=``;
by default the world group once ``torch.distributed`` is initialised, e.g. under ``torchrun``). What it
does, and what this module provides for it:

* **One global order, sharded per batch.** ``batch_size`` is the *global* batch: the rows of one
  optimiser step over all ranks. Every epoch draws the same seeded order as a single process
  (``torch.randperm(n, generator)``) and cuts the same global batches; rank ``r`` takes the ``r``-th of
  ``world_size`` contiguous, near-equal parts of each (:func:`split_sizes`: sizes differ by at most one
  row, the first ranks get the extra rows). No row is dropped or repeated, so the global batches do not
  depend on the world size. A part may be empty (a global batch with fewer rows than ranks); that rank
  still takes part in the step with a zero-row batch. :class:`GlobalBatchSampler` is the same rule as a
  ``DataLoader`` batch sampler (see :func:`make_distributed_loader`).
* **Exact gradients for unequal parts.** Each rank's objective is its *sum* of per-example losses (plus
  ``rows × gate loss``), scaled by ``world_size / global_rows``; DDP averages gradients over ranks, so the
  gradient is exactly that of the mean loss over the global batch, whatever the split. The row count,
  the loss sum and non-finite/error flags of the step are summed in one 5-value all-reduce before the
  backward pass (:class:`DistributedStep`): every rank raises together when any rank's loss is NaN or
  its forward raised.
* **Reductions.** Validation sums (loss, rows, expert usage) are summed over ranks; metrics are computed
  on the predictions of *all* ranks, gathered in the global row order (an AUC is never averaged over
  ranks). Running usage meters are summed over ranks at the end of every epoch and every other buffer
  (e.g. BatchNorm statistics) is taken from rank 0 (:func:`sync_buffers`), so every rank holds the same
  model state.
* **Checkpoints.** Rank 0 writes (atomically); the others wait for it. The file holds every rank's random
  state and what the run did that depends on the world size (:class:`RunRecord`). Resuming at another
  world size is exact (up to float rounding) when the global batches do not depend on it and no per-rank
  randomness or batch statistic was used; otherwise :func:`check_world_size_change` refuses with a
  :class:`~routing_search.training.CheckpointError` that says why.

Single-process runs use none of the collectives (``DistributedContext.active`` is False).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler, Subset, default_collate

from .._validation import check_int
from ..batches import call_model, num_rows, take_rows, tensors_of, to_device, unwrap_prediction
from ..distributed import RankFailedError, agree, agree_and_gather, all_gather_objects, all_reduce_sum, broadcast_tensor_, resolve_group
from ..layers.moe import UsageMeter
from .checkpoint import CheckpointError
from .data_source import BatchSource, LoaderSource, TensorSource

__all__ = [
    "DistributedContext",
    "resolve_context",
    "unwrap_model",
    "wrap_model",
    "split_sizes",
    "shard_bounds",
    "GlobalBatchSampler",
    "make_distributed_loader",
    "ShardedTensorSource",
    "ShardedEvalTensorSource",
    "InterleavedLoaderSource",
    "shard_source",
    "train_order",
    "shard_rows",
    "DistributedStep",
    "reduce_evaluation",
    "sync_buffers",
    "RunRecord",
    "check_world_size_change",
    "gather_rank_rng",
    "restore_rank_rng",
    "RankFailedError",
    "RandomnessWatch",
    "save_on_main",
    "agree_on_setup",
    "agree_on_stop",
    "set_sampler_epoch",
    "pause_buffer_broadcast",
    "resume_buffer_broadcast",
]


# --------------------------------------------------------------------------------------------- context
@dataclass(frozen=True)
class DistributedContext:
    """The process group ``fit`` runs in.

    Attributes:
        group: the ``ProcessGroup`` (``None``: a single process).
        rank: this process's rank in ``group`` (0 alone).
        world_size: number of processes (1 alone).
    """

    group: Any
    rank: int
    world_size: int

    @property
    def active(self) -> bool:
        """True under a process group (even one of size 1)."""
        return self.group is not None

    @property
    def is_main(self) -> bool:
        """True on rank 0: it shows progress, warns, and writes checkpoints."""
        return self.rank == 0

    @property
    def process_group_arg(self) -> Any:
        """The value to pass as ``process_group=`` to the search (``False`` when single-process)."""
        return self.group if self.group is not None else False


def resolve_context(process_group: Any = None) -> DistributedContext:
    """``fit``'s ``process_group=`` argument as a :class:`DistributedContext`.

    ``None``: the world group when ``torch.distributed`` is initialised, else a single process;
    ``False``: a single process even inside an initialised job; or a ``ProcessGroup``.

    Example:
        >>> resolve_context(False)
        DistributedContext(group=None, rank=0, world_size=1)
    """
    group = resolve_group(process_group)
    if group is None:
        return DistributedContext(None, 0, 1)
    return DistributedContext(group, dist.get_rank(group), dist.get_world_size(group))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (``model`` itself otherwise)."""
    while isinstance(model, (DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def wrap_model(model: nn.Module, ctx: DistributedContext, device: torch.device) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` over ``ctx.group`` (``model`` itself when single-process).

    ``find_unused_parameters=True`` because sparse routing leaves the experts no row chose without a
    gradient on a rank; buffers are not broadcast at every forward (the permutations are kept identical by
    the search, the usage meters are summed and the other buffers taken from rank 0 by
    :func:`sync_buffers` once per epoch). Construction broadcasts rank 0's parameters and buffers.
    """
    if not ctx.active:
        return model
    options: dict[str, Any] = {"process_group": ctx.group, "find_unused_parameters": True}
    if device.type == "cuda":
        options["device_ids"] = [device.index if device.index is not None else torch.cuda.current_device()]
    # torch >= 2.13 names the per-forward buffer broadcast forward_sync_buffers; older versions broadcast_buffers.
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        options["forward_sync_buffers"] = False
    else:
        options["broadcast_buffers"] = False
    return DistributedDataParallel(model, **options)


def pause_buffer_broadcast(wrapper: nn.Module | None) -> dict[str, Any]:
    """Switch off a user's DDP wrapper's buffer broadcast at every forward; returns what to give :func:`resume_buffer_broadcast`.

    ``fit`` keeps buffers equal itself (:func:`sync_buffers`, once per epoch); a per-forward broadcast of
    rank 0's buffers would overwrite the rows the other ranks added to the usage meters.
    """
    saved: dict[str, Any] = {}
    if isinstance(wrapper, DistributedDataParallel):
        for attr in ("forward_sync_buffers", "broadcast_buffers"):
            if isinstance(getattr(wrapper, attr, None), bool):
                saved[attr] = getattr(wrapper, attr)
                setattr(wrapper, attr, False)
    return saved


def resume_buffer_broadcast(wrapper: nn.Module | None, saved: Mapping[str, Any]) -> None:
    """Undo :func:`pause_buffer_broadcast`."""
    for attr, value in saved.items():
        setattr(wrapper, attr, value)


# -------------------------------------------------------------------------------------------- sharding
def split_sizes(rows: int, world_size: int) -> list[int]:
    """Sizes of ``world_size`` contiguous near-equal parts of ``rows`` rows (the first ranks get the extra rows).

    Example:
        >>> split_sizes(10, 3), split_sizes(2, 3)
        ([4, 3, 3], [1, 1, 0])
    """
    rows = check_int("rows", rows, minimum=0)
    world_size = check_int("world_size", world_size, minimum=1)
    base, extra = divmod(rows, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def shard_bounds(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s contiguous part of ``rows`` rows (see :func:`split_sizes`).

    Example:
        >>> [shard_bounds(10, r, 3) for r in range(3)]
        [(0, 4), (4, 7), (7, 10)]
    """
    sizes = split_sizes(rows, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def _local_part(index: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    start, stop = shard_bounds(int(index.numel()), rank, world_size)
    return index[start:stop]


class GlobalBatchSampler(Sampler[list[int]]):
    """A batch sampler giving rank ``rank`` its part of every global batch of a seeded global order.

    Every pass draws ``torch.randperm(num_rows, generator=generator)`` (one draw, as ``fit`` does for a
    single process; ``shuffle=False``: index order), cuts it into global batches of ``batch_size`` rows
    and yields the ``rank``-th of ``world_size`` contiguous near-equal parts of each (:func:`split_sizes`).
    Every rank yields the same number of batches; a part is empty when a global batch has fewer rows than
    ranks (use :func:`make_distributed_loader`, whose collate function turns it into a zero-row batch).

    Args:
        num_rows: rows of the data set.
        batch_size: rows of a *global* batch (all ranks together).
        generator: draws the order (the same seed on every rank).
        rank, world_size: this process's part.
        shuffle: a new random order every pass (otherwise index order).

    Example:
        >>> g = [torch.Generator().manual_seed(0) for _ in range(2)]
        >>> parts = [list(GlobalBatchSampler(5, 4, g[r], rank=r, world_size=2)) for r in range(2)]
        >>> [sorted(a + b) for a, b in zip(*parts)] == [sorted(b.tolist()) for b in torch.randperm(
        ...     5, generator=torch.Generator().manual_seed(0)).split(4)]
        True
    """

    def __init__(self, num_rows: int, batch_size: int, generator: torch.Generator, *, rank: int, world_size: int, shuffle: bool = True) -> None:
        self.num_rows = check_int("num_rows", num_rows, minimum=0)
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.world_size = check_int("world_size", world_size, minimum=1)
        self.rank = check_int("rank", rank, minimum=0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.generator = generator
        self.shuffle = bool(shuffle)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.num_rows, generator=self.generator) if self.shuffle else torch.arange(self.num_rows)
        for start in range(0, self.num_rows, self.batch_size):
            yield _local_part(order[start : start + self.batch_size], self.rank, self.world_size).tolist()

    def __len__(self) -> int:
        return -(-self.num_rows // self.batch_size)


class _EmptySafeCollate:
    """``default_collate``, and for an empty part a zero-row batch shaped like the data set's items."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __call__(self, items: list[Any]) -> Any:
        if items:
            return default_collate(items)
        return take_rows(default_collate([self.dataset[0]]), torch.zeros(0, dtype=torch.long))


def make_distributed_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    process_group: Any = None,
    generator: torch.Generator | None = None,
    **loader_options: Any,
) -> DataLoader:
    """A ``DataLoader`` over this rank's part of every global batch (:class:`GlobalBatchSampler`).

    The distributed counterpart of :func:`~routing_search.training.make_loader`: with the same ``seed``
    and *global* ``batch_size`` the union of the ranks' batches is exactly the single-process batch, at
    any world size, so a run can resume at another world size. ``fit`` builds this itself for a
    ``Dataset``; build it yourself to set ``num_workers`` and the like.

    Args:
        dataset: a map-style dataset of ``(inputs, targets)`` items.
        batch_size: rows of a global batch.
        seed: seeds the order (unless ``generator`` is given) and the worker seeds.
        shuffle: a new order every pass.
        process_group: as for ``fit``.
        generator: the shuffling generator (the same seed on every rank).
        **loader_options: other ``DataLoader`` options (not ``sampler``, ``batch_sampler``, ``shuffle``,
            ``batch_size``, ``generator``, ``drop_last``, ``collate_fn``).
    """
    batch_size = check_int("batch_size", batch_size, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    clash = sorted(set(loader_options) & {"sampler", "batch_sampler", "shuffle", "generator", "batch_size", "drop_last", "collate_fn"})
    if clash:
        raise TypeError(f"make_distributed_loader chooses {clash} itself; build your own DataLoader to set them")
    if isinstance(dataset, IterableDataset) or not isinstance(dataset, Sized):
        raise TypeError(f"dataset must be a map-style Dataset with __len__, got {type(dataset).__name__}")
    ctx = resolve_context(process_group)
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    sampler = GlobalBatchSampler(len(dataset), batch_size, generator, rank=ctx.rank, world_size=ctx.world_size, shuffle=shuffle)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=_EmptySafeCollate(dataset),
                      generator=torch.Generator().manual_seed(seed), **loader_options)


class ShardedTensorSource(TensorSource):
    """Tensor pairs for training: the single-process order and global batches, this rank's part of each.

    Built like :class:`~routing_search.training.data_source.TensorSource` (same name, generator and
    draws, so checkpoints match a single process) with the rank and world size added.
    """

    def __init__(self, name: str, data: Any, batch_size: int, generator: torch.Generator, *, rank: int, world_size: int,
                 shuffle: bool = True) -> None:
        super().__init__(name, data, batch_size, generator, shuffle=shuffle)
        self.rank, self.world_size = rank, world_size

    def batches(self, device: torch.device, *, shuffle: bool) -> Iterator[tuple[Any, Any, int]]:
        order = torch.randperm(self.rows, generator=self.generator) if shuffle and self.shuffle else torch.arange(self.rows)
        for start in range(0, self.rows, self.batch_size):
            index = _local_part(order[start : start + self.batch_size], self.rank, self.world_size)
            yield to_device(take_rows(self.data[0], index), device), to_device(take_rows(self.data[1], index), device), int(index.numel())


class ShardedEvalTensorSource(TensorSource):
    """Tensor pairs for evaluation: rank ``r`` evaluates its contiguous shard (:func:`shard_bounds`), in order.

    The shard may be empty. Same name, generator and generator list as the single-process source.
    """

    contiguous = True

    def __init__(self, name: str, data: Any, batch_size: int, generator: torch.Generator, *, rank: int, world_size: int,
                 shuffle: bool = False) -> None:
        super().__init__(name, data, batch_size, generator, shuffle=shuffle)
        self.start, self.stop = shard_bounds(self.rows, rank, world_size)

    def batches(self, device: torch.device, *, shuffle: bool) -> Iterator[tuple[Any, Any, int]]:
        for start in range(self.start, self.stop, self.batch_size):
            index = torch.arange(start, min(start + self.batch_size, self.stop))
            yield to_device(take_rows(self.data[0], index), device), to_device(take_rows(self.data[1], index), device), int(index.numel())

    def num_batches(self) -> int:
        return -(-(self.stop - self.start) // self.batch_size)


class InterleavedLoaderSource(BatchSource):
    """A user's (unsharded) evaluation ``DataLoader``: every rank reads it, rank ``r`` evaluates batches ``r, r + W, …``."""

    contiguous = False

    def __init__(self, inner: LoaderSource, *, rank: int, world_size: int) -> None:
        self.inner, self.name = inner, inner.name
        self.rank, self.world_size = rank, world_size

    def batches(self, device: torch.device, *, shuffle: bool) -> Iterator[tuple[Any, Any, int]]:
        for index, batch in enumerate(self.inner.batches(torch.device("cpu"), shuffle=shuffle)):
            if index % self.world_size == self.rank:
                yield to_device(batch[0], device), to_device(batch[1], device), batch[2]

    def generators(self) -> dict[str, torch.Generator]:
        return self.inner.generators()


def _is_distributed_loader(loader: DataLoader) -> str | None:
    if isinstance(loader.batch_sampler, GlobalBatchSampler):
        return "global"
    samplers = (loader.sampler, getattr(loader.batch_sampler, "sampler", None))
    if any(isinstance(s, DistributedSampler) for s in samplers):
        return "distributed_sampler"
    return None


def train_order(data: Any) -> str:
    """How ``fit`` orders ``train_data``: ``'global'`` (world-size independent global batches: tensors, a
    ``Dataset``, a :func:`make_distributed_loader` loader), ``'distributed_sampler'`` (a ``DistributedSampler``
    loader: its batches depend on the world size) or ``'loader'`` (any other ``DataLoader``)."""
    if isinstance(data, DataLoader):
        return _is_distributed_loader(data) or "loader"
    return "global"


def shard_source(source: BatchSource, data: Any, ctx: DistributedContext, *, train: bool, seed: int) -> BatchSource:
    """``fit``'s single-process source for ``data`` turned into this rank's part (``source`` itself alone).

    Raises:
        ValueError: a training ``DataLoader`` that does not shard (every rank would train on every batch),
            or an evaluation ``DataLoader`` that does (a ``DistributedSampler`` repeats rows; a sharded
            validation loader would bias the sums). Pass the ``Dataset`` or the tensors instead.
    """
    if not ctx.active:
        return source
    if isinstance(source, TensorSource):
        cls = ShardedTensorSource if train else ShardedEvalTensorSource
        return cls(source.name, source.data, source.batch_size, source.generator, rank=ctx.rank, world_size=ctx.world_size,
                   shuffle=source.shuffle)
    assert isinstance(source, LoaderSource)
    kind = _is_distributed_loader(source.loader)
    if isinstance(data, DataLoader):
        if train and kind is None:
            raise ValueError(
                f"{source.name}: under a process group a training DataLoader must give each rank its own part of "
                "the data; build it with make_distributed_loader(dataset, batch_size=global_batch, process_group=...) "
                "or a DistributedSampler, or pass the Dataset (or tensors) and fit shards it"
            )
        if not train:
            if kind is not None:
                raise ValueError(
                    f"{source.name}: a sharded DataLoader cannot be used for evaluation under a process group (a "
                    "DistributedSampler repeats rows to equalise the shards, which would bias the validation loss); "
                    "pass the Dataset, the tensors, or an unsharded DataLoader and fit shards the evaluation itself"
                )
            return InterleavedLoaderSource(source, rank=ctx.rank, world_size=ctx.world_size)
        return source
    # A Dataset: the loader fit built with make_loader, rebuilt as this rank's part with the same generators.
    loader = source.loader
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset) or not isinstance(dataset, Sized):
        raise ValueError(f"{source.name}: an IterableDataset cannot be sharded by fit; pass a map-style Dataset or shard it yourself in a DataLoader")
    base = loader.generator
    if train:
        shuffle_g = getattr(loader.sampler, "generator", None)
        assert isinstance(shuffle_g, torch.Generator)
        sampler = GlobalBatchSampler(len(dataset), int(loader.batch_size or 1), shuffle_g, rank=ctx.rank, world_size=ctx.world_size)
        sharded = DataLoader(dataset, batch_sampler=sampler, collate_fn=_EmptySafeCollate(dataset), generator=base)
        return LoaderSource(source.name, sharded)
    start, stop = shard_bounds(len(dataset), ctx.rank, ctx.world_size)
    part = DataLoader(Subset(dataset, range(start, stop)), batch_size=loader.batch_size, shuffle=False, generator=base)
    return LoaderSource(source.name, part)  # a contiguous shard: gathered in rank order


def shard_rows(batch: tuple[Any, Any], ctx: DistributedContext) -> tuple[Any, Any]:
    """This rank's contiguous part of an in-memory ``(inputs, targets)`` (the whole pair alone)."""
    if not ctx.active:
        return batch
    start, stop = shard_bounds(num_rows(batch), ctx.rank, ctx.world_size)
    index = torch.arange(start, stop)
    return take_rows(batch[0], index), take_rows(batch[1], index)


# ------------------------------------------------------------------------------------------- the step
def _collective_device(ctx: DistributedContext, device: torch.device) -> torch.device:
    return device if dist.get_backend(ctx.group) == "nccl" else torch.device("cpu")


class DistributedStep:
    """One training step's forward pass and objective under a process group, failing on every rank together.

    Call it with this rank's part of the global batch; it returns the tensor to ``backward()`` and the
    step's training loss over the global batch (task loss mean + weighted gate loss, as a single process
    logs it). One all-reduce of 5 float64 values per step: this rank's loss sum, rows, non-finite flag,
    error flag and gate-loss flag.

    Attributes:
        gate_loss_seen: True once a step had a non-zero gate loss with a non-zero weight (the gate
            regulariser is a statistic of each rank's part of the batch: see :class:`RunRecord`).
    """

    def __init__(self, ctx: DistributedContext, module: nn.Module, loss: Any, gate_loss_weight: float, device: torch.device) -> None:
        self.ctx, self.module, self.loss, self.weight = ctx, module, loss, gate_loss_weight
        self.device = _collective_device(ctx, device)
        self.gate_loss_seen = False

    def __call__(self, inputs: Any, targets: Any, rows: int, *, epoch: int, step: int) -> tuple[torch.Tensor, float]:
        error: BaseException | None = None
        local: torch.Tensor | None = None
        piece, nonfinite, gate = 0.0, 0.0, 0.0
        try:
            out = call_model(self.module, inputs)
            prediction = unwrap_prediction(out)
            if rows == 0:
                # A zero-row part still takes part in DDP's gradient all-reduce (with zero gradients).
                local = sum((t.sum() * 0.0 for t in tensors_of(prediction) if t.requires_grad), torch.zeros((), device=self.device))
            else:
                value = self.loss(prediction, targets)
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"loss must return a tensor (per-example [B] or a scalar), got {type(value).__name__}")
                # the sum of this rank's part of the batch mean fit takes alone: per-row values summed, anything
                # else (a scalar, [B, D], ...) as its mean over every value times the rows
                local = value.sum() if value.dim() == 1 and value.shape[0] == rows else value.mean() * rows
                aux = getattr(out, "loss", None)
                if self.weight != 0 and isinstance(aux, torch.Tensor):
                    local = local + (self.weight * rows) * aux
                    gate = 1.0 if bool(aux.detach() != 0) else 0.0
                piece = float(local.detach())
                if not math.isfinite(piece):
                    nonfinite, piece = 1.0, 0.0
        except Exception as exc:  # reported to every rank below
            error = exc
        status = torch.tensor([piece, float(rows), nonfinite, 0.0 if error is None else 1.0, gate], dtype=torch.float64, device=self.device)
        all_reduce_sum(status, self.ctx.group)
        total, global_rows, bad, failed, gates = status.tolist()
        if failed:
            agree(error, self.ctx.group, f"training step {step + 1} of epoch {epoch}")
        if bad:
            flags = all_gather_objects(bool(nonfinite), self.ctx.group)
            ranks = [r for r, f in enumerate(flags) if f]
            raise FloatingPointError(
                f"the training loss is not finite at epoch {epoch}, step {step + 1} on rank(s) {ranks} (the step was not "
                "applied on any rank; the last checkpoint, if any, holds the previous epoch). Lower the learning rate, "
                "check the inputs, or clip gradients"
            )
        if gates:
            self.gate_loss_seen = True
        assert local is not None
        return local * (self.ctx.world_size / global_rows), total / global_rows


# ------------------------------------------------------------------------------------------ evaluation
def _merge_usage(parts: Sequence[Mapping[str, list[list[Any]]]]) -> dict[str, list[list[Any]]]:
    merged: dict[str, list[list[Any]]] = {}
    for part in parts:
        for name, slots in part.items():
            if name not in merged:
                merged[name] = [list(slot) for slot in slots]
                continue
            for acc, slot in zip(merged[name], slots):
                for i in range(3):
                    if slot[i] is not None:
                        acc[i] = slot[i] if acc[i] is None else acc[i] + slot[i]
    return merged


def reduce_evaluation(
    ctx: DistributedContext,
    error: BaseException | None,
    *,
    total: float,
    rows: int,
    sums: dict[str, list[list[Any]]],
    outputs: list[tuple[Any, Any]],
    captured: dict[str, list[torch.Tensor]],
    capture_rows: int,
    contiguous: bool,
) -> tuple[float, int, dict[str, list[list[Any]]], list[tuple[Any, Any]], dict[str, list[torch.Tensor]]]:
    """Combine every rank's evaluation pieces (one ``all_gather_object``); identical results on every rank.

    Loss sums, row counts and usage sums are added in rank order; per-batch predictions (for metrics) and
    captured layer inputs are concatenated in the global row order: rank order for contiguous shards,
    interleaved batch by batch for an :class:`InterleavedLoaderSource`. An error on any rank is raised on
    every rank (the rank's own error there, :class:`RankFailedError` elsewhere).
    """
    payload = None if error is not None else (total, rows, sums, outputs, captured)
    reports = all_gather_objects((None if error is None else f"{type(error).__name__}: {error}", payload), ctx.group)
    if error is not None:
        raise error
    failed = [(r, rep[0]) for r, rep in enumerate(reports) if rep[0] is not None]
    if failed:
        raise RankFailedError("evaluation stopped because another rank failed (" + "; ".join(f"rank {r}: {m}" for r, m in failed) + ")")
    pieces = [rep[1] for rep in reports]
    total = math.fsum(p[0] for p in pieces)
    rows = sum(p[1] for p in pieces)
    sums = _merge_usage([p[2] for p in pieces])

    def in_order(lists: list[list[Any]]) -> list[Any]:
        # Contiguous shards: rank after rank. Interleaved batches: rank r's k-th batch is batch r + k * world.
        if contiguous:
            return [item for items in lists for item in items]
        longest = max((len(items) for items in lists), default=0)
        return [items[k] for k in range(longest) for items in lists if k < len(items)]

    outputs = in_order([p[3] for p in pieces])
    merged: dict[str, list[torch.Tensor]] = {}
    for name in dict.fromkeys(name for p in pieces for name in p[4]):
        have = 0
        for t in in_order([p[4].get(name, []) for p in pieces]):
            if have >= capture_rows:
                break
            merged.setdefault(name, []).append(t[: capture_rows - have])
            have += int(merged[name][-1].shape[0])
    return total, rows, sums, outputs, merged


# --------------------------------------------------------------------------------------------- buffers
class _MeterSync:
    """Sums every :class:`~routing_search.layers.moe.UsageMeter` over ranks (what each rank added since the last sync)."""

    def __init__(self, model: nn.Module) -> None:
        self.meters = [m for m in model.modules() if isinstance(m, UsageMeter)]
        self.snapshot()

    def snapshot(self) -> None:
        self.synced = [{k: b.detach().clone() for k, b in m.named_buffers()} for m in self.meters]

    def ids(self) -> set[int]:
        return {id(b) for m in self.meters for b in m.buffers()}


@torch.no_grad()
def sync_buffers(model: nn.Module, ctx: DistributedContext, meters: Any = None) -> Any:
    """Make every rank's buffers equal: usage meters summed over ranks, every other buffer from rank 0.

    Call once with ``meters=None`` after the model is wrapped (returns the meter tracker), then at every
    sync point with that tracker. A no-op single-process.
    """
    if meters is None:
        return _MeterSync(model)
    if not ctx.active:
        return meters
    # A meter reset since the last sync (reset_usage() in a callback, on every rank) holds only this rank's rows
    # since the reset: its base is 0, not the synced totals (subtracting them summed to totals - synced, e.g. 0).
    # The sums and the row count only grow between resets, so a reset shows as a value below the synced one.
    mine_reset = [any(bool((buf.detach().to(torch.float64) < synced[name].to(torch.float64)).any()) for name, buf in meter.named_buffers())
                  for meter, synced in zip(meters.meters, meters.synced)]
    flags = torch.tensor(mine_reset, dtype=torch.float64,
                         device=next((b.device for m in meters.meters for b in m.buffers()), torch.device("cpu")))
    any_reset = all_reduce_sum(flags, ctx.group).tolist() if mine_reset else []
    for meter, synced, mine, reset in zip(meters.meters, meters.synced, mine_reset, any_reset):
        for name, buf in meter.named_buffers():
            base = synced[name].to(torch.float64)
            delta = buf.detach().to(torch.float64) - (0.0 if mine else base)  # this rank's rows since the sync / reset
            all_reduce_sum(delta, ctx.group)
            buf.copy_(delta if reset else base + delta)
    meters.snapshot()
    skip = meters.ids()
    for buf in model.buffers():
        if id(buf) not in skip:
            broadcast_tensor_(buf, ctx.group)
    return meters


# ------------------------------------------------------------------------------------------ checkpoints
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d)


@dataclass
class RunRecord:
    """What a run did that decides whether it can resume exactly at another world size (stored in checkpoints).

    Attributes:
        world_size: processes of the run that wrote the checkpoint.
        train_order: see :func:`train_order`.
        consumed_rng: the random streams the training steps drew from (``'torch'``: the global torch RNG,
            e.g. dropout; ``'cuda'``; a module generator's name, e.g. a noisy gate's). Each rank draws from
            its own stream for its own rows: the draws depend on the world size.
        batch_statistics: computations over each rank's part of the batch rather than the global batch
            (BatchNorm layers in training mode; ``'gate loss'``: a non-zero gate regulariser).
    """

    world_size: int = 1
    train_order: str = "global"
    consumed_rng: list[str] = field(default_factory=list)
    batch_statistics: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "train_order": self.train_order,
                "consumed_rng": sorted(self.consumed_rng), "batch_statistics": sorted(self.batch_statistics)}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> RunRecord:
        return cls(int(state["world_size"]), str(state["train_order"]), list(state["consumed_rng"]), list(state["batch_statistics"]))

    def note_batch_norms(self, model: nn.Module) -> None:
        """Record the BatchNorm layers (not ``SyncBatchNorm``) of ``model``."""
        for name, module in model.named_modules():
            if isinstance(module, _BATCH_NORMS):
                label = f"BatchNorm {name!r}"
                if label not in self.batch_statistics:
                    self.batch_statistics.append(label)

    def merge(self, other: RunRecord) -> None:
        """Add what an earlier segment of the run (a resumed checkpoint) recorded."""
        self.consumed_rng = sorted(set(self.consumed_rng) | set(other.consumed_rng))
        self.batch_statistics = sorted(set(self.batch_statistics) | set(other.batch_statistics))


class RandomnessWatch:
    """Notices which random streams a stretch of training draws from (compares their states before and after)."""

    def __init__(self, generators: Mapping[str, torch.Generator], device: torch.device) -> None:
        self.generators, self.device = dict(generators), device
        self.before: dict[str, torch.Tensor] = {}

    def _states(self) -> dict[str, torch.Tensor]:
        states = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        states.update({name: g.get_state() for name, g in self.generators.items()})
        return states

    def start(self) -> None:
        self.before = self._states()

    def stop(self, record: RunRecord) -> None:
        after = self._states()
        for name, state in after.items():
            if not torch.equal(state, self.before[name]) and name not in record.consumed_rng:
                record.consumed_rng.append(name)


def gather_rank_rng(ctx: DistributedContext, generators: Mapping[str, torch.Generator], device: torch.device) -> list[dict[str, Any]] | None:
    """Every rank's own random state (global torch RNG, CUDA RNG, module generators), in rank order (collective)."""
    if not ctx.active:
        return None
    mine = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "modules": {name: g.get_state() for name, g in generators.items()},
    }
    return all_gather_objects(mine, ctx.group)


def restore_rank_rng(state: Mapping[str, Any], ctx: DistributedContext, generators: Mapping[str, torch.Generator], device: torch.device) -> None:
    """Put this rank's own saved random state back (when the checkpoint was written at this world size)."""
    per_rank = state.get("rank_rng")
    if not ctx.active or not per_rank or len(per_rank) != ctx.world_size:
        return
    mine = per_rank[ctx.rank]
    torch.set_rng_state(mine["torch"])
    if device.type == "cuda" and mine.get("cuda") is not None:
        torch.cuda.set_rng_state(mine["cuda"], device)
    for name, g in generators.items():
        if name in mine["modules"]:
            g.set_state(mine["modules"][name])


def check_world_size_change(state: Mapping[str, Any], path: Any, ctx: DistributedContext, order: str) -> RunRecord:
    """The checkpoint's :class:`RunRecord`; raises when resuming it at this world size cannot be exact.

    Resuming at the world size that wrote it is always allowed (every rank gets its own random state
    back). At another world size it is exact up to float rounding only when the global batches do not
    depend on the world size (tensors, a ``Dataset`` or a :func:`make_distributed_loader` loader, before
    and now), no per-rank random stream was drawn from and no batch statistic was computed per rank.

    Raises:
        CheckpointError: naming every reason, and how to continue anyway.
    """
    saved = state.get("distributed")
    if saved is None:
        record = None
    else:
        record = RunRecord.from_dict(saved)
    written = 1 if record is None else record.world_size
    if written == ctx.world_size:
        return record or RunRecord()
    reasons = []
    if record is None:
        reasons.append("the checkpoint does not record what the run did per rank (written by an older routing_search)")
    else:
        if record.consumed_rng:
            reasons.append(
                f"the training steps drew from per-rank random streams {record.consumed_rng} (e.g. dropout or a noisy "
                "gate): each rank draws for its own rows, so the draws depend on the world size"
            )
        if record.batch_statistics:
            reasons.append(
                f"{record.batch_statistics} are computed over each rank's part of the global batch, so their values "
                "depend on how the batch is split"
            )
        if record.train_order != "global":
            reasons.append(f"the run's training batches came from a {record.train_order.replace('_', ' ')} DataLoader, whose batches depend on the world size")
    if order != "global":
        reasons.append(f"this run's training batches come from a {order.replace('_', ' ')} DataLoader, whose batches depend on the world size")
    if reasons:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was written by {written} process(es) and cannot be resumed exactly by "
            f"{ctx.world_size}: " + "; ".join(reasons) + ". Resume it with the same number of processes, or start a "
            "new fit from its weights (load_checkpoint(path)['model']) if an inexact continuation is acceptable"
        )
    return record or RunRecord()


def save_on_main(ctx: DistributedContext, write: Any) -> None:
    """Run ``write()`` on rank 0 only; every rank returns once it is done, and raises if it failed."""
    error: BaseException | None = None
    if ctx.is_main:
        try:
            write()
        except Exception as exc:
            error = exc
    if ctx.active:
        agree(error, ctx.group, "writing the checkpoint on rank 0")
    elif error is not None:
        raise error


def agree_on_setup(ctx: DistributedContext, error: BaseException | None, batches: int | None) -> None:
    """Raise on every rank if setting up failed on one, or if the ranks would take different numbers of steps."""
    if not ctx.active:
        if error is not None:
            raise error
        return
    reports = all_gather_objects((None if error is None else f"{type(error).__name__}: {error}", batches), ctx.group)
    if error is not None:
        raise error
    failed = [(r, rep[0]) for r, rep in enumerate(reports) if rep[0] is not None]
    if failed:
        raise RankFailedError("fit stopped before training because another rank failed (" + "; ".join(f"rank {r}: {m}" for r, m in failed) + ")")
    counts = [rep[1] for rep in reports]
    if len(set(counts)) != 1:
        raise ValueError(
            f"the ranks would take different numbers of training steps per epoch {counts}; every rank must hold the same "
            "data and the same batch_size (a DataLoader must give every rank the same number of batches)"
        )


def agree_on_stop(ctx: DistributedContext, reason: str | None, error: BaseException | None = None) -> str | None:
    """A callback's stop request on any rank stops every rank (the lowest such rank's reason).

    ``error``: what this rank's callbacks raised, if anything (catch it and pass it here instead of raising it
    at once, which leaves the other ranks waiting at their next collective until its timeout). A rank that
    failed re-raises its own error, and every other rank raises :class:`RankFailedError` naming it, in the
    same single ``all_gather_object`` as the stop requests.
    """
    if not ctx.active:
        if error is not None:
            raise error
        return reason
    reasons = agree_and_gather(error, ctx.group, "fit", payload=reason,
                               message="{what} stopped because a callback failed on another rank ({detail})")
    return next((r for r in reasons if r is not None), None)


def set_sampler_epoch(data: Any, epoch: int) -> None:
    """Call ``set_epoch(epoch)`` on a ``DistributedSampler`` of a training ``DataLoader`` (a new order every epoch)."""
    if isinstance(data, DataLoader):
        for sampler in (data.sampler, getattr(data.batch_sampler, "sampler", None)):
            if isinstance(sampler, DistributedSampler):
                sampler.set_epoch(epoch)
