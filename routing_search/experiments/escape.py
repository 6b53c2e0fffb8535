"""Escaping bad starts: does permutation search beat one random permutation, paired by seed?

Families of bad starts, each on synthetic data with a known truth (every seed fixes the data, the
initialisation, the bad start and the batch order for every arm):

* ``dselect_collapsed``: a multi-gate MoE whose static DSelect-k task gates are all saturated on the
  same k experts (the smooth-step has zero gradient there, so first-order training cannot move them).
* ``comet_collapsed``: the same with static COMET trees.
* ``topk_margin``: per-example Top-k task routers whose bias gives the first k experts a logit margin
  (the other experts never enter the top k, so they get no gradient).
* ``hash_misassigned``: keyed data, a Hash-routed MoE pre-trained with its buckets on the right experts,
  then every bucket moved to a wrong expert (a random derangement).
* ``trained_shuffled``: a multi-gate Top-k MoE pre-trained normally, then every task's permutation
  shuffled by a random derangement (experts trained for another permutation).

Arms (all trained with the same Adam steps and batch order):

* ``sgd``: first-order training only.
* ``random``: one uniformly random permutation per permutation row (every selector row of every
  permutation module; the identity is not excluded) applied before training (the control).
* ``search``: the frozen-expert swap search of :func:`routing_search.local_search` before training and
  every ``search_every`` steps.
* ``refit``: the same schedule, each search = the frozen swap search (fast first stage) followed by
  :func:`routing_search.search.refit.refit_search` (moves scored after a closed-form refit of the
  touched experts' last layers on training rows, judged on held-out rows) — ``fit``'s own
  ``SearchSchedule(refit=RefitOptions(...), at_start=True)``.
* ``refit_route``: as ``refit``, but only the chosen permutations are written (the refitted layers
  are discarded): an ablation that separates the routing choice from the closed-form head start.
* ``lookahead``: the same schedule, each search = the frozen swap search followed by
  :func:`routing_search.search.lookahead.lookahead_search` (the best few refit-ranked moves judged after
  a short stretch of training from a copy).

Entry point: :func:`run_escape` writes ``report.md`` and ``report.json`` into a new run directory. With
``EscapeConfig(curve=True)`` every arm's test loss is also recorded after its start and after every epoch,
and the report gives the steps each arm needs to reach ``sgd``'s final loss and the loss at several
budgets (:func:`curve_summary`): whether a search gets somewhere faster, not only where it ends.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._validation import check_choice, check_int, check_positive_float, check_rng
from ..batches import as_batch, call_model, eval_mode, unwrap_prediction
from ..data import make_synthetic_moe
from ..gates import COMET, DSelectK, Hash, TopK
from ..gates.hash import balanced_hash_table
from ..layers import MoE, MultiGateMoE, make_experts
from ..losses import mse_loss, multitask_loss
from ..search import RoutingObjective, local_search
from ..search.codes import set_selector_slot
from ..search.lookahead import lookahead_search
from ..search.refit import RefitOptions
from ..training import LocalSearcher, SearchSchedule, fit
from ..training.searcher import generator_state, set_generator_state
from .datasets import synthetic_min_weight
from .output import new_run_dir, removed_if_empty_on_failure
from .stats import expected_best_of_n, mean_se, paired_comparison
from .stats import trials_needed as stats_trials_needed

__all__ = ["EscapeConfig", "FAMILIES", "ARMS", "run_escape", "build_start", "run_arm", "summarise", "run_tuning",
           "trials_needed", "expected_best", "write_report", "curve_summary", "compare_to_control", "meets_criterion",
           "ESCAPE_WORSE_RULE"]

FAMILIES = ("dselect_collapsed", "comet_collapsed", "topk_margin", "hash_misassigned", "trained_shuffled")
ARMS = ("sgd", "random", "search", "refit", "refit_route", "lookahead")


@dataclass
class EscapeConfig:
    """Everything the escape study needs (checked when built).

    Attributes:
        families: bad-start families to run (see the module docstring), a subset of :data:`FAMILIES`.
        arms: arms to run, a subset of :data:`ARMS` (default: the two controls, ``search`` and
            ``refit``; ``refit_route`` and ``lookahead`` are ablations that cost more); ``sgd`` and
            ``random`` are the controls the summary compares against and must be included.
        seeds: seeds; each fixes the data, initialisation, bad start and batch order of every arm.
        num_experts: experts n (learned and true).
        k: experts per task (selectors of the DSelect-k / COMET gates, k of Top-k, true support size; its smallest true
            weight is 0.2, or 0.5 / k from k = 5 on: :func:`~routing_search.experiments.datasets.synthetic_min_weight`).
        num_tasks: regression tasks T (the hash family has one task).
        input_dim: input width d.
        hidden: hidden width of the learned and the true experts.
        num_samples: rows, split 70 / 15 / 15 into train / validation / test.
        noise: target noise standard deviation.
        num_keys: keys of the hash family (each key belongs to one true expert).
        epochs: training epochs of every arm after the bad start.
        pretrain_epochs: epochs of normal training that build the pre-trained starts
            (``hash_misassigned``, ``trained_shuffled``).
        batch_size: rows per Adam step.
        lr: Adam learning rate.
        patience: early stopping on the validation loss (best epoch restored) after this many epochs
            without improvement, for every arm; ``None`` trains all ``epochs`` (small experts that each
            see few rows overfit, and then test loss rewards whichever arm trained least).
        margin: logit margin of the first k experts in ``topk_margin``.
        search_every: the search arms search before training and every this many steps.
        search_rows: held-out (validation) rows every search scores on.
        fit_rows: training rows the refits are fitted on.
        ridge: ridge of the refit towards the current last layers.
        refit_max_iter: accepted refit moves per search at most.
        lookahead_candidates: moves (ranked by the refit score) judged by lookahead per search.
        lookahead_steps: Adam steps of each lookahead.
        win_threshold: relative margin of the per-seed counts: a win when the arm's test loss is at least
            this much (0.01 = 1 %) below the control's, a loss when it is more than this much above it (see
            :data:`ESCAPE_WORSE_RULE` and :func:`compare_to_control`); a tie is neither, also at 0.
        curve: also record every arm's test loss along training (after the arm's start, i.e. after the
            random permutation or the search before training, and after every epoch; the restored best
            epoch is not a point of the curve), and report steps to a target and the loss at several
            budgets (see :func:`curve_summary`).
        tune_families: families of the tuning-budget study (empty: skip it).
        tune_arms: arms of the tuning-budget study (any of :data:`ARMS`).
        tune_trials: random-search trials per arm and family; trial ``i`` of every arm uses the same
            hyper-parameters and initialisation seed ``i`` (paired), on data seed ``tune_data_seed``.
        tune_data_seed: data seed of the tuning-budget study.
        tune_lr / tune_batch_size / tune_epochs: the grids the trials draw from (uniformly).
        tune_quantile: the target is this quantile of the test losses of all trials of all arms.
        tune_probability: trials needed = the smallest N with P(some trial of N reaches the target)
            at least this, from the arm's fraction of trials that reach it.
        out: parent directory of the run directory.
        torch_threads: torch CPU threads (1 when several processes share a machine).
    """

    families: tuple[str, ...] = FAMILIES
    arms: tuple[str, ...] = ("sgd", "random", "search", "refit")
    seeds: tuple[int, ...] = tuple(range(10))
    num_experts: int = 8
    k: int = 2
    num_tasks: int = 4
    input_dim: int = 10
    hidden: int = 16
    num_samples: int = 2000
    noise: float = 0.1
    num_keys: int = 32
    epochs: int = 15
    pretrain_epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-2
    patience: int | None = 3
    margin: float = 5.0
    search_every: int = 100
    search_rows: int = 1024
    fit_rows: int = 512
    ridge: float = 1e-3
    refit_max_iter: int = 8
    lookahead_candidates: int = 4
    lookahead_steps: int = 20
    win_threshold: float = 0.01
    curve: bool = False
    tune_families: tuple[str, ...] = ()
    tune_arms: tuple[str, ...] = ("sgd", "random", "search", "refit")
    tune_trials: int = 12
    tune_data_seed: int = 0
    tune_lr: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)
    tune_batch_size: tuple[int, ...] = (32, 64, 128)
    tune_epochs: tuple[int, ...] = (5, 10, 15)
    tune_quantile: float = 0.25
    tune_probability: float = 0.9
    out: str = "runs"
    torch_threads: int = 1

    def __post_init__(self) -> None:
        self.families = _names("families", self.families, FAMILIES)
        self.arms = _names("arms", self.arms, ARMS)
        for control in ("sgd", "random"):
            if control not in self.arms:
                raise ValueError(f"arms must include the control {control!r}, got {list(self.arms)}")
        if isinstance(self.seeds, (str, bytes)) or not isinstance(self.seeds, (list, tuple)) or not self.seeds:
            raise TypeError(f"seeds must be a non-empty list of non-negative integers, got {self.seeds!r}")
        self.seeds = tuple(check_int("seeds entry", s, minimum=0) for s in self.seeds)
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds names a seed twice: {list(self.seeds)}")
        self.num_experts = check_int("num_experts", self.num_experts, minimum=2)
        self.k = check_int("k", self.k, minimum=1, maximum=self.num_experts - 1)
        for name in ("num_tasks", "input_dim", "hidden", "epochs", "batch_size", "search_every", "search_rows", "fit_rows",
                     "lookahead_candidates", "lookahead_steps", "torch_threads"):
            setattr(self, name, check_int(name, getattr(self, name), minimum=1))
        self.num_samples = check_int("num_samples", self.num_samples, minimum=40)
        if self.patience is not None:
            self.patience = check_int("patience", self.patience, minimum=1)
        self.num_keys = check_int("num_keys", self.num_keys, minimum=self.num_experts)
        self.pretrain_epochs = check_int("pretrain_epochs", self.pretrain_epochs, minimum=1)
        self.refit_max_iter = check_int("refit_max_iter", self.refit_max_iter, minimum=0)
        for name in ("noise", "ridge"):
            setattr(self, name, check_positive_float(name, getattr(self, name), allow_zero=True))
        for name in ("lr", "margin"):
            setattr(self, name, check_positive_float(name, getattr(self, name)))
        self.win_threshold = check_positive_float("win_threshold", self.win_threshold, allow_zero=True)
        if self.win_threshold >= 1:
            raise ValueError(f"win_threshold must be in [0, 1), got {self.win_threshold}")
        if not isinstance(self.curve, bool):
            raise TypeError(f"curve must be True or False, got {self.curve!r}")
        self.tune_families = tuple(check_choice("tune_families", f, FAMILIES) for f in self.tune_families)
        self.tune_arms = _names("tune_arms", self.tune_arms, ARMS)
        self.tune_trials = check_int("tune_trials", self.tune_trials, minimum=1)
        self.tune_data_seed = check_int("tune_data_seed", self.tune_data_seed, minimum=0)
        for name, checker in (("tune_lr", check_positive_float), ("tune_batch_size", lambda n, v: check_int(n, v, minimum=1)),
                              ("tune_epochs", lambda n, v: check_int(n, v, minimum=1))):
            values = getattr(self, name)
            if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)) or not values:
                raise TypeError(f"{name} must be a non-empty list of values, got {values!r}")
            setattr(self, name, tuple(checker(name, v) for v in values))
        for name in ("tune_quantile", "tune_probability"):
            value = check_positive_float(name, getattr(self, name))
            if value >= 1:
                raise ValueError(f"{name} must be in (0, 1), got {value}")
            setattr(self, name, value)
        if not isinstance(self.out, (str, Path)):
            raise TypeError(f"out must be a directory path, got {type(self.out).__name__}")


def _names(name: str, values: Any, choices: tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, (list, tuple)) or not values:
        raise TypeError(f"{name} must be a non-empty list of names from {', '.join(choices)}, got {values!r}")
    out = tuple(check_choice(name, v, choices) for v in values)
    if len(set(out)) != len(out):
        raise ValueError(f"{name} names an entry twice: {list(out)}")
    return out


# ------------------------------------------------------------------------------------------ starts
@dataclass
class Start:
    """A bad start of one family and seed: the model and its data splits (inputs, targets)."""

    family: str
    seed: int
    model: nn.Module
    train: tuple[Any, torch.Tensor]
    val: tuple[Any, torch.Tensor]
    test: tuple[Any, torch.Tensor]
    loss: Any
    info: dict[str, Any] = field(default_factory=dict)


def _splits(inputs: Any, y: torch.Tensor) -> tuple[tuple[Any, torch.Tensor], ...]:
    n = y.shape[0]
    a, b = int(round(0.7 * n)), int(round(0.85 * n))
    def part(lo: int, hi: int) -> tuple[Any, torch.Tensor]:
        if isinstance(inputs, dict):
            return {key: v[lo:hi] for key, v in inputs.items()}, y[lo:hi]
        return inputs[lo:hi], y[lo:hi]
    return part(0, a), part(a, b), part(b, n)


def _derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm


def _experts(cfg: EscapeConfig, seed: int) -> nn.ModuleList:
    return make_experts(cfg.num_experts, cfg.input_dim, [cfg.hidden], 1, generator=torch.Generator().manual_seed(10_000 + seed))


def _pretrain(cfg: EscapeConfig, start: Start) -> None:
    fit(start.model, start.train, start.loss, epochs=cfg.pretrain_epochs, batch_size=cfg.batch_size,
        optimizer=lambda params: torch.optim.Adam(params, lr=cfg.lr), seed=50_000 + start.seed, progress=False)


def build_start(cfg: EscapeConfig, family: str, seed: int, *, init_seed: int | None = None) -> Start:
    """The bad start of ``family`` (deterministic): ``seed`` fixes the data, ``init_seed`` (default
    ``seed``) the initialisation, the pre-training, the derangement and the arms' batch order."""
    check_choice("family", family, FAMILIES)
    n, k, T = cfg.num_experts, cfg.k, cfg.num_tasks
    data_seed, seed = seed, seed if init_seed is None else check_int("init_seed", init_seed, minimum=0)
    torch.manual_seed(seed)  # gate initialisations
    if family == "hash_misassigned":
        data = make_synthetic_moe(num_samples=cfg.num_samples, input_dim=cfg.input_dim, num_experts=n, k=1, num_tasks=1,
                                  hidden=cfg.hidden, noise=cfg.noise, seed=data_seed)
        gen = torch.Generator().manual_seed(20_000 + data_seed)
        table = balanced_hash_table(cfg.num_keys, n, seed=data_seed)
        relabel = torch.randperm(n, generator=gen)  # the truth's expert of each bucket
        keys = torch.randint(cfg.num_keys, (cfg.num_samples,), generator=gen)
        outputs = data.truth.expert_outputs(data.x.to(torch.float64))
        signal = outputs.gather(1, relabel[table[keys]].unsqueeze(1)).squeeze(1)
        signal = signal / signal.std().clamp_min(1e-12)
        y = (signal + cfg.noise * torch.randn(signal.shape, generator=gen, dtype=torch.float64)).to(torch.float32).unsqueeze(1)
        moe = MoE(_experts(cfg, seed), Hash(n, num_keys=cfg.num_keys, seed=data_seed))
        train, val, test = _splits({"x": data.x, "key": keys}, y)
        start = Start(family, seed, moe, train, val, test, mse_loss)
        _pretrain(cfg, start)
        perm = _derangement(n, np.random.default_rng(30_000 + seed))
        moe.permutation.set(moe.permutation.get()[:, perm])
        start.info["derangement"] = perm.tolist()
        return start

    data = make_synthetic_moe(num_samples=cfg.num_samples, input_dim=cfg.input_dim, num_experts=n, k=k, num_tasks=T,
                              hidden=cfg.hidden, noise=cfg.noise, seed=data_seed, min_weight=synthetic_min_weight(k))
    loss = multitask_loss(["mse"] * T)
    gates: list[nn.Module]
    if family in ("dselect_collapsed", "comet_collapsed"):
        kind = DSelectK if family == "dselect_collapsed" else COMET
        gates = [kind(n, k) for _ in range(T)]
        for gate in gates:
            for selector in range(k):
                set_selector_slot(gate, selector, selector)
    else:
        gates = [TopK(n, k, input_dim=cfg.input_dim) for _ in range(T)]
    model = MultiGateMoE(_experts(cfg, seed), gates)
    train, val, test = _splits(data.x, data.y)
    start = Start(family, seed, model, train, val, test, loss)
    if family == "topk_margin":
        with torch.no_grad():
            for gate in gates:
                assert isinstance(gate, TopK) and gate.router is not None
                gate.router.bias[:k] += cfg.margin
    if family == "trained_shuffled":
        _pretrain(cfg, start)
        rng = np.random.default_rng(30_000 + seed)
        for module in model.permutations:
            module.set(module.get()[:, _derangement(n, rng)])
    return start


