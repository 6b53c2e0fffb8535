"""The ``routing-search`` command: ``demo``, ``study``, ``experiment``, ``tune`` and ``escape``.

A bad value on the command line prints one line, ``routing-search: error: ...``, and exits with status 2
(no traceback). Missing data prints the loader's message (where it looked, what to install), and a data
file that cannot be used (damaged, another format) the loader's message naming it; both exit with status 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import torch

from ..data import DataFileError, DataNotFoundError
from ..experiments import ARMS, DATASETS, GATES, PRESETS, make_config, make_tune_config
from ..experiments.escape import ARMS as ESCAPE_ARMS
from ..experiments.escape import FAMILIES as ESCAPE_FAMILIES
from ..experiments.escape import EscapeConfig, run_escape
from .demo import run_demo
from .experiment import run_experiment_command, run_tune_command
from .study import run_study

__all__ = ["main", "build_parser", "UsageError"]

PROG = "routing-search"


class UsageError(Exception):
    """A bad command-line value (printed as one line, exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``routing-search: error: ...``, and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text!r}")
    return value


def _names(choices: Sequence[str], what: str):  # type: ignore[no-untyped-def]
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(part.strip() for part in text.split(",") if part.strip())
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(map(repr, bad)) or repr(text)}; choose from {', '.join(choices)}")
        return names

    return parse


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs", help="parent directory for outputs (a new sub-directory is created)")
    p.add_argument("--no-progress", action="store_true", help="hide progress output")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``routing-search``."""
    parser = _Parser(
        prog=PROG,
        description="Expert selection in sparse MoE as combinatorial optimisation: demos, studies and experiments.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

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
    _add_common(demo)
    demo.add_argument("--seeds", type=_positive_int, default=3, help="seeds for the bad-initialisation comparison")
    demo.add_argument("--epochs", type=_positive_int, default=20)
    demo.add_argument("--quick", action="store_true", help="a much smaller run (for smoke tests)")

    study = sub.add_parser(
        "study",
        help="report each gate, with and without local search, against the exact optimum",
        description=(
            "Trains each gate on a synthetic instance, with and without local search, then freezes the "
            "experts and compares the learned selection / permutation with the exact optimum "
            "(optimality gap), support recovery and time. Writes report.md and report.json."
        ),
    )
    _add_common(study)
    study.add_argument("--experts", type=_positive_int, default=6, help="number of experts, 2 to 8 (exact permutation solves)")
    study.add_argument("--k", type=_positive_int, default=2)
    study.add_argument("--tasks", type=_positive_int, default=3)
    study.add_argument("--epochs", type=_positive_int, default=15)
    study.add_argument("--seed", type=_non_negative_int, default=0)
    study.add_argument("--quick", action="store_true", help="a much smaller run (for smoke tests)")

    exp = sub.add_parser(
        "experiment",
        help="gates x arms x seeds on a dataset, with the random-permutation control and paired reports",
        description=(
            "Trains a multi-gate MoE for every gate, arm and seed (each seed fixes the data, the "
            "initialisation and the batch order of every arm) and writes report.md, report.json and plots: "
            "mean +- standard error per arm, gate and metric, and paired per-seed comparisons of each arm "
            "against 'sgd' and against 'random' (one random permutation before training: the control)."
        ),
    )
    _add_run_options(exp)
    exp.add_argument("--seeds", type=_positive_int, default=5, help="number of seeds (0 .. N-1)")

    tune = sub.add_parser(
        "tune",
        help="tuning budget: random-search trials with and without local search, best-of-N curves",
        description=(
            "Random search of N trials per arm over the grid (learning rate, batch size, entropy weight, k, "
            "smooth-step gamma, search schedule); expected best of N from the order statistics of all trials "
            "and the number of trials needed to reach a target with a stated probability."
        ),
    )
    _add_run_options(tune, default_arms=("sgd", "search"))
    tune.add_argument("--trials", type=_positive_int, default=20, help="trials per arm (at least 2)")
    tune.add_argument("--seed", type=_non_negative_int, default=0)
    tune.add_argument("--target", type=float, default=None, help="test value to reach (default: the top 20 %% of pooled trials)")
    tune.add_argument("--probability", type=_positive_float, default=0.9, help="probability of reaching the target, in (0, 1)")
    tune.add_argument("--max-train", type=_positive_int, default=None,
                      help="at most this many training rows per trial (movielens, multi-mnist, multi-fashion; default: the preset's)")

    escape = sub.add_parser(
        "escape",
        help="escaping bad starts: search vs one random permutation vs SGD, paired by seed",
        description=(
            "Bad-start families on synthetic data with a known truth (collapsed DSelect-k / COMET, Top-k with "
            "a logit margin, misassigned Hash buckets, experts trained for another permutation); every arm "
            "paired by seed against 'sgd' and 'random'. Writes report.md and report.json."
        ),
    )
    escape.add_argument("--out", default="runs", help="parent directory for outputs (a new sub-directory is created)")
    escape.add_argument("--families", type=_names(ESCAPE_FAMILIES, "family"), default=ESCAPE_FAMILIES,
                        help=f"comma-separated, from {', '.join(ESCAPE_FAMILIES)}")
    # The same default arms as EscapeConfig (sgd, random, search, refit): the ablation 'refit_route' and the
    # costly 'lookahead' run only when asked for, as with run_escape(EscapeConfig()).
    escape_arms = EscapeConfig().arms
    escape.add_argument("--arms", type=_names(ESCAPE_ARMS, "arm"), default=escape_arms,
                        help=f"comma-separated, from {', '.join(ESCAPE_ARMS)} (default: {','.join(escape_arms)})")
    escape.add_argument("--seeds", type=_positive_int, default=10, help="number of seeds (0 .. N-1)")
    escape.add_argument("--epochs", type=_positive_int, default=None)
    escape.add_argument("--samples", type=_positive_int, default=None, help="rows of each synthetic instance")
    escape.add_argument("--curve", action="store_true",
                        help="also record every arm's test loss after its start and every epoch (steps to sgd's final loss)")
    escape.add_argument("--no-progress", action="store_true", help="hide progress output")
    return parser


def _add_run_options(p: argparse.ArgumentParser, *, default_arms: tuple[str, ...] | None = None) -> None:
    p.add_argument("dataset", choices=DATASETS, help="dataset")
    _add_common(p)
    p.add_argument("--gates", type=_names(GATES, "gate"), default=None, help=f"comma-separated, from {', '.join(GATES)}")
    p.add_argument("--arms", type=_names(ARMS, "arm"), default=default_arms, help=f"comma-separated, from {', '.join(ARMS)}")
    p.add_argument("--preset", choices=PRESETS, default="cpu", help="cpu: minutes on two cores; paper: the papers' sizes (GPU)")
    p.add_argument("--epochs", type=_positive_int, default=None, help="override the preset's epochs")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--data-path", default=None, help="the dataset's file or directory (default: the loader's place)")
    p.add_argument("--threads", type=_positive_int, default=1, help="torch CPU threads of this process")
    p.add_argument("--no-plots", action="store_true", help="write the reports without plots")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    over: dict[str, Any] = {"device": args.device, "threads": args.threads, "progress": not args.no_progress}
    if args.gates is not None:
        over["gates"] = args.gates
    if args.arms is not None:
        over["arms"] = args.arms
    if args.epochs is not None:
        over["train"] = {"epochs": args.epochs}
    if args.data_path is not None:
        over["data"] = {"path": args.data_path}
    return over


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {device!r}: the runs train on cpu, cuda[:N] or mps, not on {dev.type!r} devices")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device!r}: CUDA is not available on this machine (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 .. "
                         f"cuda:{torch.cuda.device_count() - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device!r}: MPS is not available on this machine (use --device cpu)")


def _configure(args: argparse.Namespace) -> Any:
    """Build and check the command's typed configuration; bad values raise :class:`UsageError`."""
    try:
        if args.command in ("experiment", "tune"):
            _check_device(args.device)
            if args.command == "experiment":
                return make_config(args.dataset, args.preset, seeds=args.seeds, **_overrides(args))
            tune_over = _overrides(args)
            if args.max_train is not None:
                if args.dataset in ("synthetic", "keyed"):
                    raise UsageError(f"--max-train limits the rows of a loaded data set; {args.dataset!r} is generated "
                                     "with the preset's number of rows (use movielens, multi-mnist or multi-fashion)")
                tune_over["data"] = {**tune_over.get("data", {}), "max_train": args.max_train}
            return make_tune_config(args.dataset, args.preset, trials=args.trials, seed=args.seed, target=args.target,
                                    probability=args.probability, **tune_over)
        if args.command == "escape":
            extra: dict[str, Any] = {}
            if args.epochs is not None:
                extra["epochs"] = args.epochs
            if args.samples is not None:
                extra["num_samples"] = args.samples
            return EscapeConfig(families=args.families, arms=args.arms, seeds=tuple(range(args.seeds)), out=args.out,
                                curve=args.curve, **extra)
        if args.command == "study":
            if not 2 <= args.experts <= 8:
                raise UsageError(f"--experts must be in [2, 8] for exact permutation solves, got {args.experts}")
            if args.k > args.experts:
                raise UsageError(f"--k must be in [1, --experts={args.experts}], got {args.k}")
            if args.tasks > 128:
                raise UsageError(f"--tasks must be in [1, 128] (the synthetic instance's task count), got {args.tasks}")
        return None
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``routing-search`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = _configure(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    progress = not args.no_progress
    try:
        if args.command == "demo":
            run_demo(out=args.out, seeds=args.seeds, epochs=args.epochs, quick=args.quick, progress=progress)
        elif args.command == "study":
            run_study(out=args.out, num_experts=args.experts, k=args.k, num_tasks=args.tasks, epochs=args.epochs,
                      seed=args.seed, quick=args.quick, progress=progress)
        elif args.command == "experiment":
            run_experiment_command(config, out=args.out, plots=not args.no_plots)
        elif args.command == "tune":
            run_tune_command(config, out=args.out, plots=not args.no_plots)
        elif args.command == "escape":
            result = run_escape(config, progress=progress)
            print(f"{PROG} escape: report in {result['run_dir']}")
    except (DataNotFoundError, DataFileError) as exc:  # missing data, or a data file that cannot be used
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except (FileExistsError, NotADirectoryError, PermissionError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except FloatingPointError as exc:  # a run diverged (NaN/inf loss): its message names the run, epoch and step
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
