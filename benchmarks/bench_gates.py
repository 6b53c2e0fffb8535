"""Gate throughput (forward + backward) and sparse vs dense MoE inference, side by side in one run.

    python benchmarks/bench_gates.py [--device cuda] [--repeats 20]

Every gate at n = 16, k = 2, input 128, batch 4096 (DSelectK and COMET with the entropy
regulariser at 1e-3, and at their defaults, where it is off); then MoE inference with binary gates
(MLP experts 128 → 256 → 64): sparse dispatch vs the dense path (and vs the previous sparse loop) on
the same modules and inputs, interleaved round by round; then the cost of input validation in a
MultiGateMoE training step. The speed-up limit of sparse dispatch is n / k = 8×.

On the CPU the gate table runs twice: in the fresh process, and again after one training step of
the dispatch table's MoE. The difference is the C allocator, not the gates: in a process whose largest
freed block is gate-sized, glibc gives the top of the heap back to the OS between steps, and the next
step pays for fresh pages (minor page faults, printed per round); freeing a training step's larger
activations raises glibc's thresholds for the rest of the process, as in any real training run.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from routing_search.analysis import harden
from routing_search.gates import COMET, DSelectK, GumbelSoftmax, Hash, Softmax, TaskAware, TopK
from routing_search.layers import MoE, MultiGateMoE, make_experts


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


def gate_table(device: torch.device, repeats: int, n: int, k: int, d: int, batch: int, condition: str = "") -> None:
    """Forward + backward of every gate, interleaved round by round, with the ratio to TopK.

    Each round runs every gate once (order reversed every other round); a gate's ratio is the median
    over rounds of its time divided by TopK's time in the same round, so load on a shared machine
    affects both alike; the quartiles of that ratio are in brackets. On the CPU the clock is the
    process CPU time (the wall clock on CUDA).
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
        "DSelectK(defaults)": DSelectK(num_experts=n, k=k, input_dim=d),
        "COMET": COMET(num_experts=n, k=k, input_dim=d, entropy_weight=1e-3),
        "COMET(defaults)": COMET(num_experts=n, k=k, input_dim=d),
        "COMET(static)": COMET(num_experts=n, k=k, entropy_weight=1e-3),
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
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = interleaved(steps, repeats, device)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / (repeats + 2)
    ref = times["TopK"]
    print(f"\nGates: forward+backward, n={n}, k={k}, input={d}, batch={batch}, device={device}, "
          f"{repeats} interleaved rounds ({'wall' if device.type == 'cuda' else 'CPU'} time){condition}")
    print(f"minor page faults per round (all gates): {faults:.0f}")
    print("(targets: DSelectK <= 1.5x TopK, COMET <= 2x TopK; ratio = median over rounds of time / TopK's time in the same round)")
    print(f"{'gate':24s} {'ms/iter':>9s} {'rows/s':>12s} {'x TopK [q1, q3]':>22s}")
    for name, values in times.items():
        seconds = statistics.median(values)
        print(f"{name:24s} {seconds * 1e3:9.2f} {batch / seconds:12.0f} {ratio_text(values, ref):>22s}")


