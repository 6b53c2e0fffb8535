"""The smooth-step scale γ of the selector gates (DSelect-k, COMET): fixed, scheduled or annealed."""

from __future__ import annotations

import functools
from collections.abc import Callable

from .._validation import check_positive_float
from .protocol import BaseGate
from .smooth_step import GammaAnnealing

__all__ = ["AnnealedGate"]


class AnnealedGate(BaseGate):
    """A :class:`BaseGate` whose smooth-step scale ``gamma`` follows the training-call counter.

    ``gamma`` is a number (annealed by ``anneal`` when one is given) or a callable ``calls -> gamma``.
    """

    gamma_schedule: Callable[[int], float] | None

    def _init_gamma(self, gamma: float | Callable[[int], float], anneal: GammaAnnealing | None) -> None:
        if anneal is not None and not isinstance(anneal, GammaAnnealing):
            raise TypeError(f"anneal must be a GammaAnnealing or None, got {type(anneal).__name__}")
        self.gamma0 = check_positive_float("gamma", gamma(0) if callable(gamma) else gamma)
        self.anneal = None if callable(gamma) else anneal
        if callable(gamma):
            self.gamma_schedule = gamma
        elif anneal is not None:
            self.gamma_schedule = functools.partial(anneal.gamma_at, gamma0=self.gamma0)
        else:
            self.gamma_schedule = None

    @property
    def gamma(self) -> float:
        """The smooth-step scale in use: ``gamma0``, or the schedule's value at the last training call.

        Computed from the training-call counter ``calls`` (a saved buffer), so a gate restored from
        a checkpoint uses the same ``gamma`` as when it was saved, in training and in eval.
        """
        if self.gamma_schedule is None:
            return self.gamma0
        return check_positive_float("gamma", self.gamma_schedule(max(int(self.calls) - 1, 0)))

    def set_annealing(self, anneal: GammaAnnealing | None) -> None:
        """Replace the gamma annealing (e.g. ``GammaAnnealing.for_budget(total_steps)`` once the
        training budget is known; ``None`` keeps ``gamma0`` fixed). Counts from call 0 of ``calls``."""
        if anneal is not None and not isinstance(anneal, GammaAnnealing):
            raise TypeError(f"anneal must be a GammaAnnealing or None, got {type(anneal).__name__}")
        self.anneal = anneal
        self.gamma_schedule = None if anneal is None else functools.partial(anneal.gamma_at, gamma0=self.gamma0)
