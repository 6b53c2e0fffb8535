"""The smooth-step function of DSelect-k (§3.1.3) and COMET's tree nodes."""

from __future__ import annotations

import torch

__all__ = ["smooth_step", "smooth_step_init_"]


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
