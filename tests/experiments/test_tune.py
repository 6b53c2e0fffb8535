"""Tuning budgets: trials needed without assuming monotonicity, a pooled target, "not reached" as a lower
bound, the ratio of trials needed with a paired bootstrap, and the report that states them."""

from __future__ import annotations

import importlib
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from routing_search.experiments import MetricSpec, make_tune_config
from routing_search.experiments.stats import reach_probability, trials_needed
from routing_search.experiments.tune import TuneTrial, run_tune, summarise_tune, write_tune_report

cli_main = importlib.import_module("routing_search.cli.main")  # the module (the package exports its main function)


def _trials(values: dict[str, list[tuple[float, float]]], gate: str = "topk") -> list[TuneTrial]:
    """TuneTrials from ``{arm: [(val, test), ...]}``, trial ``i`` of every arm paired."""
    return [TuneTrial(i, gate, arm, {}, v, t, 0.0) for arm, rows in values.items() for i, (v, t) in enumerate(rows)]


def _brute_needed(scores, values, target, p, *, replace):
    upper = len(scores) if not replace else 400
    for n in range(1, upper + 1):
        # exact probabilities such as C(5, 2) / C(6, 3) = 0.5 may land a rounding error below p
        if reach_probability(scores, values, target, n, higher_is_better=True, replace=replace) >= p - 1e-12:
            return n
    return None


# ------------------------------------------------------------------------------ trials needed
def test_trials_needed_when_the_best_by_validation_trial_misses():
    # 9 of 10 trials reach the target, but the one with the best validation score does not: one draw
    # reaches it with probability 0.9, and more draws make the miss likelier. The old binary search
    # assumed monotonicity, looked at N = 100 000 first and answered "never".
    scores = list(range(1, 11))
    values = [1.0] * 9 + [0.0]
    assert trials_needed(scores, values, 1.0, probability=0.9, higher_is_better=True) == 1
    assert trials_needed(scores, values, 1.0, probability=0.9, higher_is_better=True, replace=False) == 1
    assert trials_needed(scores, values, 1.0, probability=0.95, higher_is_better=True) is None


def test_trials_needed_is_the_smallest_n_by_brute_force():
    rng = np.random.default_rng(11)
    for _ in range(60):
        t = int(rng.integers(1, 9))
        scores = rng.normal(size=t)
        values = scores + rng.normal(scale=1.0, size=t)  # validation and test disagree
        target = float(rng.choice(values))
        p = float(rng.choice([0.5, 0.8, 0.9]))
        for replace in (True, False):
            got = trials_needed(scores, values, target, probability=p, higher_is_better=True, replace=replace)
            assert got == _brute_needed(scores, values, target, p, replace=replace)


# ------------------------------------------------------------------------------ summary
def test_target_is_the_pooled_quantile_and_does_not_favour_an_arm():
    rng = np.random.default_rng(0)
    a = [(float(v), float(v + e)) for v, e in zip(rng.normal(size=12), rng.normal(scale=0.1, size=12))]
    b = [(float(v), float(v + e)) for v, e in zip(rng.normal(1, size=12), rng.normal(scale=0.1, size=12))]
    s1 = summarise_tune(_trials({"sgd": a, "search": b}), higher_is_better=False, target=None, probability=0.9, bootstrap=0)
    s2 = summarise_tune(_trials({"sgd": b, "search": a}), higher_is_better=False, target=None, probability=0.9, bootstrap=0)
    pooled = [t for _, t in a + b]
    assert s1["topk"]["target"] == pytest.approx(float(np.quantile(pooled, 0.2)))  # lower is better: best 20 %
    assert s1["topk"]["target"] == s2["topk"]["target"]
    assert s1["topk"]["arms"]["sgd"]["reaching_target"] == s2["topk"]["arms"]["search"]["reaching_target"]
    high = summarise_tune(_trials({"sgd": a, "search": b}), higher_is_better=True, target=None, probability=0.9, bootstrap=0)
    assert high["topk"]["target"] == pytest.approx(float(np.quantile(pooled, 0.8)))


