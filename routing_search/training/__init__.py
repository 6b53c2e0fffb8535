"""Training: the alternating trainer :func:`fit`, its search schedule, metrics and callbacks, a searcher
for your own loop, the Sinkhorn schedule, losses and checkpoints."""

from .. import losses
from . import task_metrics
from .callbacks import FitEvent
from .checkpoint import CheckpointError, check_compatible, load_checkpoint, save_checkpoint
from .data_source import make_loader
from .distributed_training import GlobalBatchSampler, make_distributed_loader
from .gate_report import gate_report, harden_model
from .history import FitResult, History
from .loop import fit
from ..losses import bce_with_logits_loss, cross_entropy_loss, mse_loss, multitask_loss
from .schedule import SearchSchedule
from ..search.refit import RefitOptions
from .searcher import LocalSearcher, Searcher
from .sinkhorn_schedule import anneal_sinkhorn
from .task_metrics import TaskMetric

__all__ = [
    "fit",
    "FitResult",
    "History",
    "SearchSchedule",
    "FitEvent",
    "make_loader",
    "make_distributed_loader",
    "GlobalBatchSampler",
    "anneal_sinkhorn",
    "gate_report",
    "harden_model",
    "LocalSearcher",
    "Searcher",
    "RefitOptions",
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
