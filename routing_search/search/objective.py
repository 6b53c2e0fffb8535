"""Exact evaluation of permutation candidates without re-running the experts.

:class:`RoutingObjective` computes the expert outputs ``F = [f_1(x) … f_n(x)]`` and the gate outputs once
on the evaluation data. A candidate changes the permutation of one (permutation module, selector);
only the gate slots whose expert changes matter, and only on the rows where those slots carry weight:

    Δm_b = Σ_{i changed} c_bi · (F_b,new(i) − F_b,old(i))

(for a swap of slots a, b this is the closed form ``(c_a − c_b)(F_{π(b)} − F_{π(a)})``). The task heads
(towers) and the user's per-example loss are then evaluated on those rows only, and the loss change is
added to the cached total. Everything downstream of the mixture is the user's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .._validation import check_int
from ..batches import as_batch, call_model, eval_mode, take_rows, unwrap_prediction
from ..gates.protocol import GateOutput
from ..layers.moe import MoE, MoEOutput
from ..layers.multigate import MultiGateMoE, MultiGateOutput
from ..layers.permutation import Permutation, apply_permutation
from .swap_scan import SwapScan

__all__ = ["RoutingObjective", "Candidate", "LossFn", "find_routing_layer"]

LossFn = Callable[[Any, Any], torch.Tensor]


@dataclass(frozen=True)
class Candidate:
    """A new permutation row for selector ``selector`` of permutation module ``slot``."""

    slot: int
    selector: int
    row: tuple[int, ...]
    kind: str = "move"


def _is_routing_layer(module: nn.Module) -> bool:
    return isinstance(module, (MoE, MultiGateMoE))


def find_routing_layer(model: nn.Module, layer: nn.Module | str | None = None) -> tuple[nn.Module, bool]:
    """Locate the MoE layer to search. Returns ``(layer, nested)``; nested means the model wraps it."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (an MoE, a MultiGateMoE or a model containing one), got {type(model).__name__}")
    if isinstance(layer, str):
        named = dict(model.named_modules())
        if layer not in named or not _is_routing_layer(named[layer]):
            options = [name for name, m in model.named_modules() if _is_routing_layer(m)]
            raise ValueError(f"layer={layer!r} is not an MoE layer of the model; MoE layers: {options}")
        layer = named[layer]
    if layer is not None:
        if not _is_routing_layer(layer):
            raise TypeError("layer must be an MoE or MultiGateMoE module of the model")
        if layer is not model and all(m is not layer for m in model.modules()):
            raise ValueError("layer is not a submodule of model")
        return layer, layer is not model
    if _is_routing_layer(model):
        return model, False
    found = [(name, m) for name, m in model.named_modules() if _is_routing_layer(m)]
    if not found:
        raise ValueError("model contains no MoE or MultiGateMoE layer to search")
    if len(found) > 1:
        raise ValueError(f"model contains several MoE layers {[n for n, _ in found]}; choose one with layer=")
    return found[0][1], True


def _selector_contributions(gate_output: GateOutput, num_rows: int) -> torch.Tensor:
    """``[B, S, n]`` weight each (selector, slot) sends to its expert; S = 1 for one permutation row."""
    if num_rows == 1:
        return gate_output.weights.unsqueeze(1)
    return gate_output.selector_mix.unsqueeze(2) * gate_output.selector_weights


