"""``routing-search experiment`` and ``routing-search tune``: run, then write the reports into a new run directory."""

from __future__ import annotations

from pathlib import Path

from ..experiments import ExperimentConfig, TuneConfig, run_experiment
from ..experiments.report import format_mean_se, write_report
from ..experiments.tune import run_tune, write_tune_report
from ..experiments.output import new_run_dir

__all__ = ["run_experiment_command", "run_tune_command"]


def run_experiment_command(config: ExperimentConfig, *, out: str | Path = "runs", plots: bool = True) -> Path:
    """Run ``config`` and write ``report.md``, ``report.json`` and plots to ``out/experiment-<dataset>-<time>``."""
    run_dir = new_run_dir(out, f"experiment-{config.dataset}")
    print(f"routing-search experiment {config.dataset}: outputs in {run_dir}", flush=True)
    log = (lambda line: print(line, flush=True)) if config.progress else None
    result = run_experiment(config, log=log)
    report = write_report(result, run_dir, plots=plots)
    headline = result.metric_names[0]
    for gate, arms in report["summary"].items():
        for arm, entry in arms.items():
            print(f"{gate:>9} {arm:>8}: {headline} {format_mean_se(entry['metrics'][headline])}")
    print(f"report: {run_dir / 'report.md'}")
    return run_dir


def run_tune_command(config: TuneConfig, *, out: str | Path = "runs", plots: bool = True) -> Path:
    """Run the tuning study and write ``tune.md``, ``tune.json`` and ``best_of_n.png`` to a new run directory."""
    run_dir = new_run_dir(out, f"tune-{config.experiment.dataset}")
    print(f"routing-search tune {config.experiment.dataset}: outputs in {run_dir}", flush=True)
    log = (lambda line: print(line, flush=True)) if config.experiment.progress else None
    trials, data = run_tune(config, log=log)
    report = write_tune_report(config, trials, data, run_dir, plots=plots)
    for gate, entry in report["summary"].items():
        for arm, e in entry["arms"].items():
            print(f"{gate:>9} {arm:>7}: best of all {e['best_of_n'][-1]:.4f}, trials needed for "
                  f"{entry['target']:.4f}: {e['trials_needed'] if e['trials_needed'] is not None else 'not reached'}")
    print(f"report: {run_dir / 'tune.md'}")
    return run_dir
