"""The experiment harness: every arm for every gate, the random control really permutes, paired seeds,
reproducible reports, tuning budgets, and the statistics they rest on."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from routing_search.experiments import (
    ARMS,
    ExperimentConfig,
    MetricSpec,
    apply_random_permutations,
    load_experiment_data,
    make_config,
    make_tune_config,
    run_experiment,
    run_one,
)
from routing_search.experiments.config import SEARCH_ARMS, GuardConfig
from routing_search.experiments.models import build_model, moe_layer, training_steps
from routing_search.gates import COMET, DSelectK, GammaAnnealing
from routing_search.training.task_metrics import mse
from routing_search.experiments.report import strip_times, write_report
from routing_search.experiments.runner import evaluate, is_identity
from routing_search.experiments.stats import (
    best_of_n_weights,
    expected_best_of_n,
    paired_comparison,
    reach_probability,
    trials_needed,
)
from routing_search.experiments.tune import run_tune, write_tune_report

# Short runs end with non-binary DSelect-k / COMET gates; fit's warning about it is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:training ended with non-binary:RuntimeWarning")

TINY = {"data": {"num_samples": 240}, "model": {"expert_hidden": (4,)}, "train": {"epochs": 2, "batch_size": 64},
        "search": {"rows": 64}}


def tiny(dataset: str = "synthetic", **overrides) -> ExperimentConfig:
    parts = {k: dict(v) for k, v in TINY.items()}
    for key, value in overrides.items():
        if key in parts:
            parts[key].update(value)
        else:
            parts[key] = value
    parts.setdefault("seeds", 1)
    return make_config(dataset, "cpu", **parts)


# ----------------------------------------------------------------------------------- config
def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="dataset"):
        make_config("mnist")
    with pytest.raises(ValueError, match="gates"):
        make_config("synthetic", gates=("softmax", "bogus"))
    with pytest.raises(ValueError, match="hash"):
        make_config("synthetic", gates=("hash",))
    with pytest.raises(ValueError, match="seeds"):
        make_config("synthetic", seeds=0)
    with pytest.raises(ValueError, match="unknown train fields"):
        make_config("synthetic", train={"epoch": 3})
    with pytest.raises(ValueError, match="k must be"):
        make_config("synthetic", model={"k": 9})
    with pytest.raises(ValueError, match="twice"):
        make_config("synthetic", arms=("sgd", "sgd"))


def test_presets_use_the_papers_sizes():
    movielens = make_config("movielens", "paper")
    assert (movielens.model.embedding_dim, movielens.model.num_experts, movielens.model.expert_hidden, movielens.model.k) == (128, 16, (256,), 2)
    assert movielens.model.dropout == 0.5 and movielens.train.batch_size == 512 and movielens.model.tower_hidden == 256
    mnist = make_config("multi-mnist", "paper")
    assert mnist.model.num_experts == 8 and mnist.data.max_train is None
    assert make_config("multi-mnist", "cpu").data.max_train is not None


# ----------------------------------------------------------------------------------- arms
@pytest.mark.parametrize("dataset,gates", [("synthetic", ("softmax", "topk", "dselect_k", "comet", "gumbel")), ("keyed", ("hash",))])
def test_every_arm_runs_for_every_gate(dataset, gates):
    cfg = tiny(dataset, gates=gates, data={"num_samples": 240, "num_keys": 16})
    result = run_experiment(cfg)
    assert {(r.gate, r.arm) for r in result.runs} == set(itertools.product(gates, ARMS))
    for r in result.runs:
        assert all(math.isfinite(v) for v in r.metrics.values()), (r.gate, r.arm)
        assert len(r.experts_used) == cfg.data.num_tasks
        assert len(r.usage) == cfg.train.epochs
        if r.arm in SEARCH_ARMS:
            assert r.searches == cfg.train.epochs  # one search at the end of every epoch
            assert len(r.guard_checks) == (cfg.train.epochs if r.arm == "guarded" else 0)
        else:
            assert r.searches == 0 and r.guard_rejections == 0 and r.guard_checks == []
        if r.arm == "sinkhorn":
            assert len(r.permutations) == cfg.data.num_tasks + 1  # task modules + the rounded learned one
            assert sorted(r.permutations[-1][0]) == list(range(cfg.model.num_experts))


def test_random_arm_really_permutes():
    cfg = tiny(gates=("topk",))
    data = load_experiment_data(cfg, 0)
    kwargs = dict(input_shape=data.dataset.input_shape, num_tasks=4, output_dims=[1] * 4)
    plain = build_model(cfg, "topk", "sgd", 0, **kwargs)
    permuted = build_model(cfg, "topk", "random", 0, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), permuted.state_dict().values()))
    # a Top-k gate whose logits are not tied, so which experts get the weight matters
    with torch.no_grad():
        for model in (plain, permuted):
            for gate in moe_layer(model).gates:
                gate.logits.copy_(torch.arange(8, dtype=torch.float32))
    rows = apply_random_permutations(permuted, np.random.default_rng([0, 7919]))
    assert len(rows) == 4 and not any(is_identity(r) for r in rows)
    for row in rows:
        assert sorted(row[0]) == list(range(8))
    _, w_plain = evaluate(plain, data.dataset.test, "cpu")
    _, w_perm = evaluate(permuted, data.dataset.test, "cpu")
    for a, b, row in zip(w_plain, w_perm, rows):
        assert not torch.equal(a, b)
        inverse = np.argsort(row[0])
        assert torch.equal(b, a[:, inverse])  # the same weights, moved to the permuted experts
    # the runner records the permutation it applied, seeded by the seed
    record = run_one(cfg, data, "topk", "random", 0)
    assert record.initial_permutations == rows
    assert not is_identity(record.initial_permutations[0])
    assert is_identity(run_one(cfg, data, "topk", "sgd", 0).initial_permutations[0])


def test_same_seed_same_start_for_every_arm():
    cfg = tiny(gates=("dselect_k",))
    data = load_experiment_data(cfg, 1)
    kwargs = dict(input_shape=data.dataset.input_shape, num_tasks=4, output_dims=[1] * 4)
    base = build_model(cfg, "dselect_k", "sgd", 1, **kwargs).state_dict()
    wrapped = build_model(cfg, "dselect_k", "sinkhorn", 1, **kwargs).state_dict()
    # the Sinkhorn wrapper adds its own state but leaves every shared parameter as in the other arms
    for name, value in base.items():
        if name.startswith("gates."):
            name = name.replace("gates.0.", "gates.0.gate.").replace("gates.1.", "gates.1.gate.").replace("gates.2.", "gates.2.gate.").replace("gates.3.", "gates.3.gate.")
        assert torch.equal(value, wrapped[name]), name
    other = build_model(cfg, "dselect_k", "sgd", 2, **kwargs).state_dict()
    assert not all(torch.equal(base[k], other[k]) for k in base)


# ----------------------------------------------------------------------------------- the guarded arm
def test_bad_arm_names_the_accepted_values():
    with pytest.raises(ValueError, match="arms must be one of 'sgd', 'random', 'search', 'guarded', 'sinkhorn'; got 'guard'"):
        make_config("synthetic", arms=("sgd", "guard"))
    with pytest.raises(ValueError, match="guard tolerance"):
        make_config("synthetic", guard={"tolerance": -0.1})
    with pytest.raises(ValueError, match="unknown guard fields"):
        make_config("synthetic", guard={"tol": 0.1})
    with pytest.raises(TypeError, match="guard must be a GuardConfig"):
        ExperimentConfig(dataset="synthetic", guard={"tolerance": 0.0})
    assert make_config("synthetic", guard={"tolerance": 0.01}).guard == GuardConfig(tolerance=0.01)
    assert "guarded" in make_config("synthetic").arms


def _conflicting_guard_data(cfg: ExperimentConfig):
    """Tiny synthetic data whose guard conflicts with the loss by construction: task 0's MSE must not *fall*,
    so every move that lowers task 0's loss is refused."""
    data = load_experiment_data(cfg, 0)
    data.guard_metrics = [MetricSpec("task0/mse", mse(0), True)]
    return data


