"""Exact evaluation of permutation candidates without re-running the experts.

:class:`RoutingObjective` computes the expert outputs ``F = [f_1(x) … f_n(x)]`` and the gate outputs once
on the evaluation data. A candidate changes the permutation of one (permutation module, selector);
only the gate slots whose expert changes matter, and only on the rows where those slots carry weight:

    Δm_b = Σ_{i changed} c_bi · (F_b,new(i) − F_b,old(i))

(for a swap of slots a, b this is the closed form ``(c_a − c_b)(F_{π(b)} − F_{π(a)})``). The task heads
(towers) and the user's per-example loss are then evaluated on those rows only, and the loss change is
added to the cached total. Everything downstream of the mixture is the user's.

Under a process group (``process_group=``, default the world group when ``torch.distributed`` is
initialised) every rank holds its own shard of the data. The objective is the mean loss over the union
of the shards: each rank computes sums of per-example losses (or of their changes) on its rows, and these
sums are all-reduced before any value is used, so every rank sees the same numbers and makes the same
decisions. See :class:`RoutingObjective` for what is reduced when.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .._validation import check_int, check_permutation
from ..batches import as_batch, call_model, eval_mode, num_rows, take_rows, to_device, unwrap_prediction
from ..distributed import RankFailedError, agree_and_gather, all_gather_objects, all_reduce_sum, rank, resolve_group
from ..gates.protocol import GateOutput
from ..layers.moe import MoE, MoEOutput
from ..layers.multigate import MultiGateMoE, MultiGateOutput
from ..layers.permutation import Permutation, apply_permutation
from .swap_scan import SwapScan

__all__ = ["RoutingObjective", "Candidate", "LossFn", "find_routing_layer", "DistributedSearchError"]

LossFn = Callable[[Any, Any], torch.Tensor]


@dataclass(frozen=True)
class Candidate:
    """A new permutation row for selector ``selector`` of permutation module ``slot``."""

    slot: int
    selector: int
    row: tuple[int, ...]
    kind: str = "move"


class DistributedSearchError(RankFailedError):
    """Another rank of the process group failed while preparing the search (its error is in the message)."""


# The message of DistributedSearchError, for routing_search.distributed.agree_and_gather.
PREPARATION_FAILED = "{what} was not started because another rank failed while preparing it ({detail})"


# The search's cache holds one mixture per row ([B, n, u] expert outputs): token-shaped layer input is refused.
TOKENS_REFUSED = (
    "the permutation search evaluates an MoE layer called on rows [batch, features], but its input has the "
    "token shape {shape}; {how}: inputs x.reshape(-1, d) (task / key repeated per token), targets one row per "
    "token, and a per-token loss (with the same number of tokens per example, the mean over the token rows is "
    "the mean over the examples of their per-token mean)"
)


def _is_routing_layer(module: nn.Module) -> bool:
    return isinstance(module, (MoE, MultiGateMoE))


RoutingLayer = MoE | MultiGateMoE


def find_routing_layer(model: nn.Module, layer: nn.Module | str | None = None) -> tuple[RoutingLayer, bool]:
    """Locate the MoE layer to search. Returns ``(layer, nested)``; nested means the model wraps it."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (an MoE, a MultiGateMoE or a model containing one), got {type(model).__name__}")
    chosen: nn.Module | None
    if isinstance(layer, str):
        named = dict(model.named_modules())
        if layer not in named or not _is_routing_layer(named[layer]):
            options = [name for name, m in model.named_modules() if _is_routing_layer(m)]
            raise ValueError(f"layer={layer!r} is not an MoE layer of the model; MoE layers: {options}")
        chosen = named[layer]
    else:
        chosen = layer
    if chosen is not None:
        if not isinstance(chosen, (MoE, MultiGateMoE)):
            raise TypeError("layer must be an MoE or MultiGateMoE module of the model")
        if chosen is not model and all(m is not chosen for m in model.modules()):
            raise ValueError("layer is not a submodule of model")
        return chosen, chosen is not model
    if isinstance(model, (MoE, MultiGateMoE)):
        return model, False
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, (MoE, MultiGateMoE))]
    if not found:
        raise ValueError("model contains no MoE or MultiGateMoE layer to search")
    if len(found) > 1:
        raise ValueError(f"model contains several MoE layers {[n for n, _ in found]}; choose one with layer=")
    return found[0][1], True


