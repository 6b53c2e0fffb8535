"""Per-example losses for training and search.

Every loss here maps ``(prediction, target)`` to a tensor ``[B]`` of per-example losses, which is what
:func:`routing_search.local_search` needs for its fast row-restricted evaluation and what
:func:`routing_search.training.fit` averages for its gradient steps.

Shapes: a prediction ``[B, 1]`` is compared with a target ``[B]`` (and the reverse) by dropping the
trailing unit dimension; any other shape mismatch is an error (no silent broadcasting).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["mse_loss", "bce_with_logits_loss", "cross_entropy_loss", "multitask_loss", "LOSS_KINDS"]

PerExampleLoss = Callable[[Any, Any], torch.Tensor]


def _check_tensor(name: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension, got a 0-dim tensor")
    return value


def _align(pred: torch.Tensor, target: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop a trailing unit dimension so that ``[B, 1]`` and ``[B]`` match; otherwise shapes must be equal."""
    if pred.dim() == target.dim() + 1 and pred.shape[-1] == 1:
        pred = pred.squeeze(-1)
    elif target.dim() == pred.dim() + 1 and target.shape[-1] == 1:
        target = target.squeeze(-1)
    if pred.shape != target.shape:
        raise ValueError(f"{what}: prediction shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}")
    return pred, target


def _per_example(values: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: ``[B, ...] -> [B]``."""
    return values.reshape(values.shape[0], -1).mean(dim=1) if values.dim() > 1 else values


def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over the output dimensions: ``[B]``."""
    pred, target = _align(_check_tensor("pred", pred), _check_tensor("target", target), "mse_loss")
    return _per_example((pred - target.to(pred.dtype)) ** 2)


def bce_with_logits_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on logits (targets in [0, 1]) averaged over the output dimensions: ``[B]``."""
    pred, target = _align(_check_tensor("pred", pred), _check_tensor("target", target), "bce_with_logits_loss")
    return _per_example(F.binary_cross_entropy_with_logits(pred, target.to(pred.dtype), reduction="none"))


def cross_entropy_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits ``[B, C]`` against class indices ``[B]`` (or probabilities ``[B, C]``): ``[B]``.

    Integer-valued floating targets ``[B]`` (e.g. a column of a ``[B, T]`` float target matrix) are
    accepted as class indices.
    """
    pred = _check_tensor("pred", pred)
    target = _check_tensor("target", target)
    if pred.dim() < 2:
        raise ValueError(f"cross_entropy_loss: prediction must be logits [B, C], got shape {tuple(pred.shape)}")
    if target.dim() == pred.dim() and target.shape[-1] == 1 and pred.shape[1] != 1:
        target = target.squeeze(-1)
    if target.shape == pred.shape and target.is_floating_point():
        return _per_example(F.cross_entropy(pred, target.to(pred.dtype), reduction="none"))
    expected = (pred.shape[0],) + tuple(pred.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"cross_entropy_loss: target must be class indices of shape {list(expected)} or probabilities of shape "
            f"{list(pred.shape)}, got {tuple(target.shape)}"
        )
    if target.is_floating_point():
        if not bool(torch.equal(target, target.round())):
            raise ValueError("cross_entropy_loss: floating-point class-index targets must hold whole numbers")
        target = target.long()
    return _per_example(F.cross_entropy(pred, target, reduction="none"))


LOSS_KINDS: dict[str, PerExampleLoss] = {
    "mse": mse_loss,
    "bce": bce_with_logits_loss,
    "cross_entropy": cross_entropy_loss,
}


def _task_item(values: Any, t: int, count: int, name: str) -> torch.Tensor:
    """Task ``t``'s entry of a list/tuple (length ``count``) or column ``t`` of a ``[B, count]`` tensor."""
    if isinstance(values, (list, tuple)):
        if len(values) != count:
            raise ValueError(f"multitask_loss: expected {count} {name} (one per task), got {len(values)}")
        return values[t]
    if isinstance(values, Mapping):
        raise TypeError(f"multitask_loss: {name} must be a list of tensors or a [B, T] tensor, got a mapping")
    if isinstance(values, torch.Tensor):
        if count == 1:
            return values  # a single task: the tensor is that task's prediction / target
        if values.dim() != 2 or values.shape[1] != count:
            raise ValueError(
                f"multitask_loss: {name} given as one tensor must have shape [B, {count}] (one column per task), "
                f"got {tuple(values.shape)}"
            )
        return values[:, t]
    raise TypeError(f"multitask_loss: {name} must be a list of tensors or a [B, T] tensor, got {type(values).__name__}")


def multitask_loss(kinds: Sequence[str], weights: Sequence[float] | None = None) -> Callable[[Any, Any], torch.Tensor]:
    """Weighted sum of per-task per-example losses: ``Σ_t weights[t] · loss_t(preds[t], targets[t])`` → ``[B]``.

    Args:
        kinds: one of ``'mse'``, ``'bce'`` (binary cross-entropy on logits), ``'cross_entropy'`` per task.
        weights: one weight per task (default 1 each). The DSelect-k / COMET MovieLens loss
            ``α·L1 + (1−α)·L2`` is ``weights=[α, 1 − α]``.

    The returned callable takes ``preds`` (a list with one prediction per task, as a ``MultiGateMoE``
    returns, or a ``[B, T]`` tensor when no task is ``'cross_entropy'``) and ``targets`` (a ``[B, T]``
    tensor or a list of per-task targets).
    """
    if isinstance(kinds, str) or not isinstance(kinds, Sequence):
        raise TypeError(f"kinds must be a sequence of loss names (one per task), got {kinds!r}")
    kinds = list(kinds)
    if not kinds:
        raise ValueError("kinds must name at least one task loss")
    for t, kind in enumerate(kinds):
        if kind not in LOSS_KINDS:
            raise ValueError(f"kinds[{t}]={kind!r} is not a known loss; choose from {', '.join(map(repr, LOSS_KINDS))}")
    if weights is None:
        task_weights = [1.0] * len(kinds)
    else:
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
            raise TypeError(f"weights must be a sequence of numbers (one per task) or None, got {weights!r}")
        if len(weights) != len(kinds):
            raise ValueError(f"weights has {len(weights)} entries but kinds has {len(kinds)}; give one weight per task")
        task_weights = [float(w) for w in weights]
    fns = [LOSS_KINDS[k] for k in kinds]
    count = len(kinds)
    has_ce = "cross_entropy" in kinds

    def loss(preds: Any, targets: Any) -> torch.Tensor:
        if isinstance(preds, torch.Tensor) and has_ce and count > 1:
            raise TypeError("multitask_loss with a 'cross_entropy' task needs preds as a list (one tensor per task)")
        total: torch.Tensor | None = None
        for t in range(count):
            value = task_weights[t] * fns[t](_task_item(preds, t, count, "predictions"), _task_item(targets, t, count, "targets"))
            total = value if total is None else total + value
        assert total is not None
        return total

    loss.kinds = tuple(kinds)  # type: ignore[attr-defined]
    loss.weights = tuple(task_weights)  # type: ignore[attr-defined]
    return loss