# -------------------------------------------------------------------------------------------- arms
class _LookaheadSearcher:
    """Frozen swap search (fast first stage), then :func:`lookahead_search`; a searcher for ``fit`` (the
    :class:`~routing_search.training.searcher.Searcher` protocol), scheduled every ``cfg.search_every`` steps."""

    def __init__(self, model: nn.Module, loss: Any, cfg: EscapeConfig, fit_data: Any, seed: int) -> None:
        self.model = model
        self.loss = loss
        self.cfg = cfg
        self.fit_data = fit_data
        self.seed = seed
        self.rng = check_rng(seed, name="seed")
        self.rounds_done = 0
        self.log: list[dict[str, Any]] = []

    def due(self, step: int) -> bool:
        """Whether :meth:`step` searches at ``step``."""
        return step % self.cfg.search_every == 0

    def step(self, step: int, data: Any) -> Any:
        """Search on ``data`` when due."""
        return self._staged(data, step) if self.due(step) else None

    def __call__(self, data: Any) -> Any:
        """Search now on ``data``."""
        return self._staged(data, None)

    def _staged(self, data: Any, step: int | None) -> Any:
        start = time.perf_counter()
        first = local_search(self.model, data, self.loss, "swap", rng=self.rng)
        second = lookahead_search(
            self.model, self.fit_data, data, self.loss, candidates=self.cfg.lookahead_candidates,
            steps=self.cfg.lookahead_steps, batch_size=self.cfg.batch_size, lr=self.cfg.lr, ridge=self.cfg.ridge,
            rng=self.seed * 7919 + self.rounds_done,
        )
        result = copy.copy(second)
        result.fun0 = float(first.fun0)
        result.fun = float(RoutingObjective(self.model, data, self.loss).fun)
        result.nit = int(first.nit) + int(second.nit)
        result.nfev = int(first.nfev) + int(second.nfev)
        result.moves = list(first.moves) + list(second.moves)
        self.rounds_done += 1
        self.log.append({"step": step, "fun0": result.fun0, "fun": result.fun, "nit": result.nit, "nfev": result.nfev,
                         "seconds": time.perf_counter() - start})
        return result

    def state_dict(self) -> dict[str, Any]:
        """Round count, log and random state."""
        return {"rounds_done": self.rounds_done, "log": [dict(e) for e in self.log], "rng": generator_state(self.rng)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.rng = set_generator_state(self.rng, state["rng"])
        self.rounds_done = int(state["rounds_done"])
        self.log = [dict(e) for e in state["log"]]


def _subset(data: tuple[Any, torch.Tensor], rows: int, seed: int) -> tuple[Any, torch.Tensor]:
    inputs, targets = data
    total = targets.shape[0]
    if total <= rows:
        return data
    index = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).narrow(0, 0, rows).sort().values
    if isinstance(inputs, dict):
        return {key: v[index] for key, v in inputs.items()}, targets[index]
    return inputs[index], targets[index]


