"""Top-k gate of Shazeer et al. (2017): ``softmax(KeepTopK(Wx + b + noise, k))``.

Design choices (see the class docstring for details):

* Selection uses the indices returned by ``torch.topk`` and a ``scatter``; nothing tests a logit
  against 0, so a selected logit that equals 0 (or any value) keeps its weight. Ties are broken by
  ``torch.topk`` deterministically.
* Every row has exactly ``k`` non-zero weights: kept weights are clamped from below at the smallest
  normal number of the dtype, so an ``exp`` underflow cannot remove an expert from the support (the
  row sum moves by at most ``k * tiny``, far below rounding).
* ``k = 1``: the renormalised weight is identically 1, which gives the router no gradient. We return
  ``p / p.detach()`` instead, where ``p`` is the full softmax probability of the chosen expert: the
  value is exactly 1 (so rows stay exactly one-hot), and the gradient is that of ``log p``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_num_experts_k, check_positive_float
from .protocol import BaseGate, GateOutput, WeightSchedule, check_weight_schedule, resolve_weight
from .router import make_router, router_logits

__all__ = ["TopK", "cv_squared"]


def cv_squared(values: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation ``var / mean²`` of a 1-D tensor (population variance)."""
    mean = values.mean()
    return values.var(correction=0) / (mean * mean + eps)


