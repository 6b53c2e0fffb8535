"""Run gates × arms × seeds on one dataset, paired by seed.

For each seed the data are loaded once (the seed fixes the rows, sampled negatives and splits); for each
gate and arm the model is built from ``torch.manual_seed(seed)``, so every arm of a seed starts from the
same weights; ``fit`` shuffles with its own generator seeded by the same seed, and the global torch RNG
(dropout) is reset to the seed before training. The arms:

* ``sgd``: first-order training only.
* ``random``: one random permutation per permutation module of the MoE layer (drawn from a generator
  seeded by the seed, never the identity), applied before training; then first-order training only.
  This is the control any search claim must beat: it breaks a collapse as well as a search can.
* ``search``: first-order training alternated with permutation local search on fit's schedule.
* ``guarded``: the ``search`` arm with a :class:`~routing_search.search.MetricGuard` on every task's paper
  metric (``ExperimentData.guard_metrics``), computed on the same validation rows the search scores: a
  move the loss accepts is kept only if no guarded metric is worse than at the start of that search by
  more than ``config.guard.tolerance``. Each search's guard values at its start and end (as the search
  reports them in ``result.guard``, recorded by ``fit`` in ``History.searches``) and the moves the guards
  refused are recorded.
* ``sinkhorn``: the task gates wrapped by one shared learned permutation (COMET+), annealed, rounded and
  frozen by ``fit``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .._validation import check_rng
from ..metrics import match_experts_by_outputs, support_recovery
from ..search import MetricGuard, sinkhorn_modules
from ..training import fit
from .config import SEARCH_ARMS, ExperimentConfig
from .datasets import ExperimentData, load_experiment_data
from .models import build_model, moe_layer, training_steps

__all__ = ["RunRecord", "ExperimentResult", "run_experiment", "run_one", "apply_random_permutations", "evaluate", "is_identity",
           "metric_guards", "guard_checks"]

EVAL_BATCH = 4096


@dataclass
class RunRecord:
    """One trained model: its seed, gate and arm, test metrics and routing statistics.

    Attributes:
        metrics: test value of every metric of the dataset (name → value).
        val_metrics: the same on the validation rows (what a tuner selects by).
        experts_used: per task, mean number of experts with non-zero weight per test row.
        task_weights: ``[T][n]`` mean expert weight per task on the test rows (the heatmap).
        usage: per epoch, per task, the mean expert weights on the validation rows (from ``History.usage``).
        permutations: the final permutation rows of every permutation module (and the rounded learned
            permutation for ``sinkhorn``).
        initial_permutations: the rows set before training (``random`` arm; identity otherwise).
        support_f1: mean support-recovery F1 against the truth (synthetic families, else None).
        searches, accepted_moves: number of searches run and moves they kept.
        seconds, search_share: wall time of ``fit`` and the share spent in searches (not reproducible).
        guard_rejections: moves the loss accepted but a guard refused (``guarded`` arm; 0 otherwise).
        guard_checks: ``guarded`` arm: per search, ``{metric: {'start': v0, 'end': v1}}`` on the search's
            validation rows, from the search's own guard report (see :func:`guard_checks`; empty for the
            other arms).
    """

    seed: int
    gate: str
    arm: str
    metrics: dict[str, float]
    val_metrics: dict[str, float]
    experts_used: list[float]
    task_weights: list[list[float]]
    usage: list[list[list[float]]]
    permutations: list[list[list[int]]]
    initial_permutations: list[list[list[int]]]
    support_f1: float | None
    val_loss: list[float | None]
    searches: int
    accepted_moves: int
    seconds: float
    search_share: float
    guard_rejections: int = 0
    guard_checks: list[dict[str, dict[str, float]]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable form."""
        return dict(self.__dict__)


@dataclass
class ExperimentResult:
    """Every run of an experiment, with the config and dataset facts the report needs (``guard_metric_names``:
    the metrics the ``guarded`` arm guards)."""

    config: ExperimentConfig
    runs: list[RunRecord]
    metric_names: list[str]
    higher_is_better: dict[str, bool]
    task_names: list[str]
    dataset_info: dict[str, Any] = field(default_factory=dict)
    guard_metric_names: list[str] = field(default_factory=list)


def apply_random_permutations(model: nn.Module, rng: Any) -> list[list[list[int]]]:
    """Set every permutation module of the model's MoE layer to one random permutation (not the identity).

    One permutation per module, applied to all its selector rows. Returns the rows set.

    >>> from routing_search import MultiGateMoE, Softmax
    >>> layer = MultiGateMoE([torch.nn.Linear(2, 1) for _ in range(4)], [Softmax(4), Softmax(4)])
    >>> rows = apply_random_permutations(layer, 0)
    >>> any(p.is_identity for p in layer.permutations)
    False
    """
    generator = check_rng(rng, name="rng")
    applied = []
    for module in moe_layer(model).permutations:
        n = module.num_experts
        perm = generator.permutation(n)
        while np.array_equal(perm, np.arange(n)):
            perm = generator.permutation(n)
        module.set(perm)
        applied.append(module.get().tolist())
    return applied