@torch.no_grad()
def _test_loss(model: nn.Module, test: tuple[Any, torch.Tensor], loss: Any) -> float:
    with eval_mode(model):
        inputs, targets = as_batch(test)
        return float(loss(unwrap_prediction(call_model(model, inputs)), targets).mean())


def run_arm(cfg: EscapeConfig, start: Start, arm: str) -> dict[str, Any]:
    """Train a copy of ``start`` with ``arm``; returns test loss, accepted moves and seconds."""
    check_choice("arm", arm, ARMS)
    model = copy.deepcopy(start.model)
    search_data = _subset(start.val, cfg.search_rows, start.seed + 1)
    fit_data = _subset(start.train, cfg.fit_rows, start.seed + 2)
    searcher: LocalSearcher | _LookaheadSearcher | None = None
    schedule: SearchSchedule | None = None
    begin = time.perf_counter()
    moves = 0
    if arm == "random":
        rng = np.random.default_rng(40_000 + start.seed)
        assert isinstance(model, (MoE, MultiGateMoE))
        for module in model.permutations:
            module.set(np.stack([rng.permutation(module.num_experts) for _ in range(module.num_selectors)]))
    elif arm == "search":
        searcher = LocalSearcher(model, start.loss, method="swap", every=cfg.search_every, rng=start.seed)
    elif arm in ("refit", "refit_route"):
        # fit's own refit schedule: a search before training, then every search_every steps; the refits use
        # fit_rows training rows (the same seeded subset as fit_data above), moves are scored on search_data.
        schedule = SearchSchedule(every_steps=cfg.search_every, rows=cfg.search_rows, at_start=True, fit_rows=cfg.fit_rows,
                                  refit=RefitOptions(ridge=cfg.ridge, max_iter=cfg.refit_max_iter, write_layers=arm == "refit"))
    elif arm == "lookahead":
        searcher = _LookaheadSearcher(model, start.loss, cfg, fit_data, start.seed)
    if searcher is not None:
        moves += int(searcher(search_data).nit)  # a search before training: the bad start itself
    curve: dict[int, float] = {}
    callbacks: list[Any] = []
    if cfg.curve:
        curve[0] = _test_loss(model, start.test, start.loss)

        def record(event: Any) -> None:
            if event.kind == "epoch_end" or (event.kind == "search" and event.step == 0):
                curve[int(event.step)] = _test_loss(model, start.test, start.loss)

        callbacks.append(record)
    search = searcher if schedule is None else schedule
    result = fit(model, start.train, start.loss, val_data=start.val, search_data=None if search is None else search_data,
                 epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer=lambda params: torch.optim.Adam(params, lr=cfg.lr),
                 search=search, seed=start.seed, progress=False,
                 early_stopping_patience=cfg.patience, restore_best=True, callbacks=callbacks or None)
    moves += sum(int(s["accepted"]) for s in result.history.searches)
    if schedule is not None:
        search_seconds = float(sum(s["seconds"] for s in result.history.searches))
    else:
        search_seconds = 0.0 if searcher is None else float(sum(e["seconds"] for e in searcher.log))
    return {
        "family": start.family, "seed": start.seed, "arm": arm,
        "test_loss": _test_loss(model, start.test, start.loss),
        "start_test_loss": _test_loss(start.model, start.test, start.loss),
        "moves": moves, "seconds": time.perf_counter() - begin, "search_seconds": search_seconds,
        "epochs_run": int(result.epochs_run), "best_val": None if result.best_val is None else float(result.best_val),
        "val_losses": [None if v is None else float(v) for v in result.history.val_loss],
        "curve": [[step, value] for step, value in sorted(curve.items())],
    }


