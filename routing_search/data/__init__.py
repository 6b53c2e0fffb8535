"""Data: synthetic multi-task data drawn from a ground-truth MoE."""

from .synthetic import SyntheticMoEData, SyntheticMoETruth, make_synthetic_moe

__all__ = ["SyntheticMoEData", "SyntheticMoETruth", "make_synthetic_moe"]
