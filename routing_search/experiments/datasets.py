"""The datasets of the experiments, with each one's loss, metrics and the model's data shapes.

:func:`load_experiment_data` returns an :class:`ExperimentData`: the :class:`~routing_search.data.TaskDataset`
(subsampled as the config says, with inputs in the form the model takes), the training loss, the
per-task test metrics (the papers' metrics: ROC AUC for a binary task, RMSE on the watched rows for the
MovieLens rating, accuracy for a class task, MSE for a synthetic regression) with their directions, the
per-task metrics the ``guarded`` arm guards, and for the synthetic families the ground truth used to score
support recovery.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data import (
    Split,
    SyntheticMoETruth,
    TaskDataset,
    TaskSpec,
    load_movielens,
    load_multi_fashion,
    load_multi_mnist,
    make_keyed_synthetic,
    make_synthetic_moe,
    movielens_loss,
)
from ..losses import multitask_loss
from ..training.task_metrics import TaskMetric, accuracy, mse, roc_auc
from .config import ExperimentConfig

__all__ = ["ExperimentData", "MetricSpec", "load_experiment_data", "masked_rmse", "primary_metric"]


@dataclass(frozen=True)
class MetricSpec:
    """A named test metric: ``fn(predictions, targets) -> float`` and whether higher is better."""

    name: str
    fn: Callable[[Any, Any], float]
    higher_is_better: bool


@dataclass
class ExperimentData:
    """A dataset ready for the runner.

    Attributes:
        dataset: the splits (inputs as the model takes them).
        loss: per-example training loss ``loss(predictions, targets) -> [B]``.
        metrics: test metrics, in report order; the first is the headline metric (see :func:`primary_metric`).
        output_dims: each tower's output width.
        truth: the generating MoE of a synthetic family (None otherwise).
        model_kwargs: extra sizes the model builder needs (keys, users, movies).
        guard_metrics: the per-task paper metrics the ``guarded`` arm's search must not make worse (MovieLens:
            ROC AUC of the watched task and RMSE of the rating on watched rows; image pairs: each task's
            accuracy; synthetic families: each task's MSE).
    """

    dataset: TaskDataset
    loss: Callable[[Any, Any], torch.Tensor]
    metrics: list[MetricSpec]
    output_dims: list[int]
    truth: SyntheticMoETruth | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    guard_metrics: list[MetricSpec] = field(default_factory=list)


def masked_rmse(task: int, mask_task: int) -> Callable[[Any, Any], float]:
    """RMSE of task ``task`` on the rows where task ``mask_task``'s target is 1 (MovieLens: watched pairs)."""

    def fn(predictions: Any, targets: Any) -> float:
        pred = predictions[task].detach().reshape(-1).to(torch.float64)
        target = targets[task].detach().reshape(-1).to(torch.float64)
        mask = targets[mask_task].detach().reshape(-1) > 0.5
        if int(mask.sum()) == 0:
            raise ValueError("masked_rmse: no watched rows to evaluate")
        return float(torch.sqrt(((pred[mask] - target[mask]) ** 2).mean()))

    return fn


def _from_task_metric(name: str, metric: TaskMetric) -> MetricSpec:
    return MetricSpec(name, metric, metric.greater_is_better)


def primary_metric(data: ExperimentData) -> MetricSpec:
    """The headline metric: the first of ``data.metrics`` (ROC AUC of MovieLens' watched task, mean
    accuracy of the image pairs, mean test MSE of the synthetic families)."""
    return data.metrics[0]


def _mean_of(metrics: list[MetricSpec], name: str) -> MetricSpec:
    higher = metrics[0].higher_is_better

    def fn(predictions: Any, targets: Any) -> float:
        return float(sum(m.fn(predictions, targets) for m in metrics) / len(metrics))

    return MetricSpec(name, fn, higher)


def _subset(split: Split, limit: int | None, seed: int) -> Split:
    rows = len(split)
    if limit is None or rows <= limit:
        return split
    index = torch.randperm(rows, generator=torch.Generator().manual_seed(seed)).narrow(0, 0, limit).sort().values
    return Split({k: v[index] for k, v in split.inputs.items()}, [t[index] for t in split.targets])


def _limit(dataset: TaskDataset, config: ExperimentConfig, seed: int) -> TaskDataset:
    d = config.data
    return TaskDataset(
        name=dataset.name,
        train=_subset(dataset.train, d.max_train, 3 * seed + 1),
        val=_subset(dataset.val, d.max_val, 3 * seed + 2),
        test=_subset(dataset.test, d.max_test, 3 * seed + 3),
        tasks=dataset.tasks,
        num_keys=dataset.num_keys,
        info=dict(dataset.info),
    )


SYNTHETIC_MIN_WEIGHT = 0.2
"""Smallest true mixing weight of the synthetic family (``make_synthetic_moe``'s default) while ``k`` of them fit
under 1; from ``k = 5`` on it is ``0.5 / k`` (``make_synthetic_moe`` needs ``min_weight * k < 1``)."""


def synthetic_min_weight(k: int) -> float:
    """The synthetic family's smallest true weight for ``k`` experts per task (see :data:`SYNTHETIC_MIN_WEIGHT`).

    >>> synthetic_min_weight(2), synthetic_min_weight(4), synthetic_min_weight(8)
    (0.2, 0.2, 0.0625)
    """
    return SYNTHETIC_MIN_WEIGHT if SYNTHETIC_MIN_WEIGHT * k < 1 else 0.5 / k