def _selector_contributions(gate_output: GateOutput, num_rows: int) -> torch.Tensor:
    """``[B, S, n]`` weight each (selector, slot) sends to its expert; S = 1 for one permutation row."""
    if num_rows == 1:
        return gate_output.weights.unsqueeze(1)
    assert gate_output.selector_mix is not None and gate_output.selector_weights is not None  # checked by the layer
    return gate_output.selector_mix.unsqueeze(2) * gate_output.selector_weights


class RoutingObjective:
    """The evaluation loss as a function of an MoE layer's permutation(s), experts and gates cached.

    Args:
        model: an ``MoE``, a ``MultiGateMoE``, or any module containing one (then ``layer`` picks it
            when there are several). The model is evaluated in eval mode; its modes are restored. A
            wrapping model must call the layer exactly once per forward. A ``DistributedDataParallel``
            is unwrapped (its ``.module`` is evaluated, without DDP's own collectives).
        data: ``(inputs, targets)`` or an iterable of such pairs. ``inputs`` is the model's input
            tensor, or a dict of its keyword arguments (e.g. ``{'x': x, 'task': t, 'key': k}``, or any
            names a wrapping model takes).
        loss: ``loss(prediction, targets)``; ``prediction`` is what the model returns (an MoE's
            ``.output``, a multi-gate MoE's list ``.outputs``). Return per-example losses ``[B]`` to get
            row-restricted (fast) candidate evaluation; a scalar is accepted (single process only) and
            evaluated in full.
        max_rows: cap on the rows evaluated at once when scanning candidates (bounds the memory of
            every chunk; 16K rows keeps the intermediates in cache on a CPU).
        process_group: ``None`` (default): the world group when ``torch.distributed`` is initialised,
            else a single process; ``False``: this process alone; or a ``ProcessGroup``. With a group,
            ``data`` is this rank's shard (it may be empty), and every value is the mean loss over the
            union of the shards.

    Memory: the cache holds every expert's output on every row, ``B · n · u`` values (plus the gate
    outputs); evaluating candidates adds at most ``max_rows`` rows at a time. Bound ``B`` by the size of
    the evaluation data (``fit`` searches at most 2048 held-out rows by default).

    Communication under a process group: at construction one ``all_gather_object`` (row counts, the
    starting permutations and any error, so that a failure on one rank is raised on every rank); then
    one float64 all-reduce per value that the search reads: a scalar per exact evaluation of a state,
    one vector per :meth:`evaluate` call (one entry per candidate), one ``[n, n]`` table per
    :meth:`swap_values` or :meth:`swap_screen` call. Every rank must make the same calls in the same
    order (``local_search`` does).

    Attributes:
        fun: the current loss (the mean over all rows of all ranks for a per-example loss).
        fun0: the loss at construction.
        nfev: evaluations so far (identical on every rank).
        batch: this rank's number of rows; ``total_rows``: the rows of all ranks together.
        all_reduce_calls, all_reduce_values: the all-reduces made so far and the float64 values they
            carried (counted in a single process too: what a process group would exchange).
    """

    def __init__(
        self,
        model: nn.Module,
        data: Any,
        loss: LossFn,
        *,
        layer: nn.Module | str | None = None,
        max_rows: int = 1 << 14,
        process_group: Any = None,
    ) -> None:
        if not callable(loss):
            raise TypeError(f"loss must be a callable loss(prediction, targets), got {type(loss).__name__}")
        self.group = resolve_group(process_group)
        if isinstance(model, DistributedDataParallel):
            model = model.module  # evaluate the wrapped model itself: DDP's forward would add collectives
        self.model = model
        self.loss_fn = loss
        self.nfev = 0
        self.all_reduce_calls = 0
        self.all_reduce_values = 0
        self._swap_scans: dict[tuple[int, int], SwapScan] = {}
        error: BaseException | None = None
        piece = 0.0
        try:
            self.layer, self.nested = find_routing_layer(model, layer)
            self._modules = list(model.modules())
            self.max_rows = check_int("max_rows", max_rows, minimum=1)
            self.inputs, self.targets = as_batch(data)
            self.batch = num_rows((self.inputs, self.targets))
            if self.group is None and self.batch == 0:
                raise ValueError("data holds 0 rows; pass at least one (inputs, targets) row to evaluate the routing on")
            self._build_cache()
            piece = self._refresh_local()
        except Exception as exc:  # reported to every rank below, then re-raised here
            if self.group is None:
                raise
            error = exc
        self._agree(error)
        self.fun = self._total(piece)
        self.fun0 = self.fun

    # ----------------------------------------------------------------- cache
    @torch.no_grad()
    def _build_cache(self) -> None:
        layer = self.layer
        with eval_mode(self.model, self._modules):
            if self.nested:
                x, task, key = self._capture_layer_call()
            else:
                if isinstance(self.inputs, Mapping):
                    unknown = set(self.inputs) - {"x", "task", "key"}
                    if unknown or "x" not in self.inputs:
                        raise ValueError(f"inputs for an MoE layer are a tensor or a dict with keys 'x' and optionally 'task', 'key'; got keys {sorted(self.inputs)}")
                    x, task, key = self.inputs["x"], self.inputs.get("task"), self.inputs.get("key")
                else:
                    x, task, key = self.inputs, None, None
            if isinstance(x, torch.Tensor) and x.dim() > 2:
                raise ValueError(TOKENS_REFUSED.format(shape=list(x.shape), how=(
                    "the model calls the MoE layer with it; search the layer itself on token rows"
                    if self.nested else "pass the tokens as rows"
                )))
            self.x, self.task, self.key = x, task, key
            self.gate_outs = [_detach_gate_output(g) for g in layer.gate_outputs(x, task=task, key=key)]
            outputs = layer.expert_outputs(x)
        self.out_shape = tuple(outputs.shape[2:])
        self.F = outputs.reshape(outputs.shape[0], outputs.shape[1], int(np.prod(self.out_shape, dtype=np.int64)))  # [B, n, u]
        self.n = self.F.shape[1]
        self.slots: list[Permutation] = list(layer.permutations)
        self.task_slot = [self._slot_of_task(t) for t in range(layer.num_tasks)]
        self.slot_tasks = [[t for t, s in enumerate(self.task_slot) if s == p] for p in range(len(self.slots))]
        self.contrib = [
            _selector_contributions(g, self.slots[self.task_slot[t]].num_selectors) for t, g in enumerate(self.gate_outs)
        ]
        self.state = [slot.index.detach().clone().to(self.F.device) for slot in self.slots]
        self.per_example: bool | None = None  # decided by the first evaluation of the loss
        self.row_losses: torch.Tensor | None = None
        self.task_preds: list[torch.Tensor] | None = None
        self._mixture_weights: list[torch.Tensor] | None = None  # the expert-space weights of ``mixtures``

    def _capture_layer_call(self) -> tuple[Any, Any, Any]:
        """Run the wrapping model once and record the arguments of its (single) call of the layer."""
        calls: list[inspect.BoundArguments] = []
        signature = inspect.signature(type(self.layer).forward)  # the layer's own names, whatever wraps forward

        def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls.append(signature.bind(module, *args, **kwargs))

        handle = self.layer.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            call_model(self.model, self.inputs)
        finally:
            handle.remove()
        if not calls:
            raise ValueError("the model's forward did not call the chosen MoE layer")
        if len(calls) > 1:
            raise ValueError(
                f"the model calls the chosen MoE layer {len(calls)} times in one forward; the search evaluates a "
                "permutation through a single call of the layer and would optimise a wrong objective. Search a "
                "model that calls the layer once (e.g. one layer per call site, chosen with layer=)"
            )
        bound = calls[0]
        bound.apply_defaults()
        arguments = bound.arguments
        return arguments["x"], arguments.get("task"), arguments.get("key")

    def _agree(self, error: BaseException | None) -> None:
        """Under a process group: exchange row counts, starting permutations and errors; raise on all ranks."""
        if self.group is None:
            self.total_rows = self.batch
            return
        payload = None if error is not None else (self.batch, self.per_example, [s.cpu().tolist() for s in self.state])
        reports = agree_and_gather(
            error, self.group, "the search", payload, error_type=DistributedSearchError, message=PREPARATION_FAILED
        )
        self.total_rows = sum(rep[0] for rep in reports)
        if self.total_rows == 0:
            raise ValueError("data holds 0 rows on every rank of the process group; pass at least one (inputs, targets) row")
        kinds = {rep[1] for rep in reports if rep[0] > 0}
        if kinds != {True}:
            raise ValueError(
                "under a process group the loss must return per-example losses [B] (a scalar cannot be combined "
                "across shards exactly); use reduction='none'"
            )
        self.per_example = True
        if self.batch == 0 and not self.nested:
            self.row_losses = torch.zeros(0, dtype=torch.float64, device=self.F.device)
        states = [rep[2] for rep in reports]
        if any(s != states[0] for s in states[1:]):
            raise ValueError(
                "the ranks hold different permutations at the start of the search; give every rank the same model "
                "(e.g. broadcast rank 0's state, as DistributedDataParallel does at construction)"
            )

    def _slot_of_task(self, task: int) -> int:
        if isinstance(self.layer, MultiGateMoE):
            perm = self.layer.permutation_for(task)
            return next(p for p, slot in enumerate(self.layer.permutations) if slot is perm)
        return 0

    # ------------------------------------------------------------ reductions
    def _count(self, values: int) -> None:
        """Account one all-reduce of ``values`` float64 numbers (counted in a single process too)."""
        self.all_reduce_calls += 1
        self.all_reduce_values += int(values)

    def _total(self, pieces: float | np.ndarray | torch.Tensor) -> Any:
        """The objective from local pieces (sums of per-example losses, or scalar losses); reduced over ranks.

        Returns a float for a float, an array for an array. Collective under a process group.
        """
        scalar = isinstance(pieces, float)
        t = torch.as_tensor(np.atleast_1d(np.asarray(pieces, dtype=np.float64)) if not isinstance(pieces, torch.Tensor) else pieces, dtype=torch.float64)
        self._count(t.numel())
        if self.group is not None:
            t = all_reduce_sum(t.to(self.F.device if hasattr(self, "F") else "cpu").clone(), self.group).cpu() / self.total_rows
        elif self.per_example:
            t = t / self.batch
        out = t.numpy()
        return float(out[0]) if scalar else out

    def _changes(self, local: torch.Tensor) -> torch.Tensor:
        """``fun`` + (sum over ranks of local loss-change sums) / rows, for a tensor of any shape (collective)."""
        local = local.to(torch.float64)
        self._count(local.numel())
        if self.group is not None:
            local = all_reduce_sum(local.clone(), self.group)
        return self.fun + local / self.total_rows

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks of the process group (a copy; itself for a single process)."""
        self._count(tensor.numel())
        return tensor if self.group is None else all_reduce_sum(tensor.clone(), self.group)

    def any_rank(self, flag: bool) -> bool:
        """True when ``flag`` is True on at least one rank (collective; ``flag`` itself for a single process)."""
        if self.group is None:
            return bool(flag)
        return bool(self.reduce_sum(torch.tensor([1.0 if flag else 0.0], device=self.F.device)).item() > 0)

    @property
    def process_group(self) -> Any:
        """The process group the objective reduces over (``None``: a single process)."""
        return self.group

    @property
    def rank(self) -> int:
        """This process's rank in the group (0 for a single process)."""
        return rank(self.group)

    # ------------------------------------------------------------- evaluation
    @torch.no_grad()
    def _refresh(self) -> None:
        """Recompute mixtures, predictions, per-example losses and the total from the current state."""
        self.fun = self._total(self._refresh_local())

    @torch.no_grad()
    def _refresh_local(self) -> float:
        """Local part of :meth:`_refresh`: this rank's loss piece (sum of row losses, or the scalar loss)."""
        old_mixtures, old_losses = getattr(self, "mixtures", None), self.row_losses
        self.mixtures = self._current_mixtures(old_mixtures)
        self.nfev += 1
        with eval_mode(self.model, self._modules):
            if self.nested:
                self.task_preds = None
                piece = self._nested_piece(self.mixtures, self.state)
            else:
                self.task_preds = [self._head_task(t, m) for t, m in enumerate(self.mixtures)]
                if self.batch == 0:
                    self.row_losses = torch.zeros(0, dtype=torch.float64, device=self.F.device) if self.per_example else None
                    return 0.0
                value = self.loss_fn(self._assemble(self.task_preds), self.targets)
                self.row_losses, piece = self._split_loss(value, self.batch)
        if self._swap_scans and old_mixtures is not None and old_losses is not None and self.row_losses is not None:
            changed = self.row_losses != old_losses
            for new, old in zip(self.mixtures, old_mixtures):
                changed |= _rows_differ(new, old)
            for scan in self._swap_scans.values():
                scan.mark_dirty(changed)
        return piece

    def _split_loss(self, value: Any, rows: int) -> tuple[torch.Tensor | None, float]:
        """``(per-example losses or None, local piece)``; fixes whether the loss is per-example at first use."""
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"loss must return a tensor, got {type(value).__name__}")
        if value.dim() == 0:
            per_example = False
        elif value.shape == (rows,):
            per_example = True
        else:
            raise ValueError(f"loss must return per-example losses of shape [{rows}] or a scalar, got {tuple(value.shape)}")
        if self.per_example is None:
            self.per_example = per_example
        elif self.per_example != per_example:
            raise ValueError("loss returned per-example losses for some calls and a scalar for others; return one kind")
        if not per_example:
            return None, float(value)
        losses = value.detach().to(torch.float64)
        return losses, float(losses.sum())

    def _current_mixtures(self, old: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """Every task's mixture at the current state: :meth:`_mixture`, recomputed on the rows whose weights changed.

        A move changes the weights of the rows where its slots carry weight (a quarter of the rows for a
        swap of TopK(2) over 16 experts); the other rows keep their mixture, which is the same einsum of the
        same numbers: on the CPU a row's result does not depend on the other rows (the batched matrix
        product treats each row alone), so every mixture is bitwise the one a full recomputation gives.
        On other devices, and after the gate outputs changed, everything is recomputed.
        """
        weights = [apply_permutation(g, self.state[self.task_slot[t]]).to(self.F.dtype) for t, g in enumerate(self.gate_outs)]
        previous, self._mixture_weights = self._mixture_weights, weights
        out = []
        for t, w in enumerate(weights):
            if old is None or previous is None or self.F.device.type != "cpu" or previous[t].shape != w.shape:
                out.append(torch.einsum("bn,bnu->bu", w, self.F))
                continue
            rows = torch.nonzero(_rows_differ(w, previous[t])).flatten()
            if rows.numel() == 0:
                out.append(old[t])
            elif rows.numel() == w.shape[0]:
                out.append(torch.einsum("bn,bnu->bu", w, self.F))
            else:
                part = torch.einsum("bn,bnu->bu", w.index_select(0, rows), self.F.index_select(0, rows))
                out.append(old[t].index_copy(0, rows, part))
        return out

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

    def _nested_piece(self, mixtures: list[torch.Tensor], state: Sequence[torch.Tensor]) -> float:
        """This rank's loss piece of the wrapping model with the layer's output replaced by ``mixtures``."""
        if self.batch == 0:
            return 0.0
        value = self.loss_fn(self._nested_prediction(mixtures, state), self.targets)
        return self._split_loss(value, self.batch)[1]

    def _nested_prediction(self, mixtures: list[torch.Tensor], state: Sequence[torch.Tensor]) -> Any:
        """Run the wrapping model with the layer's output replaced by the given mixtures (a forward hook).

        The hook runs before any hook the user registered on the layer, so those see the replaced output
        as they would see the layer's own; nothing on the layer instance is replaced.
        """
        layer = self.layer
        shaped = [m.reshape((m.shape[0],) + self.out_shape) for m in mixtures]
        weights = [apply_permutation(g, state[self.task_slot[t]]) for t, g in enumerate(self.gate_outs)]
        loss0 = torch.stack([g.loss for g in self.gate_outs]).sum()
        if isinstance(layer, MultiGateMoE):
            replaced: Any = MultiGateOutput(layer.head(shaped), loss0, weights, self.gate_outs)
        else:
            replaced = MoEOutput(shaped[0], loss0, weights[0], self.gate_outs[0])
        calls = [0]

        def replace(module: nn.Module, args: tuple, output: Any) -> Any:
            calls[0] += 1
            return replaced

        handle = layer.register_forward_hook(replace, prepend=True)
        try:
            prediction = unwrap_prediction(call_model(self.model, self.inputs))
        finally:
            handle.remove()
        if calls[0] != 1:
            raise ValueError(f"the model called the chosen MoE layer {calls[0]} times in one forward; the search needs exactly one call")
        return prediction

    @torch.no_grad()
    def predictions(self) -> tuple[Any, Any]:
        """``(predictions, targets)`` of the current state on all evaluation rows (collective).

        ``predictions`` is what the loss receives: the cached per-task predictions for an MoE layer
        itself, one run of the wrapping model (with the layer's output replaced) for a nested layer.
        Under a process group every rank's rows are gathered (``all_gather_object``, on the CPU, in rank
        order) and every rank gets the same whole data.
        """
        if self.batch == 0:
            local: Any = None
        elif self.nested:
            with eval_mode(self.model, self._modules):
                local = self._nested_prediction(self.mixtures, self.state)
        else:
            assert self.task_preds is not None
            local = self._assemble(self.task_preds)
        if self.group is None:
            return local, self.targets
        pieces = all_gather_objects(None if local is None else (to_device(local, "cpu"), to_device(self.targets, "cpu")), self.group)
        return as_batch([p for p in pieces if p is not None])

    # ------------------------------------------------------------- candidates
    @property
    def row_restricted(self) -> bool:
        """True when candidates are evaluated on the changed rows only (per-example loss, direct layer)."""
        return bool(self.per_example) and not self.nested

    def current(self) -> list[np.ndarray]:
        """The current permutation of every slot, ``[S, n]`` int64 arrays."""
        return [s.cpu().numpy().copy() for s in self.state]

    @torch.no_grad()
    def evaluate(self, candidates: Sequence[Candidate]) -> np.ndarray:
        """Exact evaluation loss of each candidate applied alone to the current state (collective)."""
        if not self.row_restricted:
            pieces = np.array([self._full_piece({cand.slot: self._with_row(cand)}) for cand in candidates], dtype=np.float64)
            return self._total(pieces)
        local = torch.zeros(len(candidates), dtype=torch.float64, device=self.F.device)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, cand in enumerate(candidates):
            check_permutation(cand.row, self.n, name="candidate row")  # as _with_row does on the other path
            groups.setdefault((cand.slot, cand.selector), []).append(i)
        for (slot, selector), members in groups.items():
            rows = torch.as_tensor([candidates[i].row for i in members], device=self.F.device)
            # Bound the [candidates, changed slots, batch] mask built per chunk.
            per_chunk = max(1, (1 << 24) // max(1, self.batch * self.n))
            for start in range(0, len(members), per_chunk):
                chunk = members[start : start + per_chunk]
                index = torch.as_tensor(chunk, device=self.F.device)
                local.index_copy_(0, index, self._group_changes(slot, selector, rows[start : start + per_chunk]))
                self.nfev += len(chunk)
        return self._changes(local).cpu().numpy()

    def _group_changes(self, slot: int, selector: int, rows: torch.Tensor) -> torch.Tensor:
        """This rank's summed loss change of candidates that all change selector ``selector`` of module ``slot``.

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
        return result

    def _pair_loss_change(
        self, slot: int, selector: int, rows: torch.Tensor, changed: torch.Tensor, g: torch.Tensor, b: torch.Tensor
    ) -> torch.Tensor:
        """Per-example loss change of row ``b[j]`` under candidate ``g[j]``."""
        old = self.state[slot][selector]
        preds: list[torch.Tensor] = []
        assert self.task_preds is not None and self.row_losses is not None  # row-restricted evaluation
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
        assert new_losses is not None
        return new_losses - self.row_losses.index_select(0, b)

    @torch.no_grad()
    def swap_values(self, slot: int, selector: int) -> torch.Tensor:
        """Exact loss after every swap (a, c) of one permutation row: ``[n, n]`` float64, diagonal = current.

        With a per-example loss this is the structured, incremental scan of :class:`SwapScan` (one
        ``[n, n]`` all-reduce under a process group); otherwise every swap is evaluated as a candidate.
        """
        n = self.n
        if self.row_restricted:
            self.nfev += n * (n - 1) // 2
            scan = self._swap_scans.get((slot, selector))
            if scan is None:
                scan = self._swap_scans[(slot, selector)] = SwapScan(self, slot, selector)
            values = self._changes(scan.local_changes()).cpu()
            values.fill_diagonal_(self.fun)
            return values
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

    def reset_swap_scans(self) -> None:
        """Drop the cached swap-scan terms (the next :meth:`swap_values` scores every row again)."""
        self._swap_scans.clear()

    def rows_loss_change(
        self, rows: torch.Tensor, base: dict[int, torch.Tensor], coeff: dict[int, torch.Tensor], outputs: torch.Tensor
    ) -> torch.Tensor:
        """Per-example loss change when task t's mixture on each row becomes ``base[t] + coeff[t] * outputs``.

        ``outputs`` is ``[R', m, u]`` with ``R' * m == len(rows)`` (``m`` alternatives per base row);
        ``base[t]`` and ``coeff[t]`` broadcast against it (one fused pass). Any shapes whose broadcast holds
        ``len(rows)`` mixtures of ``u`` values, in the order of ``rows``, will do (e.g. ``[R, k, 1, u]``,
        ``[R, k, 1, 1]`` and ``[R, 1, m, u]``: ``k`` bases sharing each ``outputs`` row). Tasks not in
        ``coeff`` keep their cached predictions. Local to this rank (no communication); needs a per-example
        loss.
        """
        if not self.row_restricted:
            raise ValueError("rows_loss_change needs a per-example loss and the MoE layer itself as the model")
        assert self.task_preds is not None and self.row_losses is not None
        if rows.numel() == 0:
            return torch.zeros(0, dtype=torch.float64, device=self.F.device)
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
        assert new_losses is not None
        return new_losses - self.row_losses.index_select(0, rows)

    def _with_row(self, cand: Candidate) -> torch.Tensor:
        index = self.state[cand.slot].clone()
        index[cand.selector] = torch.as_tensor(check_permutation(cand.row, self.n, name="candidate row"), device=index.device)
        return index

    @torch.no_grad()
    def _full_piece(self, replace: Mapping[int, torch.Tensor]) -> float:
        """This rank's loss piece at the current state with some modules' permutations replaced."""
        state = [replace.get(p, s) for p, s in enumerate(self.state)]
        mixtures = [self._mixture(t, state[self.task_slot[t]]) for t in range(len(self.gate_outs))]
        self.nfev += 1
        with eval_mode(self.model, self._modules):
            if self.nested:
                return self._nested_piece(mixtures, state)
            if self.batch == 0:
                return 0.0
            preds = [self._head_task(t, m) for t, m in enumerate(mixtures)]
            return self._split_loss(self.loss_fn(self._assemble(preds), self.targets), self.batch)[1]

    def _full_value(self, replace: Mapping[int, torch.Tensor]) -> float:
        return self._total(self._full_piece(replace))

    def _checked_state(self, state: Sequence[np.ndarray | torch.Tensor], name: str) -> list[torch.Tensor]:
        """``state`` as tensors shaped like the current one, every row checked to be a permutation."""
        if isinstance(state, (np.ndarray, torch.Tensor)) or len(state) != len(self.state):
            raise ValueError(f"{name} must be a list of {len(self.state)} permutation arrays (one [S, n] array per module)")
        out = []
        for p, s in enumerate(state):
            arr = s.detach().cpu().numpy() if isinstance(s, torch.Tensor) else np.asarray(s)
            shape = tuple(self.state[p].shape)
            # The exact shape (a single row [n] for a one-row module): reshaping any array of S·n values read
            # a transposed [n, S] state as other permutations without a word.
            if arr.shape != shape and not (shape[0] == 1 and arr.shape == shape[1:]):
                raise ValueError(f"{name}[{p}] must have shape {list(shape)}, got {list(arr.shape)}")
            arr = arr.reshape(shape)
            rows = [check_permutation(row, self.n, name=f"{name}[{p}] row {r}") for r, row in enumerate(arr)]
            out.append(torch.as_tensor(np.stack(rows), device=self.F.device))
        return out

    def value_of(self, state: Sequence[np.ndarray | torch.Tensor]) -> float:
        """Exact loss of a whole state (one ``[S, n]`` array per slot), computed from scratch (collective)."""
        return self._full_value(dict(enumerate(self._checked_state(state, "state"))))

    @torch.no_grad()
    def set_state(self, state: Sequence[np.ndarray | torch.Tensor]) -> float:
        """Move to a whole state and recompute everything exactly; returns the new loss (collective)."""
        self.state = self._checked_state(state, "state")
        self._refresh()
        return self.fun

    @torch.no_grad()
    def refresh_gates(self) -> float:
        """Recompute the gate outputs (after the gate's parameters were changed) and the loss (collective)."""
        with eval_mode(self.model, self._modules):
            outs = self.layer.gate_outputs(self.x, task=self.task, key=self.key)
        self.gate_outs = [_detach_gate_output(g) for g in outs]
        self._swap_scans.clear()  # which rows carry weight may have changed
        self._mixture_weights = None  # every mixture is recomputed
        self.contrib = [
            _selector_contributions(g, self.slots[self.task_slot[t]].num_selectors) for t, g in enumerate(self.gate_outs)
        ]
        self._refresh()
        return self.fun

    @torch.no_grad()
    def value_with_gate_outputs(self, replace: Mapping[int, GateOutput]) -> float:
        """Exact loss at the current permutations with some tasks' gate outputs replaced (collective)."""
        saved = self.gate_outs
        self.gate_outs = [replace.get(t, g) for t, g in enumerate(saved)]
        try:
            piece = self._full_piece({})
        finally:
            self.gate_outs = saved
        return self._total(piece)

    @torch.no_grad()
    def accept(self, cand: Candidate) -> float:
        """Apply a candidate and verify its loss exactly from scratch; returns the verified loss (collective)."""
        slot = range(len(self.state))[cand.slot]  # an IndexError for a slot the layer does not have
        index = self._with_row(cand)  # only the candidate's row changes: only it is checked
        self.state = [index if p == slot else s for p, s in enumerate(self.state)]
        self._refresh()
        return self.fun

    def write_back(self) -> None:
        """Copy the current state into the model's permutation modules."""
        for slot, index in zip(self.slots, self.state):
            slot.set(index)

    # ------------------------------------------------------------- screening
    def mixture_gradients(self) -> list[torch.Tensor]:
        """∂L/∂m_t for each task at the current state (``[B, u]``, this rank's rows), for first-order screening.

        ``L`` is the objective (the mean over all ranks' rows), so the per-rank screens add up.
        """
        if self.nested:
            raise ValueError("first-order screening needs the MoE layer itself as the model (not a wrapping model)")
        mixtures = [m.detach().clone().requires_grad_(True) for m in self.mixtures]
        if self.batch == 0:
            return [torch.zeros_like(m) for m in mixtures]
        with eval_mode(self.model, self._modules), torch.enable_grad():
            preds = [self._head_task(t, m) for t, m in enumerate(mixtures)]
            value = self.loss_fn(self._assemble(preds), self.targets)
            total = value.sum() / self.total_rows if value.dim() > 0 else value
            grads = torch.autograd.grad(total, mixtures, allow_unused=True)
        return [torch.zeros_like(m) if g is None else g for m, g in zip(mixtures, grads)]

    @torch.no_grad()
    def swap_screen(self, slot: int, selector: int, grads: list[torch.Tensor]) -> torch.Tensor:
        """First-order estimate ⟨∂L/∂m, Δm⟩ of every swap (a, b) of one selector: ``[n, n]`` (collective)."""
        index = self.state[slot][selector]
        total = torch.zeros(self.n, self.n, dtype=torch.float64, device=self.F.device)
        for t in self.slot_tasks[slot]:
            H = torch.einsum("bu,bnu->bn", grads[t].to(self.F.dtype), self.F)  # ⟨g, f_e⟩ per row and expert
            H_slot = H.index_select(1, index)
            C = self.contrib[t][:, selector, :].to(self.F.dtype)
            M = (C.t() @ H_slot).to(torch.float64)  # M[a, b] = Σ_rows c_a ⟨g, f_π(b)⟩
            diag = torch.diagonal(M)
            total += M + M.t() - diag.unsqueeze(1) - diag.unsqueeze(0)
        return self.reduce_sum(total)  # the gradient of the mean loss already carries the 1/rows


def _rows_differ(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``(new != old).any(dim=1)`` for ``[B, u]`` tensors: bool ``[B]``, True where a row differs anywhere.

    With ``u`` a multiple of 8 the booleans are read eight at a time as int64 words (each byte is 0 or 1,
    so a word is non-zero exactly when one of its bytes is): the same answer, several times faster than
    the boolean reduction, and it runs at every accepted move.
    """
    ne = new != old
    if ne.dim() == 2 and ne.shape[1] > 0 and ne.shape[1] % 8 == 0 and ne.is_contiguous():
        return ne.view(torch.int64).amax(dim=1) != 0
    return ne.any(dim=1)


def _detach_gate_output(g: GateOutput) -> GateOutput:
    return GateOutput(
        weights=g.weights.detach(),
        loss=g.loss.detach(),
        selector_weights=None if g.selector_weights is None else g.selector_weights.detach(),
        selector_mix=None if g.selector_mix is None else g.selector_mix.detach(),
    )
