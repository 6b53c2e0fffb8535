"""Benchmark the exact solvers: branch and bound vs exhaustive enumeration, side by side.

Subset problem (squared loss, B=512, u=4): n=16, k=2 and n=24, k=3.
Permutation problem (static gate, squared loss, B=512, u=4): n=8 and n=10 (10! = 3.6M permutations,
vectorised in blocks; skip with --skip-brute-n10).

Instances are planted: targets come from a known sparse mixture / permutation plus Gaussian noise.
Prints a table; writes no files. Losses are reported in the units of ``loss="squared"`` (the mean squared
error of ``routing_search.losses.mse_loss``).

    python -m benchmarks.bench_exact [--seed 0] [--noise 0.5] [--skip-brute-n10]   (from the repo root,
    or `python benchmarks/bench_exact.py` once the package is installed: pip install -e .)
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from routing_search.exact import solve_permutation, solve_subset


def _timed(fn, *args, **kwargs) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def _subset_instance(rng: np.random.Generator, n: int, k: int, B: int, u: int, noise: float):
    F = rng.normal(size=(B, n, u))
    w = np.zeros(n)
    w[rng.choice(n, k, replace=False)] = rng.dirichlet(np.ones(k))
    y = np.einsum("i,biu->bu", w, F) + noise * rng.normal(size=(B, u))
    return F, y


def _permutation_instance(rng: np.random.Generator, n: int, B: int, u: int, noise: float):
    g = rng.dirichlet(np.ones(n))
    F = rng.normal(size=(B, n, u))
    y = np.einsum("i,biu->bu", g, F[:, rng.permutation(n)]) + noise * rng.normal(size=(B, u))
    return g, F, y


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="instance seed (default 0)")
    parser.add_argument("--noise", type=float, default=0.5, help="target noise std (default 0.5)")
    parser.add_argument("--batch", type=int, default=512, help="examples B (default 512)")
    parser.add_argument("--width", type=int, default=4, help="output width u (default 4)")
    parser.add_argument(
        "--skip-brute-n10", action="store_true", help="skip the 10! exhaustive permutation run"
    )
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    B, u = args.batch, args.width

    header = f"{'problem':<26}{'method':<18}{'time [s]':>10}{'nodes':>10}{'nfev':>10}{'fun':>14}{'gap':>10}"
    print(header)
    print("-" * len(header))
    notes = []

    def row(problem: str, method: str, res, dt: float) -> None:
        print(
            f"{problem:<26}{method:<18}{dt:>10.3f}{res.nodes_explored:>10d}{res.nfev:>10d}"
            f"{res.fun:>14.8f}{res.gap:>10.1e}"
        )

    for n, k in [(16, 2), (24, 3)]:
        F, y = _subset_instance(rng, n, k, B, u, args.noise)
        name = f"subset n={n} k={k}"
        enum, t_enum = _timed(solve_subset, F, y, k, method="exhaustive")
        bnb, t_bnb = _timed(solve_subset, F, y, k, method="branch_and_bound")
        row(name, "exhaustive", enum, t_enum)
        row(name, "branch_and_bound", bnb, t_bnb)
        agree = abs(enum.fun - bnb.fun) <= 1e-9 * max(1.0, abs(enum.fun))
        notes.append(f"{name}: speed-up exhaustive/B&B = {t_enum / t_bnb:.1f}x, optima agree: {agree}")

    for n in (8, 10):
        g, F, y = _permutation_instance(rng, n, B, u, args.noise)
        name = f"permutation n={n} static"
        bnb, t_bnb = _timed(solve_permutation, g, F, y, method="branch_and_bound")
        if n == 10 and args.skip_brute_n10:
            row(name, "branch_and_bound", bnb, t_bnb)
            notes.append(f"{name}: exhaustive enumeration skipped (--skip-brute-n10)")
            continue
        brute, t_brute = _timed(solve_permutation, g, F, y, method="exhaustive")
        row(name, "exhaustive", brute, t_brute)
        row(name, "branch_and_bound", bnb, t_bnb)
        agree = abs(brute.fun - bnb.fun) <= 1e-9 * max(1.0, abs(brute.fun))
        notes.append(f"{name}: speed-up exhaustive/B&B = {t_brute / t_bnb:.1f}x, optima agree: {agree}")

    print()
    for line in notes:
        print(line)


if __name__ == "__main__":
    main()
