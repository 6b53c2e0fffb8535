"""Exact solvers for the cardinality-constrained mixture problem (problem (2) of the DSelect-k paper).

With the experts frozen, their outputs ``F`` ([B, n, u]) on a data set and targets ``y`` ([B, u]), solve

    min_w  (1/B) Σ_b ℓ(Σ_i w_i F_bi, y_b)   s.t.  w ∈ simplex,  ‖w‖₀ ≤ k.

By Prop. 1 of the paper this is the problem a static DSelect-k gate with binary codes solves.

Losses: a NAME, one convention throughout the ``exact`` package (:mod:`routing_search.exact.arrays`):

* ``"squared"``: ℓ(ŷ, y) = (1/u)‖ŷ − y‖² (mean over the u output units), averaged over the B
  examples — exactly what :func:`routing_search.losses.mse_loss` gives;
* ``"logistic"``: u = 1, y ∈ {0, 1}, the mixture is a logit: ℓ(ŷ, y) = log(1 + e^ŷ) − y·ŷ
  (binary cross-entropy with logits, :func:`routing_search.losses.bce_with_logits_loss`), averaged
  over the B examples.

Both are convex in ``w``, so for a fixed support the problem is convex over a face of the simplex.

Certificates. Every convex sub-problem returns a *certified* lower bound on its own optimum: for a
convex ``f`` over a simplex face and any feasible point ``w``,
``f* ≥ f(w) − (∇f(w)·w − min_i ∇f(w)_i)`` (linearise at ``w`` and minimise the linear model over the
face: the Frank–Wolfe gap). This holds whatever solver produced ``w``, so the ``bound`` reported by
:func:`solve_subset` is a proven global lower bound, not an estimate.
"""

from __future__ import annotations

import heapq
import itertools
import math
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
from scipy.optimize import OptimizeResult, minimize
from scipy.special import expit

from .._validation import (
    as_finite_array,
    check_int,
    check_no_unknown_options,
    check_positive_float,
    check_rng,
    resolve_method,
)
from ..result import STATUS_BUDGET, STATUS_CONVERGED, make_result
from .arrays import LOSSES, check_loss_name, mixture_loss, prepare_outputs_targets

__all__ = ["solve_subset", "subset_objective", "LOSSES", "METHODS", "METHOD_ALIASES"]

METHODS = ("exhaustive", "branch_and_bound")
METHOD_ALIASES = {"enumerate": "exhaustive"}
"""Deprecated method names and their replacements (a ``DeprecationWarning`` is issued)."""

# Weights below this are set to exactly zero after a numerical solve (weights live in [0, 1]).
_ZERO_WEIGHT = 1e-10
# Faces with at most this many experts are solved exactly by enumerating their sub-faces (squared loss).
_MAX_EXACT_FACE = 10


# ---------------------------------------------------------------------------------------------------
# Convex sub-problems over simplex faces
# ---------------------------------------------------------------------------------------------------


def _clean_simplex(x: np.ndarray) -> np.ndarray:
    """Clip to >= 0, zero tiny entries and renormalise to sum 1 (the uniform point if nothing is left)."""
    w = np.clip(np.asarray(x, dtype=np.float64), 0.0, None)
    w[w < _ZERO_WEIGHT] = 0.0
    s = w.sum()
    if not np.isfinite(s) or s <= 0.0:
        return np.full(w.shape, 1.0 / w.size)
    return w / s


class _Solve:
    """Outcome of one convex sub-problem: weights over ``idx``, value there, certified lower bound."""

    __slots__ = ("idx", "w", "value", "lower")

    def __init__(self, idx: np.ndarray, w: np.ndarray, value: float, lower: float) -> None:
        self.idx, self.w, self.value, self.lower = idx, w, value, lower


def _combine(a: _Solve, b: _Solve) -> _Solve:
    """Two solves of the same sub-problem: keep the lower value and the higher (still valid) bound."""
    best = a if a.value <= b.value else b
    return _Solve(best.idx, best.w, best.value, max(a.lower, b.lower))


