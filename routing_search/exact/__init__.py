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
