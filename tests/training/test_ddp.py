"""fit under a gloo process group on CPU, 2 and 3 processes (tests/training/ddp_worker.py is one rank).

Every rank must end with the same parameters and permutations, equal (up to float64 rounding) to a single
process training on the union of the shards with the same global batches; evaluation sums must be right
for unequal and empty shards; a failing rank must stop every rank at once; checkpoints must resume exactly
at another world size where the arithmetic allows it and be refused, saying why, where it does not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from routing_search.training import CheckpointError, fit

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
WORKER = HERE / "ddp_worker.py"


@pytest.fixture(scope="module")
def worker(load_by_path):
    """The rank worker, for building the one-process references in this process."""
    return load_by_path("ddp_worker", WORKER)


def flat(summary: dict) -> np.ndarray:
    return np.concatenate([np.asarray(p, dtype=np.float64) for p in summary["params"]])


def assert_same_run(got: dict, want: dict, *, rtol: float = 1e-10) -> None:
    """Same permutations and search moves; parameters, losses and meters equal up to float64 rounding."""
    assert got["perms"] == want["perms"]
    assert got["moves"] == want["moves"]
    np.testing.assert_allclose(flat(got), flat(want), rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(got["step_loss"], want["step_loss"], rtol=rtol)
    np.testing.assert_allclose(got["val_loss"], want["val_loss"], rtol=rtol)
    np.testing.assert_allclose(got["meters"], want["meters"], rtol=rtol, atol=1e-9)


@pytest.mark.parametrize("world,form", [(2, "tensors"), (3, "dataset_wrapped")])
def test_fit_with_search_agrees_on_every_rank_and_with_one_process(tmp_path, harness, world, form):
    ranks = harness.ok(harness.launch(WORKER, "fit", world, tmp_path, args=(form,)))
    reference = ranks[0]["reference"]
    assert reference["moves"], "the search accepted no move: the comparison would be trivial"
    for r, rank in enumerate(ranks):
        # DDP applies the same averaged gradient everywhere: bit-identical parameters and permutations.
        assert rank["params"] == ranks[0]["params"], f"rank {r} holds other parameters"
        assert rank["perms"] == ranks[0]["perms"] and rank["meters"] == ranks[0]["meters"]
        assert rank["metrics"] == ranks[0]["metrics"] and rank["usage"] == ranks[0]["usage"]
        assert_same_run(rank, reference)
    # The AUC is computed on every rank's predictions, not averaged over ranks (the control differs).
    final_auc = ranks[0]["metrics"][-1]["auc"]
    assert final_auc == pytest.approx(reference["metrics"][-1]["auc"], abs=1e-12)
    assert np.mean([rank["shard_auc"] for rank in ranks]) != pytest.approx(final_auc, abs=1e-6)


@pytest.mark.parametrize("world", [2, 3])
def test_evaluation_sums_over_unequal_and_empty_shards(tmp_path, harness, world):
    ranks = harness.ok(harness.launch(WORKER, "evaluate", world, tmp_path))
    for key, entry in ranks[0].items():
        ref = entry["reference"]
        for r, rank in enumerate(ranks):
            got = rank[key]
            assert got["rows"] == ref["rows"], (key, r)
            assert got["loss"] == pytest.approx(ref["loss"], rel=1e-12), (key, r)
            assert got["metrics"]["mse1"] == pytest.approx(ref["metrics"]["mse1"], rel=1e-12), (key, r)
            assert got["inputs"] == ref["inputs"], (key, r)
            for layer, tasks in ref["usage"].items():
                for g, w in zip(got["usage"][layer], tasks):
                    np.testing.assert_allclose(g["soft"], w["soft"], rtol=1e-12)
                    np.testing.assert_allclose(g["hard"], w["hard"], rtol=1e-12)
    assert "tensors/2" in ranks[0]  # 2 rows over 3 ranks: one rank evaluates an empty shard


def test_a_failing_rank_stops_every_rank_at_once(tmp_path, harness):
    ranks = harness.ok(harness.launch(WORKER, "raise", 3, tmp_path, timeout=60.0))
    error = [rank["error"] for rank in ranks]
    assert error[1]["error"] == "RuntimeError" and "third call" in error[1]["message"]
    for r in (0, 2):
        assert error[r]["error"] == "RankFailedError" and "rank 1" in error[r]["message"], error[r]
    nan = [rank["nan"] for rank in ranks]
    assert all(n["error"] == "FloatingPointError" and "rank(s) [1]" in n["message"] for n in nan), nan
    # RankFailedError / the FloatingPointError naming rank 1 come only from the per-step agreement, never from a
    # collective timeout (that would be gloo's own error), so every rank stopped at the failing step.


@pytest.fixture(scope="module")
def two_process_checkpoints(tmp_path_factory, harness):
    """Checkpoints after epoch 1 (and the uninterrupted 2-epoch runs) of 2-process runs, per variant."""
    base = tmp_path_factory.mktemp("ddp_checkpoints")
    ranks = harness.ok(harness.launch(WORKER, "checkpoint", 2, base, args=(str(base),)))
    return base, ranks


def test_a_two_process_checkpoint_resumes_exactly_in_one_process(two_process_checkpoints, worker):
    base, ranks = two_process_checkpoints
    resumed = fit(worker.build_model(0), worker.make_data(worker.TRAIN_ROWS, 1), worker.rows_loss,
                  **worker.fit_kwargs(epochs=2, checkpoint_dir=base / "plain" / "part", resume=True))
    assert_same_run(worker.run_summary(resumed), ranks[0]["plain"])
    assert ranks[1]["plain"]["params"] == ranks[0]["plain"]["params"]


def test_a_one_process_checkpoint_resumes_exactly_in_two_processes(tmp_path, harness, worker):
    part = tmp_path / "part"
    data = worker.make_data(worker.TRAIN_ROWS, 1)
    fit(worker.build_model(0), data, worker.rows_loss, **worker.fit_kwargs(epochs=1, checkpoint_dir=part))
    full = fit(worker.build_model(0), data, worker.rows_loss, **worker.fit_kwargs(epochs=2))
    ranks = harness.ok(harness.launch(WORKER, "resume", 2, tmp_path, args=(str(part),)))
    for rank in ranks:
        assert_same_run(rank, worker.run_summary(full))


@pytest.mark.parametrize("variant,reason", [("dropout", r"per-rank random streams \['torch'\]"), ("gate_loss", r"\['gate loss'\]")])
def test_a_checkpoint_that_cannot_resume_exactly_at_another_world_size_is_refused(two_process_checkpoints, worker, variant,
                                                                                  reason):
    base, _ = two_process_checkpoints
    build, weight = worker.VARIANTS[variant]
    model = build()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(CheckpointError, match=r"written by 2 process\(es\) and cannot be resumed exactly by 1") as info:
        fit(model, worker.make_data(worker.TRAIN_ROWS, 1), worker.rows_loss,
            **worker.fit_kwargs(epochs=2, checkpoint_dir=base / variant / "part", resume=True, gate_loss_weight=weight))
    assert info.match(reason)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing was loaded


def test_usage_meters_reset_by_a_callback_sum_over_ranks_like_one_process(tmp_path, harness):
    # sync_buffers subtracted the totals of the last sync from a meter reset since: 2 ranks ended with 0 rows
    ranks = harness.ok(harness.launch(WORKER, "reset_usage", 2, tmp_path))
    single = ranks[0]["single"]["meters"]
    assert single[0][-1] == 50.0  # the second epoch's 50 rows, counted after the reset
    for rank in ranks:
        np.testing.assert_allclose(rank["group"]["meters"], single, rtol=1e-10, atol=1e-9)


def test_a_callback_error_on_one_rank_is_agreed_by_agree_on_stop(tmp_path, harness):
    ranks = harness.ok(harness.launch(WORKER, "agree_on_stop", 2, tmp_path, timeout=30.0))
    assert [r["stop"] for r in ranks] == ["rank 1 asked", "rank 1 asked"]
    assert ranks[1]["error"] == ["RuntimeError", "rank 1's callback failed"]
    assert ranks[0]["error"][0] == "RankFailedError"
    assert ranks[0]["error"][1] == "fit stopped because a callback failed on another rank (rank 1: RuntimeError: rank 1's callback failed)"
    assert [r["after"] for r in ranks] == [None, None]


def test_a_callback_or_metric_failing_on_one_rank_fails_every_rank_at_once(tmp_path, harness):
    """Regression: a callback or validation metric that raised on one rank only left the other ranks at their
    next collective until its timeout (gloo's 'Timed out waiting ...'), or pairing it with another collective."""
    ranks = harness.ok(harness.launch(WORKER, "fails_on_one_rank", 2, tmp_path, timeout=30.0))
    for name in ("epoch_end", "search", "at_start", "metric"):
        assert ranks[1][name][0] == "RuntimeError" and "rank 1's" in ranks[1][name][1], name
        assert ranks[0][name][0] == "RankFailedError" and "rank 1: RuntimeError: rank 1's" in ranks[0][name][1], name
