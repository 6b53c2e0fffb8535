"""When and how :func:`~routing_search.training.fit` searches: the typed :class:`SearchSchedule`.

Example:
    >>> SearchSchedule(every_epochs=2, rounds=3, options={"max_iter": 50})
    SearchSchedule(method='swap', every_steps=None, every_epochs=2, rounds=3, rows=2048, rng=None, options={'max_iter': 50})
    >>> SearchSchedule(every_steps=100).unit, SearchSchedule().every
    ('steps', 1)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .._validation import check_int, check_rng
from .searcher import LocalSearcher

__all__ = ["SearchSchedule", "DEFAULT_SEARCH_ROWS", "make_searcher"]

DEFAULT_SEARCH_ROWS = 2048
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
    """

    method: str | Callable[..., Any] = "swap"
    every_steps: int | None = None
    every_epochs: int | None = None
    rounds: int | None = None
    rows: int | None = DEFAULT_SEARCH_ROWS
    rng: Any = None
    options: Mapping[str, Any] = field(default_factory=dict)

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
        clash = sorted(set(self.options) & {"rng", "every", "every_steps", "every_epochs", "rounds", "rows", "method"})
        if clash:
            raise ValueError(f"SearchSchedule.options must not hold {clash}: they are fields of SearchSchedule")
        if self.rng is not None:
            check_rng(self.rng, name="SearchSchedule.rng")

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

    def searcher(self, model: nn.Module, loss: Callable[[Any, Any], Any], *, seed: int = 0, process_group: Any = None) -> LocalSearcher:
        """A :class:`LocalSearcher` running this schedule (``every`` in :attr:`unit`) on ``model``
        (``process_group`` as for :class:`LocalSearcher`)."""
        rng = check_rng(seed if self.rng is None else self.rng, name="SearchSchedule.rng")
        return LocalSearcher(model, loss, method=self.method, every=self.every, rounds=self.rounds, rng=rng,
                             process_group=process_group, **dict(self.options))


def make_searcher(
    search: Any, model: nn.Module, loss: Callable[[Any, Any], Any], seed: int, *, stacklevel: int = 3, process_group: Any = None
) -> tuple[LocalSearcher | None, str, int | None]:
    """``fit``'s ``search=`` argument as ``(searcher, unit, rows)``; a dict warns (deprecated alias).

    A user's :class:`LocalSearcher` is scheduled on steps and uses all held-out rows; ``process_group``
    is given to the searcher a schedule builds.
    """
    if search is None:
        return None, "steps", None
    if isinstance(search, LocalSearcher):
        if search.model is not model:
            raise ValueError("search= LocalSearcher was built for a different model")
        return search, "steps", None
    if isinstance(search, Mapping):
        warnings.warn(
            "fit(search={...}) is deprecated; pass search=SearchSchedule(...) (the dict key 'every' is "
            "SearchSchedule.every_steps, other non-schedule keys go to SearchSchedule.options)",
            DeprecationWarning,
            stacklevel=stacklevel,
        )
        search = SearchSchedule.from_dict(search)
    if not isinstance(search, SearchSchedule):
        raise TypeError(f"search must be None, a SearchSchedule or a LocalSearcher, got {type(search).__name__}")
    return search.searcher(model, loss, seed=seed, process_group=process_group), search.unit, search.rows
