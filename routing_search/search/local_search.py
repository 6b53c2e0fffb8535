"""The front door: discrete local search over the gate→expert permutation(s) of an MoE layer."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.optimize import OptimizeResult
from torch import nn

from .._validation import check_choice, check_int, check_no_unknown_options, check_positive_float
from ..layers.permutation import check_permutation
from .codes import code_sites, moved_gate_output, selector_slot, set_selector_slot
from .moves import MOVES, MoveOperator, perturb, swap_moves
from ..batches import eval_mode
from .objective import Candidate, LossFn, RoutingObjective

__all__ = ["local_search", "Move", "METHODS"]

METHODS = ("swap", "insertion", "rotation", "ils", "exhaustive", "codes")
_COMMON = ("layer", "apply", "tol", "max_iter", "max_evals", "strategy", "screen", "max_rows", "callback")
_METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "swap": (),
    "insertion": (),
    "rotation": (),
    "ils": ("neighbourhood", "perturbations", "strength", "restart_every"),
    "exhaustive": ("max_states",),
    "codes": (),
    "callable": (),
}


@dataclass
class Move:
    """One accepted move: where, what, and the verified loss before and after."""

    kind: str
    slot: int
    selector: int
    before: list[int]
    after: list[int]
    fun_before: float
    fun_after: float
    extra: dict[str, Any] = field(default_factory=dict)


class _Budget(Exception):
    """Raised inside a search when a budget (max_iter, max_evals) or the callback stops it."""


@dataclass
class _Settings:
    tol: float
    max_iter: int
    max_evals: int | None
    strategy: str
    screen: int | None
    callback: Callable[[OptimizeResult], bool | None] | None


class _Search:
    """Mutable bookkeeping of one search run (the objective, the budget and the accepted moves)."""

    def __init__(self, objective: RoutingObjective, settings: _Settings, rng: np.random.Generator) -> None:
        self.obj = objective
        self.s = settings
        self.rng = rng
        self.nit = 0
        self.moves: list[Move] = []

    # -- budget
    def _check_budget(self) -> None:
        if self.nit >= self.s.max_iter:
            raise _Budget("max_iter reached")
        if self.s.max_evals is not None and self.obj.nfev >= self.s.max_evals:
            raise _Budget("max_evals reached")

    def _notify(self) -> None:
        if self.s.callback is not None:
            state = OptimizeResult(x=self.obj.current(), fun=self.obj.fun, nit=self.nit, nfev=self.obj.nfev)
            if self.s.callback(state):
                raise _Budget("stopped by callback")

    # -- neighbourhoods
    def candidates(self, move: MoveOperator, kind: str) -> list[Candidate]:
        out = []
        for p, index in enumerate(self.obj.state):
            for s in range(index.shape[0]):
                row = index[s].cpu().numpy()
                for new in move(row, self.rng):
                    new = tuple(int(v) for v in check_permutation(new, self.obj.n, name="row returned by the move"))
                    if new != tuple(int(v) for v in row):
                        out.append(Candidate(p, s, new, kind))
        return out

    # -- acceptance
    def try_accept(self, cand: Candidate, predicted: float) -> bool:
        """Verify a candidate exactly; keep it only if it strictly improves by more than ``tol``."""
        before_state, before = self.obj.current(), self.obj.fun
        if not predicted < before - self.s.tol:
            return False
        after = self.obj.accept(cand)
        if after < before - self.s.tol:
            old_row = before_state[cand.slot][cand.selector]
            self.moves.append(Move(cand.kind, cand.slot, cand.selector, old_row.tolist(), list(cand.row), before, after))
            self.nit += 1
            return True
        self.obj.set_state(before_state)
        return False

    def improve_once(self, move: MoveOperator, kind: str) -> bool:
        """One step of the descent; False at a local optimum of the (full) neighbourhood."""
        self._check_budget()
        if move is swap_moves:
            return self._improve_swaps()
        return self._improve_from(self.candidates(move, kind))

    def _swap_candidate(self, slot: int, selector: int, a: int, c: int) -> Candidate:
        row = self.obj.state[slot][selector].cpu().numpy().copy()
        row[a], row[c] = row[c], row[a]
        return Candidate(slot, selector, tuple(int(v) for v in row), "swap")

    def _screened_swaps(self) -> list[Candidate]:
        """The ``screen`` swaps (over all rows) with the most negative first-order estimate ⟨∂L/∂y, Δy⟩."""
        grads = self.obj.mixture_gradients()
        a_idx, c_idx = np.triu_indices(self.obj.n, k=1)
        scored = []
        for p, index in enumerate(self.obj.state):
            for s in range(index.shape[0]):
                scores = self.obj.swap_screen(p, s, grads).cpu().numpy()[a_idx, c_idx]
                scored.extend((float(v), p, s, int(a), int(c)) for v, a, c in zip(scores, a_idx, c_idx))
        scored.sort(key=lambda item: item[0])
        return [self._swap_candidate(p, s, a, c) for _, p, s, a, c in scored[: self.s.screen]]

    def _improve_swaps(self) -> bool:
        """Swap step: screened candidates first (optional), then the structured full 2-opt scan."""
        rows = sum(index.shape[0] for index in self.obj.state)
        if self.s.screen is not None and self.obj.row_restricted and rows * self.obj.n * (self.obj.n - 1) // 2 > self.s.screen:
            if self._improve_from(self._screened_swaps()):
                return True
        # 'best': the best swap over every permutation row; 'first': the best swap of the first row that improves.
        a_idx, c_idx = np.triu_indices(self.obj.n, k=1)
        groups = [(p, s) for p, index in enumerate(self.obj.state) for s in range(index.shape[0])]
        batches = [groups] if self.s.strategy == "best" else [[g] for g in groups]
        for batch in batches:
            scored = []
            for p, s in batch:
                flat = self.obj.swap_values(p, s).cpu().numpy()[a_idx, c_idx]
                scored.extend((float(v), p, s, int(a), int(c)) for v, a, c in zip(flat, a_idx, c_idx))
            scored.sort(key=lambda item: item[0])
            for value, p, s, a, c in scored:
                if not value < self.obj.fun - self.s.tol:
                    break
                if self.try_accept(self._swap_candidate(p, s, a, c), value):
                    self._notify()
                    return True
            if self.s.max_evals is not None and self.obj.nfev >= self.s.max_evals:
                raise _Budget("max_evals reached")
        return False

    def _improve_from(self, pool: list[Candidate]) -> bool:
        block = len(pool) if self.s.strategy == "best" else 32
        for start in range(0, len(pool), block):
            chunk = pool[start : start + block]
            values = self.obj.evaluate(chunk)
            for i in np.argsort(values, kind="stable"):
                if not values[i] < self.obj.fun - self.s.tol:
                    break
                if self.try_accept(chunk[i], float(values[i])):
                    self._notify()
                    return True
            if self.s.max_evals is not None and self.obj.nfev >= self.s.max_evals:
                raise _Budget("max_evals reached")
        return False

    def descend(self, move: MoveOperator, kind: str) -> None:
        """Improve until no move of the neighbourhood improves (or a budget stops the search)."""
        improved = True
        while improved:
            improved = self.improve_once(move, kind)


def _as_rng(rng: Any) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def local_search(
    model: nn.Module,
    data: Any,
    loss: LossFn,
    method: str | MoveOperator = "swap",
    *,
    rng: Any = None,
    **options: Any,
) -> OptimizeResult:
    """Improve the permutation(s) between gate and experts by discrete local search.

    Expert outputs and gate outputs are computed once on ``data``; every candidate's loss is then
    exact without re-running the experts (see :class:`RoutingObjective`). A move is accepted only if
    its loss, recomputed from scratch, is lower than the current one by more than ``tol``: the
    returned permutation is never worse than the starting one.

    Args:
        model: an ``MoE``, a ``MultiGateMoE`` or a model containing one (pick it with ``layer=``).
        data: ``(inputs, targets)`` or an iterable of such pairs (the evaluation data).
        loss: ``loss(prediction, targets)`` returning per-example losses ``[B]`` (fast path) or a scalar.
        method: ``'swap'`` (2-opt descent), ``'insertion'``, ``'rotation'``, ``'ils'`` (iterated local
            search: descent, random kicks, optional restarts), ``'exhaustive'`` (all permutations, small
            n), ``'codes'`` (move selectors of static binary DSelectK/COMET gates by rewriting their
            codes), or a callable move operator ``move(row, rng) -> iterable of rows``.
        rng: seed or ``numpy.random.Generator`` for randomised methods.

    Options (all methods): ``layer`` (module or name), ``apply`` (default True: write the result into
    the model), ``tol`` (default 0: any strict improvement), ``max_iter`` (accepted moves, default
    1000), ``max_evals`` (candidate evaluations), ``strategy`` (``'best'`` or ``'first'``
    improvement), ``screen`` (keep the best ``screen`` swaps by the first-order estimate
    ⟨∂L/∂y, Δy⟩ before exact evaluation; a full scan still confirms local optimality),
    ``max_rows`` (memory cap per evaluation chunk), ``callback(intermediate_result)`` (return True to
    stop). ``'ils'``: ``neighbourhood`` (default 'swap'), ``perturbations`` (default 20), ``strength``
    (random swaps per kick, default 3), ``restart_every`` (a random restart every this many kicks;
    default None). ``'exhaustive'``: ``max_states`` (default 50000).

    Returns:
        ``OptimizeResult`` with ``x`` (list of ``[S, n]`` int arrays, one per permutation module of the
        layer), ``fun``, ``fun0``, ``nit`` (accepted moves; for ``'ils'`` including those of discarded descents),
        ``nfev`` (candidate / state evaluations; ``max_evals`` is checked between candidate blocks),
        ``success``, ``status``, ``message`` and ``moves`` (list of :class:`Move`).

    Example:
        >>> result = local_search(moe, (x_val, y_val), per_example_mse, method="swap")  # doctest: +SKIP
        >>> result.fun <= result.fun0
        True
    """
    if callable(method) and not isinstance(method, str):
        move_fn: MoveOperator | None = method
        method_name = "callable"
    else:
        method_name = check_choice("method", method, METHODS)
        move_fn = MOVES.get(method_name)
    check_no_unknown_options(f"local_search(method={method_name!r})", options, _COMMON + _METHOD_OPTIONS[method_name])
    tol = check_positive_float("tol", options.get("tol", 0.0), allow_zero=True)
    max_iter = check_int("max_iter", options.get("max_iter", 1000), minimum=0)
    max_evals = options.get("max_evals")
    if max_evals is not None:
        max_evals = check_int("max_evals", max_evals, minimum=1)
    strategy = check_choice("strategy", options.get("strategy", "best"), ("best", "first"))
    screen = options.get("screen")
    if screen is not None:
        screen = check_int("screen", screen, minimum=1)
    callback = options.get("callback")
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable(intermediate_result) or None")

    objective = RoutingObjective(model, data, loss, layer=options.get("layer"), max_rows=options.get("max_rows", 1 << 14))
    search = _Search(objective, _Settings(tol, max_iter, max_evals, strategy, screen, callback), _as_rng(rng))
    with eval_mode(model):
        message, status = _run(search, method_name, move_fn, options)
    if options.get("apply", True):
        objective.write_back()
    return OptimizeResult(
        x=objective.current(),
        fun=objective.fun,
        fun0=objective.fun0,
        nit=search.nit,
        nfev=objective.nfev,
        success=True,
        status=status,
        message=message,
        moves=search.moves,
        method=method_name,
    )


def _run(search: _Search, method_name: str, move_fn: MoveOperator | None, options: dict[str, Any]) -> tuple[str, int]:
    """Run the chosen method; returns ``(message, status)`` (status 1: stopped by a budget or callback)."""
    try:
        if method_name == "ils":
            _iterated_local_search(search, options)
            return "iterated local search finished its perturbations", 0
        if method_name == "exhaustive":
            _exhaustive(search, check_int("max_states", options.get("max_states", 50_000), minimum=1))
            return "global optimum over all permutations (exhaustive)", 0
        if method_name == "codes":
            _code_descent(search)
            return "local optimum: no improving code move", 0
        search.descend(move_fn, method_name)
        return "local optimum: no improving move in the neighbourhood", 0
    except _Budget as stop:
        return str(stop), 1


def _iterated_local_search(search: _Search, options: dict[str, Any]) -> None:
    name = check_choice("neighbourhood", options.get("neighbourhood", "swap"), tuple(MOVES))
    perturbations = check_int("perturbations", options.get("perturbations", 20), minimum=0)
    strength = check_int("strength", options.get("strength", 3), minimum=1)
    restart_every = options.get("restart_every")
    if restart_every is not None:
        restart_every = check_int("restart_every", restart_every, minimum=1)
    obj, rng = search.obj, search.rng
    search.descend(MOVES[name], name)
    best_state, best_fun = obj.current(), obj.fun
    try:
        for kick in range(perturbations):
            search._check_budget()
            start = [s.copy() for s in best_state]
            if restart_every is not None and (kick + 1) % restart_every == 0:
                start = [np.stack([rng.permutation(obj.n) for _ in range(s.shape[0])]) for s in start]
            else:
                p = int(rng.integers(len(start)))
                sel = int(rng.integers(start[p].shape[0]))
                start[p][sel] = perturb(start[p][sel], strength, rng)
            obj.set_state(start)
            moves_before = len(search.moves)
            search.descend(MOVES[name], name)
            del search.moves[moves_before:]  # keep the moves of the best trajectory only (recorded below)
            if obj.fun < best_fun - search.s.tol:
                search.moves.append(
                    Move("ils", -1, -1, [], [], best_fun, obj.fun, {"kick": kick, "state": [s.tolist() for s in obj.current()]})
                )
                best_state, best_fun = obj.current(), obj.fun
    finally:
        obj.set_state(best_state)


def _exhaustive(search: _Search, max_states: int) -> None:
    obj = search.obj
    rows = [(p, s) for p, index in enumerate(obj.state) for s in range(index.shape[0])]
    count = math.factorial(obj.n) ** len(rows)
    if count > max_states:
        raise ValueError(
            f"exhaustive search over {len(rows)} permutation row(s) of {obj.n} experts has {count} states, "
            f"more than max_states={max_states}; raise max_states or use method='swap'/'ils'"
        )
    start, start_fun = obj.current(), obj.fun
    if len(rows) == 1:
        p, s = rows[0]
        cands = [Candidate(p, s, perm, "exhaustive") for perm in itertools.permutations(range(obj.n))]
        values = obj.evaluate(cands)
        best = int(np.argmin(values))
        if values[best] < start_fun - search.s.tol:
            search.try_accept(cands[best], float(values[best]))
        return
    best_state, best_fun = None, start_fun
    for combo in itertools.product(itertools.permutations(range(obj.n)), repeat=len(rows)):
        state = [x.copy() for x in start]
        for (p, s), perm in zip(rows, combo):
            state[p][s] = perm
        value = obj.value_of(state)
        if value < best_fun - search.s.tol:
            best_state, best_fun = state, value
    if best_state is not None:
        after = obj.set_state(best_state)
        if after < start_fun - search.s.tol:
            search.moves.append(Move("exhaustive", -1, -1, [], [], start_fun, after, {"state": [s.tolist() for s in best_state]}))
            search.nit += 1
        else:
            obj.set_state(start)


def _code_descent(search: _Search) -> None:
    """Best-improvement descent over 'move one selector of a static binary gate to another slot'."""
    obj = search.obj
    gates = [obj.layer.gate] if not hasattr(obj.layer, "gates") else list(obj.layer.gates)
    if not code_sites(gates):
        raise ValueError(
            "method='codes' needs a static DSelectK or COMET gate whose codes are binary; "
            "harden the gate first (routing_search.analysis.harden) or use a permutation method"
        )
    while True:
        search._check_budget()
        scored: list[tuple[float, Any, int]] = []
        for site in code_sites(gates):
            g = obj.gate_outs[site.task]
            current = selector_slot(g, site.selector)
            for slot in range(obj.n):
                if slot != current:
                    moved = moved_gate_output(g, site.selector, slot, gates[site.task])
                    scored.append((obj.value_with_gate_outputs({site.task: moved}), site, slot))
        scored.sort(key=lambda item: item[0])
        if not any(_try_code_move(search, gates, site, slot) for value, site, slot in scored if value < obj.fun - search.s.tol):
            return
        search._notify()


def _try_code_move(search: _Search, gates: list[nn.Module], site: Any, slot: int) -> bool:
    """Rewrite one selector's codes and keep the change only if the re-computed loss improves."""
    obj = search.obj
    gate = gates[site.task]
    before = obj.fun
    saved = {name: p.detach().clone() for name, p in gate.named_parameters()}
    current = selector_slot(obj.gate_outs[site.task], site.selector)
    set_selector_slot(gate, site.selector, slot)
    after = obj.refresh_gates()
    if after < before - search.s.tol:
        search.moves.append(Move("code", site.task, site.selector, [current], [slot], before, after))
        search.nit += 1
        return True
    with torch.no_grad():
        for name, p in gate.named_parameters():
            p.copy_(saved[name])
    obj.refresh_gates()
    return False
