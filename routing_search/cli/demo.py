"""``routing-search demo``: gates on synthetic data, then escaping a collapsed router.

Part 1 trains one multi-gate MoE per gate on data drawn from a known MoE and reports test loss,
experts selected per task and support recovery against the truth.

Part 2 is the case local search exists for: every task's static DSelect-k gate starts collapsed onto
the same two experts with saturated codes, where the smooth-step has zero gradient, so first-order
training cannot move the selection. It compares, paired by seed, first-order training alone, the
control (one random permutation before training, then first-order training), first-order training
alternated with the frozen-expert local search, the same with the refit-aware search, and learned
Sinkhorn permutations (COMET+); it prints each arm's per-seed wins against the control and says in words
what they mean, and saves a plot of each task's expert weights over training (the DSelect-k Fig. 2 view).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data import SyntheticMoEData, make_synthetic_moe
from ..gates import COMET, DSelectK, GammaAnnealing, GumbelSoftmax, Softmax, TopK
from ..layers import MultiGateMoE, make_experts
from ..metrics import match_experts_by_outputs, support_recovery
from ..experiments.runner import apply_random_permutations
from ..search import SinkhornPermutation
from ..search.refit import RefitOptions
from ..search.codes import set_selector_slot
from ..training import SearchSchedule, fit, multitask_loss
from ..experiments.output import new_run_dir
from ..experiments.stats import paired_comparison

__all__ = ["run_demo", "DemoConfig", "train_and_score", "paired_against_control", "verdict"]


@dataclass
class DemoConfig:
    num_experts: int = 8
    k: int = 2
    num_tasks: int = 4
    input_dim: int = 10
    num_samples: int = 3000
    hidden: int = 16
    noise: float = 0.1
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-2


def _split(data: SyntheticMoEData) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    return tuple((part.x, part.y) for part in data.split((0.7, 0.15, 0.15)))


def _annealing(cfg: DemoConfig) -> GammaAnnealing:
    """The selector gates' γ annealing fitted to this run's budget (one gate call per training step)."""
    steps_per_epoch = math.ceil(round(0.7 * cfg.num_samples) / cfg.batch_size)
    return GammaAnnealing.for_budget(max(2, cfg.epochs * steps_per_epoch))


def _gate_factory(name: str, cfg: DemoConfig) -> Callable[[], nn.Module]:
    n, k = cfg.num_experts, cfg.k
    factories: dict[str, Callable[[], nn.Module]] = {
        "Softmax": lambda: Softmax(num_experts=n),
        "TopK": lambda: TopK(num_experts=n, k=k),
        "GumbelSoftmax": lambda: GumbelSoftmax(num_experts=n),
        "DSelectK": lambda: DSelectK(num_experts=n, k=k, anneal=_annealing(cfg)),
        "COMET": lambda: COMET(num_experts=n, k=k, anneal=_annealing(cfg)),
    }
    return factories[name]


def _build(cfg: DemoConfig, make_gate: Callable[[], nn.Module], seed: int) -> MultiGateMoE:
    torch.manual_seed(seed)
    experts = make_experts(cfg.num_experts, cfg.input_dim, [cfg.hidden], 1)
    return MultiGateMoE(experts, [make_gate() for _ in range(cfg.num_tasks)])


@torch.no_grad()
def score(model: MultiGateMoE, data: SyntheticMoEData, test: tuple[torch.Tensor, torch.Tensor], loss) -> dict:
    """Test loss, experts per task and support recovery of a trained (static-gate) model."""
    model.eval()
    x, y = test
    out = model(x)
    test_loss = float(loss(out.outputs, y).mean())
    task_weights = torch.stack([w.mean(dim=0) for w in out.weights])  # static gates: identical rows
    learned_outputs = model.expert_outputs(x).squeeze(-1)
    matching = match_experts_by_outputs(learned_outputs, data.truth.expert_outputs(x))
    recovery = support_recovery(task_weights, data.truth.expert_weights, matching=matching, threshold=1e-3)
    experts_per_task = (task_weights > 1e-3).sum(dim=1).double().mean().item()
    return {
        "test_loss": test_loss,
        "experts_per_task": experts_per_task,
        "f1": float(recovery.mean_f1),
        "precision": float(recovery.mean_precision),
        "recall": float(recovery.mean_recall),
        "task_weights": task_weights.tolist(),
    }


def train_and_score(
    cfg: DemoConfig,
    data: SyntheticMoEData,
    model: MultiGateMoE,
    *,
    search: SearchSchedule | None,
    seed: int,
    progress: bool,
) -> dict:
    """Train ``model`` with :func:`~routing_search.fit` and score it on the test split (loss, experts, recovery, time)."""
    train, val, test = _split(data)
    loss = multitask_loss(["mse"] * cfg.num_tasks)
    start = time.perf_counter()
    result = fit(
        model,
        train,
        loss,
        val_data=val,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        optimizer=lambda params: torch.optim.Adam(params, lr=cfg.lr),
        search=search,
        seed=seed,
        progress=progress,
    )
    seconds = time.perf_counter() - start
    scores = score(model, data, test, loss)
    scores["seconds"] = seconds
    scores["search_seconds"] = float(sum(result.history.search_seconds))
    scores["moves"] = int(sum(s["accepted"] for s in result.history.searches))
    # Per epoch, each task's mean expert weight on the validation data (the model is the layer: name '').
    scores["weights_over_epochs"] = [[task["soft"] for task in epoch[""]] for epoch in result.history.usage]
    return scores


FIRST_ORDER_ARM = "first-order only"
RANDOM_ARM = "random permutation (control)"
SEARCH_ARM = "first-order + local search"
REFIT_ARM = "first-order + refit search"
SINKHORN_ARM = "learned Sinkhorn (COMET+)"
COLLAPSE_ARMS = (FIRST_ORDER_ARM, RANDOM_ARM, SEARCH_ARM, REFIT_ARM, SINKHORN_ARM)


def _collapse_gate(arm: str, cfg: DemoConfig) -> Callable[[], nn.Module]:
    if arm == SINKHORN_ARM:
        return lambda: SinkhornPermutation(DSelectK(num_experts=cfg.num_experts, k=cfg.k, anneal=_annealing(cfg)), anneal_steps=3)
    return lambda: DSelectK(num_experts=cfg.num_experts, k=cfg.k, anneal=_annealing(cfg))


def _collapse_search(arm: str) -> SearchSchedule | None:
    if arm == SEARCH_ARM:
        # Frequent searches early matter here: a move pays off only once the target expert has learnt something.
        return SearchSchedule(method="swap", every_steps=10)
    if arm == REFIT_ARM:
        # Scores each swap after a closed-form refit of the moved experts' last layer, so an untrained
        # expert is judged by what it could fit; once before training, then every 100 steps.
        return SearchSchedule(method="swap", every_steps=100, at_start=True, refit=RefitOptions(ridge=1e-3, max_iter=8), fit_rows=512)
    return None


def paired_against_control(per_method: dict[str, list[dict]], *, threshold: float = 0.01) -> dict[str, dict]:
    """Per arm, seed by seed against the random-permutation control: wins / losses by >= 1 % and the median ratio."""
    control = [r["test_loss"] for r in per_method[RANDOM_ARM]]
    out: dict[str, dict] = {}
    for name, results in per_method.items():
        if name == RANDOM_ARM:
            continue
        c = paired_comparison([r["test_loss"] for r in results], control, higher_is_better=False, threshold=threshold)
        out[name] = {"wins": c["better"], "losses": c["worse"], "seeds": c["n"], "median_ratio": c["median_ratio"]}
    return out


def verdict(comparisons: dict[str, dict], seeds: int) -> str:
    """What the Part 2 numbers mean, in words."""
    lines = [
        "What this means: every arm starts from the same collapsed router, data and batches (paired by seed).",
        "The control applies one random permutation before training: it breaks the collapse as well as any",
        "search could, so a method helps only if it ends lower than the control on most seeds.",
    ]
    for name, c in comparisons.items():
        helps = c["wins"] >= max(1, int(np.ceil(0.8 * c["seeds"]))) and c["losses"] == 0
        lines.append(
            f"- {name}: >= 1 % lower test MSE than the control on {c['wins']}/{c['seeds']} seed(s), higher on "
            f"{c['losses']}; median ratio {c['median_ratio']:.3f} -> "
            + ("beats the control." if helps else "does not beat the control.")
        )
    if seeds < 5:
        lines.append(f"({seeds} seed(s) only: pass --seeds 10 for a verdict worth quoting.)")
    return "\n".join(lines)


def collapse(model: MultiGateMoE, experts: tuple[int, ...]) -> None:
    """Point every selector of every (static DSelect-k) task gate at the same experts, saturated."""
    for gate in model.gates:
        inner = gate.gate if isinstance(gate, SinkhornPermutation) else gate
        for selector, expert in enumerate(experts):
            set_selector_slot(inner, selector, expert)


def _print_table(title: str, rows: list[tuple[str, dict]]) -> None:
    print(f"\n{title}")
    print(f"{'method':34s} {'test MSE':>9s} {'experts/task':>13s} {'support F1':>11s} {'seconds':>8s}")
    for name, r in rows:
        print(
            f"{name:34s} {r['test_loss']:9.4f} {r['experts_per_task']:13.2f} {r['f1']:11.3f} {r['seconds']:8.1f}"
        )


def _summarise(results: list[dict]) -> dict:
    keys = ("test_loss", "experts_per_task", "f1", "seconds", "search_seconds", "moves")
    return {k: float(np.mean([r[k] for r in results])) for k in keys} | {
        f"{k}_std": float(np.std([r[k] for r in results])) for k in ("test_loss", "f1")
    }


def _plot(path: Path, histories: dict[str, list], num_tasks: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(num_tasks, len(histories), figsize=(4 * len(histories), 2.2 * num_tasks), squeeze=False)
    for col, (name, epochs) in enumerate(histories.items()):
        series = np.asarray(epochs)  # [epochs, tasks, experts]
        for task in range(num_tasks):
            ax = axes[task][col]
            ax.plot(series[:, task, :])
            ax.set_ylim(-0.02, 1.02)
            if task == 0:
                ax.set_title(name, fontsize=9)
            if col == 0:
                ax.set_ylabel(f"task {task}\nexpert weight")
            if task == num_tasks - 1:
                ax.set_xlabel("epoch")
    handles = axes[0][0].get_lines()
    fig.legend(handles, [f"expert {e}" for e in range(len(handles))], loc="lower center", ncol=len(handles), fontsize=8)
    fig.suptitle("Expert weights per task over training, measured on validation data after each epoch")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(*, out: str = "runs", seeds: int = 3, epochs: int = 20, quick: bool = False, progress: bool = True) -> Path:
    """Run both parts, print the tables and write ``summary.json`` and ``expert_weights.png``."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    cfg = DemoConfig(epochs=epochs)
    if quick:
        cfg = DemoConfig(num_samples=1200, epochs=min(epochs, 4), num_tasks=3)
        seeds = min(seeds, 1)
    run_dir = new_run_dir(out, "demo")
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    print(f"routing-search demo: outputs in {run_dir}")
    print(
        f"synthetic MoE: {cfg.num_experts} true experts, {cfg.num_tasks} regression tasks, each mixing "
        f"k={cfg.k} known experts; {cfg.num_samples} samples, input {cfg.input_dim}, noise {cfg.noise}"
    )
    summary: dict = {"config": cfg.__dict__, "gates": {}, "collapsed_start": {}}

    # Part 1: every gate from a normal start.
    data = make_synthetic_moe(
        num_samples=cfg.num_samples, input_dim=cfg.input_dim, num_experts=cfg.num_experts, k=cfg.k,
        num_tasks=cfg.num_tasks, noise=cfg.noise, seed=0,
    )
    rows = []
    for name in ("Softmax", "TopK", "GumbelSoftmax", "DSelectK", "COMET"):
        for with_search in (False, True):
            if with_search and name not in ("TopK", "DSelectK"):
                continue
            model = _build(cfg, _gate_factory(name, cfg), seed=0)
            search = SearchSchedule(method="swap", every_epochs=2) if with_search else None
            label = f"{name} + local search" if with_search else name
            r = train_and_score(cfg, data, model, search=search, seed=0, progress=progress)
            rows.append((label, r))
            summary["gates"][label] = {k: v for k, v in r.items() if k != "weights_over_epochs"}
    _print_table("Part 1 - gates from a normal start (seed 0)", rows)

    # Part 2: a collapsed router, several seeds, every arm paired by seed (same data, init, batches).
    per_method: dict[str, list[dict]] = {name: [] for name in COLLAPSE_ARMS}
    plots: dict[str, list] = {}
    for seed in range(seeds):
        data = make_synthetic_moe(
            num_samples=cfg.num_samples, input_dim=cfg.input_dim, num_experts=cfg.num_experts, k=cfg.k,
            num_tasks=cfg.num_tasks, noise=cfg.noise, seed=100 + seed,
        )
        for name in COLLAPSE_ARMS:
            model = _build(cfg, _collapse_gate(name, cfg), seed=seed)
            collapse(model, tuple(range(cfg.k)))
            if name == RANDOM_ARM:
                apply_random_permutations(model, 1000 + seed)
            r = train_and_score(cfg, data, model, search=_collapse_search(name), seed=seed, progress=progress)
            per_method[name].append(r)
            if seed == 0:
                plots[name] = r["weights_over_epochs"]
    rows = [(name, _summarise(results)) for name, results in per_method.items()]
    _print_table(f"Part 2 - collapsed router (all tasks start on experts 0..{cfg.k - 1}), mean over {seeds} seed(s)", rows)
    for name, s in rows:
        summary["collapsed_start"][name] = s
        print(f"  {name}: test MSE {s['test_loss']:.4f} ± {s['test_loss_std']:.4f}, F1 {s['f1']:.3f} ± {s['f1_std']:.3f}, "
              f"search {s['search_seconds']:.1f}s of {s['seconds']:.1f}s, {s['moves']:.1f} accepted moves")
    comparisons = paired_against_control(per_method)
    summary["paired_against_random"] = comparisons
    print("\n" + verdict(comparisons, seeds))

    plot_path = run_dir / "expert_weights.png"
    _plot(plot_path, plots, cfg.num_tasks)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {plot_path} and {run_dir / 'summary.json'}")
    return run_dir
