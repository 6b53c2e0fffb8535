"""Process-group helpers: the few collectives the search and the trainer need, and nothing else.

Every function takes ``group``, the value a user passes as ``process_group=``:

- ``None`` (the default): the world group when ``torch.distributed`` is initialised, else single-process;
- ``False``: single-process even inside an initialised job (each rank on its own, at the caller's risk);
- a ``ProcessGroup``: that group.

:func:`resolve_group` turns it into a ``ProcessGroup`` or ``None`` (single process); the collectives are
no-ops for ``None`` so that callers need no branches.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class RankFailedError(RuntimeError):
    """Raised on every rank whose own work succeeded when another rank of the group failed (see :func:`agree`)."""

__all__ = [
    "resolve_group",
    "world_size",
    "rank",
    "is_main_process",
    "all_reduce_sum",
    "broadcast_object",
    "all_gather_objects",
    "barrier",
    "broadcast_tensor_",
    "RankFailedError",
    "agree",
    "agree_and_gather",
]


def resolve_group(group: Any = None) -> Any:
    """The process group to use (``None`` when running as a single process); see the module docstring."""
    if group is False:
        return None
    if group is None:
        if dist.is_available() and dist.is_initialized():
            return dist.group.WORLD
        return None
    if group is True:
        raise TypeError("process_group must be None (world group when initialised), False or a ProcessGroup, got True")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("process_group was given but torch.distributed is not initialised (call init_process_group first)")
    if group is dist.GroupMember.NON_GROUP_MEMBER or (isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER):
        raise ValueError(f"this process (rank {dist.get_rank()} of the world) is not a member of process_group: new_group "
                         "gives the ranks it leaves out a placeholder; call this only on the group's ranks, or pass "
                         "process_group=False to run this process alone")
    if not isinstance(group, dist.ProcessGroup):  # torch said only e.g. "Group gloo is not registered"
        raise TypeError(f"process_group must be None (world group when initialised), False or a torch.distributed "
                        f"ProcessGroup (from new_group), got {group!r}")
    return group


def world_size(group: Any) -> int:
    """Number of processes in ``group`` (1 for ``None``)."""
    return 1 if group is None else dist.get_world_size(group)


def rank(group: Any) -> int:
    """This process's rank in ``group`` (0 for ``None``)."""
    return 0 if group is None else dist.get_rank(group)


def is_main_process(group: Any) -> bool:
    """True on rank 0 of ``group`` (always for ``None``)."""
    return rank(group) == 0


def all_reduce_sum(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum ``tensor`` over the ranks of ``group`` in place and return it (unchanged for ``None``)."""
    if group is not None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def broadcast_object(obj: Any, group: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank of ``group`` (``obj`` itself for ``None``)."""
    if group is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, src) if group is not dist.group.WORLD else src, group=group)
    return box[0]


def all_gather_objects(obj: Any, group: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` for ``None``)."""
    if group is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def barrier(group: Any) -> None:
    """Wait until every rank of ``group`` arrives (a no-op for ``None``)."""
    if group is not None:
        dist.barrier(group=group)


def broadcast_tensor_(tensor: torch.Tensor, group: Any, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank ``src``'s value on every rank of ``group`` (unchanged for ``None``)."""
    if group is not None:
        dist.broadcast(tensor, src=dist.get_global_rank(group, src) if group is not dist.group.WORLD else src, group=group)
    return tensor


def agree(error: BaseException | None, group: Any, what: str) -> None:
    """Make a failure on one rank a failure on every rank, at once rather than at a collective's timeout.

    Every rank calls ``agree`` at the same point with the exception its own part raised (or ``None``).
    One ``all_gather_object`` later, a rank that failed re-raises its own exception and every other rank
    raises :class:`RankFailedError` naming the failed ranks and their messages. Nothing happens when
    no rank failed; for ``group=None`` the own exception (if any) is re-raised. To exchange values in the
    same collective, use :func:`agree_and_gather`.

    Example:
        >>> agree(None, None, "loading the checkpoint")  # single process, nothing failed
    """
    agree_and_gather(error, group, what)


_FAILURE_MESSAGE = "{what} stopped because another rank failed ({detail})"


def agree_and_gather(
    error: BaseException | None,
    group: Any,
    what: str,
    payload: Any = None,
    *,
    error_type: type[RankFailedError] = RankFailedError,
    message: str = _FAILURE_MESSAGE,
) -> list[Any]:
    """:func:`agree` on failures and gather one value per rank, in a single ``all_gather_object``.

    Every rank calls it at the same point with the exception its own part raised (or ``None``) and a
    picklable ``payload`` (what it would report if all went well; ignored when ``error`` is given). A rank
    that failed re-raises its own exception; when another rank failed, every other rank raises
    ``error_type(message.format(what=what, detail=...))``, ``detail`` naming each failed rank and its
    error (``"rank 1: ValueError: ..."``). Otherwise returns every rank's payload in rank order.

    Args:
        error: this rank's exception, or ``None``.
        group: ``None`` (single process: re-raises ``error`` or returns ``[payload]``), or a process group
            (see :func:`resolve_group`).
        what: the work that stopped, for the message (e.g. ``"loading the checkpoint"``).
        payload: this rank's value to gather.
        error_type: :class:`RankFailedError` or a subclass of it, raised on the ranks that did not fail.
        message: the text of that error, with ``{what}`` and ``{detail}`` placeholders.

    Example:
        >>> agree_and_gather(None, None, "counting the rows", payload=128)  # single process
        [128]
    """
    if not (isinstance(error_type, type) and issubclass(error_type, RankFailedError)):
        raise TypeError(f"error_type must be RankFailedError or a subclass of it, got {error_type!r}")
    if group is None:
        if error is not None:
            raise error
        return [payload]
    text = None if error is None else f"{type(error).__name__}: {error}"
    reports = all_gather_objects((text, None if error is not None else payload), group)
    if error is not None:
        raise error
    failed = [(r, msg) for r, (msg, _) in enumerate(reports) if msg is not None]
    if failed:
        detail = "; ".join(f"rank {r}: {msg}" for r, msg in failed)
        raise error_type(message.format(what=what, detail=detail))
    return [value for _, value in reports]
