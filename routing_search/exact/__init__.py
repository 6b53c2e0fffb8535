"""Exact solvers on arrays: the cardinality-constrained subset problem, the permutation problem and
the landscape of local optima. Everything here takes numpy arrays (or tensors) and knows nothing of
models; model-level analysis (``harden``, optimality gaps) lives in :mod:`routing_search.analysis`.

Modules: :mod:`~routing_search.exact.arrays` (input checks and the named losses shared by the
solvers), :mod:`~routing_search.exact.subset_solver` (:func:`solve_subset`),
:mod:`~routing_search.exact.permutation_solver` (:func:`solve_permutation`) and
:mod:`~routing_search.exact.move_graph` (:func:`landscape`).

One vocabulary: enumeration is ``method="exhaustive"``; ``loss`` is a name, ``"squared"`` (the mean
squared error of :func:`routing_search.losses.mse_loss`) or ``"logistic"``; results come from
:func:`routing_search.result.make_result` (``success`` is ``status == 0``).
"""

from .arrays import LOSSES
from .move_graph import LandscapeSummary, landscape
from .permutation_solver import QAPMatrices, permutation_loss, qap_matrices, solve_permutation
from .subset_solver import solve_subset, subset_objective

__all__ = [
    "LOSSES",
    "solve_subset",
    "subset_objective",
    "solve_permutation",
    "permutation_loss",
    "qap_matrices",
    "QAPMatrices",
    "landscape",
    "LandscapeSummary",
]
