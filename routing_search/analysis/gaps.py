"""How far a trained model's routing is from the exact optimum, with its experts frozen.

Loss: one definition for the model-level front doors (:func:`optimality_gap`): a loss NAME,
``'squared'`` or ``'logistic'`` — the same names as the array solvers of :mod:`routing_search.exact`,
meaning exactly :func:`routing_search.losses.mse_loss` / :func:`~routing_search.losses.bce_with_logits_loss`
on each task's prediction, summed over tasks — or a torch per-example callable
``loss(prediction, targets) -> [B]`` as :func:`~routing_search.search.local_search` takes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import OptimizeResult
from torch import nn

from .._validation import check_choice, check_int, check_no_unknown_options, check_permutation, check_rng, resolve_method, warn_non_finite_start
from ..exact import solve_subset, subset_objective
from ..layers.multigate import MultiGateMoE
from ..layers.permutation import apply_permutation
from ..losses import bce_with_logits_loss, mse_loss, multitask_loss
from ..result import STATUS_CONVERGED, STATUS_NONFINITE, make_result
from ..search import RoutingObjective, local_search
from ..search.objective import LossFn

__all__ = ["optimality_gap", "frozen_arrays", "permutation_objective", "LOSS_NAMES"]


def frozen_arrays(model: nn.Module, data: Any, *, layer: nn.Module | str | None = None, task: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Arrays for the exact solvers: ``(G, W, F)`` of one task on ``data``.

    ``G`` ``[B, n]`` are the gate's weights in gate-index space (before the permutation), ``W`` the
    expert-space weights (after it) and ``F`` ``[B, n, u]`` the frozen experts' outputs. Feed them,
    with the task's targets, to :func:`~routing_search.exact.solve_permutation` /
    :func:`~routing_search.exact.solve_subset` and a loss NAME (``'squared'`` or ``'logistic'``, the
    names :func:`optimality_gap` takes): their ``fun`` is then in the units of
    :func:`~routing_search.losses.mse_loss` / ``bce_with_logits_loss``. No loss is needed here: the
    arrays do not depend on it.

    Example:
        >>> from routing_search.exact import solve_permutation
        >>> from routing_search.gates import TopK
        >>> from routing_search.layers import MoE, make_experts
        >>> _ = torch.manual_seed(0)
        >>> moe = MoE(make_experts(4, 3, [8], 2), TopK(num_experts=4, k=2, input_dim=3))
        >>> x, y = torch.randn(32, 3), torch.randn(32, 2)
        >>> G, W, F = frozen_arrays(moe, (x, y))
        >>> G.shape, W.shape, F.shape
        ((32, 4), (32, 4), (32, 4, 2))
        >>> best = solve_permutation(G, F, y, method="exhaustive")          # the arrays' optimum ...
        >>> gap = optimality_gap(moe, (x, y), "squared", method="exhaustive")  # ... is the model's
        >>> bool(np.isclose(best.fun, gap.optimum))
        True
    """

    objective = RoutingObjective(model, data, lambda p, t: torch.zeros(()), layer=layer, process_group=False)
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


# ----------------------------------------------------------------------------- the loss
LOSS_NAMES = ("squared", "logistic")
"""Loss names the model-level analysis accepts (the same names as the array solvers)."""

_METHOD_ALIASES = {"enumerate": "exhaustive", "brute_force": "exhaustive"}
"""Deprecated method names of :func:`optimality_gap` (a ``DeprecationWarning`` names the new one)."""

_KIND_OF_NAME = {"squared": "mse", "logistic": "bce"}
_NAME_OF_KIND = {kind: name for name, kind in _KIND_OF_NAME.items()}
_TORCH_LOSS = {"squared": mse_loss, "logistic": bce_with_logits_loss}


