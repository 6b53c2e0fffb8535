"""Typed configuration of experiments and tuning runs: datasets, gates, arms, presets and grids.

Everything an experiment needs is in one :class:`ExperimentConfig`; :func:`make_config` fills it from a
dataset name and a preset (``'cpu'``: small subsets and few epochs, minutes on two cores; ``'paper'``:
the papers' sizes, meant for a GPU). Every field is checked when the object is built, so a bad value
fails before any data is loaded, with a message that names the field and the accepted values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any

from .._validation import check_choice, check_int, check_positive_float
from ..training import SearchSchedule

__all__ = [
    "DATASETS",
    "GATES",
    "ARMS",
    "SEARCH_ARMS",
    "PRESETS",
    "GATE_INPUTS",
    "ModelConfig",
    "TrainConfig",
    "SearchConfig",
    "SinkhornConfig",
    "GuardConfig",
    "DataConfig",
    "ExperimentConfig",
    "TuneGrid",
    "TuneConfig",
    "make_config",
    "make_tune_config",
    "default_grid",
]

DATASETS = ("synthetic", "keyed", "movielens", "multi-mnist", "multi-fashion")
GATES = ("softmax", "topk", "hash", "dselect_k", "comet", "gumbel")
ARMS = ("sgd", "random", "search", "guarded", "sinkhorn")
SEARCH_ARMS = ("search", "guarded")
"""The arms of :data:`ARMS` that search during training (``guarded`` adds metric guards to ``search``)."""
PRESETS = ("cpu", "paper")
GATE_INPUTS = ("static", "example")
KEYED_DATASETS = ("keyed", "movielens")
GENERATED_DATASETS = ("synthetic", "keyed")
DEFAULT_GATES = {
    "keyed": ("hash", "topk", "softmax"),
    "movielens": ("softmax", "topk", "hash", "dselect_k", "comet"),
}


def _check_names(name: str, values: Any, choices: tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, (list, tuple)):
        raise TypeError(f"{name} must be a list of names from {', '.join(choices)}, got {values!r}")
    if not values:
        raise ValueError(f"{name} must name at least one of {', '.join(choices)}")
    out = tuple(check_choice(name, v, choices) for v in values)
    if len(set(out)) != len(out):
        raise ValueError(f"{name} names an entry twice: {list(out)}")
    return out


def _check_fraction(name: str, value: Any, *, upper_open: bool = True) -> float:
    value = check_positive_float(name, value, allow_zero=True)
    if value >= 1 if upper_open else value > 1:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the model a dataset's builder makes.

    Attributes:
        num_experts: shared experts n.
        k: experts per selection for Top-k, DSelect-k and COMET.
        expert_hidden: hidden width(s) of each expert (MLP experts: hidden layers; CNN experts: the dense
            layer after the convolutions).
        expert_channels: channels of the two convolutions of a CNN expert (image datasets only).
        expert_output: width of each expert's output (the towers' input); 1 for synthetic regression.
        tower_hidden: hidden width of each task tower (0: a linear tower).
        embedding_dim: width of the user and movie embeddings (MovieLens only).
        dropout: dropout after each hidden expert layer.
        gate_input: ``'static'`` (one learned weight vector per task) or ``'example'`` (per-example gates
            fed the model's input to the MoE layer).
        entropy_weight: entropy regulariser of DSelect-k / COMET (None: the gate's own default).
        gamma: smooth-step scale of DSelect-k / COMET (None: the gate's own default).
    """

    num_experts: int = 8
    k: int = 2
    expert_hidden: tuple[int, ...] = (16,)
    expert_channels: tuple[int, int] = (4, 8)
    expert_output: int = 1
    tower_hidden: int = 0
    embedding_dim: int = 16
    dropout: float = 0.0
    gate_input: str = "static"
    entropy_weight: float | None = None
    gamma: float | None = None

    def __post_init__(self) -> None:
        check_int("num_experts", self.num_experts, minimum=2)
        check_int("k", self.k, minimum=1, maximum=self.num_experts)
        if not isinstance(self.expert_hidden, (list, tuple)):
            raise TypeError(f"expert_hidden must be a list of hidden widths, e.g. (16,), got {self.expert_hidden!r}")
        object.__setattr__(self, "expert_hidden", tuple(check_int("expert_hidden", h, minimum=1) for h in self.expert_hidden))
        if not isinstance(self.expert_channels, (list, tuple)) or len(self.expert_channels) != 2:
            raise ValueError(f"expert_channels must hold two channel counts, e.g. (4, 8), got {self.expert_channels!r}")
        object.__setattr__(self, "expert_channels", tuple(check_int("expert_channels", c, minimum=1) for c in self.expert_channels))
        check_int("expert_output", self.expert_output, minimum=1)
        check_int("tower_hidden", self.tower_hidden, minimum=0)
        check_int("embedding_dim", self.embedding_dim, minimum=1)
        _check_fraction("dropout", self.dropout)
        check_choice("gate_input", self.gate_input, GATE_INPUTS)
        if self.entropy_weight is not None:
            check_positive_float("entropy_weight", self.entropy_weight, allow_zero=True)
        if self.gamma is not None:
            check_positive_float("gamma", self.gamma)


