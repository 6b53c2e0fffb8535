"""Per-example losses for training and search.

Every loss here maps ``(prediction, target)`` to a tensor ``[B]`` of per-example losses, which is what
:func:`routing_search.local_search` needs for its fast row-restricted evaluation and what
:func:`routing_search.training.fit` averages for its gradient steps.

Shapes: a prediction ``[B, 1]`` is compared with a target ``[B]`` (and the reverse) by dropping the
trailing unit dimension; any other shape mismatch is an error (no silent broadcasting).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ._validation import check_positive_float

__all__ = ["mse_loss", "bce_with_logits_loss", "cross_entropy_loss", "multitask_loss", "LOSS_KINDS"]

PerExampleLoss = Callable[[Any, Any], torch.Tensor]


def _check_tensor(name: str, value: Any, *, floating: str | None = None) -> torch.Tensor:
    """``value`` as a tensor with a batch dimension; ``floating`` names the loss that needs float logits."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension, got a 0-dim tensor")
    if floating is not None and not value.is_floating_point():
        raise TypeError(f"{floating}: {name} must be floating-point logits, got dtype {value.dtype}")
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


def _per_example(values: torch.Tensor, what: str) -> torch.Tensor:
    """Mean over every dimension but the first: ``[B, ...] -> [B]`` (also for ``B = 0``)."""
    if values.dim() <= 1:
        return values
    width = math.prod(values.shape[1:])
    if width == 0:
        raise ValueError(f"{what}: predictions of shape {tuple(values.shape)} have no output units to average over")
    return values.reshape(values.shape[0], width).mean(dim=1)


def _check_range(what: str, target: torch.Tensor, low: float, high: float, accepted: str, *, closed: bool) -> None:
    """Refuse target values outside ``[low, high]`` (``[low, high)`` unless ``closed``) or NaN; one host sync."""
    if target.numel() == 0:
        return
    above = target > high if closed else target >= high
    if bool((~(target >= low) | above).any()):  # ~(t >= low) also catches NaN
        bad = target[~(target >= low) | above].flatten()[0].item()
        raise ValueError(f"{what}: targets must be {accepted}, got {bad!r}")


def _check_probabilities(what: str, target: torch.Tensor) -> None:
    """Refuse probability targets ``[B, C, ...]`` that are negative, NaN/inf or do not sum to 1 over the
    classes (dim 1) within ``max(1e-4, sqrt(eps))``: ``-sum t log p`` would be a wrong number. One host sync."""
    if target.numel() == 0:
        return
    tol = max(1e-4, math.sqrt(torch.finfo(target.dtype).eps))
    off = (target.sum(dim=1) - 1).abs().amax()
    summary = torch.stack([target.amin().to(off.dtype), off]).tolist()
    lowest, worst = summary
    if not (lowest >= 0 and worst <= tol):  # also NaN
        problem = f"a negative value ({lowest:.3g})" if lowest < 0 else (
            "NaN/inf values" if not (math.isfinite(lowest) and math.isfinite(worst))
            else f"a row whose sum over the classes is {worst:.3g} away from 1")
        raise ValueError(
            f"{what}: probability targets (the shape of the logits) must be non-negative and sum to 1 over "
            f"the classes; got {problem}. Pass class indices of shape [B] for hard labels"
        )


def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over the output dimensions: ``[B]``."""
    pred, target = _align(_check_tensor("pred", pred), _check_tensor("target", target), "mse_loss")
    # Integer predictions are compared in a floating dtype (never by truncating a float target to them).
    dtype = pred.dtype if pred.is_floating_point() else target.dtype if target.is_floating_point() else torch.get_default_dtype()
    return _per_example((pred.to(dtype) - target.to(dtype)) ** 2, "mse_loss")


def bce_with_logits_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on logits (targets in [0, 1]) averaged over the output dimensions: ``[B]``.

    Targets outside ``[0, 1]`` (e.g. labels in {-1, 1}) or NaN are refused: the formula would return
    a finite but meaningless (possibly negative) loss.
    """
    what = "bce_with_logits_loss"
    pred, target = _align(_check_tensor("pred", pred, floating=what), _check_tensor("target", target), what)
    _check_range(what, target, 0.0, 1.0, "in [0, 1] (labels 0/1 or probabilities)", closed=True)
    return _per_example(F.binary_cross_entropy_with_logits(pred, target.to(pred.dtype), reduction="none"), what)


def cross_entropy_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits ``[B, C]`` against class indices ``[B]`` (or probabilities ``[B, C]``): ``[B]``.

    Integer-valued floating targets ``[B]`` (e.g. a column of a ``[B, T]`` float target matrix) are
    accepted as class indices. Every class index must be in ``[0, C)``: torch's ``ignore_index=-100``
    does not apply (a -100 would silently get loss 0).
    """
    what = "cross_entropy_loss"
    pred = _check_tensor("pred", pred, floating=what)
    target = _check_tensor("target", target)
    if target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"{what}: target must hold class indices (integers) or probabilities (floats), got dtype {target.dtype}")
    if pred.dim() < 2:
        raise ValueError(f"cross_entropy_loss: prediction must be logits [B, C], got shape {tuple(pred.shape)}")
    if target.dim() == pred.dim() and target.shape[-1] == 1 and pred.shape[1] != 1:
        target = target.squeeze(-1)
    if target.shape == pred.shape and target.is_floating_point():
        _check_probabilities(what, target)
        return _per_example(F.cross_entropy(pred, target.to(pred.dtype), reduction="none"), what)
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
    elif target.dtype != torch.long:
        target = target.long()  # int32 / int16 / uint8 indices: F.cross_entropy takes only int64 (and uint8)
    classes = pred.shape[1]
    _check_range(what, target, 0, classes, f"class indices in [0, {classes})", closed=False)
    return _per_example(F.cross_entropy(pred, target, reduction="none"), what)


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
        task_weights = [check_positive_float(f"weights[{t}]", w, allow_zero=True) for t, w in enumerate(weights)]
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
