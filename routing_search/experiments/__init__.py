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
from .report import strip_times, write_report
from .runner import ExperimentResult, RunRecord, apply_random_permutations, run_experiment, run_one
from .stats import expected_best_of_n, mean_se, paired_comparison, trials_needed
from .tune import TuneTrial, run_tune, write_tune_report

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
    "write_report",
    "strip_times",
    "mean_se",
    "paired_comparison",
    "expected_best_of_n",
    "trials_needed",
    "TuneTrial",
    "run_tune",
    "write_tune_report",
]