def _named_loss(name: str) -> LossFn:
    """The torch per-example loss of a loss name: ``mse_loss`` / ``bce_with_logits_loss`` for one
    prediction, their unweighted sum over tasks (``multitask_loss``) for a list of predictions."""
    single = _TORCH_LOSS[name]

    def loss(prediction: Any, targets: Any) -> torch.Tensor:
        if isinstance(prediction, (list, tuple)):
            return multitask_loss([_KIND_OF_NAME[name]] * len(prediction))(prediction, targets)
        return single(prediction, targets)

    return loss


def _is_multitask_loss(loss: Any) -> bool:
    """True for a callable built by :func:`routing_search.losses.multitask_loss` (a sum over tasks)."""
    return (
        callable(loss)
        and getattr(loss, "__module__", None) == multitask_loss.__module__
        and isinstance(getattr(loss, "kinds", None), tuple)
        and isinstance(getattr(loss, "weights", None), tuple)
    )


def _check_loss(loss: Any) -> Any:
    """A loss name (checked) or a callable; anything else is refused naming both forms."""
    if isinstance(loss, str):
        return check_choice("loss", loss, LOSS_NAMES)
    if not callable(loss):
        raise TypeError(
            f"loss must be one of {', '.join(map(repr, LOSS_NAMES))} or a torch per-example callable "
            f"loss(prediction, targets) -> [B], got {type(loss).__name__}"
        )
    return loss


def _task_terms(loss: Any, num_tasks: int) -> list[tuple[str, float]] | None:
    """``(loss name, weight)`` per task when the loss is a known weighted sum of named per-task losses."""
    if isinstance(loss, str):
        return [(loss, 1.0)] * num_tasks
    for name, fn in _TORCH_LOSS.items():
        if loss is fn and num_tasks == 1:
            return [(name, 1.0)]
    if _is_multitask_loss(loss) and len(loss.kinds) == num_tasks and all(k in _NAME_OF_KIND for k in loss.kinds):
        return [(_NAME_OF_KIND[k], float(w)) for k, w in zip(loss.kinds, loss.weights)]
    return None


