"""benchmarks/sparsity_study.py rejects malformed --cycles / --arms when parsing, naming the flag, instead of
failing deep inside the first run (after generating its data) with an unpacking error."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "sparsity_study.py"


@pytest.fixture
def study(load_by_path):
    """benchmarks/sparsity_study.py, imported afresh for each test."""
    return load_by_path("sparsity_study", SCRIPT)


@pytest.mark.parametrize("argv, flag", [
    (["--cycles", "0", "0.25", "0.4", "0.55"], "--cycles"),  # not a whole number of triples
    (["--arms", "dselectk"], "--arms"),  # misspelt arm
    (["--restarts", "0"], "--restarts"),  # no run to score
])
def test_bad_flags_fail_at_parse_time_naming_the_flag(study, monkeypatch, capsys, argv, flag):
    module = study
    monkeypatch.setattr(sys, "argv", ["sparsity_study.py", "--seeds", "1", "--epochs", "1", "--experts", "4", *argv])
    with pytest.raises(SystemExit) as stop:
        module.main()
    assert stop.value.code == 2
    assert flag in capsys.readouterr().err


def test_restarts_score_the_lowest_validation_mse_and_never_look_at_test_or_truth(study, monkeypatch):
    """--restarts R trains restarts 0..R-1 on the seed's data and scores the one with the lowest val_mse
    (here restart 1, although restart 2 has the best F1 and test MSE)."""
    module = study
    fake = {0: {"val_mse": 0.5, "f1": 0.7, "mse": 0.6}, 1: {"val_mse": 0.3, "f1": 0.8, "mse": 0.5},
            2: {"val_mse": 0.4, "f1": 0.9, "mse": 0.4}}
    calls = []

    def run(arm, n, seed, args, restart=0):
        calls.append((arm, n, seed, restart))
        return dict(fake[restart])

    monkeypatch.setattr(module, "run", run)
    args = type("Args", (), {"restarts": 3})()
    best = module.best_of_restarts("dselect", 8, 4, args)
    assert calls == [("dselect", 8, 4, r) for r in range(3)]
    assert best["val_mse"] == 0.3 and best["f1"] == 0.8
    assert best["restart_f1"] == [0.7, 0.8, 0.9]
