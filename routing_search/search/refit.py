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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from scipy.optimize import OptimizeResult
from torch import nn

from .._validation import check_int, check_no_unknown_options, check_positive_float
from ..batches import as_batch, eval_mode, to_device
from ..gates.protocol import GateOutput
from ..layers.multigate import MultiGateMoE
from ..layers.permutation import apply_permutation
from ..result import STATUS_BUDGET, STATUS_CONVERGED, make_result
from .objective import LossFn, find_routing_layer

__all__ = ["RefitObjective", "RefitMove", "RefitOptions", "refit_search", "last_linear_layers"]


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


def _split_inputs(inputs: Any) -> tuple[torch.Tensor, Any, Any]:
    if isinstance(inputs, Mapping):
        unknown = set(inputs) - {"x", "task", "key"}
        if unknown or "x" not in inputs:
            raise ValueError(f"inputs must be a tensor or a dict with key 'x' (and optionally 'task', 'key'); got keys {sorted(inputs)}")
        return inputs["x"], inputs.get("task"), inputs.get("key")
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a tensor or a dict of tensors, got {type(inputs).__name__}")
    return inputs, None, None


def _task_target(targets: Any, t: int, num_tasks: int, rows: int) -> torch.Tensor:
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
    return value.detach().reshape(rows, -1).to(torch.float64)


