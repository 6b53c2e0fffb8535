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
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .._validation import check_int, check_rng
from .config import ExperimentConfig, TuneConfig
from .datasets import ExperimentData, load_experiment_data
from .runner import run_one
from .stats import expected_best_of_n, trials_needed

__all__ = ["TuneTrial", "run_tune", "summarise_tune", "write_tune_report", "trial_config", "TARGET_QUANTILE"]

# Default target: the value reached by the best 20 % of all trials of a gate (arms pooled).
TARGET_QUANTILE = 0.8
# Targets of the report's sweep (pooled quantiles): how the ratio of trials needed depends on the target.
SWEEP_QUANTILES = (0.5, 0.75, 0.8, 0.9, 0.95)
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
    indices: Sequence[int] | None = None,
    on_trial: Callable[[TuneTrial], None] | None = None,
) -> tuple[list[TuneTrial], ExperimentData]:
    """Train every trial of every gate × arm; returns the trials and the data (for metric facts).

    ``on_trial`` is called with every :class:`TuneTrial` as soon as it ends (the CLI appends it to the run
    directory, so the trials already done survive a later failure).

    ``indices`` trains only those trials (of ``0 .. config.trials − 1``; default all) with the draws and
    seeds they have in the whole study, so a study split over processes and concatenated is the same study.
    """
    base = config.experiment
    chosen = range(config.trials) if indices is None else [check_int("trial index", i, minimum=0, maximum=config.trials - 1) for i in indices]
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"indices names a trial more than once: {list(chosen)}")
    torch.set_num_threads(base.threads)
    data = data_loader(base, config.seed)
    headline = data.metrics[0]
    rng = np.random.default_rng([config.seed, 104_729])
    draws = [config.grid.sample(rng) for _ in range(config.trials)]
    trials: list[TuneTrial] = []
    for i in chosen:
        params = draws[i]
        trial_seed = config.seed * 100_003 + i
        for gate in base.gates:
            cfg = trial_config(base, gate, params)
            for arm in base.arms:
                try:
                    record = run_one(cfg, data, gate, arm, trial_seed)
                except FloatingPointError as exc:  # fit's message names the epoch and step, not the trial
                    raise FloatingPointError(f"trial {i} ({params}), gate {gate}, arm {arm}: {exc}") from exc
                # selected by the validation value, reported by the test value
                val, test = record.val_metrics[headline.name], record.metrics[headline.name]
                trials.append(TuneTrial(i, gate, arm, _relevant(gate, arm, params), val, test, record.seconds))
                if on_trial is not None:
                    on_trial(trials[-1])
                if log is not None:
                    log(f"trial {i:3d} {gate:>9} {arm:>7}: val {val:.4f} test {test:.4f}  {record.seconds:.1f}s")
    return trials, data


def _reach(values: Sequence[float], target: float, higher_is_better: bool) -> int:
    return int(sum((v >= target) if higher_is_better else (v <= target) for v in values))


def _target(pooled: np.ndarray, quantile: float, higher_is_better: bool) -> float:
    """The pooled test value that the best ``1 − quantile`` of the trials reach."""
    return float(np.quantile(pooled, quantile if higher_is_better else 1 - quantile))


def _ratio(needed: int | None, reference: int | None) -> float | None:
    """``needed / reference`` with "never" as infinity; None when neither arm reaches the target."""
    if needed is None and reference is None:
        return None
    if reference is None:
        return 0.0
    if needed is None:
        return math.inf
    return needed / reference


def _json_number(x: float | None) -> float | str | None:
    return x if x is None or math.isfinite(x) else ("inf" if x > 0 else "-inf")


def _fmt_ratio(x: float | str | None) -> str:
    if x is None:
        return "undefined (neither arm reaches it)"
    if x == "inf" or (isinstance(x, float) and math.isinf(x)):
        return "∞"
    return f"{float(x):.1f}"


