"""Exact solvers on arrays: the cardinality-constrained subset problem, the permutation problem and
the landscape of local optima. Everything here takes numpy arrays (or tensors) and knows nothing of
models; model-level analysis (``harden``, optimality gaps) lives in :mod:`routing_search.analysis`.
"""

from .landscape import LandscapeSummary, landscape
from .permutation import QAPMatrices, permutation_loss, qap_matrices, solve_permutation
from .subset import solve_subset, subset_objective

__all__ = [
    "solve_subset",
    "subset_objective",
    "solve_permutation",
    "permutation_loss",
    "qap_matrices",
    "QAPMatrices",
    "landscape",
    "LandscapeSummary",
]