class RoutingObjective:
    """The evaluation loss as a function of an MoE layer's permutation(s), experts and gates cached.

    Args:
        model: an ``MoE``, a ``MultiGateMoE``, or any module containing one (then ``layer`` picks it
            when there are several). The model is evaluated in eval mode; its modes are restored.
        data: ``(inputs, targets)`` or an iterable of such pairs. ``inputs`` is the model's input
            tensor, or a dict of its keyword arguments (e.g. ``{'x': x, 'task': t, 'key': k}``).
        loss: ``loss(prediction, targets)``; ``prediction`` is what the model returns (an MoE's
            ``.output``, a multi-gate MoE's list ``.outputs``). Return per-example losses ``[B]`` to get
            row-restricted (fast) candidate evaluation; a scalar is accepted and evaluated in full.
        max_rows: cap on the rows evaluated at once when scanning candidates (bounds the memory of
            every chunk; 16K rows keeps the intermediates in cache on a CPU).

    Memory: the cache holds every expert's output on every row, ``B · n · u`` values (plus the gate
    outputs); evaluating candidates adds at most ``max_rows`` rows at a time. Bound ``B`` by the size of
    the evaluation data (``fit`` searches at most 2048 held-out rows by default).
    """

    def __init__(
        self,
        model: nn.Module,
        data: Any,
        loss: LossFn,
        *,
        layer: nn.Module | str | None = None,
        max_rows: int = 1 << 14,
    ) -> None:
        if not callable(loss):
            raise TypeError(f"loss must be a callable loss(prediction, targets), got {type(loss).__name__}")
        self.model = model
        self.loss_fn = loss
        self.layer, self.nested = find_routing_layer(model, layer)
        self._modules = list(model.modules())
        self.max_rows = check_int("max_rows", max_rows, minimum=1)
        self.inputs, self.targets = as_batch(data)
        self.nfev = 0
        self._swap_scans: dict[tuple[int, int], SwapScan] = {}
        self._build_cache()

    # ----------------------------------------------------------------- cache
    @torch.no_grad()
    def _build_cache(self) -> None:
        layer = self.layer
        with eval_mode(self.model, self._modules):
            if self.nested:
                captured: dict[str, Any] = {}

                def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
                    captured.setdefault("args", args)
                    captured.setdefault("kwargs", kwargs)

                handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
                try:
                    call_model(self.model, self.inputs)
                finally:
                    handle.remove()
                if "args" not in captured:
                    raise ValueError("the model's forward did not call the chosen MoE layer")
                args, kwargs = captured["args"], dict(captured["kwargs"])
                x = args[0] if args else kwargs.pop("x")
                task = args[1] if len(args) > 1 else kwargs.get("task")
                key = args[2] if len(args) > 2 else kwargs.get("key")
            else:
                if isinstance(self.inputs, Mapping):
                    unknown = set(self.inputs) - {"x", "task", "key"}
                    if unknown:
                        raise ValueError(f"inputs for an MoE layer accept keys 'x', 'task', 'key'; got {sorted(unknown)}")
                    x, task, key = self.inputs["x"], self.inputs.get("task"), self.inputs.get("key")
                else:
                    x, task, key = self.inputs, None, None
            self.x, self.task, self.key = x, task, key
            self.gate_outs = [_detach_gate_output(g) for g in layer.gate_outputs(x, task=task, key=key)]
            outputs = layer.expert_outputs(x)
        self.batch = outputs.shape[0]
        self.out_shape = tuple(outputs.shape[2:])
        self.F = outputs.reshape(self.batch, outputs.shape[1], -1)  # [B, n, u]
        self.n = self.F.shape[1]
        self.slots: list[Permutation] = list(layer.permutations)
        self.task_slot = [self._slot_of_task(t) for t in range(layer.num_tasks)]
        self.slot_tasks = [[t for t, s in enumerate(self.task_slot) if s == p] for p in range(len(self.slots))]
        self.contrib = [
            _selector_contributions(g, self.slots[self.task_slot[t]].num_selectors) for t, g in enumerate(self.gate_outs)
        ]
        self.state = [slot.index.detach().clone().to(self.F.device) for slot in self.slots]
        self._refresh()
        self.fun0 = self.fun

    def _slot_of_task(self, task: int) -> int:
        if isinstance(self.layer, MultiGateMoE):
            perm = self.layer.permutation_for(task)
            return next(p for p, slot in enumerate(self.layer.permutations) if slot is perm)
        return 0

    @torch.no_grad()
    def _refresh(self) -> None:
        """Recompute mixtures, predictions, per-example losses and the total from the current state."""
        old_mixtures, old_losses = getattr(self, "mixtures", None), getattr(self, "row_losses", None)
        self.mixtures = [self._mixture(t, self.state[self.task_slot[t]]) for t in range(len(self.gate_outs))]
        with eval_mode(self.model, self._modules):
            if self.nested:
                self.task_preds = None
                self.row_losses = None
                self.fun = self._nested_loss(self.mixtures)
            else:
                self.task_preds = [self._head_task(t, m) for t, m in enumerate(self.mixtures)]
                value = self.loss_fn(self._assemble(self.task_preds), self.targets)
                self.row_losses, self.fun = self._split_loss(value, self.batch)
        self.nfev += 1
        if self._swap_scans and old_mixtures is not None and old_losses is not None and self.row_losses is not None:
            changed = self.row_losses != old_losses
            for new, old in zip(self.mixtures, old_mixtures):
                changed |= (new != old).any(dim=1)
            for scan in self._swap_scans.values():
                scan.mark_dirty(changed)

    def _split_loss(self, value: torch.Tensor, rows: int) -> tuple[torch.Tensor | None, float]:
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"loss must return a tensor, got {type(value).__name__}")
        if value.dim() == 0:
            return None, float(value)
        if value.shape != (rows,):
            raise ValueError(f"loss must return per-example losses of shape [{rows}] or a scalar, got {tuple(value.shape)}")
        return value.detach().to(torch.float64), float(value.detach().to(torch.float64).mean())

    def _mixture(self, task: int, index: torch.Tensor) -> torch.Tensor:
        weights = apply_permutation(self.gate_outs[task], index)
        return torch.einsum("bn,bnu->bu", weights.to(self.F.dtype), self.F)

    def _head_task(self, task: int, mixture: torch.Tensor) -> torch.Tensor:
        m = mixture.reshape((mixture.shape[0],) + self.out_shape)
        if isinstance(self.layer, MultiGateMoE):
            return self.layer.towers[task](m)
        return m

    def _assemble(self, task_preds: list[torch.Tensor]) -> Any:
        return task_preds if isinstance(self.layer, MultiGateMoE) else task_preds[0]

    def _nested_loss(self, mixtures: list[torch.Tensor]) -> float:
        """Run the wrapping model with the layer's output replaced by the given mixtures."""
        layer = self.layer
        shaped = [m.reshape((m.shape[0],) + self.out_shape) for m in mixtures]
        weights = [apply_permutation(g, self.state[self.task_slot[t]]) for t, g in enumerate(self.gate_outs)]
        loss0 = torch.stack([g.loss for g in self.gate_outs]).sum()
        if isinstance(layer, MultiGateMoE):
            replaced: Any = MultiGateOutput(layer.head(shaped), loss0, weights, self.gate_outs)
        else:
            replaced = MoEOutput(shaped[0], loss0, weights[0], self.gate_outs[0])
        layer.forward = lambda *args, **kwargs: replaced  # instance attribute shadows the method
        try:
            value = self.loss_fn(unwrap_prediction(call_model(self.model, self.inputs)), self.targets)
        finally:
            del layer.forward
        return self._split_loss(value, self.batch)[1]

    # ------------------------------------------------------------- candidates
    @property
    def row_restricted(self) -> bool:
        """True when candidates are evaluated on the changed rows only (per-example loss, direct layer)."""
        return self.row_losses is not None

    def current(self) -> list[np.ndarray]:
        """The current permutation of every slot, ``[S, n]`` int64 arrays."""
        return [s.cpu().numpy().copy() for s in self.state]

    @torch.no_grad()
    def evaluate(self, candidates: Sequence[Candidate]) -> np.ndarray:
        """Exact evaluation loss of each candidate applied alone to the current state."""
        out = np.empty(len(candidates), dtype=np.float64)
        if not self.row_restricted:
            for i, cand in enumerate(candidates):
                out[i] = self._full_value({cand.slot: self._with_row(cand)})
            return out
        groups: dict[tuple[int, int], list[int]] = {}
        for i, cand in enumerate(candidates):
            groups.setdefault((cand.slot, cand.selector), []).append(i)
        for (slot, selector), members in groups.items():
            rows = torch.as_tensor([candidates[i].row for i in members], device=self.F.device)
            # Bound the [candidates, changed slots, batch] mask built per chunk.
            per_chunk = max(1, (1 << 24) // (self.batch * self.n))
            for start in range(0, len(members), per_chunk):
                chunk = members[start : start + per_chunk]
                self._group_changes(slot, selector, rows[start : start + per_chunk], out, chunk)
                self.nfev += len(chunk)
        return out

    def _group_changes(self, slot: int, selector: int, rows: torch.Tensor, out: np.ndarray, members: list[int]) -> None:
        """Evaluate candidates that all change selector ``selector`` of module ``slot`` (vectorised).

        Every (candidate, row, changed slot) entry with non-zero weight contributes
        ``c · (F[row, new expert] − F[row, old expert])`` to that row's mixture under that candidate.
        """
        old = self.state[slot][selector]
        changed = rows != old  # [G, n]
        tasks = self.slot_tasks[slot]
        # Entries (g, b, i): candidate g changes slot i and row b gives slot i weight for some task.
        active = torch.zeros(self.batch, self.n, dtype=torch.bool, device=self.F.device)
        for t in tasks:
            active |= self.contrib[t][:, selector, :] != 0
        touched = (changed.unsqueeze(1) & active.unsqueeze(0)).any(dim=2)  # [G, B]
        pair_g, pair_b = torch.nonzero(touched, as_tuple=True)
        result = torch.zeros(rows.shape[0], dtype=torch.float64, device=self.F.device)
        for lo in range(0, pair_g.numel(), self.max_rows):
            g, b = pair_g[lo : lo + self.max_rows], pair_b[lo : lo + self.max_rows]
            result.index_add_(0, g, self._pair_loss_change(slot, selector, rows, changed, g, b))
        values = self.fun + result.cpu().numpy() / self.batch
        out[np.asarray(members)] = values

    def _pair_loss_change(
        self, slot: int, selector: int, rows: torch.Tensor, changed: torch.Tensor, g: torch.Tensor, b: torch.Tensor
    ) -> torch.Tensor:
        """Per-example loss change of row ``b[j]`` under candidate ``g[j]``."""
        old = self.state[slot][selector]
        preds: list[torch.Tensor] = []
        with eval_mode(self.model, self._modules):
            for t in range(len(self.gate_outs)):
                if t not in self.slot_tasks[slot]:
                    preds.append(self.task_preds[t].index_select(0, b))
                    continue
                weight = self.contrib[t][:, selector, :].to(self.F.dtype)  # [B, n]
                entry_pair, entry_slot = torch.nonzero(changed.index_select(0, g) & (weight.index_select(0, b) != 0), as_tuple=True)
                rb = b.index_select(0, entry_pair)
                c = weight.reshape(-1).index_select(0, rb * self.n + entry_slot)
                new_e = rows.reshape(-1).index_select(0, g.index_select(0, entry_pair) * self.n + entry_slot)
                old_e = old.index_select(0, entry_slot)
                flat_F = self.F.reshape(-1, self.F.shape[2])  # row-major: (row, expert) -> row * n + expert
                diff = flat_F.index_select(0, rb * self.n + new_e) - flat_F.index_select(0, rb * self.n + old_e)
                mixture = self.mixtures[t].index_select(0, b).index_add(0, entry_pair, c.unsqueeze(1) * diff)
                preds.append(self._head_task(t, mixture))
            value = self.loss_fn(self._assemble(preds), take_rows(self.targets, b))
        new_losses, _ = self._split_loss(value, b.numel())
        return new_losses - self.row_losses.index_select(0, b)

    @torch.no_grad()
    def swap_values(self, slot: int, selector: int) -> torch.Tensor:
        """Exact loss after every swap (a, c) of one permutation row: ``[n, n]`` float64, diagonal = current.

        With a per-example loss this is the structured, incremental scan of :class:`SwapScan`; otherwise
        every swap is evaluated as a candidate.
        """
        n = self.n
        self.nfev += n * (n - 1) // 2
        if self.row_restricted:
            scan = self._swap_scans.get((slot, selector))
            if scan is None:
                scan = self._swap_scans[(slot, selector)] = SwapScan(self, slot, selector)
            return scan.values()
        index = self.state[slot][selector].cpu().numpy()
        pairs = [(a, c) for a in range(n) for c in range(a + 1, n)]
        cands = []
        for a, c in pairs:
            row = index.copy()
            row[a], row[c] = row[c], row[a]
            cands.append(Candidate(slot, selector, tuple(int(v) for v in row), "swap"))
        values = torch.full((n, n), self.fun, dtype=torch.float64)
        for (a, c), v in zip(pairs, self.evaluate(cands)):
            values[a, c] = values[c, a] = v
        return values

    def _rows_loss_change(
        self, rows: torch.Tensor, base: dict[int, torch.Tensor], coeff: dict[int, torch.Tensor], outputs: torch.Tensor
    ) -> torch.Tensor:
        """Per-example loss change when task t's mixture on each row becomes ``base[t] + coeff[t] * outputs``.

        ``outputs`` is ``[R', m, u]`` with ``R' * m == len(rows)`` (``m`` alternatives per base row);
        ``base[t]`` and ``coeff[t]`` broadcast against it (one fused pass). Tasks not in ``coeff`` keep
        their cached predictions.
        """
        preds: list[torch.Tensor] = []
        with eval_mode(self.model, self._modules):
            for t in range(len(self.gate_outs)):
                if t not in coeff:
                    preds.append(self.task_preds[t].index_select(0, rows))
                    continue
                mixture = torch.addcmul(base[t], coeff[t], outputs)
                preds.append(self._head_task(t, mixture.reshape(rows.numel(), -1)))
            value = self.loss_fn(self._assemble(preds), take_rows(self.targets, rows))
        new_losses, _ = self._split_loss(value, rows.numel())
        return new_losses - self.row_losses.index_select(0, rows)

    def _with_row(self, cand: Candidate) -> torch.Tensor:
        index = self.state[cand.slot].clone()
        index[cand.selector] = torch.as_tensor(cand.row, device=index.device)
        return index

    @torch.no_grad()
    def _full_value(self, replace: Mapping[int, torch.Tensor]) -> float:
        state = [replace.get(p, s) for p, s in enumerate(self.state)]
        mixtures = [self._mixture(t, state[self.task_slot[t]]) for t in range(len(self.gate_outs))]
        self.nfev += 1
        with eval_mode(self.model, self._modules):
            if self.nested:
                saved, self.state = self.state, state
                try:
                    return self._nested_loss(mixtures)
                finally:
                    self.state = saved
            preds = [self._head_task(t, m) for t, m in enumerate(mixtures)]
            return self._split_loss(self.loss_fn(self._assemble(preds), self.targets), self.batch)[1]

    def value_of(self, state: Sequence[np.ndarray | torch.Tensor]) -> float:
        """Exact loss of a whole state (one ``[S, n]`` array per slot), computed from scratch."""
        tensors = {p: torch.as_tensor(np.asarray(s), device=self.F.device).reshape(self.state[p].shape) for p, s in enumerate(state)}
        return self._full_value(tensors)

    @torch.no_grad()
    def set_state(self, state: Sequence[np.ndarray | torch.Tensor]) -> float:
        """Move to a whole state and recompute everything exactly; returns the new loss."""
        if len(state) != len(self.state):
            raise ValueError(f"state must hold {len(self.state)} permutation arrays, got {len(state)}")
        self.state = [torch.as_tensor(np.asarray(s), device=self.F.device).reshape(self.state[p].shape).clone() for p, s in enumerate(state)]
        self._refresh()
        return self.fun

    @torch.no_grad()
    def refresh_gates(self) -> float:
        """Recompute the gate outputs (after the gate's parameters were changed) and the loss."""
        with eval_mode(self.model, self._modules):
            outs = self.layer.gate_outputs(self.x, task=self.task, key=self.key)
        self.gate_outs = [_detach_gate_output(g) for g in outs]
        self._swap_scans.clear()  # which rows carry weight may have changed
        self.contrib = [
            _selector_contributions(g, self.slots[self.task_slot[t]].num_selectors) for t, g in enumerate(self.gate_outs)
        ]
        self._refresh()
        return self.fun

    @torch.no_grad()
    def value_with_gate_outputs(self, replace: Mapping[int, GateOutput]) -> float:
        """Exact loss at the current permutations with some tasks' gate outputs replaced."""
        saved = self.gate_outs
        self.gate_outs = [replace.get(t, g) for t, g in enumerate(saved)]
        try:
            return self._full_value({})
        finally:
            self.gate_outs = saved

    def accept(self, cand: Candidate) -> float:
        """Apply a candidate and verify its loss exactly from scratch; returns the verified loss."""
        state = self.current()
        state[cand.slot][cand.selector] = np.asarray(cand.row)
        return self.set_state(state)

    def write_back(self) -> None:
        """Copy the current state into the model's permutation modules."""
        for slot, index in zip(self.slots, self.state):
            slot.set(index)

    # ------------------------------------------------------------- screening
    def mixture_gradients(self) -> list[torch.Tensor]:
        """∂L/∂m_t for each task at the current state (``[B, u]``), for first-order screening."""
        if self.nested:
            raise ValueError("first-order screening needs the MoE layer itself as the model (not a wrapping model)")
        mixtures = [m.detach().clone().requires_grad_(True) for m in self.mixtures]
        with eval_mode(self.model, self._modules), torch.enable_grad():
            preds = [self._head_task(t, m) for t, m in enumerate(mixtures)]
            value = self.loss_fn(self._assemble(preds), self.targets)
            total = value.mean() if value.dim() > 0 else value
            grads = torch.autograd.grad(total, mixtures, allow_unused=True)
        return [torch.zeros_like(m) if g is None else g for m, g in zip(mixtures, grads)]

    @torch.no_grad()
    def swap_screen(self, slot: int, selector: int, grads: list[torch.Tensor]) -> torch.Tensor:
        """First-order estimate ⟨∂L/∂m, Δm⟩ of every swap (a, b) of one selector: ``[n, n]`` matrix."""
        index = self.state[slot][selector]
        total = torch.zeros(self.n, self.n, dtype=torch.float64, device=self.F.device)
        for t in self.slot_tasks[slot]:
            H = torch.einsum("bu,bnu->bn", grads[t].to(self.F.dtype), self.F)  # ⟨g, f_e⟩ per row and expert
            H_slot = H.index_select(1, index)
            C = self.contrib[t][:, selector, :].to(self.F.dtype)
            M = (C.t() @ H_slot).to(torch.float64)  # M[a, b] = Σ_rows c_a ⟨g, f_π(b)⟩
            diag = torch.diagonal(M)
            total += M + M.t() - diag.unsqueeze(1) - diag.unsqueeze(0)
        return total  # the gradient of the mean loss already carries the 1/B


def _detach_gate_output(g: GateOutput) -> GateOutput:
    return GateOutput(
        weights=g.weights.detach(),
        loss=g.loss.detach(),
        selector_weights=None if g.selector_weights is None else g.selector_weights.detach(),
        selector_mix=None if g.selector_mix is None else g.selector_mix.detach(),
    )
