"""Discrete local search over gate→expert permutations, and learned (Sinkhorn) permutations."""

from .local_search import METHODS, Move, local_search
from .moves import MOVES, insertion_moves, perturb, rotation_moves, swap_moves
from .objective import Candidate, RoutingObjective
from .sinkhorn import SinkhornPermutation, log_sinkhorn, sinkhorn_modules

__all__ = [
    "local_search",
    "Move",
    "METHODS",
    "RoutingObjective",
    "Candidate",
    "MOVES",
    "swap_moves",
    "insertion_moves",
    "rotation_moves",
    "perturb",
    "SinkhornPermutation",
    "log_sinkhorn",
    "sinkhorn_modules",
]
