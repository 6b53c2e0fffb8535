"""Discrete local search over gate→expert permutations, and learned (Sinkhorn) permutations.

Modules: :mod:`.descent` (the front door :func:`local_search`), :mod:`.options` (its typed options), :mod:`.guards` (metrics a search must not make worse),
:mod:`.objective` (exact, cached evaluation of candidates), :mod:`.swap_scan`, :mod:`.moves`,
:mod:`.codes` (code moves of static binary gates) and :mod:`.sinkhorn` (learned permutations).
"""

from .descent import Move, local_search
from .guards import MetricGuard
from .moves import MOVES, insertion_moves, perturb, rotation_moves, swap_moves
from .objective import Candidate, DistributedSearchError, RoutingObjective
from .options import METHODS, SearchOptions, option_names
from .sinkhorn import SinkhornPermutation, log_sinkhorn, sinkhorn_modules

__all__ = [
    "local_search",
    "Move",
    "METHODS",
    "SearchOptions",
    "MetricGuard",
    "option_names",
    "RoutingObjective",
    "Candidate",
    "DistributedSearchError",
    "MOVES",
    "swap_moves",
    "insertion_moves",
    "rotation_moves",
    "perturb",
    "SinkhornPermutation",
    "log_sinkhorn",
    "sinkhorn_modules",
]
