"""Tuning budgets (COMET+'s protocol): random search over a grid, with and without local search.

For each trial one point of the grid is drawn (learning rate, batch size, entropy weight, k, γ, and the
search schedule), and every gate × arm is trained with it from the same trial seed, so the arms of a
trial differ only in what the arm changes. Each trial is scored on the validation split (selection) and
the test split (reported). From all trials of an arm, the expected test value of the best-by-validation
trial among N (N = 1 … trials, drawn without replacement; and with replacement beyond) is computed
exactly from the order statistics (see :mod:`routing_search.experiments.stats`), together with the
number of trials needed to reach a target with a stated probability.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .config import ExperimentConfig, TuneConfig
from .datasets import ExperimentData, load_experiment_data
from .runner import run_one
from .stats import expected_best_of_n, trials_needed

__all__ = ["TuneTrial", "run_tune", "summarise_tune", "write_tune_report", "trial_config", "TARGET_QUANTILE"]

# Default target: the value reached by the best 20 % of all trials of a gate (arms pooled).
TARGET_QUANTILE = 0.8
EXTRAPOLATE_TO = 100


@dataclasses.dataclass
class TuneTrial:
    """One trained trial: its hyperparameters, gate, arm, validation and test values of the headline metric."""

    trial: int
    gate: str
    arm: str
    params: dict[str, Any]
    val: float
    test: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable form."""
        return dataclasses.asdict(self)


def trial_config(base: ExperimentConfig, gate: str, params: dict[str, Any]) -> ExperimentConfig:
    """``base`` with one grid point applied (gate-specific entries only where they mean something)."""
    model = dataclasses.replace(base.model, k=min(int(params["k"]), base.model.num_experts))
    if gate in ("dselect_k", "comet"):
        model = dataclasses.replace(model, entropy_weight=float(params["entropy_weight"]), gamma=float(params["gamma"]))
    train = dataclasses.replace(base.train, lr=float(params["lr"]), batch_size=int(params["batch_size"]))
    search = dataclasses.replace(base.search, method=str(params["search_method"]), every_epochs=int(params["search_every_epochs"]))
    return dataclasses.replace(base, model=model, train=train, search=search, gates=(gate,), seeds=1)


def _relevant(gate: str, arm: str, params: dict[str, Any]) -> dict[str, Any]:
    keep = {"lr", "batch_size"}
    if gate in ("topk", "dselect_k", "comet"):
        keep.add("k")
    if gate in ("dselect_k", "comet"):
        keep |= {"entropy_weight", "gamma"}
    if arm == "search":
        keep |= {"search_method", "search_every_epochs"}
    return {k: v for k, v in params.items() if k in keep}


def run_tune(
    config: TuneConfig,
    *,
    log: Callable[[str], None] | None = None,
    data_loader: Callable[[ExperimentConfig, int], ExperimentData] = load_experiment_data,
) -> tuple[list[TuneTrial], ExperimentData]:
    """Train every trial of every gate × arm; returns the trials and the data (for metric facts)."""
    base = config.experiment
    torch.set_num_threads(base.threads)
    data = data_loader(base, config.seed)
    headline = data.metrics[0]
    rng = np.random.default_rng([config.seed, 104_729])
    draws = [config.grid.sample(rng) for _ in range(config.trials)]
    trials: list[TuneTrial] = []
    for i, params in enumerate(draws):
        trial_seed = config.seed * 100_003 + i
        for gate in base.gates:
            cfg = trial_config(base, gate, params)
            for arm in base.arms:
                record = run_one(cfg, data, gate, arm, trial_seed)
                # selected by the validation value, reported by the test value
                val, test = record.val_metrics[headline.name], record.metrics[headline.name]
                trials.append(TuneTrial(i, gate, arm, _relevant(gate, arm, params), val, test, record.seconds))
                if log is not None:
                    log(f"trial {i:3d} {gate:>9} {arm:>7}: val {val:.4f} test {test:.4f}  {record.seconds:.1f}s")
    return trials, data


def summarise_tune(trials: list[TuneTrial], *, higher_is_better: bool, target: float | None, probability: float) -> dict[str, Any]:
    """Best-of-N curves and trials needed per gate and arm (see the module docstring)."""
    out: dict[str, Any] = {}
    gates = sorted({t.gate for t in trials}, key=[t.gate for t in trials].index)
    for gate in gates:
        rows = [t for t in trials if t.gate == gate]
        pooled = np.asarray([t.test for t in rows])
        q = TARGET_QUANTILE if higher_is_better else 1 - TARGET_QUANTILE
        gate_target = float(np.quantile(pooled, q)) if target is None else float(target)
        arms: dict[str, Any] = {}
        for arm in sorted({t.arm for t in rows}, key=[t.arm for t in rows].index):
            mine = [t for t in rows if t.arm == arm]
            val = [t.val for t in mine]
            test = [t.test for t in mine]
            count = len(mine)
            curve = [expected_best_of_n(val, test, n, higher_is_better=higher_is_better) for n in range(1, count + 1)]
            curve_replace = [expected_best_of_n(val, test, n, higher_is_better=higher_is_better, replace=True) for n in range(1, EXTRAPOLATE_TO + 1)]
            needed = trials_needed(val, test, gate_target, probability=probability, higher_is_better=higher_is_better, replace=True, max_trials=10_000)
            needed_pool = trials_needed(val, test, gate_target, probability=probability, higher_is_better=higher_is_better, replace=False)
            arms[arm] = {
                "trials": count,
                "best_of_n": curve,
                "best_of_n_with_replacement": curve_replace,
                "trials_needed": needed,
                "trials_needed_without_replacement": needed_pool,
                "reaching_target": int(sum((v >= gate_target) if higher_is_better else (v <= gate_target) for v in test)),
            }
        out[gate] = {"target": gate_target, "target_rule": "given" if target is not None else f"quantile {TARGET_QUANTILE:g} of pooled test values (top 20 %)", "arms": arms}
    return out


