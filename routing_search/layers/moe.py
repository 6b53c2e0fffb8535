"""The Mixture-of-Experts layer: a gate, an explicit permutation, and experts."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .._validation import check_choice, check_input, check_positive_float
from ..gates.protocol import (
    GateOutput,
    call_gate,
    check_gate,
    check_gate_outputs,
    flatten_leading,
    num_selectors_of,
    restore_leading,
)
from .dispatch import DISPATCH_MODES, all_expert_outputs, as_expert_list, combine
from .permutation import Permutation

__all__ = ["MoE", "MoEOutput", "ExpertUsage", "expert_usage", "UsageMeter"]


@dataclass
class ExpertUsage:
    """Per-expert usage: ``soft`` = mean weight, ``hard`` = fraction of rows giving non-zero weight.

    Both are tensors ``[n]``. The package's one usage type (also returned by
    :func:`routing_search.metrics.expert_usage`); it unpacks as ``soft, hard = usage``.
    """

    soft: torch.Tensor
    hard: torch.Tensor

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.soft, self.hard))


def expert_usage(weights: torch.Tensor, *, threshold: float = 0.0) -> ExpertUsage:
    """Usage of each expert under expert-space weights ``[batch, n]`` (or ``[..., n]``: all rows count).

    ``hard`` counts the rows whose weight's absolute value exceeds ``threshold`` (default: non-zero).

    >>> usage = expert_usage(torch.tensor([[1.0, 0.0], [0.5, 0.5]]))
    >>> usage.soft.tolist(), usage.hard.tolist()
    ([0.75, 0.25], [1.0, 0.5])
    """
    if not isinstance(weights, torch.Tensor) or weights.dim() < 1:
        raise TypeError(f"weights must be a tensor [batch, num_experts], got {type(weights).__name__}")
    threshold = check_positive_float("threshold", threshold, allow_zero=True)
    w = weights.detach()
    w = w.reshape(-1, w.shape[-1])
    if not w.is_floating_point():
        w = w.to(torch.get_default_dtype())
    return ExpertUsage(soft=w.mean(dim=0), hard=(w.abs() > threshold).to(w.dtype).mean(dim=0))


@dataclass
class MoEOutput:
    """What :class:`MoE` returns.

    Attributes:
        output: the mixture ``Σ_e w_e · expert_e(x)``, shape ``[batch, *expert_output]``
            (``[batch, tokens, *expert_output]`` for token-shaped input).
        loss: the gate's auxiliary loss (0-dim); add it to the training loss.
        weights: expert-space weights ``[batch, n]`` (``[batch, tokens, n]``) after the permutation.
        gate_output: the raw :class:`GateOutput` in gate-index space (same leading shape).
    """

    output: torch.Tensor
    loss: torch.Tensor
    weights: torch.Tensor
    gate_output: GateOutput

    @property
    def usage(self) -> ExpertUsage:
        """Per-expert usage of this batch (soft mean weight, hard fraction of rows)."""
        return expert_usage(self.weights)


class UsageMeter(nn.Module):
    """Running per-expert usage over the batches seen in training mode (buffers, so checkpointed).

    The sums stay float64 whatever the model's dtype: ``model.to(torch.bfloat16)``, ``.half()`` or
    ``.float()`` move them to the new device but do not cast them (a bfloat16 count is exact only up
    to 256).
    """

    soft_sum: torch.Tensor
    hard_sum: torch.Tensor
    rows: torch.Tensor

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.register_buffer("soft_sum", torch.zeros(num_experts, dtype=torch.float64))
        self.register_buffer("hard_sum", torch.zeros(num_experts, dtype=torch.float64))
        self.register_buffer("rows", torch.zeros((), dtype=torch.float64))

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> UsageMeter:
        # Module.to / half / float cast every floating buffer; keep the sums float64 (device moves apply).
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if old is not None and new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self

    @torch.no_grad()
    def update(self, weights: torch.Tensor) -> None:
        """Add a batch of expert-space weights ``[batch, n]`` (or ``[..., n]``) to the running sums."""
        w = weights.detach().reshape(-1, weights.shape[-1]).to(self.soft_sum.dtype)
        # add_ rather than += on the attribute: the latter goes through nn.Module.__setattr__ every call
        self.soft_sum.add_(w.sum(dim=0))
        self.hard_sum.add_((w != 0).to(w.dtype).sum(dim=0))
        self.rows.add_(w.shape[0])

    @staticmethod
    @torch.no_grad()
    def update_all(meters: Sequence[UsageMeter], weights: Sequence[torch.Tensor]) -> None:
        """``meters[t].update(weights[t])`` for every ``t``, batched: one float64 conversion and one
        reduction per statistic for all meters when the weight matrices have the same shape."""
        if len(meters) != len(weights):
            raise ValueError(f"update_all needs one weight matrix per meter, got {len(weights)} for {len(meters)} meters")
        shapes = {tuple(w.shape) for w in weights}
        devices = {w.device for w in weights} | {m.soft_sum.device for m in meters}
        dtypes = {m.soft_sum.dtype for m in meters} | {m.hard_sum.dtype for m in meters}
        if len(meters) < 2 or len(shapes) != 1 or len(devices) != 1 or dtypes != {torch.float64}:
            for meter, w in zip(meters, weights):
                meter.update(w)
            return
        n = weights[0].shape[-1]
        stacked = torch.stack([w.detach().reshape(-1, n) for w in weights])  # [T, rows, n]
        soft = stacked.sum(dim=1, dtype=torch.float64)  # the values cast to float64, then summed
        hard = torch.count_nonzero(stacked, dim=1)  # exact counts (added to the float64 sums)
        rows = stacked.shape[1]
        for t, meter in enumerate(meters):
            meter.soft_sum.add_(soft[t])
            meter.hard_sum.add_(hard[t])
            meter.rows.add_(rows)

    def value(self) -> ExpertUsage:
        """Average usage over the rows seen since the last reset."""
        rows = self.rows.clamp_min(1.0)
        return ExpertUsage(soft=self.soft_sum / rows, hard=self.hard_sum / rows)

    @torch.no_grad()
    def reset(self) -> None:
        """Set the running sums back to zero."""
        self.soft_sum.zero_()
        self.hard_sum.zero_()
        self.rows.zero_()


class MoE(nn.Module):
    """``y = Σ_i g_i(x) · f_{π(i)}(x)``: a gate, a permutation π and experts.

    Args:
        experts: the experts; each maps ``[rows, d]`` to ``[rows, *out]`` (same ``out`` for all) and
            treats rows independently unless it is batch-dependent (see ``dispatch``).
        gate: any module following the gate protocol with ``num_experts == len(experts)``.
        dispatch: ``'sparse'`` runs each expert only on the rows that give it weight; ``'dense'`` runs
            every expert on every row; ``'auto'`` (default) picks sparse when at most half the
            (row, expert) pairs are used, and dense when an expert depends on the batch (BatchNorm in
            training mode, see :func:`~routing_search.layers.dispatch.depends_on_batch`) or the gate's
            zeros carry gradient while gradients are recorded. ``'sparse'`` with batch-dependent experts
            raises; in eval mode (running statistics) sparse dispatch is exact.
        per_selector: one permutation per selector when the gate has selectors (DSelect-k, COMET);
            otherwise one permutation for the gate's weights.
        validate: scan the input for NaN/inf once per call (the gate then skips its own scan) and check
            that the gate's rows are on the simplex. Shapes and the output type are always checked.
        track_usage: keep running per-expert usage in training mode (see :meth:`expert_usage`).

    ``x`` may be ``[batch, d]`` or token-shaped ``[batch, tokens, d]``: the
    layer routes every token as a row and returns ``output`` ``[batch, tokens, *out]``, ``weights``
    ``[batch, tokens, n]``; ``task``/``key`` are ``[batch]`` (broadcast over tokens) or
    ``[batch, tokens]``. A zero-row batch returns empty outputs of the right shapes.
    """

    def __init__(
        self,
        experts: Sequence[nn.Module] | nn.ModuleList,
        gate: nn.Module,
        *,
        dispatch: str = "auto",
        per_selector: bool = True,
        validate: bool = True,
        track_usage: bool = True,
    ) -> None:
        super().__init__()
        self.experts: nn.ModuleList = as_expert_list(experts)
        self.gate: nn.Module = check_gate(gate)
        if gate.num_experts != len(self.experts):
            raise ValueError(f"gate.num_experts={gate.num_experts} but {len(self.experts)} experts were given")
        self.dispatch = check_choice("dispatch", dispatch, DISPATCH_MODES)
        self.validate = bool(validate)
        self.track_usage = bool(track_usage)
        selectors = num_selectors_of(gate) if per_selector else 1
        self.permutation: Permutation = Permutation(len(self.experts), selectors)
        self.usage: UsageMeter = UsageMeter(len(self.experts))

    @property
    def num_experts(self) -> int:
        """Number of experts n."""
        return len(self.experts)

    @property
    def num_tasks(self) -> int:
        """1: a plain MoE has one gate (see :class:`~routing_search.MultiGateMoE` for several tasks)."""
        return 1

    @property
    def permutations(self) -> list[Permutation]:
        """The permutation modules a search may change (one for an MoE)."""
        return [self.permutation]

    def route_rows(
        self, x: torch.Tensor, task: torch.Tensor | int | None = None, key: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[GateOutput], torch.Size]:
        """Check ``x`` once, flatten it to rows and run the gate: ``(rows, [gate output on rows], lead)``."""
        x = check_input(x, None, validate=self.validate, tokens=True)
        rows, task, key, lead = flatten_leading(x, task, key)
        out = call_gate(self.gate, rows, task=task, key=key, checked=self.validate)
        return rows, check_gate_outputs([out], [self.gate], rows.shape[0], names=["gate"], values=self.validate), lead

    def gate_outputs(self, x: torch.Tensor, task: torch.Tensor | int | None = None, key: torch.Tensor | None = None) -> list[GateOutput]:
        """The gate's output in gate-index space, as a one-element list (one per task)."""
        _, outs, lead = self.route_rows(x, task=task, key=key)
        return outs if len(lead) == 1 else [restore_leading(o, lead) for o in outs]

    def expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every row: ``[batch, n, *out]``."""
        return all_expert_outputs(self.experts, x)

    def head(self, mixtures: list[torch.Tensor]) -> torch.Tensor:
        """What follows the mixture (nothing for a plain MoE)."""
        return mixtures[0]

    def mix(self, x: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
        """Combine experts on rows ``x`` ``[rows, d]`` with expert-space weights, using the configured dispatch."""
        return combine(self.dispatch, self.experts, x, weights, gates=[self.gate])

    def forward(self, x: torch.Tensor, task: torch.Tensor | int | None = None, key: torch.Tensor | None = None) -> MoEOutput:
        """Gate, permutation, then the experts' mixture (sparse or dense dispatch); returns :class:`MoEOutput`."""
        rows, (gate_output,), lead = self.route_rows(x, task=task, key=key)
        weights = self.permutation.apply(gate_output)
        (output,) = self.mix(rows, [weights])
        if self.track_usage and self.training:
            self.usage.update(weights)
        if len(lead) > 1:
            output = output.reshape(tuple(lead) + tuple(output.shape[1:]))
            weights = weights.reshape(tuple(lead) + (self.num_experts,))
            gate_output = restore_leading(gate_output, lead)
        return MoEOutput(output=output, loss=gate_output.loss, weights=weights, gate_output=gate_output)

    def expert_usage(self) -> ExpertUsage:
        """Running usage since construction or the last :meth:`reset_usage` (training batches)."""
        return self.usage.value()

    def reset_usage(self) -> None:
        """Forget the running usage statistics."""
        self.usage.reset()
