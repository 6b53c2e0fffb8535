"""The front door: discrete local search (descent, iterated local search, enumeration, code moves) over
the gate→expert permutation(s) of an MoE layer."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.optimize import OptimizeResult
from torch import nn

from .._validation import check_choice, check_permutation, check_rng, warn_non_finite_start
from ..batches import eval_mode
from ..distributed import all_gather_objects, broadcast_object, resolve_group
from ..result import STATUS_BUDGET, STATUS_CONVERGED, STATUS_NONFINITE, make_result
from .guards import check_guard_start, evaluate_guards, guard_report, guards_violated
from .codes import code_sites, gate_selector_slot, moved_gate_output, set_selector_slot
from ..layers.multigate import MultiGateMoE
from .moves import MOVES, MoveOperator, perturb, swap_moves
from .objective import Candidate, LossFn, RoutingObjective
from .options import METHODS, SearchOptions

__all__ = ["local_search", "Move", "METHODS"]


@dataclass
class Move:
    """One accepted move: where, what, and the verified loss before and after.

    ``kind`` is the neighbourhood (``'swap'``, ``'insertion'``, ``'rotation'``, ``'callable'``): row
    ``selector`` of permutation module ``slot`` went from ``before`` to ``after``; ``'code'``: selector
    ``selector`` of task ``slot``'s gate moved from gate slot ``before[0]`` to ``after[0]``; ``'ils'`` and
    ``'exhaustive'``: a jump to the whole state ``extra['state']`` (``slot = selector = -1``). Applied in
    order to the starting permutations, a result's moves lead to its ``x``.
    """

    kind: str
    slot: int
    selector: int
    before: list[int]
    after: list[int]
    fun_before: float
    fun_after: float
    extra: dict[str, Any] = field(default_factory=dict)


def _nan_last(item: tuple[Any, ...]) -> float:
    """Sort key of a scored candidate ``(value, ...)``: its value, NaN as +inf.

    A NaN value (a candidate whose loss is NaN on some row) compares False with everything, so a plain
    sort could leave it before improving candidates, and the scan, which stops at the first value that
    does not improve, would report a local optimum that is not one. Ties keep their order (stable sort).
    """
    value = item[0]
    return math.inf if value != value else value


class _Budget(Exception):
    """Raised inside a search when a budget (max_iter, max_evals) or the callback stops it."""


class _Search:
    """Mutable bookkeeping of one search run (the objective, the budget and the accepted moves)."""

    def __init__(self, objective: RoutingObjective, settings: SearchOptions, rng: np.random.Generator) -> None:
        self.obj = objective
        self.s = settings
        self.rng = rng
        self.nit = 0
        self.moves: list[Move] = []
        self.guards = settings.guard
        self.guard_start: list[float] = []
        self.guard_rejections = 0
        self.guard_moves = True  # False: try_accept does not check the guards (ILS's descents from kicks)

    # -- guards
    def _guard_values(self) -> list[float]:
        predictions, targets = self.obj.predictions()
        return evaluate_guards(self.guards, predictions, targets)

    def start_guards(self) -> None:
        """Record every guard's value at the start of the search (the reference of every later check)."""
        if not self.guards:
            return
        self.guard_start = self._guard_values()
        check_guard_start(self.guards, self.guard_start, "the search")

    def guard_rejects(self) -> bool:
        """True (and counted in ``guard_rejections``) when a guard at the current state is worse than at the
        start by more than its tolerance; False without guards (collective: every rank decides alike)."""
        if not self.guards:
            return False
        values = self._guard_values()
        if self.obj.any_rank(guards_violated(self.guards, self.guard_start, values)):
            self.guard_rejections += 1
            return True
        return False

    def guard_report(self) -> dict[str, dict[str, float]] | None:
        """``{name: {'start', 'end', 'tolerance', 'greater_is_better'}}`` at the current state (None: no guards)."""
        if not self.guards:
            return None
        return guard_report(self.guards, self.guard_start, self._guard_values())

    # -- budget
    def _check_budget(self) -> None:
        if self.nit >= self.s.max_iter:
            raise _Budget("max_iter reached")
        if self.s.max_evals is not None and self.obj.nfev >= self.s.max_evals:
            raise _Budget("max_evals reached")

    def _notify(self) -> None:
        if self.s.callback is not None:
            state = OptimizeResult(x=self.obj.current(), fun=self.obj.fun, nit=self.nit, nfev=self.obj.nfev)
            if self.obj.any_rank(bool(self.s.callback(state))):  # every rank stops together
                raise _Budget("stopped by callback")

    # -- neighbourhoods
    def candidates(self, move: MoveOperator, kind: str) -> list[Candidate]:
        out = []
        for p, index in enumerate(self.obj.state):
            for s in range(index.shape[0]):
                current = tuple(int(v) for v in index[s].tolist())
                # A copy: on the CPU ``.numpy()`` shares the objective's state, and a move operator that changes
                # its argument in place (``rng.shuffle(row)``) would change the state without re-evaluating it.
                row = np.array(current, dtype=np.int64)
                for new in move(row, self.rng):
                    new = tuple(int(v) for v in check_permutation(new, self.obj.n, name="row returned by the move"))
                    if new != current:
                        out.append(Candidate(p, s, new, kind))
        return out

    # -- acceptance
    def try_accept(self, cand: Candidate, predicted: float) -> bool:
        """Verify a candidate exactly; keep it only if it strictly improves by more than ``tol`` and no guard
        gets worse than at the start by more than its tolerance."""
        before_state, before = self.obj.current(), self.obj.fun
        if not predicted < before - self.s.tol:
            return False
        after = self.obj.accept(cand)
        if after < before - self.s.tol and not (self.guard_moves and self.guard_rejects()):
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
        grads = self.obj.mixture_gradients()  # this rank's rows; swap_screen sums over the ranks
        a_idx, c_idx = np.triu_indices(self.obj.n, k=1)
        scored: list[tuple[float, int, int, int, int]] = []
        for p, index in enumerate(self.obj.state):
            for s in range(index.shape[0]):
                scores = self.obj.swap_screen(p, s, grads).cpu().numpy()[a_idx, c_idx]
                scored.extend((float(v), p, s, int(a), int(c)) for v, a, c in zip(scores, a_idx, c_idx))
        scored.sort(key=_nan_last)
        return [self._swap_candidate(p, s, a, c) for _, p, s, a, c in scored[: self.s.screen]]

    def _improve_swaps(self) -> bool:
        """Swap step: screened candidates first (optional), then the structured full 2-opt scan."""
        rows = sum(index.shape[0] for index in self.obj.state)
        if self.s.screen is not None and self.obj.row_restricted and rows * self.obj.n * (self.obj.n - 1) // 2 > self.s.screen:
            if self._improve_from(self._screened_swaps(), whole=False):
                return True
        # 'best': the best swap over every permutation row; 'first': the best swap of the first row that improves.
        a_idx, c_idx = np.triu_indices(self.obj.n, k=1)
        a_list, c_list = a_idx.tolist(), c_idx.tolist()
        groups = [(p, s) for p, index in enumerate(self.obj.state) for s in range(index.shape[0])]
        batches = [groups] if self.s.strategy == "best" else [[g] for g in groups]
        for number, batch in enumerate(batches, start=1):
            scored: list[tuple[float, int, int, int, int]] = []
            for p, s in batch:
                flat = self.obj.swap_values(p, s).cpu().numpy()[a_idx, c_idx].tolist()  # Python floats
                scored.extend(zip(flat, itertools.repeat(p), itertools.repeat(s), a_list, c_list))
            scored.sort(key=_nan_last)
            for value, p, s, a, c in scored:
                if not value < self.obj.fun - self.s.tol:
                    break
                if self.try_accept(self._swap_candidate(p, s, a, c), value):
                    self._notify()
                    return True
            # Between batches only: after the last one the whole neighbourhood was scanned (a local optimum).
            if number < len(batches) and self.s.max_evals is not None and self.obj.nfev >= self.s.max_evals:
                raise _Budget("max_evals reached")
        return False

    def _improve_from(self, pool: list[Candidate], whole: bool = True) -> bool:
        """Accept the best (``'best'``) or the first improving block's best (``'first'``) candidate of ``pool``.

        ``whole``: ``pool`` is the whole neighbourhood, so a budget reached after its last block is not a stop
        (nothing in the neighbourhood improves: a local optimum); a screened pool is not.
        """
        block = max(1, len(pool)) if self.s.strategy == "best" else 32  # (a move operator may yield nothing new)
        for start in range(0, len(pool), block):
            chunk = pool[start : start + block]
            values = self.obj.evaluate(chunk)
            for i in np.argsort(values, kind="stable"):
                if not values[i] < self.obj.fun - self.s.tol:
                    break
                if self.try_accept(chunk[i], float(values[i])):
                    self._notify()
                    return True
            more = not whole or start + block < len(pool)
            if more and self.s.max_evals is not None and self.obj.nfev >= self.s.max_evals:
                raise _Budget("max_evals reached")
        return False

    def descend(self, move: MoveOperator, kind: str) -> None:
        """Improve until no move of the neighbourhood improves (or a budget stops the search)."""
        improved = True
        while improved:
            improved = self.improve_once(move, kind)


