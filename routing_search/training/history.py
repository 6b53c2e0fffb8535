"""What :func:`~routing_search.training.fit` records (:class:`History`) and returns (:class:`FitResult`)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..analysis import HardenCertificate
from .checkpoint import to_plain

__all__ = ["History", "FitResult"]

_ADDED_PER_EPOCH = ("metrics", "gates")  # per-epoch fields added after the first checkpoint format


@dataclass
class History:
    """What happened during :func:`~routing_search.training.fit`; every field is a plain list (see :meth:`to_dict`).

    Attributes:
        step_loss: training objective (task loss + weighted gate loss) of every step.
        epoch: epoch index (0-based) of each entry of the per-epoch lists below.
        train_loss: mean ``step_loss`` over the epoch.
        val_loss: mean per-example task loss on ``val_data`` (None without it).
        metrics: per epoch, ``{name: value}`` of the ``metrics`` given to ``fit``, computed on the whole of
            ``val_data`` (empty without metrics or validation data).
        train_seconds / search_seconds / eval_seconds / epoch_seconds: wall time per epoch spent in
            gradient steps, in searches, in evaluation, and in total (the first epoch's search and total
            time include a search before training, ``SearchSchedule(at_start=True)``).
        usage: per epoch, ``{layer name: [{'soft': [...], 'hard': [...]} per task]}`` computed from the
            weights the MoE layers return on ``val_data`` (soft = mean weight, hard = fraction of rows
            with non-zero weight, so ``sum(hard)`` is the realised number of experts per row; with
            token-shaped input every token is a row). The model itself is named ``''``.
        gates: per epoch, ``{gate name: {...}}`` for every DSelect-k / COMET gate (see
            :func:`~routing_search.training.gate_report.gate_report`): whether ``S(Z)`` / the tree paths
            are binary on ``val_data``, how far from it, and the realised experts per row.
        permutations: per epoch (after its searches), ``{layer name: [index rows of each permutation module]}``.
        searches: one dict per search: ``epoch``, ``step``, ``fun0``, ``fun``, ``accepted`` (number of
            moves kept), ``nit`` (moves accepted in total; larger for 'ils', whose discarded descents also
            count), ``nfev``, ``seconds``, ``moves`` (kind, slot, selector, before, after, fun_before, fun_after),
            ``guard_rejections`` and ``guard`` (each guard's value at the search's start and end, see
            :func:`~routing_search.training.searcher.guard_record`; None without ``guard=``).
        sinkhorn: learned-permutation events: ``epoch``, ``module``, ``event`` ('progress' or 'round'),
            and ``tau``/``iters`` or the rounded ``permutation``.
    """

    step_loss: list[float] = field(default_factory=list)
    epoch: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float | None] = field(default_factory=list)
    metrics: list[dict[str, float]] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    search_seconds: list[float] = field(default_factory=list)
    eval_seconds: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    usage: list[dict[str, Any]] = field(default_factory=list)
    gates: list[dict[str, Any]] = field(default_factory=list)
    permutations: list[dict[str, Any]] = field(default_factory=list)
    searches: list[dict[str, Any]] = field(default_factory=list)
    sinkhorn: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A deep copy as plain lists/dicts/numbers/strings (JSON-serialisable)."""
        return to_plain(copy.deepcopy(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> History:
        """Inverse of :meth:`to_dict` (unknown keys are an error). A per-epoch field that older versions did
        not record (``metrics``, ``gates``) gets an empty dict per recorded epoch, so that the lists stay aligned."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown History fields {sorted(unknown)}")
        fields = {k: copy.deepcopy(list(v)) for k, v in data.items()}
        for name in _ADDED_PER_EPOCH:
            if name not in fields:
                fields[name] = [{} for _ in fields.get("epoch", [])]
        return cls(**fields)

    def search_share(self) -> float:
        """Fraction of the recorded epoch wall time spent in searches (0 when nothing was recorded)."""
        total = sum(self.epoch_seconds)
        return sum(self.search_seconds) / total if total > 0 else 0.0

    def metric(self, name: str) -> list[float | None]:
        """One metric (or ``'val_loss'``) per epoch, ``None`` where it was not computed."""
        if name == "val_loss":
            return list(self.val_loss)
        return [entry.get(name) for entry in self.metrics]


@dataclass
class FitResult:
    """What :func:`~routing_search.training.fit` returns.

    Attributes:
        model: the trained model (the same object that was passed in; the selected epoch's weights
            restored when ``restore_best`` applies; hardened when ``harden=True``).
        history: the :class:`History` (including epochs run before a resume).
        best_val: lowest validation loss seen (None without ``val_data``).
        epochs_run: epochs completed in total (including those before a resume).
        stopped_early: True when early stopping ended training.
        checkpoint_path: the checkpoint file, when ``checkpoint_dir`` was given.
        best_epoch: the epoch (0-based) that was best by ``select_by`` (None without ``val_data``).
        best_score: the value of ``select_by`` at ``best_epoch``.
        select_by: the criterion (``'val_loss'`` or a metric name) and ``select_mode`` its direction.
        restored_best: True when the weights of ``best_epoch`` were loaded at the end.
        stop_reason: why training ended before ``epochs``: ``'early_stopping'``, ``'max_steps'``,
            ``'callback'`` (with the callback's reason after a colon), or None.
        certificate: with ``harden=True``, the :class:`~routing_search.analysis.HardenCertificate` of the
            model's DSelect-k / COMET gates before hardening (``certificate.after``: after).
        hardened_val_loss / hardened_metrics: with ``harden=True`` and ``val_data``, the validation loss
            and metrics of the hardened model.
        gamma_annealing: per DSelect-k / COMET gate (module name), what ``fit`` did with its gamma
            annealing: ``{'status': 'fitted', 'total_steps', 'start', 'begin', 'end', 'final_ratio'}`` for
            a ``BudgetAnnealing`` fitted to this run's budget, else ``{'status': 'kept', 'reason', ...}``.
    """

    model: nn.Module
    history: History
    best_val: float | None
    epochs_run: int
    stopped_early: bool
    checkpoint_path: Path | None
    best_epoch: int | None = None
    best_score: float | None = None
    select_by: str = "val_loss"
    select_mode: str = "min"
    restored_best: bool = False
    stop_reason: str | None = None
    certificate: HardenCertificate | None = None
    hardened_val_loss: float | None = None
    hardened_metrics: dict[str, float] = field(default_factory=dict)
    gamma_annealing: dict[str, dict[str, Any]] = field(default_factory=dict)