def optimality_gap(
    model: nn.Module,
    data: Any,
    loss: str | LossFn,
    *,
    kind: str = "permutation",
    method: str = "auto",
    rng: Any = None,
    **options: Any,
) -> OptimizeResult:
    """Gap between the model's current routing and the best routing with experts (and towers) frozen.

    Args:
        model: an ``MoE``, a ``MultiGateMoE`` or a model containing one (pick it with ``layer=``), as
            :func:`~routing_search.search.local_search` accepts.
        data: ``(inputs, targets)`` or an iterable of such pairs.
        loss: a loss NAME, ``'squared'`` (:func:`~routing_search.losses.mse_loss`: mean over examples
            and output units of (ŷ − y)²) or ``'logistic'`` (:func:`~routing_search.losses.bce_with_logits_loss`,
            the prediction is a logit), applied to each task's prediction and summed over tasks
            (= ``multitask_loss([...] * T)``); or a torch per-example callable
            ``loss(prediction, targets) -> [B]`` as :func:`~routing_search.search.local_search` takes.
            Both kinds report ``fun``, ``optimum`` and ``gap`` in the same units, so
            ``'squared'`` and ``mse_loss`` give the same numbers.
        kind: ``'permutation'``: the best permutation(s) between the gates and the experts under
            ``loss`` (any towers, any gate). ``'subset'``: problem (2) of the DSelect-k paper for each
            task — the best simplex weights with at most ``k`` non-zeros over the frozen experts —
            against the model's static per-task weights; needs the MoE layer to be the model, identity
            towers, static gates and a named loss (a name, ``mse_loss``, ``bce_with_logits_loss`` or a
            ``multitask_loss`` of ``'mse'`` / ``'bce'`` tasks, whose weights are kept).
        method: permutation: ``'exhaustive'`` (every state; exact, at most ``max_states`` states),
            ``'ils'`` (iterated local search: an upper bound on the optimum, so the gap is a lower bound
            on the true gap) or ``'auto'`` (exhaustive when it fits). Subset: ``'exhaustive'``,
            ``'branch_and_bound'`` or ``'auto'`` (exhaustive). ``'enumerate'`` and ``'brute_force'`` are
            deprecated aliases of ``'exhaustive'``.
        rng: None, a seed or a ``numpy.random.Generator`` (checked by
            :func:`routing_search._validation.check_rng`); used by ``'ils'``, unused by the exact methods.
        **options: ``layer`` (module or name). Permutation: ``max_states`` (default 50000),
            ``perturbations`` (ils, default 30), ``separable`` (True / False / None: whether the loss
            is a sum of per-task terms; None = known for loss names and ``multitask_loss``). Subset:
            ``k`` (default: each task's gate's own ``k`` / number of selectors; an int sets it for every task).

    Exhaustive permutation search is exact and as small as the structure allows:

    * per-task permutations (a ``MultiGateMoE`` without ``share_permutation``): when the loss is a sum
      over tasks (a name, a ``multitask_loss`` or ``separable=True``) each permutation module is
      enumerated on its own, ``Σ_p`` instead of ``Π_p`` states; otherwise jointly, and the message
      says so;
    * per-selector permutations (DSelect-k, COMET with ``per_selector=True``): the rows of one module
      are enumerated jointly (their product), but only the slots that carry gate weight on ``data``
      are assigned (``n!/(n−a)!`` choices for ``a`` active slots: a binary static selector has one);
      a space larger than ``max_states`` is refused with its size and the option to raise.

    Returns:
        ``OptimizeResult`` (:func:`routing_search.result.make_result`) with ``fun`` (the current
        loss), ``optimum``, ``gap`` (= fun − optimum), ``relative_gap``, ``certified`` (True when
        ``optimum`` is proven optimal), ``x`` (the best routing: permutation arrays, or per-task
        weights ``[T, n]``), ``current_x``, ``nit``, ``nfev``, ``status`` / ``success`` (status 1
        when a search or solver stopped on a budget; 2 when the current loss is NaN/inf: a
        ``RuntimeWarning``, nothing searched, ``optimum`` and ``gap`` NaN, not certified), ``per_task`` (subset), ``method``, ``kind``
        and ``message``.

    Example:
        The same model, the same units: the subset problem with ``'squared'`` and the permutation
        problem with :func:`~routing_search.losses.mse_loss` report the same current loss:

        >>> from routing_search.gates import DSelectK
        >>> from routing_search.layers import MoE, make_experts
        >>> from routing_search.losses import mse_loss
        >>> _ = torch.manual_seed(0)
        >>> moe = MoE(make_experts(4, 3, [8], 2), DSelectK(num_experts=4, k=2)).eval()
        >>> x, y = torch.randn(64, 3), torch.randn(64, 2)
        >>> sub = optimality_gap(moe, (x, y), "squared", kind="subset")
        >>> per = optimality_gap(moe, (x, y), mse_loss, kind="permutation")
        >>> bool(np.isclose(sub.fun, per.fun)), sub.certified, per.certified, per.method
        (True, True, True, 'exhaustive')
        >>> with torch.no_grad():
        ...     bool(np.isclose(per.fun, float(mse_loss(moe(x).output, y).mean())))
        True
    """
    kind = check_choice("kind", kind, ("permutation", "subset"))
    loss = _check_loss(loss)
    generator = check_rng(rng)
    methods = ("auto", "exhaustive", "ils") if kind == "permutation" else ("auto", "exhaustive", "branch_and_bound")
    method = resolve_method(method, methods, aliases=_METHOD_ALIASES)
    if kind == "permutation":
        check_no_unknown_options(
            "optimality_gap(kind='permutation')", options, ("layer", "max_states", "perturbations", "separable")
        )
        return _permutation_gap(model, data, loss, method, generator, options)
    check_no_unknown_options("optimality_gap(kind='subset')", options, ("layer", "k"))
    return _subset_gap(model, data, loss, method, options)


