"""The result object every solver and search returns, and what its ``status`` codes mean.

All front doors (``local_search``, ``solve_subset``, ``solve_permutation``, ``optimality_gap``) return a
``scipy.optimize.OptimizeResult`` built by :func:`make_result`, so that ``success`` always means the
same thing: the method finished by its own criterion (``status == 0``). A budget stop still returns the
best point found, with ``success=False`` as scipy does when ``maxiter`` is reached.

Example:
    >>> res = make_result(x=[2, 0, 1], fun=0.5, nit=3, nfev=10, status=STATUS_BUDGET, message="max_nodes reached",
    ...                   bound=0.25)
    >>> res.success, res.status, res.fun, res.bound
    (False, 1, 0.5, 0.25)
    >>> make_result(x=None, fun=0.0, nit=0, nfev=0, status=STATUS_CONVERGED, message="converged").success
    True
"""

from __future__ import annotations

from typing import Any

from scipy.optimize import OptimizeResult

__all__ = ["STATUS_CONVERGED", "STATUS_BUDGET", "STATUS_NONFINITE", "STATUS_MESSAGES", "make_result"]

STATUS_CONVERGED = 0
"""The method finished by its own criterion (local or proven global optimum)."""
STATUS_BUDGET = 1
"""A budget (``max_iter``, ``max_evals``, ``max_nodes``, ...) or a callback stopped it early."""
STATUS_NONFINITE = 2
"""The objective was NaN or infinite; nothing was changed on its account."""

STATUS_MESSAGES = {
    STATUS_CONVERGED: "converged",
    STATUS_BUDGET: "stopped by a budget or a callback",
    STATUS_NONFINITE: "non-finite objective",
}


def make_result(*, x: Any, fun: float, nit: int, nfev: int, status: int, message: str, **fields: Any) -> OptimizeResult:
    """An ``OptimizeResult`` with the fields every front door shares; ``success`` is ``status == 0``."""
    if status not in STATUS_MESSAGES:
        raise ValueError(f"status must be one of {sorted(STATUS_MESSAGES)}, got {status!r}")
    return OptimizeResult(
        x=x, fun=float(fun), nit=int(nit), nfev=int(nfev), success=status == STATUS_CONVERGED, status=int(status), message=message, **fields
    )
