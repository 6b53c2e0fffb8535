"""Model-level analysis: hardening selector gates to their exact binary form (with a certificate)
(:mod:`~routing_search.analysis.hardening`), optimality gaps of a trained model against the exact
solvers and the permutation objective of a model with its experts frozen, for landscapes
(:mod:`~routing_search.analysis.gaps`)."""

from .gaps import LOSS_NAMES, frozen_arrays, optimality_gap, permutation_objective
from .hardening import HardenCertificate, HardGate, certify, harden, snap_codes_

__all__ = [
    "LOSS_NAMES",
    "HardenCertificate",
    "HardGate",
    "certify",
    "harden",
    "snap_codes_",
    "optimality_gap",
    "frozen_arrays",
    "permutation_objective",
]