@dataclass(frozen=True)
class TrainConfig:
    """First-order training: epochs, batch size, Adam learning rate, and the weight of the gates' losses."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-2
    gate_loss_weight: float = 1.0

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_positive_float("lr", self.lr)
        check_positive_float("gate_loss_weight", self.gate_loss_weight, allow_zero=True)


@dataclass(frozen=True)
class SearchConfig:
    """The ``search`` arm's schedule, handed to :func:`routing_search.fit`.

    Attributes:
        method: local-search method (``'swap'``, ``'ils'``, ...; see :func:`routing_search.local_search`).
        every_epochs: search at the end of every this many epochs.
        rows: the search scores moves on a fixed seeded subset of at most this many validation rows.
        max_iter: accepted moves per search at most.
    """

    method: str = "swap"
    every_epochs: int = 1
    rows: int = 2048
    max_iter: int = 1000

    def __post_init__(self) -> None:
        check_choice("search method", self.method, ("swap", "insertion", "rotation", "ils", "exhaustive", "codes"))
        check_int("every_epochs", self.every_epochs, minimum=1)
        check_int("rows", self.rows, minimum=1)
        check_int("max_iter", self.max_iter, minimum=0)

    def as_fit_option(self, guard: Sequence[Any] = ()) -> SearchSchedule:
        """The schedule in the form ``fit(search=...)`` takes; ``guard``: the guards every accepted move must
        pass (:class:`~routing_search.search.MetricGuard` objects; empty: an unguarded search)."""
        options: dict[str, Any] = {"max_iter": self.max_iter}
        if guard:
            options["guard"] = list(guard)
        return SearchSchedule(method=self.method, every_epochs=self.every_epochs, rows=self.rows, options=options)


@dataclass(frozen=True)
class GuardConfig:
    """The ``guarded`` arm: the ``search`` arm with a guard on every task's paper metric.

    A move the search's loss accepts is kept only if no task's metric (MovieLens: ROC AUC of the watched
    task and RMSE of the rating on watched rows; image pairs: each task's accuracy; synthetic families:
    each task's MSE), computed on the same validation rows the search scores, is worse than at the start
    of that search by more than ``tolerance`` (see :mod:`routing_search.search.guards`).

    Attributes:
        tolerance: how much worse than at the start of a search each guarded metric may get, in the
            metric's own units (0: not worse at all).
    """

    tolerance: float = 0.0

    def __post_init__(self) -> None:
        check_positive_float("guard tolerance", self.tolerance, allow_zero=True)


@dataclass(frozen=True)
class SinkhornConfig:
    """The ``sinkhorn`` arm (COMET+'s learned permutation, one shared by all task gates).

    Attributes:
        anneal_fraction: the soft phase lasts this fraction of the epochs (COMET+: 1–10 of 100 epochs),
            at least one epoch and at most ``epochs - 1``; the permutation is then rounded and frozen.
        entropy_weight: ζ, the weight of the permutation-entropy penalty.
    """

    anneal_fraction: float = 0.1
    entropy_weight: float = 1e-4

    def __post_init__(self) -> None:
        value = check_positive_float("anneal_fraction", self.anneal_fraction)
        if value > 1:
            raise ValueError(f"anneal_fraction must be in (0, 1], got {value}")
        check_positive_float("sinkhorn entropy_weight", self.entropy_weight, allow_zero=True)

    def anneal_steps(self, epochs: int) -> int:
        """Epochs of the soft phase for a run of ``epochs`` epochs (rounded up, in ``[1, max(1, epochs - 1)]``)."""
        steps = -(-int(round(self.anneal_fraction * epochs * 1000)) // 1000)
        return max(1, min(steps, max(1, epochs - 1)))


@dataclass(frozen=True)
class DataConfig:
    """Which rows a dataset contributes.

    Attributes:
        path: the dataset's file or directory (None: the loader's default place).
        max_train, max_val, max_test: keep at most this many rows of each split (a seeded subset; None: all).
        num_samples: rows drawn for the synthetic families (train/val/test 70/15/15).
        input_dim, num_tasks: the synthetic families' input width and task count.
        num_keys: distinct keys of the keyed family.
        alpha: MovieLens loss weight of task 1 (``α·L1 + (1−α)·L2``).
    """

    path: str | None = None
    max_train: int | None = None
    max_val: int | None = None
    max_test: int | None = None
    num_samples: int = 4000
    input_dim: int = 10
    num_tasks: int = 4
    num_keys: int = 64
    alpha: float = 0.5

    def __post_init__(self) -> None:
        for name in ("max_train", "max_val", "max_test"):
            value = getattr(self, name)
            if value is not None:
                check_int(name, value, minimum=1)
        check_int("num_samples", self.num_samples, minimum=20)
        check_int("input_dim", self.input_dim, minimum=1)
        check_int("num_tasks", self.num_tasks, minimum=1, maximum=128)
        check_int("num_keys", self.num_keys, minimum=2)
        alpha = check_positive_float("alpha", self.alpha)
        if alpha >= 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: every gate × arm × seed on one dataset.

    Attributes:
        dataset: one of :data:`DATASETS`.
        gates: gate names from :data:`GATES` (``'hash'`` needs a dataset with keys: keyed, movielens).
        arms: arm names from :data:`ARMS`: ``sgd`` (first-order only), ``random`` (one random permutation
            per permutation module before training, then first-order only: the control), ``search``
            (alternating local search), ``guarded`` (the same search, keeping a move only if no task's paper
            metric on the search rows gets worse; see :class:`GuardConfig`), ``sinkhorn`` (learned
            permutation, COMET+).
        seeds: the seeds ``0 .. seeds-1``; each fixes the data, the initialisation and the batch order of
            every arm (a paired design).
        preset: the preset the sizes came from (recorded in the report).
        model, train, search, guard, sinkhorn, data: the sizes and schedules.
        device: where to train (``'cpu'``, ``'cuda'``, ...).
        threads: torch CPU threads of this process (1 when several processes share a machine).
        progress: show progress bars.
    """

    dataset: str
    gates: tuple[str, ...] = ("softmax", "topk", "dselect_k")
    arms: tuple[str, ...] = ARMS
    seeds: int = 5
    preset: str = "cpu"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    sinkhorn: SinkhornConfig = field(default_factory=SinkhornConfig)
    data: DataConfig = field(default_factory=DataConfig)
    device: str = "cpu"
    threads: int = 1
    progress: bool = False

    def __post_init__(self) -> None:
        check_choice("dataset", self.dataset, DATASETS)
        object.__setattr__(self, "gates", _check_names("gates", self.gates, GATES))
        object.__setattr__(self, "arms", _check_names("arms", self.arms, ARMS))
        check_int("seeds", self.seeds, minimum=1)
        check_choice("preset", self.preset, PRESETS)
        if "hash" in self.gates and self.dataset not in KEYED_DATASETS:
            raise ValueError(
                f"gate 'hash' routes by an integer key; dataset {self.dataset!r} has none "
                f"(use one of {', '.join(KEYED_DATASETS)})"
            )
        if not isinstance(self.device, str) or not self.device:
            raise TypeError(f"device must be a device name such as 'cpu' or 'cuda', got {self.device!r}")
        check_int("threads", self.threads, minimum=1)
        for name, kind in (("model", ModelConfig), ("train", TrainConfig), ("search", SearchConfig), ("guard", GuardConfig),
                           ("sinkhorn", SinkhornConfig), ("data", DataConfig)):
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"{name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}")
        if self.dataset in GENERATED_DATASETS:  # these fields would be ignored without a word
            unused = [name for name in ("path", "max_train", "max_val", "max_test") if getattr(self.data, name) is not None]
            if unused:
                raise ValueError(f"data fields {unused} apply to a loaded data set; {self.dataset!r} is generated "
                                 "(size it with data num_samples, split 70/15/15)")
        if self.dataset == "keyed" and self.data.num_keys < self.model.num_experts:  # else the data load fails later
            raise ValueError(f"data num_keys ({self.data.num_keys}) must be at least model num_experts "
                             f"({self.model.num_experts}) for 'keyed': every expert's Hash bucket needs a key")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable form (recorded in the report)."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------- presets