def _plot(summary: dict[str, Any], metric: str, path: Path) -> None:
    gates = list(summary)
    fig = Figure(figsize=(4.2 * len(gates), 3.4))
    axes = fig.subplots(1, len(gates), squeeze=False)[0]
    for ax, gate in zip(axes, gates):
        for arm, entry in summary[gate]["arms"].items():
            n = np.arange(1, len(entry["best_of_n_with_replacement"]) + 1)
            line = ax.plot(n, entry["best_of_n_with_replacement"], "--", alpha=0.6)[0]
            ax.plot(np.arange(1, entry["trials"] + 1), entry["best_of_n"], "-", color=line.get_color(), label=f"{arm} (needs {entry['trials_needed'] if entry['trials_needed'] is not None else 'more than any N'})")
        ax.axhline(summary[gate]["target"], color="grey", linewidth=0.8, label="target")
        ax.set_xscale("log")
        ax.set_xlabel("trials N")
        ax.set_ylabel(f"expected test {metric} of best-by-val of N")
        ax.set_title(gate)
        ax.legend(fontsize=7)
    fig.suptitle("Best of N random-search trials (solid: without replacement from the trials; dashed: with replacement)", fontsize=8)
    fig.tight_layout()
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)


def write_tune_report(config: TuneConfig, trials: list[TuneTrial], data: ExperimentData, directory: str | Path, *, plots: bool = True) -> dict[str, Any]:
    """Write ``tune.json``, ``tune.md`` and ``best_of_n.png`` into ``directory`` (never replacing files)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("tune.json", "tune.md"):
        if (directory / name).exists():
            raise FileExistsError(f"{directory / name} already exists; write the report into a new directory")
    headline = data.metrics[0]
    summary = summarise_tune(trials, higher_is_better=headline.higher_is_better, target=config.target, probability=config.probability)
    if plots:
        _plot(summary, headline.name, directory / "best_of_n.png")
    report = {"config": config.to_dict(), "metric": headline.name, "higher_is_better": headline.higher_is_better,
              "probability": config.probability, "summary": summary, "trials": [t.to_dict() for t in trials]}
    (directory / "tune.json").write_text(json.dumps(report, indent=1))
    exp = config.experiment
    lines = [
        f"# Tuning budget: {exp.dataset} ({exp.preset} preset)",
        "",
        f"{config.trials} random-search trials per arm over the grid below (the same draws and trial seeds for every "
        f"arm). Selection: validation {headline.name}; reported: test {headline.name} "
        f"({'higher' if headline.higher_is_better else 'lower'} is better). The expected best of N is exact over the "
        "trials' order statistics; \"trials needed\" is the smallest N whose best-by-validation trial reaches the "
        f"target with probability ≥ {config.probability:g}, drawing with replacement from the trials (beyond "
        f"{config.trials} trials this extrapolates the empirical distribution).",
        "",
        "Grid: " + "; ".join(f"{f.name} ∈ {list(getattr(config.grid, f.name))}" for f in dataclasses.fields(config.grid)),
        "(a reconstruction of the papers' grids; their appendices with the exact lists are not part of this project).",
        "",
        "| gate | arm | target | trials reaching it | best of 1 | best of 5 | best of all | trials needed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for gate, g in summary.items():
        for arm, e in g["arms"].items():
            b5 = e["best_of_n"][min(4, e["trials"] - 1)]
            needed = "not reached" if e["trials_needed"] is None else str(e["trials_needed"])
            lines.append(f"| {gate} | {arm} | {g['target']:.4f} | {e['reaching_target']}/{e['trials']} | {e['best_of_n'][0]:.4f} "
                         f"| {b5:.4f} | {e['best_of_n'][-1]:.4f} | {needed} |")
    lines += ["", "Target rule: " + "; ".join(f"{gate}: {g['target_rule']}" for gate, g in summary.items()) + "."]
    if plots:
        lines += ["", "Plot: `best_of_n.png`."]
    (directory / "tune.md").write_text("\n".join(lines) + "\n")
    return report

