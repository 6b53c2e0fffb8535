"""One rank of the distributed training tests (tests/training/test_ddp.py); not collected by pytest.

    python tests/training/ddp_worker.py RANK WORLD PORT CASE TIMEOUT OUT_JSON [ARGS...]

Joins a gloo group on 127.0.0.1:PORT (collectives time out after TIMEOUT s), runs the case and writes its
result, or the error it raised, as JSON to OUT_JSON. Every rank builds the same model and holds the same
full data; ``fit`` shards it. The model builders are shared with the test (imported from this file).
"""

from __future__ import annotations

import json
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from routing_search.gates import TopK
from routing_search.layers import MultiGateMoE, make_experts
from routing_search.training import SearchSchedule, fit, task_metrics
from routing_search.training.data_source import as_source
from routing_search.training.distributed_training import ShardedEvalTensorSource, resolve_context, shard_source
from routing_search.training.evaluation import evaluate

D, U, N_EXPERTS = 4, 3, 5
TRAIN_ROWS, VAL_ROWS = 50, 30  # 50 rows in global batches of 16: 16, 16, 16, 2 (an empty part at 3 ranks)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rows_loss(preds: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """Per-example loss of the two tasks: logistic on task 0, squared error on task 1."""
    bce = F.binary_cross_entropy_with_logits(preds[0].squeeze(1), y[:, 0], reduction="none")
    return bce + 0.5 * (preds[1].squeeze(1) - y[:, 1]) ** 2


def build_model(seed: int = 0, *, dropout: float = 0.0, load_balance: float = 0.0) -> MultiGateMoE:
    """A float64 two-task MoE with Top-2 gates and scrambled permutations (the search has work to do)."""
    torch.manual_seed(seed)
    experts = make_experts(N_EXPERTS, D, [8], U, dropout=dropout, generator=gen(seed)).double()
    gates = [TopK(N_EXPERTS, 2, D, load_balance_weight=load_balance).double() for _ in range(2)]
    towers = [nn.Linear(U, 1).double() for _ in range(2)]
    model = MultiGateMoE(experts, gates, towers, share_permutation=False)
    rng = np.random.default_rng(seed + 1)
    for perm in model.permutations:
        perm.set(rng.permutation(N_EXPERTS))
    return model


