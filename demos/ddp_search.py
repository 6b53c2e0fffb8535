"""Data-parallel training with permutation search: every rank ends with the same model.

    torchrun --nproc_per_node 2 demos/ddp_search.py            # CPU, gloo
    torchrun --nproc_per_node 4 demos/ddp_search.py --backend nccl --device cuda   # one GPU per rank

A two-task multi-gate MoE (Top-2 gates, one permutation per task) starts with scrambled
gate-slot→expert permutations. ``fit`` trains it under ``DistributedDataParallel``: every rank trains on
its part of each global batch, and after every epoch a swap search runs on the ranks' parts of the
held-out rows with the candidate loss changes all-reduced, so that all ranks accept the same moves.
At the end rank 0 gathers a checksum of every rank's parameters, permutations and usage meters and
prints whether they agree. Run without torchrun it trains in a single process.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from routing_search.distributed import all_gather_objects, is_main_process, resolve_group
from routing_search.gates import TopK
from routing_search.layers import MultiGateMoE, make_experts
from routing_search.training import SearchSchedule, fit, task_metrics

INPUT, HIDDEN, UNITS, EXPERTS = 8, 16, 4, 6


def rows_loss(preds: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """Per-example loss: logistic on task 0, squared error on task 1."""
    bce = F.binary_cross_entropy_with_logits(preds[0].squeeze(1), y[:, 0], reduction="none")
    return bce + (preds[1].squeeze(1) - y[:, 1]) ** 2


def build_model(seed: int, *, scrambled: bool) -> MultiGateMoE:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    experts = make_experts(EXPERTS, INPUT, [HIDDEN], UNITS, generator=gen)
    model = MultiGateMoE(experts, [TopK(EXPERTS, 2, INPUT) for _ in range(2)], [nn.Linear(UNITS, 1) for _ in range(2)],
                         share_permutation=False)
    if scrambled:
        rng = np.random.default_rng(seed)
        for perm in model.permutations:
            perm.set(rng.permutation(EXPERTS))
    return model


def make_data(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets from a teacher MoE with identity permutations (the scrambled student must undo them)."""
    teacher = build_model(1234, scrambled=False)
    x = torch.randn(rows, INPUT, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = teacher(x).outputs
    return x, torch.stack([(out[0][:, 0] > out[0][:, 0].median()).float(), out[1][:, 0]], dim=1)


def checksum(model: nn.Module) -> dict[str, str]:
    """SHA-256 (first 16 hex digits) of the parameters, the permutations and the usage meters."""
    def digest(tensors: list[torch.Tensor]) -> str:
        h = hashlib.sha256()
        for t in tensors:
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    assert isinstance(model, MultiGateMoE)
    return {
        "parameters": digest(list(model.parameters())),
        "permutations": digest([p.index for p in model.permutations]),
        "meters": digest([b for m in model.usage_meters for b in m.buffers()]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (each rank uses cuda:LOCAL_RANK)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rows", type=int, default=4096, help="training rows (held-out: a quarter as many)")
    parser.add_argument("--batch-size", type=int, default=256, help="global batch: rows per step over all ranks")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(1)
    device = torch.device(args.device)
    if "RANK" in os.environ:  # launched by torchrun
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group(args.backend, timeout=timedelta(seconds=120))
    group = resolve_group(None)

    model = build_model(args.seed, scrambled=True)  # the same on every rank (DDP also broadcasts rank 0's)
    train, val = make_data(args.rows, 1), make_data(args.rows // 4, 2)
    result = fit(
        model, train, rows_loss, val_data=val, epochs=args.epochs, batch_size=args.batch_size,
        optimizer=lambda params: torch.optim.Adam(params, lr=3e-3), search=SearchSchedule(every_epochs=1),
        metrics={"auc": task_metrics.roc_auc(0)}, device=device, seed=args.seed, progress=True,
    )
    sums = all_gather_objects(checksum(result.model), group)
    if is_main_process(group):
        h = result.history
        moves = sum(s["accepted"] for s in h.searches)
        print(f"{len(sums)} rank(s); {result.epochs_run} epochs; {moves} search moves accepted; "
              f"val loss {h.val_loss[0]:.4f} -> {h.val_loss[-1]:.4f}; AUC (all ranks' predictions) {h.metrics[-1]['auc']:.4f}")
        print(f"search share of the wall time: {sum(h.search_seconds) / sum(h.epoch_seconds):.1%}")
        print(f"permutations: {h.permutations[-1]['']}")
        for r, s in enumerate(sums):
            print(f"rank {r}: parameters {s['parameters']}  permutations {s['permutations']}  meters {s['meters']}")
        agree = all(s == sums[0] for s in sums)
        print("all ranks agree" if agree else "RANKS DISAGREE")
        if not agree:
            raise SystemExit(1)
    if group is not None:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
