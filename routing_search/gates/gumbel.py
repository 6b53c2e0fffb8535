"""Gumbel-softmax gate: the static baseline of the DSelect-k paper (§5, "Gumbel Softmax").

Training mode draws, for every example independently, ``softmax((logits + G) / T)`` with standard
Gumbel noise ``G``; eval mode returns the deterministic ``softmax(logits / T)``. With ``hard=True``
the value is the one-hot argmax (of the noisy logits in training, of the logits in eval) and the
gradient is that of the soft sample (straight-through estimator).

Unlike Top-k, DSelect-k and COMET, this gate cannot fix the number of selected experts: the soft
output is dense, and the hard output always keeps exactly one. Any sparsity in between only appears
when the logits happen to separate.
"""

from __future__ import annotations

import torch
from torch import nn

from .._validation import check_num_experts_k, check_positive_float
from .protocol import BaseGate, GateOutput
from .router import make_router, router_logits

__all__ = ["GumbelSoftmax", "sample_gumbel"]


def sample_gumbel(
    shape: torch.Size | tuple[int, ...],
    *,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Standard Gumbel noise ``-log(E)``, ``E ~ Exp(1)``, always finite."""
    uniform = torch.rand(shape, generator=generator, dtype=dtype, device=device)
    exponential = (-torch.log1p(-uniform)).clamp_min(torch.finfo(dtype).tiny)  # u in [0, 1) -> E >= tiny
    return -torch.log(exponential)


class GumbelSoftmax(BaseGate):
    """Gumbel-softmax gate; static (learned logits) or per-example (``Wx + b``).

    Args:
        num_experts: number of experts n >= 2.
        input_dim: input width of the per-example variant; None (default) gives the static gate of
            the DSelect-k paper, whose logits start at zero.
        temperature: Gumbel-softmax temperature T > 0.
        hard: return one-hot weights with straight-through gradients.
        generator: optional ``torch.Generator`` (on the input's device) for the Gumbel noise; use it,
            or eval mode, for reproducible outputs.
        validate: check inputs for NaN/inf.

    ``loss`` is always zero. With ``hard=True`` the exact zeros off the argmax still carry the
    straight-through gradient, so the gate sets ``zeros_carry_gradient`` (see
    :mod:`~routing_search.gates.protocol`) and layers with ``dispatch='auto'`` run every expert while
    gradients are recorded.
    """

    def __init__(
        self,
        num_experts: int,
        input_dim: int | None = None,
        *,
        temperature: float = 1.0,
        hard: bool = False,
        generator: torch.Generator | None = None,
        validate: bool = True,
    ) -> None:
        n, _ = check_num_experts_k(num_experts)
        super().__init__(n, input_dim, validate=validate)
        self.temperature = check_positive_float("temperature", temperature)
        self.hard = bool(hard)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator
        self.logits, self.router = make_router(input_dim, torch.zeros(n))

    @property
    def zeros_carry_gradient(self) -> bool:  # type: ignore[override]
        """True with ``hard=True``: the straight-through gradient flows through the exact zeros too."""
        return self.hard

    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, num_experts]`` without noise or temperature."""
        return router_logits(self.logits, self.router, x, gate=self)

    def forward(
        self, x: torch.Tensor, task: torch.Tensor | int | None = None, key: torch.Tensor | None = None
    ) -> GateOutput:
        """Gate weights for the batch ``x`` (see the class docstring); returns a :class:`GateOutput`."""
        x = self._check_x(x)
        self._count_call()
        logits = self.compute_logits(x)
        if self.training:
            logits = logits + sample_gumbel(
                logits.shape, dtype=logits.dtype, device=logits.device, generator=self.generator
            )
        soft = torch.softmax(logits / self.temperature, dim=-1)
        if not self.hard:
            return GateOutput(weights=soft, loss=self._zero_loss(soft))
        index = soft.argmax(dim=-1, keepdim=True)
        one_hot = torch.zeros_like(soft).scatter(1, index, 1.0)
        # Off the argmax (0 - s) + s is exactly 0 in floating point, so the support stays exact.
        weights = (one_hot - soft.detach()) + soft
        return GateOutput(weights=weights, loss=self._zero_loss(weights))

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, input_dim={self.input_dim}, "
            f"temperature={self.temperature}, hard={self.hard}"
        )
