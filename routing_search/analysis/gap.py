"""How far a trained model's routing is from the exact optimum, with its experts frozen."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scipy.optimize import OptimizeResult
from torch import nn

from .._validation import check_choice, check_int, check_no_unknown_options, check_permutation
from ..exact import solve_subset, subset_objective
from ..layers.multigate import MultiGateMoE
from ..layers.permutation import apply_permutation
from ..search.descent import local_search
from ..search.objective import RoutingObjective

__all__ = ["optimality_gap", "frozen_arrays", "permutation_objective"]


def frozen_arrays(model: nn.Module, data: Any, *, layer: nn.Module | str | None = None, task: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Arrays for the exact solvers: ``(G, W, F)`` of one task on ``data``.

    ``G`` ``[B, n]`` are the gate's weights in gate-index space (before the permutation), ``W`` the
    expert-space weights (after it) and ``F`` ``[B, n, u]`` the frozen experts' outputs. Feed them to
    :func:`~routing_search.exact.solve_permutation` / :func:`~routing_search.exact.solve_subset`.
    """

    objective = RoutingObjective(model, data, lambda p, t: torch.zeros(()), layer=layer)
    _check_task(task, len(objective.gate_outs))
    g = objective.gate_outs[task]
    w = apply_permutation(g, objective.state[objective.task_slot[task]])
    return g.weights.double().cpu().numpy(), w.double().cpu().numpy(), objective.F.double().cpu().numpy()


def permutation_objective(
    model: nn.Module, data: Any, loss: Any, *, layer: nn.Module | str | None = None, process_group: Any = False
) -> Callable[[Sequence[int]], float]:
    """The model's loss on ``data`` as a function of its permutation, experts and gates frozen.

    For a layer with a single permutation row (one module, one row: ``per_selector=False`` or a gate
    without selectors; ``share_permutation=True`` in a multi-gate MoE). The returned callable takes a
    permutation (``perm[i]`` = expert of gate slot ``i``; anything else raises ``ValueError``) and returns
    the exact loss without re-running the experts; pass it to :func:`~routing_search.exact.landscape`.
    The model itself is not changed. ``process_group`` (default ``False``: this process alone) may name
    a group whose ranks hold shards of ``data``; every rank must then call the returned function with
    the same permutations (see :class:`~routing_search.search.RoutingObjective`).
    """

    objective = RoutingObjective(model, data, loss, layer=layer, process_group=process_group)
    rows = [s.shape[0] for s in objective.state]
    if rows != [1]:
        raise ValueError(
            f"permutation_objective needs a layer with one permutation row, this one has rows {rows} per module; "
            "build it with per_selector=False (and share_permutation=True for a MultiGateMoE), "
            "or use RoutingObjective.value_of for several rows"
        )

    def value(perm: Sequence[int]) -> float:
        return objective.value_of([check_permutation(perm, objective.n, name="perm").reshape(1, -1)])

    return value


def _check_task(task: int, num_tasks: int) -> None:
    check_int("task", task, minimum=0, maximum=num_tasks - 1)


def optimality_gap(
    model: nn.Module,
    data: Any,
    loss: Any,
    *,
    kind: str = "permutation",
    method: str = "auto",
    rng: Any = None,
    **options: Any,
) -> OptimizeResult:
    """Gap between the model's current routing and the best routing with experts (and towers) frozen.

    ``kind='permutation'``: the best permutation(s) between the gates and the experts under the user's
    ``loss`` (any towers, any gate). ``method='exhaustive'`` enumerates every state (exact; needs at
    most ``max_states`` states), ``'ils'`` runs iterated local search (an upper bound on the optimum,
    so the reported gap is a lower bound on the true gap), ``'auto'`` picks exhaustive when it fits.

    ``kind='subset'``: problem (2) of the DSelect-k paper for each task — the best simplex weights with
    at most ``k`` non-zeros over the frozen experts — against the model's static per-task weights.
    ``loss`` is ``'squared'`` (½‖ŷ − y‖²) or ``'logistic'`` (binary labels, the mixture is the logit);
    towers must be identities and gates static. ``method``: ``'enumerate'``, ``'branch_and_bound'`` or
    ``'auto'`` (enumeration).

    Options: ``layer``, ``k`` (subset; default the gate's number of selectors / ``k``),
    ``max_states`` (permutation exhaustive, default 50000), ``perturbations`` (permutation ils).

    Returns:
        ``OptimizeResult`` with ``fun`` (current value), ``optimum``, ``gap`` (= fun − optimum),
        ``relative_gap``, ``certified`` (True when ``optimum`` is proven optimal), ``x`` (the best
        routing: permutation arrays, or per-task weights ``[T, n]``), ``current_x``, ``per_task``
        (subset), ``nfev``, ``method`` and ``message``.
    """
    kind = check_choice("kind", kind, ("permutation", "subset"))
    if kind == "permutation":
        check_no_unknown_options("optimality_gap(kind='permutation')", options, ("layer", "max_states", "perturbations"))
        return _permutation_gap(model, data, loss, method, rng, options)
    check_no_unknown_options("optimality_gap(kind='subset')", options, ("layer", "k"))
    return _subset_gap(model, data, loss, method, options)