def _synthetic(config: ExperimentConfig, seed: int) -> ExperimentData:
    d, m = config.data, config.model
    # model.k >= 5 failed here with make_synthetic_moe's 'min_weight * k must be < 1', a field no config has
    min_weight = synthetic_min_weight(m.k)
    raw = make_synthetic_moe(
        num_samples=d.num_samples, input_dim=d.input_dim, num_experts=m.num_experts, k=m.k,
        num_tasks=d.num_tasks, seed=seed, min_weight=min_weight,
    )
    parts = raw.split((0.7, 0.15, 0.15))
    tasks = [TaskSpec(f"task{t}", "regression") for t in range(d.num_tasks)]

    def split(part: Any) -> Split:
        return Split({"x": part.x}, [part.y[:, t].contiguous() for t in range(d.num_tasks)])

    dataset = TaskDataset(
        name="synthetic", train=split(parts[0]), val=split(parts[1]), test=split(parts[2]), tasks=tasks,
        info={"seed": seed, "num_samples": d.num_samples, "true_supports": [list(s) for s in raw.truth.supports],
              "min_weight": min_weight},
    )
    per_task = [_from_task_metric(f"{t.name}/mse", mse(i)) for i, t in enumerate(tasks)]
    metrics = [_mean_of(per_task, "mean/mse")] + per_task
    return ExperimentData(dataset, multitask_loss(["mse"] * d.num_tasks), metrics, [1] * d.num_tasks, truth=raw.truth,
                          guard_metrics=per_task)


def _movielens(config: ExperimentConfig, seed: int) -> ExperimentData:
    dataset = _limit(load_movielens(config.data.path, seed=seed), config, seed)
    info = dataset.info
    loss = movielens_loss(config.data.alpha, watched_fraction=float(info["watched_fraction"]))
    metrics = [
        _from_task_metric("watched/roc_auc", roc_auc(0)),
        MetricSpec("rating/rmse_watched", masked_rmse(1, 0), False),
        _from_task_metric("watched/accuracy", accuracy(0)),
        MetricSpec("loss", lambda p, t: float(loss(p, t).mean()), False),
    ]
    return ExperimentData(
        dataset, loss, metrics, [1, 1],
        model_kwargs={"num_keys": dataset.num_keys, "hash_seed": seed, "num_users": int(info["num_users"]), "num_movies": int(info["num_movies"])},
        guard_metrics=metrics[:2],
    )


def _keyed(config: ExperimentConfig, seed: int) -> ExperimentData:
    d, m = config.data, config.model
    dataset = make_keyed_synthetic(
        num_samples=d.num_samples, num_keys=d.num_keys, num_experts=m.num_experts, input_dim=d.input_dim,
        num_tasks=d.num_tasks, hash_seed=seed, seed=seed,
    )
    dataset.info = {k: v for k, v in dataset.info.items() if k != "truth"} | {"hash_seed": seed}
    per_task = [_from_task_metric(f"{t.name}/mse", mse(i)) for i, t in enumerate(dataset.tasks)]
    metrics = [_mean_of(per_task, "mean/mse")] + per_task
    return ExperimentData(
        dataset, multitask_loss(["mse"] * dataset.num_tasks), metrics, [1] * dataset.num_tasks,
        model_kwargs={"num_keys": dataset.num_keys, "hash_seed": seed}, guard_metrics=per_task,
    )


def _flat_images(split: Split) -> Split:
    x = split.inputs["x"]
    return Split({"x": x.reshape(x.shape[0], -1)} | {k: v for k, v in split.inputs.items() if k != "x"}, split.targets)


def _images(config: ExperimentConfig, seed: int) -> ExperimentData:
    d = config.data
    sizes: dict[str, Any] = {name: value for name, value in (("num_train", d.max_train), ("num_val", d.max_val), ("num_test", d.max_test)) if value is not None}
    loader = load_multi_mnist if config.dataset == "multi-mnist" else load_multi_fashion
    raw = loader(d.path, seed=seed, **sizes)
    dataset = TaskDataset(
        name=raw.name, train=_flat_images(raw.train), val=_flat_images(raw.val), test=_flat_images(raw.test),
        tasks=raw.tasks, num_keys=raw.num_keys,
        info={k: v for k, v in raw.info.items() if k != "source_indices"},
    )
    per_task = [_from_task_metric(f"{t.name}/accuracy", accuracy(i)) for i, t in enumerate(dataset.tasks)]
    metrics = [_mean_of(per_task, "mean/accuracy")] + per_task
    classes = [int(t.num_classes or 1) for t in dataset.tasks]
    return ExperimentData(dataset, multitask_loss(["cross_entropy"] * dataset.num_tasks), metrics, classes, guard_metrics=per_task)


def load_experiment_data(config: ExperimentConfig, seed: int) -> ExperimentData:
    """The dataset of ``config`` for one seed (the seed fixes sampled rows, negatives and splits).

    Raises:
        routing_search.data.DataNotFoundError: the dataset's files are missing (the message says what to install).
    """
    if config.dataset == "synthetic":
        return _synthetic(config, seed)
    if config.dataset == "keyed":
        return _keyed(config, seed)
    if config.dataset == "movielens":
        return _movielens(config, seed)
    return _images(config, seed)
