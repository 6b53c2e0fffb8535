"""Multi-task layers: the multi-gate MoE (MMoE, one gate per task over shared experts) and the
shared-bottom baseline."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from .._validation import check_choice, check_input
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
from .moe import ExpertUsage, UsageMeter, expert_usage
from .permutation import Permutation

__all__ = ["MultiGateMoE", "MultiGateOutput", "SharedBottom"]


@dataclass
class MultiGateOutput:
    """What :class:`MultiGateMoE` returns.

    Attributes:
        outputs: one prediction per task (tower applied), each ``[batch, *tower_out]``
            (``[batch, tokens, *tower_out]`` for token-shaped input).
        loss: sum of the gates' auxiliary losses (0-dim).
        weights: per task, expert-space weights ``[batch, n]`` (``[batch, tokens, n]``) after the permutation.
        gate_outputs: per task, the raw :class:`GateOutput` (same leading shape).
    """

    outputs: list[torch.Tensor]
    loss: torch.Tensor
    weights: list[torch.Tensor]
    gate_outputs: list[GateOutput]

    def usage(self, task: int) -> ExpertUsage:
        """Per-expert usage of task ``task``'s gate on this batch."""
        return expert_usage(self.weights[task])


class MultiGateMoE(nn.Module):
    """Shared experts, one gate and one tower per task: ``out_t = tower_t(Σ_i g^t_i(x) f_{π_t(i)}(x))``.

    Args:
        experts: the shared experts.
        gates: one gate per task (any gate of the protocol), all over ``len(experts)`` experts.
        towers: one module per task applied to that task's mixture; ``None`` for identity towers.
        share_permutation: one permutation for all task gates (as in COMET+'s multi-task configs)
            instead of one per task gate. Shared per-selector permutations need gates with equal
            numbers of selectors.
        per_selector: one permutation per selector for gates with selectors.
        dispatch, validate, track_usage: as in :class:`~routing_search.MoE` (``validate`` scans the
            input once per call for all task gates; ``'auto'`` runs dense when any gate's zeros carry
            gradient or an expert depends on the batch).

    Token-shaped input ``[batch, tokens, d]`` and zero-row batches work as in :class:`~routing_search.MoE`;
    each tower then receives ``[batch, tokens, *expert_out]``.
    """

    def __init__(
        self,
        experts: Sequence[nn.Module] | nn.ModuleList,
        gates: Sequence[nn.Module],
        towers: Sequence[nn.Module] | None = None,
        *,
        share_permutation: bool = False,
        per_selector: bool = True,
        dispatch: str = "auto",
        validate: bool = True,
        track_usage: bool = True,
    ) -> None:
        super().__init__()
        self.experts: nn.ModuleList = as_expert_list(experts)
        gates = list(gates)
        if not gates:
            raise ValueError("gates must hold one gate per task (at least one)")
        for t, gate in enumerate(gates):
            check_gate(gate, name=f"gates[{t}]")
            if gate.num_experts != len(self.experts):
                raise ValueError(f"gates[{t}].num_experts={gate.num_experts} but {len(self.experts)} experts were given")
        self.gates = nn.ModuleList(gates)
        if towers is None:
            towers = [nn.Identity() for _ in gates]
        towers = list(towers)
        if len(towers) != len(gates):
            raise ValueError(f"towers must hold one module per task ({len(gates)}), got {len(towers)}")
        self.towers = nn.ModuleList(towers)
        self.dispatch = check_choice("dispatch", dispatch, DISPATCH_MODES)
        self.validate = bool(validate)
        self.track_usage = bool(track_usage)
        self.share_permutation = bool(share_permutation)
        selectors = [num_selectors_of(g) if per_selector else 1 for g in gates]
        if self.share_permutation:
            if len(set(selectors)) != 1:
                raise ValueError(
                    f"share_permutation=True with per-selector permutations needs gates with equal numbers of "
                    f"selectors, got {selectors}; pass per_selector=False to share one permutation"
                )
            self.permutation_modules = nn.ModuleList([Permutation(len(self.experts), selectors[0])])
        else:
            self.permutation_modules = nn.ModuleList([Permutation(len(self.experts), s) for s in selectors])
        self.usage_meters = nn.ModuleList([UsageMeter(len(self.experts)) for _ in gates])

    @property
    def num_experts(self) -> int:
        """Number of shared experts n."""
        return len(self.experts)

    @property
    def num_tasks(self) -> int:
        """Number of tasks (one gate and one tower each)."""
        return len(self.gates)

    @property
    def permutations(self) -> list[Permutation]:
        """The distinct permutation modules a search may change."""
        return [cast(Permutation, p) for p in self.permutation_modules]

    def meter_for(self, task: int) -> UsageMeter:
        """The running usage meter of task ``task``'s gate."""
        return cast(UsageMeter, self.usage_meters[task])

    def permutation_for(self, task: int) -> Permutation:
        """The permutation used by task ``task``'s gate."""
        return cast(Permutation, self.permutation_modules[0 if self.share_permutation else task])

    def route_rows(
        self, x: torch.Tensor, task: torch.Tensor | int | None = None, key: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[GateOutput], torch.Size]:
        """Check ``x`` once, flatten it to rows and run every task gate: ``(rows, outputs on rows, lead)``."""
        x = check_input(x, None, validate=self.validate, tokens=True)
        rows, task, key, lead = flatten_leading(x, task, key)
        outs = [call_gate(gate, rows, task=task, key=key, checked=self.validate) for gate in self.gates]
        names = [f"gates[{t}]" for t in range(len(self.gates))]
        return rows, check_gate_outputs(outs, list(self.gates), rows.shape[0], names=names, values=self.validate), lead

    def gate_outputs(self, x: torch.Tensor, task: torch.Tensor | int | None = None, key: torch.Tensor | None = None) -> list[GateOutput]:
        """Each task gate's output (gate-index space). ``task``/``key`` are passed to every gate."""
        _, outs, lead = self.route_rows(x, task=task, key=key)
        return outs if len(lead) == 1 else [restore_leading(o, lead) for o in outs]

    def expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every row: ``[batch, n, *out]``."""
        return all_expert_outputs(self.experts, x)

    def head(self, mixtures: list[torch.Tensor]) -> list[torch.Tensor]:
        """The towers applied to each task's mixture."""
        return [tower(m) for tower, m in zip(self.towers, mixtures)]

    def mix(self, x: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
        """Combine the shared experts on rows ``x`` once for all tasks' expert-space weights."""
        return combine(self.dispatch, self.experts, x, weights, gates=list(self.gates))

    def forward(self, x: torch.Tensor, task: torch.Tensor | int | None = None, key: torch.Tensor | None = None) -> MultiGateOutput:
        """Every task gate, its permutation, one shared expert pass, then the towers; returns :class:`MultiGateOutput`."""
        rows, gate_outputs, lead = self.route_rows(x, task=task, key=key)
        weights = [self.permutation_for(t).apply(g) for t, g in enumerate(gate_outputs)]
        mixtures = self.mix(rows, weights)
        if self.track_usage and self.training:
            UsageMeter.update_all([self.meter_for(t) for t in range(len(weights))], weights)
        loss = gate_outputs[0].loss
        for g in gate_outputs[1:]:
            loss = loss + g.loss
        if len(lead) > 1:
            mixtures = [m.reshape(tuple(lead) + tuple(m.shape[1:])) for m in mixtures]
            weights = [w.reshape(tuple(lead) + (self.num_experts,)) for w in weights]
            gate_outputs = [restore_leading(g, lead) for g in gate_outputs]
        return MultiGateOutput(outputs=self.head(mixtures), loss=loss, weights=weights, gate_outputs=gate_outputs)

    def expert_usage(self, task: int) -> ExpertUsage:
        """Running usage of task ``task``'s gate over training batches."""
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task must be in [0, {self.num_tasks - 1}], got {task}")
        return self.meter_for(task).value()

    def reset_usage(self) -> None:
        """Forget every task's running usage statistics."""
        for t in range(self.num_tasks):
            self.meter_for(t).reset()


class SharedBottom(nn.Module):
    """The shared-bottom multi-task baseline: one shared network, one tower per task."""

    def __init__(self, bottom: nn.Module, towers: Sequence[nn.Module], *, validate: bool = True) -> None:
        super().__init__()
        towers = list(towers)
        if not towers:
            raise ValueError("towers must hold one module per task (at least one)")
        self.bottom = bottom
        self.towers = nn.ModuleList(towers)
        self.validate = bool(validate)

    @property
    def num_tasks(self) -> int:
        """Number of tasks (towers)."""
        return len(self.towers)

    def forward(self, x: torch.Tensor, task: torch.Tensor | int | None = None, key: torch.Tensor | None = None) -> MultiGateOutput:
        """The shared bottom, then each task's tower (no gates: ``weights`` and ``gate_outputs`` are empty)."""
        if self.validate:
            check_input(x, None, tokens=True)
        shared = self.bottom(x)
        zero = shared.new_zeros(())
        return MultiGateOutput(outputs=[tower(shared) for tower in self.towers], loss=zero, weights=[], gate_outputs=[])
