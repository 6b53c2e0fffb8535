"""``routing-search experiment`` and ``routing-search tune``: run, then write the reports into a new run directory."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..experiments import ExperimentConfig, TuneConfig, run_experiment
from ..experiments.report import format_mean_se, write_report
from ..experiments.tune import run_tune, write_tune_report
from ..experiments.output import COMPLETED_RUNS, append_json_line, new_run_dir, removed_if_empty_on_failure

__all__ = ["run_experiment_command", "run_tune_command"]


def _kept_in(run_dir: Path) -> Callable[[Any], None]:
    """Append each finished run (trial) to ``run_dir/completed.jsonl`` as it ends."""
    return lambda record: append_json_line(run_dir / COMPLETED_RUNS, record.to_dict())


def _say_what_was_kept(run_dir: Path, what: str) -> None:
    path = run_dir / COMPLETED_RUNS
    if path.exists():
        count = sum(1 for _ in path.open(encoding="utf-8"))
        print(f"the {what} stopped early; the {count} that finished are kept in {path}", file=sys.stderr)


def run_experiment_command(config: ExperimentConfig, *, out: str | Path = "runs", plots: bool = True) -> Path:
    """Run ``config`` and write ``report.md``, ``report.json`` and plots to ``out/experiment-<dataset>-<time>``.

    Every run is appended to ``completed.jsonl`` there as soon as it ends, so a failure later in the study
    (a diverged run, Ctrl-C) keeps the runs already done."""
    run_dir = new_run_dir(out, f"experiment-{config.dataset}")
    print(f"routing-search experiment {config.dataset}: outputs in {run_dir}", flush=True)
    log = (lambda line: print(line, flush=True)) if config.progress else None
    try:
        with removed_if_empty_on_failure(run_dir):
            result = run_experiment(config, log=log, on_record=_kept_in(run_dir))
            report = write_report(result, run_dir, plots=plots)
    except BaseException:
        _say_what_was_kept(run_dir, "runs")
        raise
    headline = result.metric_names[0]
    for gate, arms in report["summary"].items():
        for arm, entry in arms.items():
            print(f"{gate:>9} {arm:>8}: {headline} {format_mean_se(entry['metrics'][headline])}")
    print(f"report: {run_dir / 'report.md'}")
    return run_dir


def _ratio_text(x: float | str | None) -> str:
    """A ratio of the tuning report (a number, ``'inf'``, or None when neither arm reaches the target)."""
    return "undefined" if x is None else x if isinstance(x, str) else f"{x:.1f}"


def run_tune_command(config: TuneConfig, *, out: str | Path = "runs", plots: bool = True) -> Path:
    """Run the tuning study and write ``tune.md``, ``tune.json`` and ``best_of_n.png`` to a new run directory
    (every trial is appended to ``completed.jsonl`` there as soon as it ends)."""
    run_dir = new_run_dir(out, f"tune-{config.experiment.dataset}")
    print(f"routing-search tune {config.experiment.dataset}: outputs in {run_dir}", flush=True)
    log = (lambda line: print(line, flush=True)) if config.experiment.progress else None
    try:
        with removed_if_empty_on_failure(run_dir):
            trials, data = run_tune(config, log=log, on_trial=_kept_in(run_dir))
            report = write_tune_report(config, trials, data, run_dir, plots=plots)
    except BaseException:
        _say_what_was_kept(run_dir, "trials")
        raise
    for gate, entry in report["summary"].items():
        for arm, e in entry["arms"].items():
            pool = e["trials_needed_without_replacement"]
            print(f"{gate:>9} {arm:>7}: best of all {e['best_of_n'][-1]:.4f}, trials needed for {entry['target']:.4f}: "
                  f"{pool if pool is not None else '> ' + str(e['trials'])} from the trials, "
                  f"{e['trials_needed'] if e['trials_needed'] is not None else 'never'} with replacement")
        for arm, r in entry["ratios"].items():
            b = r["bootstrap"]
            spread = f" (bootstrap 5-95 %: {_ratio_text(b['q05'])} to {_ratio_text(b['q95'])})" if "q05" in b else ""
            print(f"{gate:>9} ratio of trials needed {arm}/{entry['reference']}: {_ratio_text(r['ratio'])}{spread}")
    print(f"report: {run_dir / 'tune.md'}")
    return run_dir