# ----------------------------------------------------------------------------- permutation gap
@dataclass
class _Plan:
    """How the exhaustive permutation search enumerates: groups of rows searched jointly, and sizes."""

    groups: list[list[tuple[int, int]]]
    size: int
    joint_size: int
    separable_size: int
    separable: bool
    rows: int


def _active_slots(objective: RoutingObjective) -> dict[tuple[int, int], np.ndarray]:
    """Gate slots that carry weight for each (permutation module, selector row) on the data.

    A slot with zero weight on every row contributes exactly nothing to the mixture, so which expert
    it points to cannot change the loss: only the active slots need to be assigned.
    """
    active: dict[tuple[int, int], np.ndarray] = {}
    for p, index in enumerate(objective.state):
        rows = int(index.shape[0])
        used = torch.zeros(rows, objective.n, dtype=torch.bool)
        for t in objective.slot_tasks[p]:
            g = objective.gate_outs[t]
            if rows == 1:
                contrib = g.weights.unsqueeze(1)
            else:
                assert g.selector_mix is not None and g.selector_weights is not None, "per-selector rows need selectors"
                contrib = g.selector_mix.unsqueeze(2) * g.selector_weights
            used |= (contrib != 0).any(dim=0).cpu()
        for s in range(rows):
            active[(p, s)] = np.flatnonzero(used[s].numpy())
    return active


def _row_choices(active: np.ndarray, n: int, current: np.ndarray) -> list[np.ndarray]:
    """One full row per injective assignment of the active slots (the idle slots get the rest, in order)."""
    if active.size == 0:
        return [current.copy()]
    idle = np.setdiff1d(np.arange(n), active)
    out = []
    for assigned in itertools.permutations(range(n), active.size):
        row = np.empty(n, dtype=np.int64)
        row[active] = assigned
        row[idle] = np.setdiff1d(np.arange(n), assigned)
        out.append(row)
    return out


def _plan(objective: RoutingObjective, active: dict[tuple[int, int], np.ndarray], separable: bool) -> _Plan:
    n = objective.n
    counts = {key: math.perm(n, a.size) for key, a in active.items()}
    modules = [[(p, s) for s in range(index.shape[0])] for p, index in enumerate(objective.state)]
    module_sizes = [math.prod(counts[key] for key in rows) for rows in modules]
    joint_size, separable_size = math.prod(module_sizes), sum(module_sizes)
    groups = modules if separable else [[key for rows in modules for key in rows]]
    return _Plan(groups, separable_size if separable else joint_size, joint_size, separable_size, separable, len(counts))


def _enumerate_plan(
    objective: RoutingObjective, plan: _Plan, active: dict[tuple[int, int], np.ndarray]
) -> tuple[list[np.ndarray], float, int]:
    """Best state of every group in turn (the others fixed); exact when the groups are separable."""
    current = objective.current()
    best_state, best = [s.copy() for s in current], float(objective.fun)
    count = 0
    for group in plan.groups:
        options = [_row_choices(active[(p, s)], objective.n, current[p][s]) for p, s in group]
        group_best, group_rows = best, None
        for combo in itertools.product(*options):
            state = [s.copy() for s in best_state]
            for (p, s), row in zip(group, combo):
                state[p][s] = row
            value = objective.value_of(state)
            count += 1
            if value < group_best:
                group_best, group_rows = value, combo
        if group_rows is not None:
            for (p, s), row in zip(group, group_rows):
                best_state[p][s] = row
            best = group_best
    return best_state, best, count


def _separable(objective: RoutingObjective, loss: Any, option: Any) -> bool:
    """Whether the loss is a sum of per-task terms, each depending on one task's prediction only."""
    if option is not None:
        if not isinstance(option, bool):
            raise TypeError(f"separable must be True, False or None (decide from the loss), got {option!r}")
        return option
    return not objective.nested and (isinstance(loss, str) or _is_multitask_loss(loss))


