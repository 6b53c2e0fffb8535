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
