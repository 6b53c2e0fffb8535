"""Per-task validation metrics for :func:`~routing_search.training.fit`, computed with scikit-learn.

A *metric* is any callable ``metric(predictions, targets) -> float``. ``fit(metrics={name: metric})``
calls it once per epoch on the whole validation set: ``predictions`` is what the model returns,
unwrapped (``MoE.output``; a list with one tensor per task for ``MultiGateMoE``) and concatenated over
the evaluation batches; ``targets`` is the validation targets (a tensor, a list of per-task tensors, or
a ``[B, T]`` tensor).

The factories below return :class:`TaskMetric` objects, which also say in which direction they improve
(``fit(select_by=...)`` uses it to restore the best epoch):

======================  ============================================  ==========
factory                 predictions                                   better
======================  ============================================  ==========
:func:`roc_auc`         binary scores/logits ``[B]`` / ``[B, 1]``;    higher
                        multiclass logits ``[B, C]`` (one-vs-rest)
:func:`accuracy`        binary logits (``> threshold``) or ``[B, C]``  higher
:func:`log_loss`        logits (sigmoid / softmax applied)            lower
:func:`mse`             regression ``[B]`` / ``[B, D]``               lower
:func:`mae`             regression ``[B]`` / ``[B, D]``               lower
:func:`r2`              regression ``[B]`` / ``[B, D]``               higher
======================  ============================================  ==========

``task`` picks one task's prediction and target: entry ``task`` of a list/tuple, or column ``task`` of
a ``[B, T]`` tensor. ``task=None`` (the default) uses the values as they are (a single-task model).

Example:
    >>> import torch
    >>> auc = roc_auc(task=0)
    >>> preds = [torch.tensor([[2.0], [-1.0], [0.5], [-3.0]]), torch.zeros(4, 1)]
    >>> targets = [torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.zeros(4)]
    >>> auc(preds, targets), auc.mode
    (1.0, 'max')
    >>> accuracy()(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    0.5
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn import metrics as skm

from .._validation import check_int

__all__ = ["TaskMetric", "roc_auc", "accuracy", "log_loss", "mse", "mae", "r2", "metrics_for_tasks", "METRIC_KINDS"]

ArrayFn = Callable[[np.ndarray, np.ndarray], float]


def _to_numpy(value: Any, what: str, where: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu")
        if value.is_floating_point() and value.dtype != torch.float64:
            value = value.to(torch.float64)
        return value.numpy()
    if isinstance(value, np.ndarray):
        return value
    raise TypeError(f"{where}: {what} must be a tensor (or a list of per-task tensors), got {type(value).__name__}")


def _select(value: Any, task: int | None, what: str, where: str) -> np.ndarray:
    """Task ``task``'s entry of ``value`` (list/tuple entry or ``[B, T]`` column) as a numpy array."""
    if isinstance(value, Mapping):
        raise TypeError(f"{where}: {what} must be a tensor or a list of per-task tensors, got a mapping")
    if isinstance(value, (list, tuple)):
        if task is None:
            if len(value) != 1:
                raise ValueError(
                    f"{where}: {what} is a list of {len(value)} per-task values; pass task=<index> to choose one"
                )
            return _to_numpy(value[0], what, where)
        if not 0 <= task < len(value):
            raise ValueError(f"{where}: task={task} is out of range for {len(value)} per-task {what}")
        return _to_numpy(value[task], what, where)
    array = _to_numpy(value, what, where)
    if task is None:
        return array
    if array.ndim != 2 or not 0 <= task < array.shape[1]:
        raise ValueError(
            f"{where}: with task={task}, {what} must be a list of per-task tensors or a [B, T] tensor with "
            f"T > {task}, got shape {array.shape}"
        )
    return array[:, task]


def _squeeze(array: np.ndarray) -> np.ndarray:
    return array[:, 0] if array.ndim == 2 and array.shape[1] == 1 else array


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * logits))


