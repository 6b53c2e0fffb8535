"""One rank of the multi-process search tests (tests/search/test_distributed.py); not collected by pytest.

    python tests/search/dist_worker.py RANK WORLD PORT CASE TIMEOUT OUT_JSON SHARDS

Joins a gloo group on 127.0.0.1:PORT, runs the named case and writes its results (or the error it
raised) as JSON to OUT_JSON. Every rank builds the same model and the same full data set and keeps its
shard; rank 0 also runs the same searches on the concatenated data in a single process (the reference).
"""

from __future__ import annotations

import copy
import json
import sys
import traceback
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from routing_search.distributed import RankFailedError, agree_and_gather
from routing_search.gates import DSelectK, TopK
from routing_search.layers import MoE, MultiGateMoE, make_experts
from routing_search.search import DistributedSearchError, RoutingObjective, SinkhornPermutation, local_search
from routing_search.search.objective import PREPARATION_FAILED
from routing_search.search.codes import set_selector_slot
from routing_search.training import LocalSearcher

D, U, ROWS = 4, 3, 72

SHARDS = {
    "equal": [36, 36],
    "unequal": [10, 62],
    "empty": [0, 72],
    "unequal3": [5, 40, 27],
    "empty3": [30, 0, 42],
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def multitask_rows(preds: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(preds[0].squeeze(1), y[:, 0], reduction="none")
    return bce + 0.5 * (preds[1].squeeze(1) - y[:, 1]) ** 2


def mse_rows(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((pred - y) ** 2).sum(dim=1)


def multigate(seed: int = 0, n: int = 6) -> MultiGateMoE:
    torch.manual_seed(seed)
    experts = make_experts(n, D, [8], U, generator=_gen(seed)).double()
    gates = [TopK(num_experts=n, k=2, input_dim=D).double() for _ in range(2)]
    towers = [nn.Linear(U, 1).double() for _ in range(2)]
    model = MultiGateMoE(experts, gates, towers, share_permutation=False)
    rng = np.random.default_rng(seed + 1)
    for perm in model.permutations:
        perm.set(rng.permutation(n))
    return model


def multitask_data(model: nn.Module, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(ROWS, D, generator=_gen(seed), dtype=torch.float64)
    teacher = copy.deepcopy(model)
    for perm in teacher.permutations:
        perm.reset()
    with torch.no_grad():
        out = teacher(x).outputs
    y = torch.stack([(out[0][:, 0] > 0).double(), out[1][:, 0] + 0.1 * torch.randn(ROWS, generator=_gen(seed + 1), dtype=torch.float64)], dim=1)
    return x, y


def shard_rows(shards: list[int], rank: int) -> slice:
    start = sum(shards[:rank])
    return slice(start, start + shards[rank])


def summary(res: Any) -> dict[str, Any]:
    return {
        "fun": float(res.fun),
        "fun0": float(res.fun0),
        "x": [s.tolist() for s in res.x],
        "nit": int(res.nit),
        "nfev": int(res.nfev),
        "status": int(res.status),
        "moves": [[m.kind, m.slot, m.selector, m.before, m.after, m.extra.get("state")] for m in res.moves],
    }


SEARCHES: list[tuple[str, str, dict[str, Any]]] = [
    ("swap_best", "swap", {}),
    ("swap_first_screened", "swap", {"strategy": "first", "screen": 3}),
    ("insertion", "insertion", {"max_iter": 6}),
    ("ils", "ils", {"perturbations": 4, "strength": 2}),
    ("swap_budget", "swap", {"max_evals": 40}),
]


def case_searches(rank: int, world: int, shards_name: str) -> dict[str, Any]:
    shards = SHARDS[shards_name]
    assert len(shards) == world
    base = multigate(0)
    x, y = multitask_data(base)
    mine = shard_rows(shards, rank)
    out: dict[str, Any] = {}
    for name, method, options in SEARCHES:
        model = copy.deepcopy(base)
        rng = 100 + rank  # different on every rank: the search must use rank 0's stream
        res = local_search(model, (x[mine], y[mine]), multitask_rows, method, rng=rng, **options)
        out[name] = summary(res)
        out[name]["model"] = [p.get().tolist() for p in model.permutations]
        if rank == 0:
            ref = local_search(copy.deepcopy(base), (x, y), multitask_rows, method, rng=100, process_group=False, **options)
            out[name + "/reference"] = summary(ref)
    # A model wrapped in DistributedDataParallel is searched through its .module (no DDP collectives).
    ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(base))
    out["ddp"] = summary(local_search(ddp, (x[mine], y[mine]), multitask_rows, "swap"))
    # A callback that asks to stop on one rank only stops every rank.
    model = copy.deepcopy(base)
    res = local_search(model, (x[mine], y[mine]), multitask_rows, "swap", callback=lambda r: rank == world - 1)
    out["callback"] = summary(res)
    # The objective itself: values of a few candidate states equal the single-process values on the union.
    obj = RoutingObjective(copy.deepcopy(base), (x[mine], y[mine]), multitask_rows)
    states = [[np.roll(s, k, axis=1) for s in obj.current()] for k in range(3)]
    out["objective"] = {"fun": obj.fun, "total_rows": obj.total_rows, "values": [obj.value_of(s) for s in states]}
    if rank == 0:
        ref_obj = RoutingObjective(copy.deepcopy(base), (x, y), multitask_rows, process_group=False)
        out["objective/reference"] = {"fun": ref_obj.fun, "total_rows": ref_obj.total_rows, "values": [ref_obj.value_of(s) for s in states]}
    return out


def case_codes_and_searcher(rank: int, world: int, shards_name: str) -> dict[str, Any]:
    shards = SHARDS[shards_name]
    mine = shard_rows(shards, rank)
    out: dict[str, Any] = {}
    # Code moves of a static binary DSelect-k gate.
    n = 5
    torch.manual_seed(3)
    layer = MoE(make_experts(n, D, [6], U, generator=_gen(3)).double(), DSelectK(num_experts=n, k=2, input_dim=None).double())
    teacher = copy.deepcopy(layer)
    with torch.no_grad():
        for j in range(2):
            set_selector_slot(teacher.gate, j, n - 1 - j)
            set_selector_slot(layer.gate, j, j)
    x = torch.randn(ROWS, D, generator=_gen(4), dtype=torch.float64)
    with torch.no_grad():
        y = teacher(x).output + 0.05 * torch.randn(ROWS, U, generator=_gen(5), dtype=torch.float64)
    model = copy.deepcopy(layer)
    res = local_search(model, (x[mine], y[mine]), mse_rows, "codes")
    out["codes"] = summary(res) | {"codes": res.codes}
    if rank == 0:
        ref = local_search(copy.deepcopy(layer), (x, y), mse_rows, "codes", process_group=False)
        out["codes/reference"] = summary(ref) | {"codes": ref.codes}
    # LocalSearcher: two rounds of ILS with a rank-dependent seed; ranks agree with the single process.
    base = multigate(7)
    xm, ym = multitask_data(base, seed=8)
    model = copy.deepcopy(base)
    searcher = LocalSearcher(model, multitask_rows, method="ils", rng=5 + rank, perturbations=3)
    rounds = [summary(searcher((xm[mine], ym[mine]))) for _ in range(2)]
    out["searcher"] = rounds
    if rank == 0:
        ref_model = copy.deepcopy(base)
        ref = LocalSearcher(ref_model, multitask_rows, method="ils", rng=5, perturbations=3, process_group=False)
        out["searcher/reference"] = [summary(ref((xm, ym))) for _ in range(2)]
    # Sinkhorn rounding: every rank holds a different log_alpha; all freeze rank 0's rounding.
    wrapper = SinkhornPermutation(TopK(num_experts=6, k=2, input_dim=D), anneal_steps=1, tau_start=1.0, tau_end=1.0,
                                  init_scale=3.0, generator=_gen(50 + rank))
    alone = copy.deepcopy(wrapper).round_(process_group=False)
    out["sinkhorn"] = {"alone": alone.tolist(), "rounded": wrapper.round_().tolist()}
    return out


def case_raise_setup(rank: int, world: int, shards_name: str) -> dict[str, Any]:
    base = multigate(0)
    x, y = multitask_data(base)
    mine = shard_rows(SHARDS[shards_name], rank)
    targets = y[mine] if rank != 1 else y[mine][:, :1]  # rank 1's targets have the wrong shape: its loss raises
    local_search(base, (x[mine], targets), multitask_rows, "swap")
    return {}


def case_raise_mid(rank: int, world: int, shards_name: str) -> dict[str, Any]:
    base = multigate(0)
    x, y = multitask_data(base)
    mine = shard_rows(SHARDS[shards_name], rank)
    calls = [0]

    def loss(preds: list[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if rank == 1 and calls[0] == 6:
            raise RuntimeError("rank 1's loss failed in the middle of the search")
        return multitask_rows(preds, t)

    local_search(base, (x[mine], y[mine]), loss, "swap")
    return {}


def case_agree_and_gather(rank: int, world: int, shards_name: str) -> dict[str, Any]:
    """Gather one payload per rank; then rank 1 fails, with the default error and with a search's."""
    out: dict[str, Any] = {"gathered": agree_and_gather(None, dist.group.WORLD, "counting", [rank, "x" * (rank + 1)])}
    for name, kwargs in (("default", {}), ("search", {"error_type": DistributedSearchError, "message": PREPARATION_FAILED})):
        error = ValueError(f"rank {rank} has no rows") if rank == 1 else None
        try:
            agree_and_gather(error, dist.group.WORLD, "the search", {"rows": rank}, **kwargs)
            out[name] = None
        except (RankFailedError, ValueError) as exc:
            out[name] = [type(exc).__name__, str(exc), isinstance(exc, RankFailedError)]
    return out


def case_all(rank: int, world: int, shards_name: str) -> dict[str, Any]:
    return case_searches(rank, world, shards_name) | case_codes_and_searcher(rank, world, shards_name)


CASES = {
    "all": case_all,
    "searches": case_searches,
    "codes_and_searcher": case_codes_and_searcher,
    "raise_setup": case_raise_setup,
    "agree_and_gather": case_agree_and_gather,
    "raise_mid": case_raise_mid,
}


def main() -> None:
    rank, world, port = (int(v) for v in sys.argv[1:4])
    # tests/mp_harness.py's order: rank world port case timeout out, then the shards split
    case, timeout, out_path, shards_name = sys.argv[4], float(sys.argv[5]), sys.argv[6], sys.argv[7]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=timeout)
    )
    try:
        result: dict[str, Any] = {"ok": CASES[case](rank, world, shards_name)}
    except DistributedSearchError as exc:
        result = {"error": "DistributedSearchError", "message": str(exc)}
    except Exception as exc:  # the test checks which error each rank saw
        result = {"error": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}
    with open(out_path, "w") as f:
        json.dump(result, f)
    if "ok" in result:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
