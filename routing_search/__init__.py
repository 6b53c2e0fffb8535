"""routing_search: expert selection in sparse Mixture-of-Experts as combinatorial optimisation.

Any gate (Softmax, Top-k, Hash, DSelect-k, COMET, Gumbel-softmax, task-aware, your own) behind one
protocol; MoE layers with an explicit gate→expert permutation; discrete local search over that
permutation alternated with first-order training; exact binary-encoding reformulations and solvers.
"""

from . import analysis, data, exact, gates, layers, metrics, search, training
from .gates import COMET, DSelectK, GateOutput, GumbelSoftmax, Hash, Softmax, TaskAware, TopK
from .layers import MLP, MoE, MoEOutput, MultiGateMoE, MultiGateOutput, Permutation, SharedBottom, make_experts
from .search import SinkhornPermutation, local_search
from .training import LocalSearcher, fit

__version__ = "0.1.0"

__all__ = [
    "gates",
    "layers",
    "search",
    "data",
    "exact",
    "analysis",
    "metrics",
    "training",
    "GateOutput",
    "Softmax",
    "TopK",
    "Hash",
    "GumbelSoftmax",
    "DSelectK",
    "COMET",
    "TaskAware",
    "MoE",
    "MoEOutput",
    "MultiGateMoE",
    "MultiGateOutput",
    "SharedBottom",
    "Permutation",
    "MLP",
    "make_experts",
    "local_search",
    "SinkhornPermutation",
    "fit",
    "LocalSearcher",
]
