"""Data: the papers' data sets (MovieLens, Multi-MNIST, Multi-Fashion), synthetic multi-task data with a
known ground truth (a MoE, or a key-routed MoE for Hash routing), and the splits container loaders return.

No loader downloads anything: each takes ``path=None`` (the data's default place) or an explicit path,
and raises :class:`DataNotFoundError` with the exact install commands when the data is missing.
"""

from .keyed import KeyedSyntheticTruth, TrueExpert, make_keyed_synthetic
from .movielens import load_movielens, movielens_loss
from .overlay_mnist import load_multi_fashion, load_multi_mnist, overlay, read_idx
from .paths import DataFileError, DataNotFoundError, default_data_dir
from .splits import TASK_KINDS, Split, TaskDataset, TaskSpec
from .synthetic import SyntheticMoEData, SyntheticMoETruth, make_synthetic_moe

__all__ = [
    "SyntheticMoEData",
    "SyntheticMoETruth",
    "make_synthetic_moe",
    "TaskDataset",
    "TaskSpec",
    "Split",
    "TASK_KINDS",
    "load_movielens",
    "movielens_loss",
    "load_multi_mnist",
    "load_multi_fashion",
    "overlay",
    "read_idx",
    "make_keyed_synthetic",
    "KeyedSyntheticTruth",
    "TrueExpert",
    "DataNotFoundError",
    "DataFileError",
    "default_data_dir",
]