def _permutation_gap(model: nn.Module, data: Any, loss: Any, method: str, rng: Any, options: dict) -> OptimizeResult:

    method = check_choice("method", method, ("auto", "exhaustive", "ils"))
    max_states = check_int("max_states", options.get("max_states", 50_000), minimum=1)
    objective = RoutingObjective(model, data, loss, layer=options.get("layer"))
    rows = sum(s.shape[0] for s in objective.state)
    states = math.factorial(objective.n) ** rows
    if method == "auto":
        method = "exhaustive" if states <= max_states else "ils"
    common = {"layer": options.get("layer"), "apply": False}
    if method == "exhaustive":
        result = local_search(model, data, loss, "exhaustive", max_states=max_states, **common)
        certified, message = True, f"exact: all {states} permutation states enumerated"
    else:
        result = local_search(model, data, loss, "ils", rng=rng, perturbations=options.get("perturbations", 30), **common)
        certified, message = False, "heuristic optimum (iterated local search): the gap is a lower bound"
    current, optimum = objective.fun, float(result.fun)
    return OptimizeResult(
        fun=current,
        optimum=optimum,
        gap=current - optimum,
        relative_gap=(current - optimum) / max(abs(optimum), 1e-12),
        certified=certified,
        x=result.x,
        current_x=objective.current(),
        nfev=result.nfev,
        method=method,
        kind="permutation",
        success=True,
        message=message,
    )


def _subset_gap(model: nn.Module, data: Any, loss: Any, method: str, options: dict) -> OptimizeResult:

    loss = check_choice("loss", loss, ("squared", "logistic"))
    method = check_choice("method", method, ("auto", "enumerate", "branch_and_bound"))
    solver = "enumerate" if method == "auto" else method
    objective = RoutingObjective(model, data, lambda p, t: torch.zeros(()), layer=options.get("layer"))
    layer = objective.layer
    if isinstance(layer, MultiGateMoE) and not all(isinstance(t, nn.Identity) for t in layer.towers):
        raise ValueError("kind='subset' needs identity towers (the mixture must be the prediction); use kind='permutation'")
    gates = list(layer.gates) if isinstance(layer, MultiGateMoE) else [layer.gate]
    k = options.get("k")
    if k is None:
        k = int(getattr(gates[0], "k", getattr(gates[0], "num_selectors", 1)))
    k = check_int("k", k, minimum=1, maximum=objective.n)
    targets = objective.targets
    if not isinstance(targets, torch.Tensor):
        raise TypeError("kind='subset' needs a tensor of targets ([B, T] for a multi-gate MoE, [B, u] for an MoE)")
    F = objective.F.double().cpu().numpy()
    per_task, best_x, current_x, nfev = [], [], [], 0
    for t, g in enumerate(objective.gate_outs):
        w = apply_permutation(g, objective.state[objective.task_slot[t]]).double().cpu().numpy()
        if not np.allclose(w, w[:1], atol=1e-9):
            raise ValueError(f"kind='subset' needs static gates; task {t}'s gate gives different weights per example")
        y_t = (targets[:, t] if isinstance(layer, MultiGateMoE) else targets).double().cpu().numpy()
        current = subset_objective(w[0], F, y_t, loss=loss)
        best = solve_subset(F, y_t, k, loss=loss, method=solver)
        nfev += int(best.nfev)
        support = int((w[0] > 1e-12).sum())
        per_task.append(
            {"current": current, "optimum": float(best.fun), "gap": current - float(best.fun), "current_support": support,
             "feasible": support <= k, "optimal_support": [int(i) for i in best.support]}
        )
        best_x.append(best.x)
        current_x.append(w[0])
    current = float(np.mean([p["current"] for p in per_task]))
    optimum = float(np.mean([p["optimum"] for p in per_task]))
    infeasible = [t for t, p in enumerate(per_task) if not p["feasible"]]
    message = f"exact optimum of problem (2) per task ({solver}, k={k})"
    if infeasible:
        message += f"; tasks {infeasible} use more than k experts, so their gap may be negative"
    return OptimizeResult(
        fun=current,
        optimum=optimum,
        gap=current - optimum,
        relative_gap=(current - optimum) / max(abs(optimum), 1e-12),
        certified=True,
        x=np.stack(best_x),
        current_x=np.stack(current_x),
        per_task=per_task,
        nfev=nfev,
        method=solver,
        kind="subset",
        success=True,
        message=message,
    )