# ----------------------------------------------------------------------------------------- summary
#: How the escape study counts a seed against a control (test loss, lower is better; ``t`` =
#: ``EscapeConfig.win_threshold``, 0.01 by default): a **win** when the arm's loss is at least ``t`` (relative)
#: below the control's, a **loss** when it is *more than* ``t`` above it (a seed exactly ``t`` worse is neither),
#: i.e. :func:`~routing_search.experiments.stats.paired_comparison` with ``worse_rule="more_than"``.
#: The criterion an arm meets: wins on at least 80 % of the seeds against ``random`` and no loss against ``sgd``.
ESCAPE_WORSE_RULE = "more_than"


def compare_to_control(arm: list[float], control: list[float], threshold: float) -> dict[str, Any]:
    """The escape study's paired comparison of an arm's test losses with a control's (one value per seed).

    ``{'wins', 'losses', 'seeds', 'median_ratio', 'ratios', 'sign_p', 'wilcoxon_p'}``, counted by
    :func:`~routing_search.experiments.stats.paired_comparison` under the rule of :data:`ESCAPE_WORSE_RULE`
    (``ratios``: arm / control per seed, ``None`` where the control is 0).

    >>> c = compare_to_control([0.5, 1.25, 1.5], [1.0, 1.0, 1.0], threshold=0.25)
    >>> c["wins"], c["losses"], c["seeds"], c["median_ratio"]
    (1, 1, 3, 1.25)
    """
    c = paired_comparison(arm, control, higher_is_better=False, threshold=threshold, worse_rule=ESCAPE_WORSE_RULE)
    return {"wins": c["better"], "losses": c["worse"], "seeds": c["n"], "median_ratio": c["median_ratio"],
            "ratios": [float(a) / float(b) if b != 0 else None for a, b in zip(arm, control)],
            "sign_p": c["sign_p"], "wilcoxon_p": c["wilcoxon_p"]}


