"""Experiments: gates × arms × seeds on the papers' datasets, with controls, paired reports and tuning budgets."""

from .config import (
    ARMS,
    DATASETS,
    GATES,
    PRESETS,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    SearchConfig,
    SinkhornConfig,
    TrainConfig,
    TuneConfig,
    TuneGrid,
    make_config,
    make_tune_config,
)
from .datasets import ExperimentData, MetricSpec, load_experiment_data
from .runner import ExperimentResult, RunRecord, apply_random_permutations, run_experiment, run_one

__all__ = [
    "ARMS",
    "DATASETS",
    "GATES",
    "PRESETS",
    "DataConfig",
    "ExperimentConfig",
    "ModelConfig",
    "SearchConfig",
    "SinkhornConfig",
    "TrainConfig",
    "TuneConfig",
    "TuneGrid",
    "make_config",
    "make_tune_config",
    "ExperimentData",
    "MetricSpec",
    "load_experiment_data",
    "ExperimentResult",
    "RunRecord",
    "apply_random_permutations",
    "run_experiment",
    "run_one",
]
