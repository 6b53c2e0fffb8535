"""Evaluation on held-out data: mean task loss, per-layer expert usage, metrics, and the routing layers' inputs.

Everything is accumulated as sums and row counts (a distributed run reduces those sums across ranks in one
place, :func:`evaluate`), and predictions are concatenated on the CPU for the metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..batches import as_batch, call_model, eval_mode, unwrap_prediction
from ..layers.moe import MoE
from ..layers.multigate import MultiGateMoE
from ..distributed import agree
from .data_source import BatchSource, check_finite_targets
from .distributed_training import reduce_evaluation, resolve_context

__all__ = ["EvalResult", "evaluate", "routing_layers", "permutations_of"]

Metric = Callable[[Any, Any], float]


def routing_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every ``MoE`` / ``MultiGateMoE`` in ``model`` with its name (``''`` for the model itself)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (MoE, MultiGateMoE))]


def permutations_of(model: nn.Module) -> dict[str, Any]:
    """``{layer name: [index rows of each permutation module]}`` as plain lists."""
    return {name: [p.index.detach().cpu().tolist() for p in getattr(layer, "permutations")] for name, layer in routing_layers(model)}


@dataclass
class EvalResult:
    """What :func:`evaluate` measured.

    Attributes:
        loss: mean per-example task loss.
        rows: rows evaluated.
        usage: ``{layer name: [{'soft': [...], 'hard': [...]} per task]}``, one value per expert (token-shaped
            input: over all tokens).
        metrics: ``{name: value}``.
        layer_inputs: ``{layer name: the first rows of the layer's input x}`` (for gate certificates).
    """

    loss: float
    rows: int
    usage: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    layer_inputs: dict[str, torch.Tensor] = field(default_factory=dict)


def _cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu")
    if isinstance(obj, Mapping):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


@torch.no_grad()
def _metric_value(name: str, measured: Any) -> float:
    """A metric's value as a float; anything that is not one number is refused, naming the metric."""
    try:
        if isinstance(measured, (str, bytes)):
            raise TypeError
        return float(measured)
    except (TypeError, ValueError, RuntimeError):
        shape = f" of shape {tuple(measured.shape)}" if hasattr(measured, "shape") else ""
        raise TypeError(f"metrics[{name!r}] returned {type(measured).__name__}{shape}; a metric returns one number "
                        "(a float, or a one-element tensor / array)") from None


def evaluate(
    model: nn.Module,
    source: BatchSource,
    loss: Callable[[Any, Any], torch.Tensor],
    device: torch.device,
    *,
    metrics: Mapping[str, Metric] | None = None,
    capture_rows: int = 0,
    process_group: Any = False,
) -> EvalResult:
    """Evaluate ``model`` (every submodule in eval mode, restored after) on one pass over ``source``.

    Args:
        model: the model.
        source: the held-out data.
        loss: ``loss(prediction, targets)`` → per-example ``[B]`` or a scalar (weighted by the batch rows).
        device: where batches go.
        metrics: ``{name: metric(predictions, targets) -> float}`` computed on the whole pass
            (predictions concatenated over batches, as the model's unwrapped output).
        capture_rows: keep up to this many rows of each routing layer's input (0: none).
        process_group: ``False`` (default): this process alone; ``None``: the world group when
            ``torch.distributed`` is initialised; or a ``ProcessGroup``. With a group, ``source`` is this
            rank's shard (see :mod:`~routing_search.training.distributed_training`); sums are added over
            the ranks, metrics computed on every rank's predictions, and every rank gets the same result.
    """
    ctx = resolve_context(process_group)
    sums: dict[str, list[list[Any]]] = {}
    captured: dict[str, list[torch.Tensor]] = {}
    captured_rows: dict[str, int] = {}

    def usage_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            weights = getattr(output, "weights", None)
            weights = [weights] if isinstance(weights, torch.Tensor) else list(weights or [])
            acc = sums.setdefault(name, [[torch.zeros((), dtype=torch.float64), None, None] for _ in weights])
            for slot, w in zip(acc, weights):
                # token-shaped weights [batch, tokens, n]: every token is a row routed on its own
                w = w.detach().to(torch.float64).cpu().reshape(-1, w.shape[-1])
                slot[0] = slot[0] + w.shape[0]
                slot[1] = w.sum(0) if slot[1] is None else slot[1] + w.sum(0)
                hard = (w != 0).to(torch.float64).sum(0)
                slot[2] = hard if slot[2] is None else slot[2] + hard

        return hook

    def input_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            x = args[0] if args else kwargs.get("x")
            have = captured_rows.get(name, 0)
            if isinstance(x, torch.Tensor) and x.dim() > 0 and have < capture_rows:
                part = x[: capture_rows - have].detach().to("cpu")
                captured.setdefault(name, []).append(part)
                captured_rows[name] = have + int(part.shape[0])

        return hook

    layers = routing_layers(model)
    handles = [layer.register_forward_hook(usage_hook(name)) for name, layer in layers]
    if capture_rows > 0:
        handles += [layer.register_forward_pre_hook(input_hook(name), with_kwargs=True) for name, layer in layers]
    total, rows = 0.0, 0
    outputs: list[tuple[Any, Any]] = []
    error: BaseException | None = None
    try:
        with eval_mode(model):
            for inputs, targets, count in source.batches(device, shuffle=False):
                check_finite_targets(targets, source.name)
                prediction = unwrap_prediction(call_model(model, inputs))
                value = loss(prediction, targets)
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"loss must return a tensor (per-example [B] or a scalar), got {type(value).__name__}")
                value = value.detach().to(torch.float64)
                # one value per row: their sum; anything else (a scalar, [B, D], ...) is its mean over every
                # value, as the training step takes it, weighted by the rows
                total += float(value.sum()) if value.dim() == 1 and value.shape[0] == count else float(value.mean()) * count
                rows += count
                if metrics:
                    outputs.append((_cpu(prediction), _cpu(targets)))
    except Exception as exc:  # under a process group every rank must learn of it (reduce_evaluation)
        if not ctx.active:
            raise
        error = exc
    finally:
        for handle in handles:
            handle.remove()
    if ctx.active:
        total, rows, sums, outputs, captured = reduce_evaluation(
            ctx, error, total=total, rows=rows, sums=sums, outputs=outputs, captured=captured,
            capture_rows=capture_rows, contiguous=getattr(source, "contiguous", True),
        )
    usage = {
        name: [
            {"soft": (s / n.clamp_min(1)).tolist(), "hard": (h / n.clamp_min(1)).tolist()}
            for n, s, h in acc
            if s is not None
        ]
        for name, acc in sums.items()
    }
    values: dict[str, float] = {}
    metric_error: Exception | None = None
    try:
        if metrics and outputs:
            predictions, targets = as_batch(outputs, name="the metrics' (predictions, targets) of val_data")
            for name, metric in metrics.items():
                values[name] = _metric_value(name, metric(predictions, targets))
    except Exception as exc:  # a metric that fails on one rank only must not leave the others at a later collective
        if not ctx.active:
            raise
        metric_error = exc
    if ctx.active:
        agree(metric_error, ctx.group, "computing the validation metrics")
    return EvalResult(
        loss=total / rows if rows else math.nan,
        rows=rows,
        usage=usage,
        metrics=values,
        layer_inputs={name: torch.cat(parts) for name, parts in captured.items()},
    )
