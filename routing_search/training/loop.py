"""The trainer :func:`fit`: first-order steps alternated with permutation local search, with exact resume.

:func:`fit` trains any model containing an ``MoE`` / ``MultiGateMoE`` layer on tensor pairs, a ``Dataset``
or a ``DataLoader``. On the :class:`~routing_search.training.SearchSchedule` the user sets it runs
:func:`routing_search.local_search` on held-out rows, anneals and rounds learned Sinkhorn permutations
(:func:`~routing_search.training.anneal_sinkhorn`), evaluates the validation loss and metrics, reports
whether DSelect-k / COMET gates are binary, records a :class:`~routing_search.training.History`, selects
the best epoch, calls callbacks, and checkpoints everything at the end of every epoch so that a resumed
run continues exactly (on CPU) as if it had never stopped (see :mod:`~routing_search.training.fit_state`).

The pieces live in their own modules: data iteration (``data_source``), evaluation (``evaluation``),
search schedule (``schedule``), best-epoch selection (``selection``), callbacks (``callbacks``), gate
reports and hardening (``gate_report``), checkpoint content (``fit_state``) and files (``checkpoint``).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from scipy.optimize import OptimizeResult
from torch import nn
from tqdm import tqdm

from .._validation import check_int, check_positive_float
from ..batches import call_model, num_rows, to_device, unwrap_prediction
from ..gates.annealed import AnnealedGate
from .callbacks import FitEvent, check_callbacks, dispatch
from .checkpoint import load_checkpoint, save_checkpoint
from .data_source import BatchSource, TensorSource, as_source, check_finite_targets, search_subset
from .distributed_training import (
    DistributedContext,
    DistributedStep,
    RandomnessWatch,
    RunRecord,
    agree_on_setup,
    agree_on_stop,
    check_world_size_change,
    gather_rank_rng,
    pause_buffer_broadcast,
    resolve_context,
    restore_rank_rng,
    resume_buffer_broadcast,
    save_on_main,
    set_sampler_epoch,
    shard_rows,
    shard_source,
    sync_buffers,
    train_order,
    unwrap_model,
    wrap_model,
)
from .evaluation import EvalResult, evaluate, permutations_of
from .fit_state import checkpoint_state, module_generators, restore_checkpoint
from .gate_report import gate_report, harden_model, warn_non_binary
from .history import FitResult, History
from .schedule import SearchSchedule, make_searcher
from .searcher import LocalSearcher, Searcher, guard_record
from .selection import Selection, resolve_select_mode
from .sinkhorn_schedule import anneal_sinkhorn

__all__ = ["fit", "CHECKPOINT_NAME", "GATE_ROWS"]

CHECKPOINT_NAME = "checkpoint.pt"
GATE_ROWS = 4096  # validation rows each routing layer's gates are certified on
LossFn = Callable[[Any, Any], torch.Tensor]


# ------------------------------------------------------------------------------------------- pieces
def _resolve_device(device: Any, model: nn.Module) -> torch.device:
    if device is None:
        first: torch.Tensor | None = next(iter(model.parameters()), None)
        if first is None:
            first = next(iter(model.buffers()), None)
        return first.device if first is not None else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device must be None, 'cpu', 'cuda', 'cuda:N' or a torch.device, got {device!r}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r} was requested but CUDA is not available here (torch.cuda.is_available() is "
                "False: no GPU, or a CPU-only torch build); pass device='cpu' or device=None"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    elif resolved.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device={device!r} was requested but MPS is not available here; pass device='cpu' or None")
    return resolved


def _make_optimizer(optimizer: Any, model: nn.Module) -> torch.optim.Optimizer:
    if optimizer is None:
        return torch.optim.Adam(model.parameters(), lr=1e-3)
    if isinstance(optimizer, torch.optim.Optimizer):
        own = {id(p) for p in model.parameters()}
        if any(id(p) not in own for group in optimizer.param_groups for p in group["params"]):
            raise ValueError("optimizer holds parameters that are not the model's; build it on model.parameters()")
        return optimizer
    if callable(optimizer):
        built = optimizer(model.parameters())
        if not isinstance(built, torch.optim.Optimizer):
            raise TypeError(f"optimizer(params) must return a torch.optim.Optimizer, got {type(built).__name__}")
        return built
    raise TypeError(f"optimizer must be None, a torch.optim.Optimizer or a callable params -> optimizer, got {type(optimizer).__name__}")


def _check_metrics(metrics: Any) -> dict[str, Callable[[Any, Any], float]]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a dict {{name: callable(predictions, targets) -> float}}, got {type(metrics).__name__}")
    for name, metric in metrics.items():
        if not isinstance(name, str) or name == "val_loss":
            raise ValueError(f"metrics keys must be strings other than 'val_loss', got {name!r}")
        if not callable(metric):
            raise TypeError(f"metrics[{name!r}] must be callable(predictions, targets) -> float, got {type(metric).__name__}")
    return dict(metrics)


def _check_checkpoint_dir(checkpoint_dir: Any) -> Path | None:
    if checkpoint_dir is None:
        return None
    if not isinstance(checkpoint_dir, (str, Path)):
        raise TypeError(f"checkpoint_dir must be a path (str or pathlib.Path) or None, got {type(checkpoint_dir).__name__}")
    directory = Path(checkpoint_dir)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"checkpoint_dir={str(directory)!r} is an existing file, not a directory; choose a directory")
    for parent in directory.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"checkpoint_dir={str(directory)!r}: {str(parent)!r} is a file, not a directory")
            break
    return directory


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _explain_one_row_batch(exc: ValueError, model: nn.Module, rows: int, epoch: int, step: int, batch_size: int,
                           source: BatchSource) -> None:
    """Raise a ``ValueError`` that says why, when a training batch of one row failed in a model with BatchNorm
    (torch's own message names neither the batch nor how to avoid it); return otherwise."""
    if rows != 1:
        return
    norms = [name for name, module in model.named_modules() if isinstance(module, _BATCH_NORMS) and module.training]
    if not norms:
        return
    total = f"{source.rows} rows, " if isinstance(source, TensorSource) else ""
    raise ValueError(
        f"train_data: the batch of epoch {epoch}, step {step + 1} holds a single row (the last, partial batch: "
        f"{total}batch_size={batch_size}), and the model's BatchNorm ({norms[0]!r}) cannot normalise one row in "
        f"training ({exc}). Choose a batch_size that leaves at least 2 rows in the last batch, or drop a row"
    ) from exc


def _objective(loss: LossFn, out: Any, targets: Any, gate_loss_weight: float) -> torch.Tensor:
    value = loss(unwrap_prediction(out), targets)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"loss must return a tensor (per-example [B] or a scalar), got {type(value).__name__}")
    if value.dim() > 0:
        value = value.mean()
    aux = getattr(out, "loss", None)
    if gate_loss_weight != 0 and isinstance(aux, torch.Tensor):
        value = value + gate_loss_weight * aux
    if not value.requires_grad:  # torch would say only "element 0 of tensors does not require grad"
        raise ValueError(
            "the training loss does not depend on the model's parameters (it has no grad_fn): compute it with torch "
            "operations on the prediction, without .detach(), .item(), numpy or torch.no_grad()"
        )
    return value


