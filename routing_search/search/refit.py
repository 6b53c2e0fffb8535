"""Refit-aware permutation search: score a move after re-fitting the experts it touches.

The frozen-expert objective (:class:`~routing_search.search.RoutingObjective`) judges a move with the
experts as they are. From a collapsed start that is blind: experts that never received weight are
untrained, every move onto them looks equally bad, and the search cannot tell which one to wake.

Here a move is a *compound* move: change one permutation row, then re-optimise, in closed form, the
last linear layer of every expert whose expert-space weights the move changed (ridge least squares
on the rows the new routing sends it, with the other experts held fixed). The move's score is the
user's loss on separate *held-out* rows with the re-fitted layers — exact, because only the last
layer changed and its input features are cached. A move is accepted only when it beats both the
current state and "re-fit the same experts without moving" by more than ``tol`` on the held-out
rows, so the routing change itself has to pay; the accepted permutation and the re-fitted layers
are written into the model.

Scope: the layer is an ``MoE`` or ``MultiGateMoE`` called directly (not wrapped), every expert's
output is its last ``nn.Linear`` (e.g. :class:`~routing_search.MLP`), the towers are identities,
and each task's target lives in the mixture's space. The closed form is the least-squares fit; the
score is whatever per-example loss the user passes (exactly right for squared loss).

Under a process group (``process_group=``, as for :func:`~routing_search.local_search`) every rank holds
its own shard of the fit rows and of the score rows: the ridge normal equations (``XᵀX``, ``XᵀR``) and
the held-out loss sums are sums over rows, so they are all-reduced in float64 and every rank solves the
same system, scores the same values and accepts the same moves (the accepted layers are broadcast from
rank 0, so the written weights are bit-identical). Per iteration of the search this costs two
all-reduces (one of the normal equations of all candidates, one of their scores), in chunks of at most
:data:`MAX_REDUCE_VALUES` numbers.

``guard=`` (as for :func:`~routing_search.local_search`): a move the held-out loss accepts is kept only
if every guard, computed on all score rows with the move's predictions after the write, is no worse than
at the start of the search (or ``guard_start``) by more than its tolerance; otherwise the next-best
move is tried.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from scipy.optimize import OptimizeResult
from torch import nn

import hashlib
import math

from .._validation import check_int, check_no_unknown_options, check_positive_float, warn_non_finite_start
from ..batches import as_batch, eval_mode, to_device
from ..distributed import agree_and_gather, all_gather_objects, all_reduce_sum, broadcast_tensor_, resolve_group
from ..gates.protocol import GateOutput
from ..layers.multigate import MultiGateMoE
from ..layers.permutation import apply_permutation
from ..result import STATUS_BUDGET, STATUS_CONVERGED, STATUS_NONFINITE, make_result
from .guards import check_guard_start, check_guards, evaluate_guards, guard_report, guards_violated
from .objective import PREPARATION_FAILED, TOKENS_REFUSED, DistributedSearchError, LossFn, find_routing_layer

__all__ = ["RefitObjective", "RefitMove", "RefitOptions", "refit_search", "last_linear_layers", "MAX_REDUCE_VALUES"]

#: Most float64 numbers in one all-reduce of the refit search (larger batches of candidates are split).
MAX_REDUCE_VALUES = 1 << 22


@dataclass(frozen=True)
class RefitOptions:
    """The options of :func:`refit_search` as a typed, checked object (e.g. for ``fit``'s schedule).

    Attributes:
        ridge: pull of each refit towards the current last layer (see :class:`RefitObjective`).
        max_iter: accepted refit moves per search at most.
        tol: a move must lower the held-out loss by more than this (see :func:`refit_search`).
        write_layers: also write the refitted last layers into the model (``False``: only the chosen
            permutations; the refit is then a scoring device).

    Example:
        >>> RefitOptions(max_iter=8)
        RefitOptions(ridge=0.001, max_iter=8, tol=0.0, write_layers=True)
        >>> RefitOptions.from_dict({"ridge": 0.1, "steps": 3})
        Traceback (most recent call last):
        ...
        TypeError: RefitOptions got unknown option(s) 'steps'; accepted options are: max_iter, ridge, tol, write_layers
    """

    ridge: float = 1e-3
    max_iter: int = 20
    tol: float = 0.0
    write_layers: bool = True

    def __post_init__(self) -> None:
        check_positive_float("RefitOptions.ridge", self.ridge, allow_zero=True)
        check_int("RefitOptions.max_iter", self.max_iter, minimum=0)
        check_positive_float("RefitOptions.tol", self.tol, allow_zero=True)
        if not isinstance(self.write_layers, bool):
            raise TypeError(f"RefitOptions.write_layers must be True or False, got {self.write_layers!r}")

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> RefitOptions:
        """The options a dict names; an unknown name raises ``TypeError`` listing the accepted ones."""
        if not isinstance(options, Mapping):
            raise TypeError(f"refit options must be a dict or a RefitOptions, got {type(options).__name__}")
        check_no_unknown_options("RefitOptions", options, [f.name for f in fields(cls)])
        return cls(**dict(options))

    def kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments of :func:`refit_search`."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class RefitMove:
    """One accepted compound move: a swap of slots ``slots`` in row ``selector`` of permutation module
    ``slot``, with the last layers of ``experts`` refitted; held-out loss before and after."""

    kind: str
    slot: int
    selector: int
    before: list[int]
    after: list[int]
    fun_before: float
    fun_after: float
    experts: list[int]
    slots: list[int]


def last_linear_layers(experts: Sequence[nn.Module]) -> list[nn.Linear]:
    """The last ``nn.Linear`` of every expert (the layer a refit re-optimises)."""
    found = []
    for e, expert in enumerate(experts):
        linears = [m for m in expert.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"refit needs experts that end in an nn.Linear; expert {e} ({type(expert).__name__}) has none")
        found.append(linears[-1])
    return found


@dataclass
class _Part:
    """Cached quantities of one data part (fit rows or score rows)."""

    gate_outs: list[GateOutput]
    features: torch.Tensor  # [B, n, p]: input of each expert's last linear layer, with a column of ones
    targets: Any
    task_targets: list[torch.Tensor]  # per task, [B, u] in the mixture's space (float64)


def _check_fit_rows(name: str, tensor: torch.Tensor) -> None:
    """Refuse NaN/inf in the rows the refits are fitted on (they would make every refit NaN)."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{name} contain {bad} NaN/inf value(s); the refits are least-squares fits to these rows: pass finite values")


