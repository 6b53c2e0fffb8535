"""Do static DSelect-k gates reach k experts, and do they recover the true supports? (issue 8, item 1)

    python benchmarks/sparsity_study.py [--seeds 10] [--first-seed 0] [--epochs 30] [--tasks 16] [--experts 8 6]
                                        [--arms dselect topk softmax oracle] [--entropy 1e-2] [--gamma-end 1.0]
                                        [--schedule BEGIN STOP] [--cycles OPEN BEGIN STOP ...] [--towers linear]
                                        [--restarts R] [--diagnose] [--trace]

Setting (the demo's): data from :func:`routing_search.make_synthetic_moe` (d = 10, 6000 rows split
70/15/15, hidden 16, noise 0.1, k = 2 true experts per task), a multi-gate MoE with one *static*
gate per task over ``n`` MLP experts 10 -> 16 -> 1, Adam 1e-2, batch 128, trained with
:func:`routing_search.fit`. Arms (each seed fixes data, initialisation and batches for every arm):

* ``dselect`` / ``comet``: static ``DSelectK(n, k=2)`` / ``COMET(n, k=2)`` with their defaults
  (``gamma`` annealed by ``BudgetAnnealing()``, fitted by ``fit`` to this run's budget: geometric
  over 50-80 % of the steps), or
  ``--no-anneal`` (gamma fixed at 1), or a custom annealing to ``--gamma-end`` over the fractions
  ``--schedule`` of the run; entropy weight ``--entropy`` (default: the gate's, 0), optionally ramped;
* ``topk``: static ``TopK(n, 2)``;
* ``softmax``: static ``Softmax(n)``, the dense control;
* ``oracle``: static Top-k fixed on each task's TRUE support (only the weights on it are learned):
  how well the experts can be learned when the selection is right (a reference, not a method).

Per arm and family: the median (and min / max) over seeds of the test MSE (summed over tasks, as
trained), the test MSE after hardening (``routing_search.analysis.harden``), the fraction of task
gates whose codes are binary at the end, the mean number of experts per task (weight > 1e-3) and
the support F1 against the truth. Learned experts are matched to true experts by the correlation of
their outputs on the test inputs (``match_experts_by_outputs``), not by the supports being scored.
``--diagnose`` explains every wrong support (per task, over all seeds): whether the loss-optimal
support under the *learned* experts (refitted exhaustively over every size-2 support on the training
rows, simplex weights; with ``--towers linear`` free weights and an intercept) is the true one — if so
the gate missed it, if not the experts themselves are wrong (co-adapted mixtures of true experts) —,
whether the task's two selectors picked the same expert, the true weights and expert correlations,
and the F1 that the loss-optimal supports would reach (a ceiling for the learned experts). The
``oracle`` arm fixes every task on its true support: how well the experts are learned, and whether the
truth is loss-optimal, when the selection is right (a check that the family is identifiable).
``--trace`` prints F1, experts per task and support changes after every epoch. ``--restarts R``
trains R initialisations (and batch orders) per seed on that seed's data and scores the one with the
lowest validation MSE, for every arm alike (the paper tuned per data set and discarded runs; this is the
selection a user can make without the truth).
One torch thread; results are printed, nothing is written.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import time

import torch

from routing_search import fit
from routing_search.data import make_synthetic_moe
from routing_search.analysis import harden
from routing_search.batches import eval_mode
from routing_search.exact import solve_subset
from routing_search.gates import COMET, DSelectK, Softmax, TopK
from routing_search.layers import MultiGateMoE, make_experts
from routing_search.losses import multitask_loss
from routing_search.metrics import match_experts_by_outputs, support_recovery


def geometric_gamma(start: float, end: float, steps: int, begin: float = 0.0, stop: float = 1.0):
    """``gamma(calls)``: ``start`` until ``begin * steps``, geometric to ``end`` at ``stop * steps``, then ``end``."""

    def gamma(calls: int) -> float:
        frac = (calls / max(steps, 1) - begin) / max(stop - begin, 1e-9)
        return start * (end / start) ** min(max(frac, 0.0), 1.0)

    return gamma


def cyclic_gamma(start: float, end: float, steps: int, windows: list[float]):
    """``gamma(calls)`` over windows ``(open, begin, stop)`` (fractions of the run): from ``open`` gamma is
    back at ``start`` (saturated codes whose logits are small become fractional again: the selection is
    re-opened with the experts trained so far), geometric from ``begin`` to ``end`` at ``stop``, then held."""
    triples = [tuple(windows[i:i + 3]) for i in range(0, len(windows), 3)]

    def gamma(calls: int) -> float:
        frac = calls / max(steps, 1)
        current = [w for w in triples if frac >= w[0]] or triples[:1]
        _, begin, stop = current[-1]
        t = min(max((frac - begin) / max(stop - begin, 1e-9), 0.0), 1.0)
        return start * (end / start) ** t

    return gamma


def ramp(value: float, steps: int, begin: float, stop: float):
    """``weight(calls)``: 0 until ``begin * steps``, linear to ``value`` at ``stop * steps``, then ``value``."""

    def weight(calls: int) -> float:
        frac = (calls / max(steps, 1) - begin) / max(stop - begin, 1e-9)
        return value * min(max(frac, 0.0), 1.0)

    return weight


def make_gate(arm: str, n: int, k: int, args: argparse.Namespace, steps: int, truth_row: torch.Tensor) -> torch.nn.Module:
    if arm in ("dselect", "comet"):
        cls = DSelectK if arm == "dselect" else COMET
        options: dict = {"entropy_weight": args.entropy}
        begin, stop = args.schedule
        if args.cycles:
            options["gamma"] = cyclic_gamma(1.0, args.gamma_end, steps, args.cycles)
        elif args.gamma_end < 1.0:  # a custom annealing over fractions of this run
            options["gamma"] = geometric_gamma(1.0, args.gamma_end, steps, begin, stop)
        elif args.no_anneal:
            options["anneal"] = None  # the plain gate of the paper (gamma fixed at 1)
        if args.entropy_ramp:
            options["entropy_weight"] = ramp(args.entropy, steps, begin, stop)
        if arm == "dselect" and args.unreachable is not None:
            options["unreachable"] = args.unreachable
        if arm == "dselect" and args.reachability is not None:
            options["reachability_weight"] = args.reachability
        return cls(n, k, **options)
    if arm == "topk":
        return TopK(n, k)
    if arm == "softmax":
        return Softmax(n)
    if arm == "oracle":  # the true support, fixed; only the mixing weights on it are learned
        gate = TopK(n, k)
        with torch.no_grad():
            gate.logits.copy_(torch.where(truth_row > 0, 0.0, -1e4))
        return gate
    raise ValueError(f"unknown arm {arm!r}")


@torch.no_grad()
def evaluate(model: MultiGateMoE, data, test, loss) -> dict:
    model.eval()
    x, y = test
    out = model(x)
    task_weights = torch.stack([w.mean(dim=0) for w in out.weights])  # static gates: identical rows
    matching = match_experts_by_outputs(model.expert_outputs(x).squeeze(-1), data.truth.expert_outputs(x))
    rec = support_recovery(task_weights, data.truth.expert_weights, matching=matching, threshold=1e-3)
    gates = list(model.gates)
    binary = [g.is_binary() for g in gates if isinstance(g, (DSelectK, COMET))]
    hardened_mse = float("nan")
    if binary:
        hard_model, _ = harden(model, x)
        hard_model.eval()
        hardened_mse = float(loss(hard_model(x).outputs, y).mean())
    return {
        "mse": float(loss(out.outputs, y).mean()),
        "hard_mse": hardened_mse,
        "binary": sum(binary) / len(binary) if binary else float("nan"),
        "experts": float((task_weights > 1e-3).sum(dim=1).double().mean()),
        "f1": float(rec.mean_f1),
    }


def free_fit_support(F: torch.Tensor, y: torch.Tensor, k: int) -> tuple[tuple[int, ...], float]:
    """Best size-``k`` support for ``y ≈ c + Σ_{j∈S} b_j F_j`` (free b, intercept): the model class
    with a linear tower per task. Returns the support and its mean squared error on (F, y)."""
    best: tuple[tuple[int, ...], float] = ((), math.inf)
    ones = torch.ones(F.shape[0], 1, dtype=F.dtype)
    for support in itertools.combinations(range(F.shape[1]), k):
        design = torch.cat([F[:, list(support)], ones], dim=1)
        coef = torch.linalg.lstsq(design, y[:, None]).solution
        mse = float(((design @ coef).squeeze(1) - y).pow(2).mean())
        if mse < best[1]:
            best = (support, mse)
    return best


@torch.no_grad()
def diagnose(model: MultiGateMoE, data, train, test) -> dict:
    """Why is a support wrong? Per task: the learned support, the loss-optimal support under the
    learned experts (refit exhaustively over every size-2 support on the training rows: simplex weights
    for identity towers, free weights + intercept for linear towers), and properties of the truth.

    Everything is mapped to true expert ids through the output matching used for F1."""
    model.eval()
    x_tr, y_tr = (t.double() for t in train)
    x_te = test[0]
    F_tr = model.expert_outputs(train[0]).squeeze(-1).double()
    learned_te = model.expert_outputs(x_te).squeeze(-1)
    true_te = data.truth.expert_outputs(x_te)
    matching = match_experts_by_outputs(learned_te, true_te)
    lc = learned_te.double() - learned_te.double().mean(0)
    tc = true_te - true_te.mean(0)
    corr = (lc.T @ tc) / (lc.norm(dim=0)[:, None] * tc.norm(dim=0)[None, :]).clamp_min(1e-12)
    match_corr = {int(matching[a]): abs(float(corr[a, matching[a]])) for a in range(len(matching)) if matching[a] >= 0}
    true_corr = torch.corrcoef(true_te.T)
    linear = not isinstance(model.towers[0], torch.nn.Identity)
    out = model(x_te)
    tasks = []
    ceiling_simplex = torch.zeros(data.truth.expert_weights.shape, dtype=torch.float64)
    ceiling_free = torch.zeros_like(ceiling_simplex)
    to_true = lambda sup: tuple(sorted(int(matching[j]) for j in sup))  # noqa: E731
    for t, w in enumerate(out.weights):
        true_sup = tuple(data.truth.supports[t])
        gate_sup = to_true(torch.nonzero(w.mean(0) > 1e-3).flatten().tolist())
        res = solve_subset(F_tr, y_tr[:, t], 2)
        ceiling_simplex[t, torch.as_tensor(res.support)] = 1.0
        free_sup, _ = free_fit_support(F_tr, y_tr[:, t], 2)
        ceiling_free[t, list(free_sup)] = 1.0
        ceil_sup = to_true(free_sup if linear else res.support)
        a = data.truth.expert_weights[t, list(true_sup)]
        gate = model.gates[t]
        picks, alpha_min, hamming = None, float("nan"), -1
        if isinstance(gate, DSelectK):
            picks = tuple(int(matching[j]) for j in gate.selected_experts().tolist())
            alpha_min = float(torch.softmax(gate.alpha_logits, 0).min())
            learned_of = {int(b): a_ for a_, b in enumerate(matching) if b >= 0}
            hamming = bin(learned_of[true_sup[0]] ^ learned_of[true_sup[1]]).count("1")
        tasks.append({
            "picks": picks, "alpha_min": alpha_min, "hamming": hamming,
            "true": true_sup, "gate": gate_sup, "ceiling": ceil_sup,
            "min_weight": float(a.min()), "pair_corr": abs(float(true_corr[true_sup[0], true_sup[1]])),
            "match_corr_min": min(match_corr.get(j, 0.0) for j in true_sup),
        })
    rec = lambda W: float(support_recovery(W, data.truth.expert_weights, matching=matching).mean_f1)  # noqa: E731
    return {
        "ceiling_f1_simplex": rec(ceiling_simplex),
        "ceiling_f1_free": rec(ceiling_free),
        "match_corr": sorted(match_corr.values()),
        "tasks": tasks,
    }


def explain(rows: list[dict]) -> None:
    """Print the diagnosis over all tasks of all seeds: which supports are wrong and why."""
    tasks = [t for r in rows for t in r["tasks"]]
    right = [t for t in tasks if t["gate"] == t["true"]]
    wrong = [t for t in tasks if t["gate"] != t["true"]]
    gate_not_opt = [t for t in wrong if t["ceiling"] == t["true"]]
    opt_wrong = [t for t in wrong if t["ceiling"] != t["true"]]
    ceil_wrong_all = [t for t in tasks if t["ceiling"] != t["true"]]
    gate_eq_ceil = sum(t["gate"] == t["ceiling"] for t in tasks)
    print(f"{'':8s} diagnosis over {len(tasks)} task gates: {len(right)} exact supports, {len(wrong)} wrong; "
          f"of the wrong, {len(gate_not_opt)} where the loss-optimal support under the learned experts IS the true "
          f"one (the gate did not find it), {len(opt_wrong)} where it is not (the experts); loss-optimal support "
          f"wrong on {len(ceil_wrong_all)} tasks; gate = loss-optimal on {gate_eq_ceil}")
    med = lambda v: statistics.median(v) if v else float("nan")  # noqa: E731
    for name, group in (("exact", right), ("wrong", wrong)):
        print(f"{'':8s}   {name:5s} tasks: median min true weight {med([t['min_weight'] for t in group]):.2f}, "
              f"|corr| of the two true experts {med([t['pair_corr'] for t in group]):.2f}, "
              f"min matching |corr| of their learned experts {med([t['match_corr_min'] for t in group]):.2f}")
    dup = sum(len(set(t["gate"])) < 2 for t in wrong)
    same = sum(t["picks"] is not None and t["picks"][0] == t["picks"][1] for t in wrong)
    alpha_dead = sum(t["alpha_min"] < 1e-3 for t in wrong)
    if any(t["hamming"] >= 0 for t in tasks):
        by_h = {}
        for t in tasks:
            ok = t["gate"] == t["true"]
            r, w = by_h.get(t["hamming"], (0, 0))
            by_h[t["hamming"]] = (r + ok, w + (not ok))
        print(f"{'':8s}   selectors: wrong tasks whose two selectors pick the same expert {same}, with a selector "
              f"weight < 1e-3 {alpha_dead}; exact/wrong by Hamming distance between the codes of the two true "
              f"experts: " + ", ".join(f"{h}: {r}/{w}" for h, (r, w) in sorted(by_h.items())))
    per_seed_ceiling = " ".join(f"{r['ceiling_f1_simplex']:.2f}" for r in rows)
    poorly = sum(t["match_corr_min"] < 0.9 for t in wrong)
    print(f"{'':8s}   wrong tasks using one expert only: {dup}; with a true expert whose learned match has "
          f"|corr| < 0.9: {poorly}; ceiling F1 (simplex / free+intercept) median "
          f"{med([r['ceiling_f1_simplex'] for r in rows]):.2f} / {med([r['ceiling_f1_free'] for r in rows]):.2f}; "
          f"per-seed simplex ceiling: {per_seed_ceiling}")
    all_corr = [c for r in rows for c in r["match_corr"]]
    print(f"{'':8s}   learned-vs-true expert |corr|: median {med(all_corr):.3f}, "
          f"fraction < 0.9: {sum(c < 0.9 for c in all_corr) / max(len(all_corr), 1):.2f}")


def run(arm: str, n: int, seed: int, args: argparse.Namespace, restart: int = 0) -> dict:
    """One model on seed ``seed``'s data; ``restart`` > 0 draws another initialisation and batch order
    (the data and its split stay those of ``seed``)."""
    data = make_synthetic_moe(
        num_samples=6000, input_dim=10, num_experts=n, k=2, num_tasks=args.tasks, hidden=16, noise=0.1, seed=seed
    )
    parts = data.split((0.7, 0.15, 0.15))
    train, val, test = ((p.x, p.y) for p in parts)
    steps = args.epochs * math.ceil(train[0].shape[0] / 128)
    init_seed = seed if restart == 0 else 1_000_003 * (restart + 1) + seed
    torch.manual_seed(init_seed)
    experts = make_experts(n, 10, [16], 1)
    towers = [torch.nn.Linear(1, 1) for _ in range(args.tasks)] if args.towers == "linear" else None
    model = MultiGateMoE(experts, [make_gate(arm, n, 2, args, steps, data.truth.expert_weights[t]) for t in range(args.tasks)], towers)
    loss = multitask_loss(["mse"] * args.tasks)
    trace = []

    def watch(event) -> None:  # per epoch: F1 so far, experts per task, supports changed since last epoch
        if event.kind != "epoch_end":
            return
        with torch.no_grad(), eval_mode(event.model):  # eval: the gates' call counters do not move
            x = test[0]
            weights = torch.stack([w.mean(0) for w in event.model(x).weights])
            matching = match_experts_by_outputs(event.model.expert_outputs(x).squeeze(-1), data.truth.expert_outputs(x))
            f1 = support_recovery(weights, data.truth.expert_weights, matching=matching, threshold=1e-3).mean_f1
            top2 = torch.zeros_like(weights).scatter_(1, weights.topk(2, dim=1).indices, 1.0)
            f1_top2 = support_recovery(top2, data.truth.expert_weights, matching=matching).mean_f1
        supports = weights > 1e-3
        changed = 0 if not trace else int((supports != trace[-1][1]).any(dim=1).sum())
        trace.append((float(f1), supports, float(supports.sum(1).double().mean()), changed, float(f1_top2)))

    fit(
        model,
        train,
        loss,
        val_data=val,
        epochs=args.epochs,
        batch_size=128,
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-2),
        seed=init_seed,
        progress=False,
        restore_best=False,
        callbacks=[watch] if args.trace else None,
    )
    if args.trace:
        print(f"  {arm} n={n} seed {seed} per epoch (F1 / F1 of the top-2 weights / experts per task / supports "
              "changed): " + " ".join(f"{f:.2f}/{f2:.2f}/{e:.1f}/{c}" for f, _, e, c, f2 in trace))
    result = evaluate(model, data, test, loss)
    with torch.no_grad(), eval_mode(model):
        result["val_mse"] = float(loss(model(val[0]).outputs, val[1]).mean())
    if args.diagnose:
        result.update(diagnose(model, data, train, test))
    return result


def best_of_restarts(arm: str, n: int, seed: int, args: argparse.Namespace) -> dict:
    """``--restarts R``: R initialisations on seed ``seed``'s data; the one with the lowest validation MSE
    is scored (test figures and F1 of that one only: selection never looks at the test rows or the truth)."""
    runs = [run(arm, n, seed, args, restart) for restart in range(args.restarts)]
    best = min(runs, key=lambda r: r["val_mse"])
    if args.restarts > 1:
        best["restart_f1"] = [r["f1"] for r in runs]
    return best


def summary(values: list[float]) -> str:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "      -      "
    return f"{statistics.median(finite):6.3f} [{min(finite):.3f}, {max(finite):.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 6])
    parser.add_argument("--arms", nargs="+", default=["dselect", "topk", "softmax"],
                        choices=["dselect", "comet", "topk", "softmax", "oracle"])
    parser.add_argument("--entropy", type=float, default=None, help="DSelect-k entropy weight (default: the gate's)")
    parser.add_argument("--gamma-end", type=float, default=1.0,
                        help="custom annealing of gamma from 1 to this over --schedule (1: the gate's default)")
    parser.add_argument("--no-anneal", action="store_true", help="gamma fixed at 1 (anneal=None)")
    parser.add_argument("--unreachable", choices=["renormalize", "fold"], default=None,
                        help="DSelect-k policy for codes >= n (default: the gate's)")
    parser.add_argument("--reachability", type=float, default=None, help="DSelect-k reachability_weight (default: the gate's)")
    parser.add_argument("--schedule", type=float, nargs=2, default=[0.0, 1.0], metavar=("BEGIN", "STOP"),
                        help="fractions of training where gamma annealing / the entropy ramp run")
    parser.add_argument("--cycles", type=float, nargs="+", default=None, metavar="FRAC",
                        help="re-opened annealing: triples OPEN BEGIN STOP (fractions of the run), gamma back to 1 at "
                             "OPEN, geometric to --gamma-end from BEGIN to STOP; e.g. 0 0.25 0.4 0.55 0.65 0.85")
    parser.add_argument("--entropy-ramp", action="store_true", help="entropy weight 0 until BEGIN, ramped to --entropy at STOP")
    parser.add_argument("--towers", choices=["identity", "linear"], default="identity",
                        help="task towers: identity (the mixture is the prediction) or a scalar affine map per task")
    parser.add_argument("--restarts", type=int, default=1,
                        help="initialisations per seed (same data); the lowest validation MSE is scored")
    parser.add_argument("--trace", action="store_true", help="print F1, experts per task and support changes every epoch")
    parser.add_argument("--diagnose", action="store_true",
                        help="per task: wrong supports, the loss-optimal support under the learned experts, the truth")
    args = parser.parse_args()
    if args.restarts < 1:
        parser.error(f"--restarts must be a positive integer, got {args.restarts}")
    if args.cycles is not None and len(args.cycles) % 3:
        parser.error(f"--cycles takes triples OPEN BEGIN STOP, got {len(args.cycles)} values: {args.cycles}")
    torch.set_num_threads(1)
    if args.entropy is None:
        args.entropy = DSelectK(2, 1).entropy_weight  # the gate's default
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    print(f"static gates, T={args.tasks} tasks, k=2, {args.epochs} epochs, seeds {list(seeds)}, "
          f"DSelect-k/COMET entropy {args.entropy}{' (ramped)' if args.entropy_ramp else ''}, gamma: "
          + ("fixed 1" if args.no_anneal else f"1 -> {args.gamma_end} over {args.schedule}" if args.gamma_end < 1
             else "the gates' default annealing"))
    for n in args.experts:
        print(f"\nn = {n} experts ({'power of two' if n & (n - 1) == 0 else 'not a power of two'}); "
              "median [min, max] over seeds")
        print(f"{'arm':8s} {'test MSE':>22s} {'hardened MSE':>22s} {'binary frac':>22s} "
              f"{'experts/task':>22s} {'support F1':>22s}")
        for arm in args.arms:
            start = time.perf_counter()
            rows = [best_of_restarts(arm, n, seed, args) for seed in seeds]
            cols = [summary([r[key] for r in rows]) for key in ("mse", "hard_mse", "binary", "experts", "f1")]
            print(f"{arm:8s} " + " ".join(f"{c:>22s}" for c in cols) + f"   ({time.perf_counter() - start:.0f} s)")
            per_seed = " ".join(f"{r['f1']:.2f}" for r in rows)
            per_seed_mse = " ".join(f"{r['mse']:.3f}" for r in rows)
            print(f"{'':8s} per-seed F1: {per_seed}; per-seed test MSE: {per_seed_mse}")
            if args.restarts > 1:
                print(f"{'':8s} F1 of every restart (the scored one has the lowest validation MSE): "
                      + "; ".join(" ".join(f"{f:.2f}" for f in r["restart_f1"]) for r in rows))
            if args.diagnose:
                explain(rows)


if __name__ == "__main__":
    main()