def _search_setting(searcher: Any, unit: str, rows: int | None, at_start: bool) -> dict[str, Any] | None:
    """What the run searches with, as plain values (saved in the checkpoint's config, compared on resume)."""
    if searcher is None:
        return None
    method = getattr(searcher, "method", None)
    if method is not None and not isinstance(method, str):
        method = getattr(method, "__qualname__", type(method).__name__)
    every, rounds = getattr(searcher, "every", None), getattr(searcher, "rounds", None)
    setting: dict[str, Any] = {"searcher": type(searcher).__name__, "method": method, "unit": unit,
                               "every": every if isinstance(every, int) else None,
                               "rounds": rounds if isinstance(rounds, int) else None,
                               "rows": rows, "refit": getattr(searcher, "refit", None) is not None, "at_start": at_start}
    options = getattr(searcher, "options", None)
    if isinstance(options, Mapping):  # plain option values only (a guard or callable has no stable description)
        setting["options"] = {str(k): v for k, v in sorted(options.items(), key=lambda kv: str(kv[0]))
                              if v is None or isinstance(v, (bool, int, float, str))}
    return setting


_RESULT_FIELDS = ("fun0", "fun", "nit", "nfev")


def _search_record(result: OptimizeResult, epoch: int, step: int, seconds: float) -> dict[str, Any]:
    missing = [name for name in _RESULT_FIELDS if not hasattr(result, name)]
    if missing:
        raise TypeError(
            f"the searcher's step returned {type(result).__name__} without {', '.join(missing)}; a search= searcher's "
            "step(step, data) must return None (no search) or a result with fun0, fun, nit and nfev, as local_search does"
        )
    moves = [
        {
            "kind": m.kind,
            "slot": int(m.slot),
            "selector": int(m.selector),
            "before": [int(v) for v in m.before],
            "after": [int(v) for v in m.after],
            "fun_before": float(m.fun_before),
            "fun_after": float(m.fun_after),
        }
        for m in getattr(result, "moves", [])
    ]
    return {
        "epoch": epoch,
        "step": step,
        "fun0": float(result.fun0),
        "fun": float(result.fun),
        "accepted": len(moves),
        "nit": int(result.nit),
        "nfev": int(result.nfev),
        "seconds": float(seconds),
        "moves": moves,
        # what the search all-reduced under a process group (counted in a single process too), when reported
        "all_reduce": dict(getattr(result, "all_reduce", None) or {}),
        # moves a metric guard refused (0 without guard=)
        "guard_rejections": int(getattr(result, "guard_rejections", 0) or 0),
        # each guard's value at the search's start and end ({name: {start, end, tolerance, greater_is_better}};
        # None without guard=), from result.guard
        "guard": guard_record(result),
    }


