"""Callbacks of :func:`~routing_search.training.fit`: called at the end of every epoch and after every search.

A callback is either a callable ``callback(event)`` called for every event, or an object with
``on_epoch_end(event)`` and/or ``on_search(event)`` methods. Returning ``True`` or calling
:meth:`FitEvent.request_stop` ends training: after an epoch's end, at once; after a search inside an
epoch, once that epoch has been evaluated, recorded and checkpointed.

Example:
    >>> def stop_when_good(event):
    ...     if event.kind == "epoch_end" and event.val_loss is not None and event.val_loss < 0.1:
    ...         event.request_stop("validation loss below 0.1")
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .history import History

__all__ = ["FitEvent", "EVENT_KINDS", "check_callbacks", "dispatch"]

EVENT_KINDS = ("epoch_end", "search")


@dataclass
class FitEvent:
    """What a callback sees.

    Attributes:
        kind: ``'epoch_end'`` or ``'search'``.
        epoch: the epoch (0-based) in progress or just finished.
        step: optimiser steps taken so far.
        model: the model being trained.
        optimizer: its optimiser.
        history: the run's :class:`~routing_search.training.History` so far (the epoch's entries are
            recorded before ``'epoch_end'``).
        val_loss: the epoch's validation loss (``'epoch_end'`` with ``val_data``), else None.
        metrics: the epoch's validation metrics (``'epoch_end'``), else empty.
        search: the search's record (``'search'``; as in ``History.searches``), else None.
        stop_requested / stop_reason: set by :meth:`request_stop`.
    """

    kind: str
    epoch: int
    step: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    history: History
    val_loss: float | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    search: Mapping[str, Any] | None = None
    stop_requested: bool = False
    stop_reason: str = ""

    def request_stop(self, reason: str = "") -> None:
        """Ask ``fit`` to stop training (see the module docstring for when it stops)."""
        self.stop_requested = True
        self.stop_reason = str(reason)


_METHODS = {"epoch_end": "on_epoch_end", "search": "on_search"}


def check_callbacks(callbacks: Any) -> list[Any]:
    """``callbacks`` as a list, each checked to be callable or to have ``on_epoch_end`` / ``on_search``."""
    if callbacks is None:
        return []
    if callable(callbacks) or any(hasattr(callbacks, m) for m in _METHODS.values()):
        callbacks = [callbacks]
    if isinstance(callbacks, (str, bytes)) or not isinstance(callbacks, Sequence):
        raise TypeError(f"callbacks must be a list of callables / callback objects, got {type(callbacks).__name__}")
    for index, cb in enumerate(callbacks):
        if not callable(cb) and not any(callable(getattr(cb, m, None)) for m in _METHODS.values()):
            raise TypeError(
                f"callbacks[{index}] must be callable(event) or have on_epoch_end(event) / on_search(event), "
                f"got {type(cb).__name__}"
            )
    return list(callbacks)


def _handler(callback: Any, kind: str) -> Callable[[FitEvent], Any] | None:
    method = getattr(callback, _METHODS[kind], None)
    if callable(method):
        return method
    if any(callable(getattr(callback, m, None)) for m in _METHODS.values()):
        return None  # an object with handlers for other events only
    return callback if callable(callback) else None


def dispatch(callbacks: Sequence[Any], event: FitEvent) -> FitEvent:
    """Call every callback's handler for ``event.kind``; a ``True`` return value requests a stop."""
    for callback in callbacks:
        handler = _handler(callback, event.kind)
        if handler is not None and handler(event) is True and not event.stop_requested:
            event.request_stop(f"{getattr(callback, '__name__', type(callback).__name__)} returned True")
    return event
