"""Gates: every gate maps an input batch to expert weights on the simplex (see :mod:`.protocol`).

Built-in gates: :class:`Softmax` (dense), :class:`TopK` (Shazeer et al.), :class:`Hash`
(Roller et al.), :class:`GumbelSoftmax` (static baseline), :class:`DSelectK`, :class:`COMET` and the
wrapper :class:`TaskAware`. Any ``nn.Module`` following :class:`Gate` works wherever a gate is expected.
"""

from .annealed import BudgetAnnealing
from .comet import COMET
from .dselect_k import DSelectK
from .gumbel import GumbelSoftmax
from .hash import Hash
from .protocol import BaseGate, Gate, GateOutput
from .smooth_step import GammaAnnealing, smooth_step
from .softmax import Softmax
from .task_aware import TaskAware
from .topk import TopK

__all__ = [
    "GateOutput",
    "Gate",
    "BaseGate",
    "smooth_step",
    "GammaAnnealing",
    "BudgetAnnealing",
    "Softmax",
    "TopK",
    "Hash",
    "GumbelSoftmax",
    "TaskAware",
    "DSelectK",
    "COMET",
]