def _logged_seconds(searcher: Any, measured: float) -> float:
    """The seconds the searcher logged for its last search (``measured`` when it logs none)."""
    last = searcher.log[-1] if searcher.log else None
    return float(last["seconds"]) if isinstance(last, Mapping) and "seconds" in last else float(measured)


def _callbacks_agreed(ctx: DistributedContext, callbacks: Any, make_event: Callable[[], FitEvent], stop: str | None) -> str | None:
    """Dispatch the event ``make_event()`` to ``callbacks`` (when there are any) and return the stop reason.

    Under a process group every rank agrees on it (a stop asked for on any rank stops every rank), and an
    exception a callback raises on one rank is passed to the agreement, so every rank fails at once (the
    others with a ``RankFailedError`` naming it) instead of waiting at their next collective until its timeout.
    """
    error: Exception | None = None
    if callbacks:
        try:
            event = dispatch(callbacks, make_event())
        except Exception as exc:
            if not ctx.active:
                raise
            error = exc
        else:
            if event.stop_requested and stop is None:
                stop = event.stop_reason
    if ctx.active:
        stop = agree_on_stop(ctx, stop, error)
    return stop


def _search_at_start(searcher: Any, data: Any, history: History, callbacks: Any, model: nn.Module,
                     optimizer: torch.optim.Optimizer, ctx: DistributedContext) -> float:
    """The schedule's search before the first optimiser step (``SearchSchedule.at_start``), recorded at
    epoch 0, step 0; a stop requested by a callback here is not honoured (training has not started).
    Returns its wall time (counted in the first epoch's ``search_seconds`` and ``epoch_seconds``)."""
    t0 = time.perf_counter()
    result = searcher(data)
    seconds = time.perf_counter() - t0
    record = _search_record(result, 0, 0, _logged_seconds(searcher, seconds))
    history.searches.append(record)
    _callbacks_agreed(ctx, callbacks, lambda: FitEvent("search", 0, 0, model, optimizer, history, search=record), None)
    return seconds


def _postfix(epoch: int, loss: float | None, evaluation: EvalResult | None) -> dict[str, str]:
    shown = {"epoch": str(epoch)}
    if loss is not None:
        shown["loss"] = f"{loss:.4g}"
    if evaluation is not None:
        shown["val_loss"] = f"{evaluation.loss:.4g}"
        shown.update({name: f"{value:.4g}" for name, value in evaluation.metrics.items()})
    return shown