def test_selection_is_by_validation_and_the_value_reported_is_test():
    # the best-validation trial has the worst test value: best of all must report that test value
    rows = [(0.1, 0.5), (0.2, 0.4), (0.3, 0.3), (0.9, 0.9)]
    s = summarise_tune(_trials({"sgd": rows, "search": rows}), higher_is_better=True, target=0.85, probability=0.9, bootstrap=0)
    e = s["topk"]["arms"]["sgd"]
    assert e["best_of_n"][-1] == pytest.approx(0.9)
    assert e["trials_needed_without_replacement"] == 4 and e["reaching_target"] == 1


def test_ratio_of_trials_needed_with_bootstrap():
    # selection by the test value itself; 1 of 10 sgd trials and 5 of 10 search trials reach 1.0:
    # sgd needs 22 draws (1 - 0.9^22 >= 0.9), search 4 (1 - 0.5^4 >= 0.9): ratio 5.5
    sgd = [(1.0, 1.0)] + [(0.0, 0.0)] * 9
    search = [(1.0, 1.0)] * 5 + [(0.0, 0.0)] * 5
    trials = _trials({"sgd": sgd, "search": search})
    s = summarise_tune(trials, higher_is_better=True, target=1.0, probability=0.9, bootstrap=300, rng=4)
    assert s["topk"]["arms"]["sgd"]["trials_needed"] == 22 and s["topk"]["arms"]["search"]["trials_needed"] == 4
    r = s["topk"]["ratios"]["sgd"]
    assert r["ratio"] == pytest.approx(5.5)
    # from the pool: sgd needs 9 (P = N / 10), search 3 (1 - C(5, 3) / C(10, 3) = 0.92)
    assert r["ratio_without_replacement"]["value"] == pytest.approx(9 / 3)
    b = r["bootstrap"]
    assert b["resamples"] == 300
    low, mid, high = (math.inf if x == "inf" else x for x in (b["q05"], b["median"], b["q95"]))
    assert low <= mid <= high and low < 5.5 < high
    again = summarise_tune(trials, higher_is_better=True, target=1.0, probability=0.9, bootstrap=300, rng=4)
    assert again["topk"]["ratios"] == s["topk"]["ratios"]  # seeded


def test_not_reached_is_reported_as_a_lower_bound():
    sgd = [(float(i), 0.0) for i in range(8)]
    search = [(float(i), 1.0) for i in range(8)]
    s = summarise_tune(_trials({"sgd": sgd, "search": search}), higher_is_better=True, target=1.0, probability=0.9, bootstrap=50)
    e = s["topk"]["arms"]["sgd"]
    assert e["trials_needed"] is None and e["trials_needed_without_replacement"] is None
    r = s["topk"]["ratios"]["sgd"]
    assert r["ratio"] == "inf"
    assert r["ratio_without_replacement"] == {"value": None, "at_least": 9.0}  # sgd needs more than 8, search 1
    assert r["bootstrap"]["at_least_10x"] == 1.0
    # neither arm reaching the target leaves the ratio undefined, not 1 or 0
    s = summarise_tune(_trials({"sgd": sgd, "search": sgd}), higher_is_better=True, target=1.0, probability=0.9, bootstrap=20)
    assert s["topk"]["ratios"]["sgd"]["ratio"] is None and s["topk"]["ratios"]["sgd"]["bootstrap"]["undefined"] == 20


def test_target_sweep_and_bad_input():
    rng = np.random.default_rng(2)
    rows = {arm: [(float(x), float(x)) for x in rng.normal(size=10)] for arm in ("sgd", "random", "search")}
    s = summarise_tune(_trials(rows), higher_is_better=True, target=None, probability=0.9, bootstrap=10)
    assert set(s["topk"]["ratios"]) == {"sgd", "random"}
    sweep = s["topk"]["target_sweep"]
    assert [e["quantile"] for e in sweep] == [0.5, 0.75, 0.8, 0.9, 0.95]
    assert all(set(e["ratio"]) == {"sgd", "random"} for e in sweep)
    assert [e["target"] for e in sweep] == sorted(e["target"] for e in sweep)
    unpaired = _trials({"sgd": rows["sgd"], "search": rows["search"][:9]})
    with pytest.raises(ValueError, match="paired"):
        summarise_tune(unpaired, higher_is_better=True, target=None, probability=0.9)
    with pytest.raises(ValueError, match="quantile"):
        summarise_tune(unpaired, higher_is_better=True, target=None, probability=0.9, quantile=1.0)


