"""The ``routing-search`` command: ``demo`` and ``study``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``routing-search`` (sub-commands ``demo`` and ``study``)."""
    parser = argparse.ArgumentParser(
        prog="routing-search",
        description="Expert selection in sparse MoE as combinatorial optimisation: demos and studies.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="train multi-gate MoEs on synthetic data with several gates, then escape a collapsed router",
        description=(
            "Part 1 trains a multi-gate MoE with each gate on synthetic data drawn from a known MoE and "
            "prints test loss, experts per task and support recovery. Part 2 starts every task's gate "
            "collapsed onto the same experts and compares first-order training alone, alternated with "
            "local search, and learned Sinkhorn permutations over several seeds."
        ),
    )
    demo.add_argument("--out", default="runs", help="parent directory for outputs (a new sub-directory is created)")
    demo.add_argument("--seeds", type=int, default=3, help="seeds for the bad-initialisation comparison")
    demo.add_argument("--epochs", type=int, default=30)
    demo.add_argument("--quick", action="store_true", help="a much smaller run (for smoke tests)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")

    study = sub.add_parser(
        "study",
        help="report each gate, with and without local search, against the exact optimum",
        description=(
            "Trains each gate on a synthetic instance, with and without local search, then freezes the "
            "experts and compares the learned selection / permutation with the exact optimum "
            "(optimality gap), support recovery and time. Writes report.md and report.json."
        ),
    )
    study.add_argument("--out", default="runs", help="parent directory for outputs (a new sub-directory is created)")
    study.add_argument("--experts", type=int, default=6, help="number of experts (exact permutation solves need n <= 8)")
    study.add_argument("--k", type=int, default=2)
    study.add_argument("--tasks", type=int, default=3)
    study.add_argument("--epochs", type=int, default=15)
    study.add_argument("--seed", type=int, default=0)
    study.add_argument("--quick", action="store_true", help="a much smaller run (for smoke tests)")
    study.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``routing-search`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(out=args.out, seeds=args.seeds, epochs=args.epochs, quick=args.quick, progress=not args.no_progress)
    elif args.command == "study":
        from .study import run_study

        run_study(
            out=args.out,
            num_experts=args.experts,
            k=args.k,
            num_tasks=args.tasks,
            epochs=args.epochs,
            seed=args.seed,
            quick=args.quick,
            progress=not args.no_progress,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
