"""Swap-neighbourhood scan: cached exact evaluation vs the naive way, side by side in one run.

    python benchmarks/bench_search.py [--device cuda] [--batch 4096] [--threads 1]
    python benchmarks/bench_search.py --threads 1 --parts share --share-repeats 5   # only the search share, 5 fits

Setting: n = 16 experts, k = 2 (TopK), batch 4096, MLP experts 128 → 256 → 64, tower 64 → 64 → 1,
per-example BCE. Both ways evaluate the same n(n−1)/2 = 120 swap candidates and must give the same
losses. Goals: ≥ 50× faster than naive, ≤ 2× the time of one forward of the model.
Then the share of wall time that search takes in alternating training (`fit`) at the default schedule
(goal ≤ 10 %), and what one default search exchanges under a process group: the all-reduce count and
volume, and the wall time of the same search on 2048 rows in one process vs sharded over 2 gloo
processes on this machine (`--ranks 0` skips it).

The share is a ratio of wall times measured in one run, so on a shared machine it moves with the load:
`--share-repeats N` runs the same seeded fit N times and prints every share, their median and range.
"""

from __future__ import annotations

import argparse
import copy
import socket
import time

import numpy as np
import torch
import torch.nn.functional as F

from routing_search.gates import TopK
from routing_search.layers import MLP, MultiGateMoE, make_experts
from routing_search.search import Candidate, RoutingObjective, local_search, swap_moves
from routing_search.training import SearchSchedule, fit


def bce(preds: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(preds[0].squeeze(-1), y, reduction="none")


def build(device: torch.device, n: int, k: int, d: int) -> MultiGateMoE:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    experts = make_experts(n, d, [256], 64, generator=gen)
    return MultiGateMoE(experts, [TopK(num_experts=n, k=k, input_dim=d)], [MLP(64, [64], 1)]).to(device).eval()


def timed(fn, device: torch.device, repeats: int = 3) -> tuple[float, object]:
    out = None
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


def scan_benchmark(device: torch.device, batch: int, n: int = 16, k: int = 2, d: int = 128) -> None:
    model = build(device, n, k, d)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, d, generator=gen).to(device)
    y = torch.randint(0, 2, (batch,), generator=gen).float().to(device)
    pairs = [(a, c) for a in range(n) for c in range(a + 1, n)]

    def one_forward():
        with torch.no_grad():
            return model(x)

    t_forward, _ = timed(one_forward, device, repeats=5)
    model.dispatch = "dense"
    t_dense, _ = timed(one_forward, device, repeats=5)
    model.dispatch = "auto"

    t_cache, objective = timed(lambda: RoutingObjective(model, (x, y), bce), device)

    def full_scan():
        objective.reset_swap_scans()  # score every row, as the first scan of a search does
        return objective.swap_values(0, 0)

    t_scan, values = timed(full_scan, device, repeats=5)
    cached = np.array([float(values[a, c]) for a, c in pairs])
    # After a move only the rows it touched are re-scored: accept the best swap, time the rescan.
    best = min(pairs, key=lambda ac: float(values[ac[0], ac[1]]))
    state = objective.current()
    state[0][0][list(best)] = state[0][0][list(best[::-1])]
    objective.swap_values(0, 0)
    objective.set_state(state)
    t_incremental, _ = timed(lambda: objective.swap_values(0, 0), device, repeats=1)
    objective.set_state([np.arange(n)[None]])
    generic_rows = [Candidate(0, 0, row) for row in swap_moves(np.arange(n))]
    t_generic, generic = timed(lambda: objective.evaluate(generic_rows), device)

    def naive_scan():
        out = []
        with torch.no_grad():
            for a, c in pairs:
                row = np.arange(n)
                row[a], row[c] = row[c], row[a]
                model.permutation_for(0).set(row)
                out.append(float(bce(model(x).outputs, y).mean()))
            model.permutation_for(0).reset()
        return np.array(out)

    t_naive, naive = timed(naive_scan, device, repeats=1)
    err = max(float(np.max(np.abs(cached - naive))), float(np.max(np.abs(np.asarray(generic) - naive))))
    print(f"\nSwap-neighbourhood scan, {len(pairs)} candidates, n={n}, k={k}, batch={batch}, device={device}")
    print(f"  one model forward (sparse dispatch)   {t_forward * 1e3:9.1f} ms")
    print(f"  one model forward (dense dispatch)    {t_dense * 1e3:9.1f} ms")
    print(f"  naive: re-run the model per swap      {t_naive * 1e3:9.1f} ms")
    print(f"  cache: experts + gate once (per search){t_cache * 1e3:8.1f} ms")
    print(f"  structured 2-opt scan, all rows       {t_scan * 1e3:9.1f} ms")
    print(f"  rescan after one accepted swap        {t_incremental * 1e3:9.1f} ms   (only the rows the move touched)")
    print(f"  generic candidate scan (any move)     {t_generic * 1e3:9.1f} ms")
    print(f"  full scan vs naive                    {t_naive / t_scan:9.1f}x   (goal >= 50x)")
    print(f"  full scan / one sparse forward        {t_scan / t_forward:9.2f}x   (goal <= 2x)")
    print(f"  cache + first scan vs naive           {t_naive / (t_cache + t_scan):9.1f}x")
    print(f"  cache + first scan / sparse forward   {(t_cache + t_scan) / t_forward:9.2f}x   (the cache is one dense pass:")
    print(f"                                                   a full swap neighbourhood needs every expert on every row)")
    print(f"  max |loss difference| vs naive        {err:9.2e}")