def summarise_tune(
    trials: list[TuneTrial],
    *,
    higher_is_better: bool,
    target: float | None,
    probability: float,
    quantile: float = TARGET_QUANTILE,
    reference: str = "search",
    bootstrap: int = 2000,
    rng: Any = 0,
) -> dict[str, Any]:
    """Best-of-N curves, trials needed and the ratio of trials needed per gate and arm.

    Per gate, the target is ``target`` or the ``quantile`` of the test values of all trials of all arms
    (pooled, so no arm chooses it). Per arm: the expected test value of the best-by-validation trial of
    N (exact, :func:`~routing_search.experiments.stats.expected_best_of_n`), and the trials needed for
    its best-by-validation trial to reach the target with ``probability``, both drawing from the arm's
    trials without replacement (``None``: more than the trials run) and with replacement (extrapolating
    the empirical distribution; ``None``: never, because the arm's best-by-validation trial misses).
    Each other arm's need is divided by the ``reference`` arm's (with replacement) and, for the
    uncertainty, recomputed over ``bootstrap`` resamples of the trial indices (the same indices for every
    arm: the trials are paired), the target re-taken from each resample's pooled values.

    ``rng`` seeds the bootstrap (see :func:`routing_search._validation.check_rng`).
    """
    generator = check_rng(rng, name="rng")
    check_int("bootstrap", bootstrap, minimum=0)
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    out: dict[str, Any] = {}
    gates = sorted({t.gate for t in trials}, key=[t.gate for t in trials].index)
    for gate in gates:
        rows = [t for t in trials if t.gate == gate]
        arm_names = sorted({t.arm for t in rows}, key=[t.arm for t in rows].index)
        # val / test per arm, aligned by trial index (the arms of one trial share draws and seed)
        index = sorted({t.trial for t in rows})
        seen: set[tuple[str, int]] = set()
        for t in rows:  # a trial given twice (two runs' trials concatenated) would silently replace the other
            if (t.arm, t.trial) in seen:
                raise ValueError(f"gate {gate!r}, arm {t.arm!r}: trial {t.trial} is given more than once; each trial of "
                                 "an arm must appear once (concatenate runs of disjoint trial indices)")
            seen.add((t.arm, t.trial))
        table = {arm: {t.trial: t for t in rows if t.arm == arm} for arm in arm_names}
        undefined = [f"trial {t.trial} {t.arm} (val {t.val}, test {t.test})" for t in rows
                     if not (math.isfinite(t.val) and math.isfinite(t.test))]
        if undefined:  # the order statistics need a value for every trial ('scores must be finite' named none)
            raise ValueError(f"gate {gate!r}: the headline metric is NaN/inf for {', '.join(undefined)}; every trial needs "
                             "a finite validation and test value (an undefined metric such as a ROC AUC of a split with "
                             "one class cannot rank trials)")
        missing = [arm for arm in arm_names if sorted(table[arm]) != index]
        if missing:
            raise ValueError(f"gate {gate!r}: arms {missing} lack some of the trials {index}; the arms must be paired")
        val = {arm: np.asarray([table[arm][i].val for i in index]) for arm in arm_names}
        test = {arm: np.asarray([table[arm][i].test for i in index]) for arm in arm_names}

        def need(arm: str, tgt: float, rows_: np.ndarray | slice = slice(None), *, replace: bool = True) -> int | None:
            return trials_needed(val[arm][rows_].tolist(), test[arm][rows_].tolist(), tgt, probability=probability,
                                 higher_is_better=higher_is_better, replace=replace)

        pooled = np.concatenate([test[arm] for arm in arm_names])
        gate_target = _target(pooled, quantile, higher_is_better) if target is None else float(target)
        count = len(index)
        arms: dict[str, Any] = {}
        for arm in arm_names:
            v, t = val[arm].tolist(), test[arm].tolist()
            curve = [expected_best_of_n(v, t, n, higher_is_better=higher_is_better) for n in range(1, count + 1)]
            curve_replace = [expected_best_of_n(v, t, n, higher_is_better=higher_is_better, replace=True) for n in range(1, EXTRAPOLATE_TO + 1)]
            arms[arm] = {
                "trials": count,
                "best_of_n": curve,
                "best_of_n_with_replacement": curve_replace,
                "trials_needed": need(arm, gate_target),
                "trials_needed_without_replacement": need(arm, gate_target, replace=False),
                "reaching_target": _reach(t, gate_target, higher_is_better),
            }
        ratios: dict[str, Any] = {}
        if reference in arm_names:
            ref = arms[reference]
            resamples = [generator.integers(count, size=count) for _ in range(bootstrap)]
            for arm in arm_names:
                if arm == reference:
                    continue
                e = arms[arm]
                pool_ratio: dict[str, Any] = {"value": None, "at_least": None}
                a, b = e["trials_needed_without_replacement"], ref["trials_needed_without_replacement"]
                if a is not None and b is not None:
                    pool_ratio["value"] = a / b
                elif a is None and b is not None:
                    pool_ratio["at_least"] = (count + 1) / b  # the arm needs more than all its trials
                boot = []
                for sample in resamples:
                    tgt = gate_target if target is not None else _target(np.concatenate([test[x][sample] for x in arm_names]), quantile, higher_is_better)
                    boot.append(_ratio(need(arm, tgt, sample), need(reference, tgt, sample)))
                defined = np.asarray([r for r in boot if r is not None], dtype=float)
                summary: dict[str, Any] = {"resamples": bootstrap, "undefined": len(boot) - int(defined.size)}
                if defined.size:
                    q05, q50, q95 = np.quantile(defined, [0.05, 0.5, 0.95], method="inverted_cdf")
                    summary.update(q05=_json_number(float(q05)), median=_json_number(float(q50)), q95=_json_number(float(q95)),
                                   at_least_10x=float(np.mean(defined >= 10)))
                ratios[arm] = {
                    "ratio": _json_number(_ratio(e["trials_needed"], ref["trials_needed"])),
                    "ratio_without_replacement": pool_ratio,
                    "bootstrap": summary,
                }
        sweep = []
        for q in SWEEP_QUANTILES:
            tgt = _target(pooled, q, higher_is_better)
            needs = {arm: need(arm, tgt) for arm in arm_names}
            entry: dict[str, Any] = {"quantile": q, "target": tgt,
                                     "reaching": {arm: _reach(test[arm].tolist(), tgt, higher_is_better) for arm in arm_names},
                                     "trials_needed": needs}
            if reference in arm_names:
                entry["ratio"] = {arm: _json_number(_ratio(needs[arm], needs[reference])) for arm in arm_names if arm != reference}
            sweep.append(entry)
        rule = "given" if target is not None else f"quantile {quantile:g} of the pooled test values (the best {1 - quantile:.0%} of all trials of all arms)"
        out[gate] = {"target": gate_target, "target_rule": rule, "reference": reference if reference in arm_names else None,
                     "arms": arms, "ratios": ratios, "target_sweep": sweep}
    return out