def local_search(
    model: nn.Module,
    data: Any,
    loss: LossFn,
    method: str | MoveOperator = "swap",
    *,
    rng: Any = None,
    process_group: Any = None,
    options: SearchOptions | None = None,
    **kwargs: Any,
) -> OptimizeResult:
    """Improve the permutation(s) between gate and experts by discrete local search.

    Expert outputs and gate outputs are computed once on ``data``; every candidate's loss is then
    exact without re-running the experts (see :class:`RoutingObjective`). A move is accepted only if
    its loss, recomputed from scratch, is lower than the current one by more than ``tol``: the
    returned permutation is never worse than the starting one.

    Args:
        model: an ``MoE``, a ``MultiGateMoE`` or a model containing one (pick it with ``layer=``); a
            wrapping model must call the layer once per forward.
        data: ``(inputs, targets)``, a list of such batches or a ``DataLoader`` (concatenated), or a torch
            ``Dataset`` of rows (stacked); a list of single rows is refused (the evaluation data; under a
            process group, this rank's shard, which may be empty).
        loss: ``loss(prediction, targets)`` returning per-example losses ``[B]`` (fast path) or a scalar
            (single process only).
        method: ``'swap'`` (2-opt descent), ``'insertion'``, ``'rotation'``, ``'ils'`` (iterated local
            search: descent, random kicks, optional restarts), ``'exhaustive'`` (all permutations, small
            n), ``'codes'`` (move selectors of static binary DSelectK/COMET gates by rewriting their
            codes), or a callable move operator ``move(row, rng) -> iterable of rows``.
        rng: ``None``, a seed or a ``numpy.random.Generator`` for randomised methods (``'ils'``, a
            callable). Under a process group rank 0's generator state is broadcast first, so every rank
            draws the same kicks (the generators of the other ranks are set to it).
        process_group: ``None`` (default): the world group when ``torch.distributed`` is initialised,
            else a single process; ``False``: this process alone; or a ``ProcessGroup``. Every rank of
            the group must call ``local_search`` with the same model state, method and options. The
            objective is then the mean loss over the union of the shards, every candidate value is
            summed over the ranks, and all ranks accept the same moves and end with the same permutation.
        options: a :class:`~routing_search.search.SearchOptions`, or pass the options as keywords:

    Keyword options (see :class:`~routing_search.search.SearchOptions` and
    :func:`~routing_search.search.option_names`): ``layer``, ``apply`` (default True: write the result
    into the model; False leaves the model as it was, codes included), ``tol``, ``max_iter``,
    ``max_evals``, ``max_rows``, ``callback``,
    ``guard`` (validation metrics a move must not make worse, relative to the start of the search: see
    :mod:`routing_search.search.guards`; a move the loss accepts but a guard rejects is undone, counted in
    ``guard_rejections``, and the search goes on with the next candidate; under a process group the
    predictions of all ranks are gathered for the metrics); ``strategy`` (``'best'``/``'first'``) for the
    descents (``'swap'``, ``'insertion'``, ``'rotation'``, ``'ils'``, a callable); ``screen`` for the swap
    descent (``'swap'``, ``'ils'`` with the swap neighbourhood); ``'ils'``: ``neighbourhood``, ``perturbations``,
    ``strength``, ``restart_every``; ``'exhaustive'``: ``max_states``. An option the method would ignore is
    refused.

    Returns:
        ``OptimizeResult`` (built by :func:`routing_search.result.make_result`) with ``x`` (list of
        ``[S, n]`` int arrays, one per permutation module of the layer), ``fun``, ``fun0``, ``nit``
        (accepted moves; for ``'ils'`` including those of discarded descents), ``nfev`` (candidate /
        state evaluations; ``max_evals`` is checked between candidate blocks), ``status`` (0: finished by
        its own criterion; 1: stopped by ``max_iter``, ``max_evals`` or the callback, the best state is
        returned; 2: the loss at the start is not finite, nothing was searched), ``success``
        (``status == 0``), ``message``, ``moves`` (list of :class:`Move`; applied in order to the starting
        permutations they lead to ``x``), ``method`` and, for ``'codes'``, ``codes`` (``[task, selector,
        slot]`` of every static binary selector at the end), ``guard_rejections`` (moves undone because a
        guard rejected them), ``guard`` (``{name: {'start', 'end', 'tolerance', 'greater_is_better'}}``;
        ``None`` without guards), and ``all_reduce`` (``calls``,
        ``float64_values``: what the search all-reduces under a process group, counted in a single
        process too; besides, one ``all_gather_object`` at the start and one at the end).

    Example:
        >>> import torch
        >>> from routing_search import MoE, TopK, make_experts
        >>> from routing_search.losses import mse_loss
        >>> moe = MoE(make_experts(4, 3, [8], 2, generator=torch.Generator().manual_seed(0)),
        ...           TopK(num_experts=4, k=2, input_dim=3))
        >>> x, y = torch.randn(64, 3), torch.randn(64, 2)
        >>> result = local_search(moe, (x, y), mse_loss, method="swap")
        >>> bool(result.fun <= result.fun0), result.status
        (True, 0)
    """
    if callable(method) and not isinstance(method, str):
        move_fn: MoveOperator | None = method
        method_name = "callable"
    else:
        method_name = check_choice("method", method, METHODS)
        move_fn = MOVES.get(method_name)
    if options is None:
        opts = SearchOptions.for_method(method_name, **kwargs)
    else:
        if not isinstance(options, SearchOptions):
            raise TypeError(f"options must be a SearchOptions or None, got {type(options).__name__}")
        if kwargs:
            raise TypeError(f"pass the search options either as options= or as keywords, not both (got {sorted(kwargs)})")
        options.check_method(method_name)
        opts = options
    generator = check_rng(rng, name="rng")
    group = resolve_group(process_group)

    objective = RoutingObjective(model, data, loss, layer=opts.layer, max_rows=opts.max_rows, process_group=False if group is None else group)
    if group is not None and method_name in ("ils", "callable"):
        generator = _synchronised(generator, group)
    if not math.isfinite(objective.fun0):
        warn_non_finite_start("local_search: the loss on data", objective.fun0, "the data, the targets and the loss")
        return make_result(
            x=objective.current(), fun=objective.fun0, nit=0, nfev=objective.nfev, status=STATUS_NONFINITE,
            message="non-finite loss at the start: nothing searched", fun0=objective.fun0, moves=[], method=method_name,
            guard_rejections=0, guard=None,
            all_reduce={"calls": objective.all_reduce_calls, "float64_values": objective.all_reduce_values},
        )
    search = _Search(objective, opts, generator)
    saved_gates = _gate_parameters(objective) if method_name == "codes" else None
    try:
        with eval_mode(model):
            search.start_guards()
            message, status = _run(search, method_name, move_fn, opts)
            guard_report = search.guard_report()
        if group is not None:
            _check_ranks_agree(objective, search, group)
    except BaseException:
        if saved_gates is not None:
            _restore_parameters(saved_gates)
        raise
    extra: dict[str, Any] = {}
    if saved_gates is not None:
        gates = _gates_of(objective)
        extra["codes"] = [[s.task, s.selector, gate_selector_slot(gates[s.task], s.selector)] for s in code_sites(gates)]
    if opts.apply:
        objective.write_back()
    elif saved_gates is not None:
        _restore_parameters(saved_gates)
    return make_result(
        x=objective.current(), fun=objective.fun, nit=search.nit, nfev=objective.nfev, status=status, message=message,
        fun0=objective.fun0, moves=search.moves, method=method_name, guard_rejections=search.guard_rejections,
        guard=guard_report, all_reduce={"calls": objective.all_reduce_calls, "float64_values": objective.all_reduce_values}, **extra,
    )