class TopK(BaseGate):
    """Sparse Top-k gate (Shazeer et al., 2017) with optional noisy gating and auxiliary losses.

    Args:
        num_experts: number of experts n >= 2.
        k: number of experts kept per example, 1 <= k <= n.
        input_dim: input width d of the per-example router ``Wx + b``; None makes the gate static
            (a learned logits vector, initialised U(-0.05, 0.05) so that ties are broken at random).
        noisy: add ``N(0, 1) * (softplus(W_noise x) + noise_epsilon)`` to the logits in training mode
            (never in eval mode). ``W_noise`` starts at zero; the static gate learns one noise scale
            per expert instead.
        noise_epsilon: minimum noise standard deviation (>= 0).
        load_balance_weight: weight (constant or schedule of the call count) of
            ``cv²(importance) + cv²(load)``. Importance is the batch sum of the weights. Load is the
            smooth normal-CDF estimate of the paper when noise is active (training, ``noisy=True``,
            ``k < n``); otherwise it is the hard count of examples per expert, whose cv² has no gradient.
        z_loss_weight: weight (constant or schedule) of the router z-loss
            ``mean_batch logsumexp(clean logits)²``.
        generator: optional ``torch.Generator`` (on the input's device) for the routing noise.
        validate: check inputs for NaN/inf.

    Output: ``weights [batch, n]`` with exactly ``k`` non-zeros per row, on the simplex; ``loss`` the
    weighted auxiliary losses (0 when both weights are 0).
    """

    def __init__(
        self,
        num_experts: int,
        k: int,
        input_dim: int | None = None,
        *,
        noisy: bool = False,
        noise_epsilon: float = 1e-2,
        load_balance_weight: WeightSchedule = 0.0,
        z_loss_weight: WeightSchedule = 0.0,
        generator: torch.Generator | None = None,
        validate: bool = True,
    ) -> None:
        n, k_checked = check_num_experts_k(num_experts, k)
        assert k_checked is not None
        super().__init__(n, input_dim, validate=validate)
        self.k = k_checked
        self.noisy = bool(noisy)
        self.noise_epsilon = check_positive_float("noise_epsilon", noise_epsilon, allow_zero=True)
        self.load_balance_weight = check_weight_schedule("load_balance_weight", load_balance_weight)
        self.z_loss_weight = check_weight_schedule("z_loss_weight", z_loss_weight)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator

        # Static logits start at U(-0.05, 0.05) so that ties are broken at random.
        self.logits, self.router = make_router(input_dim, torch.empty(n).uniform_(-0.05, 0.05))
        self.noise_logits: nn.Parameter | None = None
        self.noise_router: nn.Linear | None = None
        if self.noisy and input_dim is None:
            self.noise_logits = nn.Parameter(torch.zeros(n))
        elif self.noisy and input_dim is not None:
            self.noise_router = nn.Linear(input_dim, n, bias=False)
            nn.init.zeros_(self.noise_router.weight)

    # ------------------------------------------------------------------ pieces
    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Clean (noise-free) logits ``[batch, num_experts]``."""
        return router_logits(self.logits, self.router, x, gate=self)

    def noise_std(self, x: torch.Tensor) -> torch.Tensor:
        """Standard deviation ``softplus(W_noise x) + noise_epsilon`` of the routing noise ``[batch, n]``."""
        if not self.noisy:
            raise RuntimeError("noise_std is only defined for a gate built with noisy=True")
        if self.noise_router is not None:
            raw = self.noise_router(x)
        else:
            assert self.noise_logits is not None
            raw = self.noise_logits.unsqueeze(0).expand(x.shape[0], -1)
        return F.softplus(raw) + self.noise_epsilon

    def _smooth_load(
        self, clean: torch.Tensor, noisy: torch.Tensor, std: torch.Tensor, selected: torch.Tensor
    ) -> torch.Tensor:
        """Shazeer et al. Appendix A: P(expert i stays in the top k when only its own noise is redrawn)."""
        top = noisy.topk(self.k + 1, dim=-1).values
        threshold_if_in = top[:, self.k : self.k + 1]  # (k+1)-th largest: i must beat it to stay in
        threshold_if_out = top[:, self.k - 1 : self.k]  # k-th largest: i must beat it to get in
        threshold = torch.where(selected, threshold_if_in, threshold_if_out)
        prob = torch.special.ndtr((clean - threshold) / std)
        return prob.sum(dim=0)

    # ----------------------------------------------------------------- forward
    def forward(
        self, x: torch.Tensor, task: torch.Tensor | int | None = None, key: torch.Tensor | None = None
    ) -> GateOutput:
        """Gate weights for the batch ``x`` (see the class docstring); returns a :class:`GateOutput`."""
        x = self._check_x(x)
        calls = self._tick()
        clean = self.compute_logits(x)

        std: torch.Tensor | None = None
        logits = clean
        if self.noisy and self.training:
            std = self.noise_std(x)
            noise = torch.randn(
                clean.shape, generator=self.generator, device=clean.device, dtype=clean.dtype
            )
            logits = clean + noise * std

        top_values, top_index = logits.topk(self.k, dim=-1)
        if self.k == 1:
            # Straight-through: value exactly 1, gradient of log softmax(logits)[chosen].
            p = torch.softmax(logits, dim=-1).gather(1, top_index)
            kept = p / p.detach()
        else:
            kept = torch.softmax(top_values, dim=-1).clamp_min(torch.finfo(logits.dtype).tiny)
        weights = torch.zeros_like(logits).scatter(1, top_index, kept)

        loss = self._zero_loss(weights)
        lb = resolve_weight(self.load_balance_weight, calls)
        if lb > 0:
            selected = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top_index, True)
            if std is not None and self.k < self.num_experts:
                load = self._smooth_load(clean, logits, std, selected)
            else:
                load = selected.sum(dim=0).to(weights.dtype)
            loss = loss + lb * (cv_squared(weights.sum(dim=0)) + cv_squared(load))
        zw = resolve_weight(self.z_loss_weight, calls)
        if zw > 0:
            z = torch.logsumexp(clean, dim=-1).square()
            # The batch mean, 0 for a batch without rows (the mean of nothing is NaN).
            loss = loss + zw * (z.mean() if z.numel() else z.sum())
        return GateOutput(weights=weights, loss=loss)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, k={self.k}, input_dim={self.input_dim}, "
            f"noisy={self.noisy}"
        )