def _plot(summary: dict[str, Any], metric: str, path: Path) -> None:
    gates = list(summary)
    fig = Figure(figsize=(4.2 * len(gates), 3.4))
    axes = fig.subplots(1, len(gates), squeeze=False)[0]
    for ax, gate in zip(axes, gates):
        for arm, entry in summary[gate]["arms"].items():
            n = np.arange(1, len(entry["best_of_n_with_replacement"]) + 1)
            line = ax.plot(n, entry["best_of_n_with_replacement"], "--", alpha=0.6)[0]
            ax.plot(np.arange(1, entry["trials"] + 1), entry["best_of_n"], "-", color=line.get_color(), label=f"{arm} (needs {entry['trials_needed'] if entry['trials_needed'] is not None else 'never'})")
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
    """Write ``tune.json``, ``tune.md`` and ``best_of_n.png`` into ``directory`` (never replacing files).

    The report states the number of trials given in ``trials`` (and the number configured when that differs,
    e.g. a study run over ``indices`` or the trials kept after a failure); each trial of an arm must appear once.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("tune.json", "tune.md") + (("best_of_n.png",) if plots else ()):
        if (directory / name).exists():
            raise FileExistsError(f"{directory / name} already exists; write the report into a new directory")
    headline = data.metrics[0]
    summary = summarise_tune(trials, higher_is_better=headline.higher_is_better, target=config.target,
                             probability=config.probability, rng=config.seed)
    if plots:
        _plot(summary, headline.name, directory / "best_of_n.png")
    report = {"config": config.to_dict(), "metric": headline.name, "higher_is_better": headline.higher_is_better,
              "probability": config.probability, "summary": summary, "trials": [t.to_dict() for t in trials]}
    (directory / "tune.json").write_text(json.dumps(report, indent=1, allow_nan=False))
    exp = config.experiment
    # The trials reported are the ones given: fewer than the config's when run with indices= or kept after a failure.
    counts = sorted({e["trials"] for g in summary.values() for e in g["arms"].values()})
    ran = len(counts) == 1 and counts[0]
    done = (str(ran) if ran else " / ".join(map(str, counts)) + " (per gate)") + (
        f" of the {config.trials} configured" if counts != [config.trials] else "")
    pool_of = f"the {ran}" if ran else "an arm's"
    lines = [
        f"# Tuning budget: {exp.dataset} ({exp.preset} preset)",
        "",
        f"{done} random-search trials per arm over the grid below (the same draws and trial seeds for every "
        f"arm; seed {config.seed}; {exp.train.epochs} epochs"
        + (f"; at most {exp.data.max_train} training rows" if exp.data.max_train is not None else "") + "). "
        f"Selection: validation {headline.name}; reported: test {headline.name} "
        f"({'higher' if headline.higher_is_better else 'lower'} is better). The expected best of N is exact over the "
        "trials' order statistics. \"Trials needed\" is the smallest N whose best-by-validation trial reaches the "
        f"target with probability ≥ {config.probability:g}: drawing from {pool_of} trials without replacement "
        f"(\"> {ran if ran else 'T'}\": not within the trials run), and with replacement (extrapolating the empirical "
        "distribution; \"never\": the arm's best-by-validation trial misses the target).",
        "",
        "Grid: " + "; ".join(f"{f.name} ∈ {list(getattr(config.grid, f.name))}" for f in dataclasses.fields(config.grid)),
        "(a reconstruction of the papers' grids; their appendices with the exact lists are not part of this project).",
        "",
        f"| gate | arm | target | trials reaching it | best of 1 | best of {min(5, ran) if ran else '5 (or all)'} "
        f"| best of {ran if ran else 'all'} "
        "| trials needed (from the trials) | trials needed (with replacement) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for gate, g in summary.items():
        for arm, e in g["arms"].items():
            b5 = e["best_of_n"][min(4, e["trials"] - 1)]
            pool = f"> {e['trials']}" if e["trials_needed_without_replacement"] is None else str(e["trials_needed_without_replacement"])
            needed = "never" if e["trials_needed"] is None else str(e["trials_needed"])
            lines.append(f"| {gate} | {arm} | {g['target']:.4f} | {e['reaching_target']}/{e['trials']} | {e['best_of_n'][0]:.4f} "
                         f"| {b5:.4f} | {e['best_of_n'][-1]:.4f} | {pool} | {needed} |")
    lines += ["", "Target rule: " + "; ".join(f"{gate}: {g['target_rule']}" for gate, g in summary.items()) + "."]
    ratio_rows = [(gate, g["reference"], arm, r) for gate, g in summary.items() for arm, r in g["ratios"].items()]
    if ratio_rows:
        lines += [
            "",
            "## Ratio of trials needed (arm / reference)",
            "",
            "With replacement; the bootstrap resamples the trial indices (paired across arms) and re-takes the "
            "target from each resample. A ratio can never exceed the arm's own need (no arm needs fewer than one "
            "trial), so 10× needs an arm that needs ≥ 10 trials.",
            "",
            "| gate | ratio | point | bootstrap median [5 %, 95 %] | resamples with ratio ≥ 10 | from the trials (without replacement) |",
            "|---|---|---|---|---|---|",
        ]
        for gate, reference, arm, r in ratio_rows:
            b = r["bootstrap"]
            interval = (f"{_fmt_ratio(b['median'])} [{_fmt_ratio(b['q05'])}, {_fmt_ratio(b['q95'])}]"
                        + (f" ({b['undefined']} of {b['resamples']} undefined)" if b["undefined"] else "")) if "median" in b else "—"
            share = f"{b['at_least_10x']:.0%}" if "at_least_10x" in b else "—"
            pr = r["ratio_without_replacement"]
            pool = (f"{pr['value']:.1f}" if pr["value"] is not None else f"≥ {pr['at_least']:.1f}" if pr["at_least"] is not None
                    else "undefined")
            lines.append(f"| {gate} | {arm} / {reference} | {_fmt_ratio(r['ratio'])} | {interval} | {share} | {pool} |")
    arm_order = list(next(iter(summary.values()))["arms"]) if summary else []
    lines += [
        "",
        "## Other targets (pooled quantiles of the test values)",
        "",
        "| gate | quantile | target | " + " | ".join(f"{a}: reaching, needed" for a in arm_order) + " | ratios |",
        "|---|---|---|" + "---|" * len(arm_order) + "---|",
    ]
    for gate, g in summary.items():
        for entry in g["target_sweep"]:
            cells = [f"{entry['reaching'][a]}/{g['arms'][a]['trials']}, {'never' if entry['trials_needed'][a] is None else entry['trials_needed'][a]}"
                     for a in arm_order]
            ratios = ", ".join(f"{a}/{g['reference']} {_fmt_ratio(x)}" for a, x in entry.get("ratio", {}).items())
            lines.append(f"| {gate} | {entry['quantile']:g} | {entry['target']:.4f} | " + " | ".join(cells) + f" | {ratios or '—'} |")
    if plots:
        lines += ["", "Plot: `best_of_n.png`."]
    (directory / "tune.md").write_text("\n".join(lines) + "\n")
    return report

