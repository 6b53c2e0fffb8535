"""Dense softmax gate: every expert gets a positive weight.

The dense baseline of the DSelect-k paper ("Softmax MoE"). Static when ``input_dim`` is None (one
learned logits vector shared by all examples), per-example otherwise (``softmax((Wx + b) / T)``).
"""

from __future__ import annotations

import torch
from torch import nn

from .._validation import check_num_experts_k, check_positive_float
from .protocol import BaseGate, GateOutput
from .router import make_router, router_logits

__all__ = ["Softmax"]


class Softmax(BaseGate):
    """Dense softmax gate ``softmax(logits / temperature)``.

    Args:
        num_experts: number of experts n >= 2.
        input_dim: input width d of the per-example gate; None makes the gate static (the input is only
            used for its batch size).
        temperature: T > 0 dividing the logits.
        validate: check inputs for NaN/inf.

    The static logits start at zero (uniform weights); the per-example router is an ``nn.Linear`` with
    PyTorch's default initialisation. ``loss`` is always zero.
    """

    def __init__(
        self,
        num_experts: int,
        input_dim: int | None = None,
        *,
        temperature: float = 1.0,
        validate: bool = True,
    ) -> None:
        n, _ = check_num_experts_k(num_experts)
        super().__init__(n, input_dim, validate=validate)
        self.temperature = check_positive_float("temperature", temperature)
        self.logits, self.router = make_router(input_dim, torch.zeros(n))

    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, num_experts]`` before the temperature (static logits are broadcast)."""
        return router_logits(self.logits, self.router, x, gate=self)

    def forward(
        self, x: torch.Tensor, task: torch.Tensor | int | None = None, key: torch.Tensor | None = None
    ) -> GateOutput:
        """Gate weights for the batch ``x`` (see the class docstring); returns a :class:`GateOutput`."""
        x = self._check_x(x)
        self._count_call()
        logits = self.compute_logits(x)
        if self.temperature != 1.0:  # dividing by 1 changes nothing but costs an op and its backward
            logits = logits / self.temperature
        weights = torch.softmax(logits, dim=-1)
        return GateOutput(weights=weights, loss=self._zero_loss(weights))

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, input_dim={self.input_dim}, temperature={self.temperature}"