def moe_training_step(device: torch.device, n: int, k: int, d: int, batch: int) -> None:
    """One forward + backward of an MoE of the dispatch table's size (MLP experts d -> 256 -> 64, dense):
    the allocations of an ordinary training step (its 4 MiB activations), after which glibc keeps freed
    gate-sized blocks in the heap instead of returning them to the OS between steps."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(batch, d, generator=gen).to(device)
    moe = MoE(make_experts(n, d, [256], 64, generator=gen), TopK(num_experts=n, k=k, input_dim=d), dispatch="dense").to(device)
    out = moe(x)
    (out.output.square().mean() + out.loss).backward()


def legacy_combine_sparse(experts: Sequence[torch.nn.Module], x: torch.Tensor, weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The sparse dispatch before the one-gather rewrite (a per-expert, per-task loop), kept as a baseline."""
    batch = x.shape[0]
    stacked = torch.stack(list(weights), dim=0)
    pairs = (stacked != 0).any(dim=0).t().nonzero()
    counts = torch.bincount(pairs[:, 0], minlength=len(experts)).tolist()
    results: list[torch.Tensor | None] = [None] * len(weights)
    for e, (expert, rows) in enumerate(zip(experts, torch.split(pairs[:, 1], counts))):
        if rows.numel() == 0:
            continue
        out_e = expert(x.index_select(0, rows))
        flat_e = out_e.reshape(out_e.shape[0], -1)
        for t in range(len(weights)):
            w_e = stacked[t].index_select(0, rows)[:, e].to(flat_e.dtype)
            current = results[t]
            if current is None:
                current = flat_e.new_zeros((batch, flat_e.shape[1]))
            results[t] = current.index_add(0, rows, w_e.unsqueeze(1) * flat_e)
    return [r for r in results if r is not None]


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each function, run round by round (two warm-up rounds, order alternating).

    On the CPU the clock is the process CPU time, which load from other processes on a shared machine
    does not inflate; on CUDA it is the wall clock between synchronisations.
    """
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats + 2):
        for name in names if round_ % 2 == 0 else names[::-1]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = clock()
            fns[name]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_ >= 2:
                times[name].append(clock() - start)
    return times


def ratio_text(num: list[float], den: list[float]) -> str:
    """Median of the per-round ratios with their quartiles: ``median [q1, q3]``."""
    q1, q2, q3 = statistics.quantiles([a / b for a, b in zip(num, den)], n=4)
    return f"{q2:6.2f}x [{q1:.2f}, {q3:.2f}]"


def dispatch_table(device: torch.device, repeats: int, n: int, k: int, d: int, batch: int) -> None:
    """MoE inference with binary gates: dense vs sparse dispatch (and the previous sparse loop), interleaved.

    Every round runs the three layers once on the same modules and inputs; each speed-up is the median
    over rounds of dense time / sparse time in that round, with the quartiles in brackets.
    """
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
    print(f"\nMoE inference with binary gates: MLP experts {d}->256->64, n={n}, k={k}, batch={batch}, device={device}, "
          f"{repeats} interleaved rounds ({'wall' if device.type == 'cuda' else 'CPU'} time)")
    print(f"(speed-up limit n/k = {n // k}x; Hash sends each row to one expert, limit {n}x; "
          "'before' = the previous per-expert, per-task sparse loop)")
    print(f"{'gate':20s} {'dense ms':>9s} {'sparse ms':>10s} {'dense/sparse [q1, q3]':>23s} {'before/sparse [q1, q3]':>24s} {'max |diff|':>10s}")
    for name, gate in binary.items():
        dense = MoE(experts, gate, dispatch="dense").to(device).eval()
        sparse = MoE(experts, gate, dispatch="sparse").to(device).eval()
        before = MoE(experts, gate, dispatch="sparse").to(device).eval()
        before.mix = lambda rows, weights: legacy_combine_sparse(before.experts, rows, weights)  # type: ignore[method-assign]
        with torch.no_grad():
            diff = float((dense(x, key=keys).output - sparse(x, key=keys).output).abs().max())
            times = interleaved(
                {"dense": lambda: dense(x, key=keys), "sparse": lambda: sparse(x, key=keys), "before": lambda: before(x, key=keys)},
                repeats,
                device,
            )
        print(
            f"{name:20s} {statistics.median(times['dense']) * 1e3:9.2f} {statistics.median(times['sparse']) * 1e3:10.2f} "
            f"{ratio_text(times['dense'], times['sparse']):>23s} {ratio_text(times['before'], times['sparse']):>24s} {diff:10.2e}"
        )


def validation_table(device: torch.device, repeats: int, n: int, k: int, d: int, batch: int, tasks: int = 4) -> None:
    """Cost of input validation in a MultiGateMoE training step (validate=True vs False), interleaved.

    The layer scans the input for NaN/inf once per call and checks every gate's rows on the simplex;
    its task gates skip their own scans.
    """
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(batch, d, generator=gen).to(device)
    torch.manual_seed(2)
    experts = make_experts(n, d, [64], 16)
    gates = [TopK(num_experts=n, k=k, input_dim=d) for _ in range(tasks)]
    on = MultiGateMoE(experts, gates, dispatch="sparse", validate=True).to(device).train()
    off = MultiGateMoE(experts, gates, dispatch="sparse", validate=False).to(device).train()

    def step(model: MultiGateMoE) -> Callable[[], None]:
        def run() -> None:
            out = model(x)
            (sum(o.sum() for o in out.outputs) + out.loss).backward()
            for p in model.parameters():
                p.grad = None

        return run

    times = interleaved({"on": step(on), "off": step(off)}, repeats, device)
    print(f"\nMultiGateMoE training step, {tasks} TopK task gates, experts {d}->64->16, n={n}, k={k}, batch={batch}, device={device}")
    print(f"validate=True {statistics.median(times['on']) * 1e3:.2f} ms, validate=False {statistics.median(times['off']) * 1e3:.2f} ms, "
          f"ratio {ratio_text(times['on'], times['off'])}")


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
        if device.type == "cpu":
            gate_table(device, args.repeats, n=16, k=2, d=128, batch=args.batch, condition=", fresh process")
            moe_training_step(device, n=16, k=2, d=128, batch=args.batch)
            gate_table(device, args.repeats, n=16, k=2, d=128, batch=args.batch, condition=", after one MoE training step")
        else:
            gate_table(device, args.repeats, n=16, k=2, d=128, batch=args.batch)
        dispatch_table(device, args.repeats, n=16, k=2, d=128, batch=args.batch)
        validation_table(device, args.repeats, n=16, k=2, d=128, batch=args.batch)


if __name__ == "__main__":
    main()
