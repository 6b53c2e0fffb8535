"""The options of :func:`routing_search.search.local_search`, as one typed, checked object.

:class:`SearchOptions` holds every option with its default; :func:`option_names` says which ones a
method accepts (the keyword options ``local_search`` and ``LocalSearcher`` check against).

Example:
    >>> option_names("exhaustive")[-1]
    'max_states'
    >>> SearchOptions(max_iter=5, strategy="first").max_iter
    5
    >>> SearchOptions(guard=[]).guard
    ()
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from scipy.optimize import OptimizeResult
from torch import nn

from .._validation import check_choice, check_int, check_no_unknown_options, check_positive_float
from .guards import check_guards

__all__ = ["METHODS", "COMMON_OPTIONS", "METHOD_OPTIONS", "SearchOptions", "option_names"]

METHODS = ("swap", "insertion", "rotation", "ils", "exhaustive", "codes")
"""Method names of ``local_search`` (besides a callable move operator)."""

COMMON_OPTIONS = ("layer", "apply", "tol", "max_iter", "max_evals", "max_rows", "callback", "guard")
"""Options every method accepts."""

METHOD_OPTIONS: Mapping[str, tuple[str, ...]] = {
    "swap": ("strategy", "screen"),
    "insertion": ("strategy",),
    "rotation": ("strategy",),
    "ils": ("strategy", "screen", "neighbourhood", "perturbations", "strength", "restart_every"),
    "exhaustive": ("max_states",),
    "codes": (),
    "callable": ("strategy",),
}
"""Options only some methods accept (``'callable'``: a user move operator): ``strategy`` by the descents
over a neighbourhood, ``screen`` by the swap descent (``'ils'`` with ``neighbourhood='swap'``). An option a
method would ignore is refused rather than silently dropped."""

_NEIGHBOURHOODS = ("swap", "insertion", "rotation")


def option_names(method: str) -> tuple[str, ...]:
    """The keyword options ``local_search`` accepts for ``method`` (a method name or ``'callable'``)."""
    check_choice("method", method, tuple(METHOD_OPTIONS))
    return COMMON_OPTIONS + METHOD_OPTIONS[method]


@dataclass(frozen=True)
class SearchOptions:
    """Every option of ``local_search``, checked at construction.

    Attributes:
        layer: the MoE layer to search (module or its name in the model); ``None``: the only one.
        apply: write the result into the model (default True). With False the model is left as it was
            (permutations and, for ``'codes'``, the gate's codes).
        tol: a move is accepted only if it lowers the loss by more than ``tol`` (>= 0).
        max_iter: at most this many accepted moves (>= 0).
        max_evals: stop after this many candidate evaluations (checked between candidate blocks).
        strategy: ``'best'`` or ``'first'`` improvement.
        screen: keep the best ``screen`` swaps by the first-order estimate ⟨∂L/∂y, Δy⟩ before exact
            evaluation (a full scan still confirms local optimality).
        max_rows: memory cap on the rows evaluated at once.
        callback: ``callback(intermediate_result)`` after each accepted move; True stops the search.
        guard: validation metrics a move must not make worse (see :mod:`routing_search.search.guards`): a
            :class:`~routing_search.search.MetricGuard`, a callable ``metric(predictions, targets)`` (greater
            is better), an object with ``__call__`` and ``greater_is_better`` (e.g. a ``TaskMetric``), or a
            list of these; stored as a tuple (empty: no guard). A move that lowers the loss is accepted only
            if no guard is worse than at the start of the search by more than its tolerance.
        neighbourhood: ``'ils'``: the descent's neighbourhood (``'swap'``, ``'insertion'``, ``'rotation'``).
        perturbations: ``'ils'``: number of kicks (>= 0).
        strength: ``'ils'``: random swaps per kick (>= 1).
        restart_every: ``'ils'``: a random restart every this many kicks (``None``: never).
        max_states: ``'exhaustive'``: refuse problems with more states than this.
    """

    layer: nn.Module | str | None = None
    apply: bool = True
    tol: float = 0.0
    max_iter: int = 1000
    max_evals: int | None = None
    strategy: str = "best"
    screen: int | None = None
    max_rows: int = 1 << 14
    callback: Callable[[OptimizeResult], bool | None] | None = None
    guard: Any = ()
    neighbourhood: str = "swap"
    perturbations: int = 20
    strength: int = 3
    restart_every: int | None = None
    max_states: int = 50_000

    def __post_init__(self) -> None:
        if self.layer is not None and not isinstance(self.layer, (nn.Module, str)):
            raise TypeError(f"layer must be an MoE module of the model, its name, or None; got {type(self.layer).__name__}")
        if not isinstance(self.apply, bool):
            raise TypeError(f"apply must be True or False, got {self.apply!r}")
        object.__setattr__(self, "tol", check_positive_float("tol", self.tol, allow_zero=True))
        object.__setattr__(self, "max_iter", check_int("max_iter", self.max_iter, minimum=0))
        if self.max_evals is not None:
            object.__setattr__(self, "max_evals", check_int("max_evals", self.max_evals, minimum=1))
        check_choice("strategy", self.strategy, ("best", "first"))
        if self.screen is not None:
            object.__setattr__(self, "screen", check_int("screen", self.screen, minimum=1))
        object.__setattr__(self, "max_rows", check_int("max_rows", self.max_rows, minimum=1))
        if self.callback is not None and not callable(self.callback):
            raise TypeError("callback must be callable(intermediate_result) or None")
        object.__setattr__(self, "guard", check_guards(self.guard))
        check_choice("neighbourhood", self.neighbourhood, _NEIGHBOURHOODS)
        object.__setattr__(self, "perturbations", check_int("perturbations", self.perturbations, minimum=0))
        object.__setattr__(self, "strength", check_int("strength", self.strength, minimum=1))
        if self.restart_every is not None:
            object.__setattr__(self, "restart_every", check_int("restart_every", self.restart_every, minimum=1))
        object.__setattr__(self, "max_states", check_int("max_states", self.max_states, minimum=1))
        if self.screen is not None and self.neighbourhood != "swap":
            raise TypeError(f"screen is used by the swap descent only; got neighbourhood={self.neighbourhood!r} (screen ignored)")

    @classmethod
    def for_method(cls, method: str, **options: Any) -> "SearchOptions":
        """Options for ``method`` from keywords, rejecting names the method does not accept."""
        check_no_unknown_options(f"local_search(method={method!r})", options, option_names(method))
        return cls(**options)

    def check_method(self, method: str) -> None:
        """Raise if an option that ``method`` ignores was set to a non-default value."""
        accepted = set(option_names(method))
        default = SearchOptions()
        stray = [f.name for f in fields(self) if f.name not in accepted and getattr(self, f.name) != getattr(default, f.name)]
        if stray:
            raise TypeError(
                f"options {', '.join(map(repr, stray))} are not used by method={method!r}; "
                f"accepted options are: {', '.join(sorted(accepted))}"
            )
