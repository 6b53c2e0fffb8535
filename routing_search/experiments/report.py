"""Reports of an experiment: ``report.json``, ``report.md`` and plots, written into a run directory.

``report.json`` holds the config, the dataset facts, every run, the per arm × gate × metric summary
(mean ± standard error over seeds), and the paired per-seed comparisons of every arm against ``sgd``
and against ``random`` (and of ``guarded`` against ``search``). Fields derived from wall time are named ``seconds`` / ``search_share``; every
other number is reproducible from the seed (see :func:`strip_times`).

Plots (matplotlib, drawn off-screen without pyplot): ``metric_<metric>.png`` (the metric per arm, one
point per seed, lines joining the seeds' arms), ``usage_<gate>.png`` (per arm and task, the mean expert
weights on the validation rows after each epoch: the DSelect-k Fig. 2 view) and ``heatmap_<gate>.png``
(task × expert mean weights on the test rows, per arm).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .runner import ExperimentResult, RunRecord
from .stats import mean_se, paired_comparison

__all__ = ["summarise", "compare", "write_report", "strip_times", "format_mean_se", "PAPER_FIGURES", "TIME_FIELDS"]

TIME_FIELDS = ("seconds", "search_share")

# What the papers report for these setups (see the README); shown beside the measured figures.
PAPER_FIGURES: dict[str, str] = {
    "multi-mnist": (
        "DSelect-k paper, Table 2 (Multi-MNIST, static gates, 8 CNN experts, 100 repetitions): "
        "DSelect-k 92.56 ± 0.03 / 90.98 ± 0.04 % with 1.7 experts; Top-k 91.93 ± 0.06 / 90.03 ± 0.08 % with 4; "
        "Softmax MoE 92.61 ± 0.03 / 91.0 ± 0.03 % with 8; Gumbel-softmax 92.3 / 90.63 % with 1.8."
    ),
    "multi-fashion": (
        "DSelect-k paper, Table 2 (Multi-Fashion, static gates): DSelect-k 83.78 / 83.34 % with 1.8 experts; "
        "Top-k 83.44 / 82.66 % with 4; Softmax MoE 83.48 / 82.81 % with 8."
    ),
    "movielens": (
        "DSelect-k paper, Table 1 (MovieLens, α = 0.5, test loss × 10⁴): static DSelect-k 3804 ± 3 with 1.5 experts, "
        "Top-k 3818 ± 2 with 2, Softmax MoE 3960 ± 3 with 8; per-example DSelect-k 3823 ± 3 with 1.2. "
        "COMET+ reports up to 13 % ROC AUC over Hash/Top-k and up to 9 % over DSelect-k (its own tuning protocol)."
    ),
    "synthetic": "DSelect-k paper, Fig. 2: static DSelect-k recovers the true experts on data drawn from an MoE; Top-k oscillates.",
    "keyed": "No published figure: a family built here so that Hash routing and its search have a known answer.",
}


def format_mean_se(entry: dict[str, Any], digits: int = 4) -> str:
    """``'m ± se (n)'`` for a :func:`~routing_search.experiments.stats.mean_se` entry."""
    if entry.get("mean") is None:
        return "–"
    se = entry.get("se")
    return f"{entry['mean']:.{digits}g} ± {se:.2g}" if se is not None else f"{entry['mean']:.{digits}g}"


def _runs_by(result: ExperimentResult) -> dict[tuple[str, str], list[RunRecord]]:
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for run in result.runs:
        groups.setdefault((run.gate, run.arm), []).append(run)
    for runs in groups.values():
        runs.sort(key=lambda r: r.seed)
    return groups


def summarise(result: ExperimentResult) -> dict[str, dict[str, dict[str, Any]]]:
    """``{gate: {arm: {...}}}`` with mean ± s.e. of every metric, experts used per task, support F1,
    searches, accepted moves, time and search share."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (gate, arm), runs in _runs_by(result).items():
        entry: dict[str, Any] = {"metrics": {name: mean_se([r.metrics[name] for r in runs]) for name in result.metric_names}}
        tasks = len(runs[0].experts_used)
        entry["experts_used"] = [mean_se([r.experts_used[t] for r in runs]) for t in range(tasks)]
        f1 = [r.support_f1 for r in runs if r.support_f1 is not None]
        entry["support_f1"] = mean_se(f1) if f1 else None
        entry["accepted_moves"] = mean_se([r.accepted_moves for r in runs])
        entry["guard_rejections"] = mean_se([r.guard_rejections for r in runs])
        if arm == "guarded":
            entry["guard"] = _guard_summary(runs, result)
        entry["seconds"] = mean_se([r.seconds for r in runs])
        entry["search_share"] = mean_se([r.search_share for r in runs])
        out.setdefault(gate, {})[arm] = entry
    return out


