"""The smooth-step function of DSelect-k (§3.1.3) and COMET's tree nodes, and the pieces both fused gates share (the logits product, the entropy terms)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch

from .._validation import check_int, check_positive_float

_Backward = TypeVar("_Backward", bound=Callable[..., Any])

__all__ = [
    "first_order_only",
    "smooth_step",
    "smooth_step_slope",
    "smooth_step_and_slope",
    "smooth_step_init_",
    "GammaAnnealing",
    "stacked_logits_t",
    "entropy_terms",
]


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


def _clamped_ratio(t: torch.Tensor, gamma: float) -> torch.Tensor:
    """``u = clamp(t / gamma, -1/2, 1/2)``: the smooth step is a cubic of ``u`` that is exactly 0 / 1 at the ends."""
    return (t / gamma).clamp(-0.5, 0.5)


def smooth_step_slope(t: torch.Tensor, gamma: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S(t), S'(t))`` without autograd, for fused backward passes (:func:`smooth_step` is the differentiable form).

    ``S'(t) = (3/2 - 6 u^2) / gamma`` with ``u = clamp(t / gamma, -1/2, 1/2)``: exactly 0 outside the cubic region.
    """
    u = _clamped_ratio(t, gamma)
    u2 = u * u
    s = u * (1.5 - 2.0 * u2) + 0.5
    return s, (1.5 - 6.0 * u2) / gamma


def smooth_step_and_slope(t: torch.Tensor, gamma: float = 1.0, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`smooth_step_slope` with ``S(t)`` written into ``out`` (same shape as ``t``); returns ``S'(t)``.

    The same operations as :func:`smooth_step_slope`, so the same bits, but three temporaries instead of
    about ten (``1.5 - a`` is computed as ``-a + 1.5``, exactly equal): the fused gates call it on every
    training step. ``out`` may be a view into a larger buffer; without it a new tensor is used and lost,
    so pass one to get ``S``.

    >>> s = torch.empty(3)
    >>> smooth_step_and_slope(torch.tensor([-1.0, 0.0, 0.25]), out=s), s
    (tensor([0.0000, 1.5000, 1.1250]), tensor([0.0000, 0.5000, 0.8438]))
    """
    u = _clamped_ratio(t, gamma)
    u2 = u * u
    s = torch.mul(u2, -2.0, out=torch.empty_like(t) if out is None else out)
    s.add_(1.5).mul_(u).add_(0.5)
    return u2.mul_(-6.0).add_(1.5).div_(gamma)


def _clamped_ratio_cubic(t: torch.Tensor, gamma: float) -> torch.Tensor:
    """``S(t)`` alone, the same operations as :func:`smooth_step_slope` (so both give the same bits)."""
    u = _clamped_ratio(t, gamma)
    return u * (1.5 - 2.0 * (u * u)) + 0.5


def first_order_only(backward: _Backward) -> _Backward:
    """Wrap the hand-written ``backward`` of an autograd Function that is not itself differentiable.

    With ``create_graph=True`` (a Hessian, a gradient penalty) autograd would treat such a backward's
    result as a constant of the input: second derivatives silently 0 or wrong
    (``torch.autograd.functional.hessian`` reports zeros). The wrapper raises instead. Put it above
    ``@once_differentiable`` (which only catches a graph through the incoming gradients).
    """
    name = backward.__qualname__

    @functools.wraps(backward)
    def wrapper(ctx: Any, *grads: Any) -> Any:
        if torch.is_grad_enabled():  # autograd runs a backward with grad mode on only for create_graph=True
            raise RuntimeError(
                f"{name} is a hand-written first-order gradient: double backward (create_graph=True, "
                "Hessians, gradient penalties through the gate) is not supported and would give wrong "
                "second derivatives"
            )
        return backward(ctx, *grads)

    return cast(_Backward, wrapper)


class _SmoothStep(torch.autograd.Function):
    """One elementwise forward and one elementwise backward (the slope is kept from the forward).

    Twice differentiable: with ``create_graph=True`` the slope is recomputed from ``t`` by
    differentiable operations (``S''`` is ``-12 u / gamma^2`` inside the cubic region, 0 outside).
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, t: torch.Tensor, gamma: float) -> torch.Tensor:
        s, slope = smooth_step_slope(t, gamma)
        ctx.save_for_backward(t, slope)
        ctx.gamma = gamma  # type: ignore[attr-defined]
        return s

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        t, slope = ctx.saved_tensors  # type: ignore[attr-defined]
        if torch.is_grad_enabled():  # create_graph=True: a slope with a graph back to t
            gamma = ctx.gamma  # type: ignore[attr-defined]
            u = _clamped_ratio(t, gamma)
            slope = (1.5 - 6.0 * (u * u)) / gamma
        return grad * slope, None


