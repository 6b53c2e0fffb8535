"""One training step of ``MultiGateMoE`` (Softmax gates) vs a plain PyTorch multi-gate MoE of the same sizes.

    python benchmarks/bench_multigate_step.py [--rounds 30] [--batch 512] [--experts 8] [--tasks 2] [--profile]

A step is forward + backward + Adam step on the summed per-task MSE. Both models hold the same expert,
gate and tower weights (copied), see the same batches, and are timed interleaved, round by round, in one
process with one torch thread; the reported ratio is the median over rounds of (MultiGateMoE time / plain
time) in the same round, measured in process CPU time (stable on a shared machine). Goal: <= 1.1x.
With ``--profile`` the per-operator breakdown of both steps (torch.profiler) is printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from routing_search.gates import Softmax
from routing_search.layers import MLP, MultiGateMoE


class PlainMMoE(nn.Module):
    """MMoE written directly: every expert on every row, one per-example softmax gate and tower per task."""

    def __init__(self, d: int, n: int, hidden: int, out: int, tasks: int) -> None:
        super().__init__()
        self.experts = nn.ModuleList(MLP(d, [hidden], out) for _ in range(n))
        self.gates = nn.ModuleList(nn.Linear(d, n) for _ in range(tasks))
        self.towers = nn.ModuleList(nn.Linear(out, 1) for _ in range(tasks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = torch.stack([e(x) for e in self.experts], dim=1)  # [B, n, out]
        outs = []
        for gate, tower in zip(self.gates, self.towers):
            w = torch.softmax(gate(x), dim=-1)
            outs.append(tower(torch.einsum("bn,bno->bo", w, f)))
        return outs


def build(d: int, n: int, hidden: int, out: int, tasks: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    plain = PlainMMoE(d, n, hidden, out, tasks)
    ours = MultiGateMoE(
        [MLP(d, [hidden], out) for _ in range(n)],
        [Softmax(n, d) for _ in range(tasks)],
        [nn.Linear(out, 1) for _ in range(tasks)],
    )
    with torch.no_grad():
        for a, b in zip(ours.experts, plain.experts):
            for pa, pb in zip(a.parameters(), b.parameters()):
                pa.copy_(pb)
        for gate, lin in zip(ours.gates, plain.gates):
            gate.router.load_state_dict(lin.state_dict())
        for a, b in zip(ours.towers, plain.towers):
            a.load_state_dict(b.state_dict())
    return ours, plain


def step_fn(model: nn.Module, x: torch.Tensor, ys: list[torch.Tensor]):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(x)
        preds = out.outputs if hasattr(out, "outputs") else out
        loss = sum(((p.squeeze(-1) - y) ** 2).mean() for p, y in zip(preds, ys))
        if hasattr(out, "loss"):
            loss = loss + out.loss
        loss.backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--out", type=int, default=32)
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ours, plain = build(args.dim, args.experts, args.hidden, args.out, args.tasks)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.dim, generator=gen)
    ys = [torch.randn(args.batch, generator=gen) for _ in range(args.tasks)]
    with torch.no_grad():
        same = all(torch.allclose(a.squeeze(-1), b.squeeze(-1), atol=1e-5) for a, b in zip(ours(x).outputs, plain(x)))
    steps = {"MultiGateMoE": step_fn(ours, x, ys), "plain PyTorch": step_fn(plain, x, ys)}
    for fn in steps.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    ratios = []
    for r in range(args.rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        now = {}
        for name in order:
            start = time.process_time()
            for _ in range(5):
                steps[name]()
            now[name] = (time.process_time() - start) / 5
            times[name].append(now[name])
        ratios.append(now["MultiGateMoE"] / now["plain PyTorch"])
    print(f"one training step (forward + backward + Adam), batch {args.batch}, d {args.dim}, {args.experts} experts "
          f"(MLP {args.dim}->{args.hidden}->{args.out}), {args.tasks} Softmax task gates, 1 thread; same outputs: {same}")
    for name, ts in times.items():
        print(f"  {name:14s} median {1e3 * statistics.median(ts):.3f} ms (CPU time)")
    ratios.sort()
    print(f"  ratio MultiGateMoE / plain: median {statistics.median(ratios):.3f}x "
          f"(quartiles {ratios[len(ratios) // 4]:.3f}-{ratios[3 * len(ratios) // 4]:.3f}); goal <= 1.1x")
    if args.profile:
        for name, fn in steps.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(10):
                    fn()
            print(f"\n== {name}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
