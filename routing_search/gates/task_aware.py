"""Task-aware gating (Gupta et al., 2022): routing conditioned on a task index.

Two modes, both wrapping any gate of the protocol (built-in or user-written):

* **Per task** (task-level routing, the multi-gate MoE of Ma et al. 2018): one gate per task,
  ``TaskAware(gates=[g_0, ..., g_{T-1}])`` or ``TaskAware.per_task([...])``. Each row is routed by its
  own task's gate, exactly as that gate alone would route it.
* **Task embedding** (token/example-level routing): ``TaskAware(gate=g, num_tasks=T,
  task_embedding_dim=E, input_dim=D)``. A learned embedding ``[T, E]`` of the task is concatenated to
  the input ``[batch, D]`` and fed to one per-example gate whose ``input_dim`` must be ``D + E``.

Call ``gate(x, task=task, key=key)`` with ``task`` an int (whole batch) or an integer tensor
``[batch]``; ``key`` is passed through to the inner gate(s).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from .._validation import check_int
from .protocol import BaseGate, GateOutput, check_gate, num_selectors_of

__all__ = ["TaskAware"]

_MISSING = object()


class TaskAware(BaseGate):
    """Route by task, with one gate per task or one gate fed a learned task embedding.

    Args:
        gates: one gate per task (per-task mode). All must share ``num_experts``; their
            ``input_dim`` attributes, where set, must agree (static gates accept any width).
        gate: the per-example gate of the task-embedding mode.
        num_tasks: number of tasks T (task-embedding mode; per-task mode uses ``len(gates)``).
        task_embedding_dim: width E of the task embedding (task-embedding mode).
        input_dim: width D of the input without the embedding (task-embedding mode).
        validate: check inputs for NaN/inf (the inner gates check with their own flags too).

    Output: ``weights`` of the gate that routed each row; ``num_experts`` comes from the inner
    gate(s). Selector outputs (``selector_weights``, ``selector_mix``) are passed on when every inner
    gate that was called returns them with the same number of selectors, and omitted otherwise.

    Loss in per-task mode: ``sum_t (rows of task t / batch) * loss_t``, i.e. every task gate's loss
    weighted by its share of the batch (only gates with rows in the batch are called). When the
    inner losses are batch means, this is the mean over the whole batch, and a batch of a single
    task gets exactly that task gate's loss. In task-embedding mode the loss is the inner gate's.
    The embedding is initialised N(0, 1), the scale of standardised input features.
    """

    gates: nn.ModuleList | None
    gate: nn.Module | None
    task_embedding: nn.Embedding | None

    def __init__(
        self,
        gates: Sequence[nn.Module] | None = None,
        *,
        gate: nn.Module | None = None,
        num_tasks: int | None = None,
        task_embedding_dim: int | None = None,
        input_dim: int | None = None,
        validate: bool = True,
    ) -> None:
        if (gates is None) == (gate is None):
            raise ValueError(
                "TaskAware needs exactly one of gates= (one gate per task) or gate= (one per-example "
                "gate fed a task embedding)"
            )
        if gates is not None:
            if num_tasks is not None or task_embedding_dim is not None or input_dim is not None:
                raise ValueError(
                    "num_tasks, task_embedding_dim and input_dim belong to the task-embedding mode "
                    "(gate=); with gates= the number of tasks is len(gates)"
                )
            if isinstance(gates, nn.Module) or not isinstance(gates, Sequence):
                raise TypeError("gates must be a sequence of gates, one per task")
            if len(gates) == 0:
                raise ValueError("gates must hold at least one gate (one per task)")
            checked = [check_gate(g, name=f"gates[{t}]") for t, g in enumerate(gates)]
            n = cast(int, checked[0].num_experts)
            for t, g in enumerate(checked):
                if g.num_experts != n:
                    raise ValueError(
                        f"all gates must have the same num_experts; gates[0] has {n}, "
                        f"gates[{t}] has {g.num_experts}"
                    )
            dims: set[int] = {d for d in (getattr(g, "input_dim", None) for g in checked) if d is not None}
            if len(dims) > 1:
                raise ValueError(f"the gates' input_dim values disagree: {sorted(dims)}")
            super().__init__(n, dims.pop() if dims else None, validate=validate)
            self.mode = "per_task"
            self.num_tasks = len(checked)
            self.gates = nn.ModuleList(checked)
            self.gate = None
            self.task_embedding = None
            selectors = {num_selectors_of(g) for g in checked}
            self.num_selectors = selectors.pop() if len(selectors) == 1 else 1
            return

        assert gate is not None
        gate = check_gate(gate, name="gate")
        if num_tasks is None or task_embedding_dim is None or input_dim is None:
            raise ValueError(
                "with gate=, TaskAware needs num_tasks, task_embedding_dim and input_dim "
                "(the width of x without the task embedding)"
            )
        num_tasks = check_int("num_tasks", num_tasks, minimum=1)
        task_embedding_dim = check_int("task_embedding_dim", task_embedding_dim, minimum=1)
        input_dim = check_int("input_dim", input_dim, minimum=1)
        inner_dim = getattr(gate, "input_dim", _MISSING)
        expected = input_dim + task_embedding_dim
        if inner_dim is None:
            raise ValueError(
                "gate must be a per-example gate with input_dim = input_dim + task_embedding_dim = "
                f"{expected}; got a static gate (input_dim=None)"
            )
        if inner_dim is not _MISSING and inner_dim != expected:
            raise ValueError(
                f"gate.input_dim must equal input_dim + task_embedding_dim = {input_dim} + "
                f"{task_embedding_dim} = {expected}, got {inner_dim}"
            )
        super().__init__(cast(int, gate.num_experts), input_dim, validate=validate)
        self.mode = "embedding"
        self.num_tasks = num_tasks
        self.gates = None
        self.gate = gate
        self.task_embedding = nn.Embedding(num_tasks, task_embedding_dim)
        self.num_selectors = num_selectors_of(gate)

    @classmethod
    def per_task(cls, gates: Sequence[nn.Module], *, validate: bool = True) -> TaskAware:
        """One gate per task: ``gates[t]`` routes every example of task ``t``."""
        return cls(gates=gates, validate=validate)

    @classmethod
    def with_task_embedding(
        cls,
        gate: nn.Module,
        *,
        num_tasks: int,
        task_embedding_dim: int,
        input_dim: int,
        validate: bool = True,
    ) -> TaskAware:
        """Per-example gate fed ``[x, emb(task)]``, with ``gate.input_dim == input_dim + task_embedding_dim``."""
        return cls(
            gate=gate,
            num_tasks=num_tasks,
            task_embedding_dim=task_embedding_dim,
            input_dim=input_dim,
            validate=validate,
        )

    # ----------------------------------------------------------------- helpers
    def _check_task(self, task: Any, batch: int, device: torch.device) -> int | torch.Tensor:
        """Return the task as an int (whole batch) or a long tensor ``[batch]`` on ``device``."""
        accepted = f"an int in [0, num_tasks={self.num_tasks}) or an integer tensor [batch]"
        if task is None:
            raise ValueError(f"TaskAware needs task=: {accepted}")
        if isinstance(task, torch.Tensor):
            if task.is_floating_point() or task.is_complex() or task.dtype == torch.bool:
                raise TypeError(f"task must have an integer dtype, got {task.dtype}")
            if task.dim() == 0:
                task = int(task)
            elif task.dim() != 1 or task.shape[0] != batch:
                raise ValueError(
                    f"task must be {accepted} of length {batch}, got shape {tuple(task.shape)}"
                )
            else:
                if task.numel() > 0:
                    low, high = int(task.min()), int(task.max())
                    if low < 0 or high >= self.num_tasks:
                        bad = low if low < 0 else high
                        raise ValueError(
                            f"task values must be in [0, num_tasks={self.num_tasks}), got {bad}"
                        )
                return task.to(device=device, dtype=torch.long)
        try:
            value = check_int("task", task)
        except TypeError:
            raise TypeError(f"task must be {accepted}, got {task!r}") from None
        if not 0 <= value < self.num_tasks:
            raise ValueError(f"task must be in [0, num_tasks={self.num_tasks}), got {value}")
        return value

    @staticmethod
    def _rows(tensor: Any, rows: torch.Tensor) -> Any:
        """The rows ``rows`` of a per-row ``key`` (a 0-dim tensor or a non-tensor passes unchanged)."""
        if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
            return tensor
        return tensor[rows.to(tensor.device)]

    # ----------------------------------------------------------------- forward
    def forward(
        self, x: torch.Tensor, task: torch.Tensor | int | None = None, key: torch.Tensor | None = None
    ) -> GateOutput:
        """Gate weights for the batch ``x`` (see the class docstring); returns a :class:`GateOutput`."""
        x = self._check_x(x)
        self._count_call()
        task = self._check_task(task, x.shape[0], x.device)
        if self.mode == "embedding":
            return self._forward_embedding(x, task, key)
        return self._forward_per_task(x, task, key)

    def _forward_embedding(
        self, x: torch.Tensor, task: int | torch.Tensor, key: torch.Tensor | None
    ) -> GateOutput:
        assert self.gate is not None and self.task_embedding is not None
        if isinstance(task, int):
            task = torch.full((x.shape[0],), task, dtype=torch.long, device=x.device)
        embedding = self.task_embedding(task.to(self.task_embedding.weight.device))
        embedding = embedding.to(device=x.device, dtype=x.dtype)
        out = self.gate(torch.cat([x, embedding], dim=1), key=key)
        return GateOutput(
            weights=out.weights,
            loss=out.loss,
            selector_weights=out.selector_weights,
            selector_mix=out.selector_mix,
        )

    def _forward_per_task(
        self, x: torch.Tensor, task: int | torch.Tensor, key: torch.Tensor | None
    ) -> GateOutput:
        assert self.gates is not None
        if isinstance(task, int):
            out = self.gates[task](x, key=key)
            return GateOutput(
                weights=out.weights,
                loss=out.loss,
                selector_weights=out.selector_weights,
                selector_mix=out.selector_mix,
            )

        batch = x.shape[0]
        if isinstance(key, torch.Tensor) and key.dim() > 0 and key.shape[0] != batch:
            raise ValueError(
                f"key must have one entry per row ([batch]=[{batch}], or 0-dim) to be split by task, "
                f"got shape {tuple(key.shape)}"
            )
        parts: list[tuple[torch.Tensor, GateOutput]] = []
        for t in torch.unique(task).tolist():
            rows = (task == t).nonzero(as_tuple=True)[0]
            parts.append((rows, self.gates[t](x[rows], key=self._rows(key, rows))))
        if not parts:  # empty batch: nothing to route, no inner gate called
            dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
            weights = torch.zeros(0, self.num_experts, dtype=dtype, device=x.device)
            return GateOutput(weights=weights, loss=self._zero_loss(weights))

        first = parts[0][1].weights
        weights = first.new_zeros(batch, self.num_experts)
        loss = self._zero_loss(first)
        for rows, out in parts:
            weights = weights.index_copy(0, rows.to(weights.device), out.weights)
            loss = loss + out.loss * (rows.numel() / batch)

        selector_weights = selector_mix = None
        shapes = {
            None if not out.has_selectors else tuple(out.selector_weights.shape[1:])  # type: ignore[union-attr]
            for _, out in parts
        }
        if len(shapes) == 1 and None not in shapes:
            k = parts[0][1].selector_weights.shape[1]  # type: ignore[union-attr]
            selector_weights = first.new_zeros(batch, k, self.num_experts)
            selector_mix = first.new_zeros(batch, k)
            for rows, out in parts:
                assert out.selector_weights is not None and out.selector_mix is not None  # shapes checked above
                selector_weights = selector_weights.index_copy(0, rows, out.selector_weights)
                selector_mix = selector_mix.index_copy(0, rows, out.selector_mix)
        return GateOutput(
            weights=weights, loss=loss, selector_weights=selector_weights, selector_mix=selector_mix
        )

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, num_tasks={self.num_tasks}, num_experts={self.num_experts}"