def smooth_step(t: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """S(t): 0 for t <= -gamma/2, 1 for t >= gamma/2, and the C¹ cubic -2t³/γ³ + 3t/(2γ) + 1/2 between.

    Computed as the cubic ``u (3/2 - 2u²) + 1/2`` of ``u = clamp(t/γ, -1/2, 1/2)`` (exactly 0 and 1 at
    the ends). The gradient is exactly zero outside the cubic region, so a saturated unit stops learning.

    >>> smooth_step(torch.tensor([-1.0, 0.0, 0.25, 1.0]))
    tensor([0.0000, 0.5000, 0.8438, 1.0000])
    """
    if torch.is_grad_enabled() and t.requires_grad:
        return _SmoothStep.apply(t, gamma)
    return _clamped_ratio_cubic(t, gamma)


def smooth_step_init_(tensor: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Initialise in place inside the fractional region, U(-γ/100, γ/100) as in the official code."""
    with torch.no_grad():
        return tensor.uniform_(-gamma / 100.0, gamma / 100.0)


def stacked_logits_t(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[F.linear(x, w, b) for w, b in zip(weights, biases)]`` stacked and transposed: ``[sum of rows, rows of x]``.

    Computed as one product ``W x^T + b`` (``x`` ``[rows, d]``): row ``c`` is output column ``c`` of the
    stacked ``weights``, in order. This orientation needs no padding to an even width (on the CPU 10
    rows took 0.86x the time of 16, where ``x W^T`` with 10 columns took 1.2x that of 16, and with 62
    columns 1.3x that of 64); a fused gate then works on each
    logit's values as one contiguous row (ops over a last dimension of size ``k`` or ``m`` are several
    times slower), and the weight gradient ``grad @ x`` is the fast orientation too.

    >>> stacked_logits_t(torch.ones(2, 3), [torch.ones(1, 3), torch.ones(2, 3)], [torch.zeros(1), torch.ones(2)]).tolist()
    [[3.0, 3.0], [4.0, 4.0], [4.0, 4.0]]
    """
    return torch.addmm(torch.cat(list(biases)).unsqueeze(1), torch.cat(list(weights)), x.t())


def entropy_terms(
    p: torch.Tensor, eps: float, *, slope: bool, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(p log(p + eps), p log(p + eps) + p^2 / (p + eps))`` for the fused gates' entropy ``H = -sum p log(p + eps)``.

    The second term is ``-dH/d log p`` (the backward's part of the entropy), computed only with
    ``slope=True`` (else None). ``out`` is a pair of buffers shaped like ``p`` that receive the two
    terms (the first is also the scratch for ``p + eps``); without it new tensors are used. Each
    operation runs over whole contiguous tensors.

    >>> entropy_terms(torch.tensor([0.0, 0.5]), 1e-6, slope=True)
    (tensor([-0.0000, -0.3466]), tensor([0.0000, 0.1534]))
    """
    p_log = torch.add(p, eps, out=None if out is None else out[0])
    ratio = torch.div(p, p_log, out=None if out is None else out[1]) if slope else None
    p_log.log_().mul_(p)
    return p_log, None if ratio is None else torch.addcmul(p_log, ratio, p, out=ratio)
