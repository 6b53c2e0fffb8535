"""The escape study counts wins and losses with ``stats.paired_comparison`` under its published rule.

Published rule (README, "Escaping bad starts"): a win is a test loss at least ``win_threshold`` below the
control's, a loss one *more than* ``win_threshold`` above it. Boundary cases use values whose ratios are
exact in binary floating point (threshold 0.25, losses 3, 4, 5), so "exactly at the threshold" is exact.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from routing_search.experiments.escape import (ESCAPE_WORSE_RULE, EscapeConfig, compare_to_control, curve_summary,
                                               meets_criterion, summarise, write_report)
from routing_search.experiments.stats import WORSE_RULES, mean_se, paired_comparison


def _published_rule(arm: list[float], control: list[float], threshold: float) -> tuple[int, int]:
    """The rule the README's figures were counted with (escape's former private ``_compare``)."""
    ratios = [a / c for a, c in zip(arm, control)]
    return sum(r <= 1 - threshold for r in ratios), sum(r > 1 + threshold for r in ratios)


def test_worse_rule_decides_a_seed_exactly_at_the_threshold() -> None:
    arm, control = [3.0, 5.0, 6.0], [4.0, 4.0, 4.0]  # 25 % better, exactly 25 % worse, 50 % worse
    at_least = paired_comparison(arm, control, higher_is_better=False, threshold=0.25)
    more_than = paired_comparison(arm, control, higher_is_better=False, threshold=0.25, worse_rule="more_than")
    assert (at_least["better"], at_least["worse"], at_least["worse_rule"]) == (1, 2, "at_least")
    assert (more_than["better"], more_than["worse"], more_than["worse_rule"]) == (1, 1, "more_than")
    # the same in the other direction (higher is better): 3 is exactly 25 % below 4
    up = paired_comparison([5.0, 3.0, 2.0], control, higher_is_better=True, threshold=0.25, worse_rule="more_than")
    assert (up["better"], up["worse"]) == (1, 1)
    assert WORSE_RULES == ("at_least", "more_than")


def test_worse_rule_is_checked_naming_the_argument() -> None:
    with pytest.raises(ValueError, match="worse_rule must be one of 'at_least', 'more_than'"):
        paired_comparison([1.0], [1.0], higher_is_better=False, worse_rule="strict")


def test_escape_counts_follow_the_published_rule_at_the_boundary() -> None:
    assert ESCAPE_WORSE_RULE == "more_than"
    c = compare_to_control([3.0, 5.0, 6.0, 4.0], [4.0, 4.0, 4.0, 4.0], threshold=0.25)
    assert (c["wins"], c["losses"], c["seeds"]) == (1, 1, 4) == (*_published_rule([3.0, 5.0, 6.0, 4.0], [4.0] * 4, 0.25), 4)
    assert c["ratios"] == [0.75, 1.25, 1.5, 1.0] and c["median_ratio"] == pytest.approx(1.125)
    assert set(c) >= {"wins", "losses", "seeds", "median_ratio", "ratios"}  # the keys reports and README figures read


def test_escape_counts_equal_the_published_rule_on_random_losses() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 12))
        control = rng.uniform(0.05, 2.0, n)
        arm = control * rng.uniform(0.9, 1.1, n)  # many seeds near the ±1 % boundaries
        c = compare_to_control(arm.tolist(), control.tolist(), threshold=0.01)
        assert (c["wins"], c["losses"]) == _published_rule(arm.tolist(), control.tolist(), 0.01)
        assert c["median_ratio"] == pytest.approx(float(np.median(arm / control)), rel=1e-15)


def test_a_seed_exactly_at_the_threshold_worse_than_sgd_still_meets_the_criterion() -> None:
    cfg = EscapeConfig(families=("topk_margin",), arms=("sgd", "random", "refit"), seeds=(0, 1, 2, 3, 4), win_threshold=0.25)
    rows = []
    for seed in cfg.seeds:
        sgd, refit = (4.0, 5.0) if seed == 0 else (8.0, 2.0)  # seed 0: refit exactly 25 % worse than sgd
        rows += [{"family": "topk_margin", "seed": seed, "arm": a, "test_loss": v, "moves": 0, "seconds": 0.0}
                 for a, v in (("sgd", sgd), ("random", 8.0), ("refit", refit))]
    entry = summarise(rows, cfg)["topk_margin"]["arms"]["refit"]
    assert entry["vs_sgd"]["losses"] == 0 and entry["vs_random"]["wins"] == 5
    assert entry["meets_criterion"] is True and meets_criterion(entry["vs_random"], entry["vs_sgd"]) is True
    worse = [dict(r, test_loss=5.5) if (r["seed"], r["arm"]) == (0, "refit") else r for r in rows]
    assert summarise(worse, cfg)["topk_margin"]["arms"]["refit"]["meets_criterion"] is False


def test_summary_spread_is_stats_mean_se_and_one_seed_reports_no_spread(tmp_path) -> None:
    cfg = EscapeConfig(families=("topk_margin",), arms=("sgd", "random"), seeds=(0, 1, 2), win_threshold=0.05)
    rows = [{"family": "topk_margin", "seed": s, "arm": a, "test_loss": v + s, "moves": 0, "seconds": 0.0}
            for s in cfg.seeds for a, v in (("sgd", 1.0), ("random", 2.0))]
    entry = summarise(rows, cfg)["topk_margin"]["arms"]["sgd"]
    expected = mean_se([1.0, 2.0, 3.0])
    assert (entry["mean"], entry["se"]) == (expected["mean"], expected["se"])
    one = EscapeConfig(families=("topk_margin",), arms=("sgd", "random"), seeds=(0,), win_threshold=0.05)
    summary = summarise([r for r in rows if r["seed"] == 0], one)
    assert summary["topk_margin"]["arms"]["sgd"]["se"] is None  # not NaN: report.json stays valid JSON
    write_report(tmp_path, one, [r for r in rows if r["seed"] == 0], summary)
    json.loads((tmp_path / "report.json").read_text())  # strict JSON (no NaN)
    text = (tmp_path / "report.md").read_text()
    assert "| sgd | 1.0000 ± – |" in text
    assert "at least 5 % lower / more than 5 % higher" in text  # the threshold the counts used, not a fixed 1 %


def test_curve_budgets_count_with_the_same_rule() -> None:
    cfg = EscapeConfig(families=("hash_misassigned",), arms=("sgd", "random", "search"), seeds=(0, 1), curve=True,
                       epochs=1, win_threshold=0.25)
    rows = []
    for seed, (search_end, random_end) in enumerate([(5.0, 4.0), (3.0, 4.0)]):  # exactly 25 % worse; 25 % better
        for arm, end in (("sgd", 4.0), ("random", random_end), ("search", search_end)):
            rows.append({"family": "hash_misassigned", "seed": seed, "arm": arm, "test_loss": end,
                         "curve": [[0, 8.0], [10, end]]})
    at_end = curve_summary(rows, cfg, "hash_misassigned")["arms"]["search"]["budgets"]["1"]
    assert (at_end["wins"], at_end["losses"], at_end["seeds"]) == (1, 0, 2)



def test_a_tie_is_neither_better_nor_worse_at_threshold_zero() -> None:
    # threshold 0 counted a tied seed both better (r >= 0) and worse (r <= -0): 2/2 better and 2/2 worse
    tied = paired_comparison([1.0, 2.0, 3.0], [1.0, 2.0, 2.5], higher_is_better=True, threshold=0)
    assert (tied["better"], tied["worse"]) == (1, 0)
    lower = paired_comparison([1.0, 2.0, 3.0], [1.0, 2.0, 2.5], higher_is_better=False, threshold=0.0)
    assert (lower["better"], lower["worse"]) == (0, 1)
    # the escape study at win_threshold 0: a tie with random is no win, so it cannot meet the criterion by ties
    c = compare_to_control([1.0, 1.0, 0.5], [1.0, 1.0, 1.0], threshold=0.0)
    assert (c["wins"], c["losses"]) == (1, 0)
    for rule in WORSE_RULES:
        r = paired_comparison([4.0, 4.0], [4.0, 4.0], higher_is_better=False, threshold=0.0, worse_rule=rule)
        assert (r["better"], r["worse"]) == (0, 0)


def test_the_curve_table_prints_the_median_steps_it_computed(tmp_path) -> None:
    # the seeds reach sgd's loss at steps 0 and 5: median 2.5, printed as '2' (format .0f rounds half to even)
    cfg = EscapeConfig(families=("topk_margin",), arms=("sgd", "random", "search"), seeds=(0, 1), curve=True, epochs=1)
    rows = []
    for seed, search_curve in enumerate([[[0, 1.0], [5, 1.0]], [[0, 9.0], [5, 1.0]]]):
        for arm, curve in (("sgd", [[0, 9.0], [5, 2.0]]), ("random", [[0, 9.0], [5, 3.0]]), ("search", search_curve)):
            rows.append({"family": "topk_margin", "seed": seed, "arm": arm, "test_loss": curve[-1][1], "moves": 0,
                         "seconds": 0.0, "curve": curve})
    assert curve_summary(rows, cfg, "topk_margin")["arms"]["search"]["median_steps"] == 2.5
    write_report(tmp_path, cfg, rows, summarise(rows, cfg))
    assert "| search | 2/2 | 2.5 |" in (tmp_path / "report.md").read_text()


def test_report_json_is_standard_json_when_a_tuning_arm_never_reaches_the_target(tmp_path) -> None:
    # trials_needed = inf (no trial of the arm reached the target) was written as the non-standard token Infinity
    cfg = EscapeConfig(families=("topk_margin",), arms=("sgd", "random"), seeds=(0,), tune_families=("topk_margin",),
                       tune_arms=("sgd", "random"))
    rows = [{"family": "topk_margin", "seed": 0, "arm": a, "test_loss": v, "moves": 0, "seconds": 0.0}
            for a, v in (("sgd", 1.0), ("random", 2.0))]
    arm = {"reach_fraction": 0.0, "trials_needed": float("inf"), "expected_best": {str(n): 2.0 for n in (1, 2, 4, 8)},
           "median": 2.0}
    tuning = {"topk_margin": {"target": 1.0, "arms": {"sgd": dict(arm, reach_fraction=1.0, trials_needed=1.0), "random": arm},
                              "runs": []}}
    write_report(tmp_path, cfg, rows, summarise(rows, cfg), tuning)
    saved = json.loads((tmp_path / "report.json").read_text(),
                       parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert saved["tuning"]["topk_margin"]["arms"]["random"]["trials_needed"] == "inf"
    assert saved["tuning"]["topk_margin"]["arms"]["sgd"]["trials_needed"] == 1.0
    assert tuning["topk_margin"]["arms"]["random"]["trials_needed"] == float("inf")  # the caller's dict is unchanged


def test_write_report_never_replaces_a_report(tmp_path) -> None:
    cfg = EscapeConfig(families=("topk_margin",), arms=("sgd", "random"), seeds=(0,))
    rows = [{"family": "topk_margin", "seed": 0, "arm": a, "test_loss": v, "moves": 0, "seconds": 0.0}
            for a, v in (("sgd", 1.0), ("random", 2.0))]
    (tmp_path / "report.md").write_text("an earlier report")
    with pytest.raises(FileExistsError, match="report.md already exists"):
        write_report(tmp_path, cfg, rows, summarise(rows, cfg))
    assert (tmp_path / "report.md").read_text() == "an earlier report" and not (tmp_path / "report.json").exists()
