"""One rank of the multi-process refit tests (tests/search/test_refit_distributed.py); not collected by pytest.

    python tests/search/refit_dist_worker.py RANK WORLD PORT CASE TIMEOUT OUT_JSON SHARDS

The cases of tests/search/dist_worker.py's harness (same arguments, same JSON results), for the refit search:
every rank holds a shard of the fit and score rows; rank 0 also runs the same search in one process on all
the rows (the reference).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch

from routing_search.gates import DSelectK
from routing_search.layers import MultiGateMoE, make_experts
from routing_search.search.codes import set_selector_slot
from routing_search.training import LocalSearcher


def _load_dist_worker() -> Any:
    """tests/search/dist_worker.py as a module (this file also runs as a script, outside any package)."""
    if "dist_worker" in sys.modules:
        return sys.modules["dist_worker"]
    spec = importlib.util.spec_from_file_location("dist_worker", Path(__file__).with_name("dist_worker.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["dist_worker"] = module
    spec.loader.exec_module(module)
    return module


dist_worker = _load_dist_worker()
D, ROWS, SHARDS, _gen, shard_rows = dist_worker.D, dist_worker.ROWS, dist_worker.SHARDS, dist_worker._gen, dist_worker.shard_rows


# ------------------------------------------------------------------------------ refit under a process group
def _collapsed_refit_model(seed: int = 0, n: int = 5, tasks: int = 3) -> MultiGateMoE:
    """Static DSelect-k task gates all on expert 0 (identity towers): the refit search has moves to make."""
    torch.manual_seed(seed)
    gates = [DSelectK(n, 1).double() for _ in range(tasks)]
    for g in gates:
        set_selector_slot(g, 0, 0)
    return MultiGateMoE(make_experts(n, D, [6], 1, generator=_gen(seed)).double(), gates)


def _refit_rows(seed: int, tasks: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(ROWS, D, generator=_gen(seed), dtype=torch.float64)
    y = torch.stack([torch.sin(x[:, 0] * (t + 1)) + x[:, t % D] for t in range(tasks)], dim=1)
    return x, y


def _refit_summary(res: Any, model: MultiGateMoE) -> dict[str, Any]:
    from routing_search.search.refit import last_linear_layers

    return {
        "x": [s.tolist() for s in res.x], "fun": float(res.fun), "fun0": float(res.fun0), "nit": int(res.nit),
        "nfev": int(res.nfev), "status": int(res.status),
        "moves": [[m.slot, m.selector, m.before, m.after, getattr(m, "experts", None)] for m in res.moves],
        "weights": [torch.cat([lin.weight.reshape(-1), lin.bias.reshape(-1)]).tolist() for lin in last_linear_layers(list(model.experts))],
        "guard_rejections": int(getattr(res, "guard_rejections", 0) or 0),
        "guard": getattr(res, "guard", None),
    }


def case_refit(rank: int, world: int, shards_name: str) -> dict[str, Any]:
    """refit_search, refit with a guard, a refit LocalSearcher and fit's refit schedule, each sharded and (on
    rank 0) in one process on all the rows."""
    from routing_search.losses import multitask_loss
    from routing_search.search import MetricGuard
    from routing_search.search.refit import RefitOptions, refit_search
    from routing_search.training import SearchSchedule, fit

    shards = SHARDS[shards_name]
    mine = shard_rows(shards, rank)
    loss = multitask_loss(["mse"] * 3)
    fit_x, fit_y = _refit_rows(11)
    score_x, score_y = _refit_rows(12)
    out: dict[str, Any] = {}

    def task_error(preds: Any, y: torch.Tensor) -> float:
        return float(((preds[2].squeeze(1) - y[:, 2]) ** 2).mean())

    # A guard that refuses some moves the loss accepts: task 2's error may not fall by more than 0.5.
    guard = MetricGuard(task_error, greater_is_better=True, tolerance=0.5, name="task2_error_kept")
    for name, options in (("plain", {}), ("guard", {"guard": guard}), ("budget", {"max_iter": 2, "ridge": 0.1})):
        model = _collapsed_refit_model()
        res = refit_search(model, (fit_x[mine], fit_y[mine]), (score_x[mine], score_y[mine]), loss, **options)
        out[name] = _refit_summary(res, model)
        if rank == 0:
            ref_model = _collapsed_refit_model()
            ref = refit_search(ref_model, (fit_x, fit_y), (score_x, score_y), loss, process_group=False, **options)
            out[name + "/reference"] = _refit_summary(ref, ref_model)
    # LocalSearcher with refit (refused under a process group before): swap search, then the refit stage.
    model = _collapsed_refit_model(1)
    searcher = LocalSearcher(model, loss, method="swap", rng=3, refit=RefitOptions(max_iter=3), fit_data=(fit_x[mine], fit_y[mine]))
    out["searcher"] = _refit_summary(searcher((score_x[mine], score_y[mine])), model)
    if rank == 0:
        ref_model = _collapsed_refit_model(1)
        ref_searcher = LocalSearcher(ref_model, loss, method="swap", rng=3, refit=RefitOptions(max_iter=3),
                                     fit_data=(fit_x, fit_y), process_group=False)
        out["searcher/reference"] = _refit_summary(ref_searcher((score_x, score_y)), ref_model)
    # fit's refit schedule: every rank passes all the data; fit shards the training, search and refit rows.
    schedule = SearchSchedule(every_steps=2, at_start=True, fit_rows=48, rows=64, refit=RefitOptions(max_iter=2))
    kwargs: dict[str, Any] = dict(val_data=(score_x, score_y), epochs=1, batch_size=24, max_steps=2, progress=False,
                                  optimizer=lambda p: torch.optim.SGD(p, lr=0.05), gate_loss_weight=0.0, seed=4)
    model = _collapsed_refit_model(2)
    result = fit(model, (fit_x, fit_y), loss, search=schedule, **kwargs)
    out["fit"] = {"moves": [[m["after"] for m in s["moves"]] for s in result.history.searches],
                  "params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist(),
                  "perms": [p.get().tolist() for p in model.permutations]}
    if rank == 0:
        ref_model = _collapsed_refit_model(2)
        ref_result = fit(ref_model, (fit_x, fit_y), loss, search=schedule, process_group=False, **kwargs)
        out["fit/reference"] = {"moves": [[m["after"] for m in s["moves"]] for s in ref_result.history.searches],
                                "params": torch.cat([p.detach().reshape(-1) for p in ref_model.parameters()]).tolist(),
                                "perms": [p.get().tolist() for p in ref_model.permutations]}
    return out


def case_refit_raise(rank: int, world: int, shards_name: str) -> dict[str, Any]:
    """Rank 1's model has other last layers than rank 0's: every rank refuses to start the refit search."""
    from routing_search.losses import multitask_loss
    from routing_search.search.refit import refit_search

    mine = shard_rows(SHARDS[shards_name], rank)
    model = _collapsed_refit_model(rank)  # a different initialisation on every rank
    fit_x, fit_y = _refit_rows(11)
    refit_search(model, (fit_x[mine], fit_y[mine]), (fit_x[mine], fit_y[mine]), multitask_loss(["mse"] * 3))
    return {}




dist_worker.CASES["refit"] = case_refit
dist_worker.CASES["refit_raise"] = case_refit_raise

if __name__ == "__main__":
    dist_worker.main()
