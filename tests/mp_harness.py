"""Shared helper of the multi-process tests: start ranks of a gloo group on 127.0.0.1, never hang.

``launch(worker, case, world, tmp_path, args=...)`` runs ``python worker RANK WORLD PORT CASE TIMEOUT OUT_JSON
*args`` for every rank on a free port and returns each rank's JSON result. Each rank must call
``init_process_group(..., timeout=timedelta(seconds=TIMEOUT))`` (collectives time out) and the whole
launch is killed after ``wall`` seconds (a test fails instead of hanging CI). Tests get it as the ``harness``
fixture of ``tests/conftest.py`` (the suite runs with ``--import-mode=importlib``, so tests are not a package).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(
    worker: Path, case: str, world: int, tmp_path: Path, *, args: tuple[str, ...] = (), timeout: float = 60.0, wall: float = 120.0
) -> list[dict[str, Any]]:
    """Run ``case`` of ``worker`` on ``world`` ranks; every rank's JSON result, in rank order."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    outs = [tmp_path / f"{case}-{world}-{r}.json" for r in range(world)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(r), str(world), str(port), case, str(timeout), str(outs[r]), *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        for r in range(world)
    ]
    deadline = time.monotonic() + wall
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0].decode(errors="replace"))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            for q in procs:
                q.wait()
            pytest.fail(f"case {case!r} on {world} ranks hung: not finished within {wall} s")
    results = []
    for r, (out, log) in enumerate(zip(outs, logs)):
        assert out.exists(), f"rank {r} wrote no result; its output:\n{log[-4000:]}"
        results.append(json.loads(out.read_text()))
    return results


def ok(results: list[dict[str, Any]]) -> list[Any]:
    """Every rank's ``'ok'`` payload (fails the test, with the rank's error, when a rank failed)."""
    for r, res in enumerate(results):
        assert "ok" in res, f"rank {r} failed: {res.get('error')}: {res.get('message')}\n{res.get('traceback', '')}"
    return [res["ok"] for res in results]
