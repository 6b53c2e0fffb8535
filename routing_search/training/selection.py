"""Which epoch is best: ``fit``'s ``select_by`` / ``select_mode`` criterion, early stopping and best weights."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .._validation import check_choice

__all__ = ["Selection", "SELECT_MODES", "resolve_select_mode"]

SELECT_MODES = ("min", "max")


def resolve_select_mode(select_by: Any, select_mode: Any, metrics: Mapping[str, Any]) -> tuple[str, str]:
    """Check ``select_by`` (``'val_loss'`` or a key of ``metrics``) and find its direction.

    ``select_mode=None`` takes the direction from the metric's ``mode`` attribute (the
    :mod:`~routing_search.training.task_metrics` factories set it); ``'min'`` for ``'val_loss'``.
    """
    if not isinstance(select_by, str):
        raise TypeError(f"select_by must be 'val_loss' or the name of one of the metrics, got {select_by!r}")
    if select_by != "val_loss" and select_by not in metrics:
        names = ", ".join(map(repr, ["val_loss", *metrics]))
        raise ValueError(f"select_by={select_by!r} is neither 'val_loss' nor a key of metrics; choose from {names}")
    if select_mode is not None:
        return select_by, check_choice("select_mode", select_mode, SELECT_MODES)
    if select_by == "val_loss":
        return select_by, "min"
    mode = getattr(metrics[select_by], "mode", None)
    if mode not in SELECT_MODES:
        raise ValueError(
            f"select_mode is needed for select_by={select_by!r}: say whether larger ('max') or smaller ('min') "
            "values are better (metrics from routing_search.training.task_metrics carry their direction)"
        )
    return select_by, mode


class Selection:
    """Tracks the best epoch by one criterion, early stopping, and (optionally) the best weights.

    Args:
        select_by: ``'val_loss'`` or a metric name.
        mode: ``'min'`` or ``'max'``.
        patience: stop after this many epochs without improvement (None: never).
        keep_best: keep a CPU copy of the best epoch's model state.
    """

    def __init__(self, select_by: str, mode: str, *, patience: int | None, keep_best: bool) -> None:
        self.select_by = select_by
        self.mode = check_choice("select_mode", mode, SELECT_MODES)
        self.patience = patience
        self.keep_best = keep_best
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.best_val: float | None = None
        self.bad_epochs = 0
        self.best_state: dict[str, torch.Tensor] | None = None

    def _better(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best_score is None:
            return True
        return value < self.best_score if self.mode == "min" else value > self.best_score

    def update(self, epoch: int, val_loss: float | None, metrics: Mapping[str, float], model: nn.Module) -> bool:
        """Record an epoch's results; returns True when it is the new best."""
        if val_loss is not None and (self.best_val is None or val_loss < self.best_val):
            self.best_val = val_loss
        value = val_loss if self.select_by == "val_loss" else metrics.get(self.select_by)
        if value is None:
            return False
        if self._better(float(value)):
            self.best_score, self.best_epoch, self.bad_epochs = float(value), epoch, 0
            if self.keep_best:
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        """True when ``patience`` epochs in a row brought no improvement."""
        return self.patience is not None and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        """Plain values and tensors (weights_only-loadable)."""
        return {
            "select_by": self.select_by,
            "mode": self.mode,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "best_val": self.best_val,
            "bad_epochs": self.bad_epochs,
            "best_state": self.best_state if self.keep_best else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (also reads the early-stopping state of older checkpoints)."""
        self.best_val = state.get("best_val")
        self.bad_epochs = int(state.get("bad_epochs", 0))
        if "best_score" in state:
            self.best_score, self.best_epoch = state["best_score"], state["best_epoch"]
        else:  # written before select_by existed: the criterion was the validation loss
            self.best_score, self.best_epoch = self.best_val, None
        self.best_state = state.get("best_state") if self.keep_best else None
