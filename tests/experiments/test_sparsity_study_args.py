"""benchmarks/sparsity_study.py rejects malformed --cycles / --arms when parsing, naming the flag, instead of
failing deep inside the first run (after generating its data) with an unpacking error."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "sparsity_study.py"


def _load():
    spec = importlib.util.spec_from_file_location("sparsity_study", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, flag", [
    (["--cycles", "0", "0.25", "0.4", "0.55"], "--cycles"),  # not a whole number of triples
    (["--arms", "dselectk"], "--arms"),  # misspelt arm
])
def test_bad_flags_fail_at_parse_time_naming_the_flag(monkeypatch, capsys, argv, flag):
    module = _load()
    monkeypatch.setattr(sys, "argv", ["sparsity_study.py", "--seeds", "1", "--epochs", "1", "--experts", "4", *argv])
    with pytest.raises(SystemExit) as stop:
        module.main()
    assert stop.value.code == 2
    assert flag in capsys.readouterr().err
