"""Data: synthetic multi-task data drawn from a ground-truth MoE, and the splits container loaders return."""

from .splits import TASK_KINDS, Split, TaskDataset, TaskSpec
from .synthetic import SyntheticMoEData, SyntheticMoETruth, make_synthetic_moe

__all__ = ["SyntheticMoEData", "SyntheticMoETruth", "make_synthetic_moe", "TaskDataset", "TaskSpec", "Split", "TASK_KINDS"]