class RefitObjective:
    """Held-out loss of a routing state after a closed-form refit of the experts' last layers.

    Args:
        model: an ``MoE`` / ``MultiGateMoE`` (called directly; see the module docstring).
        fit_data: ``(inputs, targets)`` rows the refits are fitted on (training rows).
        score_data: ``(inputs, targets)`` held-out rows every state is scored on.
        loss: per-example loss ``loss(prediction, targets) -> [B]`` (or a scalar).
        ridge: ``λ`` of the ridge ``mean squared residual + λ‖θ − θ₀‖²``, pulling each refit towards
            the layer's current weights ``θ₀`` (larger: closer to the frozen-expert evaluation).
    """

    def __init__(self, model: nn.Module, fit_data: Any, score_data: Any, loss: LossFn, *, ridge: float = 1e-3) -> None:
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
        self.fit_part = self._cache(fit_data)
        self.score_part = self._cache(score_data)
        self.state = [slot.index.detach().clone().cpu() for slot in self.slots]
        self.nfev = 0
        self._out_cache: dict[int, torch.Tensor] = {}
        self.fun0 = self.fun = self.value(self.state, {})

    @torch.no_grad()
    def _cache(self, data: Any) -> _Part:
        inputs, targets = as_batch(data)
        x, task, key = _split_inputs(inputs)
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
        feats = torch.stack([c.reshape(rows, -1) for c in captured], dim=1).to("cpu", torch.float64)
        feats = torch.cat([feats, torch.ones(rows, self.n, 1, dtype=torch.float64)], dim=2)
        recomputed = torch.einsum("bnp,npu->bnu", feats, torch.stack(self.theta))
        if not torch.allclose(recomputed, outputs.reshape(rows, self.n, -1).to("cpu", torch.float64), atol=1e-5, rtol=1e-4):
            raise ValueError("refit needs experts whose output is their last nn.Linear (nothing may follow it)")
        cpu = torch.device("cpu")
        gate_outs = [GateOutput(g.weights.detach().to(cpu), g.loss.detach().to(cpu),
                                None if g.selector_weights is None else g.selector_weights.detach().to(cpu),
                                None if g.selector_mix is None else g.selector_mix.detach().to(cpu)) for g in gate_outs]
        targets = to_device(targets, cpu)
        task_targets = [_task_target(targets, t, self.num_tasks, rows) for t in range(self.num_tasks)]
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
    def value(self, state: Sequence[torch.Tensor], replaced: Mapping[int, torch.Tensor],
              weights: list[torch.Tensor] | None = None) -> float:
        """Mean held-out loss of ``state`` with the last layers ``replaced`` (``weights``: precomputed
        expert-space weights of ``state`` on the score rows)."""
        self.nfev += 1
        part = self.score_part
        out = self._current_outputs(part)
        if replaced:
            out = out.clone()
            for e, th in replaced.items():
                out[:, e] = part.features[:, e] @ th
        weights = self.weights(part, state) if weights is None else weights
        mixtures = [torch.einsum("bn,bnu->bu", w, out) for w in weights]
        dtype = part.gate_outs[0].weights.dtype
        preds = self.layer.head([m.to(dtype) for m in mixtures])
        value = self.loss_fn(preds, part.targets)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"loss must return a tensor, got {type(value).__name__}")
        return float(value.detach().to(torch.float64).mean())

    @torch.no_grad()
    def refit(self, state: Sequence[torch.Tensor], experts: Sequence[int],
              weights: list[torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        """Ridge least-squares last layers of ``experts`` under ``state`` (the other experts held fixed;
        ``weights``: precomputed expert-space weights of ``state`` on the fit rows)."""
        part = self.fit_part
        experts = list(experts)
        p = part.features.shape[2]
        out = self._current_outputs(part)
        chosen = torch.zeros(self.n, dtype=torch.bool)
        chosen[experts] = True
        blocks, residuals = [], []
        for t, w in enumerate(self.weights(part, state) if weights is None else weights):
            rows = (w[:, chosen] != 0).any(dim=1)
            if not bool(rows.any()):
                continue
            w_r, f_r = w[rows], part.features[rows]
            blocks.append((w_r[:, experts].unsqueeze(-1) * f_r[:, experts, :]).reshape(-1, len(experts) * p))
            rest = torch.einsum("bn,bnu->bu", w_r[:, ~chosen], out[rows][:, ~chosen])
            residuals.append(part.task_targets[t][rows] - rest)
        theta0 = torch.cat([self.theta[e] for e in experts], dim=0)
        if not blocks:
            return {e: self.theta[e] for e in experts}
        X, R = torch.cat(blocks), torch.cat(residuals)
        scale = 1.0 / part.features.shape[0]
        A = scale * (X.t() @ X) + (self.ridge + 1e-10) * torch.eye(X.shape[1], dtype=torch.float64)
        B = scale * (X.t() @ R) + self.ridge * theta0
        theta = torch.linalg.solve(A, B)
        return {e: theta[i * p : (i + 1) * p] for i, e in enumerate(experts)}

    def active_slots(self, slot: int, selector: int) -> torch.Tensor:
        """``[n]`` bool: gate slots of ``selector`` (module ``slot``) with weight on some fit or score row."""
        active = torch.zeros(self.n, dtype=torch.bool)
        rows = self.state[slot].shape[0]
        for part in (self.fit_part, self.score_part):
            for t, g in enumerate(part.gate_outs):
                if self.task_slot[t] != slot:
                    continue
                if rows == 1 or not g.has_selectors:
                    active |= (g.weights != 0).any(dim=0).cpu()
                elif g.selector_mix is not None and g.selector_weights is not None:
                    contrib = g.selector_mix[:, selector].unsqueeze(1) * g.selector_weights[:, selector]
                    active |= (contrib != 0).any(dim=0).cpu()
        return active

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
        """Held-out loss of ``new`` after refitting ``experts`` on the fit rows, and the refitted layers."""
        theta = self.refit(new, experts, self.weights(self.fit_part, new))
        return self.value(new, theta, self.weights(self.score_part, new)), theta

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
) -> OptimizeResult:
    """Best-improvement descent over swaps, each scored after a closed-form refit (module docstring).

    Args:
        model: the ``MoE`` / ``MultiGateMoE`` layer.
        fit_data: ``(inputs, targets)`` the refits are fitted on (use training rows).
        score_data: ``(inputs, targets)`` held-out rows every candidate is scored on.
        loss: per-example loss.
        ridge: pull of each refit towards the current last layer (see :class:`RefitObjective`).
        max_iter: accepted moves at most.
        tol: a move must lower the held-out loss by more than this, against both the current state
            and a refit of the same experts without the move.
        apply: write the accepted permutations and refitted last layers into the model.
        write_layers: with ``apply``, also write the refitted last layers; ``False`` writes only the
            permutations (the refit is then a scoring device, and ``fun`` is not the model's loss).

    Returns:
        ``OptimizeResult`` (``x``: list of ``[S, n]`` arrays; ``fun``/``fun0``: held-out loss after /
        before; ``nit``: accepted moves; ``nfev``; ``moves``: list of :class:`RefitMove`).

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
    obj = RefitObjective(model, fit_data, score_data, loss, ridge=ridge)
    moves: list[RefitMove] = []
    status, message = STATUS_CONVERGED, "local optimum: no refit-scored swap improves"
    while True:
        if len(moves) >= max_iter:
            status, message = STATUS_BUDGET, "max_iter reached"
            break
        best: tuple[float, Any, dict[int, torch.Tensor]] | None = None
        baseline: dict[tuple[int, ...], float] = {}
        for p, s, a, c, new, experts in obj.swaps():
            value, theta = obj.score_move(new, experts)
            key = tuple(experts)
            if key not in baseline:
                baseline[key] = obj.score_move(obj.state, experts)[0]
            bar = min(obj.fun, baseline[key]) - tol
            if value < bar and (best is None or value < best[0]):
                best = (value, (p, s, a, c, new), theta)
        if best is None:
            break
        value, (p, s, a, c, new), theta = best
        before = obj.fun
        moves.append(RefitMove("refit-swap", p, s, obj.state[p][s].tolist(), new[p][s].tolist(), before, value,
                               sorted(theta), [a, c]))
        obj.state = new
        obj.set_theta(theta)
        obj.fun = obj.value(obj.state, {})
    if apply:
        obj.write_back(layers=write_layers)
    return make_result(
        x=[s.numpy().copy() for s in obj.state], fun=obj.fun, nit=len(moves), nfev=obj.nfev, status=status,
        message=message, fun0=obj.fun0, moves=moves, method="refit",
    )
