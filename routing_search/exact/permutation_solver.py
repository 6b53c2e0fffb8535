"""Exact and heuristic solvers for the gate→expert permutation problem.

Gate weights ``G`` [B, n] live in gate-index space (``G[b, i]`` = weight the gate gives slot ``i``); a
permutation ``perm`` (``perm[i]`` = expert that receives slot ``i``'s weight) gives the prediction

    ŷ_b = Σ_i G_bi F_b,perm[i]

and the objective (1/B) Σ_b ℓ(ŷ_b, y_b) with a loss NAME (:mod:`routing_search.exact.arrays`):
``"squared"`` = mean squared error over examples and the u output units (exactly
:func:`routing_search.losses.mse_loss`), ``"logistic"`` = binary cross-entropy with the mixture as logit.

Squared loss as a quadratic assignment problem (QAP). With
``T[i, l, j, j'] = Σ_b G_bi G_bl ⟨F_bj, F_bj'⟩ / (B·u)``, ``C[i, j] = 2 Σ_b G_bi ⟨y_b, F_bj⟩ / (B·u)``
and ``const = Σ_b ‖y_b‖² / (B·u)``:

    L(perm) = Σ_{i,l} T[i, l, perm[i], perm[l]] − Σ_i C[i, perm[i]] + const        (Lawler QAP)

For a static gate (every row of G equal to g) ``T = g gᵀ ⊗ K / (B·u)`` with
``K_jj' = Σ_b ⟨F_bj, F_bj'⟩``, a Koopmans–Beckmann QAP; :func:`qap_matrices` folds its linear term
into the quadratic one (see there), which is what ``scipy.optimize.quadratic_assignment`` needs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
from scipy.optimize import OptimizeResult, linear_sum_assignment, quadratic_assignment

from .._validation import (
    as_finite_array,
    check_int,
    check_no_unknown_options,
    check_permutation,
    check_positive_float,
    check_rng,
    resolve_method,
)
from ..result import STATUS_BUDGET, STATUS_CONVERGED, make_result
from .arrays import check_loss_name, mixture_loss, mixture_losses, prepare_outputs_targets

__all__ = ["solve_permutation", "permutation_loss", "qap_matrices", "QAPMatrices", "METHODS", "METHOD_ALIASES"]

METHODS = ("exhaustive", "branch_and_bound", "faq", "2opt")
METHOD_ALIASES = {"brute_force": "exhaustive"}
"""Deprecated method names and their replacements (a ``DeprecationWarning`` is issued)."""
# Exhaustive enumeration builds arrays of about this many floats per block.
_BLOCK_ELEMENTS = 1 << 22


class QAPMatrices(NamedTuple):
    """Koopmans–Beckmann form of the static-gate squared loss.

    L(perm) = Σ_il A_il B_perm[i]perm[l] + const.
    """

    A: np.ndarray
    B: np.ndarray
    const: float


# ---------------------------------------------------------------------------------------------------
# Input handling
# ---------------------------------------------------------------------------------------------------


def _prepare(G: Any, F: Any, y: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return G [B, n], F [B, n, u], y [B, u]; a 1-D G of length n is a static gate (broadcast)."""
    F, y = prepare_outputs_targets(F, y)
    B, n, _ = F.shape
    G = as_finite_array("G", G)
    if G.ndim == 1:
        if G.shape != (n,):
            raise ValueError(f"G must have shape [B={B}, n={n}] or [n={n}] (static gate); got {G.shape}")
        G = np.broadcast_to(G, (B, n)).copy()
    elif G.ndim != 2 or G.shape != (B, n):
        raise ValueError(f"G must have shape [B={B}, n={n}] or [n={n}] (static gate), got shape {G.shape}")
    return G, F, y


