"""A permutation searcher to call from your own training loop every N steps.

Example (wrapping an existing PyTorch loop)::

    from routing_search.training import LocalSearcher, mse_loss

    searcher = LocalSearcher(model, mse_loss, method="swap", every=200, rng=0)
    for step, (x, y) in enumerate(loader, start=1):
        optimizer.zero_grad()
        out = model(x)
        (mse_loss(out.output, y).mean() + out.loss).backward()
        optimizer.step()
        searcher.step(step, (x_val, y_val))   # searches when step % 200 == 0

Save ``searcher.state_dict()`` with your checkpoint and restore it with ``load_state_dict`` to resume
the same random stream and round count.

``LocalSearcher(..., refit=RefitOptions(), fit_data=(x_fit, y_fit))`` follows every search with
:func:`routing_search.search.refit.refit_search` (moves scored on the held-out rows after a closed-form
refit of the touched experts' last layers on the training rows ``fit_data``).

:func:`~routing_search.training.fit` takes any object with the small :class:`Searcher` protocol, not only
a ``LocalSearcher``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np
from scipy.optimize import OptimizeResult
from torch import nn

from .._validation import check_choice, check_int, check_no_unknown_options, check_rng
from ..distributed import resolve_group
from ..result import make_result
from ..search import METHODS, RoutingObjective, SearchOptions, local_search, option_names
from ..search.refit import RefitOptions, refit_search
from .checkpoint import to_plain

__all__ = ["LocalSearcher", "Searcher", "check_searcher", "search_option_names", "generator_state", "set_generator_state",
           "guard_record"]


@runtime_checkable
class Searcher(Protocol):
    """What :func:`~routing_search.training.fit` needs of a ``search=`` object (``LocalSearcher`` is one).

    * ``due(step) -> bool``: whether ``step(step, data)`` would search at this 1-based optimiser step.
    * ``step(step, data) -> OptimizeResult | None``: search on the held-out ``data`` when due; the result
      has ``fun0``, ``fun``, ``nit``, ``nfev`` and optionally ``moves`` (objects with ``kind``, ``slot``,
      ``selector``, ``before``, ``after``, ``fun_before``, ``fun_after``) and ``guard`` (as
      ``local_search`` returns them; ``fit`` records ``guard`` with :func:`guard_record`).
    * ``log``: a list with one dict per search; ``fit`` records the last one's ``'seconds'`` when present.
    * ``state_dict()`` / ``load_state_dict(state)``: plain Python values saved in ``fit``'s checkpoints
      (restored on resume, so that a resumed run searches as the uninterrupted one).
    * optionally ``process_group``: under a process group ``fit`` requires it and requires it to resolve
      to ``fit``'s group (the searcher must then accept the same moves on every rank).
    """

    log: list[dict[str, Any]]

    def due(self, step: int) -> bool: ...

    def step(self, step: int, data: Any) -> OptimizeResult | None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def check_searcher(obj: Any, name: str = "search") -> Searcher:
    """``obj`` if it implements :class:`Searcher`; otherwise a ``TypeError`` naming what is missing."""
    missing = [m for m in ("due", "step", "state_dict", "load_state_dict") if not callable(getattr(obj, m, None))]
    if not isinstance(getattr(obj, "log", None), list):
        missing.append("log (a list)")
    if missing:
        raise TypeError(f"{name} must be None, a SearchSchedule or a LocalSearcher (or any searcher with due(step), "
                        f"step(step, data), log, state_dict() and load_state_dict(state)); {type(obj).__name__} lacks "
                        f"{', '.join(missing)}")
    return obj  # type: ignore[no-any-return]


def search_option_names(method: str) -> tuple[str, ...]:
    """The keyword options :func:`routing_search.local_search` accepts for ``method``.

    Same as :func:`routing_search.search.option_names` (kept under this name for existing code).
    """
    return option_names(method)


def guard_record(result: Any) -> dict[str, dict[str, Any]] | None:
    """A search result's guard report as plain values, as ``LocalSearcher.log`` and ``History.searches`` record it.

    ``{guard name: {'start', 'end', 'tolerance', 'greater_is_better'}}``: each guard's value at the start of
    the search (the reference every move was judged against) and at its end, from ``result.guard``
    (:func:`~routing_search.search.guards.guard_report`; for a two-stage refit search, the start of the
    first stage and the end of the refit stage). ``None`` when the search ran without ``guard=`` (or the
    result has no ``guard``).

    >>> from routing_search.result import make_result
    >>> r = make_result(x=[0], fun=1.0, nit=0, nfev=1, status=0, message="",
    ...                 guard={"acc": {"start": 0.9, "end": 0.95, "tolerance": 0.0, "greater_is_better": True}})
    >>> guard_record(r)
    {'acc': {'start': 0.9, 'end': 0.95, 'tolerance': 0.0, 'greater_is_better': True}}
    >>> guard_record(make_result(x=[0], fun=1.0, nit=0, nfev=1, status=0, message="")) is None
    True
    """
    report = getattr(result, "guard", None)
    if report is None:
        return None
    if not isinstance(report, dict):
        raise TypeError(f"result.guard must be None or a dict {{name: {{'start', 'end', ...}}}}, got {type(report).__name__}")
    return {
        str(name): {
            "start": float(entry["start"]),
            "end": float(entry["end"]),
            "tolerance": float(entry.get("tolerance", 0.0)),
            "greater_is_better": bool(entry.get("greater_is_better", True)),
        }
        for name, entry in report.items()
    }


def generator_state(rng: np.random.Generator) -> dict[str, Any]:
    """A numpy Generator's bit-generator state as plain Python values (weights_only-loadable)."""
    return to_plain(rng.bit_generator.state)


