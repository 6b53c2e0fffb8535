"""The trainer: first-order steps alternated with permutation local search, with exact resume.

:func:`fit` trains any model containing an ``MoE`` / ``MultiGateMoE`` layer on in-memory tensors. On the
schedule the user sets it runs :func:`routing_search.local_search` on held-out batches, handles learned
Sinkhorn permutations (annealing, then Hungarian rounding), records a :class:`History`, stops early, and
checkpoints everything at the end of every epoch so that a resumed run continues exactly (on CPU) as if
it had never stopped.

What makes resume exact: the checkpoint written at the end of epoch ``e`` holds the model state (the
permutations, usage meters and gate call counters are buffers), the optimiser state, the searcher's
round count and numpy random state, the private shuffling ``torch.Generator``, every ``torch.Generator``
stored on a module (e.g. a noisy gate's), the global torch RNG (dropout) and the CUDA RNG of the device
in use, the history, the early-stopping state (with the best weights) and the step/epoch counters.
Nothing between the end of an epoch and the start of the next consumes randomness, so restoring that
state at epoch ``e + 1`` reproduces the uninterrupted run bit for bit on CPU (GPU kernels may be
non-deterministic).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import OptimizeResult
from torch import nn
from tqdm import tqdm

from .._validation import check_int, check_positive_float
from ..layers.moe import MoE
from ..layers.multigate import MultiGateMoE
from ..batches import as_batch, call_model, num_rows, take_rows, tensors_of, to_device, unwrap_prediction
from .checkpoint import CheckpointError, check_compatible, load_checkpoint, save_checkpoint, to_plain
from .searcher import LocalSearcher

__all__ = ["fit", "FitResult", "History", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "checkpoint.pt"
LossFn = Callable[[Any, Any], torch.Tensor]


# ---------------------------------------------------------------------------------------------- history
@dataclass
class History:
    """What happened during :func:`fit`; every field is a plain list (see :meth:`to_dict`).

    Attributes:
        step_loss: training objective (task loss + weighted gate loss) of every step.
        epoch: epoch index (0-based) of each entry of the per-epoch lists below.
        train_loss: mean ``step_loss`` over the epoch.
        val_loss: mean per-example task loss on ``val_data`` (None without it).
        train_seconds / search_seconds / eval_seconds / epoch_seconds: wall time per epoch spent in
            gradient steps, in searches, in evaluation, and in total.
        usage: per epoch, ``{layer name: [{'soft': [...], 'hard': [...]} per task]}`` computed from the
            weights the MoE layers return on ``val_data`` (soft = mean weight, hard = fraction of rows
            with non-zero weight). The model itself is named ``''``.
        permutations: per epoch (after its searches), ``{layer name: [index rows of each permutation module]}``.
        searches: one dict per search: ``epoch``, ``step``, ``fun0``, ``fun``, ``accepted`` (number of
            moves kept), ``nit`` (moves accepted in total; larger for 'ils', whose discarded descents also
            count), ``nfev``, ``seconds``, ``moves`` (kind, slot, selector, before, after, fun_before, fun_after).
        sinkhorn: learned-permutation events: ``epoch``, ``module``, ``event`` ('progress' or 'round'),
            and ``tau``/``iters`` or the rounded ``permutation``.
    """

    step_loss: list[float] = field(default_factory=list)
    epoch: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float | None] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    search_seconds: list[float] = field(default_factory=list)
    eval_seconds: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    usage: list[dict[str, Any]] = field(default_factory=list)
    permutations: list[dict[str, Any]] = field(default_factory=list)
    searches: list[dict[str, Any]] = field(default_factory=list)
    sinkhorn: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A deep copy as plain lists/dicts/numbers/strings (JSON-serialisable)."""
        return to_plain(copy.deepcopy(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> History:
        """Inverse of :meth:`to_dict` (unknown keys are an error)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown History fields {sorted(unknown)}")
        return cls(**{k: copy.deepcopy(list(v)) for k, v in data.items()})

    def search_share(self) -> float:
        """Fraction of the recorded epoch wall time spent in searches (0 when nothing was recorded)."""
        total = sum(self.epoch_seconds)
        return sum(self.search_seconds) / total if total > 0 else 0.0


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        model: the trained model (the same object that was passed in; best weights restored when early
            stopping with ``restore_best=True``).
        history: the :class:`History` (including epochs run before a resume).
        best_val: lowest validation loss seen (None without ``val_data``).
        epochs_run: epochs completed in total (including those before a resume).
        stopped_early: True when early stopping ended training.
        checkpoint_path: the checkpoint file, when ``checkpoint_dir`` was given.
    """

    model: nn.Module
    history: History
    best_val: float | None
    epochs_run: int
    stopped_early: bool
    checkpoint_path: Path | None


# ------------------------------------------------------------------------------------------------ data
def _check_pair(name: str, data: Any) -> tuple[Any, Any]:
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(f"{name} must be a pair (inputs, targets) of tensors, got {type(data).__name__}")
    inputs, targets = data
    if not isinstance(inputs, (torch.Tensor, Mapping)):
        raise TypeError(f"{name}: inputs must be a tensor or a dict of tensors (e.g. {{'x', 'task', 'key'}}), got {type(inputs).__name__}")
    rows = {t.shape[0] for t in tensors_of(inputs) if t.dim() > 0} | {t.shape[0] for t in tensors_of(targets) if t.dim() > 0}
    if not tensors_of(targets):
        raise TypeError(f"{name}: targets must be a tensor or a list/dict of tensors, got {type(targets).__name__}")
    if len(rows) != 1:
        raise ValueError(f"{name}: inputs and targets must have the same number of rows, got {sorted(rows)}")
    if rows == {0}:
        raise ValueError(f"{name} holds no rows")
    return inputs, targets


def _batches(data: tuple[Any, Any], batch_size: int, device: torch.device, order: torch.Tensor | None = None) -> Iterable[tuple[Any, Any, int]]:
    n = num_rows(data)
    order = torch.arange(n) if order is None else order
    for start in range(0, n, batch_size):
        index = order[start : start + batch_size]
        yield to_device(take_rows(data[0], index), device), to_device(take_rows(data[1], index), device), int(index.numel())


# ------------------------------------------------------------------------------------------- pieces
def _resolve_device(device: Any, model: nn.Module) -> torch.device:
    if device is not None:
        return torch.device(device)
    first = next(iter(model.parameters()), None)
    if first is None:
        first = next(iter(model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


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


DEFAULT_SEARCH_ROWS = 2048


def _make_searcher(search: Any, model: nn.Module, loss: LossFn, seed: int) -> tuple[LocalSearcher | None, str, int | None]:
    """The searcher, its schedule unit ('steps' or 'epochs') and the cap on held-out rows it uses."""
    if search is None:
        return None, "steps", None
    if isinstance(search, LocalSearcher):
        if search.model is not model:
            raise ValueError("search= LocalSearcher was built for a different model")
        return search, "steps", None
    if not isinstance(search, Mapping):
        raise TypeError(f"search must be None, a dict of options or a LocalSearcher, got {type(search).__name__}")
    options = dict(search)
    method = options.pop("method", "swap")
    rows = options.pop("rows", DEFAULT_SEARCH_ROWS)
    if rows is not None:
        rows = check_int("search rows", rows, minimum=1)
    every = options.pop("every", None)
    every_epochs = options.pop("every_epochs", None)
    if every is not None and every_epochs is not None:
        raise ValueError("search: give either 'every' (steps) or 'every_epochs', not both")
    rounds = options.pop("rounds", None)
    rng = options.pop("rng", None)
    rng = np.random.default_rng(seed) if rng is None else rng
    if every is not None:
        return LocalSearcher(model, loss, method=method, every=every, rounds=rounds, rng=rng, **options), "steps", rows
    every_epochs = 1 if every_epochs is None else every_epochs
    return LocalSearcher(model, loss, method=method, every=every_epochs, rounds=rounds, rng=rng, **options), "epochs", rows


def _search_subset(data: Any, rows: int | None, seed: int) -> Any:
    """At most ``rows`` held-out rows, a fixed seeded subset (the same rows at every search)."""
    inputs, targets = as_batch(data)
    total = (inputs["x"] if isinstance(inputs, Mapping) else inputs).shape[0]
    if rows is None or total <= rows:
        return inputs, targets
    chosen = torch.randperm(total, generator=torch.Generator().manual_seed(seed + 1))[:rows].sort().values
    return take_rows(inputs, chosen), take_rows(targets, chosen)


def _routing_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (MoE, MultiGateMoE))]


def _permutations(model: nn.Module) -> dict[str, Any]:
    return {name: [p.index.detach().cpu().tolist() for p in layer.permutations] for name, layer in _routing_layers(model)}


def _module_generators(model: nn.Module) -> dict[str, torch.Generator]:
    """Every ``torch.Generator`` stored as an attribute of a module (e.g. a noisy gate's private one)."""
    found = {}
    for name, module in model.named_modules():
        for attr, value in vars(module).items():
            if isinstance(value, torch.Generator):
                found[f"{name}.{attr}" if name else attr] = value
    return found


def _objective(loss: LossFn, out: Any, targets: Any, gate_loss_weight: float) -> torch.Tensor:
    value = loss(unwrap_prediction(out), targets)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"loss must return a tensor (per-example [B] or a scalar), got {type(value).__name__}")
    if value.dim() > 0:
        value = value.mean()
    aux = getattr(out, "loss", None)
    if gate_loss_weight != 0 and isinstance(aux, torch.Tensor):
        value = value + gate_loss_weight * aux
    return value


@torch.no_grad()
def _evaluate(model: nn.Module, data: tuple[Any, Any], loss: LossFn, batch_size: int, device: torch.device) -> tuple[float, dict[str, Any]]:
    """Mean per-example task loss on ``data`` and per-layer, per-task expert usage (eval mode)."""
    sums: dict[str, list[list[torch.Tensor]]] = {}

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            weights = getattr(output, "weights", None)
            weights = [weights] if isinstance(weights, torch.Tensor) else list(weights or [])
            acc = sums.setdefault(name, [[torch.zeros((), dtype=torch.float64), None, None] for _ in weights])
            for slot, w in zip(acc, weights):
                w = w.detach().to(torch.float64).cpu()
                slot[0] = slot[0] + w.shape[0]
                slot[1] = w.sum(0) if slot[1] is None else slot[1] + w.sum(0)
                hard = (w != 0).to(torch.float64).sum(0)
                slot[2] = hard if slot[2] is None else slot[2] + hard

        return hook

    handles = [layer.register_forward_hook(hook_for(name)) for name, layer in _routing_layers(model)]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    total, rows = 0.0, 0
    try:
        for inputs, targets, count in _batches(data, batch_size, device):
            value = loss(unwrap_prediction(call_model(model, inputs)), targets)
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"loss must return a tensor (per-example [B] or a scalar), got {type(value).__name__}")
            value = value.detach().to(torch.float64)
            total += float(value.sum()) if value.dim() > 0 and value.shape[0] == count else float(value.mean()) * count
            rows += count
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes:
            m.training = mode
    usage = {
        name: [
            {"soft": (s / n.clamp_min(1)).tolist(), "hard": (h / n.clamp_min(1)).tolist()}
            for n, s, h in acc
            if s is not None
        ]
        for name, acc in sums.items()
    }
    return total / max(rows, 1), usage


