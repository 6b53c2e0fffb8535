"""Do static DSelect-k gates reach k experts, and do they recover the true supports? (issue 8, item 1)

    python benchmarks/sparsity_study.py [--seeds 10] [--epochs 30] [--tasks 16] [--experts 8 6]
                                        [--arms dselect topk softmax] [--entropy 1e-2] [--gamma-end 1.0]

Setting (the demo's): data from :func:`routing_search.make_synthetic_moe` (d = 10, 6000 rows split
70/15/15, hidden 16, noise 0.1, k = 2 true experts per task), a multi-gate MoE with one *static*
gate per task over ``n`` MLP experts 10 -> 16 -> 1, Adam 1e-2, batch 128, trained with
:func:`routing_search.fit`. Arms (each seed fixes data, initialisation and batches for every arm):

* ``dselect`` / ``comet``: static ``DSelectK(n, k=2)`` / ``COMET(n, k=2)`` with their defaults
  (``gamma`` annealed by ``GammaAnnealing()``: fixed for 500 steps, down to 2e-3 at step 800), or
  ``--no-anneal`` (gamma fixed at 1), or a custom annealing to ``--gamma-end`` over the fractions
  ``--schedule`` of the run; entropy weight ``--entropy`` (default: the gate's, 0), optionally ramped;
* ``topk``: static ``TopK(n, 2)``;
* ``softmax``: static ``Softmax(n)``, the dense control.

Per arm and family: the median (and min / max) over seeds of the test MSE (summed over tasks, as
trained), the test MSE after hardening (``routing_search.analysis.harden``), the fraction of task
gates whose codes are binary at the end, the mean number of experts per task (weight > 1e-3) and
the support F1 against the truth. Learned experts are matched to true experts by the correlation of
their outputs on the test inputs (``match_experts_by_outputs``), not by the supports being scored.
One torch thread; results are printed, nothing is written.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from routing_search import fit
from routing_search.data import make_synthetic_moe
from routing_search.analysis import harden
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


def ramp(value: float, steps: int, begin: float, stop: float):
    """``weight(calls)``: 0 until ``begin * steps``, linear to ``value`` at ``stop * steps``, then ``value``."""

    def weight(calls: int) -> float:
        frac = (calls / max(steps, 1) - begin) / max(stop - begin, 1e-9)
        return value * min(max(frac, 0.0), 1.0)

    return weight


def make_gate(arm: str, n: int, k: int, args: argparse.Namespace, steps: int) -> torch.nn.Module:
    if arm in ("dselect", "comet"):
        cls = DSelectK if arm == "dselect" else COMET
        options: dict = {"entropy_weight": args.entropy}
        begin, stop = args.schedule
        if args.gamma_end < 1.0:  # a custom annealing over fractions of this run
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


def run(arm: str, n: int, seed: int, args: argparse.Namespace) -> dict:
    data = make_synthetic_moe(
        num_samples=6000, input_dim=10, num_experts=n, k=2, num_tasks=args.tasks, hidden=16, noise=0.1, seed=seed
    )
    parts = data.split((0.7, 0.15, 0.15))
    train, val, test = ((p.x, p.y) for p in parts)
    steps = args.epochs * math.ceil(train[0].shape[0] / 128)
    torch.manual_seed(seed)
    experts = make_experts(n, 10, [16], 1)
    model = MultiGateMoE(experts, [make_gate(arm, n, 2, args, steps) for _ in range(args.tasks)])
    loss = multitask_loss(["mse"] * args.tasks)
    fit(
        model,
        train,
        loss,
        val_data=val,
        epochs=args.epochs,
        batch_size=128,
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-2),
        seed=seed,
        progress=False,
        restore_best=False,
    )
    return evaluate(model, data, test, loss)


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
    parser.add_argument("--arms", nargs="+", default=["dselect", "topk", "softmax"])
    parser.add_argument("--entropy", type=float, default=None, help="DSelect-k entropy weight (default: the gate's)")
    parser.add_argument("--gamma-end", type=float, default=1.0,
                        help="custom annealing of gamma from 1 to this over --schedule (1: the gate's default)")
    parser.add_argument("--no-anneal", action="store_true", help="gamma fixed at 1 (anneal=None)")
    parser.add_argument("--unreachable", choices=["renormalize", "fold"], default=None,
                        help="DSelect-k policy for codes >= n (default: the gate's)")
    parser.add_argument("--reachability", type=float, default=None, help="DSelect-k reachability_weight (default: the gate's)")
    parser.add_argument("--schedule", type=float, nargs=2, default=[0.0, 1.0], metavar=("BEGIN", "STOP"),
                        help="fractions of training where gamma annealing / the entropy ramp run")
    parser.add_argument("--entropy-ramp", action="store_true", help="entropy weight 0 until BEGIN, ramped to --entropy at STOP")
    args = parser.parse_args()
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
            rows = [run(arm, n, seed, args) for seed in seeds]
            cols = [summary([r[key] for r in rows]) for key in ("mse", "hard_mse", "binary", "experts", "f1")]
            print(f"{arm:8s} " + " ".join(f"{c:>22s}" for c in cols) + f"   ({time.perf_counter() - start:.0f} s)")
            per_seed = " ".join(f"{r['f1']:.2f}" for r in rows)
            per_seed_mse = " ".join(f"{r['mse']:.3f}" for r in rows)
            print(f"{'':8s} per-seed F1: {per_seed}; per-seed test MSE: {per_seed_mse}")


if __name__ == "__main__":
    main()