def _split_inputs(inputs: Any) -> tuple[torch.Tensor, Any, Any]:
    if isinstance(inputs, Mapping):
        unknown = set(inputs) - {"x", "task", "key"}
        if unknown or "x" not in inputs:
            raise ValueError(f"inputs must be a tensor or a dict with key 'x' (and optionally 'task', 'key'); got keys {sorted(inputs)}")
        return inputs["x"], inputs.get("task"), inputs.get("key")
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a tensor or a dict of tensors, got {type(inputs).__name__}")
    return inputs, None, None


def _task_target(targets: Any, t: int, num_tasks: int, rows: int, width: int) -> torch.Tensor:
    if isinstance(targets, (list, tuple)):
        if len(targets) != num_tasks:
            raise ValueError(f"targets: expected {num_tasks} per-task tensors, got {len(targets)}")
        value = targets[t]
    elif isinstance(targets, torch.Tensor):
        if num_tasks == 1:
            value = targets
        elif targets.dim() == 2 and targets.shape[1] == num_tasks:
            value = targets[:, t]
        else:
            raise ValueError(f"targets must be [B, {num_tasks}] (one column per task) or a list of per-task tensors, got {tuple(targets.shape)}")
    else:
        raise TypeError(f"targets must be a tensor or a list of per-task tensors, got {type(targets).__name__}")
    return value.detach().reshape(rows, width).to(torch.float64)