def _permutation_rows(model: nn.Module) -> list[list[list[int]]]:
    rows = [p.get().tolist() for p in moe_layer(model).permutations]
    for module in sinkhorn_modules(model):
        if module.owns_state and module.frozen:
            rows.append([module.permutation().tolist()])
    return rows


@torch.no_grad()
def evaluate(model: nn.Module, split: Any, device: torch.device | str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Predictions per task and expert-space weights per task on a split (eval mode, CPU tensors)."""
    was_training = model.training
    model.eval()
    preds: list[list[torch.Tensor]] = []
    weights: list[list[torch.Tensor]] = []
    inputs = split.inputs
    rows = len(split)
    try:
        for start in range(0, rows, EVAL_BATCH):
            batch = {k: v[start : start + EVAL_BATCH].to(device) for k, v in inputs.items()}
            out = model(**batch)
            if not preds:
                preds = [[] for _ in out.outputs]
                weights = [[] for _ in out.weights]
            for t, p in enumerate(out.outputs):
                preds[t].append(p.detach().cpu())
            for t, w in enumerate(out.weights):
                weights[t].append(w.detach().cpu())
    finally:
        model.train(was_training)
    return [torch.cat(p) for p in preds], [torch.cat(w) for w in weights]


def _usage_history(history: Any) -> list[list[list[float]]]:
    out: list[list[list[float]]] = []
    for epoch_usage in history.usage:
        if not epoch_usage:
            out.append([])
            continue
        (layer_usage,) = list(epoch_usage.values())
        out.append([list(map(float, task["soft"])) for task in layer_usage])
    return out


def _support_f1(model: nn.Module, data: ExperimentData, task_weights: torch.Tensor, device: Any) -> float | None:
    if data.truth is None:
        return None
    layer = moe_layer(model)
    x = data.dataset.test.inputs["x"]
    with torch.no_grad():
        was = layer.training
        layer.eval()
        learned = layer.expert_outputs(x.to(device)).reshape(x.shape[0], layer.num_experts, -1)[..., 0].cpu()
        layer.train(was)
    matching = match_experts_by_outputs(learned, data.truth.expert_outputs(x))
    recovery = support_recovery(task_weights, data.truth.expert_weights, matching=matching, threshold=1e-3)
    return float(recovery.mean_f1)


def metric_guards(data: ExperimentData, tolerance: float) -> list[MetricGuard]:
    """The ``guarded`` arm's guards: every metric of ``data.guard_metrics`` with its direction and name, each
    allowed to get worse than at the start of a search by ``tolerance`` (in the metric's units)."""
    return [MetricGuard(spec.fn, greater_is_better=spec.higher_is_better, tolerance=tolerance, name=spec.name)
            for spec in data.guard_metrics]


def guard_checks(searches: list[dict[str, Any]]) -> list[dict[str, dict[str, float]]]:
    """Per search of a ``fit`` history, ``{metric: {'start': v0, 'end': v1}}``: each guard's value at the start and
    at the end of that search, as the search reported them (``History.searches[i]['guard']``; ``{}`` for a search
    that ran without guards).

    >>> guard_checks([{"guard": {"acc": {"start": 0.5, "end": 0.75, "tolerance": 0.0, "greater_is_better": True}}},
    ...               {"guard": None}])
    [{'acc': {'start': 0.5, 'end': 0.75}}, {}]
    """
    return [{name: {"start": float(g["start"]), "end": float(g["end"])} for name, g in (record["guard"] or {}).items()}
            for record in searches]


def run_one(config: ExperimentConfig, data: ExperimentData, gate: str, arm: str, seed: int) -> RunRecord:
    """Build, (permute,) train and score one model; see the module docstring for the arms."""
    ds = data.dataset
    model = build_model(
        config, gate, arm, seed, input_shape=ds.input_shape, num_tasks=ds.num_tasks, output_dims=data.output_dims,
        total_steps=training_steps(config, len(ds.train)), **data.model_kwargs,
    )
    initial = [p.get().tolist() for p in moe_layer(model).permutations]
    if arm == "random":
        initial = apply_random_permutations(model, np.random.default_rng([seed, 7_919]))
    search = None
    if arm in SEARCH_ARMS:
        guards: list[MetricGuard] = []
        if arm == "guarded":
            if not data.guard_metrics:
                raise ValueError(f"arm 'guarded' needs per-task metrics to guard; the data of {config.dataset!r} define none")
            guards = metric_guards(data, config.guard.tolerance)
        search = config.search.as_fit_option(guard=guards)
    lr = config.train.lr
    torch.manual_seed(seed)
    start = time.perf_counter()
    result = fit(
        model,
        ds.train.as_pair(),
        data.loss,
        val_data=ds.val.as_pair(),
        epochs=config.train.epochs,
        batch_size=config.train.batch_size,
        optimizer=lambda params: torch.optim.Adam(params, lr=lr),
        search=search,
        seed=seed,
        device=config.device,
        progress=config.progress,
        gate_loss_weight=config.train.gate_loss_weight,
    )
    seconds = time.perf_counter() - start
    for module in sinkhorn_modules(model):
        # A run of one epoch ends inside the soft phase: round so the test sees a permutation.
        module.round_()
    history = result.history
    preds, weights = evaluate(model, ds.test, config.device)
    metrics = {m.name: float(m.fn(preds, ds.test.targets)) for m in data.metrics}
    val_preds, _ = evaluate(model, ds.val, config.device)
    val_metrics = {m.name: float(m.fn(val_preds, ds.val.targets)) for m in data.metrics}
    task_weights = torch.stack([w.to(torch.float64).mean(dim=0) for w in weights])
    experts_used = [float((w > 0).sum(dim=1).to(torch.float64).mean()) for w in weights]
    accepted = sum(int(s.get("accepted", 0)) for s in history.searches)
    return RunRecord(
        seed=seed,
        gate=gate,
        arm=arm,
        metrics=metrics,
        val_metrics=val_metrics,
        experts_used=experts_used,
        task_weights=task_weights.tolist(),
        usage=_usage_history(history),
        permutations=_permutation_rows(model),
        initial_permutations=initial,
        support_f1=_support_f1(model, data, task_weights, config.device),
        val_loss=[None if v is None else float(v) for v in history.val_loss],
        searches=len(history.searches),
        accepted_moves=accepted,
        seconds=float(seconds),
        search_share=float(history.search_share()),
        guard_rejections=sum(int(s.get("guard_rejections", 0)) for s in history.searches),
        guard_checks=guard_checks(history.searches) if arm == "guarded" else [],
    )


def run_experiment(
    config: ExperimentConfig,
    *,
    log: Callable[[str], None] | None = None,
    data_loader: Callable[[ExperimentConfig, int], ExperimentData] = load_experiment_data,
    on_record: Callable[[RunRecord], None] | None = None,
) -> ExperimentResult:
    """Every gate × arm × seed of ``config`` (seed-major: the data of a seed are loaded once).

    ``on_record`` is called with every :class:`RunRecord` as soon as its run ends (the CLI appends it to
    the run directory, so the runs already done survive a later failure such as a diverged run).
    Sets the process's torch CPU threads to ``config.threads``.
    """
    torch.set_num_threads(config.threads)
    runs: list[RunRecord] = []
    data: ExperimentData | None = None
    for seed in range(config.seeds):
        data = data_loader(config, seed)
        for gate in config.gates:
            for arm in config.arms:
                try:
                    record = run_one(config, data, gate, arm, seed)
                except FloatingPointError as exc:  # fit's message names the epoch and step, not the run
                    raise FloatingPointError(f"seed {seed}, gate {gate}, arm {arm}: {exc}") from exc
                runs.append(record)
                if on_record is not None:
                    on_record(record)
                if log is not None:
                    first = data.metrics[0].name
                    log(f"seed {seed} {gate:>9} {arm:>8}: {first} {record.metrics[first]:.4f}  "
                        f"experts {', '.join(f'{e:.2f}' for e in record.experts_used)}  {record.seconds:.1f}s")
    assert data is not None
    info = {k: v for k, v in data.dataset.info.items() if isinstance(v, (int, float, str, bool, list, dict)) and k not in ("user_ids", "movie_ids")}
    info.update({"train_rows": len(data.dataset.train), "val_rows": len(data.dataset.val), "test_rows": len(data.dataset.test),
                 "train_steps": training_steps(config, len(data.dataset.train))})
    return ExperimentResult(
        config=config,
        runs=runs,
        metric_names=[m.name for m in data.metrics],
        higher_is_better={m.name: m.higher_is_better for m in data.metrics},
        task_names=[t.name for t in data.dataset.tasks],
        dataset_info=info,
        guard_metric_names=[m.name for m in data.guard_metrics],
    )


def is_identity(rows: list[list[int]]) -> bool:
    """True when every row is ``0..n-1``."""
    return all(list(r) == list(range(len(r))) for r in rows)

