"""Gate throughput (forward + backward) and sparse vs dense MoE inference, side by side in one run.

    python benchmarks/bench_gates.py [--device cuda] [--repeats 20]

Every gate at n = 16, k = 2, input 128, batch 4096; then MoE inference with binary gates
(MLP experts 128 → 256 → 64): sparse dispatch vs the dense path on the same modules and inputs.
The speed-up limit of sparse dispatch is n / k = 8×.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from routing_search.analysis import harden
from routing_search.gates import COMET, DSelectK, GumbelSoftmax, Hash, Softmax, TaskAware, TopK
from routing_search.layers import MoE, make_experts


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median seconds per call after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def gate_table(device: torch.device, repeats: int, n: int, k: int, d: int, batch: int) -> None:
    """Forward + backward of every gate, interleaved round by round, with the ratio to TopK.

    Each round runs every gate once; a gate's ratio is the median over rounds of its time divided by
    TopK's time in the same round, so load on a shared machine affects both alike. On the CPU the
    clock is the process CPU time (the wall clock on CUDA).
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, d, generator=gen).to(device)
    keys = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    tasks = torch.randint(0, 4, (batch,), generator=gen).to(device)
    gates = {
        "Softmax": Softmax(num_experts=n, input_dim=d),
        "TopK": TopK(num_experts=n, k=k, input_dim=d),
        "TopK(noisy,balance)": TopK(num_experts=n, k=k, input_dim=d, noisy=True, load_balance_weight=1e-2),
        "Hash": Hash(num_experts=n, num_keys=1000),
        "GumbelSoftmax(static)": GumbelSoftmax(num_experts=n),
        "DSelectK": DSelectK(num_experts=n, k=k, input_dim=d, entropy_weight=1e-3),
        "DSelectK(static)": DSelectK(num_experts=n, k=k, entropy_weight=1e-3),
        "COMET": COMET(num_experts=n, k=k, input_dim=d, entropy_weight=1e-3),
        "TaskAware(TopK x4)": TaskAware(gates=[TopK(num_experts=n, k=k, input_dim=d) for _ in range(4)]),
    }
    clock = time.perf_counter if device.type == "cuda" else time.process_time

    def make_step(gate: torch.nn.Module) -> Callable[[], None]:
        gate = gate.to(device).train()
        params = [p for p in gate.parameters() if p.requires_grad]

        def step() -> None:
            out = gate(x, task=tasks, key=keys)
            total = (out.weights * torch.arange(n, device=device)).sum() + out.loss
            if params:
                total.backward()
                for p in params:
                    p.grad = None

        return step

    steps = {name: make_step(gate) for name, gate in gates.items()}
    times: dict[str, list[float]] = {name: [] for name in gates}
    for round_ in range(repeats + 2):  # two warm-up rounds
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = clock()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_ >= 2:
                times[name].append(clock() - start)
    ref = times["TopK"]
    print(f"\nGates: forward+backward, n={n}, k={k}, input={d}, batch={batch}, device={device}, "
          f"{repeats} interleaved rounds ({'wall' if device.type == 'cuda' else 'CPU'} time)")
    print(f"{'gate':24s} {'ms/iter':>9s} {'rows/s':>12s} {'x TopK':>8s}")
    for name, values in times.items():
        seconds = statistics.median(values)
        ratio = statistics.median(v / r for v, r in zip(values, ref))
        print(f"{name:24s} {seconds * 1e3:9.2f} {batch / seconds:12.0f} {ratio:7.2f}x")


def dispatch_table(device: torch.device, repeats: int, n: int, k: int, d: int, batch: int) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, d, generator=gen).to(device)
    experts = make_experts(n, d, [256], 64, generator=gen)
    binary = {
        "TopK": TopK(num_experts=n, k=k, input_dim=d),
        "Hash": Hash(num_experts=n, num_keys=1000),
        "DSelectK (hardened)": harden(DSelectK(num_experts=n, k=k, input_dim=d), x.cpu())[0],
        "COMET (hardened)": harden(COMET(num_experts=n, k=k, input_dim=d), x.cpu())[0],
    }
    keys = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    print(f"\nMoE inference with binary gates: MLP experts {d}->256->64, n={n}, k={k}, batch={batch}, device={device}")
    print(f"(speed-up limit n/k = {n // k}x; Hash sends each row to one expert, limit {n}x)")
    print(f"{'gate':22s} {'dense ms':>9s} {'sparse ms':>10s} {'speed-up':>9s} {'max |diff|':>11s}")
    for name, gate in binary.items():
        dense = MoE(experts, gate, dispatch="dense").to(device).eval()
        sparse = MoE(experts, gate, dispatch="sparse").to(device).eval()
        with torch.no_grad():
            diff = float((dense(x, key=keys).output - sparse(x, key=keys).output).abs().max())
            t_dense = timed(lambda: dense(x, key=keys), repeats, device)
            t_sparse = timed(lambda: sparse(x, key=keys), repeats, device)
        print(f"{name:22s} {t_dense * 1e3:9.2f} {t_sparse * 1e3:10.2f} {t_dense / t_sparse:8.2f}x {diff:11.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda also runs when available and --device=all)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")]
    if args.device == "cuda" or (args.device == "all" and torch.cuda.is_available()):
        devices = [torch.device("cuda")] if args.device == "cuda" else devices + [torch.device("cuda")]
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}")
    for device in devices:
        gate_table(device, args.repeats, n=16, k=2, d=128, batch=args.batch)
        dispatch_table(device, args.repeats, n=16, k=2, d=128, batch=args.batch)


if __name__ == "__main__":
    main()