def _permutation_gap(
    model: nn.Module, data: Any, loss: Any, method: str, rng: np.random.Generator, options: dict[str, Any]
) -> OptimizeResult:
    max_states = check_int("max_states", options.get("max_states", 50_000), minimum=1)
    loss_fn = _named_loss(loss) if isinstance(loss, str) else loss
    objective = RoutingObjective(model, data, loss_fn, layer=options.get("layer"), process_group=False)
    separable = _separable(objective, loss, options.get("separable"))
    active = _active_slots(objective)
    plan = _plan(objective, active, separable)
    modules = len(objective.state)
    if separable and modules > 1:
        how = f"{modules} permutation modules enumerated separately (the loss is a sum over tasks)"
    else:
        how = "one permutation row" if plan.rows == 1 else f"{plan.rows} permutation rows enumerated jointly"
    if modules > 1 and not separable:
        how += (
            " because the loss is not known to be a sum over tasks (a loss name or a multitask_loss is; "
            f"pass separable=True if yours is, to enumerate {plan.separable_size} states instead)"
        )
    if method == "auto":
        method = "exhaustive" if plan.size <= max_states else "ils"
    if not math.isfinite(objective.fun):
        warn_non_finite_start("optimality_gap: the loss on data", objective.fun, "the data, the targets and the loss",
                              unchanged=False, stacklevel=3)
        return make_result(
            x=objective.current(), fun=objective.fun, nit=0, nfev=objective.nfev, status=STATUS_NONFINITE,
            message="non-finite loss at the start: nothing searched, no optimum", optimum=float("nan"),
            gap=float("nan"), relative_gap=float("nan"), certified=False, current_x=objective.current(),
            method=method, kind="permutation",
        )
    if method == "exhaustive":
        if plan.size > max_states:
            raise ValueError(
                f"method='exhaustive' needs {plan.size} permutation states ({how}; only gate slots that carry "
                f"weight are assigned), more than max_states={max_states}; raise max_states=... or use method='ils'"
            )
        best_state, best, count = _enumerate_plan(objective, plan, active)
        x, optimum, nit, nfev, status, certified = best_state, min(best, objective.fun), count, count, STATUS_CONVERGED, True
        message = f"exact: {count} permutation states evaluated ({how})"
    else:
        result = local_search(
            model, data, loss_fn, "ils", rng=rng, perturbations=options.get("perturbations", 30),
            layer=options.get("layer"), apply=False, process_group=False,
        )
        x, optimum, nit, nfev = result.x, min(float(result.fun), objective.fun), int(result.nit), int(result.nfev)
        status, certified = int(result.status), False
        message = f"heuristic optimum (iterated local search: {result.message}): the gap is a lower bound"
        if plan.size > max_states:
            message += f"; exhaustive search would need {plan.size} states > max_states={max_states} ({how})"
    current = float(objective.fun)
    return make_result(
        x=x,
        fun=current,
        nit=nit,
        nfev=nfev,
        status=status,
        message=message,
        optimum=optimum,
        gap=current - optimum,
        relative_gap=(current - optimum) / max(abs(optimum), 1e-12),
        certified=certified,
        current_x=objective.current(),
        method=method,
        kind="permutation",
    )


