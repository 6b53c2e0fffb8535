"""The Mixture-of-Experts layer: a gate, an explicit permutation, and experts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .._validation import check_choice, check_input
from ..gates.protocol import GateOutput, check_gate, num_selectors_of
from .dispatch import DISPATCH_MODES, all_expert_outputs, choose_dispatch, combine_dense, combine_sparse
from .permutation import Permutation, apply_permutation

__all__ = ["MoE", "MoEOutput", "ExpertUsage", "expert_usage", "UsageMeter"]


@dataclass
class ExpertUsage:
    """Per-expert usage: ``soft`` = mean weight, ``hard`` = fraction of rows giving non-zero weight."""

    soft: torch.Tensor
    hard: torch.Tensor


def expert_usage(weights: torch.Tensor) -> ExpertUsage:
    """Usage of each expert under expert-space weights ``[batch, n]``."""
    w = weights.detach()
    return ExpertUsage(soft=w.mean(dim=0), hard=(w != 0).to(w.dtype).mean(dim=0))


@dataclass
class MoEOutput:
    """What :class:`MoE` returns.

    Attributes:
        output: the mixture ``Σ_e w_e · expert_e(x)``, shape ``[batch, *expert_output]``.
        loss: the gate's auxiliary loss (0-dim); add it to the training loss.
        weights: expert-space weights ``[batch, n]`` after the permutation.
        gate_output: the raw :class:`GateOutput` in gate-index space.
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
    """Running per-expert usage over the batches seen in training mode (buffers, so checkpointed)."""

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.register_buffer("soft_sum", torch.zeros(num_experts, dtype=torch.float64))
        self.register_buffer("hard_sum", torch.zeros(num_experts, dtype=torch.float64))
        self.register_buffer("rows", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, weights: torch.Tensor) -> None:
        """Add a batch of expert-space weights ``[batch, n]`` to the running sums."""
        w = weights.detach().to(self.soft_sum.dtype)
        self.soft_sum += w.sum(dim=0)
        self.hard_sum += (w != 0).to(w.dtype).sum(dim=0)
        self.rows += w.shape[0]

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


def _as_module_list(experts: Sequence[nn.Module] | nn.ModuleList, name: str = "experts") -> nn.ModuleList:
    if isinstance(experts, nn.Module) and not isinstance(experts, nn.ModuleList):
        raise TypeError(f"{name} must be a sequence of nn.Module experts (e.g. a list or nn.ModuleList), got one module")
    experts = list(experts)
    if not experts or not all(isinstance(e, nn.Module) for e in experts):
        raise TypeError(f"{name} must be a non-empty sequence of nn.Module experts")
    return nn.ModuleList(experts)


class MoE(nn.Module):
    """``y = Σ_i g_i(x) · f_{π(i)}(x)``: a gate, a permutation π and experts.

    Args:
        experts: the experts; each maps ``[batch, d]`` to ``[batch, *out]`` (same ``out`` for all).
        gate: any module following the gate protocol with ``num_experts == len(experts)``.
        dispatch: ``'sparse'`` runs each expert only on the rows that give it weight; ``'dense'`` runs
            every expert on every row; ``'auto'`` picks sparse when at most half the (row, expert)
            pairs are used. For a user gate whose exact zeros still carry gradient, use ``'dense'``.
        per_selector: one permutation per selector when the gate has selectors (DSelect-k, COMET);
            otherwise one permutation for the gate's weights.
        validate: check the input for NaN/inf on every call.
        track_usage: keep running per-expert usage in training mode (see :meth:`expert_usage`).
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
        self.experts = _as_module_list(experts)
        self.gate = check_gate(gate)
        if gate.num_experts != len(self.experts):
            raise ValueError(f"gate.num_experts={gate.num_experts} but {len(self.experts)} experts were given")
        self.dispatch = check_choice("dispatch", dispatch, DISPATCH_MODES)
        self.validate = bool(validate)
        self.track_usage = bool(track_usage)
        selectors = num_selectors_of(gate) if per_selector else 1
        self.permutation = Permutation(len(self.experts), selectors)
        self.usage = UsageMeter(len(self.experts))

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

    def gate_outputs(self, x: torch.Tensor, task: torch.Tensor | int | None = None, key: torch.Tensor | None = None) -> list[GateOutput]:
        """The gate's output in gate-index space, as a one-element list (one per task)."""
        if self.validate:
            check_input(x, None)
        return [self.gate(x, task=task, key=key)]

    def expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every row: ``[batch, n, *out]``."""
        return all_expert_outputs(self.experts, x)

    def head(self, mixtures: list[torch.Tensor]) -> torch.Tensor:
        """What follows the mixture (nothing for a plain MoE)."""
        return mixtures[0]

    def mix(self, x: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
        """Combine experts with expert-space weights, using the configured dispatch."""
        mode = choose_dispatch(self.dispatch, weights)
        return combine_sparse(self.experts, x, weights) if mode == "sparse" else combine_dense(self.experts, x, weights)

    def forward(self, x: torch.Tensor, task: torch.Tensor | int | None = None, key: torch.Tensor | None = None) -> MoEOutput:
        """Gate, permutation, then the experts' mixture (sparse or dense dispatch); returns :class:`MoEOutput`."""
        (gate_output,) = self.gate_outputs(x, task=task, key=key)
        weights = apply_permutation(gate_output, self.permutation.index)
        (output,) = self.mix(x, [weights])
        if self.track_usage and self.training:
            self.usage.update(weights)
        return MoEOutput(output=output, loss=gate_output.loss, weights=weights, gate_output=gate_output)

    def expert_usage(self) -> ExpertUsage:
        """Running usage since construction or the last :meth:`reset_usage` (training batches)."""
        return self.usage.value()

    def reset_usage(self) -> None:
        """Forget the running usage statistics."""
        self.usage.reset()