def _labels(targets: np.ndarray, where: str) -> np.ndarray:
    """Integer class labels from integer or whole-valued floating targets."""
    targets = _squeeze(targets)
    if targets.ndim != 1:
        raise ValueError(f"{where}: class targets must have shape [B] or [B, 1], got {targets.shape}")
    if np.issubdtype(targets.dtype, np.floating):
        if not np.array_equal(targets, np.round(targets)):
            raise ValueError(f"{where}: class targets must be whole numbers (0/1 for a binary task)")
    return targets.astype(np.int64)


def _check_binary(labels: np.ndarray, where: str) -> None:
    bad = np.setdiff1d(np.unique(labels), [0, 1])
    if bad.size:
        raise ValueError(f"{where}: binary targets must be 0 or 1, found {bad[:5].tolist()}")


@dataclass(frozen=True)
class TaskMetric:
    """A named per-task metric: ``metric(predictions, targets) -> float``.

    Attributes:
        name: the metric's kind (``'roc_auc'``, ``'accuracy'``, ...).
        task: the task it reads (``None``: the whole prediction / target).
        greater_is_better: the direction in which the metric improves.
    """

    name: str
    task: int | None
    greater_is_better: bool
    compute: ArrayFn

    @property
    def mode(self) -> str:
        """``'max'`` when greater is better, else ``'min'`` (the ``select_mode`` of ``fit``)."""
        return "max" if self.greater_is_better else "min"

    def __call__(self, predictions: Any, targets: Any) -> float:
        """The metric on one task's predictions and targets (first dimension: rows)."""
        where = f"{self.name}(task={self.task})"
        pred = _select(predictions, self.task, "predictions", where)
        target = _select(targets, self.task, "targets", where)
        if pred.shape[0] != target.shape[0]:
            raise ValueError(f"{where}: {pred.shape[0]} predictions for {target.shape[0]} targets")
        if pred.shape[0] == 0:
            raise ValueError(f"{where}: no rows to evaluate")
        for array, what in ((pred, "predictions"), (target, "targets")):
            if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
                raise ValueError(f"{where}: {what} contain NaN/inf values")
        return float(self.compute(pred, target))

    def __repr__(self) -> str:
        return f"{self.name}(task={self.task})"


def _task(task: Any) -> int | None:
    return None if task is None else check_int("task", task, minimum=0)


# ------------------------------------------------------------------------------------ classification
def roc_auc(task: int | None = None) -> TaskMetric:
    """Area under the ROC curve (scikit-learn ``roc_auc_score``); higher is better.

    Binary: predictions are scores ``[B]`` / ``[B, 1]`` (logits or probabilities: AUC only uses their
    order), targets 0/1. Multiclass: logits ``[B, C]`` (softmax applied) against class indices,
    one-vs-rest macro average. With a single class present in the targets the AUC is undefined:
    scikit-learn warns and the value is NaN.
    """

    def compute(pred: np.ndarray, target: np.ndarray) -> float:
        labels = _labels(target, "roc_auc")
        pred = _squeeze(pred)
        if pred.ndim == 1:
            _check_binary(labels, "roc_auc")
            return skm.roc_auc_score(labels, pred)
        return skm.roc_auc_score(labels, _softmax(pred), multi_class="ovr", labels=np.arange(pred.shape[1]))

    return TaskMetric("roc_auc", _task(task), True, compute)


def accuracy(task: int | None = None, *, threshold: float = 0.0) -> TaskMetric:
    """Fraction of correct predictions (scikit-learn ``accuracy_score``); higher is better.

    Multiclass logits ``[B, C]``: the arg-max class. Binary ``[B]`` / ``[B, 1]``: class 1 where the
    prediction is ``> threshold`` (0 for logits, the default; use 0.5 for probabilities).
    """
    threshold = float(threshold)

    def compute(pred: np.ndarray, target: np.ndarray) -> float:
        labels = _labels(target, "accuracy")
        pred = _squeeze(pred)
        if pred.ndim == 1:
            _check_binary(labels, "accuracy")
            return skm.accuracy_score(labels, (pred > threshold).astype(np.int64))
        return skm.accuracy_score(labels, pred.argmax(axis=1))

    return TaskMetric("accuracy", _task(task), True, compute)