def meets_criterion(vs_random: dict[str, Any], vs_sgd: dict[str, Any]) -> bool:
    """The escape criterion on two :func:`compare_to_control` results: at least 1 % (``win_threshold``) lower
    test loss than ``random`` on at least 80 % of the seeds, and no seed more than 1 % worse than ``sgd``."""
    return bool(vs_random["wins"] >= math.ceil(0.8 * vs_random["seeds"]) and vs_sgd["losses"] == 0)


def _mean_pm_se(entry: dict[str, Any]) -> str:
    """``'mean ± se'`` (4 decimals) of a :func:`mean_se`-style entry; ``'–'`` for the s.e. of one seed."""
    se = "–" if entry["se"] is None else f"{entry['se']:.4f}"
    return f"{entry['mean']:.4f} ± {se}"


def summarise(rows: list[dict[str, Any]], cfg: EscapeConfig) -> dict[str, Any]:
    """Per family and arm: mean ± s.e. of test loss, and per-seed comparisons against ``random`` and ``sgd``."""
    out: dict[str, Any] = {}
    for family in cfg.families:
        by_arm = {arm: {r["seed"]: r for r in rows if r["family"] == family and r["arm"] == arm} for arm in cfg.arms}
        by_arm = {arm: results for arm, results in by_arm.items() if results}  # arms not run on this family
        if "sgd" not in by_arm or "random" not in by_arm:
            continue
        seeds = sorted(set.intersection(*(set(v) for v in by_arm.values()))) if by_arm else []
        fam: dict[str, Any] = {"seeds": seeds, "arms": {}}
        for arm, results in by_arm.items():
            values = [results[s]["test_loss"] for s in seeds]
            if not values:
                continue
            m = mean_se(values)
            entry: dict[str, Any] = {"mean": m["mean"], "se": m["se"], "median": float(statistics.median(values)),
                                     "moves": float(np.mean([results[s]["moves"] for s in seeds])),
                                     "seconds": float(np.mean([results[s]["seconds"] for s in seeds]))}
            for control in ("random", "sgd"):
                if arm != control:
                    entry[f"vs_{control}"] = compare_to_control(values, [by_arm[control][s]["test_loss"] for s in seeds],
                                                                cfg.win_threshold)
            if arm not in ("sgd", "random"):
                entry["meets_criterion"] = meets_criterion(entry["vs_random"], entry["vs_sgd"])
            fam["arms"][arm] = entry
        out[family] = fam
    return out


