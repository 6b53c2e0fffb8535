"""The smooth-step scale γ of the selector gates (DSelect-k, COMET): fixed, scheduled or annealed.

Three ways to anneal γ:

* :class:`~routing_search.gates.GammaAnnealing` — fixed call counts (``begin``, ``end``): exactly what
  the user wrote, never changed by anything else;
* :class:`BudgetAnnealing` — fractions of the training budget. :func:`routing_search.fit` turns it into a
  ``GammaAnnealing`` for its own budget (epochs × batches, or ``max_steps``) before the first step and
  records what it did (``FitResult.gamma_annealing`` and the checkpoint). Until a budget is known (e.g. a
  hand-written training loop) the gate follows ``BudgetAnnealing.before_fit``; call
  :meth:`AnnealedGate.fit_annealing` to fit it yourself;
* ``None`` — γ stays at its initial value (the paper's plain form).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .._validation import check_int, check_num_experts_k, check_positive_float
from .protocol import BaseGate, WeightSchedule, check_weight_schedule
from .smooth_step import GammaAnnealing

__all__ = ["AnnealedGate", "BudgetAnnealing"]


@dataclass(frozen=True)
class BudgetAnnealing:
    """Anneal γ between the fractions ``begin`` and ``end`` of the training budget (fitted by ``fit``).

    ``fit`` calls :meth:`AnnealedGate.fit_annealing` with its budget, which replaces this by
    ``GammaAnnealing.for_budget(total_steps, begin=begin, end=end, final_ratio=final_ratio)`` (offset by
    the calls the gate had already made). Before that the gate anneals by ``before_fit`` (call counts).

    >>> BudgetAnnealing().for_budget(96)
    GammaAnnealing(begin=48, end=76, final_ratio=0.002)
    >>> BudgetAnnealing().for_budget(96, start=10)
    GammaAnnealing(begin=58, end=86, final_ratio=0.002)
    """

    begin: float = 0.5
    end: float = 0.8
    final_ratio: float = 2e-3
    before_fit: GammaAnnealing = field(default_factory=GammaAnnealing)

    def __post_init__(self) -> None:
        for name in ("begin", "end"):
            check_positive_float(name, getattr(self, name), allow_zero=True)
        if not 0 <= self.begin < self.end <= 1:
            raise ValueError(f"need 0 <= begin < end <= 1 (fractions of the budget), got begin={self.begin}, end={self.end}")
        check_positive_float("final_ratio", self.final_ratio)
        if self.final_ratio > 1:
            raise ValueError(f"final_ratio must be in (0, 1], got {self.final_ratio}")
        if not isinstance(self.before_fit, GammaAnnealing):
            raise TypeError(f"before_fit must be a GammaAnnealing, got {type(self.before_fit).__name__}")

    def for_budget(self, total_steps: int, *, start: int = 0) -> GammaAnnealing:
        """The call-count annealing for a run of ``total_steps`` training calls that starts at call ``start``."""
        total = check_int("total_steps", total_steps, minimum=2)
        start = check_int("start", start, minimum=0)
        fitted = GammaAnnealing.for_budget(total, begin=self.begin, end=self.end, final_ratio=self.final_ratio)
        return GammaAnnealing(begin=start + fitted.begin, end=start + fitted.end, final_ratio=fitted.final_ratio)


def _as_record(anneal: GammaAnnealing) -> dict[str, Any]:
    return {"begin": anneal.begin, "end": anneal.end, "final_ratio": anneal.final_ratio}


class AnnealedGate(BaseGate):
    """A :class:`BaseGate` whose smooth-step scale ``gamma`` follows the training-call counter.

    ``gamma`` is a number (annealed by ``anneal`` when one is given) or a callable ``calls -> gamma``.
    ``anneal`` is a :class:`~routing_search.gates.GammaAnnealing` (call counts), a :class:`BudgetAnnealing`
    (fractions of a budget, fitted once by ``fit`` or :meth:`fit_annealing`) or None (γ fixed).

    The selector gates (DSelectK, COMET) default to ``gamma=1`` and ``anneal=BudgetAnnealing()``:
    ``gamma`` constant for the first half of the training budget, then geometrically down to
    ``gamma * 2e-3`` at 80 % of it, so every selector ends binary (at most ``k`` experts) while the
    experts and mixing weights keep training on the hard selection. :func:`routing_search.fit` fits
    the budget (epochs x batches) before its first step; until then (a hand-written loop) the gate
    follows ``BudgetAnnealing.before_fit`` (constant for 500 calls, down by call 800) unless you call
    :meth:`fit_annealing`. An explicit ``GammaAnnealing`` (call counts) is never changed;
    ``anneal=None`` keeps ``gamma`` fixed (the paper's plain form). The attribute :attr:`gamma` is
    the value in use, computed from the saved call counter.
    """

    gamma_schedule: Callable[[int], float] | None
    anneal: GammaAnnealing | BudgetAnnealing | None
    fitted_annealing: GammaAnnealing | None

    def __init__(
        self,
        num_experts: int,
        k: int,
        input_dim: int | None,
        *,
        gamma: WeightSchedule,
        anneal: GammaAnnealing | BudgetAnnealing | None,
        entropy_weight: WeightSchedule,
        validate: bool,
    ) -> None:
        """The arguments every selector gate shares (checked here): ``k`` selectors over ``num_experts``."""
        n, k_checked = check_num_experts_k(num_experts, k)
        assert k_checked is not None
        super().__init__(n, input_dim, validate=validate)
        self.num_selectors = k_checked
        self._init_gamma(gamma, anneal)
        self.entropy_weight = check_weight_schedule("entropy_weight", entropy_weight)

    def _init_gamma(self, gamma: float | Callable[[int], float], anneal: GammaAnnealing | BudgetAnnealing | None) -> None:
        _check_anneal(anneal)
        self.gamma0 = check_positive_float("gamma", gamma(0) if callable(gamma) else gamma)
        self.anneal = None if callable(gamma) else anneal
        self.fitted_annealing = None
        if callable(gamma):
            self.gamma_schedule = gamma
        else:
            self._use(anneal)

    def _maybe_check(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """``x`` checked as a batch, or None (a static gate's inspection methods take ``x=None``)."""
        return None if x is None else self._check_x(x)

    def _mean_over_batch(self, per_example: torch.Tensor, batch: int) -> torch.Tensor:
        """Batch mean of a per-example loss term (0 for an empty batch); a static gate computes one row,
        shared by every example, so its mean is that row's value."""
        if self.is_static:
            return per_example.sum() if batch > 0 else per_example.sum() * 0.0
        return per_example.sum() / max(per_example.shape[0], 1)

    def _use(self, anneal: GammaAnnealing | BudgetAnnealing | None) -> None:
        if isinstance(anneal, BudgetAnnealing):
            anneal = self.fitted_annealing if self.fitted_annealing is not None else anneal.before_fit
        self.gamma_schedule = None if anneal is None else functools.partial(anneal.gamma_at, gamma0=self.gamma0)

    @property
    def gamma(self) -> float:
        """The smooth-step scale in use: ``gamma0``, or the schedule's value at the last training call.

        Computed from the training-call counter ``calls`` (a saved buffer), so a gate restored from
        a checkpoint uses the same ``gamma`` as when it was saved, in training and in eval.
        """
        if self.gamma_schedule is None:
            return self.gamma0
        return check_positive_float("gamma", self.gamma_schedule(max(int(self.calls) - 1, 0)))

    def set_annealing(self, anneal: GammaAnnealing | BudgetAnnealing | None) -> None:
        """Replace the gamma annealing (e.g. ``GammaAnnealing.for_budget(total_steps)`` once the
        training budget is known; ``None`` keeps ``gamma0`` fixed). Counts from call 0 of ``calls``.
        A :class:`BudgetAnnealing` set here is fitted again by the next ``fit``."""
        _check_anneal(anneal)
        self.anneal = anneal
        self.fitted_annealing = None
        self._use(anneal)

    @property
    def annealing_pending(self) -> bool:
        """True while ``anneal`` is a :class:`BudgetAnnealing` that no budget has been fitted to yet."""
        return isinstance(self.anneal, BudgetAnnealing) and self.fitted_annealing is None

    def fit_annealing(self, total_steps: int) -> dict[str, Any]:
        """Fit a pending :class:`BudgetAnnealing` to a run of ``total_steps`` training calls from now.

        Only a ``BudgetAnnealing`` is ever fitted (an explicit ``GammaAnnealing``, a callable ``gamma``
        or ``None`` is the user's choice and stays), and only once; and only while γ has not started
        to fall under ``before_fit`` (refitting then would raise γ again and re-open saturated codes).

        Returns a record: ``status`` (``'fitted'``, or ``'kept'`` with a ``reason``), and the
        annealing in use (``begin``, ``end``, ``final_ratio``, in training calls) when there is one;
        a fitted record also holds ``total_steps`` and ``start`` (the gate's call count when fitted).
        """
        total = check_int("total_steps", total_steps, minimum=1)
        current = self.fitted_annealing if self.fitted_annealing is not None else self.anneal
        in_use = _as_record(current.before_fit if isinstance(current, BudgetAnnealing) else current) if current is not None else {}
        if not isinstance(self.anneal, BudgetAnnealing):
            what = "a callable gamma" if self.anneal is None and self.gamma_schedule is not None else (
                "no annealing (anneal=None)" if self.anneal is None else f"an explicit {self.anneal!r}")
            return {"status": "kept", "reason": f"the gate was built with {what}", **in_use}
        if self.fitted_annealing is not None:
            return {"status": "kept", "reason": "already fitted to a budget", **in_use}
        calls = int(self.calls)
        if self.gamma != self.gamma0:
            return {"status": "kept", "reason": f"gamma had already started to fall under before_fit (calls={calls})", **in_use}
        fitted = self.anneal.for_budget(max(total, 2), start=calls)  # a 1-step run: gamma0 for its one step
        self.restore_annealing(fitted)
        return {"status": "fitted", "total_steps": total, "start": calls, **_as_record(fitted)}

    def restore_annealing(self, fitted: GammaAnnealing | dict[str, Any]) -> None:
        """Put back an annealing fitted earlier (``fit`` does this on resume, from the checkpoint's record)."""
        if isinstance(fitted, dict):
            fitted = GammaAnnealing(begin=fitted["begin"], end=fitted["end"], final_ratio=fitted["final_ratio"])
        if not isinstance(fitted, GammaAnnealing):
            raise TypeError(f"fitted must be a GammaAnnealing or its record dict, got {type(fitted).__name__}")
        if not isinstance(self.anneal, BudgetAnnealing):
            raise ValueError(f"only a gate built with a BudgetAnnealing takes a fitted annealing; this one has {self.anneal!r}")
        self.fitted_annealing = fitted
        self._use(self.anneal)


    # ------------------------------------------------------------ checkpoints
    # The fitted annealing decides gamma from the saved call counter, so it travels in the state dict
    # (as module extra state: a float64 tensor [begin, end, final_ratio], all -1 while nothing is fitted
    # (not NaN: state dicts are compared with torch.equal), the same shape either way, never cast by
    # .to(dtype)). Without it a gate restored from a
    # state_dict fell back to before_fit: gamma back at gamma0, the hardened selection soft again.
    def get_extra_state(self) -> torch.Tensor:
        """The fitted annealing as a float64 tensor ``[begin, end, final_ratio]`` (all -1 when none)."""
        fitted = self.fitted_annealing
        values = [-1.0] * 3 if fitted is None else [fitted.begin, fitted.end, fitted.final_ratio]
        return torch.tensor(values, dtype=torch.float64)

    def set_extra_state(self, state: Any) -> None:
        """Restore the fitted annealing saved by :meth:`get_extra_state`.

        A gate built with a :class:`BudgetAnnealing` takes the saved fit (or drops its own when the saved
        gate had none); a gate built with an explicit ``GammaAnnealing``, a callable ``gamma`` or
        ``anneal=None`` keeps that choice, as everywhere else.
        """
        if not isinstance(state, torch.Tensor) or tuple(state.shape) != (3,):
            raise ValueError(
                f"cannot load the annealing state of {type(self).__name__}: expected a tensor [begin, end, "
                f"final_ratio], got {state!r}"
            )
        if not isinstance(self.anneal, BudgetAnnealing):
            return
        values = state.detach().to("cpu", torch.float64).tolist()
        if values == [-1.0] * 3:
            self.fitted_annealing = None
            self._use(self.anneal)
            return
        begin, end, ratio = values
        if not (float(begin).is_integer() and float(end).is_integer()):
            raise ValueError(f"cannot load the annealing state of {type(self).__name__}: begin/end must be whole call counts, got {values}")
        self.restore_annealing(GammaAnnealing(begin=int(begin), end=int(end), final_ratio=ratio))

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """As ``nn.Module``'s, but a state dict saved before the annealing was part of it still loads."""
        key = prefix + "_extra_state"
        absent = key not in state_dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if absent and key in missing_keys:
            missing_keys.remove(key)


def _check_anneal(anneal: Any) -> None:
    if anneal is not None and not isinstance(anneal, (GammaAnnealing, BudgetAnnealing)):
        raise TypeError(f"anneal must be a GammaAnnealing, a BudgetAnnealing or None, got {type(anneal).__name__}")