# ---------------------------------------------------------------------------------------------- fit
def _fit_gamma_annealing(model: nn.Module, planned: int | None, saved: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Fit every pending :class:`BudgetAnnealing` of the model's selector gates to the run's budget.

    ``saved`` (on resume: the checkpoint's record, or None when it has none) is put back as it was,
    so a resumed run uses exactly the schedule of the original one.
    """
    records: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, AnnealedGate):
            continue
        if saved is not None:  # resume: what the original run did, never refitted
            record = saved.get(name)
            # (fitted already when the checkpoint's state dict carried the gate's fitted annealing)
            if record is not None and record.get("status") == "fitted" and (module.annealing_pending or module.fitted_annealing is not None):
                module.restore_annealing(record)
                records[name] = dict(record)
                continue
            if module.annealing_pending:
                records[name] = {"status": "kept", "reason": "the checkpoint holds no fitted annealing for this gate"}
                continue
        if planned is None:
            records[name] = {"status": "kept", "reason": "the training budget is unknown (data without a length and no max_steps)"}
            if module.annealing_pending:
                warnings.warn(
                    f"gate {name!r}: its gamma annealing is given as fractions of the budget (BudgetAnnealing) but "
                    "fit cannot tell the budget (the training data has no length and max_steps is not set); it "
                    "follows BudgetAnnealing.before_fit. Pass max_steps, or build the gate with an explicit "
                    "GammaAnnealing",
                    stacklevel=3,
                )
            continue
        records[name] = module.fit_annealing(planned)
    return records


def fit(
    model: nn.Module,
    train_data: Any,
    loss: LossFn,
    *,
    val_data: Any = None,
    search_data: Any = None,
    epochs: int = 10,
    batch_size: int = 256,
    optimizer: Any = None,
    search: SearchSchedule | LocalSearcher | Searcher | Mapping[str, Any] | None = None,
    metrics: Mapping[str, Callable[[Any, Any], float]] | None = None,
    select_by: str = "val_loss",
    select_mode: str | None = None,
    early_stopping_patience: int | None = None,
    restore_best: bool | None = None,
    callbacks: Sequence[Any] | None = None,
    harden: bool = False,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: Any = None,
    seed: int = 0,
    progress: bool = True,
    gate_loss_weight: float = 1.0,
    max_steps: int | None = None,
    process_group: Any = None,
) -> FitResult:
    """Train ``model`` with first-order steps alternated with permutation local search.

    Args:
        model: a module containing an ``MoE`` / ``MultiGateMoE`` (needed only when searching), called as
            ``model(x)`` or ``model(**inputs)``.
        train_data: ``(inputs, targets)`` tensors (``inputs`` a tensor or a dict of the model's keyword
            arguments, ``targets`` a tensor or a list of per-task tensors), shuffled every epoch by a
            private ``torch.Generator`` seeded by ``seed``; or a map-style ``Dataset`` of ``(inputs,
            targets)`` items, read through :func:`~routing_search.training.make_loader` (same seed and
            batch size: the same batches as the equivalent tensors); or a ``DataLoader`` (used as it is).
        loss: ``loss(prediction, targets)`` → per-example ``[B]`` (needed for fast search) or a scalar;
            the prediction is ``MoE.output`` / ``MultiGateMoE.outputs`` / whatever the model returns.
            See :mod:`routing_search.losses`.
        val_data: held-out data in any form ``train_data`` takes (read in order): the validation loss,
            metrics, expert usage, gate reports, best-epoch selection and early stopping use it.
        search_data: held-out data for the search (default ``val_data``): any of those forms, or a list
            of ``(inputs, targets)`` batches (a list of single rows is refused); loaded into memory once.
        epochs: total number of epochs (a resumed run continues up to this count).
        batch_size: rows per step for tensors and Datasets (the last batch of an epoch may be smaller);
            also the evaluation batch.
        optimizer: None (Adam, lr 1e-3), a ``torch.optim.Optimizer`` over the model's parameters (built
            after moving the model to ``device``), or a callable ``params -> optimizer``.
        search: None (no search); a :class:`~routing_search.training.SearchSchedule` (method, every
            steps or epochs, rounds, rows, rng, ``local_search`` options, and optionally a refit stage on
            training rows and a search before training); or a
            :class:`~routing_search.training.LocalSearcher` or any object with the
            :class:`~routing_search.training.searcher.Searcher` protocol (scheduled on steps, uses all of
            ``search_data``). A dict of the schedule's old keys still works but is deprecated.
        metrics: ``{name: metric(predictions, targets) -> float}`` computed every epoch on the whole of
            ``val_data`` (predictions concatenated over batches, as the model's unwrapped output: a list
            per task for ``MultiGateMoE``); see :mod:`~routing_search.training.task_metrics`. Recorded in
            ``History.metrics`` and shown by the progress bar.
        select_by: ``'val_loss'`` or a metric name: the criterion of the best epoch and of early stopping.
        select_mode: ``'min'`` or ``'max'``; None: ``'min'`` for the loss, the metric's own direction for
            :mod:`~routing_search.training.task_metrics` metrics (required for other callables).
        early_stopping_patience: stop after this many epochs without improvement of ``select_by``.
        restore_best: load the best epoch's weights at the end. None (default): when early stopping or
            when ``select_by`` is not ``'val_loss'``; True: whenever ``val_data`` is given; False: never.
        callbacks: callables ``callback(event)`` or objects with ``on_epoch_end(event)`` /
            ``on_search(event)``, called with a :class:`~routing_search.training.FitEvent` at the end of
            every epoch (before its checkpoint) and after every search; returning True or calling
            ``event.request_stop()`` ends training.
        Gamma annealing: a DSelect-k / COMET gate built with a
            :class:`~routing_search.gates.annealed.BudgetAnnealing` (fractions of the budget) has it fitted
            here, once, to this run's budget (``epochs`` × batches per epoch, or ``max_steps`` when
            smaller) before the first step; an explicit ``GammaAnnealing``, a callable ``gamma`` or
            ``anneal=None`` is left as it is. What was done per gate is in ``FitResult.gamma_annealing``
            and in the checkpoint, from which a resumed run restores it (so it continues bit for bit).
        harden: at the end, turn every DSelect-k / COMET gate into its exact binary form
            (:func:`routing_search.analysis.harden`, certified on the validation inputs) and evaluate the
            hardened model; see ``FitResult.certificate``. Without it, ``fit`` warns when a selector gate
            ends non-binary.
        checkpoint_dir: write ``checkpoint.pt`` there (atomically, checksummed, permissions from the umask)
            at the end of every epoch. A directory that already holds one is refused unless ``resume`` or
            ``overwrite``; a path that is a file is refused at once.
        resume: continue from ``checkpoint_dir/checkpoint.pt``, exactly as if never stopped (CPU). The
            model, optimiser (same class) and data must be built as for the original run; a different
            ``batch_size``, ``seed``, ``gate_loss_weight``, ``select_by`` / ``select_mode``, ``search``
            (method, schedule, rows, plain options) or best-weight keeping (``restore_best``) than the
            checkpoint's warns.
        overwrite: start afresh and replace an existing checkpoint in ``checkpoint_dir``.
        device: where to train (default: the model's current device; CPU for a model without tensors).
        seed: non-negative integer; seeds the shuffling generator and the default search generator (global
            RNGs untouched, except that ``resume`` restores the global torch RNG state saved with the
            checkpoint).
        progress: show a tqdm bar over steps (with the validation loss and metrics after each epoch).
        gate_loss_weight: weight of the model output's auxiliary ``.loss`` (the gate regularisers).
        max_steps: stop after this many optimiser steps in total (may end an epoch early; a resumed
            run then starts at the next epoch).
        process_group: ``None`` (default): the world group when ``torch.distributed`` is initialised
            (e.g. under ``torchrun``), else a single process; ``False``: this process alone; or a
            ``ProcessGroup``. Under a group, every rank calls ``fit`` with the same arguments and the
            whole data; ``batch_size`` is the global batch, each rank trains on its part of every global
            batch through ``DistributedDataParallel`` (or ``model`` when it already is one), searches on
            its part of the search rows with the ranks' sums all-reduced (every rank accepts the same
            moves), evaluates its part of ``val_data`` (sums reduced, metrics on all predictions), and
            rank 0 alone shows progress, warns and writes checkpoints, which resume at any world size
            where that is exact. See :mod:`~routing_search.training.distributed_training`.

    Returns:
        :class:`~routing_search.training.FitResult`.

    Raises:
        FloatingPointError: the training loss became NaN/inf (the message names the epoch and step; the
            failing step is not applied).
        ValueError: non-finite targets (naming the data argument), and bad arguments (naming them).
    """
    # ---- arguments
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    ctx = resolve_context(process_group)
    user_wrapper: nn.Module | None = None
    if unwrap_model(model) is not model:
        if not ctx.active:
            raise ValueError(
                f"model is wrapped in {type(model).__name__} but fit runs as a single process (process_group=False or "
                "torch.distributed not initialised); pass the model itself"
            )
        user_wrapper, model = model, unwrap_model(model)
    if not callable(loss):
        raise TypeError(f"loss must be callable(prediction, targets), got {type(loss).__name__}")
    epochs = check_int("epochs", epochs, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    gate_loss_weight = check_positive_float("gate_loss_weight", gate_loss_weight, allow_zero=True)
    patience = None if early_stopping_patience is None else check_int("early_stopping_patience", early_stopping_patience, minimum=1)
    max_steps = None if max_steps is None else check_int("max_steps", max_steps, minimum=1)
    for flag, flag_value in (("resume", resume), ("overwrite", overwrite), ("progress", progress), ("harden", harden)):
        if not isinstance(flag_value, bool):
            raise TypeError(f"{flag} must be True or False, got {flag_value!r}")
    if restore_best is not None and not isinstance(restore_best, bool):
        raise TypeError(f"restore_best must be None, True or False, got {restore_best!r}")
    metrics = _check_metrics(metrics)
    select_by, select_mode = resolve_select_mode(select_by, select_mode, metrics)
    callbacks = check_callbacks(callbacks)
    directory = _check_checkpoint_dir(checkpoint_dir)
    if resume and overwrite:
        raise ValueError("resume=True and overwrite=True contradict each other; choose one")
    if resume and directory is None:
        raise ValueError("resume=True needs checkpoint_dir (where checkpoint.pt was written)")
    if metrics and val_data is None:
        raise ValueError("metrics need val_data (they are computed on the validation set)")
    if patience is not None and val_data is None:
        raise ValueError("early_stopping_patience needs val_data")
    if select_by != "val_loss" and val_data is None:
        raise ValueError("select_by needs val_data")
    if search_data is not None and search is None:
        raise ValueError("search_data is used only by a search; pass search=SearchSchedule(...) or drop search_data")

    # ---- data, device, optimiser, search
    shuffle = torch.Generator().manual_seed(seed)
    train_source = as_source("train_data", train_data, batch_size, shuffle, seed=seed, shuffle=True)
    train_source = shard_source(train_source, train_data, ctx, train=True, seed=seed)
    val_source: BatchSource | None = None
    if val_data is not None:
        val_source = as_source("val_data", val_data, batch_size, torch.Generator().manual_seed(seed), seed=seed, shuffle=False)
        val_source = shard_source(val_source, val_data, ctx, train=False, seed=seed)
    device = _resolve_device(device, model)
    model.to(device)
    optimizer = _make_optimizer(optimizer, model)
    plan = make_searcher(search, model, loss, seed, stacklevel=3, process_group=ctx.process_group_arg,
                         train_data=train_data, device=device)
    searcher, unit, search_rows = plan.searcher, plan.unit, plan.rows
    if searcher is not None and ctx.active:
        if not hasattr(searcher, "process_group"):
            raise ValueError(f"search= {type(searcher).__name__} has no process_group attribute; under a process group "
                             "fit needs a searcher built for fit's group (one that accepts the same moves on every rank)")
        if resolve_context(searcher.process_group).group is not ctx.group:
            raise ValueError("search= LocalSearcher was built with another process_group than fit's; build it with the same one")
    if searcher is not None:
        held_out = val_data if search_data is None else search_data
        if held_out is None:
            raise ValueError("search needs held-out data: pass search_data= or val_data=")
        held_out_name = "val_data" if search_data is None else "search_data"
        search_batch = to_device(search_subset(held_out, search_rows, seed, name=held_out_name), device)
        check_finite_targets(search_batch[1], held_out_name)
        search_batch = shard_rows(search_batch, ctx)  # this rank's part; the search sums over ranks
    generators = module_generators(model)
    data_generators = {
        f"{source.name}.{name}": g
        for source in (train_source, val_source)
        if source is not None
        for name, g in source.generators().items()
        if g is not shuffle
    }
    record = RunRecord(world_size=ctx.world_size, train_order=train_order(train_data))
    record.note_batch_norms(model)
    watch = RandomnessWatch(generators, device)
    restore = (patience is not None or select_by != "val_loss") if restore_best is None else restore_best
    keep_best = restore and val_source is not None
    selection = Selection(select_by, select_mode, patience=patience, keep_best=keep_best)
    capture = GATE_ROWS

    history = History()
    start_epoch, step = 0, 0
    resumed, saved_annealing = False, None
    path: Path | None = None
    config = {"batch_size": batch_size, "seed": seed, "gate_loss_weight": gate_loss_weight, "select_by": select_by, "select_mode": select_mode,
              "search": _search_setting(searcher, unit, search_rows, plan.at_start),
              # whether the best epoch's weights are kept (a run that kept none cannot restore them after a resume)
              "restore_best": keep_best}
    setup_error: BaseException | None = None
    try:  # under a process group, a failure on one rank (e.g. its copy of the checkpoint) stops every rank here
        if directory is not None:
            path = directory / CHECKPOINT_NAME
            if path.is_dir():  # found now, not when the first epoch's checkpoint is written
                raise IsADirectoryError(f"{str(path)!r} is a directory; fit writes its checkpoint file there: choose "
                                        "another checkpoint_dir or move that directory")
            if resume:
                state = load_checkpoint(path, map_location="cpu")
                record.merge(check_world_size_change(state, path, ctx, record.train_order))
                restore_checkpoint(state, path, model=model, optimizer=optimizer, searcher=searcher, shuffle=shuffle,
                                   data_generators=data_generators, generators=generators, device=device)
                restore_rank_rng(state, ctx, generators, device)
                history = History.from_dict(state["history"])
                start_epoch, step = int(state["epoch"]), int(state["step"])
                selection.load_state_dict(state["early_stopping"])
                saved_config = state.get("config", {})
                resumed, saved_annealing = True, saved_config.get("gamma_annealing")
                for key, setting in config.items():
                    if key in saved_config and saved_config[key] != setting and ctx.is_main:
                        warnings.warn(
                            f"resuming with {key}={setting!r} but the checkpoint was written with "
                            f"{key}={saved_config[key]!r}; the run will not match an uninterrupted one",
                            stacklevel=2,
                        )
            elif path.exists() and not overwrite:
                raise FileExistsError(
                    f"{str(path)!r} already exists; pass resume=True to continue that run or overwrite=True to replace it"
                )
            if ctx.is_main:
                directory.mkdir(parents=True, exist_ok=True)
    except Exception as exc:
        if not ctx.active:
            raise
        setup_error = exc
    if train_source.num_batches() == 0:  # the same on every rank (a global count): every rank raises
        raise ValueError("train_data holds no rows (an empty Dataset or DataLoader); fit needs at least one training row")
    agree_on_setup(ctx, setup_error, train_source.num_batches())
    # The module the gradient steps call: DistributedDataParallel under a process group (built after the
    # resume, so that every rank starts from the same state); evaluation, search and checkpoints use ``model``.
    train_module: nn.Module = user_wrapper if user_wrapper is not None else wrap_model(model, ctx, device)
    meters = sync_buffers(model, ctx)
    broadcast_setting = pause_buffer_broadcast(user_wrapper)
    dstep = DistributedStep(ctx, train_module, loss, gate_loss_weight, device) if ctx.active else None
    gate_loss_seen = False

    # due(0): not when the schedule's rounds are used up (rounds=0: no search at all)
    start_search_s = 0.0  # the search before training, counted in the first epoch's search and epoch time
    if searcher is not None and plan.at_start and start_epoch == 0 and step == 0 and searcher.due(0):
        start_search_s = _search_at_start(searcher, search_batch, history, callbacks, model, optimizer, ctx)

    # ---- the loop
    per_epoch = train_source.num_batches()
    planned = None if per_epoch is None else epochs * per_epoch
    if planned is not None and max_steps is not None:
        planned = min(planned, max_steps)
    budget = planned if planned is not None else max_steps
    gamma_annealing = _fit_gamma_annealing(model, budget, saved_annealing if resumed else None)
    config["gamma_annealing"] = gamma_annealing  # saved with every checkpoint, restored on resume
    bar = tqdm(total=planned, initial=step if planned is None else min(step, planned), disable=not progress or not ctx.is_main, desc="fit", unit="step")
    stop_reason: str | None = None
    epochs_run = start_epoch
    evaluation: EvalResult | None = None
    try:
        for epoch in range(start_epoch, epochs):
            if selection.should_stop:
                stop_reason = "early_stopping"
                break
            if max_steps is not None and step >= max_steps:
                stop_reason = "max_steps"
                break
            epoch_start = time.perf_counter() - start_search_s
            train_s, search_s, start_search_s = 0.0, start_search_s, 0.0
            history.sinkhorn.extend(anneal_sinkhorn(model, epoch, process_group=ctx.process_group_arg))
            set_sampler_epoch(train_data, epoch)
            epoch_losses: list[float] = []
            callback_stop: str | None = None

            def after_search(result: OptimizeResult | None, seconds: float) -> None:
                nonlocal callback_stop
                if result is None:  # the searcher did not search after all (Searcher.step may return None)
                    return
                record = _search_record(result, epoch, step, seconds)
                history.searches.append(record)
                callback_stop = _callbacks_agreed(
                    ctx, callbacks, lambda: FitEvent("search", epoch, step, model, optimizer, history, search=record), callback_stop
                )

            model.train()
            watch.start()
            drawn = 0
            for inputs, targets, rows in train_source.batches(device, shuffle=True):
                if max_steps is not None and step >= max_steps:
                    break
                drawn += 1
                t0 = time.perf_counter()
                if not isinstance(train_source, TensorSource):  # tensor pairs were checked once, up front
                    check_finite_targets(targets, f"train_data (epoch {epoch}, step {step + 1})")
                optimizer.zero_grad(set_to_none=True)
                if dstep is not None:  # under a process group: this rank's part, failures on every rank together
                    value, scalar = dstep(inputs, targets, rows, epoch=epoch, step=step)
                else:
                    try:
                        out = call_model(train_module, inputs)
                    except ValueError as exc:
                        _explain_one_row_batch(exc, model, rows, epoch, step, batch_size, train_source)
                        raise
                    value = _objective(loss, out, targets, gate_loss_weight)
                    scalar = float(value.detach())
                    aux = getattr(out, "loss", None)
                    if not gate_loss_seen and gate_loss_weight != 0 and isinstance(aux, torch.Tensor) and bool(aux.detach() != 0):
                        gate_loss_seen = True
                if not math.isfinite(scalar):
                    raise FloatingPointError(
                        f"the training loss is {scalar} at epoch {epoch}, step {step + 1} (the step was not applied; "
                        "the last checkpoint, if any, holds the previous epoch). Lower the learning rate, check the "
                        "inputs, or clip gradients"
                    )
                value.backward()
                optimizer.step()
                step += 1
                history.step_loss.append(scalar)
                epoch_losses.append(scalar)
                train_s += time.perf_counter() - t0
                if searcher is not None and unit == "steps" and searcher.due(step):
                    t1 = time.perf_counter()
                    result = searcher.step(step, search_batch)
                    search_s += time.perf_counter() - t1
                    after_search(result, _logged_seconds(searcher, time.perf_counter() - t1))
                bar.update(1)
                bar.set_postfix(_postfix(epoch, scalar, evaluation), refresh=False)
                if callback_stop is not None:
                    break
            watch.stop(record)
            if drawn == 0 and not ctx.active:  # e.g. an IterableDataset that yields nothing (the length is unknown)
                raise ValueError(f"train_data yielded no batch in epoch {epoch}; fit needs at least one training row")
            if (gate_loss_seen or (dstep is not None and dstep.gate_loss_seen)) and "gate loss" not in record.batch_statistics:
                record.batch_statistics.append("gate loss")
            if searcher is not None and unit == "epochs" and callback_stop is None and searcher.due(epoch + 1):
                t1 = time.perf_counter()
                result = searcher.step(epoch + 1, search_batch)
                search_s += time.perf_counter() - t1
                after_search(result, _logged_seconds(searcher, time.perf_counter() - t1))

            sync_buffers(model, ctx, meters)  # usage meters summed over ranks, other buffers from rank 0
            t2 = time.perf_counter()
            evaluation = None
            if val_source is not None:
                evaluation = evaluate(model, val_source, loss, device, metrics=metrics, capture_rows=capture,
                                      process_group=ctx.process_group_arg)
                if evaluation.rows == 0:  # a Dataset / DataLoader without rows (tensor pairs are checked up front)
                    raise ValueError("val_data yielded no rows (an empty Dataset or DataLoader); pass held-out rows or val_data=None")
                if not math.isfinite(evaluation.loss):
                    raise FloatingPointError(f"the validation loss is {evaluation.loss} at the end of epoch {epoch}")
            gates = gate_report(model, None if evaluation is None else evaluation.layer_inputs)
            eval_s = time.perf_counter() - t2
            history.epoch.append(epoch)
            history.train_loss.append(sum(epoch_losses) / len(epoch_losses) if epoch_losses else float("nan"))
            history.val_loss.append(None if evaluation is None else evaluation.loss)
            history.metrics.append({} if evaluation is None else dict(evaluation.metrics))
            history.train_seconds.append(train_s)
            history.search_seconds.append(search_s)
            history.eval_seconds.append(eval_s)
            history.usage.append({} if evaluation is None else evaluation.usage)
            history.gates.append(gates)
            history.permutations.append(permutations_of(model))
            if evaluation is not None:
                selection.update(epoch, evaluation.loss, evaluation.metrics, model)
            history.epoch_seconds.append(time.perf_counter() - epoch_start)
            epochs_run = epoch + 1
            bar.set_postfix(_postfix(epoch, epoch_losses[-1] if epoch_losses else None, evaluation), refresh=True)
            callback_stop = _callbacks_agreed(ctx, callbacks, lambda: FitEvent(
                "epoch_end", epoch, step, model, optimizer, history,
                val_loss=None if evaluation is None else evaluation.loss,
                metrics={} if evaluation is None else dict(evaluation.metrics),
            ), callback_stop)
            if path is not None:
                state = checkpoint_state(model=model, optimizer=optimizer, searcher=searcher, shuffle=shuffle,
                                         data_generators=data_generators, generators=generators, device=device,
                                         history=history.to_dict(), epoch=epochs_run, step=step,
                                         selection=selection.state_dict(), config=config)
                state["distributed"] = record.to_dict()
                rank_rng = gather_rank_rng(ctx, generators, device)  # collective: every rank's own streams
                if rank_rng is not None:
                    state["rank_rng"] = rank_rng
                # Rank 0 writes (atomically); the others wait for it and fail with it.
                save_on_main(ctx, lambda: save_checkpoint(path, state, overwrite=True))
            if callback_stop is not None:
                stop_reason = f"callback: {callback_stop}" if callback_stop else "callback"
                break
            if selection.should_stop:
                stop_reason = "early_stopping"
                break
        else:
            if max_steps is not None and step >= max_steps and epochs_run < epochs:
                stop_reason = "max_steps"
    finally:
        bar.close()
        resume_buffer_broadcast(user_wrapper, broadcast_setting)

    # ---- the end: best weights, hardening, warnings
    restored = False
    if keep_best and selection.best_state is not None:
        model.load_state_dict(selection.best_state)
        restored = True
    result = FitResult(
        model=model,
        history=history,
        best_val=selection.best_val,
        epochs_run=epochs_run,
        stopped_early=stop_reason == "early_stopping",
        checkpoint_path=path,
        best_epoch=selection.best_epoch,
        best_score=selection.best_score,
        select_by=select_by,
        select_mode=select_mode,
        restored_best=restored,
        stop_reason=stop_reason,
        gamma_annealing=gamma_annealing,
    )
    final = None
    group_arg = ctx.process_group_arg
    if val_source is not None and (harden or restored):
        final = evaluate(model, val_source, loss, device, capture_rows=capture, process_group=group_arg)
    if harden:
        inputs_seen = (final.layer_inputs if final is not None
                       else evaluate(model, train_source, loss, device, capture_rows=capture, process_group=group_arg).layer_inputs)
        result.certificate = harden_model(model, inputs_seen)
        if val_source is not None:
            hardened = evaluate(model, val_source, loss, device, metrics=metrics, process_group=group_arg)
            result.hardened_val_loss, result.hardened_metrics = hardened.loss, dict(hardened.metrics)
    else:
        report = gate_report(model, final.layer_inputs) if final is not None else (history.gates[-1] if history.gates else {})
        if ctx.is_main:
            warn_non_binary(report, stacklevel=2)
    return result