# ----------------------------------------------------------------------------- subset gap
def _subset_gap(model: nn.Module, data: Any, loss: Any, method: str, options: dict[str, Any]) -> OptimizeResult:
    solver = "exhaustive" if method == "auto" else method
    objective = RoutingObjective(model, data, lambda p, t: torch.zeros(()), layer=options.get("layer"), process_group=False)
    layer = objective.layer
    if objective.nested:
        raise ValueError(
            "kind='subset' compares mixtures with the targets, so the MoE / MultiGateMoE must be the model itself "
            "(not a layer inside a larger model); pass the layer with its own inputs, or use kind='permutation'"
        )
    if isinstance(layer, MultiGateMoE) and not all(isinstance(t, nn.Identity) for t in layer.towers):
        raise ValueError("kind='subset' needs identity towers (the mixture must be the prediction); use kind='permutation'")
    terms = _task_terms(loss, len(objective.gate_outs))
    if terms is None:
        raise TypeError(
            "kind='subset' solves problem (2) for a named loss: pass 'squared' or 'logistic' (or mse_loss, "
            "bce_with_logits_loss, or a multitask_loss of 'mse' / 'bce' tasks, one per task); "
            f"got {getattr(loss, '__name__', type(loss).__name__)}. For any other loss use kind='permutation'"
        )
    gates = list(layer.gates) if isinstance(layer, MultiGateMoE) else [layer.gate]
    if options.get("k") is None:  # each task's own gate's k (task gates may differ)
        ks = [check_int("k", int(getattr(g, "k", getattr(g, "num_selectors", 1))), minimum=1, maximum=objective.n) for g in gates]
    else:
        ks = [check_int("k", options["k"], minimum=1, maximum=objective.n)] * len(gates)
    targets = objective.targets
    if not isinstance(targets, torch.Tensor):
        raise TypeError("kind='subset' needs a tensor of targets ([B, T] for a multi-gate MoE, [B, u] for an MoE)")
    F = objective.F.double().cpu().numpy()
    per_task: list[dict[str, Any]] = []
    best_x, current_x = [], []
    nit = nfev = 0
    status = STATUS_CONVERGED
    for t, g in enumerate(objective.gate_outs):
        w = apply_permutation(g, objective.state[objective.task_slot[t]]).double().cpu().numpy()
        if not np.allclose(w, w[:1], atol=1e-9):
            raise ValueError(f"kind='subset' needs static gates; task {t}'s gate gives different weights per example")
        name, weight = terms[t]
        y_t = (targets[:, t] if isinstance(layer, MultiGateMoE) else targets).double().cpu().numpy()
        current = subset_objective(w[0], F, y_t, loss=name)
        k = ks[t]
        best = solve_subset(F, y_t, k, loss=name, method=solver)
        nit += int(best.nit)
        nfev += int(best.nfev)
        status = max(status, int(best.status))
        support = int((w[0] > 1e-12).sum())
        per_task.append(
            {"current": current, "optimum": float(best.fun), "gap": current - float(best.fun), "loss": name,
             "weight": weight, "k": k, "current_support": support, "feasible": support <= k,
             "optimal_support": [int(i) for i in best.support], "certified": bool(best.success)}
        )
        best_x.append(best.x)
        current_x.append(w[0])
    current = float(sum(p["weight"] * p["current"] for p in per_task))
    optimum = float(sum(p["weight"] * p["optimum"] for p in per_task))
    infeasible = [t for t, p in enumerate(per_task) if not p["feasible"]]
    k_text = f"k={ks[0]}" if len(set(ks)) == 1 else f"k per task {ks}"
    message = f"exact optimum of problem (2) per task ({solver}, {k_text}); totals are the weighted sum over tasks"
    if status != STATUS_CONVERGED:
        message += "; a solver stopped on its budget (max_nodes): that task's optimum is not certified"
    if infeasible:
        message += f"; tasks {infeasible} use more than k experts, so their gap may be negative"
    return make_result(
        x=np.stack(best_x),
        fun=current,
        nit=nit,
        nfev=nfev,
        status=status,
        message=message,
        optimum=optimum,
        gap=current - optimum,
        relative_gap=(current - optimum) / max(abs(optimum), 1e-12),
        certified=status == STATUS_CONVERGED,
        current_x=np.stack(current_x),
        per_task=per_task,
        method=solver,
        kind="subset",
    )