class _Problem(ABC):
    """A convex loss of the mixture weights; subclasses give value and gradient on an index set."""

    def __init__(self, n: int, ftol: float, maxiter: int) -> None:
        self.n, self.ftol, self.maxiter = n, ftol, maxiter
        self.nfev = 0  # convex sub-problem solves (faces and relaxations)

    @abstractmethod
    def value(self, idx: np.ndarray, w: np.ndarray) -> float:
        """Objective at weights ``w`` on the experts ``idx``."""

    @abstractmethod
    def grad(self, idx: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Gradient of :meth:`value` with respect to ``w``."""

    def certified(self, idx: np.ndarray, w: np.ndarray) -> _Solve:
        """Wrap a feasible point with its value and the Frank–Wolfe lower bound (valid by convexity)."""
        val = self.value(idx, w)
        g = self.grad(idx, w)
        fw_gap = max(float(g @ w - g.min()), 0.0)
        return _Solve(idx, w, val, val - fw_gap)

    def slsqp(self, idx: np.ndarray, x0: np.ndarray | None = None) -> _Solve:
        """Minimise over the simplex on ``idx`` with SLSQP (convex: global up to ``ftol``), certified."""
        m = idx.size
        if m == 1:
            return self.certified(idx, np.ones(1))
        start = np.full(m, 1.0 / m) if x0 is None else _clean_simplex(x0)

        def fun(w: np.ndarray) -> tuple[float, np.ndarray]:
            return self.value(idx, w), self.grad(idx, w)

        res = minimize(
            fun,
            start,
            jac=True,
            method="SLSQP",
            bounds=[(0.0, 1.0)] * m,
            constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}],
            options={"ftol": self.ftol, "maxiter": self.maxiter},
        )
        return _combine(self.certified(idx, _clean_simplex(res.x)), self.certified(idx, start))

    @abstractmethod
    def solve_face(self, idx: np.ndarray) -> _Solve:
        """Certified minimum over the simplex face spanned by ``idx``."""

    def solve_relaxation(self, idx: np.ndarray, x0: np.ndarray | None = None) -> _Solve:
        """Minimise over the whole simplex on ``idx`` (no cardinality constraint)."""
        self.nfev += 1
        return self.slsqp(idx, x0)


class _Squared(_Problem):
    """(1/(B·u)) Σ_b ‖F_b w − y_b‖² (the mean squared error) = ½ wᵀQw − cᵀw + const.

    With s = 2/(B·u): Q = s Σ_b F_bᵀF_b, c = s Σ_b F_bᵀy_b, const = ½ s Σ_b ‖y_b‖².
    """

    def __init__(self, F: np.ndarray, y: np.ndarray, ftol: float, maxiter: int) -> None:
        super().__init__(F.shape[1], ftol, maxiter)
        B, _, u = F.shape
        scale = 2.0 / (B * u)
        self.Q = scale * np.einsum("biu,bju->ij", F, F)
        self.c = scale * np.einsum("biu,bu->i", F, y)
        self.const = float(np.sum(y * y)) / (B * u)
        self._kkt_cache: dict[tuple[int, ...], tuple[float, np.ndarray] | None] = {}

    def value(self, idx: np.ndarray, w: np.ndarray) -> float:
        Qs = self.Q[np.ix_(idx, idx)]
        return float(0.5 * w @ Qs @ w - self.c[idx] @ w + self.const)

    def grad(self, idx: np.ndarray, w: np.ndarray) -> np.ndarray:
        return self.Q[np.ix_(idx, idx)] @ w - self.c[idx]

    def kkt(self, sub: tuple[int, ...]) -> tuple[float, np.ndarray] | None:
        """Minimiser of the QP on the affine hull of face ``sub`` if it lies in the face, else None.

        Solves the KKT system [[Q, 1], [1ᵀ, 0]] [w; ν] = [c; 1] by least squares and keeps the point only
        if it sums to one and is non-negative. Results are cached per sub-face within one solve.
        """
        if sub in self._kkt_cache:
            return self._kkt_cache[sub]
        idx = np.asarray(sub, dtype=np.intp)
        m = idx.size
        if m == 1:
            w = np.ones(1)
        else:
            K = np.zeros((m + 1, m + 1))
            K[:m, :m] = self.Q[np.ix_(idx, idx)]
            K[:m, m] = 1.0
            K[m, :m] = 1.0
            rhs = np.append(self.c[idx], 1.0)
            w = np.linalg.lstsq(K, rhs, rcond=None)[0][:m]
            if abs(w.sum() - 1.0) > 1e-9 or w.min() < -1e-10:
                self._kkt_cache[sub] = None
                return None
            w = np.clip(w, 0.0, None)
            w /= w.sum()
        out = (self.value(idx, w), w)
        self._kkt_cache[sub] = out
        return out

    def solve_face(self, idx: np.ndarray) -> _Solve:
        """Exact QP on a face: best KKT point over all sub-faces (exact; see module docs)."""
        self.nfev += 1
        if idx.size > _MAX_EXACT_FACE:
            return self.simplex_qp(idx)
        best_val, best_w = math.inf, np.zeros(idx.size)
        members = tuple(int(i) for i in idx)
        position = {j: p for p, j in enumerate(members)}
        for r in range(1, len(members) + 1):
            for sub in itertools.combinations(members, r):
                out = self.kkt(sub)
                if out is not None and out[0] < best_val:
                    best_val = out[0]
                    best_w = np.zeros(idx.size)
                    best_w[[position[j] for j in sub]] = out[1]
        # Exact up to rounding: the certified bound equals the value.
        return _Solve(idx, best_w, best_val, best_val)

    def active_set(self, idx: np.ndarray) -> np.ndarray | None:
        """Primal active-set method for min ½wᵀQw − cᵀw over the simplex on ``idx`` (exact, finite).

        Keeps a working set W of free experts (the others are at zero) and a feasible w. Each step solves
        the KKT system on W: if its point is non-negative, move there and add the outside expert with the
        most negative reduced cost (∇_j − multiplier), or stop when none is negative (KKT conditions of
        the full problem hold: optimal by convexity); otherwise step towards it until an expert hits
        zero and drop that one. Returns None (the caller falls back to SLSQP) on a singular KKT system
        or after too many steps.
        """
        Q = self.Q[np.ix_(idx, idx)]
        c = self.c[idx]
        m = idx.size
        start = int(np.argmin(0.5 * np.diag(Q) - c))
        w = np.zeros(m)
        w[start] = 1.0
        work = [start]
        for _ in range(10 * m + 50):
            W = np.asarray(sorted(work), dtype=np.intp)
            k = W.size
            K = np.zeros((k + 1, k + 1))
            K[:k, :k] = Q[np.ix_(W, W)]
            K[:k, k] = 1.0
            K[k, :k] = 1.0
            sol, _, rank, _ = np.linalg.lstsq(K, np.append(c[W], 1.0), rcond=None)
            if rank < k + 1:
                return None
            target = sol[:k]
            if target.min() >= 0.0:
                w[:] = 0.0
                w[W] = target
                g = Q @ w - c
                reduced = g - g[W].mean()
                reduced[W] = 0.0
                j = int(np.argmin(reduced))
                if reduced[j] >= -1e-12 * max(1.0, float(np.abs(g).max())):
                    return w
                work.append(j)
                continue
            step = target - w[W]
            neg = step < 0.0
            ratios = w[W][neg] / -step[neg]
            alpha = min(1.0, float(ratios.min()))
            w[W] = w[W] + alpha * step
            blocking = int(W[neg][np.argmin(ratios)])
            w[blocking] = 0.0
            w = np.clip(w, 0.0, None)
            w /= w.sum()
            work = [e for e in work if e != blocking]
        return None

    def solve_relaxation(self, idx: np.ndarray, x0: np.ndarray | None = None) -> _Solve:
        self.nfev += 1
        return self.simplex_qp(idx, x0)

    def simplex_qp(self, idx: np.ndarray, x0: np.ndarray | None = None) -> _Solve:
        """Exact active-set solve; on failure SLSQP polished by the exact KKT point on its support."""
        w = self.active_set(idx)
        if w is not None:
            return self.certified(idx, w)
        sol = self.slsqp(idx, x0)
        sub = tuple(int(j) for j in idx[sol.w > 0])
        polished = self.kkt(sub)
        if polished is not None:
            w = np.zeros(idx.size)
            w[sol.w > 0] = polished[1]
            sol = _combine(sol, self.certified(idx, w))
        return sol


class _Logistic(_Problem):
    """Mean BCE-with-logits of the mixture logit Σ_i w_i F_bi against y_b ∈ {0, 1}."""

    def __init__(self, F: np.ndarray, y: np.ndarray, ftol: float, maxiter: int) -> None:
        super().__init__(F.shape[1], ftol, maxiter)
        self.X = F[:, :, 0]
        self.t = y[:, 0]
        self.B = F.shape[0]

    def value(self, idx: np.ndarray, w: np.ndarray) -> float:
        z = self.X[:, idx] @ w
        return float(np.mean(np.logaddexp(0.0, z) - self.t * z))

    def grad(self, idx: np.ndarray, w: np.ndarray) -> np.ndarray:
        z = self.X[:, idx] @ w
        return self.X[:, idx].T @ (expit(z) - self.t) / self.B

    def newton_polish(self, sol: _Solve, steps: int = 20) -> _Solve:
        """Equality-constrained Newton steps on the support SLSQP found; kept only while they help.

        Each step solves [[H, 1], [1ᵀ, 0]] [d; ν] = [−g; 0] on the support (H = Hessian there), so the
        point stays on the affine hull; a step that leaves the face or does not lower the loss stops.
        """
        active = sol.w > 0
        if active.sum() < 2:
            return sol
        sub = sol.idx[active]
        w = sol.w[active].copy()
        m = sub.size
        Xs = self.X[:, sub]
        for _ in range(steps):
            z = Xs @ w
            p = expit(z)
            g = Xs.T @ (p - self.t) / self.B
            H = (Xs * (p * (1.0 - p))[:, None]).T @ Xs / self.B
            K = np.zeros((m + 1, m + 1))
            K[:m, :m] = H
            K[:m, m] = 1.0
            K[m, :m] = 1.0
            d = np.linalg.lstsq(K, np.append(-g, 0.0), rcond=None)[0][:m]
            w_new = w + d
            if w_new.min() < 0.0 or self.value(sub, w_new) > self.value(sub, w):
                break
            converged = np.abs(d).max() < 1e-15
            w = w_new / w_new.sum()
            if converged:
                break
        full = np.zeros(sol.idx.size)
        full[active] = w
        return _combine(sol, self.certified(sol.idx, full))

    def solve_face(self, idx: np.ndarray) -> _Solve:
        self.nfev += 1
        return self.newton_polish(self.slsqp(idx))

    def solve_relaxation(self, idx: np.ndarray, x0: np.ndarray | None = None) -> _Solve:
        return self.newton_polish(super().solve_relaxation(idx, x0))


def _make_problem(loss: str, F: np.ndarray, y: np.ndarray, ftol: float, maxiter: int) -> _Problem:
    if loss == "squared":
        # On the simplex (Σ w = 1) Σ_i w_i F_bi − y_b = Σ_i w_i (F_bi − y_b): the Gram form is built from the
        # residuals. Built from raw outputs and targets sharing a large offset (1e4 ± 1, say) its entries
        # cancelled catastrophically, and the solver certified (gap 0) a support 0.1–0.3 above the optimum.
        return _Squared(F - y[:, None, :], np.zeros_like(y), ftol, maxiter)
    return _Logistic(F, y, ftol, maxiter)


# ---------------------------------------------------------------------------------------------------
# Public objective
# ---------------------------------------------------------------------------------------------------


def subset_objective(w: Any, F: Any, y: Any, loss: str = "squared") -> float:
    """Evaluate (1/B) Σ_b ℓ(Σ_i w_i F_bi, y_b) for weights ``w`` (length n) directly from the data.

    Args:
        w: mixture weights, length n (no constraint is checked beyond the shape).
        F: expert outputs ``[B, n, u]`` or ``[B, n]``.
        y: targets ``[B, u]`` or ``[B]``.
        loss: ``"squared"`` (mean squared error over examples and output units, as
            :func:`routing_search.losses.mse_loss`) or ``"logistic"`` (u = 1, y ∈ {0, 1}, the mixture
            is a logit, as :func:`routing_search.losses.bce_with_logits_loss`).

    Example:
        >>> F = np.array([[1.0, 3.0], [2.0, 0.0]])   # B = 2 examples, n = 2 experts, u = 1
        >>> y = np.array([2.0, 1.0])
        >>> subset_objective([0.5, 0.5], F, y)      # predictions 2 and 1: no error
        0.0
        >>> subset_objective([1.0, 0.0], F, y)      # ((1-2)^2 + (2-1)^2) / 2
        1.0
    """
    F, y = prepare_outputs_targets(F, y)
    loss = check_loss_name(loss, F, y)
    w = as_finite_array("w", w)
    if w.shape != (F.shape[1],):
        raise ValueError(f"w must have shape [n={F.shape[1]}], got shape {w.shape}")
    return mixture_loss(np.einsum("i,biu->bu", w, F), y, loss)


# ---------------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------------


def _exhaustive(problem: _Problem, n: int, k: int, max_supports: int) -> dict[str, Any]:
    total = math.comb(n, k)
    if total > max_supports:
        raise ValueError(
            f"method='exhaustive' would solve C(n={n}, k={k}) = {total} faces, more than "
            f"max_supports={max_supports}; raise max_supports=... or use method='branch_and_bound'"
        )
    best: _Solve | None = None
    bound = math.inf
    for support in itertools.combinations(range(n), k):
        sol = problem.solve_face(np.asarray(support, dtype=np.intp))
        bound = min(bound, sol.lower)
        if best is None or sol.value < best.value:
            best = sol
    assert best is not None
    message = f"enumerated all {total} supports of size {k}"
    return {"best": best, "bound": bound, "nodes": total, "complete": True, "message": message}


def _greedy(problem: _Problem, n: int, k: int) -> _Solve:
    """Forward selection: add the expert whose face gives the lowest loss, k times."""
    chosen: list[int] = []
    best: _Solve | None = None
    for _ in range(k):
        step_best: _Solve | None = None
        for j in range(n):
            if j in chosen:
                continue
            sol = problem.solve_face(np.asarray(sorted(chosen + [j]), dtype=np.intp))
            if step_best is None or sol.value < step_best.value:
                step_best = sol
        assert step_best is not None
        best = step_best
        chosen = [int(i) for i in step_best.idx]
    assert best is not None
    return best


def _full(sol: _Solve, n: int) -> np.ndarray:
    w = np.zeros(n)
    w[sol.idx] = sol.w
    return w


def _branch_and_bound(problem: _Problem, n: int, k: int, tol: float, max_nodes: int) -> dict[str, Any]:
    """Best-first branch and bound over (forced-in I, forced-out O) nodes; see solve_subset docs."""
    every = np.arange(n, dtype=np.intp)

    incumbent = _greedy(problem, n, k)
    inc_value, inc_w = incumbent.value, _full(incumbent, n)

    def offer(value: float, w_full: np.ndarray) -> None:
        nonlocal inc_value, inc_w
        if value < inc_value:
            inc_value, inc_w = value, w_full

    def tol_eff() -> float:
        return tol * max(1.0, abs(inc_value))

    root = problem.solve_relaxation(every)
    root_w = _full(root, n)
    # Rounding the root relaxation to its k largest weights gives a second incumbent candidate.
    top = np.sort(np.argsort(-root_w, kind="stable")[:k]).astype(np.intp)
    rounded = problem.solve_face(top)
    offer(rounded.value, _full(rounded, n))

    counter = itertools.count()
    # Heap entries: (lower bound, tie-break, forced-in I, forced-out O, relaxation weights, relaxation value)
    heap: list[tuple[float, int, tuple[int, ...], tuple[int, ...], np.ndarray, float]] = [
        (root.lower, next(counter), (), (), root_w, root.value)
    ]
    closed_lower = math.inf  # min certified bound over nodes closed, pruned or solved as leaves
    nodes = 0
    complete = True
    while heap:
        lower, _, I, O, w_rel, v_rel = heap[0]
        if lower >= inc_value - tol_eff():
            closed_lower = min(closed_lower, lower)  # best-first: every open node is pruned too
            heap.clear()
            break
        if nodes >= max_nodes:
            complete = False
            break
        heapq.heappop(heap)
        nodes += 1
        in_set, out_set = set(I), set(O)
        free = [j for j in range(n) if j not in in_set and j not in out_set]

        if len(I) == k or len(I) + len(free) <= k:
            # Leaf: a single face remains.
            face = np.asarray(sorted(I if len(I) == k else I + tuple(free)), dtype=np.intp)
            sol = problem.solve_face(face)
            offer(sol.value, _full(sol, n))
            closed_lower = min(closed_lower, sol.lower)
            continue

        support = set(np.flatnonzero(w_rel > 0).tolist())
        if len(in_set | support) <= k:
            # The relaxation's minimiser is feasible for this node, hence optimal for it (within its gap).
            offer(v_rel, w_rel)
            if v_rel - lower <= tol_eff():
                closed_lower = min(closed_lower, lower)
                continue

        j = max(free, key=lambda e: (w_rel[e], -e))
        # Include j: same relaxation (it does not depend on I), same bound.
        heapq.heappush(heap, (lower, next(counter), tuple(sorted(I + (j,))), O, w_rel, v_rel))
        # Exclude j: new relaxation on the experts not forced out.
        O2 = tuple(sorted(O + (j,)))
        if len(I) + len(free) - 1 <= k:
            heapq.heappush(heap, (lower, next(counter), I, O2, w_rel, v_rel))  # a leaf; solved when popped
            continue
        allowed = np.asarray([e for e in range(n) if e not in O2], dtype=np.intp)
        warm = w_rel[allowed]
        child = problem.solve_relaxation(allowed, warm if warm.sum() > 0 else None)
        child_w = _full(child, n)
        if len(in_set | set(np.flatnonzero(child_w > 0).tolist())) <= k:
            offer(child.value, child_w)
        if child.lower >= inc_value - tol_eff():
            closed_lower = min(closed_lower, child.lower)
        else:
            heapq.heappush(heap, (child.lower, next(counter), I, O2, child_w, child.value))

    open_lower = min((entry[0] for entry in heap), default=math.inf)
    bound = min(inc_value, closed_lower, open_lower)
    best = _Solve(every, inc_w, inc_value, bound)
    if complete:
        message = f"branch and bound finished: optimal within tol={tol:g} (relative)"
    else:
        message = f"branch and bound stopped at max_nodes={max_nodes}; best found and a valid bound returned"
    return {"best": best, "bound": bound, "nodes": nodes, "complete": complete, "message": message}


# ---------------------------------------------------------------------------------------------------
# Front door
# ---------------------------------------------------------------------------------------------------

_OPTIONS: dict[str, dict[str, Any]] = {
    "exhaustive": {"ftol": 1e-12, "maxiter": 500, "max_supports": 1_000_000},
    "branch_and_bound": {"ftol": 1e-12, "maxiter": 500, "tol": 1e-9, "max_nodes": 100_000},
}


def solve_subset(
    F: Any,
    y: Any,
    k: int,
    *,
    loss: str = "squared",
    method: str = "exhaustive",
    rng: Any = None,
    **options: Any,
) -> OptimizeResult:
    """Globally solve min_w (1/B) Σ_b ℓ(Σ_i w_i F_bi, y_b) over the simplex with ‖w‖₀ ≤ k.

    Args:
        F: expert outputs, [B, n, u] or [B, n] (u = 1); numpy array or torch tensor.
        y: targets, [B, u] or [B].
        k: maximum number of experts, 1 <= k <= n.
        loss: a loss NAME: ``"squared"`` (mean over examples and output units of (ŷ − y)², exactly
            :func:`routing_search.losses.mse_loss`) or ``"logistic"`` (u = 1, y ∈ {0, 1}, binary
            cross-entropy with the mixture as logit, mean over examples).
        method: ``"exhaustive"`` — solve the face of every size-k support (a support of size < k is
            a face of some size-k support, so when k <= n enumerating size exactly k covers ‖w‖₀ ≤ k);
            ``"branch_and_bound"`` — best-first search over nodes (forced-in I, forced-out O) with the
            convex relaxation (no cardinality constraint, experts in O removed) as lower bound: every
            w feasible for the node is feasible for that relaxation, so its certified minimum bounds the
            node from below. The incumbent starts from greedy forward selection. ``"enumerate"`` is a
            deprecated alias of ``"exhaustive"``.
        rng: accepted for a uniform signature and checked (None, a seed or a ``numpy.random.Generator``)
            but unused: both methods are deterministic.
        **options: ``ftol`` (SLSQP tolerance, default 1e-12), ``maxiter`` (SLSQP iterations, 500);
            exhaustive: ``max_supports`` (refuse more faces, default 1e6);
            branch_and_bound: ``tol`` (prune when bound >= incumbent − tol·max(1, |incumbent|), default
            1e-9), ``max_nodes`` (default 1e5).

    Convex solves. Squared loss, faces of <= 10 experts: exact — each face is a convex QP; its minimiser
    set has a point whose own support T gives a non-singular KKT system on the affine hull of T, so
    solving the equality-constrained QP of every sub-face T (least squares on the KKT system), keeping
    the feasible ones and taking the best is exact. Squared loss, relaxations and larger faces: an exact
    primal active-set method (SLSQP as fallback on a singular KKT system). Logistic loss: SLSQP with
    bounds and the sum-to-one constraint, then equality-constrained Newton steps on its support; global
    up to tolerance by convexity. Every solve carries a certified Frank–Wolfe lower bound.

    Returns:
        ``OptimizeResult`` (built by :func:`routing_search.result.make_result`) with ``x`` (weights,
        length n, exact zeros off the support), ``fun`` (loss of ``x``, recomputed from the data),
        ``nit`` (faces for exhaustive, nodes for branch and bound), ``nfev`` (convex sub-problem
        solves), ``status`` (0: finished — the optimum within ``tol``; 1: stopped at ``max_nodes``),
        ``success`` (``status == 0``), ``message``, ``support`` (sorted indices of the nonzeros),
        ``bound`` (proven global lower bound, also after a ``max_nodes`` stop), ``gap``
        (= fun − bound >= 0; 0 for exhaustive squared loss with k <= 10, whose faces are solved
        exactly), ``nodes_explored`` (= nit), ``method`` and ``loss``.

    Example:
        Recover a planted 2-sparse mixture; with k = 1 the optimum is the best single expert, which a
        brute force over the n vertices of the simplex confirms:

        >>> rng = np.random.default_rng(0)
        >>> F = rng.normal(size=(50, 6, 2)); y = 0.3 * F[:, 1] + 0.7 * F[:, 4]
        >>> res = solve_subset(F, y, 2)
        >>> res.support.tolist(), round(res.fun, 12), res.success, res.status
        ([1, 4], 0.0, True, 0)
        >>> one = solve_subset(F, y, 1, method="branch_and_bound")
        >>> brute = min(subset_objective(np.eye(6)[i], F, y) for i in range(6))
        >>> bool(np.isclose(one.fun, brute)), one.support.tolist(), one.gap <= 1e-9
        (True, [4], True)
    """
    F, y = prepare_outputs_targets(F, y)
    n = F.shape[1]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an integer in [1, n={n}], got {k!r}")
    if not 1 <= int(k) <= n:
        raise ValueError(f"k must be in [1, n={n}] (n = number of experts in F), got k={k}")
    k = int(k)
    loss = check_loss_name(loss, F, y)
    method = resolve_method(method, METHODS, aliases=METHOD_ALIASES)
    check_no_unknown_options(f"solve_subset(method={method!r})", options, _OPTIONS[method])
    check_rng(rng)
    opts = {**_OPTIONS[method], **options}
    ftol = check_positive_float("ftol", opts["ftol"])
    maxiter = check_int("maxiter", opts["maxiter"], minimum=1)

    problem = _make_problem(loss, F, y, ftol, maxiter)
    if method == "exhaustive":
        out = _exhaustive(problem, n, k, check_int("max_supports", opts["max_supports"], minimum=1))
    else:
        tol = check_positive_float("tol", opts["tol"], allow_zero=True)
        out = _branch_and_bound(problem, n, k, tol, check_int("max_nodes", opts["max_nodes"], minimum=1))

    best: _Solve = out["best"]
    x = _full(best, n)
    x[x < 0] = 0.0
    fun = subset_objective(x, F, y, loss)  # recomputed from the data (no Gram-matrix cancellation)
    if method == "exhaustive" and loss == "squared" and k <= _MAX_EXACT_FACE:
        bound = fun  # every face solved exactly (see solve_face)
    else:
        bound = min(float(out["bound"]), fun)
    return make_result(
        x=x,
        fun=fun,
        nit=int(out["nodes"]),
        nfev=int(problem.nfev),
        status=STATUS_CONVERGED if out["complete"] else STATUS_BUDGET,
        message=out["message"],
        support=np.flatnonzero(x),
        bound=bound,
        gap=fun - bound,
        nodes_explored=int(out["nodes"]),
        method=method,
        loss=loss,
    )