def test_report_states_the_ratio_and_the_lower_bound(tmp_path):
    config = make_tune_config("synthetic", "cpu", trials=8, seed=3)
    sgd = [(float(i), 0.0) for i in range(8)]
    search = [(float(i), 1.0 if i % 2 else 0.0) for i in range(8)]
    data = SimpleNamespace(metrics=[MetricSpec("auc", lambda p, t: 0.0, True)])
    report = write_tune_report(config, _trials({"sgd": sgd, "search": search}), data, tmp_path, plots=False)  # type: ignore[arg-type]
    json.loads((tmp_path / "tune.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    md = (tmp_path / "tune.md").read_text()
    assert "| topk | sgd |" in md and "> 8 | never |" in md
    assert "Ratio of trials needed" in md and "| topk | sgd / search | ∞ |" in md and "≥ 1.1 |" in md
    assert "Other targets" in md
    assert report["summary"]["topk"]["ratios"]["sgd"]["ratio_without_replacement"]["at_least"] == pytest.approx(9 / 8)  # search needs all 8
    with pytest.raises(FileExistsError):
        write_tune_report(config, _trials({"sgd": sgd, "search": search}), data, tmp_path, plots=False)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ command line
def test_tune_max_train_reaches_the_config(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(cli_main, "run_tune_command", lambda config, **kw: seen.append(config))
    assert cli_main.main(["tune", "movielens", "--trials", "3", "--max-train", "500", "--no-progress"]) == 0
    assert seen[0].experiment.data.max_train == 500 and seen[0].trials == 3
    assert cli_main.main(["tune", "keyed", "--max-train", "500"]) == 2
    assert "--max-train" in capsys.readouterr().err


def test_a_study_split_over_indices_is_the_same_study():
    tiny = {"data": {"num_samples": 200}, "model": {"expert_hidden": (4,)}, "train": {"epochs": 1}, "search": {"rows": 32}}
    config = make_tune_config("synthetic", "cpu", trials=3, seed=1, gates=("topk",), **tiny)
    whole, _ = run_tune(config)
    parts = run_tune(config, indices=[2])[0] + run_tune(config, indices=[0, 1])[0]
    key = lambda t: (t.trial, t.arm)  # noqa: E731
    assert [(t.trial, t.arm, t.params, t.val, t.test) for t in sorted(parts, key=key)] == \
        [(t.trial, t.arm, t.params, t.val, t.test) for t in sorted(whole, key=key)]
    with pytest.raises(ValueError, match="trial index"):
        run_tune(config, indices=[3])


def test_trials_needed_rejects_a_probability_outside_the_open_interval():
    for p in (0.0, 1.0):
        with pytest.raises(ValueError, match="probability must be in"):
            trials_needed([1.0, 2.0], [1.0, 2.0], 1.5, probability=p, higher_is_better=True)


def test_best_of_n_statistics_reject_values_that_do_not_pair_with_the_scores():
    # values longer than the scores were silently cut to the scores' length (an answer about other trials)
    expected_best_of_n = importlib.import_module("routing_search.experiments.stats").expected_best_of_n
    for call in (lambda v: trials_needed([1.0, 2.0], v, 1.0, probability=0.5, higher_is_better=True),
                 lambda v: reach_probability([1.0, 2.0], v, 1.0, 1, higher_is_better=True),
                 lambda v: expected_best_of_n([1.0, 2.0], v, 1, higher_is_better=True)):
        for values in ([0.0, 0.0, 5.0], [0.0]):
            with pytest.raises(ValueError, match="values must be a 1-D sequence with one entry per score"):
                call(values)


def test_a_report_of_fewer_trials_than_configured_states_the_trials_it_holds(tmp_path):
    # 3 of the 6 configured trials (a study run over indices, or the trials kept after a failure): the report said
    # "6 random-search trials" and headed the last column "best of 6" above the best of 3
    config = make_tune_config("synthetic", "cpu", trials=6, seed=0)
    data = SimpleNamespace(metrics=[MetricSpec("mse", lambda p, t: 0.0, False)])
    rows = [(1.0 + 0.1 * i, 1.0 + 0.1 * i) for i in range(3)]
    write_tune_report(config, _trials({"sgd": rows, "search": rows}), data, tmp_path, plots=False)  # type: ignore[arg-type]
    md = (tmp_path / "tune.md").read_text()
    assert md.count("3 of the 6 configured random-search trials per arm") == 1
    assert "| best of 1 | best of 3 | best of 3 |" in md and "best of 6" not in md and "> 6" not in md
    full = tmp_path / "full"
    six = [(1.0 + 0.1 * i, 1.0 + 0.1 * i) for i in range(6)]
    write_tune_report(config, _trials({"sgd": six, "search": six}), data, full, plots=False)  # type: ignore[arg-type]
    assert "\n6 random-search trials per arm" in (full / "tune.md").read_text()


def test_a_trial_given_twice_is_refused_not_silently_replaced():
    trials = _trials({"sgd": [(1.0, 1.0), (2.0, 2.0)], "search": [(1.0, 1.0), (2.0, 2.0)]})
    with pytest.raises(ValueError, match=r"arm 'sgd': trial 0 is given more than once"):
        summarise_tune(trials + [TuneTrial(0, "topk", "sgd", {}, 9.0, 9.0, 0.0)], higher_is_better=False, target=None,
                       probability=0.9)
    config = make_tune_config("synthetic", "cpu", trials=3, seed=1, gates=("topk",))
    with pytest.raises(ValueError, match="indices names a trial more than once"):
        run_tune(config, indices=[1, 1])


def test_a_trial_with_an_undefined_metric_is_named():
    # it failed in the order statistics with 'scores must be finite', naming no trial, after every trial had run
    trials = _trials({"sgd": [(1.0, 1.0), (float("nan"), 2.0)], "search": [(1.0, 1.0), (2.0, float("inf"))]})
    with pytest.raises(ValueError, match=r"gate 'topk': the headline metric is NaN/inf for trial 1 sgd \(val nan, test 2.0\), "
                                         r"trial 1 search \(val 2.0, test inf\)"):
        summarise_tune(trials, higher_is_better=True, target=None, probability=0.9)


def test_best_of_n_does_not_depend_on_the_order_of_tied_trials():
    # tied validation scores were broken by trial index: the best of 2 of [(1, 0), (1, 10)] was 10, and 0 in the
    # other order; each tied trial is the one picked with equal probability, 5 on average
    from routing_search.experiments.stats import expected_best_of_n

    assert expected_best_of_n([1.0, 1.0], [0.0, 10.0], 2, higher_is_better=True) == 5.0
    assert expected_best_of_n([1.0, 1.0], [10.0, 0.0], 2, higher_is_better=True) == 5.0
    rng = np.random.default_rng(3)
    for _ in range(50):
        t = int(rng.integers(2, 7))
        scores, values = rng.integers(0, 3, t).astype(float), rng.normal(size=t)
        perm = rng.permutation(t)
        for replace in (False, True):
            for n in range(1, t + 1):
                a = expected_best_of_n(scores, values, n, higher_is_better=False, replace=replace)
                b = expected_best_of_n(scores[perm], values[perm], n, higher_is_better=False, replace=replace)
                assert a == pytest.approx(b, abs=1e-12)
            target = float(np.median(values))
            assert trials_needed(scores, values, target, probability=0.8, higher_is_better=False, replace=replace) == \
                trials_needed(scores[perm], values[perm], target, probability=0.8, higher_is_better=False, replace=replace)
    # a tied best group of which half reaches the target: reached with probability 1/2 however many trials
    assert reach_probability([1, 1], [1, 0], 1, 50, higher_is_better=True, replace=True) == pytest.approx(0.5)
    assert trials_needed([1, 1], [1, 0], 1, probability=0.6, higher_is_better=True) is None
    assert trials_needed([1, 1], [0, 1], 1, probability=0.4, higher_is_better=True) == 1
