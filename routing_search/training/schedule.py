"""When and how :func:`~routing_search.training.fit` searches: the typed :class:`SearchSchedule`.

Example:
    >>> SearchSchedule(every_epochs=2, rounds=3, options={"max_iter": 50})  # doctest: +NORMALIZE_WHITESPACE
    SearchSchedule(method='swap', every_steps=None, every_epochs=2, rounds=3, rows=2048, rng=None,
                   options={'max_iter': 50}, refit=None, fit_rows=512, at_start=False)
    >>> SearchSchedule(every_steps=100).unit, SearchSchedule().every
    ('steps', 1)
    >>> from routing_search.search.refit import RefitOptions
    >>> SearchSchedule(every_steps=100, at_start=True, refit=RefitOptions(max_iter=8)).refit.max_iter
    8
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .._validation import check_int, check_rng
from ..batches import to_device
from ..search.refit import RefitOptions
from .data_source import search_subset
from .distributed_training import resolve_context, shard_rows
from .searcher import LocalSearcher, Searcher, check_searcher

__all__ = ["SearchSchedule", "SearchPlan", "DEFAULT_SEARCH_ROWS", "DEFAULT_FIT_ROWS", "make_searcher", "refit_rows"]

DEFAULT_SEARCH_ROWS = 2048
DEFAULT_FIT_ROWS = 512
_DICT_KEYS = ("method", "every", "every_epochs", "rounds", "rows", "rng")


@dataclass(frozen=True)
class SearchSchedule:
    """How often ``fit`` runs :func:`routing_search.local_search`, on how many rows, with which options.

    Attributes:
        method: a ``local_search`` method name (``'swap'``, ``'ils'``, ...) or a callable move operator.
        every_steps: search after every this many optimiser steps (counted over the whole run).
        every_epochs: search at the end of every this many epochs (the default, 1, when ``every_steps`` is
            not given). Give one of the two, not both.
        rounds: at most this many searches in the whole run (``None``: unlimited).
        rows: the search scores a fixed, seeded subset of at most this many held-out rows (the same rows
            at every search; ``None``: all of them).
        rng: seed or ``numpy.random.Generator`` for randomised methods (``None``: seeded from ``fit``'s
            ``seed``).
        options: further ``local_search`` options (``max_iter``, ``screen``, ``perturbations``, ...);
            unknown names are refused when ``fit`` starts, before any training.
        refit: ``None`` (default) or a :class:`~routing_search.search.refit.RefitOptions` (``ridge``,
            ``max_iter``, ``tol``, ``write_layers``): every search is then the ``method`` search (the fast,
            exact frozen-expert first stage) followed by :func:`~routing_search.search.refit.refit_search`,
            whose moves are scored on the held-out rows after a ridge refit of the touched experts' last
            layers on ``fit_rows`` training rows. Needs an ``MoE`` / ``MultiGateMoE`` model whose experts end
            in an ``nn.Linear`` (identity towers). Under a process group each rank refits on its contiguous
            part of the ``fit_rows`` subset and the ridge normal equations are all-reduced (every rank accepts
            the same moves and writes the same layers as one process with all the rows).
        fit_rows: with ``refit``: the refits use a fixed, seeded subset of at most this many *training* rows
            (the same rows at every search, drawn independently of the held-out subset; ``None``: all).
        at_start: also search once before the first optimiser step (a bad start is then fixed before
            training builds on it); counts as one of the ``rounds``; not repeated on resume.
    """

    method: str | Callable[..., Any] = "swap"
    every_steps: int | None = None
    every_epochs: int | None = None
    rounds: int | None = None
    rows: int | None = DEFAULT_SEARCH_ROWS
    rng: Any = None
    options: Mapping[str, Any] = field(default_factory=dict)
    refit: RefitOptions | None = None
    fit_rows: int | None = DEFAULT_FIT_ROWS
    at_start: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.method, str) or callable(self.method)):
            raise TypeError(f"SearchSchedule.method must be a local_search method name or a callable move operator, got {self.method!r}")
        if self.every_steps is not None and self.every_epochs is not None:
            raise ValueError("SearchSchedule: give either every_steps or every_epochs, not both")
        if self.every_steps is not None:
            check_int("SearchSchedule.every_steps", self.every_steps, minimum=1)
        if self.every_epochs is not None:
            check_int("SearchSchedule.every_epochs", self.every_epochs, minimum=1)
        if self.rounds is not None:
            check_int("SearchSchedule.rounds", self.rounds, minimum=0)
        if self.rows is not None:
            check_int("SearchSchedule.rows (search rows)", self.rows, minimum=1)
        if not isinstance(self.options, Mapping):
            raise TypeError(f"SearchSchedule.options must be a dict of local_search options, got {type(self.options).__name__}")
        clash = sorted(set(self.options) & {"rng", "every", "every_steps", "every_epochs", "rounds", "rows", "method",
                                            "refit", "fit_rows", "at_start"})
        if clash:
            raise ValueError(f"SearchSchedule.options must not hold {clash}: they are fields of SearchSchedule")
        if self.rng is not None:
            check_rng(self.rng, name="SearchSchedule.rng")
        if self.refit is not None and not isinstance(self.refit, RefitOptions):
            raise TypeError(
                f"SearchSchedule.refit must be None or a RefitOptions (e.g. RefitOptions(ridge=1e-3, max_iter=8)), "
                f"got {type(self.refit).__name__}; a dict converts with RefitOptions.from_dict"
            )
        if self.fit_rows is not None:
            check_int("SearchSchedule.fit_rows (refit training rows)", self.fit_rows, minimum=1)
        if not isinstance(self.at_start, bool):
            raise TypeError(f"SearchSchedule.at_start must be True or False, got {self.at_start!r}")

    @property
    def unit(self) -> str:
        """``'steps'`` or ``'epochs'``: what :attr:`every` counts."""
        return "steps" if self.every_steps is not None else "epochs"

    @property
    def every(self) -> int:
        """The period in :attr:`unit`."""
        if self.every_steps is not None:
            return int(self.every_steps)
        return 1 if self.every_epochs is None else int(self.every_epochs)

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> SearchSchedule:
        """The schedule a (deprecated) ``search={...}`` dict describes: ``method``, ``every`` (steps),
        ``every_epochs``, ``rounds``, ``rows``, ``rng``; every other key is a ``local_search`` option."""
        options = dict(options)
        if options.get("every") is not None and options.get("every_epochs") is not None:
            raise ValueError("search: give either 'every' (steps) or 'every_epochs', not both")
        fields = {k: options.pop(k) for k in _DICT_KEYS if k in options}
        return cls(
            method=fields.get("method", "swap"),
            every_steps=fields.get("every"),
            every_epochs=fields.get("every_epochs"),
            rounds=fields.get("rounds"),
            rows=fields.get("rows", DEFAULT_SEARCH_ROWS),
            rng=fields.get("rng"),
            options=options,
        )

    def searcher(self, model: nn.Module, loss: Callable[[Any, Any], Any], *, seed: int = 0, process_group: Any = None,
                 fit_data: Any = None) -> LocalSearcher:
        """A :class:`LocalSearcher` running this schedule (``every`` in :attr:`unit`) on ``model``
        (``process_group`` as for :class:`LocalSearcher`; ``fit_data``: the refit's training rows, required
        with :attr:`refit`, see :func:`refit_rows`)."""
        rng = check_rng(seed if self.rng is None else self.rng, name="SearchSchedule.rng")
        if self.refit is None:
            fit_data = None
        return LocalSearcher(model, loss, method=self.method, every=self.every, rounds=self.rounds, rng=rng,
                             process_group=process_group, refit=self.refit, fit_data=fit_data, **dict(self.options))


def refit_rows(train_data: Any, rows: int | None, seed: int) -> tuple[Any, Any]:
    """The training rows a refit schedule fits on: a fixed subset of at most ``rows`` rows of ``train_data``
    (tensors, a list of ``(inputs, targets)`` batches, a ``Dataset`` of rows, or a ``DataLoader``'s map-style dataset, read in order), drawn
    with ``torch.Generator().manual_seed(seed + 2)`` (the held-out subset uses ``seed + 1``)."""
    if isinstance(train_data, DataLoader):
        if not isinstance(train_data.dataset, Dataset) or isinstance(train_data.dataset, IterableDataset):
            raise TypeError("a refit schedule needs train_data as tensors, a map-style Dataset or a DataLoader over one")
        train_data = train_data.dataset  # read in order; iterating the loader would draw from its sampler
    return search_subset(train_data, rows, seed + 1, name="train_data")


@dataclass
class SearchPlan:
    """What ``fit`` does about search: the searcher (or None), the unit its steps count, how many held-out
    rows it scores on (``None``: all) and whether it searches once before training."""

    searcher: Searcher | None
    unit: str = "steps"
    rows: int | None = None
    at_start: bool = False


def make_searcher(
    search: Any, model: nn.Module, loss: Callable[[Any, Any], Any], seed: int, *, stacklevel: int = 3,
    process_group: Any = None, train_data: Any = None, device: Any = None,
) -> SearchPlan:
    """``fit``'s ``search=`` argument as a :class:`SearchPlan`; a dict warns (deprecated alias).

    A user's searcher (any :class:`~routing_search.training.searcher.Searcher`, e.g. a
    :class:`LocalSearcher`) is scheduled on steps and uses all held-out rows; ``process_group`` is given
    to the searcher a schedule builds; a refit schedule takes its training rows from ``train_data``
    (see :func:`refit_rows`), moved to ``device``.
    """
    if search is None:
        return SearchPlan(None)
    if isinstance(search, SearchSchedule) or isinstance(search, Mapping):
        return _schedule_plan(search, model, loss, seed, stacklevel=stacklevel + 1, process_group=process_group,
                              train_data=train_data, device=device)
    searcher = check_searcher(search)
    if getattr(searcher, "model", model) is not model:
        raise ValueError(f"search= {type(searcher).__name__} was built for a different model")
    return SearchPlan(searcher)


def _schedule_plan(search: Any, model: nn.Module, loss: Callable[[Any, Any], Any], seed: int, *, stacklevel: int,
                   process_group: Any, train_data: Any, device: Any) -> SearchPlan:
    if isinstance(search, Mapping):
        warnings.warn(
            "fit(search={...}) is deprecated; pass search=SearchSchedule(...) (the dict key 'every' is "
            "SearchSchedule.every_steps, other non-schedule keys go to SearchSchedule.options)",
            DeprecationWarning,
            stacklevel=stacklevel,
        )
        search = SearchSchedule.from_dict(search)
    fit_data = None
    if search.refit is not None:
        if train_data is None:
            raise ValueError("a refit schedule needs the training data its refits are fitted on")
        fit_data = shard_rows(refit_rows(train_data, search.fit_rows, seed), resolve_context(process_group))
        if device is not None:
            fit_data = to_device(fit_data, device)
    searcher = search.searcher(model, loss, seed=seed, process_group=process_group, fit_data=fit_data)
    return SearchPlan(searcher, search.unit, search.rows, search.at_start)
