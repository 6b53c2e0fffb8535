"""Where the loaders look for data, and the error they raise when it is not there.

Nothing is ever downloaded at run time. Each loader takes ``path=None`` (look in the data set's default
places) or an explicit file or directory. When nothing is found, it raises :class:`DataNotFoundError`,
whose message lists every place it looked and the exact commands that put the data there; a file that is
there but unusable raises :class:`DataFileError` naming it.

The package's own data directory is ``~/.local/share/routing_search`` (:func:`default_data_dir`); it is
only read, never written, by the loaders.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["DataNotFoundError", "DataFileError", "default_data_dir", "as_path", "missing_data_error"]


class DataNotFoundError(FileNotFoundError):
    """A data set's files were not found; the message says where the loader looked and how to install them."""


class DataFileError(ValueError):
    """A data set's file was found but cannot be used (damaged, truncated, another format, wrong content);
    the message names the file and what was wrong. A ``ValueError``, so existing handlers still catch it."""


def default_data_dir() -> Path:
    """The package's data directory, ``~/.local/share/routing_search`` (it may not exist).

    >>> default_data_dir().parts[-3:]
    ('.local', 'share', 'routing_search')
    """
    return Path.home() / ".local" / "share" / "routing_search"


def as_path(path: str | os.PathLike[str], *, name: str = "path") -> Path:
    """``path`` as an expanded :class:`~pathlib.Path` (``~`` resolved); a clear error for anything else."""
    if isinstance(path, (bytes, bytearray)) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be None, a str or an os.PathLike file/directory path, got {type(path).__name__}")
    return Path(path).expanduser()


def missing_data_error(dataset: str, looked_in: Sequence[Path], how_to_install: str) -> DataNotFoundError:
    """The error a loader raises when ``dataset`` is missing: where it looked and how to install it.

    >>> err = missing_data_error("toy", [Path("/nowhere/toy.csv")], "pip install toy-data")
    >>> print(err)  # doctest: +NORMALIZE_WHITESPACE
    toy data not found. Looked in:
      /nowhere/toy.csv
    To install it:
      pip install toy-data
    """
    places = "\n".join(f"  {p}" for p in looked_in) if looked_in else "  (nowhere)"
    steps = "\n".join(f"  {line}" for line in how_to_install.strip().splitlines())
    return DataNotFoundError(f"{dataset} data not found. Looked in:\n{places}\nTo install it:\n{steps}")
