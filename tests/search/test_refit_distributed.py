"""The refit search under a gloo process group on CPU (tests/search/refit_dist_worker.py, 2 and 3 processes).

Every rank holds a shard of the fit and score rows; the ridge normal equations and the held-out loss
sums are all-reduced in float64, so the sharded search must equal one process on all the rows: the same
permutations and moves, the same written last layers (to 1e-10), the same loss up to the order of a sum.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

WORKER = Path(__file__).with_name("refit_dist_worker.py")


def assert_same_refit(got: dict, ref: dict) -> None:
    assert got["x"] == ref["x"]
    assert got["moves"] == ref["moves"]
    assert (got["nit"], got["status"], got["guard_rejections"]) == (ref["nit"], ref["status"], ref["guard_rejections"])
    assert got["fun"] == pytest.approx(ref["fun"], rel=1e-10, abs=1e-12)
    assert got["fun0"] == pytest.approx(ref["fun0"], rel=1e-10, abs=1e-12)
    for a, b in zip(got["weights"], ref["weights"]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize(("world", "shards"), [(2, "unequal"), (2, "empty"), (3, "unequal3")])
def test_sharded_refit_equals_one_process(tmp_path: Path, harness: ModuleType, world: int, shards: str) -> None:
    results = harness.ok(harness.launch(WORKER, "refit", world, tmp_path, args=(shards,)))
    ref = results[0]
    assert ref["plain/reference"]["nit"] >= 2  # the search moves: the comparison is not vacuous
    assert ref["guard/reference"]["guard_rejections"] >= 1  # the guard refuses a move the loss accepts
    for name in ("plain", "guard", "budget"):
        for rank, got in enumerate(results):
            assert_same_refit(got[name], ref[name + "/reference"])
            assert got[name]["weights"] == results[0][name]["weights"], f"rank {rank} wrote other weights"
    # The refit LocalSearcher (refused under a process group before) and fit's refit schedule.
    for rank, got in enumerate(results):
        assert got["searcher"]["moves"] == ref["searcher/reference"]["moves"]
        np.testing.assert_allclose(got["searcher"]["weights"], ref["searcher/reference"]["weights"], rtol=0, atol=1e-10)
        assert got["fit"]["moves"] == ref["fit/reference"]["moves"]
        assert got["fit"]["perms"] == ref["fit/reference"]["perms"]
        np.testing.assert_allclose(got["fit"]["params"], ref["fit/reference"]["params"], rtol=0, atol=1e-10)
    assert any(ref["fit/reference"]["moves"])


def test_ranks_with_other_models_refuse_together(tmp_path: Path, harness: ModuleType) -> None:
    results = harness.launch(WORKER, "refit_raise", 2, tmp_path, args=("equal",))
    assert all("error" in r for r in results)
    assert all("last layers" in r["message"] for r in results)