class RefitObjective:
    """Held-out loss of a routing state after a closed-form refit of the experts' last layers.

    Args:
        model: an ``MoE`` / ``MultiGateMoE`` (called directly; see the module docstring).
        fit_data: ``(inputs, targets)`` rows the refits are fitted on (training rows; this rank's shard
            under a process group).
        score_data: ``(inputs, targets)`` held-out rows every state is scored on (this rank's shard).
        loss: per-example loss ``loss(prediction, targets) -> [B]`` (a scalar, taken as the mean over the
            rows, only in a single process).
        ridge: ``λ`` of the ridge ``mean squared residual + λ‖θ − θ₀‖²``, pulling each refit towards
            the layer's current weights ``θ₀`` (larger: closer to the frozen-expert evaluation).
        process_group: ``None`` (the world group when ``torch.distributed`` is initialised), ``False``
            (this process alone) or a ``ProcessGroup``: the normal equations and loss sums are all-reduced
            (module docstring). Every method that computes a value is then collective.

    Attributes:
        fit_rows / score_rows: the rows of all ranks together.
        all_reduce_calls / all_reduce_values: all-reduces made and the float64 numbers they carried
            (counted in a single process too).
    """

    def __init__(self, model: nn.Module, fit_data: Any, score_data: Any, loss: LossFn, *, ridge: float = 1e-3,
                 process_group: Any = None) -> None:
        self.group = resolve_group(process_group)
        self.nfev = 0
        self.all_reduce_calls = 0
        self.all_reduce_values = 0
        self._out_cache: dict[int, torch.Tensor] = {}
        error: BaseException | None = None
        try:
            self._setup(model, fit_data, score_data, loss, ridge)
        except Exception as exc:  # reported to every rank by _agree
            error = exc
        self._agree(error)
        self._active = self._active_masks()
        self.fun0 = self.fun = self.value(self.state, {})

    def _setup(self, model: nn.Module, fit_data: Any, score_data: Any, loss: LossFn, ridge: float) -> None:
        if not callable(loss):
            raise TypeError(f"loss must be callable(prediction, targets), got {type(loss).__name__}")
        self.layer, nested = find_routing_layer(model)
        if nested:
            raise ValueError("refit search needs the MoE / MultiGateMoE layer itself as the model (not a model wrapping it)")
        if isinstance(self.layer, MultiGateMoE) and not all(isinstance(t, nn.Identity) for t in self.layer.towers):
            raise ValueError("refit search needs identity towers (the refit is a least-squares fit of the mixture to the target)")
        self.loss_fn = loss
        self.ridge = check_positive_float("ridge", ridge, allow_zero=True)
        self.linears = last_linear_layers(list(self.layer.experts))
        self.n = self.layer.num_experts
        self.num_tasks = self.layer.num_tasks
        self.slots = list(self.layer.permutations)
        if isinstance(self.layer, MultiGateMoE):
            self.task_slot = [next(p for p, s in enumerate(self.slots) if s is self.layer.permutation_for(t)) for t in range(self.num_tasks)]
        else:
            self.task_slot = [0]
        # θ_e = [W_e | b_e]ᵀ : [p, u] float64 per expert.
        # Everything the search computes lives on the CPU in float64, whatever the model's device.
        self.theta = [torch.cat([lin.weight.detach().t(), _bias(lin).unsqueeze(0)], dim=0).to("cpu", torch.float64)
                      for lin in self.linears]
        self.fit_part = self._cache(fit_data, "fit_data")
        self.score_part = self._cache(score_data, "score_data")
        self.state = [slot.index.detach().clone().cpu() for slot in self.slots]
        self.per_example = self._check_loss()

    def _check_loss(self) -> bool | None:
        """Whether the loss is per-example on the score rows (``None``: this rank has no score rows)."""
        part = self.score_part
        if part.features.shape[0] == 0:
            return None
        value = self._loss_values(self.state, {}, None)
        rows = part.features.shape[0]
        if value.dim() == 0:
            return False
        if tuple(value.shape) != (rows,):
            raise ValueError(f"loss must return per-example losses of shape [{rows}] or a scalar, got {tuple(value.shape)}")
        return True

    def _agree(self, error: BaseException | None) -> None:
        """Under a process group: exchange errors, row counts, loss kind, permutations and last layers."""
        if self.group is None:
            if error is not None:
                raise error
            self.fit_rows = int(self.fit_part.features.shape[0])
            self.score_rows = int(self.score_part.features.shape[0])
            if self.score_rows == 0:
                raise ValueError("score_data holds 0 rows; the refit search needs held-out rows to score on")
            return
        report = None if error is not None else (
            int(self.fit_part.features.shape[0]), int(self.score_part.features.shape[0]), self.per_example,
            [s.tolist() for s in self.state], _digest(self.theta),
        )
        parts = agree_and_gather(
            error, self.group, "the refit search", report, error_type=DistributedSearchError, message=PREPARATION_FAILED
        )
        self.fit_rows = sum(rep[0] for rep in parts)
        self.score_rows = sum(rep[1] for rep in parts)
        if self.score_rows == 0:
            raise ValueError("score_data holds 0 rows on every rank of the process group; the refit search needs held-out rows")
        if any(rep[2] is False for rep in parts):
            raise ValueError("under a process group the loss must return per-example losses [B] (a scalar cannot be "
                             "combined across shards exactly); use reduction='none'")
        if any(rep[3] != parts[0][3] for rep in parts[1:]):
            raise ValueError("the ranks hold different permutations at the start of the refit search; give every rank the same model")
        if any(rep[4] != parts[0][4] for rep in parts[1:]):
            raise ValueError("the ranks hold different expert last layers at the start of the refit search; give every "
                             "rank the same model (e.g. as DistributedDataParallel keeps it)")

    # ------------------------------------------------------------------------------ collectives
    def _collective_device(self) -> torch.device:
        if self.group is not None and torch.distributed.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (float64) summed over the ranks (a copy; itself in a single process; collective)."""
        self.all_reduce_calls += 1
        self.all_reduce_values += int(tensor.numel())
        if self.group is None:
            return tensor
        return all_reduce_sum(tensor.to(self._collective_device()).clone(), self.group).cpu()

    def _broadcast(self, theta: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Rank 0's layers on every rank (bit-identical written weights, whatever each rank's solver did)."""
        if self.group is None or not theta:
            return theta
        keys = sorted(theta)
        flat = torch.cat([theta[e].reshape(-1) for e in keys]).to(self._collective_device())
        broadcast_tensor_(flat, self.group, src=0)
        flat = flat.cpu()
        out, at = {}, 0
        for e in keys:
            size = theta[e].numel()
            out[e] = flat[at : at + size].reshape(theta[e].shape)
            at += size
        return out

    @torch.no_grad()
    def _cache(self, data: Any, name: str) -> _Part:
        inputs, targets = as_batch(data, name=name)
        x, task, key = _split_inputs(inputs)
        if x.dim() > 2:
            raise ValueError(TOKENS_REFUSED.format(shape=list(x.shape), how=f"{name}: pass the tokens as rows"))
        if name == "fit_data":  # a NaN/inf fit row would make every refit NaN and every move look no better
            _check_fit_rows(f"{name} inputs", x)
        captured: list[torch.Tensor] = []
        handles = [lin.register_forward_hook(lambda m, a, out: captured.append(a[0].detach())) for lin in self.linears]
        try:
            with eval_mode(self.layer):
                gate_outs = self.layer.gate_outputs(x, task=task, key=key)
                outputs = self.layer.expert_outputs(x)
        finally:
            for h in handles:
                h.remove()
        if len(captured) != self.n:
            raise ValueError("refit needs each expert's last nn.Linear to run exactly once per expert call")
        rows = x.shape[0]
        feats = torch.stack([c.reshape(rows, lin.in_features) for c, lin in zip(captured, self.linears)], dim=1).to("cpu", torch.float64)
        feats = torch.cat([feats, torch.ones(rows, self.n, 1, dtype=torch.float64)], dim=2)
        recomputed = torch.einsum("bnp,npu->bnu", feats, torch.stack(self.theta))
        if not torch.allclose(recomputed, outputs.reshape(rows, self.n, self.theta[0].shape[1]).to("cpu", torch.float64), atol=1e-5, rtol=1e-4):
            raise ValueError("refit needs experts whose output is their last nn.Linear (nothing may follow it)")
        cpu = torch.device("cpu")
        gate_outs = [GateOutput(g.weights.detach().to(cpu), g.loss.detach().to(cpu),
                                None if g.selector_weights is None else g.selector_weights.detach().to(cpu),
                                None if g.selector_mix is None else g.selector_mix.detach().to(cpu)) for g in gate_outs]
        targets = to_device(targets, cpu)
        task_targets = [_task_target(targets, t, self.num_tasks, rows, self.theta[0].shape[1]) for t in range(self.num_tasks)]
        if name == "fit_data":
            for t, target in enumerate(task_targets):
                _check_fit_rows(f"{name} targets" + (f" of task {t}" if self.num_tasks > 1 else ""), target)
        return _Part(gate_outs, feats, targets, task_targets)

    # --------------------------------------------------------------------------------------- pieces
    def weights(self, part: _Part, state: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Expert-space weights ``[B, n]`` (float64) of every task under ``state``."""
        return [apply_permutation(g, state[self.task_slot[t]].to(g.weights.device)).to(torch.float64) for t, g in enumerate(part.gate_outs)]

    def outputs(self, part: _Part, replaced: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """Expert outputs ``[B, n, u]`` with the last layers in ``replaced`` (expert → θ) swapped in."""
        theta = torch.stack([replaced.get(e, th) for e, th in enumerate(self.theta)])
        return torch.einsum("bnp,npu->bnu", part.features, theta)

    def _current_outputs(self, part: _Part) -> torch.Tensor:
        key = id(part)
        cached = self._out_cache.get(key)
        if cached is None:
            cached = self._out_cache[key] = self.outputs(part, {})
        return cached

    def set_theta(self, replaced: Mapping[int, torch.Tensor]) -> None:
        """Adopt the last layers in ``replaced`` (expert → θ) as the current ones."""
        for e, th in replaced.items():
            self.theta[e] = th
        self._out_cache.clear()

    @torch.no_grad()
    def _predictions(self, state: Sequence[torch.Tensor], replaced: Mapping[int, torch.Tensor],
                     weights: list[torch.Tensor] | None) -> Any:
        """The layer's predictions on this rank's score rows under ``state`` with the layers ``replaced``."""
        part = self.score_part
        out = self._current_outputs(part)
        if replaced:
            out = out.clone()
            for e, th in replaced.items():
                out[:, e] = part.features[:, e] @ th
        weights = self.weights(part, state) if weights is None else weights
        mixtures = [torch.einsum("bn,bnu->bu", w, out) for w in weights]
        dtype = part.gate_outs[0].weights.dtype
        return self.layer.head([m.to(dtype) for m in mixtures])

    def _loss_values(self, state: Sequence[torch.Tensor], replaced: Mapping[int, torch.Tensor],
                     weights: list[torch.Tensor] | None) -> torch.Tensor:
        value = self.loss_fn(self._predictions(state, replaced, weights), self.score_part.targets)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"loss must return a tensor, got {type(value).__name__}")
        return value.detach().to(torch.float64)

    def _local_sum(self, state: Sequence[torch.Tensor], replaced: Mapping[int, torch.Tensor],
                   weights: list[torch.Tensor] | None = None) -> float:
        """Sum over this rank's score rows of the loss (a scalar loss counts as the mean of every row)."""
        rows = self.score_part.features.shape[0]
        if rows == 0:
            return 0.0
        value = self._loss_values(state, replaced, weights)
        return float(value.sum()) if value.dim() > 0 else float(value) * rows

    @torch.no_grad()
    def value(self, state: Sequence[torch.Tensor], replaced: Mapping[int, torch.Tensor],
              weights: list[torch.Tensor] | None = None) -> float:
        """Mean held-out loss of ``state`` with the last layers ``replaced`` (``weights``: precomputed
        expert-space weights of ``state`` on this rank's score rows); collective."""
        self.nfev += 1
        total = self.reduce_sum(torch.tensor([self._local_sum(state, replaced, weights)], dtype=torch.float64))
        return float(total[0]) / self.score_rows

    @torch.no_grad()
    def predictions(self, state: Sequence[torch.Tensor], replaced: Mapping[int, torch.Tensor]) -> tuple[Any, Any]:
        """``(predictions, targets)`` of ``state`` with the layers ``replaced`` on all score rows (under a
        process group every rank's rows, gathered in rank order on the CPU; collective)."""
        rows = self.score_part.features.shape[0]
        local = None if rows == 0 else (self._predictions(state, replaced, None), self.score_part.targets)
        if self.group is None:
            assert local is not None  # a single process without score rows is refused at construction
            return local
        pieces = all_gather_objects(None if local is None else (to_device(local[0], "cpu"), local[1]), self.group)
        return as_batch([p for p in pieces if p is not None])

    def _normal_equations(self, state: Sequence[torch.Tensor], experts: Sequence[int],
                          weights: list[torch.Tensor] | None) -> torch.Tensor:
        """This rank's ``[XᵀX | XᵀR]`` (``[q, q + u]``) and row count (appended), flattened, for a refit
        of ``experts`` under ``state``."""
        part = self.fit_part
        experts = list(experts)
        p = part.features.shape[2]
        q = len(experts) * p
        u = self.theta[0].shape[1]
        out = self._current_outputs(part)
        chosen = torch.zeros(self.n, dtype=torch.bool)
        chosen[experts] = True
        blocks, residuals = [], []
        for t, w in enumerate(self.weights(part, state) if weights is None else weights):
            rows = (w[:, chosen] != 0).any(dim=1)
            if not bool(rows.any()):
                continue
            w_r, f_r = w[rows], part.features[rows]
            blocks.append((w_r[:, experts].unsqueeze(-1) * f_r[:, experts, :]).reshape(-1, q))
            rest = torch.einsum("bn,bnu->bu", w_r[:, ~chosen], out[rows][:, ~chosen])
            residuals.append(part.task_targets[t][rows] - rest)
        if not blocks:
            return torch.zeros(q * (q + u) + 1, dtype=torch.float64)
        X, R = torch.cat(blocks), torch.cat(residuals)
        return torch.cat([torch.cat([X.t() @ X, X.t() @ R], dim=1).reshape(-1), torch.tensor([float(X.shape[0])], dtype=torch.float64)])

    def _solve(self, experts: Sequence[int], summed: torch.Tensor) -> dict[int, torch.Tensor]:
        """The ridge solution from the (all-reduced) normal equations of :meth:`_normal_equations`."""
        experts = list(experts)
        p = self.fit_part.features.shape[2]
        q = len(experts) * p
        u = self.theta[0].shape[1]
        if float(summed[-1]) == 0:  # no fit row of any rank reaches these experts: nothing to refit
            return {e: self.theta[e] for e in experts}
        normal = summed[:-1].reshape(q, q + u)
        theta0 = torch.cat([self.theta[e] for e in experts], dim=0)
        scale = 1.0 / max(self.fit_rows, 1)
        A = scale * normal[:, :q] + (self.ridge + 1e-10) * torch.eye(q, dtype=torch.float64)
        B = scale * normal[:, q:] + self.ridge * theta0
        theta = torch.linalg.solve(A, B)
        return {e: theta[i * p : (i + 1) * p] for i, e in enumerate(experts)}

    @torch.no_grad()
    def refit(self, state: Sequence[torch.Tensor], experts: Sequence[int],
              weights: list[torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        """Ridge least-squares last layers of ``experts`` under ``state`` (the other experts held fixed;
        ``weights``: precomputed expert-space weights of ``state`` on this rank's fit rows); collective."""
        return self._solve(experts, self.reduce_sum(self._normal_equations(state, experts, weights)))

    @torch.no_grad()
    def score_moves(self, moves: Sequence[tuple[Sequence[torch.Tensor], Sequence[int]]]
                    ) -> list[tuple[float, dict[int, torch.Tensor]]]:
        """Held-out loss of every ``(state, experts)`` after refitting ``experts`` on the fit rows, and the
        refitted layers; two all-reduces per chunk of at most :data:`MAX_REDUCE_VALUES` numbers (collective)."""
        out: list[tuple[float, dict[int, torch.Tensor]]] = []
        if not moves:
            return out
        p = self.fit_part.features.shape[2]
        u = self.theta[0].shape[1]
        sizes = [len(experts) * p * (len(experts) * p + u) + 1 for _, experts in moves]
        start = 0
        while start < len(moves):  # every rank has the same sizes, so the same chunks
            stop, total = start, 0
            while stop < len(moves) and (stop == start or total + sizes[stop] <= MAX_REDUCE_VALUES):
                total += sizes[stop]
                stop += 1
            chunk = moves[start:stop]
            local = torch.cat([self._normal_equations(state, experts, self.weights(self.fit_part, state)) for state, experts in chunk])
            summed = self.reduce_sum(local)
            thetas, at = [], 0
            for (state, experts), size in zip(chunk, sizes[start:stop]):
                thetas.append(self._solve(experts, summed[at : at + size]))
                at += size
            sums = torch.tensor([self._local_sum(state, theta) for (state, _), theta in zip(chunk, thetas)], dtype=torch.float64)
            self.nfev += len(chunk)
            values = self.reduce_sum(sums) / self.score_rows
            out += [(float(v), theta) for v, theta in zip(values.tolist(), thetas)]
            start = stop
        return out

    def _active_masks(self) -> dict[tuple[int, int], torch.Tensor]:
        """``(module, selector) → [n]`` bool: gate slots with weight on some fit or score row of some rank."""
        keys = [(p, s) for p, index in enumerate(self.state) for s in range(index.shape[0])]
        local = torch.zeros(len(keys), self.n, dtype=torch.float64)
        for i, (slot, selector) in enumerate(keys):
            rows = self.state[slot].shape[0]
            for part in (self.fit_part, self.score_part):
                for t, g in enumerate(part.gate_outs):
                    if self.task_slot[t] != slot:
                        continue
                    if rows == 1 or not g.has_selectors:
                        local[i] += (g.weights != 0).any(dim=0).to(torch.float64)
                    elif g.selector_mix is not None and g.selector_weights is not None:
                        contrib = g.selector_mix[:, selector].unsqueeze(1) * g.selector_weights[:, selector]
                        local[i] += (contrib != 0).any(dim=0).to(torch.float64)
        summed = self.reduce_sum(local) if self.group is not None else local
        return {key: summed[i] > 0 for i, key in enumerate(keys)}

    def active_slots(self, slot: int, selector: int) -> torch.Tensor:
        """``[n]`` bool: gate slots of ``selector`` (module ``slot``) with weight on some fit or score row."""
        return self._active[(slot, selector)].clone()

    def swaps(self) -> list[tuple[int, int, int, int, list[torch.Tensor], list[int]]]:
        """Every swap that changes some weight: ``(module, selector, a, c, new state, changed experts)``."""
        out = []
        for p, index in enumerate(self.state):
            for s in range(index.shape[0]):
                active = self.active_slots(p, s)
                for a in range(self.n):
                    for c in range(a + 1, self.n):
                        if not (bool(active[a]) or bool(active[c])):
                            continue
                        new = [x.clone() for x in self.state]
                        new[p][s, a], new[p][s, c] = index[s, c], index[s, a]
                        out.append((p, s, a, c, new, sorted({int(index[s, a]), int(index[s, c])})))
        return out

    def score_move(self, new: Sequence[torch.Tensor], experts: Sequence[int]) -> tuple[float, dict[int, torch.Tensor]]:
        """Held-out loss of ``new`` after refitting ``experts`` on the fit rows, and the refitted layers (collective)."""
        return self.score_moves([(new, experts)])[0]

    def accept(self, state: Sequence[torch.Tensor], theta: Mapping[int, torch.Tensor]) -> None:
        """Adopt ``state`` and the layers ``theta`` (rank 0's, under a process group; collective)."""
        self.state = [s.clone() for s in state]
        self.set_theta(self._broadcast(dict(theta)))
        self.fun = self.value(self.state, {})

    def write_back(self, layers: bool = True) -> None:
        """Write the current permutations (and, with ``layers``, the last layers) into the model."""
        for slot, index in zip(self.slots, self.state):
            slot.set(index)
        if not layers:
            return
        with torch.no_grad():
            for lin, th in zip(self.linears, self.theta):
                lin.weight.copy_(th[:-1].t().to(lin.weight.dtype))
                if lin.bias is not None:
                    lin.bias.copy_(th[-1].to(lin.bias.dtype))


def _bias(lin: nn.Linear) -> torch.Tensor:
    return lin.bias.detach() if lin.bias is not None else torch.zeros(lin.out_features, dtype=lin.weight.dtype)


def _digest(theta: Sequence[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for th in theta:
        h.update(th.contiguous().numpy().tobytes())
    return h.hexdigest()


def refit_search(
    model: nn.Module,
    fit_data: Any,
    score_data: Any,
    loss: LossFn,
    *,
    ridge: float = 1e-3,
    max_iter: int = 20,
    tol: float = 0.0,
    apply: bool = True,
    write_layers: bool = True,
    guard: Any = None,
    guard_start: Sequence[float] | None = None,
    process_group: Any = None,
) -> OptimizeResult:
    """Best-improvement descent over swaps, each scored after a closed-form refit (module docstring).

    Args:
        model: the ``MoE`` / ``MultiGateMoE`` layer.
        fit_data: ``(inputs, targets)`` the refits are fitted on (use training rows; this rank's shard
            under a process group).
        score_data: ``(inputs, targets)`` held-out rows every candidate is scored on (this rank's shard).
        loss: per-example loss.
        ridge: pull of each refit towards the current last layer (see :class:`RefitObjective`).
        max_iter: accepted moves at most.
        tol: a move must lower the held-out loss by more than this, against both the current state
            and a refit of the same experts without the move.
        apply: write the accepted permutations and refitted last layers into the model.
        write_layers: with ``apply``, also write the refitted last layers; ``False`` writes only the
            permutations (the refit is then a scoring device, and ``fun`` is not the model's loss).
        guard: metrics a move must not make worse (as for :func:`~routing_search.local_search`: a
            :class:`~routing_search.search.MetricGuard`, a ``TaskMetric``, a callable, or a list), computed on
            all score rows with the move's predictions after the refit; a rejected move is counted and the
            next-best move is tried.
        guard_start: each guard's reference value (default: its value at the start of this search; pass the
            start of an earlier stage so that the two stages together lose at most the tolerance).
        process_group: ``None`` (the world group when initialised), ``False`` or a ``ProcessGroup``; every
            rank then calls with its shards and all ranks accept the same moves (module docstring).

    Returns:
        ``OptimizeResult`` (``x``: list of ``[S, n]`` arrays; ``fun``/``fun0``: held-out loss after /
        before; ``nit``: accepted moves; ``nfev``; ``status``: 0 no refit-scored swap improves, 1 stopped
        by ``max_iter``, 2 the held-out loss at the start is NaN/inf (a ``RuntimeWarning``; nothing searched,
        the model unchanged); ``moves``: list of :class:`RefitMove`;
        ``guard_rejections``; ``guard``: ``{name: {'start', 'end', 'tolerance', 'greater_is_better'}}``
        or ``None`` without guards; ``all_reduce``: ``{'calls', 'float64_values'}``).

    Example:
        >>> import torch
        >>> from routing_search import MoE, TopK, make_experts
        >>> from routing_search.losses import mse_loss
        >>> _ = torch.manual_seed(0)
        >>> moe = MoE(make_experts(4, 3, [8], 1), TopK(4, 1, input_dim=3))
        >>> x, y = torch.randn(200, 3), torch.randn(200, 1)
        >>> r = refit_search(moe, (x[:100], y[:100]), (x[100:], y[100:]), mse_loss)
        >>> r.fun <= r.fun0
        True
    """
    max_iter = check_int("max_iter", max_iter, minimum=0)
    tol = check_positive_float("tol", tol, allow_zero=True)
    for flag, setting in (("apply", apply), ("write_layers", write_layers)):
        if not isinstance(setting, bool):
            raise TypeError(f"{flag} must be True or False, got {setting!r}")
    guards = check_guards(guard)
    if guard_start is not None:
        if not guards:
            raise ValueError("guard_start is used only with guard=; pass guard or drop guard_start")
        if not isinstance(guard_start, Sequence) or isinstance(guard_start, str):
            raise TypeError(f"guard_start must be a list of floats, one per guard, got {type(guard_start).__name__}")
        try:
            guard_start = [float(v) for v in guard_start]
        except (TypeError, ValueError) as exc:
            raise TypeError(f"guard_start must be a list of floats, one per guard, got {list(guard_start)!r}") from exc
        if len(guard_start) != len(guards):
            raise ValueError(f"guard_start must hold one value per guard ({len(guards)}), got {len(guard_start)}")
    obj = RefitObjective(model, fit_data, score_data, loss, ridge=ridge, process_group=process_group)
    if not math.isfinite(obj.fun0):  # every rank holds the same all-reduced value, so all return here
        warn_non_finite_start("refit_search: the held-out loss on score_data", obj.fun0,
                              "the score rows, their targets and the loss")
        return make_result(
            x=[s.numpy().copy() for s in obj.state], fun=obj.fun0, nit=0, nfev=obj.nfev, status=STATUS_NONFINITE,
            message="non-finite held-out loss at the start: nothing searched", fun0=obj.fun0, moves=[], method="refit",
            guard_rejections=0, guard=None,
            all_reduce={"calls": obj.all_reduce_calls, "float64_values": obj.all_reduce_values},
        )

    def guard_values() -> list[float]:
        predictions, targets = obj.predictions(obj.state, {})
        return evaluate_guards(guards, predictions, targets)

    reference: list[float] = []
    if guards:
        reference = list(guard_start) if guard_start is not None else guard_values()
        check_guard_start(guards, reference, "the refit search")
    rejections = 0
    moves: list[RefitMove] = []
    status, message = STATUS_CONVERGED, "local optimum: no refit-scored swap improves"
    while True:
        if len(moves) >= max_iter:
            status, message = STATUS_BUDGET, "max_iter reached"
            break
        swaps = obj.swaps()
        keys = sorted({tuple(experts) for *_, experts in swaps})
        scored = obj.score_moves([(new, experts) for *_, new, experts in swaps] + [(obj.state, list(k)) for k in keys])
        baseline = {k: scored[len(swaps) + i][0] for i, k in enumerate(keys)}
        passing = []
        for i, ((p, s, a, c, new, experts), (value, theta)) in enumerate(zip(swaps, scored)):
            bar = min(obj.fun, baseline[tuple(experts)]) - tol
            if value < bar:
                passing.append((value, i, (p, s, a, c, new), theta))
        passing.sort(key=lambda item: (item[0], item[1]))
        chosen = None
        for value, _, (p, s, a, c, new), theta in passing:
            if guards:
                predictions, targets = obj.predictions(new, theta)
                values = evaluate_guards(guards, predictions, targets)
                worse = guards_violated(guards, reference, values)
                if bool(obj.reduce_sum(torch.tensor([1.0 if worse else 0.0], dtype=torch.float64))[0] > 0):
                    rejections += 1
                    continue
            chosen = (value, (p, s, a, c, new), theta)
            break
        if chosen is None:
            if passing:
                message = "local optimum: every refit-scored swap that improves was rejected by a guard"
            break
        value, (p, s, a, c, new), theta = chosen
        before = obj.fun
        moves.append(RefitMove("refit-swap", p, s, obj.state[p][s].tolist(), new[p][s].tolist(), before, value,
                               sorted(theta), [a, c]))
        obj.accept(new, theta)
    report = guard_report(guards, reference, guard_values()) if guards else None
    if apply:
        obj.write_back(layers=write_layers)
    return make_result(
        x=[s.numpy().copy() for s in obj.state], fun=obj.fun, nit=len(moves), nfev=obj.nfev, status=status,
        message=message, fun0=obj.fun0, moves=moves, method="refit", guard_rejections=rejections, guard=report,
        all_reduce={"calls": obj.all_reduce_calls, "float64_values": obj.all_reduce_values},
    )
