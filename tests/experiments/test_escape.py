"""The escape-family study: the bad starts are what they claim, the config is checked, a tiny run reports."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from routing_search.experiments.escape import (FAMILIES, EscapeConfig, build_start, curve_summary, expected_best, run_arm,
                                               run_escape, summarise, trials_needed)

TINY = dict(num_experts=4, k=2, num_tasks=2, input_dim=3, hidden=4, num_samples=120, num_keys=8, epochs=1,
            pretrain_epochs=1, batch_size=32, search_every=2, search_rows=32, fit_rows=32, refit_max_iter=2,
            lookahead_candidates=1, lookahead_steps=2)


def test_collapsed_starts_put_every_task_on_the_same_experts() -> None:
    cfg = EscapeConfig(**TINY)
    for family in ("dselect_collapsed", "comet_collapsed"):
        model = build_start(cfg, family, 0).model
        x = torch.randn(5, 3)
        with torch.no_grad():
            weights = model(x).weights
        for w in weights:
            assert set(torch.nonzero(w[0]).flatten().tolist()) == {0, 1}


def test_topk_margin_routes_every_row_to_the_first_k() -> None:
    start = build_start(EscapeConfig(**TINY), "topk_margin", 1)
    with torch.no_grad():
        weights = start.model(start.train[0]).weights
    for w in weights:
        assert set(torch.nonzero(w.sum(0)).flatten().tolist()) == {0, 1}


@pytest.mark.parametrize("family", ["hash_misassigned", "trained_shuffled"])
def test_pretrained_starts_are_deranged(family: str) -> None:
    start = build_start(EscapeConfig(**TINY), family, 2)
    for module in start.model.permutations:
        rows = module.get()
        assert not np.any(rows == np.arange(rows.shape[1]))


def test_starts_are_deterministic_per_seed() -> None:
    cfg = EscapeConfig(**TINY)
    a = build_start(cfg, "trained_shuffled", 3).model.state_dict()
    b = build_start(cfg, "trained_shuffled", 3).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="families"):
        EscapeConfig(families=("nope",))
    with pytest.raises(ValueError, match="control 'random'"):
        EscapeConfig(arms=("sgd", "search"))
    with pytest.raises(ValueError, match="seeds"):
        EscapeConfig(seeds=(1, 1))
    with pytest.raises(ValueError, match="k must"):
        EscapeConfig(num_experts=4, k=4)
    with pytest.raises(TypeError, match="config must be an EscapeConfig"):
        run_escape({"seeds": (0,)})  # type: ignore[arg-type]


def test_summary_counts_paired_wins() -> None:
    cfg = EscapeConfig(families=("topk_margin",), arms=("sgd", "random", "search", "refit"), seeds=(0, 1, 2))
    rows = []
    for seed, (sgd, rnd, ref) in enumerate([(2.0, 1.0, 0.5), (2.0, 1.0, 0.995), (1.0, 1.0, 1.2)]):
        rows += [{"family": "topk_margin", "seed": seed, "arm": a, "test_loss": v, "moves": 0, "seconds": 0.0}
                 for a, v in (("sgd", sgd), ("random", rnd), ("refit", ref))]
    arms = summarise(rows, cfg)["topk_margin"]["arms"]
    assert "search" not in arms  # an arm not run on a family is left out, not an empty comparison
    entry = arms["refit"]
    assert entry["vs_random"]["wins"] == 1 and entry["vs_random"]["losses"] == 1
    assert entry["vs_sgd"]["wins"] == 2 and entry["vs_sgd"]["losses"] == 1
    assert entry["meets_criterion"] is False


def test_trials_needed_and_expected_best() -> None:
    with pytest.deprecated_call(match="stats.trials_needed"):
        assert trials_needed(0.5, 0.9) == 4  # 1 - 0.5**4 = 0.9375 >= 0.9 > 1 - 0.5**3
    with pytest.deprecated_call():
        assert trials_needed(1.0, 0.9) == 1 and trials_needed(0.0, 0.9) == float("inf")
    values = [3.0, 1.0, 2.0]
    assert expected_best(values, 1) == pytest.approx(2.0)
    # min of two draws: P(min = 1) = 5/9, P(min = 2) = 3/9, P(min = 3) = 1/9.
    assert expected_best(values, 2) == pytest.approx((5 * 1 + 3 * 2 + 1 * 3) / 9)


def test_data_seed_and_init_seed_are_separate() -> None:
    cfg = EscapeConfig(**TINY)
    a, b = build_start(cfg, "topk_margin", 0, init_seed=1), build_start(cfg, "topk_margin", 0, init_seed=2)
    assert torch.equal(a.train[1], b.train[1])
    assert not torch.equal(a.model.experts[0][0].weight, b.model.experts[0][0].weight)


def test_tiny_run_writes_the_report(tmp_path) -> None:
    cfg = EscapeConfig(families=("dselect_collapsed", "hash_misassigned"), seeds=(0,), out=str(tmp_path),
                       tune_families=("hash_misassigned",), tune_arms=("sgd", "search"), tune_trials=2, tune_epochs=(1,), **TINY)
    report = run_escape(cfg)
    run_dir = tmp_path / report["run_dir"].split("/")[-1]
    saved = json.loads((run_dir / "report.json").read_text())
    assert len(saved["runs"]) == 2 * len(cfg.arms)
    assert "## dselect_collapsed" in (run_dir / "report.md").read_text()
    assert set(report["summary"]) == {"dselect_collapsed", "hash_misassigned"}
    assert set(report["tuning"]["hash_misassigned"]["arms"]) == {"sgd", "search"}
    tuning = report["tuning"]["hash_misassigned"]
    for arm, entry in tuning["arms"].items():  # stats' figures equal the closed form 1 - (1 - m/T)^N >= probability
        values = [r["test_loss"] for r in tuning["runs"] if r["arm"] == arm]
        m = sum(v <= tuning["target"] for v in values)
        closed = (float("inf") if m == 0 else 1.0 if m == len(values) else
                  float(np.ceil(np.log(1 - cfg.tune_probability) / np.log(1 - m / len(values)) - 1e-12)))
        assert entry["trials_needed"] == closed and entry["reach_fraction"] == m / len(values)
        assert entry["expected_best"]["2"] == pytest.approx(np.mean([min(a, b) for a in values for b in values]))
    assert "## Tuning budget" in (run_dir / "report.md").read_text()
    for row in report["runs"]:
        assert np.isfinite(row["test_loss"])


def test_search_arms_never_raise_the_held_out_loss_of_the_start() -> None:
    cfg = EscapeConfig(**TINY)
    start = build_start(cfg, "hash_misassigned", 0)
    row = run_arm(cfg, start, "search")
    assert row["moves"] >= 1  # trained experts behind a deranged hash: the frozen search sees it
    assert FAMILIES[3] == "hash_misassigned"


def test_curves_record_test_loss_along_training(tmp_path) -> None:
    tiny = dict(TINY, epochs=3)
    cfg = EscapeConfig(families=("hash_misassigned",), seeds=(0, 1), out=str(tmp_path), curve=True, patience=None, **tiny)
    report = run_escape(cfg)
    steps = None
    for row in report["runs"]:
        curve = row["curve"]
        assert len(curve) == cfg.epochs + 1 and curve[0][0] == 0  # after the start, then after every epoch
        assert [s for s, _ in curve] == sorted({s for s, _ in curve})
        steps = steps or [s for s, _ in curve]
        assert [s for s, _ in curve] == steps  # the same steps for every arm (same data and batch size)
        if row["arm"] == "sgd":
            assert curve[0][1] == pytest.approx(row["start_test_loss"])  # sgd starts at the bad start itself
            # the final test loss is the best validation epoch's, a point of the curve (restore_best)
            assert any(v == pytest.approx(row["test_loss"]) for _, v in curve[1:])
    summary = curve_summary(report["runs"], cfg, "hash_misassigned")
    assert summary["arms"]["sgd"]["reached"] == 2  # sgd's final loss is on its own curve
    for arm, entry in summary["arms"].items():
        for seed, step in zip(summary["seeds"], entry["steps_to_target"]):
            row = next(r for r in report["runs"] if r["arm"] == arm and r["seed"] == seed)
            target = next(r for r in report["runs"] if r["arm"] == "sgd" and r["seed"] == seed)["test_loss"]
            hits = [s for s, v in row["curve"] if v <= target]
            assert step == (hits[0] if hits else None)
        assert set(entry["budgets"]) == {"0", "1", "2", "3"}
    run_dir = tmp_path / report["run_dir"].split("/")[-1]
    assert "## Test loss along training" in (run_dir / "report.md").read_text()
    with pytest.raises(ValueError, match="curve=True"):
        curve_summary([dict(r, curve=[]) for r in report["runs"]], cfg, "hash_misassigned")
    with pytest.raises(TypeError, match="curve must be True or False"):
        EscapeConfig(curve=1)  # type: ignore[arg-type]


def test_curve_summary_rejects_a_bad_budget_naming_it():
    # a negative budget was dropped silently and a fractional one truncated to an epoch it did not name
    cfg = EscapeConfig(families=("hash_misassigned",), seeds=(0,), curve=True)
    with pytest.raises(ValueError, match="budgets entry"):
        curve_summary([], cfg, "hash_misassigned", budgets=(0, -1))
    with pytest.raises(TypeError, match="budgets entry"):
        curve_summary([], cfg, "hash_misassigned", budgets=(0, 1.5))  # type: ignore[arg-type]
