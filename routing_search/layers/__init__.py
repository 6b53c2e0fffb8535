"""MoE layers: the explicit gate→expert permutation, dispatch, MoE and multi-gate MoE."""

from .dispatch import all_expert_outputs, choose_dispatch, combine_dense, combine_sparse, depends_on_batch
from .experts import MLP, make_experts
from .moe import ExpertUsage, MoE, MoEOutput, UsageMeter, expert_usage
from .multigate import MultiGateMoE, MultiGateOutput, SharedBottom
from .permutation import Permutation, apply_permutation, check_permutation, invert_permutation

__all__ = [
    "MoE",
    "MoEOutput",
    "MultiGateMoE",
    "MultiGateOutput",
    "SharedBottom",
    "Permutation",
    "apply_permutation",
    "check_permutation",
    "invert_permutation",
    "all_expert_outputs",
    "combine_dense",
    "combine_sparse",
    "choose_dispatch",
    "depends_on_batch",
    "MLP",
    "make_experts",
    "ExpertUsage",
    "UsageMeter",
    "expert_usage",
]
