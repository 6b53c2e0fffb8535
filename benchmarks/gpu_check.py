"""Device check for a lent GPU machine: the CUDA paths against the CPU results, then GPU figures.

    python benchmarks/gpu_check.py                 # on a CUDA machine: checks, then benchmarks (< 5 min on an H100)
    python benchmarks/gpu_check.py --no-bench      # checks only
    python benchmarks/gpu_check.py --device cpu    # runs every check CPU-against-CPU (tests the script itself)

Checks (float64, compared with ``torch.allclose`` / equal permutations): every gate inside an ``MoE``
with sparse and dense dispatch; ``local_search`` (swap, insertion, ILS with a seed) on a multi-gate MoE;
``fit`` with search interrupted after one epoch and resumed, against an uninterrupted CPU run; ``harden``
of DSelect-k / COMET models (outputs and certificate); the exact solvers (``solve_permutation``,
``solve_subset``, ``permutation_loss``) given CUDA tensors instead of numpy arrays. Every check prints
one line; the exit status is 1 when any check failed (a mismatch or an exception), else 0.

Benchmarks (CUDA only, medians of repeats after a warm-up, synchronised): gate forward throughput in
rows/s, MoE sparse vs dense dispatch time (ratio), and a swap search's wall time on CPU and GPU (ratio).

Without a CUDA device the script says so and exits 0 at once.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from routing_search.analysis import harden
from routing_search.exact import permutation_loss, solve_permutation, solve_subset
from routing_search.gates import COMET, DSelectK, GumbelSoftmax, Hash, Softmax, TaskAware, TopK
from routing_search.layers import MoE, MultiGateMoE, make_experts
from routing_search.search import local_search
from routing_search.training import SearchSchedule, fit

D, U, N = 6, 3, 6
RTOL, ATOL = 1e-9, 1e-10


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gates() -> dict[str, Callable[[], nn.Module]]:
    """Every built-in gate (per-example and static forms) over ``N`` experts for inputs of width ``D``."""
    return {
        "softmax": lambda: Softmax(N, D),
        "softmax_static": lambda: Softmax(N),
        "topk1": lambda: TopK(N, 1, D),
        "topk2": lambda: TopK(N, 2, D),
        "topk2_static": lambda: TopK(N, 2),
        "hash": lambda: Hash(N, num_keys=3 * N, seed=0),
        "gumbel": lambda: GumbelSoftmax(N, D),
        "dselect": lambda: DSelectK(N, 2, D),
        "dselect_static": lambda: DSelectK(N, 2),
        "comet": lambda: COMET(N, 2, D),
        "comet_static": lambda: COMET(N, 2),
        "task_aware": lambda: TaskAware.per_task([Softmax(N, D), TopK(N, 2, D)]),
    }


def close(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, float]:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return bool(torch.allclose(a, b, rtol=RTOL, atol=ATOL)), float((a - b).abs().max()) if a.numel() else 0.0


def mse_rows(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((pred - y) ** 2).mean(dim=1)


def two_task_rows(preds: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(preds[0].squeeze(1), y[:, 0], reduction="none") + (preds[1].squeeze(1) - y[:, 1]) ** 2


def multigate(seed: int) -> MultiGateMoE:
    torch.manual_seed(seed)
    model = MultiGateMoE(make_experts(N, D, [8], U, generator=gen(seed)), [TopK(N, 2, D), COMET(N, 2, D)],
                         [nn.Linear(U, 1), nn.Linear(U, 1)], share_permutation=False).double()
    rng = np.random.default_rng(seed)
    for perm in model.permutations:
        perm.set(rng.permutation(N))
    return model


def two_task_data(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(rows, D, generator=gen(seed), dtype=torch.float64)
    teacher = multigate(seed + 50)
    with torch.no_grad():
        out = teacher(x).outputs
    return x, torch.stack([(out[0][:, 0] > 0).double(), out[1][:, 0]], dim=1)


# ------------------------------------------------------------------------------------------------ checks
def check_gates(device: torch.device) -> list[tuple[str, bool, str]]:
    lines = []
    x = torch.randn(257, D, generator=gen(1), dtype=torch.float64)
    extras = {"hash": {"key": torch.randint(0, 3 * N, (257,), generator=gen(2))},
              "task_aware": {"task": torch.randint(0, 2, (257,), generator=gen(3))}}
    for name, make in gates().items():
        for dispatch in ("sparse", "dense"):
            torch.manual_seed(0)
            cpu = MoE(make_experts(N, D, [8], U, generator=gen(4)), make(), dispatch=dispatch).double().eval()
            dev = copy.deepcopy(cpu).to(device)
            kw = extras.get(name, {})
            with torch.no_grad():
                want = cpu(x, **kw)
                got = dev(x.to(device), **{k: v.to(device) for k, v in kw.items()})
            ok_out, diff = close(got.output, want.output)
            ok_w, _ = close(got.weights, want.weights)
            ok_l, _ = close(got.loss, want.loss)
            lines.append((f"gate {name:15s} dispatch={dispatch:6s}", ok_out and ok_w and ok_l, f"max |diff| {diff:.1e}"))
    return lines


def check_search(device: torch.device) -> list[tuple[str, bool, str]]:
    lines = []
    x, y = two_task_data(300, 7)
    for method, options in (("swap", {}), ("insertion", {"max_iter": 8}), ("ils", {"perturbations": 3, "rng": 5})):
        cpu, dev = multigate(1), multigate(1).to(device)
        a = local_search(cpu, (x, y), two_task_rows, method, **options)
        b = local_search(dev, (x.to(device), y.to(device)), two_task_rows, method, **options)
        same = all(np.array_equal(p, q) for p, q in zip(a.x, b.x)) and len(a.moves) == len(b.moves)
        ok = same and abs(a.fun - b.fun) <= RTOL * abs(a.fun) + ATOL
        lines.append((f"local_search {method}", ok, f"fun {a.fun:.6f} vs {b.fun:.6f}, {len(a.moves)} vs {len(b.moves)} moves"))
    return lines


def check_fit_resume(device: torch.device) -> list[tuple[str, bool, str]]:
    x, y = two_task_data(192, 8)
    xv, yv = two_task_data(96, 9)
    kwargs: dict[str, Any] = dict(val_data=(xv, yv), batch_size=32, gate_loss_weight=0.0, progress=False, seed=0,
                                  optimizer=lambda p: torch.optim.SGD(p, lr=0.05), search=SearchSchedule(every_epochs=1))
    with warnings.catch_warnings():  # two epochs leave the COMET gate non-binary: fit warns, as it should
        warnings.simplefilter("ignore", RuntimeWarning)
        reference = fit(multigate(2), (x, y), two_task_rows, epochs=2, device="cpu", **kwargs)
        with tempfile.TemporaryDirectory() as tmp:
            # Interrupted after the first epoch of the same 2-epoch run (its budget, hence the selector gates'
            # budget-fitted gamma annealing, is the reference's), then resumed.
            fit(multigate(2), (x, y), two_task_rows, epochs=2, device=device, checkpoint_dir=tmp,
                callbacks=[lambda event: event.request_stop("interrupted") if event.epoch == 0 else None], **kwargs)
            resumed = fit(multigate(2), (x, y), two_task_rows, epochs=2, device=device, checkpoint_dir=tmp, resume=True, **kwargs)
    a = torch.cat([p.detach().reshape(-1) for p in reference.model.parameters()])
    b = torch.cat([p.detach().reshape(-1).cpu() for p in resumed.model.parameters()])
    # Training amplifies the last-bit differences of GPU reductions a little: a looser tolerance than the checks above.
    ok_params = bool(torch.allclose(a, b, rtol=1e-6, atol=1e-8))
    same_perms = reference.history.permutations == resumed.history.permutations
    return [("fit + search, resumed on the device vs uninterrupted on CPU", ok_params and same_perms,
             f"max |param diff| {float((a - b).abs().max()):.1e}, permutations {'equal' if same_perms else 'DIFFER'}")]


def check_harden(device: torch.device) -> list[tuple[str, bool, str]]:
    lines = []
    x = torch.randn(128, D, generator=gen(11), dtype=torch.float64)
    for name, make in (("dselect", lambda: DSelectK(N, 2, D)), ("comet_static", lambda: COMET(N, 2))):
        torch.manual_seed(3)
        cpu = MoE(make_experts(N, D, [8], U, generator=gen(12)), make()).double().eval()
        dev = copy.deepcopy(cpu).to(device)
        hard_cpu, cert_cpu = harden(cpu, x)
        hard_dev, cert_dev = harden(dev, x.to(device))
        with torch.no_grad():
            ok, diff = close(hard_dev(x.to(device)).output, hard_cpu(x).output)
        same_cert = cert_cpu.num_fractional_entries == cert_dev.num_fractional_entries and cert_cpu.agree == cert_dev.agree
        lines.append((f"harden {name}", ok and same_cert, f"max |diff| {diff:.1e}, fractional entries {cert_cpu.num_fractional_entries} vs {cert_dev.num_fractional_entries}"))
    return lines


def check_exact(device: torch.device) -> list[tuple[str, bool, str]]:
    lines = []
    rng = np.random.default_rng(0)
    G = rng.dirichlet(np.ones(5), size=40)
    Fx = rng.normal(size=(40, 5, 2))
    yv = rng.normal(size=(40, 2))
    t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
    a = solve_permutation(G, Fx, yv, method="exhaustive")
    b = solve_permutation(t(G), t(Fx), t(yv), method="exhaustive")
    lines.append(("solve_permutation with device tensors", list(a.x) == list(b.x) and abs(a.fun - b.fun) <= 1e-12, f"fun {a.fun:.8f} vs {b.fun:.8f}"))
    pa = permutation_loss(a.x, G, Fx, yv)
    pb = permutation_loss(a.x, t(G), t(Fx), t(yv))
    lines.append(("permutation_loss with device tensors", abs(pa - pb) <= 1e-12, f"{pa:.8f} vs {pb:.8f}"))
    c = solve_subset(Fx, yv, 2)
    d = solve_subset(t(Fx), t(yv), 2)
    lines.append(("solve_subset with device tensors", np.allclose(np.asarray(c.x), np.asarray(d.x), atol=1e-8) and abs(c.fun - d.fun) <= 1e-9,
                  f"fun {c.fun:.8f} vs {d.fun:.8f}"))
    return lines


CHECKS = (check_gates, check_search, check_fit_resume, check_harden, check_exact)


# -------------------------------------------------------------------------------------------- benchmarks
def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after one warm-up (synchronised on CUDA)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def benchmarks(device: torch.device) -> None:
    rows, d, n = 65536, 256, 64
    x = torch.randn(rows, d, device=device)
    print(f"\ngate forward throughput on {device} ({rows} rows, d={d}, {n} experts, float32, median of 20):")
    for name, make in (("softmax", lambda: Softmax(n, d)), ("topk2", lambda: TopK(n, 2, d)), ("gumbel", lambda: GumbelSoftmax(n, d)),
                       ("dselect k=2", lambda: DSelectK(n, 2, d)), ("comet k=2", lambda: COMET(n, 2, d))):
        gate = make().to(device).eval()
        with torch.no_grad():
            seconds = timed(lambda: gate(x), device, 20)
        print(f"  {name:12s} {rows / seconds / 1e6:8.1f} M rows/s")
    print(f"\nMoE forward+backward, sparse vs dense dispatch on {device} (16384 rows, d=256, 64 experts of [512], Top-2, median of 10):")
    xs = torch.randn(16384, d, device=device)
    for k in (1, 2, 8):
        times = {}
        for dispatch in ("sparse", "dense"):
            torch.manual_seed(0)
            moe = MoE(make_experts(64, d, [512], d), TopK(64, k, d), dispatch=dispatch).to(device)

            def step() -> None:
                moe.zero_grad(set_to_none=True)
                moe(xs).output.square().mean().backward()

            times[dispatch] = timed(step, device, 10)
        print(f"  top-{k}: sparse {times['sparse'] * 1e3:7.2f} ms, dense {times['dense'] * 1e3:7.2f} ms, dense/sparse {times['dense'] / times['sparse']:5.2f}")
    print("\nswap search (16 experts, 2 tasks, [64]-hidden experts), wall seconds, median of 3:")
    for rows_s in (2048, 16384):
        xq = torch.randn(rows_s, 32, generator=gen(0))
        torch.manual_seed(0)
        base = MultiGateMoE(make_experts(16, 32, [64], 16), [TopK(16, 2, 32), TopK(16, 2, 32)], [nn.Linear(16, 1), nn.Linear(16, 1)],
                            share_permutation=False)
        with torch.no_grad():
            out = base(xq).outputs
        yq = torch.stack([(out[0][:, 0] > 0).float(), out[1][:, 0]], dim=1)
        rng = np.random.default_rng(0)
        perms = [rng.permutation(16) for _ in range(2)]

        def search(dev: torch.device) -> None:
            model = copy.deepcopy(base).to(dev)
            for perm, p in zip(model.permutations, perms):
                perm.set(p)
            local_search(model, (xq.to(dev), yq.to(dev)), two_task_rows, "swap")

        cpu_s = timed(lambda: search(torch.device("cpu")), torch.device("cpu"), 3)
        dev_s = timed(lambda: search(device), device, 3)
        print(f"  {rows_s:6d} rows: CPU {cpu_s:6.3f} s, {device} {dev_s:6.3f} s, CPU/{device.type} {cpu_s / dev_s:5.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="'cuda' (default), 'cuda:N', or 'cpu' to check the script itself")
    parser.add_argument("--no-bench", action="store_true", help="run the checks only")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing to check.")
        return 0
    if device.type == "cpu":
        torch.set_num_threads(1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu_check on {device} ({name}), torch {torch.__version__}: CUDA paths against the CPU results")
    failed = 0
    start = time.perf_counter()
    for check in CHECKS:
        try:
            lines = check(device)
        except Exception:  # an exception is a failed check: report it and go on with the others
            lines = [(check.__name__, False, "raised:\n" + traceback.format_exc())]
        for label, ok, detail in lines:
            failed += not ok
            print(f"  [{'ok' if ok else 'FAIL'}] {label}: {detail}")
    print(f"{failed} check(s) failed ({time.perf_counter() - start:.1f} s)")
    if device.type == "cuda" and not args.no_bench:
        benchmarks(device)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
