"""Output directories for runs (experiments, studies, demos): always a new one, so nothing saved earlier is overwritten."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["new_run_dir", "removed_if_empty_on_failure", "append_json_line", "COMPLETED_RUNS"]

COMPLETED_RUNS = "completed.jsonl"
"""The file of a run directory that receives every finished run (trial) as it completes, one JSON object a line."""


def _check_parent(parent: Path) -> None:
    """Refuse a parent that is a file, or lies under one, naming it (the OS says only 'File exists')."""
    for place in (parent, *parent.parents):
        if place.exists():
            if not place.is_dir():
                where = "is" if place == parent else f"lies under {str(place)!r}, which is"
                raise NotADirectoryError(f"output directory {str(parent)!r} {where} an existing file, not a directory; "
                                         "choose a directory for the outputs (--out)")
            return


def new_run_dir(parent: str | Path, prefix: str) -> Path:
    """Create and return ``parent/prefix-YYYYmmdd-HHMMSS[-N]``, a directory that did not exist before.

    A leading ``~`` of ``parent`` is the home directory (as for ``--data-path``), also where the shell left
    it unexpanded (``--out=~/runs``), rather than a directory named ``~``.

    Raises:
        NotADirectoryError: ``parent`` (or a directory above it) is an existing file.
    """
    parent = Path(parent).expanduser()
    _check_parent(parent)
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        path = parent / (f"{prefix}-{stamp}" if attempt == 0 else f"{prefix}-{stamp}-{attempt}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"could not create a new run directory under {parent}")


@contextlib.contextmanager
def removed_if_empty_on_failure(run_dir: Path) -> Iterator[Path]:
    """Yield ``run_dir``; if the block raises (missing data, a bad device, Ctrl-C) while the directory is
    still empty, remove it, so a failed start leaves no empty run directory behind. A directory holding
    anything is never touched."""
    try:
        yield run_dir
    except BaseException:
        with contextlib.suppress(OSError):  # not empty (or already gone): left as it is
            run_dir.rmdir()
        raise


def append_json_line(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` to ``path`` as one line of JSON and flush it to the OS (a crash later keeps it)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
