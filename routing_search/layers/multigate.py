"""Multi-task layers: the multi-gate MoE (MMoE, one gate per task over shared experts) and the
shared-bottom baseline."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .._validation import check_choice, check_input
from ..gates.protocol import GateOutput, check_gate, num_selectors_of
from .dispatch import DISPATCH_MODES, all_expert_outputs, choose_dispatch, combine_dense, combine_sparse
from .moe import ExpertUsage, UsageMeter, _as_module_list, expert_usage
from .permutation import Permutation, apply_permutation

__all__ = ["MultiGateMoE", "MultiGateOutput", "SharedBottom"]


@dataclass
class MultiGateOutput:
    """What :class:`MultiGateMoE` returns.

    Attributes:
        outputs: one prediction per task (tower applied), each ``[batch, *tower_out]``.
        loss: sum of the gates' auxiliary losses (0-dim).
        weights: per task, expert-space weights ``[batch, n]`` after the permutation.
        gate_outputs: per task, the raw :class:`GateOutput`.
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
        dispatch, validate, track_usage: as in :class:`~routing_search.MoE`.
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
        self.experts = _as_module_list(experts)
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
        return list(self.permutation_modules)

    def permutation_for(self, task: int) -> Permutation:
        """The permutation used by task ``task``'s gate."""
        return self.permutation_modules[0 if self.share_permutation else task]

    def gate_outputs(self, x: torch.Tensor, task: torch.Tensor | int | None = None, key: torch.Tensor | None = None) -> list[GateOutput]:
        """Each task gate's output (gate-index space). ``task``/``key`` are passed to every gate."""
        if self.validate:
            check_input(x, None)
        return [gate(x, task=task, key=key) for gate in self.gates]

    def expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every row: ``[batch, n, *out]``."""
        return all_expert_outputs(self.experts, x)

    def head(self, mixtures: list[torch.Tensor]) -> list[torch.Tensor]:
        """The towers applied to each task's mixture."""
        return [tower(m) for tower, m in zip(self.towers, mixtures)]

    def mix(self, x: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
        """Combine the shared experts once for all tasks' expert-space weights."""
        mode = choose_dispatch(self.dispatch, weights)
        return combine_sparse(self.experts, x, weights) if mode == "sparse" else combine_dense(self.experts, x, weights)

    def forward(self, x: torch.Tensor, task: torch.Tensor | int | None = None, key: torch.Tensor | None = None) -> MultiGateOutput:
        """Every task gate, its permutation, one shared expert pass, then the towers; returns :class:`MultiGateOutput`."""
        gate_outputs = self.gate_outputs(x, task=task, key=key)
        weights = [apply_permutation(g, self.permutation_for(t).index) for t, g in enumerate(gate_outputs)]
        mixtures = self.mix(x, weights)
        if self.track_usage and self.training:
            for meter, w in zip(self.usage_meters, weights):
                meter.update(w)
        loss = torch.stack([g.loss for g in gate_outputs]).sum()
        return MultiGateOutput(outputs=self.head(mixtures), loss=loss, weights=weights, gate_outputs=gate_outputs)

    def expert_usage(self, task: int) -> ExpertUsage:
        """Running usage of task ``task``'s gate over training batches."""
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task must be in [0, {self.num_tasks - 1}], got {task}")
        return self.usage_meters[task].value()

    def reset_usage(self) -> None:
        """Forget every task's running usage statistics."""
        for meter in self.usage_meters:
            meter.reset()


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
            check_input(x, None)
        shared = self.bottom(x)
        zero = shared.new_zeros(())
        return MultiGateOutput(outputs=[tower(shared) for tower in self.towers], loss=zero, weights=[], gate_outputs=[])