def _preset_parts(dataset: str, preset: str) -> tuple[ModelConfig, TrainConfig, DataConfig]:
    if dataset in ("synthetic", "keyed"):
        if preset == "cpu":
            return (
                ModelConfig(num_experts=8, k=2, expert_hidden=(16,), expert_output=1, gate_input="static"),
                TrainConfig(epochs=20 if dataset == "synthetic" else 10, batch_size=128, lr=1e-2),
                DataConfig(num_samples=4000, input_dim=10, num_tasks=4),
            )
        return (
            ModelConfig(num_experts=16, k=2, expert_hidden=(64,), expert_output=1, gate_input="static"),
            TrainConfig(epochs=100, batch_size=256, lr=1e-3),
            DataConfig(num_samples=40000, input_dim=10, num_tasks=8),
        )
    if dataset == "movielens":
        if preset == "cpu":
            return (
                ModelConfig(num_experts=8, k=2, expert_hidden=(32,), expert_output=32, tower_hidden=32,
                            embedding_dim=16, dropout=0.0, gate_input="example"),
                TrainConfig(epochs=5, batch_size=256, lr=1e-2),
                DataConfig(max_train=80000, max_val=4000, max_test=4000, alpha=0.5),
            )
        # COMET's configuration: 128-d embeddings, 16 experts (Dense 256, ReLU, dropout 0.5), towers Dense 256 -> 1.
        return (
            ModelConfig(num_experts=16, k=2, expert_hidden=(256,), expert_output=256, tower_hidden=256,
                        embedding_dim=128, dropout=0.5, gate_input="example"),
            TrainConfig(epochs=100, batch_size=512, lr=1e-3),
            DataConfig(alpha=0.5),
        )
    # multi-mnist / multi-fashion
    if preset == "cpu":
        return (
            ModelConfig(num_experts=8, k=2, expert_hidden=(16,), expert_channels=(2, 4), expert_output=16,
                        tower_hidden=0, gate_input="static"),
            TrainConfig(epochs=3, batch_size=64, lr=3e-3),
            DataConfig(max_train=2000, max_val=500, max_test=1000),
        )
    # DSelect-k: 8 CNN experts, dense task towers.
    return (
        ModelConfig(num_experts=8, k=2, expert_hidden=(50,), expert_channels=(10, 20), expert_output=50,
                    tower_hidden=50, gate_input="static"),
        TrainConfig(epochs=100, batch_size=256, lr=1e-3),
        DataConfig(),
    )


