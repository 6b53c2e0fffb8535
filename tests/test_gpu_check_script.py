"""benchmarks/gpu_check.py: without CUDA it says so and exits 0; CPU-against-CPU every check runs and passes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check(load_by_path):
    return load_by_path("gpu_check", SCRIPT)


def test_without_cuda_it_says_so_and_exits_0(gpu_check, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


@pytest.mark.slow
def test_every_check_runs_and_passes_cpu_against_cpu(gpu_check, capsys):
    assert gpu_check.main(["--device", "cpu", "--no-bench"]) == 0
    out = capsys.readouterr().out
    assert "0 check(s) failed" in out and "FAIL" not in out
    assert out.count("[ok] gate ") == 2 * len(gpu_check.gates())


def test_a_mismatch_fails_the_run(gpu_check, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "CHECKS", (lambda device: [("a check", False, "mismatch")], lambda device: 1 / 0))
    assert gpu_check.main(["--device", "cpu", "--no-bench"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] a check" in out and "ZeroDivisionError" in out and "2 check(s) failed" in out