def log_loss(task: int | None = None, *, from_logits: bool = True) -> TaskMetric:
    """Cross-entropy of the predicted probabilities (scikit-learn ``log_loss``); lower is better.

    ``from_logits=True`` (default): a sigmoid (binary ``[B]``) or softmax (``[B, C]``) turns the logits
    into probabilities; ``False``: the predictions already are probabilities.
    """

    def compute(pred: np.ndarray, target: np.ndarray) -> float:
        labels = _labels(target, "log_loss")
        pred = _squeeze(pred)
        if pred.ndim == 1:
            _check_binary(labels, "log_loss")
            p1 = _sigmoid(pred) if from_logits else pred
            return skm.log_loss(labels, np.stack([1 - p1, p1], axis=1), labels=[0, 1])
        probs = _softmax(pred) if from_logits else pred
        return skm.log_loss(labels, probs, labels=np.arange(pred.shape[1]))

    return TaskMetric("log_loss", _task(task), False, compute)


# ---------------------------------------------------------------------------------------- regression
def _regression(pred: np.ndarray, target: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    pred, target = _squeeze(pred), _squeeze(target)
    if pred.shape != target.shape:
        raise ValueError(f"{where}: prediction shape {pred.shape} does not match target shape {target.shape}")
    return pred, target.astype(np.float64)


def mse(task: int | None = None) -> TaskMetric:
    """Mean squared error (scikit-learn ``mean_squared_error``, averaged over output columns); lower is better."""
    return TaskMetric("mse", _task(task), False, lambda p, t: skm.mean_squared_error(*_regression(p, t, "mse")[::-1]))


def mae(task: int | None = None) -> TaskMetric:
    """Mean absolute error (scikit-learn ``mean_absolute_error``); lower is better."""
    return TaskMetric("mae", _task(task), False, lambda p, t: skm.mean_absolute_error(*_regression(p, t, "mae")[::-1]))


def r2(task: int | None = None) -> TaskMetric:
    """Coefficient of determination (scikit-learn ``r2_score``); higher is better."""
    return TaskMetric("r2", _task(task), True, lambda p, t: skm.r2_score(*_regression(p, t, "r2")[::-1]))


METRIC_KINDS: dict[str, tuple[Callable[..., TaskMetric], ...]] = {
    "binary": (roc_auc, accuracy),
    "regression": (mse,),
    "multiclass": (accuracy,),
}


def metrics_for_tasks(tasks: Sequence[Any]) -> dict[str, TaskMetric]:
    """The papers' metrics for each task, named ``'<task>/<metric>'``, ready for ``fit(metrics=...)``.

    Args:
        tasks: per task, its kind (``'binary'`` → ROC AUC and accuracy, ``'regression'`` → MSE,
            ``'multiclass'`` → accuracy) or an object with ``.kind`` and ``.name`` (e.g. a
            :class:`~routing_search.data.TaskSpec`). Tasks given as strings are named ``task0``, ``task1``, ...

    Example:
        >>> sorted(metrics_for_tasks(["binary", "regression"]))
        ['task0/accuracy', 'task0/roc_auc', 'task1/mse']
    """
    if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Sequence):
        raise TypeError(f"tasks must be a sequence of task kinds or TaskSpec objects, got {tasks!r}")
    single = len(tasks) == 1
    out: dict[str, TaskMetric] = {}
    for t, spec in enumerate(tasks):
        kind = spec if isinstance(spec, str) else getattr(spec, "kind", None)
        name = f"task{t}" if isinstance(spec, str) else str(getattr(spec, "name", f"task{t}"))
        if kind not in METRIC_KINDS:
            raise ValueError(f"tasks[{t}] has kind {kind!r}; accepted kinds are {', '.join(map(repr, METRIC_KINDS))}")
        for factory in METRIC_KINDS[kind]:
            metric = factory(None if single else t)
            out[f"{name}/{metric.name}"] = metric
    return out
