"""The container every dataset loader returns: train / validation / test splits of a multi-task problem.

Each split is a batch ``(inputs, targets)`` in the form ``fit``, ``local_search`` and the layers take:
``inputs`` is a dict of keyword arguments for the model (always ``'x'``; ``'key'`` when the examples carry
an integer routing key such as a user id, for :class:`~routing_search.Hash`), ``targets`` a list with one
tensor per task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .._validation import check_choice

__all__ = ["TaskSpec", "Split", "TaskDataset", "TASK_KINDS"]

TASK_KINDS = ("binary", "regression", "multiclass")


@dataclass(frozen=True)
class TaskSpec:
    """One task: its name, its kind (``'binary'``, ``'regression'`` or ``'multiclass'``) and, for
    ``'multiclass'``, the number of classes."""

    name: str
    kind: str
    num_classes: int | None = None

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, TASK_KINDS)
        if (self.kind == "multiclass") != (self.num_classes is not None):
            raise ValueError(f"num_classes must be given exactly for kind='multiclass' (task {self.name!r})")


@dataclass
class Split:
    """One split: ``inputs`` (dict of tensors with a batch dimension) and ``targets`` (one tensor per task)."""

    inputs: dict[str, torch.Tensor]
    targets: list[torch.Tensor]

    def __post_init__(self) -> None:
        if "x" not in self.inputs:
            raise ValueError(f"Split.inputs must hold 'x', got keys {sorted(self.inputs)}")
        rows = {t.shape[0] for t in self.inputs.values()} | {t.shape[0] for t in self.targets}
        if len(rows) != 1:
            raise ValueError(f"every input and target of a Split must have the same number of rows, got {sorted(rows)}")

    def __len__(self) -> int:
        return int(self.inputs["x"].shape[0])

    def as_pair(self) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """``(inputs, targets)``, the batch form the trainer and the search take."""
        return self.inputs, self.targets


@dataclass
class TaskDataset:
    """What a loader returns.

    Attributes:
        name: the dataset's name.
        train, val, test: the three splits (disjoint; deterministic given the loader's seed).
        tasks: one :class:`TaskSpec` per task, in the order of every split's ``targets``.
        num_keys: number of distinct values of ``inputs['key']`` (None when there is no key).
        info: provenance (source file, seed, counts, anything the loader wants to report).
    """

    name: str
    train: Split
    val: Split
    test: Split
    tasks: list[TaskSpec]
    num_keys: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tasks(self) -> int:
        """Number of tasks."""
        return len(self.tasks)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example's ``x`` (without the batch dimension)."""
        return tuple(self.train.inputs["x"].shape[1:])