def _synchronised(rng: np.random.Generator, group: Any) -> np.random.Generator:
    """``rng`` set to rank 0's generator state on every rank of ``group``."""
    state = broadcast_object(rng.bit_generator.state, group)
    if type(rng.bit_generator).__name__ != state["bit_generator"]:
        rng = np.random.Generator(getattr(np.random, state["bit_generator"])())
    rng.bit_generator.state = state
    return rng


def _check_ranks_agree(objective: RoutingObjective, search: _Search, group: Any) -> None:
    """Raise if the ranks ended with different permutations (a guard: the reductions make them agree)."""
    mine = ([s.tolist() for s in objective.current()], search.nit, len(search.moves))
    reports = all_gather_objects(mine, group)
    if any(r != reports[0] for r in reports[1:]):
        raise RuntimeError(
            "the ranks ended the search with different permutations; every rank must call local_search with the "
            "same model state, method, options and loss"
        )


def _gates_of(objective: RoutingObjective) -> list[nn.Module]:
    layer = objective.layer
    return list(layer.gates) if isinstance(layer, MultiGateMoE) else [layer.gate]


def _gate_parameters(objective: RoutingObjective) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, copy) of every gate of the layer, to undo code moves."""
    return [(p, p.detach().clone()) for gate in _gates_of(objective) for p in gate.parameters()]


@torch.no_grad()
def _restore_parameters(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for p, value in saved:
        p.copy_(value)


def _run(search: _Search, method_name: str, move_fn: MoveOperator | None, opts: SearchOptions) -> tuple[str, int]:
    """Run the chosen method; returns ``(message, status)`` (status 1: stopped by a budget or callback)."""
    try:
        if method_name == "ils":
            _iterated_local_search(search, opts)
            return "iterated local search finished its perturbations", STATUS_CONVERGED
        if method_name == "exhaustive":
            _exhaustive(search, opts.max_states)
            return "global optimum over all permutations (exhaustive)", STATUS_CONVERGED
        if method_name == "codes":
            _code_descent(search)
            return "local optimum: no improving code move", STATUS_CONVERGED
        assert move_fn is not None
        search.descend(move_fn, method_name)
        return "local optimum: no improving move in the neighbourhood", STATUS_CONVERGED
    except _Budget as stop:
        return str(stop), STATUS_BUDGET


def _iterated_local_search(search: _Search, opts: SearchOptions) -> None:
    """Descent, then kicks from the best state; a budget stop keeps the best state seen (even mid-descent).

    ``search.moves`` keeps the moves of the first descent and one ``'ils'`` move (with the whole state)
    per improving kick, so that replaying them from the start leads to the returned state.

    Guards: the first descent checks them move by move; a descent from a kick starts from a state that
    may be worse than the start in loss and metric alike, so its moves are not checked one by one, and
    its end becomes the new best only if it improves the loss and passes the guards.
    """
    name = opts.neighbourhood
    obj, rng = search.obj, search.rng
    search.descend(MOVES[name], name)
    best_state, best_fun = obj.current(), obj.fun
    try:
        for kick in range(opts.perturbations):
            search._check_budget()
            start = [s.copy() for s in best_state]
            if opts.restart_every is not None and (kick + 1) % opts.restart_every == 0:
                start = [np.stack([rng.permutation(obj.n) for _ in range(s.shape[0])]) for s in start]
            else:
                p = int(rng.integers(len(start)))
                sel = int(rng.integers(start[p].shape[0]))
                start[p][sel] = perturb(start[p][sel], opts.strength, rng)
            obj.set_state(start)
            moves_before = len(search.moves)
            search.guard_moves = False
            try:
                search.descend(MOVES[name], name)
            finally:  # also when a budget stops the descent: keep its end point if it is the best so far
                search.guard_moves = True
                del search.moves[moves_before:]  # the trajectory's moves are replaced by one 'ils' move
                if obj.fun < best_fun - search.s.tol and not search.guard_rejects():
                    state = obj.current()
                    search.moves.append(Move("ils", -1, -1, [], [], best_fun, obj.fun, {"kick": kick, "state": [s.tolist() for s in state]}))
                    best_state, best_fun = state, obj.fun
    finally:
        if any(not np.array_equal(a, b) for a, b in zip(obj.current(), best_state)):
            obj.set_state(best_state)


# Candidates evaluated per block by method='exhaustive' (one block up to n = 7); ``max_evals`` is checked
# between blocks, as for every other method.
_EXHAUSTIVE_BLOCK = 5040


def _exhaustive(search: _Search, max_states: int) -> None:
    """Jump to the best state over all permutations of every row, within the budget.

    ``max_iter`` and ``max_evals`` are honoured as by the other methods (``max_iter=0``: no jump; a
    ``max_evals`` stop jumps to the best state evaluated so far, then reports the budget stop), and the
    callback sees the accepted jump.
    """
    obj = search.obj
    rows = [(p, s) for p, index in enumerate(obj.state) for s in range(index.shape[0])]
    count = math.factorial(obj.n) ** len(rows)
    if count > max_states:
        raise ValueError(
            f"exhaustive search over {len(rows)} permutation row(s) of {obj.n} experts has {count} states, "
            f"more than max_states={max_states}; raise max_states or use method='swap'/'ils'"
        )
    search._check_budget()
    max_evals = search.s.max_evals
    stopped: str | None = None
    start, start_fun = obj.current(), obj.fun
    accepted = False
    if len(rows) == 1:
        p, s = rows[0]
        perms = list(itertools.permutations(range(obj.n)))
        cands: list[Candidate] = []
        blocks: list[np.ndarray] = []
        for lo in range(0, len(perms), _EXHAUSTIVE_BLOCK):
            chunk = [Candidate(p, s, perm, "exhaustive") for perm in perms[lo : lo + _EXHAUSTIVE_BLOCK]]
            blocks.append(obj.evaluate(chunk))
            cands += chunk
            if lo + _EXHAUSTIVE_BLOCK < len(perms) and max_evals is not None and obj.nfev >= max_evals:
                stopped = "max_evals reached"
                break
        values = np.concatenate(blocks)
        # Without guards the best state only; with guards the best one that no guard rejects.
        for best in np.argsort(values, kind="stable"):
            if not values[best] < start_fun - search.s.tol:
                break
            if search.try_accept(cands[best], float(values[best])):
                # Like every 'exhaustive' move: a jump to the whole state (see Move), so replays treat it alike.
                row_move = search.moves[-1]
                search.moves[-1] = Move("exhaustive", -1, -1, [], [], row_move.fun_before, row_move.fun_after,
                                        {"state": [s.tolist() for s in obj.current()]})
                accepted = True
                break
            if not search.guards:
                break
    else:
        improving: list[tuple[float, int, list[np.ndarray]]] = []
        for number, combo in enumerate(itertools.product(itertools.permutations(range(obj.n)), repeat=len(rows))):
            if number > 0 and max_evals is not None and obj.nfev >= max_evals:
                stopped = "max_evals reached"
                break
            state = [x.copy() for x in start]
            for (p, s), perm in zip(rows, combo):
                state[p][s] = perm
            value = obj.value_of(state)
            if value < start_fun - search.s.tol:
                improving.append((value, number, state))
                if not search.guards:  # only the best is tried: keep one
                    improving = [min(improving, key=lambda item: item[:2])]
        improving.sort(key=lambda item: item[:2])
        for _, _, best_state in improving:
            after = obj.set_state(best_state)
            if after < start_fun - search.s.tol and not search.guard_rejects():
                search.moves.append(Move("exhaustive", -1, -1, [], [], start_fun, after, {"state": [s.tolist() for s in best_state]}))
                search.nit += 1
                accepted = True
                break
            if not search.guards:
                break
        if not accepted and any(not np.array_equal(a, b) for a, b in zip(obj.current(), start)):
            obj.set_state(start)
    if accepted:
        search._notify()
    if stopped is not None:
        raise _Budget(stopped)


def _code_descent(search: _Search) -> None:
    """Best-improvement descent over 'move one selector of a static binary gate to another slot'."""
    obj = search.obj
    gates = _gates_of(obj)
    if not code_sites(gates):
        raise ValueError(
            "method='codes' needs a static DSelectK or COMET gate whose codes are binary; "
            "harden the gate first (routing_search.analysis.harden with snap=True, the default, which keeps the "
            "gate's type; a HardGate wrapper, from snap=False or a per-example gate, has no codes to move) "
            "or use a permutation method"
        )
    while True:
        search._check_budget()
        scored: list[tuple[float, Any, int]] = []
        for site in code_sites(gates):
            g = obj.gate_outs[site.task]
            current = gate_selector_slot(gates[site.task], site.selector)  # not from the rows: a shard may be empty
            for slot in range(obj.n):
                if slot != current:
                    moved = moved_gate_output(g, site.selector, slot, gates[site.task])
                    scored.append((obj.value_with_gate_outputs({site.task: moved}), site, slot))
        scored.sort(key=_nan_last)
        if not any(_try_code_move(search, gates, site, slot) for value, site, slot in scored if value < obj.fun - search.s.tol):
            return
        search._notify()


def _try_code_move(search: _Search, gates: list[nn.Module], site: Any, slot: int) -> bool:
    """Rewrite one selector's codes and keep the change only if the re-computed loss improves."""
    obj = search.obj
    gate = gates[site.task]
    before = obj.fun
    saved = {name: p.detach().clone() for name, p in gate.named_parameters()}
    current = gate_selector_slot(gate, site.selector)
    set_selector_slot(gate, site.selector, slot)
    after = obj.refresh_gates()
    if after < before - search.s.tol and not search.guard_rejects():
        search.moves.append(Move("code", site.task, site.selector, [current], [slot], before, after))
        search.nit += 1
        return True
    with torch.no_grad():
        for name, p in gate.named_parameters():
            p.copy_(saved[name])
    obj.refresh_gates()
    return False