def _percent(threshold: float) -> str:
    return f"{100 * threshold:g} %"


def _sentence(family: str, arm: str, e: dict[str, Any], seeds: int, threshold: float) -> str:
    vr, vs = e["vs_random"], e["vs_sgd"]
    verdict = "meets" if e["meets_criterion"] else "does not meet"
    t = _percent(threshold)
    return (f"{family}, {arm}: at least {t} lower test loss than the random-permutation control on {vr['wins']}/{seeds} "
            f"seeds (more than {t} higher on {vr['losses']}), median ratio to random {vr['median_ratio']:.3f}; against "
            f"SGD alone at least {t} lower on {vs['wins']}/{seeds} and more than {t} higher on {vs['losses']}/{seeds} "
            f"(median ratio {vs['median_ratio']:.3f}). It {verdict} the criterion: at least {t} better than random on "
            f"at least 80 % of the seeds, and never more than {t} worse than SGD alone.")


def curve_summary(rows: list[dict[str, Any]], cfg: EscapeConfig, family: str,
                  budgets: tuple[int, ...] = (0, 1, 2, 5, 10)) -> dict[str, Any]:
    """Test loss along training (runs made with ``cfg.curve``) for one family.

    Target of every seed: ``sgd``'s final test loss (its restored best epoch) on that seed. Per arm:
    ``steps_to_target`` (per seed, the first recorded optimiser step whose test loss is at or below the
    target; ``None``: never on the curve), ``reached`` (seeds that got there), ``median_steps`` (over the
    seeds that got there), and ``budgets``: at each budget (epochs; 0 = after the start) the mean ± s.e.
    of test loss and the wins / losses against ``random`` at that budget (``win_threshold``), over the
    seeds whose curve is that long. ``cfg.epochs`` is always one of the budgets; budgets beyond it are left
    out; a negative or non-integer budget is an error.
    """
    check_choice("family", family, FAMILIES)
    requested = [check_int("budgets entry", b, minimum=0) for b in budgets]
    runs = {(r["arm"], r["seed"]): r for r in rows if r["family"] == family and r.get("curve")}
    arms = [a for a in cfg.arms if any(key[0] == a for key in runs)]
    if "sgd" not in arms:
        raise ValueError(f"curve_summary needs the sgd arm's curves for {family!r} (run with curve=True)")
    seeds = sorted(s for (a, s) in runs if a == "sgd" and all((b, s) in runs for b in arms))
    targets = {s: runs[("sgd", s)]["test_loss"] for s in seeds}
    budgets = tuple(sorted({b for b in requested if b <= cfg.epochs} | {cfg.epochs}))
    out: dict[str, Any] = {"seeds": seeds, "targets": [targets[s] for s in seeds], "budgets": list(budgets), "arms": {}}
    for arm in arms:
        steps: list[int | None] = []
        for s in seeds:
            hit = [step for step, value in runs[(arm, s)]["curve"] if value <= targets[s]]
            steps.append(int(hit[0]) if hit else None)
        reached = [v for v in steps if v is not None]
        at: dict[str, Any] = {}
        for b in budgets:
            pairs = [(runs[(arm, s)]["curve"][b][1], runs[("random", s)]["curve"][b][1]) for s in seeds
                     if len(runs[(arm, s)]["curve"]) > b and ("random", s) in runs and len(runs[("random", s)]["curve"]) > b]
            if not pairs:
                continue
            m = mean_se([v for v, _ in pairs])
            entry: dict[str, Any] = {"mean": m["mean"], "se": m["se"], "seeds": len(pairs)}
            if arm != "random":
                cmp = compare_to_control([v for v, _ in pairs], [c for _, c in pairs], cfg.win_threshold)
                entry.update(wins=cmp["wins"], losses=cmp["losses"])
            at[str(b)] = entry
        out["arms"][arm] = {"steps_to_target": steps, "reached": len(reached),
                            "median_steps": float(statistics.median(reached)) if reached else None, "budgets": at}
    return out