def _guard_summary(runs: list[RunRecord], result: ExperimentResult) -> dict[str, Any]:
    """Over the searches of the ``guarded`` runs: per guarded metric, how it moved from the start to the end
    of a search on the search rows (``worst``: the largest worsening, in the metric's direction)."""
    per_metric: dict[str, Any] = {}
    names = [name for name in result.metric_names if any(name in c for r in runs for c in r.guard_checks)]
    for name in names:
        sign = 1.0 if result.higher_is_better[name] else -1.0
        changes = [sign * (c[name]["end"] - c[name]["start"]) for r in runs for c in r.guard_checks if name in c]
        per_metric[name] = {
            "searches": len(changes),
            "improved": sum(d > 0 for d in changes),
            "worse": sum(d < 0 for d in changes),
            "mean_change": float(np.mean(changes)) if changes else None,
            # 0 when no search made it worse (the smallest improvement is no worsening; report.md printed 0 already)
            "worst": float(max(0.0, -min(changes))) if changes else None,
        }
    return {"metrics": per_metric, "rejections": int(sum(r.guard_rejections for r in runs)),
            "searches": int(sum(r.searches for r in runs)), "kept": int(sum(r.accepted_moves for r in runs))}


def compare(result: ExperimentResult, control: str, arms: tuple[str, ...] | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """``{gate: {arm: {metric: paired comparison}}}`` of every other arm (or only ``arms``) against
    ``control``, by seed."""
    groups = _runs_by(result)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for gate in result.config.gates:
        if (gate, control) not in groups:
            continue
        base = {r.seed: r for r in groups[(gate, control)]}
        for arm in result.config.arms:
            if arm == control or (gate, arm) not in groups or (arms is not None and arm not in arms):
                continue
            runs = [r for r in groups[(gate, arm)] if r.seed in base]
            metrics = {}
            for name in result.metric_names:
                metrics[name] = paired_comparison(
                    [r.metrics[name] for r in runs], [base[r.seed].metrics[name] for r in runs],
                    higher_is_better=result.higher_is_better[name],
                )
            if runs and runs[0].support_f1 is not None:
                metrics["support_f1"] = paired_comparison(
                    [r.support_f1 or 0.0 for r in runs], [base[r.seed].support_f1 or 0.0 for r in runs], higher_is_better=True
                )
            out.setdefault(gate, {})[arm] = metrics
    return out


def strip_times(report: Any) -> Any:
    """A copy of a report (or any part of it) without the wall-time fields (for reproducibility checks)."""
    if isinstance(report, dict):
        return {k: strip_times(v) for k, v in report.items() if k not in TIME_FIELDS}
    if isinstance(report, list):
        return [strip_times(v) for v in report]
    return report


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _p(value: float | None) -> str:
    return "–" if value is None else (f"{value:.3f}" if value >= 0.001 else f"{value:.1e}")


def _comparison_line(arm: str, control: str, name: str, c: dict[str, Any]) -> str:
    diff = format_mean_se(c["diff"], 3)
    ratio = "–" if c["median_ratio"] is None else f"{c['median_ratio']:.4f}"
    left_out = f" ({c['excluded']} seed(s) left out: NaN/inf value)" if c.get("excluded") else ""
    return (
        f"| {arm} vs {control} | {name} | better by ≥ 1 % on {c['better']}/{c['n']}, worse on {c['worse']}/{c['n']}{left_out} "
        f"| {ratio} | {diff} | {_p(c['sign_p'])} | {_p(c['wilcoxon_p'])} |"
    )


def _markdown(result: ExperimentResult, summary: dict[str, Any], comparisons: dict[str, Any], files: list[str]) -> str:
    cfg = result.config
    lines = [
        f"# Experiment: {cfg.dataset} ({cfg.preset} preset)",
        "",
        f"Gates: {', '.join(cfg.gates)}. Arms: {', '.join(cfg.arms)}. Seeds: 0–{cfg.seeds - 1} (each seed fixes the "
        "data, the initialisation and the batch order of every arm: the comparisons below are paired by seed).",
        f"Model: {cfg.model.num_experts} experts, k = {cfg.model.k}, {cfg.model.gate_input} gates; "
        f"{cfg.train.epochs} epochs, batch {cfg.train.batch_size}, Adam lr {cfg.train.lr:g}. "
        f"Rows: train {result.dataset_info.get('train_rows')}, val {result.dataset_info.get('val_rows')}, "
        f"test {result.dataset_info.get('test_rows')}.",
        "",
        "The `random` arm applies one random permutation per permutation module before training and then trains "
        "first-order only: it is the control any search claim must beat. Values are test-set figures, mean ± "
        "standard error over seeds.",
    ]
    steps = result.dataset_info.get("train_steps")
    if any(g in ("dselect_k", "comet") for g in cfg.gates):
        lines += ["", f"DSelect-k / COMET: γ annealing fitted to the run's budget of {steps} optimiser steps "
                  "(`GammaAnnealing.for_budget(total_steps)`: γ constant for the first half of the steps, annealed to "
                  "0.2 % of its start between 50 % and 80 % of them), so that the gates can end binary."]
    if "guarded" in cfg.arms:
        guarded = ", ".join(f"{m} ({'higher' if result.higher_is_better[m] else 'lower'} is better)" for m in result.guard_metric_names)
        val_rows = result.dataset_info.get("val_rows")
        rows = cfg.search.rows if not isinstance(val_rows, int) else min(cfg.search.rows, val_rows)
        lines += ["", f"The `guarded` arm is the `search` arm with a guard on every task's metric: {guarded}, computed on "
                  f"the same {rows} validation rows the search scores; a move that lowers the search's "
                  f"loss is kept only if no guarded metric is worse than at the start of that search by more than "
                  f"{cfg.guard.tolerance:g}. It guards validation rows, not the test rows reported here."]
    lines += ["", "## Results per gate and arm", ""]
    header = ("| gate | arm | " + " | ".join(result.metric_names)
              + " | experts used per task | support F1 | moves kept | guard rejections | seconds | search share |")
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for gate in cfg.gates:
        for arm in cfg.arms:
            e = summary.get(gate, {}).get(arm)
            if e is None:
                continue
            experts = ", ".join(f"{x['mean']:.2f}" for x in e["experts_used"])
            f1 = format_mean_se(e["support_f1"], 3) if e["support_f1"] else "–"
            share = e["search_share"]["mean"]
            lines.append(
                f"| {gate} | {arm} | " + " | ".join(format_mean_se(e["metrics"][m]) for m in result.metric_names)
                + f" | {experts} | {f1} | {e['accepted_moves']['mean']:.1f} | {e['guard_rejections']['mean']:.1f}"
                + f" | {e['seconds']['mean']:.1f} | {100 * share:.1f} % |"
            )
    if "guarded" in cfg.arms:
        lines += ["", "## The guards at each search (`guarded` arm, validation rows the search scores)", "",
                  "Change of each guarded metric from the start to the end of a search, in its better direction "
                  "(positive: improved); `worst` is the largest worsening at any search (at most the tolerance).", "",
                  "| gate | metric | searches | improved | worse | mean change | worst | moves kept | moves refused |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for gate in cfg.gates:
            g = summary.get(gate, {}).get("guarded", {}).get("guard")
            if not g:
                continue
            for name, m in g["metrics"].items():
                mean = "–" if m["mean_change"] is None else f"{m['mean_change']:+.4g}"
                worst = "–" if m["worst"] is None else f"{m['worst'] if m['worst'] > 0 else 0.0:.3g}"
                lines.append(f"| {gate} | {name} | {m['searches']} | {m['improved']} | {m['worse']} | {mean} | {worst} "
                             f"| {g['kept']} | {g['rejections']} |")
    for control in ("sgd", "random", "search"):
        comp = comparisons.get(control, {})
        if not comp:
            continue
        lines += ["", f"## Paired comparisons against `{control}`", "",
                  "| arm | metric | per seed | median ratio | mean diff ± s.e. | sign p | Wilcoxon p |",
                  "|---|---|---|---|---|---|---|"]
        for gate in cfg.gates:
            if gate not in comp:
                continue
            lines.append(f"| **{gate}** | | | | | | |")
            for arm, metrics in comp[gate].items():
                for name, c in metrics.items():
                    lines.append(_comparison_line(arm, control, name, c))
    lines += ["", "Direction: " + ", ".join(f"{m} {'higher' if h else 'lower'} is better" for m, h in result.higher_is_better.items()) + "."]
    paper = PAPER_FIGURES.get(cfg.dataset)
    if paper:
        lines += ["", "## What the papers report", "", paper,
                  "", "The papers tune every gate (random search, many trials) and train far longer on the full data; "
                  "a preset run is a controlled comparison between arms, not a reproduction of those numbers."]
    if files:
        lines += ["", "## Plots", ""] + [f"- `{f}`" for f in files]
    return "\n".join(lines) + "\n"


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _plot_metric(result: ExperimentResult, name: str, path: Path) -> None:
    cfg = result.config
    groups = _runs_by(result)
    fig = Figure(figsize=(max(4.0, 3.2 * len(cfg.gates)), 3.4))
    axes = fig.subplots(1, len(cfg.gates), squeeze=False)[0]
    for ax, gate in zip(axes, cfg.gates):
        per_seed: dict[int, list[tuple[int, float]]] = {}
        for i, arm in enumerate(cfg.arms):
            for r in groups.get((gate, arm), []):
                per_seed.setdefault(r.seed, []).append((i, r.metrics[name]))
        for seed, points in per_seed.items():
            xs, ys = zip(*points)
            ax.plot(xs, ys, "-o", alpha=0.6, markersize=4, label=f"seed {seed}")
        ax.set_xticks(range(len(cfg.arms)), cfg.arms)
        ax.set_title(gate)
        ax.set_ylabel(name)
    axes[0].legend(fontsize=6)
    fig.suptitle(f"{cfg.dataset}: test {name} per arm (lines join one seed's arms)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def _plot_usage(result: ExperimentResult, gate: str, path: Path) -> None:
    cfg = result.config
    groups = _runs_by(result)
    tasks = len(result.task_names)
    fig = Figure(figsize=(2.8 * tasks, 2.2 * len(cfg.arms)))
    axes = fig.subplots(len(cfg.arms), tasks, squeeze=False)
    for a, arm in enumerate(cfg.arms):
        runs = groups.get((gate, arm), [])
        if not runs or not runs[0].usage or not runs[0].usage[0]:
            continue
        usage = np.asarray(runs[0].usage)  # [epochs, tasks, experts]
        epochs = np.arange(1, usage.shape[0] + 1)
        for t in range(tasks):
            ax = axes[a][t]
            for e in range(usage.shape[2]):
                ax.plot(epochs, usage[:, t, e], label=f"expert {e}")
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{arm} · {result.task_names[t]}", fontsize=8)
            if t == 0:
                ax.set_ylabel("mean weight")
    axes[-1][0].set_xlabel("epoch")
    axes[0][-1].legend(fontsize=5, loc="upper right")
    fig.suptitle(f"{cfg.dataset}, {gate}: expert weights over training (first seed, validation rows)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def _plot_heatmap(result: ExperimentResult, gate: str, path: Path) -> None:
    cfg = result.config
    groups = _runs_by(result)
    fig = Figure(figsize=(2.6 * len(cfg.arms) + 1.5, 0.45 * len(result.task_names) + 2.0), layout="constrained")
    axes = fig.subplots(1, len(cfg.arms), squeeze=False, sharey=True)[0]
    image = None
    for i, (ax, arm) in enumerate(zip(axes, cfg.arms)):
        runs = groups.get((gate, arm), [])
        if not runs:
            continue
        weights = np.asarray(runs[0].task_weights)
        image = ax.imshow(weights, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_title(arm, fontsize=9)
        ax.set_xlabel("expert")
        if i == 0:
            ax.set_yticks(range(len(result.task_names)), result.task_names, fontsize=7)
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.8)
    fig.suptitle(f"{cfg.dataset}, {gate}: mean test weight per task and expert (first seed)", fontsize=9)
    _save(fig, path)


def write_report(result: ExperimentResult, directory: str | Path, *, plots: bool = True) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and (with ``plots``) the figures into ``directory``; returns the report.

    Existing files are never replaced: the directory must not already hold a report.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    drawings: list[tuple[str, Any, Any]] = []  # (file, plot function, its subject)
    if plots:
        drawings += [(f"metric_{_safe(name)}.png", _plot_metric, name) for name in result.metric_names]
        drawings += [(f"{kind}_{_safe(gate)}.png", fn, gate) for gate in result.config.gates
                     for kind, fn in (("usage", _plot_usage), ("heatmap", _plot_heatmap))]
    for name in ["report.json", "report.md"] + [file for file, _, _ in drawings]:  # the plots were replaced silently
        if (directory / name).exists():
            raise FileExistsError(f"{directory / name} already exists; write the report into a new directory")
    summary = summarise(result)
    comparisons: dict[str, Any] = {control: compare(result, control) for control in ("sgd", "random") if control in result.config.arms}
    if "search" in result.config.arms and "guarded" in result.config.arms:
        comparisons["search"] = compare(result, "search", arms=("guarded",))
    files: list[str] = []
    for file, fn, subject in drawings:
        fn(result, subject, directory / file)
        files.append(file)
    report = {
        "config": result.config.to_dict(),
        "dataset": result.dataset_info,
        "metrics": {m: {"higher_is_better": result.higher_is_better[m]} for m in result.metric_names},
        "tasks": result.task_names,
        "summary": summary,
        "comparisons": comparisons,
        "runs": [r.to_dict() for r in result.runs],
        "paper": PAPER_FIGURES.get(result.config.dataset),
        "plots": files,
    }
    report = _json_safe(report)
    (directory / "report.json").write_text(json.dumps(report, indent=1))
    (directory / "report.md").write_text(_markdown(result, summary, comparisons, files))
    return report