def test_guarded_arm_never_worsens_a_guarded_metric_at_a_search():
    cfg = tiny(gates=("topk",), arms=("search", "guarded"), train={"epochs": 3})
    data = _conflicting_guard_data(cfg)
    search = run_one(cfg, data, "topk", "search", 0)
    guarded = run_one(cfg, data, "topk", "guarded", 0)
    assert guarded.searches == len(guarded.guard_checks) == 3
    assert guarded.guard_rejections > 0  # the guard refused moves the loss accepted ...
    assert guarded.accepted_moves < search.accepted_moves
    for check in guarded.guard_checks:  # ... so the guarded metric (here: higher is better) never fell at a search
        assert check["task0/mse"]["end"] >= check["task0/mse"]["start"]
    assert search.guard_checks == [] and search.guard_rejections == 0


def test_guard_checks_are_the_values_each_search_reported(monkeypatch):
    # The guarded arm's start/end values come from each search's own result (result.guard, recorded by fit),
    # not from the order in which the guards happen to be computed; one check per search.
    import routing_search.training.searcher as searcher_module

    results = []
    real = searcher_module.local_search

    def spy(*args, **kwargs):
        results.append(real(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(searcher_module, "local_search", spy)
    cfg = tiny(gates=("topk",), arms=("guarded",), train={"epochs": 3})
    data = _conflicting_guard_data(cfg)
    guarded = run_one(cfg, data, "topk", "guarded", 0)
    assert guarded.searches == len(guarded.guard_checks) == len(results) == 3
    assert guarded.guard_rejections == sum(r.guard_rejections for r in results) > 0
    for check, result in zip(guarded.guard_checks, results):
        assert check == {name: {"start": g["start"], "end": g["end"]} for name, g in result.guard.items()}
        assert set(check) == {"task0/mse"}


def test_guarded_equals_search_when_no_guard_refuses():
    # Static Top-k with one permutation per task: a move changes one task's predictions only, so lowering the
    # loss lowers that task's MSE on the same rows and no per-task MSE guard can refuse it.
    cfg = tiny(gates=("topk",), arms=("search", "guarded"))
    data = load_experiment_data(cfg, 0)
    assert [m.name for m in data.guard_metrics] == [f"task{t}/mse" for t in range(4)]
    search, guarded = run_one(cfg, data, "topk", "search", 0), run_one(cfg, data, "topk", "guarded", 0)
    assert guarded.guard_rejections == 0 and guarded.accepted_moves == search.accepted_moves > 0
    assert guarded.metrics == search.metrics and guarded.permutations == search.permutations
    for check in guarded.guard_checks:
        for name, values in check.items():
            assert values["end"] <= values["start"], name  # MSE: lower is better


def test_guarded_report_compares_with_search_and_counts_rejections(tmp_path):
    cfg = tiny(gates=("topk",), arms=("sgd", "random", "search", "guarded"), seeds=2, train={"epochs": 2})

    def loader(config, seed):
        data = load_experiment_data(config, seed)
        data.guard_metrics = [MetricSpec("task0/mse", mse(0), True)]
        return data

    report = write_report(run_experiment(cfg, data_loader=loader), tmp_path, plots=False)
    assert set(report["comparisons"]) == {"sgd", "random", "search"}
    assert set(report["comparisons"]["search"]["topk"]) == {"guarded"}
    assert report["comparisons"]["search"]["topk"]["guarded"]["mean/mse"]["n"] == 2
    for control in ("sgd", "random"):
        assert "guarded" in report["comparisons"][control]["topk"]
    summary = report["summary"]["topk"]
    assert summary["guarded"]["guard_rejections"]["mean"] > 0 and summary["search"]["guard_rejections"]["mean"] == 0
    guard = summary["guarded"]["guard"]
    assert guard["searches"] == 4 and guard["rejections"] == sum(r["guard_rejections"] for r in report["runs"])
    assert guard["metrics"]["task0/mse"]["searches"] == 4 and guard["metrics"]["task0/mse"]["worse"] == 0
    md = (tmp_path / "report.md").read_text()
    assert "Paired comparisons against `search`" in md and "| guarded vs search |" in md
    assert "The guards at each search" in md and "guard rejections" in md


# ----------------------------------------------------------------------------------- γ annealing
def test_selector_gates_anneal_over_the_runs_budget():
    cfg = tiny(gates=("dselect_k",), arms=("sgd",), train={"epochs": 3})
    data = load_experiment_data(cfg, 0)
    steps = training_steps(cfg, len(data.dataset.train))
    assert steps == 3 * math.ceil(len(data.dataset.train) / 64)
    kwargs = dict(input_shape=data.dataset.input_shape, num_tasks=4, output_dims=[1] * 4)
    for gate in ("dselect_k", "comet"):
        fitted = moe_layer(build_model(cfg, gate, "sgd", 0, total_steps=steps, **kwargs)).gates
        default = moe_layer(build_model(cfg, gate, "sgd", 0, **kwargs)).gates
        for g, d in zip(fitted, default):
            assert isinstance(g, (DSelectK, COMET))
            assert g.anneal == GammaAnnealing.for_budget(steps) and d.anneal != g.anneal
    # fitted to the budget, a short run ends with every static gate binary: at most k experts per task
    record = run_one(cfg, data, "dselect_k", "sgd", 0)
    assert all(e <= cfg.model.k for e in record.experts_used), record.experts_used


# ----------------------------------------------------------------------------------- reports
def test_reports_are_reproducible_from_the_seed(tmp_path):
    cfg = tiny(gates=("topk", "dselect_k"), seeds=2, train={"epochs": 1})
    first = write_report(run_experiment(cfg), tmp_path / "a", plots=False)
    second = write_report(run_experiment(cfg), tmp_path / "b", plots=True)
    assert strip_times(first | {"plots": []}) == strip_times(second | {"plots": []})
    on_disk = json.loads((tmp_path / "a" / "report.json").read_text())
    assert strip_times(on_disk) == strip_times(json.loads(json.dumps(first)))
    for name in second["plots"]:
        png = (tmp_path / "b" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"metric_mean_mse.png", "usage_topk.png", "heatmap_dselect_k.png"} <= set(second["plots"])
    # paired comparisons of every arm against both controls, for every metric
    for control in ("sgd", "random"):
        for gate in ("topk", "dselect_k"):
            arms = second["comparisons"][control][gate]
            assert set(arms) == set(ARMS) - {control}
            for comparison in arms.values():
                assert comparison["mean/mse"]["n"] == 2
    md = (tmp_path / "b" / "report.md").read_text()
    assert "Paired comparisons against `random`" in md and "better by ≥ 1 %" in md
    with pytest.raises(FileExistsError):
        write_report(run_experiment(tiny(gates=("softmax",), arms=("sgd",))), tmp_path / "a")


def test_tune_writes_best_of_n(tmp_path):
    config = make_tune_config("synthetic", "cpu", trials=2, seed=0, data=TINY["data"], model=TINY["model"], train={"epochs": 1},
                              search={"rows": 64})
    trials, data = run_tune(config)
    assert len(trials) == 4 and {t.arm for t in trials} == {"sgd", "search"}
    assert [t.params["lr"] for t in trials if t.arm == "sgd"] == [t.params["lr"] for t in trials if t.arm == "search"]
    report = write_tune_report(config, trials, data, tmp_path)
    entry = report["summary"]["topk"]["arms"]["sgd"]
    assert len(entry["best_of_n"]) == 2 and len(entry["best_of_n_with_replacement"]) == 100
    assert (tmp_path / "best_of_n.png").exists() and (tmp_path / "tune.md").read_text().startswith("# Tuning budget")


# ----------------------------------------------------------------------------------- statistics
def test_best_of_n_matches_enumeration():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=6)
    values = rng.normal(size=6)
    for n in range(1, 7):
        exact = np.mean([values[list(c)][np.argmax(scores[list(c)])] for c in itertools.combinations(range(6), n)])
        assert expected_best_of_n(scores, values, n, higher_is_better=True) == pytest.approx(exact)
        lower = np.mean([values[list(c)][np.argmin(scores[list(c)])] for c in itertools.combinations(range(6), n)])
        assert expected_best_of_n(scores, values, n, higher_is_better=False) == pytest.approx(lower)
    for n in (1, 2, 3):
        draws = list(itertools.product(range(6), repeat=n))
        exact = np.mean([values[list(c)][np.argmax(scores[list(c)])] for c in draws])
        assert expected_best_of_n(scores, values, n, higher_is_better=True, replace=True) == pytest.approx(exact)
        target = float(np.median(values))
        hit = np.mean([values[list(c)][np.argmax(scores[list(c)])] >= target for c in draws])
        assert reach_probability(scores, values, target, n, higher_is_better=True, replace=True) == pytest.approx(hit)
    for t, n in ((5, 1), (5, 3), (9, 9)):
        assert best_of_n_weights(t, n).sum() == pytest.approx(1.0)
        assert best_of_n_weights(t, n, replace=True).sum() == pytest.approx(1.0)


def test_trials_needed():
    scores = [0.1, 0.2, 0.3, 0.4]
    # only the best trial reaches the target: 1 - (3/4)^N >= 0.9 needs N = 9
    assert trials_needed(scores, scores, 0.4, probability=0.9, higher_is_better=True) == 9
    assert trials_needed(scores, scores, 0.4, probability=0.9, higher_is_better=True, replace=False) == 4
    assert trials_needed(scores, scores, 0.5, probability=0.9, higher_is_better=True) is None
    assert trials_needed(scores, scores, 0.1, probability=0.9, higher_is_better=True) == 1


def test_paired_comparison():
    r = paired_comparison([0.9, 0.5, 1.0, 2.0], [1.0, 1.0, 1.0, 1.9], higher_is_better=False)
    assert (r["better"], r["worse"], r["n"]) == (2, 1, 4)
    assert r["median_ratio"] == pytest.approx(np.median([0.9, 0.5, 1.0, 2.0 / 1.9]))
    assert r["diff"]["mean"] == pytest.approx(np.mean([-0.1, -0.5, 0.0, 0.1]))
    assert 0 <= r["sign_p"] <= 1 and r["wilcoxon_p"] is not None
    higher = paired_comparison([0.9, 0.5], [1.0, 1.0], higher_is_better=True)
    assert (higher["better"], higher["worse"]) == (0, 2)
    with pytest.raises(ValueError):
        paired_comparison([1.0], [1.0, 2.0], higher_is_better=True)


def test_paired_comparison_leaves_out_seeds_whose_values_are_undefined():
    # Regression: a NaN value (e.g. a ROC AUC with one class) counted as a non-zero difference in the sign test
    # (as a seed where the arm lost), so the p-value was computed on a comparison that was never made.
    nan = float("nan")
    with_nan = paired_comparison([0.8, nan, 0.9, 0.7], [0.7, 0.6, 0.8, 0.6], higher_is_better=True)
    without = paired_comparison([0.8, 0.9, 0.7], [0.7, 0.8, 0.6], higher_is_better=True)
    assert (with_nan["n"], with_nan["excluded"], without["excluded"]) == (3, 1, 0)
    for key in ("better", "worse", "sign_p", "wilcoxon_p", "median_ratio", "diff"):
        assert with_nan[key] == without[key], key
    assert without["sign_p"] == pytest.approx(0.25)  # 3 of 3 better: two-sided binomial p
    none = paired_comparison([nan], [1.0], higher_is_better=False)
    assert (none["n"], none["excluded"], none["sign_p"], none["wilcoxon_p"], none["diff"]["mean"]) == (0, 1, 1.0, None, None)
    for bad in (-0.01, float("nan"), float("inf"), "1%"):
        with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
            paired_comparison([1.0], [1.0], higher_is_better=True, threshold=bad)


def test_data_fields_of_loaded_sets_are_refused_for_generated_ones():
    # Regression: make_config("synthetic", data={"max_train": 100}) ran on all 2,800 training rows without a word.
    for dataset in ("synthetic", "keyed"):
        for field_name, value in (("max_train", 100), ("max_test", 50), ("path", "/data")):
            with pytest.raises(ValueError, match=rf"data fields \['{field_name}'\] apply to a loaded data set; '{dataset}' is generated"):
                make_config(dataset, "cpu", data={field_name: value})
    assert make_config("movielens", "cpu", data={"max_train": 100}).data.max_train == 100


def test_sizes_given_as_one_number_where_a_list_is_due_are_named():
    # Regression: "'int' object is not iterable" / "object of type 'int' has no len()" named no field.
    with pytest.raises(TypeError, match=r"expert_hidden must be a list of hidden widths, e\.g\. \(16,\), got 16"):
        make_config("synthetic", "cpu", model={"expert_hidden": 16})
    with pytest.raises(ValueError, match=r"expert_channels must hold two channel counts, e\.g\. \(4, 8\), got 4"):
        make_config("synthetic", "cpu", model={"expert_channels": 4})


def test_a_report_never_replaces_plots_already_in_the_directory(tmp_path):
    # only report.json / report.md were checked: a directory holding another run's plots had them overwritten
    result = run_experiment(tiny(gates=("softmax",), arms=("sgd",), seeds=1, train={"epochs": 1}))
    (tmp_path / "metric_mean_mse.png").write_bytes(b"someone else's plot")
    with pytest.raises(FileExistsError, match="metric_mean_mse.png already exists"):
        write_report(result, tmp_path)
    assert (tmp_path / "metric_mean_mse.png").read_bytes() == b"someone else's plot"
    assert not (tmp_path / "report.json").exists() and not (tmp_path / "usage_softmax.png").exists()
    assert write_report(result, tmp_path, plots=False)["plots"] == []  # without plots nothing of theirs is touched


def test_the_guard_summary_worst_worsening_is_never_negative():
    # with every search improving, 'worst' in report.json was the negated smallest improvement (report.md showed 0)
    from types import SimpleNamespace

    from routing_search.experiments.report import _guard_summary

    result = SimpleNamespace(metric_names=["acc", "mse"], higher_is_better={"acc": True, "mse": False})
    runs = [SimpleNamespace(guard_checks=[{"acc": {"start": 0.5, "end": 0.75}, "mse": {"start": 1.0, "end": 1.5}}],
                            guard_rejections=0, searches=1, accepted_moves=2)]
    summary = _guard_summary(runs, result)  # type: ignore[arg-type]
    assert summary["metrics"]["acc"]["worst"] == 0.0 and summary["metrics"]["acc"]["improved"] == 1
    assert summary["metrics"]["mse"]["worst"] == 0.5 and summary["metrics"]["mse"]["worse"] == 1


def test_rounding_level_differences_are_ties_in_the_counts_and_the_tests():
    """Regression: a dense gate trained under a permutation (the random arm of Softmax) differs from sgd by float32
    rounding only (about 1e-8 relative), and the report said 'better on 3/3' at threshold 0 with sign p 0.25."""
    sgd = [0.39744771648569044, 0.32672684900869386, 0.3841353413210639]
    shuffled = [0.39744770919010675, 0.32672684946779074, 0.3841353407696396]  # measured: seeds 0-2, 2 epochs
    tied = paired_comparison(shuffled, sgd, higher_is_better=False, threshold=0)
    assert (tied["better"], tied["worse"], tied["sign_p"], tied["wilcoxon_p"]) == (0, 0, 1.0, None)
    strict = paired_comparison(shuffled, sgd, higher_is_better=False, threshold=0, tie_rtol=0)
    assert (strict["better"], strict["worse"]) == (2, 1) and strict["sign_p"] == 1.0
    real = paired_comparison([1.0, 2.0, 3.0], [1.1, 2.2, 3.3], higher_is_better=False, threshold=0)
    assert real["better"] == 3 and real["sign_p"] == 0.25
    with pytest.raises(ValueError, match="tie_rtol must be a number in"):
        paired_comparison([1.0], [1.0], higher_is_better=True, tie_rtol=-1e-6)
