"""Output directories for runs (experiments, studies, demos): always a new one, so nothing saved earlier is overwritten."""

from __future__ import annotations

import time
from pathlib import Path

__all__ = ["new_run_dir"]


def new_run_dir(parent: str | Path, prefix: str) -> Path:
    """Create and return ``parent/prefix-YYYYmmdd-HHMMSS[-N]``, a directory that did not exist before."""
    parent = Path(parent)
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
