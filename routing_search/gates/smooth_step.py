"""The smooth-step function of DSelect-k (§3.1.3) and COMET's tree nodes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._validation import check_int, check_positive_float

__all__ = ["smooth_step", "smooth_step_init_", "GammaAnnealing"]


@dataclass(frozen=True)
class GammaAnnealing:
    """Anneal the smooth-step scale ``gamma`` towards 0 so that every code ends binary (paper §3.1.3).

    ``gamma`` stays at its initial value ``gamma0`` for the first ``begin`` training calls, then
    falls geometrically to ``gamma0 * final_ratio`` at call ``end`` and stays there. A code logit
    ``|t| >= gamma / 2`` is saturated (exactly 0 or 1, no gradient), so once ``gamma`` is small
    every selector / tree node has made its choice; the experts and the mixing weights keep
    training on the hard selection for the rest of the run.

    The defaults suit an ordinary budget of about 1000 steps or more (the demo: 30 epochs of 33
    batches): the selection is learned softly for 500 steps, hardened between steps 500 and 800.
    For a much shorter or longer run, scale them with :meth:`for_budget`.

    >>> a = GammaAnnealing(begin=10, end=20, final_ratio=0.01)
    >>> [round(a.gamma_at(c, 1.0), 4) for c in (0, 10, 15, 20, 99)]
    [1.0, 1.0, 0.1, 0.01, 0.01]
    """

    begin: int = 500
    end: int = 800
    final_ratio: float = 2e-3

    def __post_init__(self) -> None:
        check_int("begin", self.begin, minimum=0)
        check_int("end", self.end, minimum=self.begin + 1)
        check_positive_float("final_ratio", self.final_ratio)
        if self.final_ratio > 1:
            raise ValueError(f"final_ratio must be in (0, 1], got {self.final_ratio}")

    @classmethod
    def for_budget(cls, total_steps: int, *, begin: float = 0.5, end: float = 0.8, final_ratio: float = 2e-3) -> GammaAnnealing:
        """Annealing between the fractions ``begin`` and ``end`` of a run of ``total_steps`` training calls.

        >>> GammaAnnealing.for_budget(1000)
        GammaAnnealing(begin=500, end=800, final_ratio=0.002)
        """
        total = check_int("total_steps", total_steps, minimum=2)
        if not 0 <= begin < end <= 1:
            raise ValueError(f"need 0 <= begin < end <= 1, got begin={begin}, end={end}")
        first = int(begin * total)
        return cls(begin=first, end=max(int(end * total), first + 1), final_ratio=final_ratio)

    def gamma_at(self, calls: int, gamma0: float) -> float:
        """``gamma`` after ``calls`` training calls, starting from ``gamma0``."""
        frac = min(max((calls - self.begin) / (self.end - self.begin), 0.0), 1.0)
        return gamma0 * self.final_ratio**frac


def smooth_step(t: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """S(t): 0 for t <= -gamma/2, 1 for t >= gamma/2, and the C¹ cubic -2t³/γ³ + 3t/(2γ) + 1/2 between.

    The gradient is exactly zero outside the cubic region, so a saturated unit stops learning.
    """
    cubic = -2.0 * t**3 / gamma**3 + 1.5 * t / gamma + 0.5
    out = torch.where(t <= -gamma / 2, torch.zeros_like(t), cubic)
    return torch.where(t >= gamma / 2, torch.ones_like(t), out)


def smooth_step_init_(tensor: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Initialise in place inside the fractional region, U(-γ/100, γ/100) as in the official code."""
    with torch.no_grad():
        return tensor.uniform_(-gamma / 100.0, gamma / 100.0)
