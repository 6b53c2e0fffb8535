"""Guards of a local search: validation metrics that an accepted move must not make worse.

A search lowers the loss it is given; the metric the user reports (e.g. one task's ROC AUC) can still
drop. A guard is a metric ``metric(predictions, targets) -> float`` with a direction: with
``guard=`` set, :func:`routing_search.search.local_search` accepts a move that lowers the loss only if
every guarded metric, computed on the whole evaluation data with the move's predictions, is not worse
than its value **at the start of the search** by more than its ``tolerance`` (in the metric's units).

Relative to the start, not to the current state: a chain of moves that each cost a little less than the
tolerance could otherwise drift arbitrarily far; against the start the total loss of the metric over the
whole search is bounded by the tolerance.

Any object with ``__call__(predictions, targets)`` and a ``greater_is_better`` attribute is accepted
as it is (e.g. :class:`routing_search.training.TaskMetric`, whose tolerance is 0 and name its repr); a
plain callable is taken as a metric where greater is better.

Example:
    >>> import torch
    >>> accuracy = MetricGuard(lambda p, y: float(((p > 0) == (y > 0)).float().mean()), name="acc", tolerance=0.01)
    >>> guards = check_guards(accuracy)
    >>> guards[0].name, guards[0].tolerance
    ('acc', 0.01)
    >>> worse_by(guards[0], start=0.9, value=0.885)
    0.015000000000000013
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .._validation import check_positive_float

__all__ = [
    "MetricGuard", "check_guards", "evaluate_guards", "guard_name", "guard_tolerance", "worse_by",
    "check_guard_start", "guards_violated", "guard_report",
]


@dataclass(frozen=True)
class MetricGuard:
    """A validation metric a search must not make worse.

    Attributes:
        metric: ``metric(predictions, targets) -> float`` on the whole evaluation data; ``predictions`` is
            what the model returns (an MoE's output tensor, a multi-gate MoE's list of per-task outputs),
            detached; ``targets`` is the evaluation data's targets.
        greater_is_better: the metric's direction (True for AUC or accuracy, False for an error).
        tolerance: how much worse than at the start of the search the metric may get (>= 0, in the
            metric's units).
        name: shown in messages and in ``result.guard``; default: the metric's ``__name__`` or repr.
    """

    metric: Callable[[Any, Any], float]
    greater_is_better: bool = True
    tolerance: float = 0.0
    name: str = ""

    def __post_init__(self) -> None:
        if not callable(self.metric):
            raise TypeError(f"guard: MetricGuard.metric must be callable(predictions, targets) -> float, got {type(self.metric).__name__}")
        if not isinstance(self.greater_is_better, bool):
            raise TypeError(f"guard: MetricGuard.greater_is_better must be True or False, got {self.greater_is_better!r}")
        object.__setattr__(self, "tolerance", check_positive_float("guard tolerance", self.tolerance, allow_zero=True))
        if not isinstance(self.name, str):
            raise TypeError(f"guard: MetricGuard.name must be a string, got {type(self.name).__name__}")
        if not self.name:
            object.__setattr__(self, "name", str(getattr(self.metric, "__name__", None) or repr(self.metric)))

    def __call__(self, predictions: Any, targets: Any) -> float:
        """The metric's value."""
        return float(self.metric(predictions, targets))


def check_guards(guard: Any) -> tuple[Any, ...]:
    """The ``guard`` option as a tuple of guards (``None`` → empty).

    Accepts one guard or a list/tuple of them; a guard is a :class:`MetricGuard`, any object with
    ``__call__`` and a bool ``greater_is_better`` (kept as it is), or a plain callable (wrapped as a
    ``MetricGuard`` where greater is better, tolerance 0).
    """
    if guard is None:
        return ()
    items = list(guard) if isinstance(guard, (list, tuple)) else [guard]
    out: list[Any] = []
    for i, item in enumerate(items):
        if isinstance(item, MetricGuard):
            out.append(item)
        elif callable(item) and hasattr(item, "greater_is_better"):
            if not isinstance(item.greater_is_better, bool):
                raise TypeError(f"guard[{i}].greater_is_better must be True or False, got {item.greater_is_better!r}")
            out.append(item)
        elif callable(item):
            out.append(MetricGuard(item))
        else:
            raise TypeError(
                f"guard must be None, a metric callable(predictions, targets) -> float, a MetricGuard, an object with "
                f"__call__ and greater_is_better (e.g. a TaskMetric), or a list of these; guard[{i}] is {type(item).__name__}"
            )
    names = [guard_name(g) for g in out]
    if len(set(names)) != len(names):
        raise ValueError(f"guard: the guards' names must differ (they label result.guard), got {names}; set MetricGuard(name=...)")
    return tuple(out)


def guard_name(guard: Any) -> str:
    """A guard's label: a ``MetricGuard``'s ``name``, else the object's repr."""
    return guard.name if isinstance(guard, MetricGuard) else repr(guard)


def guard_tolerance(guard: Any) -> float:
    """A guard's tolerance: a ``MetricGuard``'s ``tolerance``, 0 for every other guard (a ``TaskMetric`` or
    any object taken as it is, whatever attributes it has: wrap it in ``MetricGuard(tolerance=...)`` to allow some)."""
    return float(getattr(guard, "tolerance", 0.0)) if isinstance(guard, MetricGuard) else 0.0


def worse_by(guard: Any, start: float, value: float) -> float:
    """How much worse ``value`` is than ``start`` in the guard's direction (negative: better; inf: not finite)."""
    if not math.isfinite(value):
        return math.inf
    return start - value if guard.greater_is_better else value - start


def evaluate_guards(guards: Sequence[Any], predictions: Any, targets: Any) -> list[float]:
    """Every guard's value on ``predictions`` and ``targets``."""
    return [float(g(predictions, targets)) for g in guards]


def check_guard_start(guards: Sequence[Any], start: Sequence[float], where: str = "the search") -> None:
    """Raise ``ValueError`` naming every guard whose reference value ``start`` is not finite."""
    bad = [guard_name(g) for g, v in zip(guards, start) if not math.isfinite(v)]
    if bad:
        raise ValueError(
            f"guard: the metric(s) {bad} are not finite at the start of {where} ({list(start)}); "
            "a guard needs a finite value on the evaluation data (e.g. ROC AUC needs both classes)"
        )


def guards_violated(guards: Sequence[Any], start: Sequence[float], values: Sequence[float]) -> bool:
    """Whether some guard's ``values`` entry is worse than its ``start`` by more than its tolerance."""
    return any(worse_by(g, v0, v) > guard_tolerance(g) for g, v0, v in zip(guards, start, values))


def guard_report(guards: Sequence[Any], start: Sequence[float], end: Sequence[float]) -> dict[str, dict[str, Any]] | None:
    """``{name: {'start', 'end', 'tolerance', 'greater_is_better'}}`` (``None`` without guards), as ``result.guard``."""
    if not guards:
        return None
    return {
        guard_name(g): {"start": v0, "end": v, "tolerance": guard_tolerance(g), "greater_is_better": bool(g.greater_is_better)}
        for g, v0, v in zip(guards, start, end)
    }