def set_generator_state(rng: np.random.Generator, state: dict[str, Any]) -> np.random.Generator:
    """Restore ``state`` into ``rng`` (or into a new Generator when the bit generator type differs)."""
    name = state.get("bit_generator") if isinstance(state, dict) else None
    if not isinstance(name, str) or not hasattr(np.random, name):
        raise ValueError(f"not a numpy bit-generator state: {state!r}")
    if type(rng.bit_generator).__name__ != name:
        rng = np.random.Generator(getattr(np.random, name)())
    rng.bit_generator.state = state
    return rng


class LocalSearcher:
    """Runs :func:`routing_search.local_search` on a schedule of step counts.

    Args:
        model: the model holding the MoE layer (see ``local_search``).
        loss: per-example loss ``loss(prediction, targets) -> [B]`` (a scalar works, more slowly).
        method: a ``local_search`` method name or a callable move operator.
        every: search when ``step % every == 0`` in :meth:`step` (step counts are the caller's: pass
            1-based counts to avoid a search before the first update).
        rounds: at most this many searches (``None``: unlimited). :meth:`__call__` also counts.
        rng: ``None``, a seed or a ``numpy.random.Generator`` for randomised methods; the searcher keeps
            its own. Under a process group every search starts from rank 0's generator state.
        process_group: ``None`` (default): the world group when ``torch.distributed`` is initialised;
            ``False``: each process searches alone; or a ``ProcessGroup``. Every rank then calls
            :meth:`step` at the same steps with its shard of the data and all ranks accept the same
            moves (see ``local_search``).
        refit: ``None`` or :class:`~routing_search.search.refit.RefitOptions`: after every search, run
            :func:`~routing_search.search.refit.refit_search` (refits on ``fit_data``, moves scored on the
            search's held-out data), under the same ``guard=`` (judged against the first stage's start) and
            process group (each rank passes its shard of ``fit_data``; the normal equations are all-reduced).
        fit_data: ``(inputs, targets)`` training rows the refits are fitted on (required with ``refit``;
            this rank's shard under a process group).
        **search_options: passed to ``local_search`` (checked now; an unknown name raises ``TypeError``).

    Attributes:
        rounds_done: searches run so far.
        log: one dict per search: ``step``, ``fun0``, ``fun``, ``nit``, ``nfev``, ``seconds``, ``guard``
            (each guard's value at the start and the end of the search, see :func:`guard_record`; None
            without ``guard=``).
        last_result: the last ``OptimizeResult`` (or None).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: Callable[[Any, Any], Any],
        *,
        method: str | Callable = "swap",
        every: int = 1,
        rounds: int | None = None,
        rng: Any = None,
        process_group: Any = None,
        refit: RefitOptions | None = None,
        fit_data: Any = None,
        **search_options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss):
            raise TypeError(f"loss must be callable(prediction, targets), got {type(loss).__name__}")
        if isinstance(method, str):
            check_choice("method", method, METHODS)
            accepted = option_names(method)
        elif callable(method):
            accepted = option_names("callable")
        else:
            raise TypeError(f"method must be one of {METHODS} or a callable move operator, got {method!r}")
        check_no_unknown_options(f"LocalSearcher(method={method if isinstance(method, str) else 'callable'!r})", search_options, accepted)
        SearchOptions(**search_options)  # check the values now, not at the first search
        self.model = model
        self.loss = loss
        self.method = method
        self.every = check_int("every", every, minimum=1)
        self.rounds = None if rounds is None else check_int("rounds", rounds, minimum=0)
        self.options = dict(search_options)
        self.rng = check_rng(rng, name="rng")
        resolve_group(process_group)  # check it now (a group without an initialised job raises)
        if refit is not None:
            if not isinstance(refit, RefitOptions):
                raise TypeError(f"refit must be None or a RefitOptions, got {type(refit).__name__}")
            if fit_data is None:
                raise ValueError("refit needs fit_data: the (inputs, targets) training rows the refits are fitted on")
        elif fit_data is not None:
            raise ValueError("fit_data is used only with refit=RefitOptions(...); pass refit or drop fit_data")
        self.refit = refit
        self.fit_data = fit_data
        self.process_group = process_group
        self.rounds_done = 0
        self.log: list[dict[str, Any]] = []
        self.last_result: OptimizeResult | None = None

    @property
    def exhausted(self) -> bool:
        """True when ``rounds`` searches have been run."""
        return self.rounds is not None and self.rounds_done >= self.rounds

    def due(self, step: int) -> bool:
        """Whether :meth:`step` would search at ``step``."""
        return step % self.every == 0 and not self.exhausted

    def step(self, step: int, data: Any) -> OptimizeResult | None:
        """Search on ``data`` if ``step % every == 0`` and rounds remain; return the result or None."""
        step = check_int("step", step)
        if not self.due(step):
            return None
        return self._search(data, step)

    def __call__(self, data: Any) -> OptimizeResult:
        """Search now on ``data`` (counts as a round, even when ``rounds`` are used up)."""
        return self._search(data, None)

    def _search(self, data: Any, step: int | None) -> OptimizeResult:
        start = time.perf_counter()
        result = local_search(
            self.model, data, self.loss, self.method, rng=self.rng, process_group=self.process_group, **self.options
        )
        if self.refit is not None:
            result = self._refit_stage(result, data)
        seconds = time.perf_counter() - start
        self.rounds_done += 1
        self.last_result = result
        self.log.append(
            {
                "step": step,
                "fun0": float(result.fun0),
                "fun": float(result.fun),
                "nit": int(result.nit),
                "nfev": int(result.nfev),
                "seconds": float(seconds),
                "guard": guard_record(result),
            }
        )
        return result

    def _refit_stage(self, first: OptimizeResult, data: Any) -> OptimizeResult:
        """``refit_search`` after the first stage; one result for both (``fun0`` the first stage's start,
        ``fun`` the model's held-out loss at the end, moves of both stages in order, the worse status)."""
        assert self.refit is not None
        guard = self.options.get("guard")
        reference = getattr(first, "guard", None)
        start = None if not guard or not reference else [v["start"] for v in reference.values()]
        second = refit_search(self.model, self.fit_data, data, self.loss, guard=guard, guard_start=start,
                              process_group=self.process_group, **self.refit.kwargs())
        calls = dict(getattr(first, "all_reduce", None) or {})
        for key, value in second.all_reduce.items():
            calls[key] = int(calls.get(key, 0)) + int(value)
        # The worse of the two stages' statuses: a budget stop (1) or a non-finite loss (2) in either is the run's.
        status = max(int(first.status), int(second.status))
        message = f"refit: {second.message}" + ("" if int(first.status) == 0 else f"; search stage: {first.message}")
        return make_result(
            x=second.x, fun=float(RoutingObjective(self.model, data, self.loss, process_group=self.process_group).fun), nit=int(first.nit) + int(second.nit),
            nfev=int(first.nfev) + int(second.nfev), status=status, message=message,
            fun0=float(first.fun0), moves=list(getattr(first, "moves", [])) + list(second.moves), method="refit",
            stages={"search": first, "refit": second}, all_reduce=calls,
            guard_rejections=int(getattr(first, "guard_rejections", 0) or 0) + int(second.guard_rejections),
            guard=None if second.guard is None else {name: dict(v) for name, v in second.guard.items()},
        )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Round count, log and random state as plain Python values (weights_only-loadable)."""
        return {
            "every": self.every,
            "rounds": self.rounds,
            "rounds_done": self.rounds_done,
            "log": [dict(entry) for entry in self.log],
            "rng": generator_state(self.rng),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the schedule ``every``/``rounds`` stays as constructed)."""
        if not isinstance(state, dict) or not {"rounds_done", "log", "rng"} <= set(state):
            raise ValueError("not a LocalSearcher state dict (needs 'rounds_done', 'log' and 'rng')")
        self.rng = set_generator_state(self.rng, state["rng"])
        self.rounds_done = int(state["rounds_done"])
        self.log = [dict(entry) for entry in state["log"]]