def make_config(dataset: str, preset: str = "cpu", **overrides: Any) -> ExperimentConfig:
    """An :class:`ExperimentConfig` for ``dataset`` with the sizes of ``preset``.

    ``overrides`` replace top-level fields (``gates``, ``arms``, ``seeds``, ``device``, ...) or, given as
    ``model=``, ``train=``, ``data=``, ``search=``, ``guard=``, ``sinkhorn=`` dicts (or the typed objects),
    individual fields of those parts.

    >>> cfg = make_config("synthetic", "cpu", seeds=2, train={"epochs": 3})
    >>> cfg.seeds, cfg.train.epochs, cfg.model.num_experts
    (2, 3, 8)
    """
    check_choice("dataset", dataset, DATASETS)
    check_choice("preset", preset, PRESETS)
    model, train, data = _preset_parts(dataset, preset)
    # MovieLens' MoE sits behind the embeddings, so each candidate re-runs the model's head on the search
    # rows: a smaller search budget keeps the search arm within minutes on two cores.
    search = SearchConfig(rows=512, max_iter=20) if dataset == "movielens" and preset == "cpu" else SearchConfig()
    parts: dict[str, Any] = {"model": model, "train": train, "data": data, "search": search, "guard": GuardConfig(),
                             "sinkhorn": SinkhornConfig()}
    top: dict[str, Any] = {}
    for key, value in overrides.items():
        if key in parts:
            if isinstance(value, dict):
                known = {f.name for f in dataclasses.fields(parts[key])}
                unknown = sorted(set(value) - known)
                if unknown:
                    raise ValueError(f"unknown {key} fields {unknown}; accepted: {sorted(known)}")
                parts[key] = dataclasses.replace(parts[key], **value)
            else:
                parts[key] = value
        else:
            top[key] = value
    known_top = {f.name for f in dataclasses.fields(ExperimentConfig)} - set(parts) - {"dataset", "preset"}
    unknown = sorted(set(top) - known_top)
    if unknown:
        raise ValueError(f"unknown experiment fields {unknown}; accepted: {sorted(known_top | set(parts))}")
    if "gates" not in top and dataset in DEFAULT_GATES:
        top["gates"] = DEFAULT_GATES[dataset]
    return ExperimentConfig(dataset=dataset, preset=preset, **parts, **top)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- tuning