def _centred(G: np.ndarray, F: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same squared-loss problem with every row's target subtracted from its expert outputs.

    With ``s_b = Σ_i G_bi`` (the same for every permutation), ``F'_bj = F_bj − y_b`` and
    ``y'_b = (1 − s_b) y_b`` give ``Σ_i G_bi F'_b,perm[i] − y'_b = ŷ_b − y_b`` for every permutation: the
    loss is unchanged, but the Gram (QAP) forms below are built from residual-sized numbers. Built from
    raw outputs and targets that share a large offset (say 1e6 ± 1), their entries are about 1e12 and
    rounding moved the loss by about 1e-4, enough to prune the true optimum and certify a worse one.
    """
    return F - y[:, None, :], y * (1.0 - G.sum(axis=1))[:, None]


def _is_static(G: np.ndarray) -> bool:
    scale = max(1.0, float(np.abs(G).max()))
    return bool(np.all(np.abs(G - G[0]) <= 1e-12 * scale))


def _loss_value(perm: np.ndarray, G: np.ndarray, F: np.ndarray, y: np.ndarray, loss: str) -> float:
    return mixture_loss(np.einsum("bi,biu->bu", G, F[:, perm, :]), y, loss)


# ---------------------------------------------------------------------------------------------------
# Public objective helpers
# ---------------------------------------------------------------------------------------------------


def permutation_loss(perm: Any, G: Any, F: Any, y: Any, loss: str = "squared") -> float:
    """Exact objective (1/B) Σ_b ℓ(Σ_i G_bi F_b,perm[i], y_b) of one permutation, evaluated from the data.

    Args:
        perm: a permutation of ``range(n)``; ``perm[i]`` is the expert that receives slot ``i``'s weight.
        G: gate weights ``[B, n]``, or ``[n]`` for a static gate.
        F: expert outputs ``[B, n, u]`` or ``[B, n]``.
        y: targets ``[B, u]`` or ``[B]``.
        loss: ``"squared"`` (mean squared error, as :func:`routing_search.losses.mse_loss`) or
            ``"logistic"`` (u = 1, y ∈ {0, 1}; as :func:`routing_search.losses.bce_with_logits_loss`).

    Example:
        >>> F = np.array([[1.0, 5.0]]); y = np.array([5.0])    # one example, two experts
        >>> permutation_loss([0, 1], [1.0, 0.0], F, y)         # slot 0 -> expert 0: (1 - 5)^2
        16.0
        >>> permutation_loss([1, 0], [1.0, 0.0], F, y)         # slot 0 -> expert 1
        0.0
    """
    G, F, y = _prepare(G, F, y)
    loss = check_loss_name(loss, F, y)
    return _loss_value(check_permutation(perm, F.shape[1], name="perm"), G, F, y, loss)


def qap_matrices(g: Any, F: Any, y: Any) -> QAPMatrices:
    """Static-gate squared loss as a Koopmans–Beckmann QAP: L(perm) = Σ_il A_il B_perm[i]perm[l] + const.

    With s = Σ_i g_i ≠ 0 and any permutation, Σ_l g_l = s, so the linear term can be written as a
    quadratic one: Σ_i g_i c_perm[i] = (1/2s) Σ_il g_i g_l (c_perm[i] + c_perm[l]). Hence

        A = g gᵀ,   B = (K − (c 1ᵀ + 1 cᵀ)/s) / (B_ex·u),   const = Σ_b ‖y_b‖² / (B_ex·u),

    with K_jj' = Σ_b ⟨F_bj, F_bj'⟩, c_j = Σ_b ⟨y_b, F_bj⟩, B_ex the number of examples and u the
    number of output units (the units of ``loss="squared"``: the mean squared error). The identity
    also holds on doubly stochastic matrices (rows and columns sum to one), i.e. for FAQ's relaxation.
    ``scipy.optimize.quadratic_assignment(A, B)`` minimises Σ_il A_il B_col[i]col[l]: col = perm.
    """
    g = as_finite_array("g", g)
    F, y = prepare_outputs_targets(F, y)
    n = F.shape[1]
    if g.shape != (n,):
        raise ValueError(f"g must have shape [n={n}] (static gate weights), got shape {g.shape}")
    s = float(g.sum())
    if abs(s) <= 1e-12 * max(1.0, float(np.abs(g).max())):
        raise ValueError("g must have a nonzero sum to fold the linear term (simplex weights sum to 1)")
    n_ex, _, u = F.shape
    K = np.einsum("bju,bku->jk", F, F)
    c = np.einsum("bu,bju->j", y, F)
    Bmat = (K - (c[:, None] + c[None, :]) / s) / (n_ex * u)
    return QAPMatrices(A=np.outer(g, g), B=Bmat, const=float(np.sum(y * y)) / (n_ex * u))


# ---------------------------------------------------------------------------------------------------
# Squared loss as a Lawler QAP
# ---------------------------------------------------------------------------------------------------


class _Lawler:
    """L(perm) = Σ_il T[i,l,perm[i],perm[l]] − Σ_i C[i,perm[i]] + const (mean squared error units)."""

    def __init__(self, G: np.ndarray, F: np.ndarray, y: np.ndarray) -> None:
        B, n, u = F.shape
        Kb = np.einsum("bju,bku->bjk", F, F)
        self.T = np.einsum("bi,bl,bjk->iljk", G, G, Kb, optimize=True) / (B * u)
        self.C = 2.0 * np.einsum("bi,bu,bju->ij", G, y, F, optimize=True) / (B * u)
        self.const = float(np.sum(y * y)) / (B * u)
        self.n = n
        self._ar = np.arange(n)

    def value(self, perm: np.ndarray) -> float:
        ar = self._ar
        quad = self.T[ar[:, None], ar[None, :], perm[:, None], perm[None, :]].sum()
        return float(quad - self.C[ar, perm].sum() + self.const)

    def values(self, P: np.ndarray) -> np.ndarray:
        """Objective of every row of P ([m, n] permutations)."""
        ar = self._ar
        quad = self.T[ar[None, :, None], ar[None, None, :], P[:, :, None], P[:, None, :]].sum(axis=(1, 2))
        return quad - self.C[ar[None, :], P].sum(axis=1) + self.const

    def gilmore_lawler(
        self, slots: np.ndarray, experts: np.ndarray, assigned: np.ndarray
    ) -> tuple[float, np.ndarray, np.ndarray]:
        """Gilmore–Lawler-type bound for completions of a partial assignment, and the LSA completion.

        ``slots[:d]`` are assigned to ``assigned``; the free slots R = ``slots[d:]`` must take the free
        ``experts`` E bijectively. For a completion perm, L = base + Σ_{i∈R} [lin[i, perm[i]] +
        Σ_{l∈R, l≠i} T[i, l, perm[i], perm[l]]]. For fixed (i, j) the inner sum is a perfect matching
        between R∖{i} and E∖{j}; it is at least the sum of row minima and at least the sum of column
        minima of T[i, ·, j, ·] on that minor. With h[i, j] = lin[i, j] + max(row-min sum, col-min sum),
        every completion has L ≥ base + Σ_i h[i, perm[i]] ≥ base + min over assignments of h, which a
        linear assignment (scipy's linear_sum_assignment) computes exactly. Returns (bound, completion,
        h) where the completion is the assignment optimal for h.
        """
        T, C = self.T, self.C
        d = assigned.size
        A, R = slots[:d], slots[d:]
        m = R.size
        base = T[A[:, None], A[None, :], assigned[:, None], assigned[None, :]].sum()
        base += self.const - C[A, assigned].sum()
        perm = np.empty(self.n, dtype=np.intp)
        perm[A] = assigned
        if m == 0:
            return float(base), perm, np.zeros((0, 0))
        cross = 2.0 * T[R[:, None, None], A[None, None, :], experts[None, :, None], assigned[None, None, :]]
        cross = cross.sum(axis=2)
        diag = T[R[:, None], R[:, None], experts[None, :], experts[None, :]]
        lin = cross + diag - C[R[:, None], experts[None, :]]
        if m == 1:
            h = lin
        else:
            TT = T[np.ix_(R, R, experts, experts)].copy()  # [i, l, j, j']
            am = np.arange(m)
            TT[:, :, am, am] = np.inf  # j' = j is taken by slot i
            TT[am, am, :, :] = np.inf  # l = i is not part of the inner matching
            rows = TT.min(axis=3)  # [i, l, j]
            rows[am, am, :] = 0.0
            cols = TT.min(axis=1)  # [i, j, j']
            cols[:, am, am] = 0.0
            h = lin + np.maximum(rows.sum(axis=1), cols.sum(axis=2))
        r, c = linear_sum_assignment(h)
        perm[R[r]] = experts[c]
        return float(base + h[r, c].sum()), perm, h


# ---------------------------------------------------------------------------------------------------
# Exhaustive enumeration
# ---------------------------------------------------------------------------------------------------


def _permutation_blocks(n: int, tail: int = 8) -> Iterator[np.ndarray]:
    """All permutations of range(n) in lexicographic order, as [m, n] integer blocks."""
    t = min(n, tail)
    tails = np.array(list(itertools.permutations(range(t))), dtype=np.intp).reshape(-1, t)
    for prefix in itertools.permutations(range(n), n - t):
        rest = np.array(sorted(set(range(n)) - set(prefix)), dtype=np.intp)
        block = np.empty((tails.shape[0], n), dtype=np.intp)
        block[:, : n - t] = prefix
        block[:, n - t :] = rest[tails]
        yield block


def _exhaustive(G: np.ndarray, F: np.ndarray, y: np.ndarray, loss: str) -> tuple[np.ndarray, int]:
    """Best permutation (first in lexicographic order among exact ties) and number evaluated."""
    B, n, u = F.shape
    best_val, best_perm, count = math.inf, np.arange(n), 0
    ar = np.arange(n)
    if loss == "squared" and _is_static(G):
        g = G[0]
        K = np.einsum("bju,bku->jk", F, F) / (B * u)
        c = 2.0 * np.einsum("bu,bju->j", y, F) / (B * u)
        const = float(np.sum(y * y)) / (B * u)

        def block_values(P: np.ndarray) -> np.ndarray:
            inv = np.empty_like(P)
            inv[np.arange(P.shape[0])[:, None], P] = ar  # inv[perm[i]] = i
            V = g[inv]  # V[:, j] = weight expert j receives
            return np.einsum("mj,jk,mk->m", V, K, V, optimize=True) - V @ c + const

    elif loss == "squared":
        lawler = _Lawler(G, F, y)
        block_values = lawler.values
    else:
        X = F[:, :, :1]
        rows_per = max(1, _BLOCK_ELEMENTS // (B * n))

        def block_values(P: np.ndarray) -> np.ndarray:
            out = np.empty(P.shape[0])
            for s in range(0, P.shape[0], rows_per):
                sub = P[s : s + rows_per]
                z = np.einsum("bi,bmi->mb", G, X[:, sub, 0])[..., None]  # [m, B, 1]
                out[s : s + rows_per] = np.mean(mixture_losses(z, y, loss), axis=1)
            return out

    for P in _permutation_blocks(n):
        vals = block_values(P)
        count += P.shape[0]
        i = int(np.argmin(vals))
        if vals[i] < best_val:
            best_val, best_perm = float(vals[i]), P[i].copy()
    return best_perm, count


# ---------------------------------------------------------------------------------------------------
# Branch and bound (squared loss)
# ---------------------------------------------------------------------------------------------------


def _swap_descent(lawler: _Lawler, perm: np.ndarray, value: float) -> tuple[np.ndarray, float, int]:
    """Best-improvement pairwise-swap local search on the exact objective (incumbent for B&B)."""
    n = perm.size
    evals = 0
    while True:
        best_move, best_val = None, value
        for i in range(n - 1):
            for j in range(i + 1, n):
                cand = perm.copy()
                cand[i], cand[j] = cand[j], cand[i]
                v = lawler.value(cand)
                evals += 1
                if v < best_val:
                    best_move, best_val = cand, v
        if best_move is None:
            return perm, value, evals
        perm, value = best_move, best_val


def _branch_and_bound(
    G: np.ndarray, F: np.ndarray, y: np.ndarray, x0: np.ndarray | None, tol: float, max_nodes: int
) -> dict[str, Any]:
    """Depth-first B&B assigning slots in order of decreasing gate mass, Gilmore–Lawler-type bounds."""
    lawler = _Lawler(G, F, y)
    n = lawler.n
    slots = np.argsort(-np.abs(G).sum(axis=0), kind="stable").astype(np.intp)
    all_experts = np.arange(n, dtype=np.intp)
    nfev = 0

    root_bound, root_perm, _ = lawler.gilmore_lawler(slots, all_experts, np.zeros(0, dtype=np.intp))
    inc_perm, inc_val, evals = _swap_descent(lawler, root_perm, lawler.value(root_perm))
    nfev += evals + 1
    if x0 is not None:
        v0 = lawler.value(x0)
        nfev += 1
        if v0 < inc_val:
            inc_perm, inc_val = x0.copy(), v0

    # Stack entries: (assigned experts for slots[:d], a valid lower bound inherited from the parent).
    stack: list[tuple[tuple[int, ...], float]] = [((), root_bound)]
    closed_lower = math.inf
    nodes = 0
    complete = True
    while stack:
        if nodes >= max_nodes:
            complete = False
            break
        assigned, _parent_bound = stack.pop()
        nodes += 1
        assigned_arr = np.asarray(assigned, dtype=np.intp)
        used = set(assigned)
        free = np.asarray([e for e in range(n) if e not in used], dtype=np.intp)
        bound, completion, h = lawler.gilmore_lawler(slots, free, assigned_arr)
        value = lawler.value(completion)
        nfev += 1
        if value < inc_val:
            inc_perm, inc_val = completion, value
        if free.size == 0 or bound >= inc_val - tol * max(1.0, abs(inc_val)):
            # Pruned, or closed: its LSA completion is within tol of its bound.
            closed_lower = min(closed_lower, bound)
            continue
        # Branch on the next slot; push the most promising expert last so it is explored first.
        order = np.argsort(-h[0], kind="stable")
        for c in order:
            stack.append((assigned + (int(free[c]),), bound))

    open_lower = min((b for _, b in stack), default=math.inf)
    bound = min(inc_val, closed_lower, open_lower)
    if complete:
        message = f"branch and bound finished: optimal within tol={tol:g} (relative)"
    else:
        message = f"branch and bound stopped at max_nodes={max_nodes}; best found and a valid bound returned"
    return {
        "perm": inc_perm,
        "bound": bound,
        "nodes": nodes,
        "nfev": nfev,
        "complete": complete,
        "message": message,
    }


# ---------------------------------------------------------------------------------------------------
# Heuristics via scipy.optimize.quadratic_assignment
# ---------------------------------------------------------------------------------------------------


def _qap_heuristic(
    method: str,
    G: np.ndarray,
    F: np.ndarray,
    y: np.ndarray,
    x0: np.ndarray | None,
    rng: np.random.Generator,
    opts: dict[str, Any],
) -> dict[str, Any]:
    qap = qap_matrices(G[0], F, y)
    n = F.shape[1]
    n_init = check_int("n_init", opts["n_init"], minimum=1)
    best_perm, best_val, nit, at_maxiter = None, math.inf, 0, 0
    for start in range(n_init):
        scipy_opts: dict[str, Any] = {"rng": rng}
        if method == "faq":
            scipy_opts["maxiter"] = check_int("maxiter", opts["maxiter"], minimum=1)
            scipy_opts["tol"] = check_positive_float("tol", opts["tol"])
            if start == 0 and x0 is not None:
                P0 = np.zeros((n, n))
                P0[np.arange(n), x0] = 1.0
                scipy_opts["P0"] = P0
            elif start > 0:
                scipy_opts["P0"] = "randomized"
        elif start == 0 and x0 is not None:
            scipy_opts["partial_guess"] = np.column_stack([np.arange(n), x0])
        res = quadratic_assignment(qap.A, qap.B, method=method, options=scipy_opts)
        nit += int(res.nit)
        if method == "faq" and int(res.nit) >= scipy_opts["maxiter"]:
            at_maxiter += 1  # FAQ ran its iteration budget out (scipy does not say whether it met tol there)
        perm = np.asarray(res.col_ind, dtype=np.intp)
        val = float(res.fun) + qap.const
        if val < best_val:
            best_perm, best_val = perm, val
    assert best_perm is not None
    return {"perm": best_perm, "nit": nit, "nfev": n_init, "at_maxiter": at_maxiter}


# ---------------------------------------------------------------------------------------------------
# Front door
# ---------------------------------------------------------------------------------------------------

_OPTIONS: dict[str, dict[str, Any]] = {
    "exhaustive": {"max_n": 10},
    "branch_and_bound": {"tol": 1e-9, "max_nodes": 1_000_000, "max_n": 16},
    "faq": {"n_init": 1, "maxiter": 30, "tol": 0.03},
    "2opt": {"n_init": 1},
}


def solve_permutation(
    G: Any,
    F: Any,
    y: Any,
    *,
    loss: str = "squared",
    method: str = "branch_and_bound",
    x0: Any = None,
    rng: Any = None,
    **options: Any,
) -> OptimizeResult:
    """Find the permutation perm minimising (1/B) Σ_b ℓ(Σ_i G_bi F_b,perm[i], y_b).

    Args:
        G: gate weights in gate-index space, [B, n], or [n] for a static gate.
        F: expert outputs, [B, n, u] or [B, n].
        y: targets, [B, u] or [B].
        loss: a loss NAME: ``"squared"`` (mean over examples and output units of (ŷ − y)², exactly
            :func:`routing_search.losses.mse_loss`) or ``"logistic"`` (u = 1, y ∈ {0, 1}, binary
            cross-entropy with the mixture as logit). For any other loss use
            :func:`routing_search.analysis.optimality_gap` on the model with a torch per-example loss.
        method:
            ``"exhaustive"`` — every permutation (vectorised in blocks); both losses; refuses
            n > max_n. ``"brute_force"`` is a deprecated alias.
            ``"branch_and_bound"`` — exact, squared loss only: depth-first, slots assigned in order of
            decreasing gate mass, Gilmore–Lawler-type bound (see ``_Lawler.gilmore_lawler``), incumbent
            from swap local search on the root's assignment completion (or ``x0`` if better).
            ``"faq"``, ``"2opt"`` — ``scipy.optimize.quadratic_assignment`` on :func:`qap_matrices`;
            heuristics for a static gate and squared loss (no certificate).
        x0: starting permutation (B&B incumbent candidate; first start of faq/2opt); ignored by
            exhaustive enumeration.
        rng: None, a seed or a ``numpy.random.Generator`` (checked by
            :func:`routing_search._validation.check_rng`); used by ``faq`` and ``2opt`` for their random
            starts, unused by the exact (deterministic) methods.
        **options: exhaustive: ``max_n`` (default 10); branch_and_bound: ``tol`` (prune when bound >=
            incumbent − tol·max(1, |incumbent|), default 1e-9), ``max_nodes`` (default 1e6), ``max_n``
            (default 16); faq: ``n_init`` (starts, default 1), ``maxiter``, ``tol`` (passed to scipy);
            2opt: ``n_init``.

    Returns:
        ``OptimizeResult`` (built by :func:`routing_search.result.make_result`) with ``x`` (best
        permutation, int array), ``fun`` (exact loss of x, recomputed from the data), ``nit``,
        ``nfev`` (objective evaluations), ``status`` (0: finished by its own criterion — proven
        optimal for the exact methods, converged for the heuristics; 1: branch and bound stopped at
        ``max_nodes``, or a ``faq`` start ran ``maxiter`` iterations out), ``success`` (``status == 0``),
        ``message``, ``bound`` (proven lower bound; NaN
        for heuristics), ``gap`` (fun − bound; NaN for heuristics), ``nodes_explored`` and ``method``.

    Example:
        A planted static-gate instance, then branch and bound against exhaustive enumeration of all
        4! = 24 permutations with :func:`permutation_loss`:

        >>> import itertools
        >>> rng = np.random.default_rng(0)
        >>> g = np.array([0.6, 0.3, 0.1, 0.0]); F = rng.normal(size=(40, 4, 2))
        >>> y = np.einsum("i,biu->bu", g, F[:, [2, 0, 3, 1]])
        >>> solve_permutation(g, F, y).x.tolist()
        [2, 0, 3, 1]
        >>> y = rng.normal(size=(40, 2))
        >>> res = solve_permutation(g, F, y)
        >>> brute = min(permutation_loss(p, g, F, y) for p in itertools.permutations(range(4)))
        >>> bool(np.isclose(res.fun, brute)), res.success, res.gap <= 1e-9
        (True, True, True)
    """
    G, F, y = _prepare(G, F, y)
    n = F.shape[1]
    loss = check_loss_name(loss, F, y)
    method = resolve_method(method, METHODS, aliases=METHOD_ALIASES)
    check_no_unknown_options(f"solve_permutation(method={method!r})", options, _OPTIONS[method])
    opts = {**_OPTIONS[method], **options}
    generator = check_rng(rng)
    perm0 = None if x0 is None else check_permutation(x0, n, name="x0")
    if method != "exhaustive" and loss != "squared":
        raise ValueError(
            f"method={method!r} needs loss='squared' (its bound / QAP form is derived for the squared loss); "
            f"with loss={loss!r} use method='exhaustive'"
        )

    if method == "exhaustive":
        max_n = check_int("max_n", opts["max_n"], minimum=1)
        if n > max_n:
            raise ValueError(
                f"method='exhaustive' would evaluate n! = {math.factorial(n)} permutations for n={n} > "
                f"max_n={max_n}; pass max_n=... to allow it or use method='branch_and_bound'"
            )
        perm, count = _exhaustive(G, *_centred(G, F, y), loss) if loss == "squared" else _exhaustive(G, F, y, loss)
        fun = _loss_value(perm, G, F, y, loss)
        return make_result(
            x=perm, fun=fun, nit=count, nfev=count, status=STATUS_CONVERGED,
            message=f"evaluated all {count} permutations", bound=fun, gap=0.0, nodes_explored=count,
            method=method,
        )

    if method == "branch_and_bound":
        tol = check_positive_float("tol", opts["tol"], allow_zero=True)
        max_n = check_int("max_n", opts["max_n"], minimum=1)
        if n > max_n:
            raise ValueError(
                f"method='branch_and_bound' stores an n^4 = {n ** 4} entry tensor and its search is "
                f"exponential in the worst case; n={n} > max_n={max_n}: pass max_n=... to allow it"
            )
        out = _branch_and_bound(G, *_centred(G, F, y), perm0, tol, check_int("max_nodes", opts["max_nodes"], minimum=1))
        fun = _loss_value(out["perm"], G, F, y, loss)
        bound = min(float(out["bound"]), fun)
        return make_result(
            x=out["perm"], fun=fun, nit=out["nodes"], nfev=out["nfev"],
            status=STATUS_CONVERGED if out["complete"] else STATUS_BUDGET,
            message=out["message"], bound=bound, gap=fun - bound, nodes_explored=out["nodes"], method=method,
        )

    if not _is_static(G):
        raise ValueError(
            f"method={method!r} solves the static-gate QAP: every row of G must be equal (or pass G as [n]); "
            "for per-example gates use method='branch_and_bound' or 'exhaustive'"
        )
    if abs(float(G[0].sum())) <= 1e-12 * max(1.0, float(np.abs(G[0]).max())):
        raise ValueError(
            f"method={method!r} needs gate weights G with a nonzero sum (its QAP form folds the linear term by "
            "it; simplex weights sum to 1); for this G use method='branch_and_bound' or 'exhaustive'"
        )
    out = _qap_heuristic(method, G, *_centred(G, F, y), perm0, generator, opts)
    fun = _loss_value(out["perm"], G, F, y, loss)
    message = (
        f"heuristic: scipy.optimize.quadratic_assignment(method={method!r}), best of {opts['n_init']} "
        "start(s); no optimality certificate"
    )
    if out["at_maxiter"]:
        message += f"; {out['at_maxiter']} start(s) stopped at maxiter={opts['maxiter']} (raise maxiter)"
    return make_result(
        x=out["perm"], fun=fun, nit=out["nit"], nfev=out["nfev"],
        status=STATUS_BUDGET if out["at_maxiter"] else STATUS_CONVERGED,
        message=message,
        bound=float("nan"), gap=float("nan"), nodes_explored=0, method=method,
    )
