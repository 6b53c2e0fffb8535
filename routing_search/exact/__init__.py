"""Exact formulations of the expert-selection problem."""

from .encoding import code_matrix, hard_gate, hard_selector, num_bits, reachable_mass, selector

__all__ = [
    "code_matrix",
    "hard_gate",
    "hard_selector",
    "num_bits",
    "reachable_mass",
    "selector",
]

from .harden import HardenCertificate, HardGate, certify, harden, snap_codes_  # noqa: E402

__all__ += ["HardenCertificate", "HardGate", "certify", "harden", "snap_codes_"]

from .gap import frozen_arrays, optimality_gap, permutation_objective  # noqa: E402
from .landscape import LandscapeSummary, landscape  # noqa: E402
from .permutation import QAPMatrices, permutation_loss, qap_matrices, solve_permutation  # noqa: E402
from .subset import solve_subset, subset_objective  # noqa: E402

__all__ += [
    "solve_subset",
    "subset_objective",
    "solve_permutation",
    "permutation_loss",
    "qap_matrices",
    "QAPMatrices",
    "landscape",
    "LandscapeSummary",
    "optimality_gap",
    "frozen_arrays",
    "permutation_objective",
]
