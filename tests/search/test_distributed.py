"""local_search / LocalSearcher / RoutingObjective / Sinkhorn rounding under a gloo process group on CPU.

Each configuration starts 2 or 3 processes once (tests/search/dist_worker.py) on a free port of 127.0.0.1; every rank
holds a shard of the same data and the results must equal a single process searching the concatenated
data: the same permutation, the same moves in the same order, the same number of moves and evaluations,
and the same loss up to the order of a float64 sum.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

WORKER = Path(__file__).with_name("dist_worker.py")


def launch(harness: ModuleType, tmp_path: Path, case: str, shards: str, world: int, *, timeout: float = 60.0, wall: float = 120.0) -> list[dict]:
    """Run ``case`` with the ``shards`` split on ``world`` ranks; each rank's JSON result (in rank order)."""
    return harness.launch(WORKER, case, world, tmp_path, args=(shards,), timeout=timeout, wall=wall)


def ok(results: list[dict]) -> list[dict]:
    for r, res in enumerate(results):
        assert "ok" in res, f"rank {r} failed: {res}"
    return [res["ok"] for res in results]


def assert_same_search(got: dict, ref: dict) -> None:
    assert got["x"] == ref["x"]
    assert got["moves"] == ref["moves"]
    assert (got["nit"], got["nfev"], got["status"]) == (ref["nit"], ref["nfev"], ref["status"])
    assert got["fun"] == pytest.approx(ref["fun"], rel=1e-12, abs=1e-14)
    assert got["fun0"] == pytest.approx(ref["fun0"], rel=1e-12, abs=1e-14)


CONFIGS = [(2, "unequal"), (2, "empty"), (3, "empty3")]


@pytest.fixture(scope="module")
def world_results(tmp_path_factory, harness):
    """Every rank's results of the 'all' case, per (world size, shards); each group is started once."""
    cache: dict[tuple[int, str], list[dict]] = {}

    def get(world: int, shards: str) -> list[dict]:
        if (world, shards) not in cache:
            cache[(world, shards)] = ok(launch(harness, tmp_path_factory.mktemp("dist"), "all", shards, world))
        return cache[(world, shards)]

    return get


@pytest.mark.parametrize("world,shards", CONFIGS)
def test_sharded_search_equals_the_search_on_the_concatenated_data(world_results, world, shards):
    ranks = world_results(world, shards)
    reference = ranks[0]
    for name in ("swap_best", "swap_first_screened", "insertion", "ils", "swap_budget"):
        ref = reference[name + "/reference"]
        assert ref["nit"] > 0  # the problem is improvable: the comparison is not trivial
        for r, rank in enumerate(ranks):
            assert_same_search(rank[name], ref)
            assert rank[name]["model"] == ref["x"], f"rank {r} wrote another permutation into its model"
    assert reference["swap_budget/reference"]["status"] == 1
    for rank in ranks:
        assert_same_search(rank["ddp"], reference["swap_best/reference"])
    callbacks = [rank["callback"] for rank in ranks]
    assert all(c["nit"] == 1 and c["status"] == 1 and c["x"] == callbacks[0]["x"] for c in callbacks)
    obj_ref = reference["objective/reference"]
    for rank in ranks:
        assert rank["objective"]["total_rows"] == obj_ref["total_rows"] == 72
        assert rank["objective"]["fun"] == pytest.approx(obj_ref["fun"], rel=1e-12)
        assert rank["objective"]["values"] == pytest.approx(obj_ref["values"], rel=1e-12)


@pytest.mark.parametrize("world,shards", CONFIGS)
def test_code_moves_searcher_and_sinkhorn_rounding_agree_across_ranks(world_results, world, shards):
    ranks = world_results(world, shards)
    ref = ranks[0]["codes/reference"]
    assert ref["nit"] > 0
    for rank in ranks:
        assert_same_search(rank["codes"], ref)
        assert rank["codes"]["codes"] == ref["codes"]
        for got, want in zip(rank["searcher"], ranks[0]["searcher/reference"]):
            assert_same_search(got, want)
    rounded = [rank["sinkhorn"]["rounded"] for rank in ranks]
    assert all(r == ranks[0]["sinkhorn"]["alone"] for r in rounded)  # rank 0's rounding, everywhere
    assert any(rank["sinkhorn"]["alone"] != rounded[0] for rank in ranks[1:])  # (the ranks' own would differ)


def test_a_rank_that_fails_while_preparing_makes_every_rank_fail_at_once(tmp_path, harness):
    # The collective timeout is far longer than the test's wall limit: rank 0 fails because it was told
    # of rank 1's error by the setup exchange, not because a collective timed out.
    results = launch(harness, tmp_path, "raise_setup", "equal", 2, timeout=600.0, wall=300.0)
    assert "error" in results[1] and results[1]["error"] != "DistributedSearchError"  # rank 1 raises its own error
    assert results[0]["error"] == "DistributedSearchError" and "rank 1" in results[0]["message"]
    assert results[0]["message"].startswith("the search was not started because another rank failed while preparing it (rank 1: ")


def test_agree_and_gather_returns_payloads_in_rank_order_and_names_the_rank_that_failed(tmp_path, harness):
    results = ok(launch(harness, tmp_path, "agree_and_gather", "unequal3", 3))
    for rank, res in enumerate(results):
        assert res["gathered"] == [[0, "x"], [1, "xx"], [2, "xxx"]]
        if rank == 1:  # the rank that failed raises its own error, both times
            assert res["default"] == ["ValueError", "rank 1 has no rows", False]
            assert res["search"] == ["ValueError", "rank 1 has no rows", False]
        else:
            assert res["default"] == ["RankFailedError", "the search stopped because another rank failed (rank 1: ValueError: rank 1 has no rows)", True]
            assert res["search"] == [
                "DistributedSearchError",
                "the search was not started because another rank failed while preparing it (rank 1: ValueError: rank 1 has no rows)",
                True,
            ]


def test_a_rank_that_fails_mid_search_makes_every_rank_fail_within_the_timeout(tmp_path, harness):
    results = launch(harness, tmp_path, "raise_mid", "unequal3", 3, timeout=8.0, wall=90.0)
    assert results[1]["error"] == "RuntimeError" and "rank 1's loss failed" in results[1]["message"]
    for r in (0, 2):
        assert "error" in results[r], f"rank {r} finished although rank 1 failed: {results[r]}"