def _search_record(result: OptimizeResult, epoch: int, step: int, seconds: float) -> dict[str, Any]:
    moves = [to_plain(dataclasses.asdict(m)) for m in getattr(result, "moves", [])]
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
    }


def _sinkhorn_events(model: nn.Module, epoch: int) -> list[dict[str, Any]]:
    """Anneal (``set_progress(epoch)``) or round (once, at ``epoch >= anneal_steps``) every learned permutation."""
    from ..search.sinkhorn import sinkhorn_modules

    names = {id(m): name for name, m in model.named_modules()}
    events = []
    for module in sinkhorn_modules(model):
        if module.frozen:
            continue
        name = names[id(module)]
        if epoch < module.anneal_steps:
            module.set_progress(epoch)
            events.append({"epoch": epoch, "module": name, "event": "progress", "tau": float(module.tau), "iters": int(module.num_iters)})
        else:
            perm = module.round_()
            events.append({"epoch": epoch, "module": name, "event": "round", "permutation": [int(v) for v in perm]})
    return events


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------- fit
def fit(
    model: nn.Module,
    train_data: tuple[Any, Any],
    loss: LossFn,
    *,
    val_data: tuple[Any, Any] | None = None,
    search_data: Any = None,
    epochs: int = 10,
    batch_size: int = 256,
    optimizer: Any = None,
    search: Mapping[str, Any] | LocalSearcher | None = None,
    early_stopping_patience: int | None = None,
    restore_best: bool = True,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: Any = None,
    seed: int = 0,
    progress: bool = True,
    gate_loss_weight: float = 1.0,
    max_steps: int | None = None,
) -> FitResult:
    """Train ``model`` with first-order steps alternated with permutation local search.

    Args:
        model: a module containing an ``MoE`` / ``MultiGateMoE`` (needed only when searching), called as
            ``model(x)`` or ``model(**inputs)``.
        train_data: ``(inputs, targets)``; ``inputs`` a tensor or a dict of tensors (e.g. ``{'x', 'task',
            'key'}``), ``targets`` a tensor or a list of per-task tensors. Shuffled every epoch with a
            private ``torch.Generator`` seeded by ``seed``; batches are moved to ``device``.
        loss: ``loss(prediction, targets)`` → per-example ``[B]`` (needed for fast search) or a scalar;
            the prediction is ``MoE.output`` / ``MultiGateMoE.outputs`` / whatever the model returns.
            See :mod:`routing_search.losses`.
        val_data: held-out ``(inputs, targets)`` for the validation loss, usage and early stopping.
        search_data: held-out data for the search (default ``val_data``): a pair or a list of pairs.
        epochs: total number of epochs (a resumed run continues up to this count).
        batch_size: rows per step (the last batch of an epoch may be smaller); also the eval batch.
        optimizer: None (Adam, lr 1e-3), a ``torch.optim.Optimizer`` over the model's parameters (built
            after moving the model to ``device``), or a callable ``params -> optimizer``.
        search: None (no search); a dict with ``method`` (default 'swap'), ``every`` (steps) or
            ``every_epochs`` (default 1; search at the end of every that many epochs), ``rounds`` (max
            searches), ``rng`` (default: a generator seeded by ``seed``), ``rows`` (the search uses a fixed
            seeded subset of at most this many held-out rows, default 2048; None for all) and any
            ``local_search`` option (e.g. ``max_iter``, ``screen``); or a :class:`LocalSearcher`
            (scheduled on steps, uses all of ``search_data``).
        early_stopping_patience: stop after this many epochs without a lower validation loss.
        restore_best: with early stopping, load the best epoch's weights at the end.
        checkpoint_dir: write ``checkpoint.pt`` there (atomically) at the end of every epoch. A directory
            that already holds one is refused unless ``resume`` or ``overwrite``.
        resume: continue from ``checkpoint_dir/checkpoint.pt``, exactly as if never stopped (CPU).
            The model and optimiser must be built as for the original run.
        overwrite: start afresh and replace an existing checkpoint in ``checkpoint_dir``.
        device: where to train (default: the model's current device; CPU for a model without tensors).
        seed: seeds the shuffling generator and the default search generator (global RNGs untouched,
            except that ``resume`` restores the global torch RNG state saved with the checkpoint).
        progress: show a tqdm bar over steps.
        gate_loss_weight: weight of the model output's auxiliary ``.loss`` (the gate regularisers).
        max_steps: stop after this many optimiser steps in total (may end an epoch early; a resumed
            run then starts at the next epoch).

    Returns:
        :class:`FitResult`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss):
        raise TypeError(f"loss must be callable(prediction, targets), got {type(loss).__name__}")
    epochs = check_int("epochs", epochs, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    seed = check_int("seed", seed)
    gate_loss_weight = check_positive_float("gate_loss_weight", gate_loss_weight, allow_zero=True)
    patience = None if early_stopping_patience is None else check_int("early_stopping_patience", early_stopping_patience, minimum=1)
    max_steps = None if max_steps is None else check_int("max_steps", max_steps, minimum=1)
    train_data = _check_pair("train_data", train_data)
    if val_data is not None:
        val_data = _check_pair("val_data", val_data)
    if patience is not None and val_data is None:
        raise ValueError("early_stopping_patience needs val_data")
    if resume and overwrite:
        raise ValueError("resume=True and overwrite=True contradict each other; choose one")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir (where checkpoint.pt was written)")

    device = _resolve_device(device, model)
    model.to(device)
    optimizer = _make_optimizer(optimizer, model)
    searcher, unit, search_rows = _make_searcher(search, model, loss, seed)
    if searcher is not None:
        search_data = val_data if search_data is None else search_data
        if search_data is None:
            raise ValueError("search needs held-out data: pass search_data= or val_data=")
        search_data = to_device(_search_subset(search_data, search_rows, seed), device)
    shuffle = torch.Generator().manual_seed(seed)
    generators = _module_generators(model)

    history = History()
    start_epoch, step = 0, 0
    best_val: float | None = None
    best_state: dict[str, torch.Tensor] | None = None
    bad_epochs = 0
    keep_best = patience is not None and restore_best
    path: Path | None = None
    config = {"batch_size": batch_size, "seed": seed, "gate_loss_weight": gate_loss_weight}

    if checkpoint_dir is not None:
        path = Path(checkpoint_dir) / CHECKPOINT_NAME
        if resume:
            state = load_checkpoint(path, map_location="cpu")
            _restore(state, path, model, optimizer, searcher, shuffle, generators, device)
            history = History.from_dict(state["history"])
            start_epoch, step = int(state["epoch"]), int(state["step"])
            stopping = state["early_stopping"]
            best_val, bad_epochs = stopping["best_val"], int(stopping["bad_epochs"])
            best_state = stopping["best_state"] if keep_best else None
            for key, value in config.items():
                if state.get("config", {}).get(key) != value:
                    warnings.warn(
                        f"resuming with {key}={value!r} but the checkpoint was written with "
                        f"{key}={state.get('config', {}).get(key)!r}; the run will not match an uninterrupted one",
                        stacklevel=2,
                    )
        elif path.exists() and not overwrite:
            raise FileExistsError(
                f"{str(path)!r} already exists; pass resume=True to continue that run or overwrite=True to replace it"
            )

    n_rows = num_rows(train_data)
    steps_per_epoch = math.ceil(n_rows / batch_size)
    planned = epochs * steps_per_epoch if max_steps is None else min(epochs * steps_per_epoch, max_steps)
    bar = tqdm(total=planned, initial=min(step, planned), disable=not progress, desc="fit", unit="step")
    stopped_early = False
    epochs_run = start_epoch
    try:
        for epoch in range(start_epoch, epochs):
            if patience is not None and bad_epochs >= patience:
                stopped_early = True
                break
            if max_steps is not None and step >= max_steps:
                break
            epoch_start = time.perf_counter()
            train_s = search_s = 0.0
            history.sinkhorn.extend(_sinkhorn_events(model, epoch))
            order = torch.randperm(n_rows, generator=shuffle)
            epoch_losses = []
            model.train()
            for inputs, targets, _ in _batches(train_data, batch_size, device, order):
                if max_steps is not None and step >= max_steps:
                    break
                t0 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                value = _objective(loss, call_model(model, inputs), targets, gate_loss_weight)
                value.backward()
                optimizer.step()
                step += 1
                scalar = float(value.detach())
                history.step_loss.append(scalar)
                epoch_losses.append(scalar)
                train_s += time.perf_counter() - t0
                if searcher is not None and unit == "steps" and searcher.due(step):
                    t1 = time.perf_counter()
                    result = searcher.step(step, search_data)
                    search_s += time.perf_counter() - t1
                    history.searches.append(_search_record(result, epoch, step, searcher.log[-1]["seconds"]))
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{scalar:.4g}", refresh=False)
            if searcher is not None and unit == "epochs" and searcher.due(epoch + 1):
                t1 = time.perf_counter()
                result = searcher.step(epoch + 1, search_data)
                search_s += time.perf_counter() - t1
                history.searches.append(_search_record(result, epoch, step, searcher.log[-1]["seconds"]))

            t2 = time.perf_counter()
            val_loss, usage = (None, {}) if val_data is None else _evaluate(model, val_data, loss, batch_size, device)
            eval_s = time.perf_counter() - t2
            history.epoch.append(epoch)
            history.train_loss.append(float(np.mean(epoch_losses)) if epoch_losses else float("nan"))
            history.val_loss.append(val_loss)
            history.train_seconds.append(train_s)
            history.search_seconds.append(search_s)
            history.eval_seconds.append(eval_s)
            history.usage.append(usage)
            history.permutations.append(_permutations(model))
            if val_loss is not None:
                if best_val is None or val_loss < best_val:
                    best_val, bad_epochs = val_loss, 0
                    if keep_best:
                        best_state = _cpu_state(model)
                else:
                    bad_epochs += 1
            history.epoch_seconds.append(time.perf_counter() - epoch_start)
            epochs_run = epoch + 1
            if path is not None:
                save_checkpoint(
                    path,
                    _checkpoint_state(model, optimizer, searcher, shuffle, generators, device, history, epochs_run, step,
                                      best_val, bad_epochs, best_state if keep_best else None, config),
                    overwrite=True,
                )
            if patience is not None and bad_epochs >= patience:
                stopped_early = True
                break
    finally:
        bar.close()
    if keep_best and best_state is not None:
        model.load_state_dict(best_state)
    return FitResult(model, history, best_val, epochs_run, stopped_early, path)


# --------------------------------------------------------------------------------- checkpoint state
def _checkpoint_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    searcher: LocalSearcher | None,
    shuffle: torch.Generator,
    generators: dict[str, torch.Generator],
    device: torch.device,
    history: History,
    epoch: int,
    step: int,
    best_val: float | None,
    bad_epochs: int,
    best_state: dict[str, torch.Tensor] | None,
    config: dict[str, Any],
) -> dict[str, Any]:
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "searcher": None if searcher is None else searcher.state_dict(),
        "history": history.to_dict(),
        "epoch": epoch,
        "step": step,
        "rng": {
            "shuffle": shuffle.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": cuda_rng,
            "modules": {name: g.get_state() for name, g in generators.items()},
        },
        "early_stopping": {"best_val": best_val, "bad_epochs": bad_epochs, "best_state": best_state},
        "config": dict(config),
    }


def _restore(
    state: dict[str, Any],
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    searcher: LocalSearcher | None,
    shuffle: torch.Generator,
    generators: dict[str, torch.Generator],
    device: torch.device,
) -> None:
    """Load a checkpoint into the live objects; on any failure leave them as they were."""
    required = {"model", "optimizer", "searcher", "history", "epoch", "step", "rng", "early_stopping"}
    missing = sorted(required - set(state))
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} was not written by fit (missing {missing})")
    check_compatible(state, model, path=path)
    rng = state["rng"]
    unknown_generators = sorted(set(rng.get("modules", {})) ^ set(generators))
    if unknown_generators:
        raise CheckpointError(f"checkpoint {str(path)!r}: module generators differ from the model's: {unknown_generators}")
    saved_model = _cpu_state(model)
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if searcher is not None and state["searcher"] is not None:
            searcher.load_state_dict(state["searcher"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_optimizer)
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit this model/optimizer/search: {exc}") from exc
    shuffle.set_state(rng["shuffle"])
    for name, g in generators.items():
        g.set_state(rng["modules"][name])
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)