def make_data(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    teacher = build_model(99)
    for perm in teacher.permutations:
        perm.reset()
    x = torch.randn(rows, D, generator=gen(seed), dtype=torch.float64)
    with torch.no_grad():
        out = teacher(x).outputs
    y = torch.stack([(out[0][:, 0] > out[0][:, 0].median()).double(), out[1][:, 0]], dim=1)
    return x, y


def fit_kwargs(**overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        val_data=make_data(VAL_ROWS, 2), epochs=2, batch_size=16, optimizer=lambda p: torch.optim.Adam(p, lr=0.02),
        search=SearchSchedule(every_epochs=1), metrics={"auc": task_metrics.roc_auc(0)}, gate_loss_weight=0.0,
        progress=False, seed=0,
    )
    kwargs.update(overrides)
    return kwargs


def model_state(model: nn.Module) -> dict[str, Any]:
    return {
        "params": [p.detach().reshape(-1).tolist() for p in model.parameters()],
        "perms": [p.get().tolist() for p in model.permutations],
        "meters": [m.soft_sum.tolist() + m.hard_sum.tolist() + [float(m.rows)] for m in model.usage_meters],
    }


def run_summary(result: Any) -> dict[str, Any]:
    h = result.history
    return model_state(result.model) | {
        "step_loss": h.step_loss,
        "val_loss": h.val_loss,
        "metrics": h.metrics,
        "usage": h.usage,
        "moves": [[m["kind"], m["slot"], m["selector"], m["before"], m["after"]] for s in h.searches for m in s["moves"]],
        "search_fun": [[s["fun0"], s["fun"]] for s in h.searches],
    }


# ------------------------------------------------------------------------------------------------ cases
def case_fit(rank: int, world: int, args: list[str]) -> dict[str, Any]:
    """fit with search: tensors (or a Dataset and a user-wrapped DDP model); rank 0 adds the single process."""
    form = args[0]
    x, y = make_data(TRAIN_ROWS, 1)
    model = build_model(0)
    train: Any = (x, y)
    run_model: nn.Module = model
    if form == "dataset_wrapped":
        train = TensorDataset(x, y)
        run_model = DistributedDataParallel(model, find_unused_parameters=True)
    result = fit(run_model, train, rows_loss, **fit_kwargs())
    out = run_summary(result)
    # The control: per-rank AUCs of the final model on the ranks' validation shards (fit must not average them).
    xv, yv = make_data(VAL_ROWS, 2)
    source = ShardedEvalTensorSource("val_data", (xv, yv), 16, gen(0), rank=rank, world_size=world)
    shard = evaluate(model, source, rows_loss, torch.device("cpu"), metrics={"auc": task_metrics.roc_auc(0)})
    out["shard_auc"] = shard.metrics.get("auc")
    if rank == 0:
        reference = fit(build_model(0), (x, y), rows_loss, process_group=False, **fit_kwargs())
        out["reference"] = run_summary(reference)
    return out


VARIANTS = {
    "plain": (lambda: build_model(0), 0.0),
    "dropout": (lambda: build_model(0, dropout=0.3), 0.0),
    "gate_loss": (lambda: build_model(0, load_balance=0.5), 1.0),
}


def case_checkpoint(rank: int, world: int, args: list[str]) -> dict[str, Any]:
    """For every variant: the epoch-1 checkpoint of a 2-epoch run in args[0]/VARIANT/part, and the 2 epochs
    run uninterrupted (checkpointing in args[0]/VARIANT/full)."""
    data = make_data(TRAIN_ROWS, 1)
    out = {}
    for variant, (build, weight) in VARIANTS.items():
        base = Path(args[0]) / variant
        fit(build(), data, rows_loss, **fit_kwargs(epochs=1, checkpoint_dir=base / "part", gate_loss_weight=weight))
        full = fit(build(), data, rows_loss, **fit_kwargs(epochs=2, checkpoint_dir=base / "full", gate_loss_weight=weight))
        out[variant] = run_summary(full)
    return out


def case_resume(rank: int, world: int, args: list[str]) -> dict[str, Any]:
    """Resume the checkpoint in args[0] (written by another number of processes) up to 2 epochs."""
    result = fit(build_model(0), make_data(TRAIN_ROWS, 1), rows_loss, **fit_kwargs(epochs=2, checkpoint_dir=args[0], resume=True))
    return run_summary(result)


def case_evaluate(rank: int, world: int, args: list[str]) -> dict[str, Any]:
    """evaluate on unequal and empty shards, for tensors, a Dataset and an unsharded DataLoader."""
    ctx = resolve_context(None)
    model = build_model(3)
    out: dict[str, Any] = {}
    for rows in (2, 7, 30):
        data = make_data(rows, 5)
        forms = {
            "tensors": data,
            "dataset": TensorDataset(*data),
            "loader": DataLoader(TensorDataset(*data), batch_size=3),
        }
        for name, value in forms.items():
            single = as_source("val_data", value, 3, gen(0), seed=0, shuffle=False)
            sharded = shard_source(as_source("val_data", value, 3, gen(0), seed=0, shuffle=False), value, ctx, train=False, seed=0)
            metrics = {"mse1": task_metrics.mse(1)}
            got = evaluate(model, sharded, rows_loss, torch.device("cpu"), metrics=metrics, capture_rows=4, process_group=None)
            entry = {"loss": got.loss, "rows": got.rows, "usage": got.usage, "metrics": got.metrics,
                     "inputs": {k: v.tolist() for k, v in got.layer_inputs.items()}}
            if rank == 0:
                ref = evaluate(model, single, rows_loss, torch.device("cpu"), metrics=metrics, capture_rows=4)
                entry["reference"] = {"loss": ref.loss, "rows": ref.rows, "usage": ref.usage, "metrics": ref.metrics,
                                      "inputs": {k: v.tolist() for k, v in ref.layer_inputs.items()}}
            out[f"{name}/{rows}"] = entry
    return out


def case_raise(rank: int, world: int, args: list[str]) -> dict[str, Any]:
    """Rank 1's loss raises ('error'), then turns non-finite ('nan'), at its third training step; each run's
    error as it reached this rank. The group stays usable after a failure."""
    out: dict[str, Any] = {}
    for kind in ("error", "nan"):
        calls = [0]

        def loss(preds: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
            calls[0] += 1
            value = rows_loss(preds, y)
            if rank == 1 and calls[0] == 3:
                if kind == "error":
                    raise RuntimeError("rank 1's loss failed at its third call")
                return value * float("inf")
            return value

        try:
            fit(build_model(0), make_data(TRAIN_ROWS, 1), loss, **fit_kwargs(search=None, metrics=None))
            out[kind] = {"error": None}
        except Exception as exc:
            out[kind] = {"error": type(exc).__name__, "message": str(exc)}
    return out


def case_reset_usage(rank: int, world: int, args: list[str]) -> dict[str, Any]:
    """A callback resets the usage meters after epoch 0 (every rank); the meters after 2 epochs, and rank 0's
    single-process run of the same."""

    def run(process_group: Any) -> dict[str, Any]:
        model = build_model(0)

        def reset(event: Any) -> None:
            if event.kind == "epoch_end" and event.epoch == 0:
                model.reset_usage()

        fit(model, make_data(TRAIN_ROWS, 1), rows_loss, process_group=process_group,
            **fit_kwargs(search=None, metrics=None, epochs=2, callbacks=[reset]))
        return model_state(model)

    out = {"group": run(None)}
    if rank == 0:
        out["single"] = run(False)
    return out


def case_agree_on_stop(rank: int, world: int, args: list[str]) -> dict[str, Any]:
    """agree_on_stop: stop requests, then rank 1 passing its callback's error; what each rank got."""
    from routing_search.training.distributed_training import agree_on_stop

    ctx = resolve_context(None)
    out: dict[str, Any] = {"stop": agree_on_stop(ctx, "rank 1 asked" if rank == 1 else None)}
    try:
        agree_on_stop(ctx, None, RuntimeError("rank 1's callback failed") if rank == 1 else None)
        out["error"] = None
    except Exception as exc:
        out["error"] = [type(exc).__name__, str(exc)]
    out["after"] = agree_on_stop(ctx, None)  # the group is still usable, the ranks still in step
    return out


def case_fails_on_one_rank(rank: int, world: int, args: list[str]) -> dict[str, Any]:
    """A callback (epoch end, after a search, or at the search before training) or a validation metric that
    raises on rank 1 only; the error each rank got. The group stays usable after each."""
    def fails(when: str) -> Any:
        def callback(event: Any) -> None:
            if rank == 1 and event.kind == ("search" if when == "at_start" else when):
                raise RuntimeError(f"rank 1's callback failed at {event.kind}")
        return callback

    def failing_metric(predictions: Any, targets: Any) -> float:
        if rank == 1:
            raise RuntimeError("rank 1's metric failed")
        return 0.0

    out: dict[str, Any] = {}
    runs = {
        "epoch_end": fit_kwargs(search=None, metrics=None, callbacks=[fails("epoch_end")]),
        "search": fit_kwargs(metrics=None, callbacks=[fails("search")]),
        "at_start": fit_kwargs(metrics=None, search=SearchSchedule(every_epochs=1, at_start=True), callbacks=[fails("at_start")]),
        "metric": fit_kwargs(search=None, metrics={"fails": failing_metric}),
    }
    for name, kwargs in runs.items():
        try:
            fit(build_model(0), make_data(TRAIN_ROWS, 1), rows_loss, **kwargs)
            out[name] = None
        except Exception as exc:
            out[name] = [type(exc).__name__, str(exc)]
    return out


CASES = {"fails_on_one_rank": case_fails_on_one_rank, "agree_on_stop": case_agree_on_stop, "reset_usage": case_reset_usage, "fit": case_fit, "checkpoint": case_checkpoint, "resume": case_resume, "evaluate": case_evaluate, "raise": case_raise}


def main() -> None:
    rank, world, port = (int(v) for v in sys.argv[1:4])
    case, timeout, out_path, args = sys.argv[4], float(sys.argv[5]), Path(sys.argv[6]), sys.argv[7:]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout))
    try:
        result: dict[str, Any] = {"ok": CASES[case](rank, world, args)}
    except Exception as exc:  # the test checks which error each rank saw
        result = {"error": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}
    out_path.write_text(json.dumps(result))
    if "ok" in result:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
