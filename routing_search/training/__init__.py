"""Training: the alternating trainer :func:`fit`, a searcher for your own loop, losses and checkpoints."""

from .. import losses
from .checkpoint import CheckpointError, check_compatible, load_checkpoint, save_checkpoint
from .fit import FitResult, History, fit
from ..losses import bce_with_logits_loss, cross_entropy_loss, mse_loss, multitask_loss
from .searcher import LocalSearcher
from . import task_metrics
from .task_metrics import TaskMetric

__all__ = [
    "fit",
    "FitResult",
    "History",
    "LocalSearcher",
    "task_metrics",
    "TaskMetric",
    "save_checkpoint",
    "load_checkpoint",
    "check_compatible",
    "CheckpointError",
    "losses",
    "mse_loss",
    "bce_with_logits_loss",
    "cross_entropy_loss",
    "multitask_loss",
]