def _curve_lines(cfg: EscapeConfig, rows: list[dict[str, Any]]) -> list[str]:
    if not cfg.curve:
        return []
    lines = ["## Test loss along training", "",
             "Target of each seed: sgd's final test loss (its best validation epoch). 'Steps to target': the first "
             "recorded optimiser step (step 0 = after the arm's start, then the end of every epoch) whose test loss is "
             "at or below it; median over the seeds that reached it. Then the mean test loss after each number of "
             "epochs, with wins/losses against random at that budget.", ""]
    for family in cfg.families:
        if not any(r["family"] == family and r.get("curve") for r in rows):
            continue
        c = curve_summary(rows, cfg, family)
        budgets = [str(b) for b in c["budgets"]]
        lines += [f"### {family}", "", "| arm | reached target | median steps | " + " | ".join(f"epoch {b}" for b in budgets) + " |",
                  "|---|---|---|" + "---|" * len(budgets)]
        for arm, e in c["arms"].items():
            cells = []
            for b in budgets:
                v = e["budgets"].get(b)
                if v is None:
                    cells.append("-")
                else:
                    wl = f" ({v['wins']}/{v['losses']})" if "wins" in v else ""
                    cells.append(f"{_mean_pm_se(v)}{wl}")
            med = "-" if e["median_steps"] is None else f"{e['median_steps']:g}"
            lines.append(f"| {arm} | {e['reached']}/{len(c['seeds'])} | {med} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


# ----------------------------------------------------------------------------------- tuning budget
def _trial_settings(cfg: EscapeConfig, family: str) -> list[dict[str, Any]]:
    rng = np.random.default_rng(60_000 + cfg.tune_data_seed + 97 * FAMILIES.index(family))
    return [{"trial": i, "lr": float(rng.choice(cfg.tune_lr)), "batch_size": int(rng.choice(cfg.tune_batch_size)),
             "epochs": int(rng.choice(cfg.tune_epochs))} for i in range(cfg.tune_trials)]


def trials_needed(p: float, probability: float) -> float:
    """Deprecated: use :func:`routing_search.experiments.stats.trials_needed` (on the trials' values).

    Smallest N with ``1 - (1 - p)^N >= probability`` (``inf`` when ``p == 0``), ``p`` the fraction of
    trials that reach the target.
    """
    warnings.warn("escape.trials_needed(p, probability) is deprecated; use routing_search.experiments.stats."
                  "trials_needed(scores, values, target, probability=..., higher_is_better=...)", DeprecationWarning,
                  stacklevel=2)
    if p <= 0:
        return float("inf")
    if p >= 1:
        return 1.0
    return float(math.ceil(math.log(1 - probability) / math.log(1 - p) - 1e-12))


def expected_best(values: list[float], trials: int) -> float:
    """Expected minimum of ``trials`` draws (with replacement) from the empirical distribution of ``values``:
    :func:`~routing_search.experiments.stats.expected_best_of_n` with the values as their own (lower is
    better) selection scores."""
    return expected_best_of_n(values, None, trials, higher_is_better=False, replace=True)


def _trials_to_reach(values: list[float], target: float, probability: float) -> float:
    """Trials needed (with replacement) for one of them to reach ``target`` with ``probability``, as a float
    (``inf``: no trial reached it), by :func:`~routing_search.experiments.stats.trials_needed`."""
    n = stats_trials_needed(values, values, target, probability=probability, higher_is_better=False, replace=True)
    return float("inf") if n is None else float(n)


def run_tuning(cfg: EscapeConfig, *, progress: bool = False) -> dict[str, Any]:
    """The tuning-budget study: paired random-search trials per arm; trials to reach a pooled target."""
    out: dict[str, Any] = {}
    for family in cfg.tune_families:
        rows = []
        for setting in _trial_settings(cfg, family):
            start = build_start(cfg, family, cfg.tune_data_seed, init_seed=setting["trial"])
            trial_cfg = dataclasses.replace(cfg, lr=setting["lr"], batch_size=setting["batch_size"], epochs=setting["epochs"])
            for arm in cfg.tune_arms:
                row = run_arm(trial_cfg, start, arm) | setting
                rows.append(row)
                if progress:
                    print(f"tune {family:18s} trial {setting['trial']:3d} {arm:9s} test {row['test_loss']:.4f}", flush=True)
        target = float(np.quantile([r["test_loss"] for r in rows], cfg.tune_quantile))
        arms = {}
        for arm in cfg.tune_arms:
            values = [r["test_loss"] for r in rows if r["arm"] == arm]
            p = float(np.mean([v <= target for v in values]))
            arms[arm] = {"reach_fraction": p, "trials_needed": _trials_to_reach(values, target, cfg.tune_probability),
                         "expected_best": {str(n): expected_best(values, n) for n in (1, 2, 4, 8)},
                         "median": float(statistics.median(values))}
        out[family] = {"target": target, "arms": arms, "runs": rows}
    return out

def write_report(run_dir: Path, cfg: EscapeConfig, rows: list[dict[str, Any]], summary: dict[str, Any],
                 tuning: dict[str, Any] | None = None) -> None:
    """``report.json`` (config, every run, the summary, the tuning study; standard JSON: an infinite number is
    the string ``"inf"``, NaN is ``null``) and ``report.md`` (tables and sentences); existing files are never replaced."""
    run_dir = Path(run_dir)
    for name in ("report.json", "report.md"):  # they were overwritten without a word
        if (run_dir / name).exists():
            raise FileExistsError(f"{run_dir / name} already exists; write the report into a new directory")
    payload = _strict_json({"config": asdict(cfg), "runs": rows, "summary": summary, "tuning": tuning or {}})
    (run_dir / "report.json").write_text(json.dumps(payload, indent=2, default=_json_number, allow_nan=False))
    lines = ["# Escaping bad starts", "",
             f"Seeds {list(cfg.seeds)}; n = {cfg.num_experts}, k = {cfg.k}, T = {cfg.num_tasks}, {cfg.num_samples} rows, "
             f"{cfg.epochs} epochs (early stopping patience {cfg.patience}); test loss = mean per-example MSE (summed over "
             "tasks) on the held-out test split, at the best validation epoch.", "",
             "How to read the tables: every arm starts from the same bad start, data and batch order as the others "
             f"with the same seed. 'wins/losses vs random' counts the seeds where the arm's test loss is at least "
             f"{_percent(cfg.win_threshold)} lower / more than {_percent(cfg.win_threshold)} higher than the "
             "random-permutation control's; a median ratio below 1 means the arm "
             "usually ends lower. The control is the cheapest explanation of a gain (it breaks a collapse as well as any "
             "search); an arm helps only if it beats it.", ""]
    for family, fam in summary.items():
        seeds = len(fam["seeds"])
        lines += [f"## {family}", "",
                  "| arm | test loss mean ± s.e. | median | wins/losses vs random | median ratio vs random | wins/losses vs sgd | moves |",
                  "|---|---|---|---|---|---|---|"]
        for arm, e in fam["arms"].items():
            vr = e.get("vs_random", {})
            vs = e.get("vs_sgd", {})
            lines.append(
                f"| {arm} | {_mean_pm_se(e)} | {e['median']:.4f} | "
                f"{vr.get('wins', '-')}/{vr.get('losses', '-')} | {vr.get('median_ratio', float('nan')):.3f} | "
                f"{vs.get('wins', '-')}/{vs.get('losses', '-')} | {e['moves']:.1f} |"
            )
        lines.append("")
        for arm, e in fam["arms"].items():
            if "meets_criterion" in e:
                lines.append("- " + _sentence(family, arm, e, seeds, cfg.win_threshold))
        lines.append("")
    lines += _curve_lines(cfg, rows)
    lines += _tuning_lines(cfg, tuning or {})
    (run_dir / "report.md").write_text("\n".join(lines))


def _strict_json(value: Any) -> Any:
    """``value`` with every non-finite float as standard JSON can hold it: ``inf`` / ``-inf`` as the strings
    ``"inf"`` / ``"-inf"`` (a trials-needed of a tuning arm that never reached the target), NaN as ``null``."""
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


def _json_number(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _tuning_lines(cfg: EscapeConfig, tuning: dict[str, Any]) -> list[str]:
    if not tuning:
        return []
    lines = ["## Tuning budget", "",
             f"{cfg.tune_trials} random-search trials per arm (lr from {list(cfg.tune_lr)}, batch size from "
             f"{list(cfg.tune_batch_size)}, epochs from {list(cfg.tune_epochs)}; trial i of every arm shares its "
             f"hyper-parameters and initialisation seed), data seed {cfg.tune_data_seed}. Target: the "
             f"{cfg.tune_quantile:.0%} quantile of all trials' test losses. Trials needed: the smallest N for which at least "
             f"one of N trials reaches the target with probability {cfg.tune_probability:.0%}, from the arm's fraction of trials "
             "that reached it (inf: none did, i.e. more than the trials run).", ""]
    for family, fam in tuning.items():
        lines += [f"### {family} (target {fam['target']:.4f})", "",
                  "| arm | trials reaching target | trials needed | expected best of 1 / 2 / 4 / 8 | median |", "|---|---|---|---|---|"]
        for arm, e in fam["arms"].items():
            best = " / ".join(f"{e['expected_best'][k]:.4f}" for k in ("1", "2", "4", "8"))
            lines.append(f"| {arm} | {e['reach_fraction']:.2f} | {e['trials_needed']} | {best} | {e['median']:.4f} |")
        lines.append("")
    return lines


def run_escape(config: EscapeConfig, *, progress: bool = False) -> dict[str, Any]:
    """Run every family × seed × arm, write ``report.md`` / ``report.json``; returns the report dict.

    The returned dict holds ``run_dir``, ``config``, ``runs`` (one dict per family, seed and arm),
    ``summary`` (see :func:`summarise`) and ``tuning`` (see :func:`run_tuning`; empty without
    ``tune_families``).
    """
    if not isinstance(config, EscapeConfig):
        raise TypeError(f"config must be an EscapeConfig, got {type(config).__name__}")
    threads = torch.get_num_threads()
    torch.set_num_threads(config.torch_threads)
    try:
        run_dir = new_run_dir(config.out, "escape")
        rows: list[dict[str, Any]] = []
        with removed_if_empty_on_failure(run_dir):
            for family in config.families:
                for seed in config.seeds:
                    start = build_start(config, family, seed)
                    for arm in config.arms:
                        rows.append(run_arm(config, start, arm))
                        if progress:
                            r = rows[-1]
                            print(f"{family:18s} seed {seed:3d} {arm:9s} test {r['test_loss']:.4f} moves {r['moves']:3d} "
                                  f"{r['seconds']:.1f}s", flush=True)
            summary = summarise(rows, config)
            tuning = run_tuning(config, progress=progress) if config.tune_families else {}
            write_report(run_dir, config, rows, summary, tuning)
    finally:
        torch.set_num_threads(threads)
    return {"run_dir": str(run_dir), "config": asdict(config), "runs": rows, "summary": summary, "tuning": tuning}