@dataclass(frozen=True)
class TuneGrid:
    """The random-search space (each trial draws one value of every list, uniformly).

    The values follow the grids the DSelect-k / COMET papers describe (Adam learning rates, batch sizes,
    the entropy weight λ, k, the smooth-step γ); the papers' appendices with the exact lists are not
    part of this project, so these lists are a reconstruction, stated in the report.
    Search-schedule entries apply only to the arm with search.
    """

    lr: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
    batch_size: tuple[int, ...] = (64, 128, 256, 512)
    entropy_weight: tuple[float, ...] = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    k: tuple[int, ...] = (1, 2, 4)
    gamma: tuple[float, ...] = (0.1, 1.0, 10.0)
    search_every_epochs: tuple[int, ...] = (1, 2)
    search_method: tuple[str, ...] = ("swap", "ils")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            values = getattr(self, f.name)
            if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)) or not values:
                raise ValueError(f"grid entry {f.name} must be a non-empty list of values, got {values!r}")
            object.__setattr__(self, f.name, tuple(values))
        for v in self.lr + self.entropy_weight + self.gamma:
            check_positive_float("grid value", v, allow_zero=True)
        for v in self.batch_size + self.k + self.search_every_epochs:
            check_int("grid value", v, minimum=1)
        for method in self.search_method:
            check_choice("grid search_method", method, ("swap", "insertion", "rotation", "ils"))

    def sample(self, rng: Any) -> dict[str, Any]:
        """One point of the grid (``rng``: a ``numpy.random.Generator``)."""
        point: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            values = getattr(self, f.name)
            point[f.name] = values[int(rng.integers(len(values)))]
        return point


def default_grid(num_experts: int) -> TuneGrid:
    """The default grid with ``k`` values limited to ``num_experts``."""
    ks = tuple(k for k in TuneGrid().k if k <= num_experts)
    return TuneGrid(k=ks)


@dataclass(frozen=True)
class TuneConfig:
    """A tuning-budget study: ``trials`` random-search trials per arm, the same draws for every arm.

    Attributes:
        experiment: dataset, model sizes and training (its ``gates`` and ``arms`` are used; ``seeds`` not).
        trials: trials per arm (the pool the best-of-N curves are computed from).
        grid: the search space.
        seed: seeds the draws, the data and each trial's initialisation.
        target: the test value a tuner wants to reach (None: chosen from the pooled trials, see the report).
        probability: the probability with which "trials needed" reaches the target.
    """

    experiment: ExperimentConfig
    trials: int = 20
    grid: TuneGrid = field(default_factory=TuneGrid)
    seed: int = 0
    target: float | None = None
    probability: float = 0.9

    def __post_init__(self) -> None:
        check_int("trials", self.trials, minimum=2)
        check_int("seed", self.seed, minimum=0)
        if self.target is not None:
            check_positive_float("target", self.target, allow_zero=True)
        p = check_positive_float("probability", self.probability)
        if p >= 1:
            raise ValueError(f"probability must be in (0, 1), got {p}")
        bad = [a for a in self.experiment.arms if a not in ("sgd", "search", "random")]
        if bad:
            raise ValueError(f"tune compares arms 'sgd', 'random' and 'search'; got {bad}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable form."""
        return dataclasses.asdict(self)


def make_tune_config(dataset: str, preset: str = "cpu", *, trials: int = 20, seed: int = 0, target: float | None = None,
                     probability: float = 0.9, **overrides: Any) -> TuneConfig:
    """A :class:`TuneConfig` over ``dataset`` (default gates ``topk`` — and ``hash`` where keys exist — and
    arms ``sgd``, ``search``)."""
    overrides.setdefault("arms", ("sgd", "search"))
    overrides.setdefault("gates", ("topk", "hash") if dataset in KEYED_DATASETS else ("topk",))
    experiment = make_config(dataset, preset, **overrides)
    return TuneConfig(experiment=experiment, trials=trials, grid=default_grid(experiment.model.num_experts), seed=seed,
                      target=target, probability=probability)