def training_share(device: torch.device, batch: int, epochs: int, n: int = 16, k: int = 2, d: int = 128) -> float:
    """One seeded ``fit`` at the default search schedule; prints and returns the search share (percent)."""
    model = build(device, n, k, d).train()
    gen = torch.Generator().manual_seed(2)
    rows = 8 * batch
    x = torch.randn(rows, d, generator=gen)
    teacher = torch.randn(d, generator=gen)
    y = (x @ teacher > 0).float()
    split = int(0.8 * rows)
    result = fit(
        model,
        (x[:split], y[:split]),
        bce,
        val_data=(x[split:], y[split:]),
        epochs=epochs,
        batch_size=256,
        search=SearchSchedule(),  # the default schedule
        device=device,
        progress=False,
    )
    h = result.history
    train_s, search_s = float(sum(h.train_seconds)), float(sum(h.search_seconds))
    total = train_s + search_s
    print(f"\nAlternating training, default search schedule, {epochs} epochs of {split} rows, device={device}")
    print(f"  training {train_s:.2f} s, search {search_s:.2f} s -> search share {100 * search_s / total:.1f} % (goal <= 10 %)")
    per_search = ", ".join(f"{s['seconds']:.2f}s/{s['accepted']}" for s in h.searches)
    print(f"  per search (seconds/accepted moves): {per_search}")
    return 100 * search_s / total


def _search_problem(rows: int, n: int = 16, k: int = 2, d: int = 128) -> tuple[MultiGateMoE, torch.Tensor, torch.Tensor]:
    model = build(torch.device("cpu"), n, k, d)
    model.permutation_for(0).set(np.random.default_rng(3).permutation(n))  # a start the search can improve
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(rows, d, generator=gen)
    y = torch.randint(0, 2, (rows,), generator=gen).float()
    return model, x, y


def _sharded_search(rank: int, world: int, port: int, rows: int, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model, x, y = _search_problem(rows)
    mine = slice(rank * rows // world, (rank + 1) * rows // world)
    local_search(copy.deepcopy(model), (x[mine], y[mine]), bce, "swap")  # warm-up
    dist.barrier()
    start = time.perf_counter()
    res = local_search(model, (x[mine], y[mine]), bce, "swap")
    seconds = time.perf_counter() - start
    if rank == 0:
        queue.put((seconds, res.nit, res.nfev, res.all_reduce, float(res.fun)))
    dist.destroy_process_group()


def communication(rows: int, ranks: int) -> None:
    """One default swap search (fit's default: 2048 rows): all-reduce volume, 1 process vs ``ranks`` processes."""
    torch.set_num_threads(1)
    model, x, y = _search_problem(rows)
    local_search(copy.deepcopy(model), (x, y), bce, "swap")  # warm-up
    start = time.perf_counter()
    res = local_search(model, (x, y), bce, "swap")
    single = time.perf_counter() - start
    calls, values = res.all_reduce["calls"], res.all_reduce["float64_values"]
    print(f"\nOne default swap search on {rows} rows (n=16, k=2), 1 CPU thread per process")
    print(f"  accepted moves {res.nit}, evaluations {res.nfev}")
    print(f"  all-reduces {calls}, carrying {values} float64 values = {values * 8 / 1024:.1f} KiB per rank")
    print(f"    (+ 1 all_gather_object at the start and 1 at the end; + 1 broadcast for 'ils')")
    print(f"  one process, all rows                 {single * 1e3:9.1f} ms")
    if ranks < 2:
        return
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_sharded_search, args=(ranks, port, rows, queue), nprocs=ranks, start_method="spawn")
    seconds, nit, nfev, comm, fun = queue.get()
    same = "same moves" if (nit, nfev) == (res.nit, res.nfev) and abs(fun - float(res.fun)) <= 1e-12 * abs(fun) else "DIFFERENT"
    print(f"  {ranks} gloo processes, sharded rows       {seconds * 1e3:9.1f} ms   ({same}; ratio {seconds / single:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--ranks", type=int, default=2, help="gloo processes for the communication figure (0: skip)")
    parser.add_argument("--parts", default="scan,share,communication",
                        help="comma-separated parts to run: scan, share, communication (default: all)")
    parser.add_argument("--share-repeats", type=int, default=1, help="run the training-share fit this many times")
    args = parser.parse_args()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"scan", "share", "communication"}
    if unknown:
        parser.error(f"--parts takes scan, share and communication; got {sorted(unknown)}")
    if args.share_repeats < 1:
        parser.error(f"--share-repeats must be at least 1, got {args.share_repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}")
    if "scan" in parts:
        scan_benchmark(device, args.batch)
    if "share" in parts:
        shares = [training_share(device, args.batch, args.epochs) for _ in range(args.share_repeats)]
        if len(shares) > 1:
            print(f"\nSearch share over {len(shares)} fits: {', '.join(f'{v:.1f}' for v in shares)} % "
                  f"(median {float(np.median(shares)):.1f} %, range {min(shares):.1f}-{max(shares):.1f} %)")
    if "communication" in parts and device.type == "cpu":
        communication(2048, args.ranks)


if __name__ == "__main__":
    main()
